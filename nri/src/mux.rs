//! NRI's connection multiplexer: several byte streams over the one Unix socket
//! between a plugin and the runtime, as upstream `containerd/nri` `pkg/net/multiplex`
//! defines it.
//!
//! On the trunk every frame is an 8-byte header — big-endian `u32` connection id,
//! big-endian `u32` payload length — followed by the payload: a piece of that
//! connection's byte stream. Connection 0 is reserved; [`PLUGIN_CONN`] (1) carries
//! the ttrpc service the plugin serves, [`RUNTIME_CONN`] (2) the one the runtime
//! serves. Opening a connection is local (nothing is sent); frames for a connection
//! not opened here are dropped, as upstream does.
//!
//! Writing: one ttrpc message goes out as consecutive frames of at most
//! [`WRITE_CHUNK`] bytes, never interleaved with another message. Upstream's Go
//! reader hands each frame to a 4 KiB `bufio.Reader` and fails a read into a
//! smaller buffer, so 4 KiB frames are what any Go peer can always read.
//!
//! Reading: a frame longer than [`MAX_PAYLOAD`] (upstream's own write limit), or a
//! connection whose queue of [`QUEUE_LEN`] unread frames overflows, closes the trunk
//! and with it every connection — upstream's rule, which bounds what a peer can
//! make us hold.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The connection carrying the plugin's service (the runtime calls the plugin).
pub const PLUGIN_CONN: u32 = 1;
/// The connection carrying the runtime's service (the plugin calls the runtime).
pub const RUNTIME_CONN: u32 = 2;
/// Length of a frame header: connection id and payload length.
pub const HEADER_LEN: usize = 8;
/// The largest payload accepted in one frame: a ttrpc header plus ttrpc's largest
/// message, the chunk size upstream writes with.
pub const MAX_PAYLOAD: usize = crate::ttrpc::HEADER_LEN + crate::ttrpc::MAX_DATA;
/// The largest frame payload written (see the module documentation).
pub const WRITE_CHUNK: usize = 4096;
/// Frames queued for a connection before the trunk is closed (upstream's default).
pub const QUEUE_LEN: usize = 256;

/// The trunk; dropping it stops reading and closes every connection's reader.
pub struct Mux {
    reader: JoinHandle<()>,
}

impl Drop for Mux {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// One multiplexed connection: its incoming pieces and a way to write to it.
pub struct Conn {
    pub reader: ConnReader,
    pub writer: ConnWriter,
}

/// The incoming byte stream of one connection, as the frames it arrived in.
pub struct ConnReader {
    rx: mpsc::Receiver<Vec<u8>>,
}

impl ConnReader {
    /// The next piece of the stream; `None` once the trunk is closed.
    pub async fn recv(&mut self) -> Option<Vec<u8>> {
        self.rx.recv().await
    }
}

/// Writes to one connection; clones share the trunk.
#[derive(Clone)]
pub struct ConnWriter {
    id: u32,
    trunk: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
}

impl ConnWriter {
    /// Sends `message` as consecutive frames of at most [`WRITE_CHUNK`] bytes,
    /// with no other connection's frames in between.
    pub async fn send(&self, message: &[u8]) -> std::io::Result<()> {
        let mut out =
            Vec::with_capacity(message.len() + HEADER_LEN * message.len().div_ceil(WRITE_CHUNK));
        for chunk in message.chunks(WRITE_CHUNK) {
            out.extend_from_slice(&frame_header(self.id, chunk.len()));
            out.extend_from_slice(chunk);
        }
        let mut trunk = self.trunk.lock().await;
        trunk.write_all(&out).await
    }
}

/// The header of a frame carrying `len` bytes for connection `id`.
pub fn frame_header(id: u32, len: usize) -> [u8; HEADER_LEN] {
    let mut header = [0; HEADER_LEN];
    header[..4].copy_from_slice(&id.to_be_bytes());
    header[4..].copy_from_slice(&(len as u32).to_be_bytes());
    header
}

impl Mux {
    /// Multiplexes `trunk`, opening the connections `ids` before the first frame is
    /// read (so none of their frames can be dropped), in the order given.
    pub fn new<const N: usize>(trunk: UnixStream, ids: [u32; N]) -> (Mux, [Conn; N]) {
        let (read, write) = trunk.into_split();
        let trunk = Arc::new(tokio::sync::Mutex::new(write));
        let mut queues = HashMap::new();
        let conns = ids.map(|id| {
            assert_ne!(id, 0, "connection 0 is reserved");
            let (tx, rx) = mpsc::channel(QUEUE_LEN);
            queues.insert(id, tx);
            Conn {
                reader: ConnReader { rx },
                writer: ConnWriter {
                    id,
                    trunk: trunk.clone(),
                },
            }
        });
        let queues = Arc::new(Mutex::new(queues));
        let reader = tokio::spawn(read_trunk(read, queues, trunk));
        (Mux { reader }, conns)
    }
}

async fn read_trunk(
    mut read: tokio::net::unix::OwnedReadHalf,
    queues: Arc<Mutex<HashMap<u32, mpsc::Sender<Vec<u8>>>>>,
    trunk: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
) {
    let why = loop {
        let mut header = [0; HEADER_LEN];
        if let Err(e) = read.read_exact(&mut header).await {
            break format!("trunk closed ({e})");
        }
        let id = u32::from_be_bytes(header[..4].try_into().unwrap());
        let len = u32::from_be_bytes(header[4..].try_into().unwrap()) as usize;
        if len > MAX_PAYLOAD {
            break format!("frame of {len} bytes for connection {id} exceeds {MAX_PAYLOAD}");
        }
        let mut payload = vec![0; len];
        if let Err(e) = read.read_exact(&mut payload).await {
            break format!("trunk closed inside a frame ({e})");
        }
        let queue = queues.lock().unwrap().get(&id).cloned();
        let Some(queue) = queue else { continue };
        match queue.try_send(payload) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                break format!("connection {id} has {QUEUE_LEN} unread frames");
            }
            // That connection's reader is gone: drop its frames, as for an unknown id.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    };
    tracing::debug!("NRI multiplexer stops: {why}");
    queues.lock().unwrap().clear();
    let _ = trunk.lock().await.shutdown().await;
}
