//! containerd's ttrpc on one multiplexed connection: the framing, a unary server and
//! a unary client (upstream `containerd/ttrpc`, `PROTOCOL.md`, `channel.go`,
//! `server.go`). NRI uses unary calls only.
//!
//! A message is a 10-byte header — big-endian `u32` data length, big-endian `u32`
//! stream id, `u8` type (1 request, 2 response, 3 data), `u8` flags — and the data.
//! A request's data is a `ttrpc.Request{service, method, payload, timeout_nano,
//! metadata}`, a response's a `ttrpc.Response{status, payload}` on the same stream
//! id. Clients use odd stream ids, increasing. Data longer than [`MAX_DATA`] is
//! discarded and answered `RESOURCE_EXHAUSTED`, as upstream does.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use prost::Message as _;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

use crate::mux::{Conn, ConnReader, ConnWriter};
use crate::wire;

pub const HEADER_LEN: usize = 10;
/// The largest message data (4 MiB).
pub const MAX_DATA: usize = 4 << 20;
pub const TYPE_REQUEST: u8 = 1;
pub const TYPE_RESPONSE: u8 = 2;
pub const TYPE_DATA: u8 = 3;
/// Calls a server runs at once on one connection; more are answered
/// `RESOURCE_EXHAUSTED`.
pub const MAX_IN_FLIGHT: usize = 64;

/// gRPC status codes used here.
pub mod code {
    pub const OK: i32 = 0;
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const DEADLINE_EXCEEDED: i32 = 4;
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    pub const UNIMPLEMENTED: i32 = 12;
    pub const INTERNAL: i32 = 13;
    pub const UNAVAILABLE: i32 = 14;
}

/// A call's failure: a gRPC status code and message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (status {code})")]
pub struct Status {
    pub code: i32,
    pub message: String,
}

impl Status {
    pub fn new(code: i32, message: impl Into<String>) -> Status {
        Status {
            code,
            message: message.into(),
        }
    }
}

/// One message as framed on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub stream_id: u32,
    pub kind: u8,
    pub flags: u8,
    pub data: Vec<u8>,
}

impl Message {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.data.len());
        out.extend_from_slice(&(self.data.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.stream_id.to_be_bytes());
        out.push(self.kind);
        out.push(self.flags);
        out.extend_from_slice(&self.data);
        out
    }
}

/// What the reader yields: a message, or the header of one too long to keep.
enum Received {
    Message(Message),
    Oversized { stream_id: u32, length: usize },
}

/// Reassembles messages from a connection's pieces.
struct Reader {
    conn: ConnReader,
    buf: Vec<u8>,
}

impl Reader {
    /// The next message; `None` when the connection is closed (a partial message
    /// at that point is dropped).
    async fn next(&mut self) -> Option<Received> {
        self.fill(HEADER_LEN).await?;
        let length = u32::from_be_bytes(self.buf[..4].try_into().unwrap()) as usize;
        let stream_id = u32::from_be_bytes(self.buf[4..8].try_into().unwrap());
        let (kind, flags) = (self.buf[8], self.buf[9]);
        self.buf.drain(..HEADER_LEN);
        if length > MAX_DATA {
            let mut left = length;
            loop {
                let take = left.min(self.buf.len());
                self.buf.drain(..take);
                left -= take;
                if left == 0 {
                    return Some(Received::Oversized { stream_id, length });
                }
                self.buf = self.conn.recv().await?;
            }
        }
        self.fill(length).await?;
        let data = self.buf.drain(..length).collect();
        Some(Received::Message(Message {
            stream_id,
            kind,
            flags,
            data,
        }))
    }

    async fn fill(&mut self, len: usize) -> Option<()> {
        while self.buf.len() < len {
            let piece = self.conn.recv().await?;
            self.buf.extend_from_slice(&piece);
        }
        Some(())
    }
}

/// What a server dispatches calls to: `service` and `method` as the client named
/// them, the request's protobuf bytes in, the response's out.
pub trait Service: Send + Sync + 'static {
    fn call(
        &self,
        service: &str,
        method: &str,
        payload: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>, Status>>;
}

/// Serves unary calls on `conn` until it closes. Each call runs in its own task,
/// bounded by the request's `timeout_nano` when it has one.
pub async fn serve(conn: Conn, service: Arc<dyn Service>) {
    let Conn { reader, writer } = conn;
    let mut reader = Reader {
        conn: reader,
        buf: Vec::new(),
    };
    let mut calls = JoinSet::new();
    let mut last_stream_id = 0;
    loop {
        let received = tokio::select! {
            received = reader.next() => received,
            Some(_) = calls.join_next() => continue,
        };
        let (stream_id, answer) = match received {
            None => break,
            Some(Received::Oversized { stream_id, length }) => (
                stream_id,
                Status::new(
                    code::RESOURCE_EXHAUSTED,
                    format!("message length {length} exceed maximum message size of {MAX_DATA}"),
                ),
            ),
            Some(Received::Message(message)) => {
                let id = message.stream_id;
                if id % 2 != 1 {
                    let e = "StreamID must be odd for client initiated streams";
                    (id, Status::new(code::INVALID_ARGUMENT, e))
                } else if message.kind == TYPE_DATA {
                    (
                        id,
                        Status::new(code::INVALID_ARGUMENT, "StreamID is no longer active"),
                    )
                } else if message.kind != TYPE_REQUEST {
                    continue; // ignored for future compatibility, as upstream does
                } else if id <= last_stream_id {
                    let e = "StreamID cannot be re-used and must increment";
                    (id, Status::new(code::INVALID_ARGUMENT, e))
                } else {
                    last_stream_id = id;
                    match wire::ttrpc::Request::decode(message.data.as_slice()) {
                        Err(e) => (
                            id,
                            Status::new(
                                code::INVALID_ARGUMENT,
                                format!("unmarshal request error: {e}"),
                            ),
                        ),
                        Ok(_) if message.flags != 0 => (
                            id,
                            Status::new(code::UNIMPLEMENTED, "streaming calls are not supported"),
                        ),
                        Ok(_) if calls.len() >= MAX_IN_FLIGHT => (
                            id,
                            Status::new(code::RESOURCE_EXHAUSTED, "too many calls in flight"),
                        ),
                        Ok(request) => {
                            let call =
                                service.call(&request.service, &request.method, request.payload);
                            let writer = writer.clone();
                            calls.spawn(async move {
                                let result = match u64::try_from(request.timeout_nano) {
                                    Ok(nanos) if nanos > 0 => {
                                        tokio::time::timeout(Duration::from_nanos(nanos), call)
                                            .await
                                            .unwrap_or_else(|_| {
                                                Err(Status::new(
                                                    code::DEADLINE_EXCEEDED,
                                                    "deadline exceeded",
                                                ))
                                            })
                                    }
                                    _ => call.await,
                                };
                                let _ = respond(&writer, id, result).await;
                            });
                            continue;
                        }
                    }
                }
            }
        };
        if respond(&writer, stream_id, Err(answer)).await.is_err() {
            break;
        }
    }
}

async fn respond(
    writer: &ConnWriter,
    stream_id: u32,
    result: Result<Vec<u8>, Status>,
) -> std::io::Result<()> {
    let (status, payload) = match result {
        Ok(payload) => (wire::google::rpc::Status::default(), payload),
        Err(s) => (
            wire::google::rpc::Status {
                code: s.code,
                message: s.message,
                details: vec![],
            },
            Vec::new(),
        ),
    };
    let response = wire::ttrpc::Response {
        status: Some(status),
        payload,
    };
    let message = Message {
        stream_id,
        kind: TYPE_RESPONSE,
        flags: 0,
        data: response.encode_to_vec(),
    };
    writer.send(&message.encode()).await
}

type Pending = Arc<Mutex<Option<HashMap<u32, oneshot::Sender<Result<Vec<u8>, Status>>>>>>;

/// Makes unary calls on one connection; responses are matched by stream id.
pub struct Client {
    writer: ConnWriter,
    next_stream_id: AtomicU32,
    pending: Pending,
    reader: JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Client {
    pub fn new(conn: Conn) -> Client {
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let reader = tokio::spawn(read_responses(
            Reader {
                conn: conn.reader,
                buf: Vec::new(),
            },
            pending.clone(),
        ));
        Client {
            writer: conn.writer,
            next_stream_id: AtomicU32::new(1),
            pending,
            reader,
        }
    }

    /// Calls `service`/`method` with `request`; the peer is told the `timeout`, and
    /// the call fails `DEADLINE_EXCEEDED` when no answer comes within it.
    pub async fn call<Req: prost::Message, Resp: prost::Message + Default>(
        &self,
        service: &str,
        method: &str,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, Status> {
        let closed = || Status::new(code::UNAVAILABLE, "ttrpc: closed");
        let stream_id = self.next_stream_id.fetch_add(2, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        match self.pending.lock().unwrap().as_mut() {
            Some(pending) => pending.insert(stream_id, tx),
            None => return Err(closed()),
        };
        let envelope = wire::ttrpc::Request {
            service: service.to_owned(),
            method: method.to_owned(),
            payload: request.encode_to_vec(),
            timeout_nano: i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX),
            metadata: vec![],
        };
        let message = Message {
            stream_id,
            kind: TYPE_REQUEST,
            flags: 0,
            data: envelope.encode_to_vec(),
        };
        let answer = async {
            self.writer
                .send(&message.encode())
                .await
                .map_err(|_| closed())?;
            rx.await.map_err(|_| closed())?
        };
        let result = tokio::time::timeout(timeout, answer).await;
        if let Some(pending) = self.pending.lock().unwrap().as_mut() {
            pending.remove(&stream_id);
        }
        let payload = result.map_err(|_| {
            Status::new(
                code::DEADLINE_EXCEEDED,
                format!("{service}/{method}: no answer within {timeout:?}"),
            )
        })??;
        Resp::decode(payload.as_slice()).map_err(|e| {
            Status::new(
                code::INTERNAL,
                format!("{service}/{method}: bad response: {e}"),
            )
        })
    }
}

async fn read_responses(mut reader: Reader, pending: Pending) {
    while let Some(received) = reader.next().await {
        let Received::Message(message) = received else {
            continue; // an oversized response: its call times out
        };
        if message.kind != TYPE_RESPONSE {
            continue;
        }
        let result = match wire::ttrpc::Response::decode(message.data.as_slice()) {
            Err(e) => Err(Status::new(
                code::INTERNAL,
                format!("bad ttrpc response: {e}"),
            )),
            Ok(response) => match response.status {
                Some(s) if s.code != code::OK => Err(Status::new(s.code, s.message)),
                _ => Ok(response.payload),
            },
        };
        let waiter = pending
            .lock()
            .unwrap()
            .as_mut()
            .and_then(|p| p.remove(&message.stream_id));
        if let Some(waiter) = waiter {
            let _ = waiter.send(result);
        }
    }
    // Closed: every waiting call fails at once, and later calls too.
    pending.lock().unwrap().take();
}
