//! A tiny HTTP server that never binds a port: it registers with the switchboard by
//! labels and answers every request with the labels of the connection it came on.
//!
//! ```sh
//! cargo run --example hello_web -- [PATH] app=web net=local
//! ```
//!
//! Used by `examples/demo.sh`, the whole-node walkthrough.

use flower_proto::Labels;
use flower_proto::client::Switchboard;
use flower_proto::switchboard::Right;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Request heads larger than this are refused.
const MAX_HEAD: usize = 16 * 1024;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `[PATH] LABELS...`, as every `flower` command takes them.
    let (path, labels) = flower_tools::args::path_and_labels(&args)?;
    // Only the right to register, only under these labels: all a web server needs.
    let handle = Switchboard::connect_as(&path, &[Right::ServerStart], &labels).await?;
    let mut server = handle.server_start(&Labels::new()).await?;
    eprintln!(
        "hello_web: registered as {}",
        serde_json::to_string(&labels)?
    );
    while let Some(connection) = server.accept().await {
        tokio::spawn(async move {
            if let Err(e) = answer(connection).await {
                eprintln!("hello_web: {e}");
            }
        });
    }
    Ok(())
}

async fn answer(connection: flower_proto::client::Connection) -> anyhow::Result<()> {
    let std_stream = std::os::unix::net::UnixStream::from(connection.socket);
    std_stream.set_nonblocking(true)?;
    let mut stream = tokio::net::UnixStream::from_std(std_stream)?;
    // Read the request head; the body (if any) is ignored.
    let mut head = Vec::new();
    let mut buf = [0; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() + n > MAX_HEAD {
            anyhow::bail!("incomplete or oversized request");
        }
        head.extend_from_slice(&buf[..n]);
    }
    let request_line = String::from_utf8_lossy(&head);
    let request_line = request_line.lines().next().unwrap_or_default();
    let body = format!(
        "Hello from a server that never called bind().\nrequest: {request_line}\nconnection labels: {}\n",
        serde_json::to_string_pretty(&connection.labels)?
    );
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}
