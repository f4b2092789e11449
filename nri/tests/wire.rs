//! The multiplexer and ttrpc framing, byte by byte, against the upstream definitions:
//! `containerd/nri` `pkg/net/multiplex` (8-byte frame header: big-endian connection
//! id and length; connection 1 the plugin service, 2 the runtime service) and
//! `containerd/ttrpc` `PROTOCOL.md` (10-byte header: length, stream id, type, flags;
//! `Request{service=1, method=2, payload=3, timeout_nano=4}`,
//! `Response{status=1, payload=2}`). Expected bytes are written out by hand here,
//! not produced by the code under test.

use std::sync::Arc;
use std::time::Duration;

use flower_nri::mux::{self, Mux};
use flower_nri::ttrpc::{self, Status};
use futures::future::BoxFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const PATIENCE: Duration = Duration::from_secs(10);

fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// A length-delimited protobuf field.
fn field(number: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![number << 3 | 2];
    out.extend(varint(bytes.len() as u64));
    out.extend_from_slice(bytes);
    out
}

fn ttrpc_header(len: usize, stream: u32, kind: u8, flags: u8) -> Vec<u8> {
    let mut out = (len as u32).to_be_bytes().to_vec();
    out.extend(stream.to_be_bytes());
    out.extend([kind, flags]);
    out
}

fn mux_frame(conn: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = conn.to_be_bytes().to_vec();
    out.extend((payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

async fn read_exactly(peer: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    tokio::time::timeout(PATIENCE, peer.read_exact(&mut buf))
        .await
        .expect("bytes in time")
        .expect("read");
    buf
}

/// Reads one mux frame: (connection id, payload).
async fn read_frame(peer: &mut UnixStream) -> (u32, Vec<u8>) {
    let header = read_exactly(peer, 8).await;
    let conn = u32::from_be_bytes(header[..4].try_into().unwrap());
    let len = u32::from_be_bytes(header[4..].try_into().unwrap()) as usize;
    (conn, read_exactly(peer, len).await)
}

#[tokio::test]
async fn a_call_is_framed_as_upstream_defines_it() {
    let (ours, mut peer) = UnixStream::pair().unwrap();
    let (_mux, [runtime]) = Mux::new(ours, [mux::RUNTIME_CONN]);
    let client = ttrpc::Client::new(runtime);
    let request = flower_nri::api::RegisterPluginRequest {
        plugin_name: "flower".into(),
        plugin_idx: "50".into(),
        nri_version: String::new(),
    };
    let call = tokio::spawn(async move {
        let r: Result<flower_nri::api::Empty, Status> = client
            .call(
                "nri.pkg.api.v1alpha1.Runtime",
                "RegisterPlugin",
                &request,
                Duration::from_secs(5),
            )
            .await;
        (r, client)
    });

    let mut payload = field(1, b"flower");
    payload.extend(field(2, b"50"));
    let mut envelope = field(1, b"nri.pkg.api.v1alpha1.Runtime");
    envelope.extend(field(2, b"RegisterPlugin"));
    envelope.extend(field(3, &payload));
    envelope.push(4 << 3); // timeout_nano, varint
    envelope.extend(varint(5_000_000_000));
    let mut expected = ttrpc_header(envelope.len(), 1, 1, 0);
    expected.extend(&envelope);
    assert_eq!(
        read_frame(&mut peer).await,
        (2, expected),
        "mux frame on connection 2, stream 1"
    );

    // Response{status: {}} on stream 1: success with an empty payload.
    let response = field(1, b"");
    let mut message = ttrpc_header(response.len(), 1, 2, 0);
    message.extend(&response);
    peer.write_all(&mux_frame(2, &message)).await.unwrap();
    let (result, client) = call.await.unwrap();
    assert_eq!(result, Ok(flower_nri::api::Empty {}));

    // The next call uses stream 3; an error status comes back as the call's error,
    // even when the response is split over two frames.
    let call = tokio::spawn(async move {
        let r: Result<flower_nri::api::Empty, Status> = client
            .call(
                "svc",
                "M",
                &flower_nri::api::Empty {},
                Duration::from_secs(5),
            )
            .await;
        r
    });
    let (conn, request) = read_frame(&mut peer).await;
    assert_eq!((conn, &request[4..10]), (2, &[0, 0, 0, 3, 1, 0][..]));
    let mut status = vec![1 << 3, 5]; // code = 5, NOT_FOUND
    status.extend(field(2, b"nope"));
    let response = field(1, &status);
    let mut message = ttrpc_header(response.len(), 3, 2, 0);
    message.extend(&response);
    let (a, b) = message.split_at(4);
    peer.write_all(&mux_frame(2, a)).await.unwrap();
    peer.write_all(&mux_frame(2, b)).await.unwrap();
    assert_eq!(call.await.unwrap(), Err(Status::new(5, "nope")));
}

struct Echo;

impl ttrpc::Service for Echo {
    fn call(
        &self,
        service: &str,
        method: &str,
        payload: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>, Status>> {
        let result = match (service, method) {
            ("echo", "Echo") => Ok(payload),
            ("echo", "Slow") => {
                return Box::pin(async {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    Ok(vec![])
                });
            }
            _ => Err(Status::new(12, format!("method {method}"))),
        };
        Box::pin(async move { result })
    }
}

fn request(service: &str, method: &str, payload: &[u8], timeout_nano: Option<u64>) -> Vec<u8> {
    let mut envelope = field(1, service.as_bytes());
    envelope.extend(field(2, method.as_bytes()));
    envelope.extend(field(3, payload));
    if let Some(t) = timeout_nano {
        envelope.push(4 << 3);
        envelope.extend(varint(t));
    }
    envelope
}

fn request_message(stream: u32, envelope: &[u8]) -> Vec<u8> {
    let mut message = ttrpc_header(envelope.len(), stream, 1, 0);
    message.extend_from_slice(envelope);
    message
}

/// Reads one whole ttrpc message from connection `conn`, across frames; returns the
/// stream id, type and data, and the size of each frame it came in.
async fn read_message(peer: &mut UnixStream, conn: u32) -> (u32, u8, Vec<u8>, Vec<usize>) {
    let mut bytes = Vec::new();
    let mut frames = Vec::new();
    loop {
        let (c, payload) = read_frame(peer).await;
        assert_eq!(c, conn);
        frames.push(payload.len());
        bytes.extend(payload);
        if bytes.len() >= 10 {
            let len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
            if bytes.len() >= 10 + len {
                assert_eq!(bytes.len(), 10 + len, "one message per run of frames");
                let stream = u32::from_be_bytes(bytes[4..8].try_into().unwrap());
                return (stream, bytes[8], bytes[10..].to_vec(), frames);
            }
        }
    }
}

/// The (code, message) of a Response's status, decoded by hand.
fn status_of(response: &[u8]) -> (u64, String) {
    assert_eq!(response[0], 1 << 3 | 2, "field 1, status");
    let len = response[1] as usize;
    let status = &response[2..2 + len];
    let (mut code, mut message, mut i) = (0, String::new(), 0);
    while i < status.len() {
        match status[i] {
            0x08 => {
                code = status[i + 1] as u64;
                i += 2;
            }
            0x12 => {
                let n = status[i + 1] as usize;
                message = String::from_utf8(status[i + 2..i + 2 + n].to_vec()).unwrap();
                i += 2 + n;
            }
            other => panic!("unexpected tag {other:#x}"),
        }
    }
    (code, message)
}

#[tokio::test]
async fn the_server_answers_and_enforces_upstreams_stream_rules() {
    let (ours, mut peer) = UnixStream::pair().unwrap();
    let (_mux, [plugin]) = Mux::new(ours, [mux::PLUGIN_CONN]);
    tokio::spawn(ttrpc::serve(plugin, Arc::new(Echo)));

    // A 5000-byte answer comes back in frames of at most 4096 bytes (what a Go
    // peer's 4 KiB bufio.Reader can take), as Response{status: {}, payload}.
    let big = vec![7u8; 5000];
    let message = request_message(1, &request("echo", "Echo", &big, None));
    peer.write_all(&mux_frame(1, &message)).await.unwrap();
    let (stream, kind, data, frames) = read_message(&mut peer, 1).await;
    assert_eq!((stream, kind), (1, 2));
    assert!(
        frames.iter().all(|&n| n <= mux::WRITE_CHUNK),
        "frames {frames:?}"
    );
    let mut expected = field(1, b"");
    expected.extend(field(2, &big));
    assert_eq!(data, expected);

    // Frames for a connection nobody opened are dropped, and nothing else happens.
    peer.write_all(&mux_frame(7, b"junk")).await.unwrap();

    let cases: [(u32, Vec<u8>, (u64, &str)); 4] = [
        (
            4,
            request("echo", "Echo", b"", None),
            (3, "StreamID must be odd for client initiated streams"),
        ),
        (
            1,
            request("echo", "Echo", b"", None),
            (3, "StreamID cannot be re-used and must increment"),
        ),
        (5, b"\xff\xff".to_vec(), (3, "")),
        (7, request("echo", "Nope", b"", None), (12, "method Nope")),
    ];
    for (stream, envelope, (code, text)) in cases {
        peer.write_all(&mux_frame(1, &request_message(stream, &envelope)))
            .await
            .unwrap();
        let (got_stream, kind, data, _) = read_message(&mut peer, 1).await;
        assert_eq!((got_stream, kind), (stream, 2));
        let (got_code, got_text) = status_of(&data);
        assert_eq!(got_code, code, "{got_text}");
        assert!(got_text.starts_with(text), "{got_text:?}");
    }

    // The request's timeout_nano bounds the call: DEADLINE_EXCEEDED.
    let envelope = request("echo", "Slow", b"", Some(100_000_000));
    peer.write_all(&mux_frame(1, &request_message(9, &envelope)))
        .await
        .unwrap();
    let (stream, _, data, _) = read_message(&mut peer, 1).await;
    assert_eq!((stream, status_of(&data).0), (9, 4));

    // An oversized message is discarded and answered RESOURCE_EXHAUSTED; the
    // connection goes on.
    let len = ttrpc::MAX_DATA + 1;
    let mut message = ttrpc_header(len, 11, 1, 0);
    message.extend(vec![0u8; len]);
    for chunk in message.chunks(1 << 20) {
        peer.write_all(&mux_frame(1, chunk)).await.unwrap();
    }
    let (stream, _, data, _) = read_message(&mut peer, 1).await;
    assert_eq!((stream, status_of(&data).0), (11, 8));
    let message = request_message(13, &request("echo", "Echo", b"hi", None));
    peer.write_all(&mux_frame(1, &message)).await.unwrap();
    let (stream, _, data, _) = read_message(&mut peer, 1).await;
    assert_eq!(stream, 13);
    assert!(data.ends_with(b"hi"));
}

#[tokio::test]
async fn a_frame_longer_than_upstreams_limit_closes_the_trunk() {
    let (ours, mut peer) = UnixStream::pair().unwrap();
    let (_mux, [plugin]) = Mux::new(ours, [mux::PLUGIN_CONN]);
    tokio::spawn(ttrpc::serve(plugin, Arc::new(Echo)));
    let mut header = 1u32.to_be_bytes().to_vec();
    header.extend((mux::MAX_PAYLOAD as u32 + 1).to_be_bytes());
    peer.write_all(&header).await.unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(PATIENCE, peer.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0, "closed without an answer");
}

#[tokio::test]
async fn calls_fail_at_once_when_the_connection_closes() {
    let (ours, peer) = UnixStream::pair().unwrap();
    let (_mux, [runtime]) = Mux::new(ours, [mux::RUNTIME_CONN]);
    let client = ttrpc::Client::new(runtime);
    let call = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let r: Result<flower_nri::api::Empty, Status> = client
            .call(
                "s",
                "m",
                &flower_nri::api::Empty {},
                Duration::from_secs(30),
            )
            .await;
        (r, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(peer);
    let (result, took) = call.await.unwrap();
    assert_eq!(result.unwrap_err().code, ttrpc::code::UNAVAILABLE);
    assert!(took < Duration::from_secs(5), "{took:?}");
}
