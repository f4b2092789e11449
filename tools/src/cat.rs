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
    /// With `listen`: stay registered and serve one connection after another (with
    /// `exec`, concurrently), until interrupted.
    pub keep: bool,
    /// Do not print the connection labels.
    pub quiet: bool,
    /// Run this command (program and arguments) per connection with the socket as
    /// its stdin and stdout, instead of relaying stdin and stdout.
    pub exec: Option<Vec<String>>,
    /// `-w`: the bound on every wait, including (with `listen`, without `keep`) the
    /// wait for a client. Without it, waits for the switchboard are bounded by
    /// [`DEFAULT_WAIT`] and a server waits for its client as long as it takes.
    pub wait: Option<Duration>,
    /// Told the registered labels once the server is registered.
    pub ready: Option<ReadyFd>,
}

/// Connects to the target matching `labels` (or, with `listen`, registers under them
/// and takes one connection), prints the connection labels on stderr as JSON and
/// copies stdin to the connection and the connection to stdout, half-closing each
/// direction at end of file.
pub async fn cat(path: &Path, labels: &Labels, mut options: CatOptions) -> Result<()> {
    let patience = options.wait.unwrap_or(DEFAULT_WAIT);
    if !options.listen {
        let connection = bounded(patience, "connecting through the switchboard", async {
            let handle = Switchboard::connect_as(path, &[Right::ClientConnect], labels).await?;
            Ok(handle.client_connect(&Labels::new()).await?)
        })
        .await?;
        return serve(connection, &options).await;
    }
    let mut server = bounded(patience, "registering with the switchboard", async {
        let handle = Switchboard::connect_as(path, &[Right::ServerStart], labels).await?;
        Ok(handle.server_start(&Labels::new()).await?)
    })
    .await?;
    tracing::debug!(?labels, "registered as a server");
    let mut ready = options.ready.take();
    ready::notify(&mut ready, &serde_json::to_string(labels)?);
    let options = std::sync::Arc::new(options);
    loop {
        let accept = async {
            server
                .accept()
                .await
                .context("the switchboard closed the registration")
        };
        let connection = match options.wait {
            Some(limit) if !options.keep => bounded(limit, "waiting for a client", accept).await?,
            _ => accept.await?,
        };
        if !options.keep {
            // One-shot: unregister before serving the connection.
            drop(server);
            return serve(connection, &options).await;
        }
        if options.exec.is_some() {
            let options = options.clone();
            tokio::spawn(async move {
                if let Err(e) = serve(connection, &options).await {
                    tracing::warn!("{e:#}");
                }
            });
        } else if let Err(e) = serve(connection, &options).await {
            tracing::warn!("{e:#}");
        }
    }
}

/// Prints the connection labels (unless quiet), then relays or runs the command.
async fn serve(connection: Connection, options: &CatOptions) -> Result<()> {
    let Connection { socket, labels } = connection;
    tracing::debug!(connection_labels = ?labels, "connected");
    if !options.quiet {
        eprintln!("{}", serde_json::to_string(&labels)?);
    }
    match &options.exec {
        Some(argv) => exec(socket, &labels, argv).await,
        None => relay(socket).await,
    }
}

/// Runs `argv` with the socket as stdin and stdout, the connection labels in
/// `FLOWER_LABELS` (JSON) and each label whose key is a valid name in
/// `FLOWER_LABEL_<key>`; fails unless it exits 0.
async fn exec(socket: OwnedFd, labels: &Labels, argv: &[String]) -> Result<()> {
    let (program, args) = argv.split_first().context("--exec needs a command")?;
    let mut command = std::process::Command::new(program);
    command
        .args(args)
        .stdin(socket.try_clone()?)
        .stdout(socket)
        .env("FLOWER_LABELS", serde_json::to_string(labels)?);
    for (key, value) in labels {
        if key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            command.env(format!("FLOWER_LABEL_{key}"), value);
        }
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot run {program}"))?;
    // The command holds the socket now; ours is closed when `command` goes.
    drop(command);
    let status = tokio::task::spawn_blocking(move || child.wait()).await??;
    tracing::debug!(%status, "{program} finished");
    anyhow::ensure!(status.success(), "{program} {status}");
    Ok(())
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
