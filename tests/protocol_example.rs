//! The worked example of docs/PROTOCOL.md §14 is true: its call bytes, sent to a real
//! switchboard, get exactly its reply bytes and one descriptor.

mod common;

use common::*;

/// The bytes of the `text` block after the first line starting with `heading`.
fn hex_block(doc: &str, heading: &str) -> Vec<u8> {
    let after = doc
        .lines()
        .skip_while(|l| !l.starts_with(heading))
        .skip_while(|l| *l != "```text")
        .skip(1)
        .take_while(|l| *l != "```");
    let mut bytes = Vec::new();
    for line in after {
        // "0000  0a 48 ...   .H..": the offset, then 16 bytes of hex, then the text.
        let hex = line.get(6..53).unwrap_or(&line[6..]);
        for pair in hex.split_whitespace() {
            bytes.push(u8::from_str_radix(pair, 16).expect("hex byte"));
        }
    }
    assert!(!bytes.is_empty(), "no bytes after {heading:?}");
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worked_example_is_what_a_switchboard_sends() {
    let doc = include_str!("../docs/PROTOCOL.md");
    let call = hex_block(doc, "**Call datagram**");
    let reply = hex_block(doc, "**Reply datagram**");
    assert_eq!((call.len(), reply.len()), (74, 34));

    let daemon = Daemon::start();
    let sb = daemon.connect().await;
    let mut server = sb
        .server_start(&labels(&[("app", "web"), ("pod", "web-1")]))
        .await
        .unwrap();
    let serve = tokio::spawn(async move { server.accept().await.map(|c| c.labels) });

    let channel = raw_connect(&daemon.path).await;
    send_raw(&channel, &call, &[]).await;
    let datagram = tokio::time::timeout(PATIENCE, channel.recv())
        .await
        .expect("a reply in time")
        .unwrap()
        .expect("a reply");
    assert_eq!(datagram.bytes[..], reply[..], "the reply bytes");
    assert_eq!(datagram.fds.len(), 1, "one descriptor");
    let server_saw = serve.await.unwrap().unwrap();
    assert_eq!(server_saw, labels(&[("app", "web"), ("pod", "web-1")]));
}
