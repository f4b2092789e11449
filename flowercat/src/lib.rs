//! `flower cat` and `flower ls`: the nc-like client and the directory listing.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::Path;

use anyhow::{Context, Result};
use flower_proto::Labels;
use flower_proto::client::{Connection, Switchboard};
use flower_proto::switchboard::Right;
use tokio::io::{AsyncWriteExt, copy};

/// Connects to the target matching `labels` (or, with `listen`, registers under them
/// and takes one connection), prints the connection labels on stderr as JSON and
/// copies stdin to the connection and the connection to stdout, half-closing each
/// direction at end of file.
pub async fn cat(path: &Path, labels: &Labels, listen: bool) -> Result<()> {
    let switchboard = Switchboard::connect(path).await?;
    let connection = if listen {
        let handle = switchboard
            .constrain(&[Right::ServerStart], labels, labels)
            .await?;
        let mut server = handle.server_start(&Labels::new()).await?;
        let connection = server
            .accept()
            .await
            .context("the switchboard closed the registration")?;
        // One-shot: unregister before serving the connection.
        drop(server);
        connection
    } else {
        let handle = switchboard
            .constrain(&[Right::ClientConnect], labels, labels)
            .await?;
        handle.client_connect(&Labels::new()).await?
    };
    drop(switchboard);
    let Connection { socket, labels } = connection;
    eprintln!("{}", serde_json::to_string(&labels)?);
    relay(socket).await
}

/// Copies stdin → socket and socket → stdout until both directions reached end of file.
async fn relay(socket: OwnedFd) -> Result<()> {
    let stream = std::os::unix::net::UnixStream::from(socket);
    stream.set_nonblocking(true)?;
    // Any SOCK_STREAM socket (socketpair or TCP) reads, writes and half-closes alike.
    let (mut from_peer, mut to_peer) = tokio::net::UnixStream::from_std(stream)?.into_split();
    let upstream = async {
        let mut stdin = tokio::io::stdin();
        let result = copy(&mut stdin, &mut to_peer).await;
        let _ = to_peer.shutdown().await;
        match result {
            // The peer stopped reading: nothing more to send, not an error.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            other => other.map(drop),
        }
    };
    let downstream = async {
        let mut stdout = tokio::io::stdout();
        copy(&mut from_peer, &mut stdout).await?;
        stdout.flush().await
    };
    let (up, down) = tokio::join!(upstream, downstream);
    down.context("reading from the connection")?;
    up.context("writing to the connection")?;
    Ok(())
}

/// Prints the label sets of the targets matching `labels`, one JSON object per line.
pub async fn ls(path: &Path, labels: &Labels, out: &mut impl Write) -> Result<()> {
    let switchboard = Switchboard::connect(path).await?;
    let handle = switchboard
        .constrain(&[Right::List], labels, labels)
        .await?;
    let mut targets = handle.list(&Labels::new()).await?;
    while let Some(target) = targets.next().await {
        writeln!(out, "{}", serde_json::to_string(&target?)?)?;
    }
    out.flush()?;
    Ok(())
}
