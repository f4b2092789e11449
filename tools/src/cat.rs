//! `flower cat`: the nc-like client and one-shot server.

use std::io::ErrorKind;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use flower_proto::Labels;
use flower_proto::client::{Connection, Switchboard};
use flower_proto::switchboard::Right;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::ready::{self, ReadyFd};
use crate::{DEFAULT_WAIT, bounded};

#[derive(Debug, Default)]
pub struct CatOptions {
    /// Register as a server and take one connection instead of connecting.
    pub listen: bool,
    /// `-w`: the bound on every wait, including (with `listen`) the wait for a client.
    /// Without it, waits for the switchboard are bounded by [`DEFAULT_WAIT`] and a
    /// server waits for its client as long as it takes.
    pub wait: Option<Duration>,
    /// Told the registered labels once the server is registered.
    pub ready: Option<ReadyFd>,
}

/// Connects to the target matching `labels` (or, with `listen`, registers under them
/// and takes one connection), prints the connection labels on stderr as JSON and
/// copies stdin to the connection and the connection to stdout, half-closing each
/// direction at end of file.
pub async fn cat(path: &Path, labels: &Labels, options: CatOptions) -> Result<()> {
    let CatOptions {
        listen,
        wait,
        mut ready,
    } = options;
    let patience = wait.unwrap_or(DEFAULT_WAIT);
    let connection = if listen {
        let mut server = bounded(patience, "registering with the switchboard", async {
            let handle = Switchboard::connect_as(path, &[Right::ServerStart], labels).await?;
            Ok(handle.server_start(&Labels::new()).await?)
        })
        .await?;
        tracing::debug!(?labels, "registered as a server");
        ready::notify(&mut ready, &serde_json::to_string(labels)?);
        let accept = async {
            server
                .accept()
                .await
                .context("the switchboard closed the registration")
        };
        let connection = match wait {
            Some(limit) => bounded(limit, "waiting for a client", accept).await?,
            None => accept.await?,
        };
        // One-shot: unregister before serving the connection.
        drop(server);
        connection
    } else {
        bounded(patience, "connecting through the switchboard", async {
            let handle = Switchboard::connect_as(path, &[Right::ClientConnect], labels).await?;
            Ok(handle.client_connect(&Labels::new()).await?)
        })
        .await?
    };
    let Connection { socket, labels } = connection;
    tracing::debug!(connection_labels = ?labels, "connected");
    eprintln!("{}", serde_json::to_string(&labels)?);
    relay(socket).await
}

/// How copying the connection to stdout ended.
enum Downstream {
    /// The connection reached end of file and everything was written.
    Done,
    /// Whoever read stdout went away (`| head`): nothing more to do.
    StdoutClosed,
}

/// Copies stdin → socket and socket → stdout until both directions reached end of
/// file, or stdout was closed.
async fn relay(socket: OwnedFd) -> Result<()> {
    let stream = std::os::unix::net::UnixStream::from(socket);
    stream.set_nonblocking(true)?;
    // Any SOCK_STREAM socket (socketpair or TCP) reads, writes and half-closes alike.
    let (mut from_peer, mut to_peer) = tokio::net::UnixStream::from_std(stream)?.into_split();
    let upstream = async {
        let mut stdin = tokio::io::stdin();
        let result = copy(
            &mut stdin,
            &mut to_peer,
            "reading stdin",
            "writing to the connection",
        )
        .await;
        let _ = to_peer.shutdown().await;
        match result {
            // The peer stopped reading: nothing more to send, not an error.
            Err(Failed::Write(e)) if is_gone(&e) => Ok(()),
            other => other.map_err(Failed::into_error),
        }
    };
    let downstream = async {
        let mut stdout = tokio::io::stdout();
        let copied = copy(
            &mut from_peer,
            &mut stdout,
            "reading from the connection",
            "writing to stdout",
        )
        .await;
        let result = match copied {
            Ok(()) => stdout
                .flush()
                .await
                .map_err(|e| Failed::Write(anyhow::Error::from(e).context("writing to stdout"))),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => Ok(Downstream::Done),
            Err(Failed::Write(e)) if is_gone(&e) => Ok(Downstream::StdoutClosed),
            Err(e) => Err(e.into_error()),
        }
    };
    tokio::pin!(upstream, downstream);
    tokio::select! {
        down = &mut downstream => match down? {
            Downstream::StdoutClosed => {
                tracing::debug!("stdout closed; ending");
                Ok(())
            }
            Downstream::Done => upstream.await,
        },
        up = &mut upstream => {
            up?;
            downstream.await.map(drop)
        }
    }
}

/// Which side of a copy failed; the error already says what was being done.
enum Failed {
    Read(anyhow::Error),
    Write(anyhow::Error),
}

impl Failed {
    fn into_error(self) -> anyhow::Error {
        match self {
            Failed::Read(e) | Failed::Write(e) => e,
        }
    }
}

/// A broken pipe or reset: the other side stopped reading.
fn is_gone(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|e| matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset))
}

/// Copies `from` to `to` until end of file; an error names the failing direction.
async fn copy(
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    reading: &'static str,
    writing: &'static str,
) -> Result<(), Failed> {
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(Failed::Read(anyhow::Error::from(e).context(reading))),
        };
        to.write_all(&buf[..n])
            .await
            .map_err(|e| Failed::Write(anyhow::Error::from(e).context(writing)))?;
    }
}
