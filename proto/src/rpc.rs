//! Calls and replies over a [`Channel`] (DESIGN §5).
//!
//! A [`Peer`] owns one channel and one reader task. The reader routes replies to the
//! calls waiting for them (so callers may pipeline and replies may come in any order)
//! and hands incoming calls to a [`Service`], each in its own task, at most
//! [`Limits::calls_in_flight`] at once: past that the reader stops reading and the
//! kernel's socket buffer pushes back on the sender. A call holds its place until its
//! reply is sent, so the replies (and descriptors) waiting to go out are bounded by
//! the same number; a peer that lets them wait longer than [`Limits::send_timeout`]
//! (it stopped reading) is cut off.
//!
//! A reply that cannot be sent (it is too large, or the kernel refuses its
//! descriptors, e.g. `ETOOMANYREFS`) is replaced by an error reply without
//! descriptors; if even that fails the channel is closed. A caller never waits for
//! a reply that was silently dropped.
//!
//! Framing violations (undecodable frame, oversize datagram, too many descriptors,
//! truncated control data) close the channel: there is no call id to answer. Errors
//! inside a well-formed call (bad message, descriptor mismatch, unknown method) get an
//! error reply and the channel keeps working.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use prost::Message;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::fds::{FdFields, Fds};
use crate::frame::Kind;
use crate::transport::{Channel, MAX_DATAGRAM, RecvError};
use crate::{Call, Code, Frame, Reply, Status};

/// Incoming calls served concurrently on one channel, by default.
pub const MAX_CALLS_IN_FLIGHT: usize = 64;
/// How long a reply may wait for the peer to make room, by default.
pub const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What one channel may cost the side that serves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Incoming calls served at once; also bounds the replies waiting to be sent.
    pub calls_in_flight: usize,
    /// How long a send may wait while the peer's queue is full before the channel
    /// is closed (the peer stopped reading). `None`: forever.
    pub send_timeout: Option<std::time::Duration>,
}

/// Counts descriptors waiting in unsent frames against whatever the serving side
/// charges its peers with (the switchboard: the connecting uid's quota). Charged only
/// while a frame with descriptors waits for a peer whose queue is full, so the usual
/// path costs nothing.
pub trait Charge: Send + Sync + 'static {
    /// Takes `n` units; `false` (nothing taken) when that would exceed the limit.
    fn take(&self, n: usize) -> bool;
    /// Returns `n` units taken before.
    fn give(&self, n: usize);
}

struct Held<'a>(&'a dyn Charge, usize);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.give(self.1);
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            calls_in_flight: MAX_CALLS_IN_FLIGHT,
            send_timeout: Some(SEND_TIMEOUT),
        }
    }
}
/// How long a dropped peer waits for its calls in flight to reply before closing.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// One RPC method; implemented by generated zero-sized types such as
/// `switchboard::rpc::ClientConnect`.
pub trait Method {
    /// `/package.Service/Method`.
    const PATH: &'static str;
    /// Whether the reply is a stream (`more = true` until the last).
    const STREAMING: bool;
    type Request: Message + Default + FdFields + Send + 'static;
    type Response: Message + Default + FdFields + Send + 'static;
}

/// A received call, before its message is decoded.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub message: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Request {
    /// Decodes the message as `M`'s request and claims its descriptors.
    pub fn decode<M: Method>(self) -> Result<(M::Request, Fds), Status> {
        let message = M::Request::decode(&self.message[..])
            .map_err(|e| Status::invalid_argument(format!("Malformed {} request: {e}", M::PATH)))?;
        let fds = Fds::claim(&message, self.fds)?;
        Ok((message, fds))
    }
}

/// A successful reply: an encoded message and the descriptors its `Fd` fields name.
#[derive(Debug, Default)]
pub struct Response {
    message: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Response {
    pub fn new<T: Message>(message: &T, fds: Vec<OwnedFd>) -> Response {
        Response {
            message: message.encode_to_vec(),
            fds,
        }
    }
}

/// The answering side of a channel.
pub trait Service: Send + Sync + 'static {
    /// Serves one call. Streaming methods send their items through `stream` before
    /// returning the final (empty) response.
    fn call(
        self: Arc<Self>,
        request: Request,
        stream: StreamSink,
    ) -> BoxFuture<'static, Result<Response, Status>>;
}

/// Sends the intermediate replies (`more = true`) of a streaming call.
pub struct StreamSink {
    shared: Arc<Shared>,
    id: u64,
}

impl StreamSink {
    pub async fn send<T: Message>(&self, message: &T) -> Result<(), Status> {
        let reply = Reply {
            id: self.id,
            message: message.encode_to_vec(),
            code: 0,
            error: String::new(),
            more: true,
        };
        self.shared.send_reply(reply, Vec::new()).await
    }
}

type ReplyTx = mpsc::UnboundedSender<(Reply, Vec<OwnedFd>)>;

/// A channel's one-way states, `closed` and `draining`, with one waiter list for
/// both. Cheaper than `CancellationToken`s (no separately allocated tree nodes), and
/// the reader waits on one future for both: memory counts at 100 000 idle channels.
#[derive(Default)]
struct States {
    closed: AtomicBool,
    /// Stop reading, let calls in flight send their replies, then close.
    draining: AtomicBool,
    changed: Notify,
}

impl States {
    fn set(&self, flag: &AtomicBool) {
        if !flag.swap(true, Ordering::AcqRel) {
            self.changed.notify_waiters();
        }
    }

    fn close(&self) {
        self.set(&self.closed);
    }

    fn drain(&self) {
        self.set(&self.draining);
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    async fn wait_until(&self, done: impl Fn(&States) -> bool) {
        loop {
            // Created before the check, so a change in between still wakes it.
            let notified = self.changed.notified();
            if done(self) {
                return;
            }
            notified.await;
        }
    }

    async fn closed(&self) {
        self.wait_until(States::is_closed).await
    }

    async fn closed_or_draining(&self) {
        self.wait_until(|s| s.is_closed() || s.is_draining()).await
    }
}

type CloseHook = Box<dyn FnOnce() + Send>;

enum OnClose {
    Pending(Option<CloseHook>),
    Ran,
}

struct Shared {
    channel: Channel,
    pending: Mutex<HashMap<u64, ReplyTx>>,
    next_id: AtomicU64,
    states: States,
    /// Incoming calls in flight (permits are returned by [`CallSlot`]).
    calls: Semaphore,
    limits: Limits,
    charge: Option<Arc<dyn Charge>>,
    /// Calls in flight shared with other channels (the switchboard: per uid).
    group_calls: Option<Arc<Semaphore>>,
    on_close: Mutex<OnClose>,
}

impl Shared {
    async fn send_frame(&self, frame: &Frame, fds: &[OwnedFd]) -> Result<(), Status> {
        let bytes = frame.encode_to_vec();
        if bytes.len() > MAX_DATAGRAM {
            return Err(Status::resource_exhausted(format!(
                "Message of {} bytes exceeds the {MAX_DATAGRAM}-byte datagram limit",
                bytes.len()
            )));
        }
        let borrowed: Vec<_> = fds.iter().map(|fd| fd.as_fd()).collect();
        let sent = match self.channel.try_send(&bytes, &borrowed) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // The peer is not keeping up: what waits here is charged.
                let _held = match (&self.charge, fds.len()) {
                    (Some(charge), n) if n > 0 => {
                        if !charge.take(n) {
                            return Err(Status::resource_exhausted(
                                "Too many descriptors are waiting for peers that do not read",
                            ));
                        }
                        Some(Held(&**charge, n))
                    }
                    _ => None,
                };
                tokio::select! {
                    r = self.channel.send_after_full(&bytes, &borrowed, self.limits.send_timeout) => r,
                    () = self.states.closed() => return Err(closed_status()),
                }
            }
            done => done,
        };
        match sent {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                // Everything queued for this peer stays pinned while it does not read.
                tracing::warn!("closing channel: {e}");
                self.close();
                Err(Status::unavailable(format!("Peer cut off: {e}")))
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EPIPE | libc::ECONNRESET)) => {
                Err(closed_status())
            }
            Err(e) => Err(Status::resource_exhausted(format!("Cannot send: {e}"))),
        }
    }

    /// Sends a reply. A final reply that cannot be sent (too large for a datagram,
    /// or refused by the kernel, e.g. `ETOOMANYREFS` for its descriptors) is replaced
    /// by an error reply without descriptors, and if that fails too the channel is
    /// closed: the caller is never left waiting. For a stream item the error is
    /// returned so that the handler's own final reply reports it (a stream ends
    /// exactly once).
    async fn send_reply(&self, reply: Reply, fds: Vec<OwnedFd>) -> Result<(), Status> {
        let (id, more) = (reply.id, reply.more);
        let status = match self
            .send_frame(
                &Frame {
                    kind: Some(Kind::Reply(reply)),
                },
                &fds,
            )
            .await
        {
            Ok(()) => return Ok(()),
            // Gone or cut off (UNAVAILABLE): nobody to tell.
            Err(status) if more || self.states.is_closed() || status.code == Code::Unavailable => {
                return Err(status);
            }
            Err(status) => status,
        };
        drop(fds);
        tracing::warn!(id, "reply not sent, sending an error instead: {status}");
        let error = Reply {
            id,
            message: Vec::new(),
            code: status.code as i32,
            error: format!("Reply could not be sent: {status}"),
            more: false,
        };
        let frame = Frame {
            kind: Some(Kind::Reply(error)),
        };
        if let Err(again) = self.send_frame(&frame, &[]).await {
            if !self.states.is_closed() {
                tracing::warn!(id, "closing channel: error reply not sent either: {again}");
                self.close();
            }
            return Err(again);
        }
        Ok(())
    }

    fn close(&self) {
        self.states.close();
        self.channel.shutdown();
        // Waiting callers see their reply sender dropped: UNAVAILABLE.
        self.pending.lock().unwrap().clear();
    }
}

fn closed_status() -> Status {
    Status::unavailable("Peer closed the channel")
}

/// The calling side of a channel, and the owner of its reader task.
///
/// Clones share the channel. When the last clone is dropped the channel is shut down;
/// [`Peer::close`] does it at once.
#[derive(Clone)]
pub struct Peer {
    owner: Arc<Owner>,
}

struct Owner {
    shared: Arc<Shared>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        // Graceful: a server that takes a connection and drops its registration at once
        // must still get its OK reply out.
        self.shared.states.drain();
    }
}

impl Peer {
    /// Starts the reader task. `service` answers incoming calls (none: `UNIMPLEMENTED`).
    /// Cancelling `parent` closes the channel too.
    pub fn spawn(
        channel: Channel,
        service: Option<Arc<dyn Service>>,
        parent: &CancellationToken,
    ) -> Peer {
        Peer::spawn_with(channel, service, parent, Limits::default(), None)
    }

    /// [`Peer::spawn`] with explicit limits.
    pub fn spawn_with(
        channel: Channel,
        service: Option<Arc<dyn Service>>,
        parent: &CancellationToken,
        limits: Limits,
        charge: Option<Arc<dyn Charge>>,
    ) -> Peer {
        let shared = start_reader(channel, service, parent, limits, charge, None);
        Peer {
            owner: Arc::new(Owner { shared }),
        }
    }

    /// Serves `service` on `channel` with no calling side and no owner: the channel
    /// lives until the other end closes it or `parent` is cancelled.
    pub fn serve(
        channel: Channel,
        service: Arc<dyn Service>,
        parent: &CancellationToken,
        limits: Limits,
        charge: Option<Arc<dyn Charge>>,
        group_calls: Option<Arc<Semaphore>>,
    ) {
        start_reader(channel, Some(service), parent, limits, charge, group_calls);
    }

    /// Answers the first call on `channel` with `status` and closes it; closes it
    /// after `patience` if no call comes. For a peer that may not be served (it is
    /// over a limit): it learns why instead of waiting. `hold` is dropped when done.
    pub fn refuse(
        channel: Channel,
        status: Status,
        patience: std::time::Duration,
        hold: impl Send + 'static,
    ) {
        tokio::spawn(async move {
            let first = tokio::time::timeout(patience, channel.recv()).await;
            if let Ok(Ok(Some(datagram))) = first
                && let Ok(Frame {
                    kind: Some(Kind::Call(call)),
                }) = Frame::decode(&datagram.bytes[..])
            {
                let reply = Frame {
                    kind: Some(Kind::Reply(Reply {
                        id: call.id,
                        message: Vec::new(),
                        code: status.code as i32,
                        error: status.message,
                        more: false,
                    })),
                };
                let _ =
                    tokio::time::timeout(patience, channel.send(&reply.encode_to_vec(), &[])).await;
            }
            channel.shutdown();
            drop(hold);
        });
    }

    /// Closes the channel now: the peer sees end of stream, waiting calls fail.
    pub fn close(&self) {
        self.owner.shared.close();
    }

    /// Resolves once the channel is closed, by either side.
    pub async fn closed(&self) {
        self.owner.shared.states.closed().await
    }

    pub fn is_closed(&self) -> bool {
        self.owner.shared.states.is_closed()
    }

    /// Runs `hook` once the channel is closed and its reader has stopped (at once if
    /// that already happened). One hook per peer; a later one replaces an earlier.
    /// Cheaper than a task waiting on [`Peer::closed`], for one per registration.
    pub fn on_close(&self, hook: impl FnOnce() + Send + 'static) {
        let mut on_close = self.owner.shared.on_close.lock().unwrap();
        match &mut *on_close {
            OnClose::Pending(slot) => *slot = Some(Box::new(hook)),
            OnClose::Ran => {
                drop(on_close);
                hook();
            }
        }
    }

    /// A unary call.
    pub async fn call<M: Method>(
        &self,
        request: &M::Request,
        fds: Vec<OwnedFd>,
    ) -> Result<(M::Response, Fds), Status> {
        let mut replies = self.start::<M>(request, fds).await?;
        replies.next().await.unwrap_or_else(|| Err(closed_status()))
    }

    /// A streaming call: the replies arrive through the returned stream.
    pub async fn call_streaming<M: Method>(
        &self,
        request: &M::Request,
    ) -> Result<Replies<M>, Status> {
        self.start::<M>(request, Vec::new()).await
    }

    async fn start<M: Method>(
        &self,
        request: &M::Request,
        fds: Vec<OwnedFd>,
    ) -> Result<Replies<M>, Status> {
        let shared = &self.owner.shared;
        if shared.states.is_closed() {
            return Err(closed_status());
        }
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        shared.pending.lock().unwrap().insert(id, tx);
        let replies = Replies {
            shared: shared.clone(),
            id,
            rx,
            done: false,
            _method: std::marker::PhantomData,
        };
        let call = Call {
            id,
            method: M::PATH.to_owned(),
            message: request.encode_to_vec(),
        };
        // On failure `replies` is dropped, which forgets the pending id.
        shared
            .send_frame(
                &Frame {
                    kind: Some(Kind::Call(call)),
                },
                &fds,
            )
            .await?;
        Ok(replies)
    }
}

/// Replies to one call. Dropping it abandons the call: a late reply is discarded
/// (and its descriptors closed) by the reader.
pub struct Replies<M: Method> {
    shared: Arc<Shared>,
    id: u64,
    rx: mpsc::UnboundedReceiver<(Reply, Vec<OwnedFd>)>,
    done: bool,
    _method: std::marker::PhantomData<fn() -> M>,
}

impl<M: Method> Replies<M> {
    /// The next reply; `None` after the last one of a stream.
    pub async fn next(&mut self) -> Option<Result<(M::Response, Fds), Status>> {
        if self.done {
            return None;
        }
        let Some((reply, fds)) = self.rx.recv().await else {
            self.done = true;
            return Some(Err(closed_status()));
        };
        if !reply.more || !M::STREAMING {
            self.done = true;
        }
        if reply.code != 0 {
            self.done = true;
            return Some(Err(Status::new(Code::from_i32(reply.code), reply.error)));
        }
        if M::STREAMING && !reply.more {
            // The final reply of a stream only says "done".
            return None;
        }
        // A reply that does not decode, or whose descriptors do not match, is the
        // answering side's fault: INTERNAL, not the caller's INVALID_ARGUMENT.
        let malformed = |e: &dyn std::fmt::Display| {
            Status::internal(format!("Malformed {} reply: {e}", M::PATH))
        };
        Some(
            M::Response::decode(&reply.message[..])
                .map_err(|e| malformed(&e))
                .and_then(|message| {
                    Fds::claim(&message, fds)
                        .map(|fds| (message, fds))
                        .map_err(|e| malformed(&e))
                }),
        )
    }
}

impl<M: Method> Drop for Replies<M> {
    fn drop(&mut self) {
        self.shared.pending.lock().unwrap().remove(&self.id);
    }
}

fn start_reader(
    channel: Channel,
    service: Option<Arc<dyn Service>>,
    parent: &CancellationToken,
    limits: Limits,
    charge: Option<Arc<dyn Charge>>,
    group_calls: Option<Arc<Semaphore>>,
) -> Arc<Shared> {
    let shared = Arc::new(Shared {
        channel,
        pending: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
        states: States::default(),
        calls: Semaphore::new(limits.calls_in_flight.max(1)),
        limits,
        charge,
        group_calls,
        on_close: Mutex::new(OnClose::Pending(None)),
    });
    tokio::spawn(read_loop(shared.clone(), service, parent.clone()));
    shared
}

/// An incoming call's place among the [`Limits::calls_in_flight`]; freed on drop.
struct CallSlot(Arc<Shared>);

impl Drop for CallSlot {
    fn drop(&mut self) {
        self.0.calls.add_permits(1);
    }
}

async fn read_loop(
    shared: Arc<Shared>,
    service: Option<Arc<dyn Service>>,
    parent: CancellationToken,
) {
    read_frames(&shared, service, &parent).await;
    if shared.states.is_draining() {
        let all = shared.limits.calls_in_flight.max(1) as u32;
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, shared.calls.acquire_many(all)).await;
    }
    shared.close();
    let hook = std::mem::replace(&mut *shared.on_close.lock().unwrap(), OnClose::Ran);
    if let OnClose::Pending(Some(hook)) = hook {
        hook();
    }
}

/// Reads until the channel closes, breaks the protocol, or is told to stop.
async fn read_frames(
    shared: &Arc<Shared>,
    service: Option<Arc<dyn Service>>,
    parent: &CancellationToken,
) {
    loop {
        let received = tokio::select! {
            r = shared.channel.recv() => r,
            () = shared.states.closed_or_draining() => break,
            () = parent.cancelled() => break,
        };
        let datagram = match received {
            Ok(Some(d)) => d,
            Ok(None) => break,
            // A peer that exits with unread data resets the socket: that is an
            // ordinary hang-up, not something an operator must look at.
            Err(RecvError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                tracing::debug!("closing channel: {e}");
                break;
            }
            Err(e) => {
                tracing::warn!("closing channel: {e}");
                break;
            }
        };
        let frame = match Frame::decode(&datagram.bytes[..]) {
            Ok(Frame { kind: Some(kind) }) => kind,
            Ok(Frame { kind: None }) => {
                tracing::warn!("closing channel: frame is neither call nor reply");
                break;
            }
            Err(e) => {
                tracing::warn!("closing channel: undecodable frame: {e}");
                break;
            }
        };
        match frame {
            Kind::Reply(reply) => {
                let mut pending = shared.pending.lock().unwrap();
                let tx = if reply.more {
                    pending.get(&reply.id).cloned()
                } else {
                    pending.remove(&reply.id)
                };
                drop(pending);
                match tx {
                    // A send error means the caller gave up; the descriptors close here.
                    Some(tx) => drop(tx.send((reply, datagram.fds))),
                    None => tracing::debug!(id = reply.id, "reply to no outstanding call, dropped"),
                }
            }
            Kind::Call(call) => {
                tokio::select! {
                    p = shared.calls.acquire() => p.expect("semaphore never closed").forget(),
                    () = shared.states.closed_or_draining() => break,
                    () = parent.cancelled() => break,
                };
                // And a place among the group's, if the channel is in one.
                let group = match &shared.group_calls {
                    None => None,
                    Some(group) => tokio::select! {
                        p = group.clone().acquire_owned() => Some(p.expect("semaphore never closed")),
                        () = shared.states.closed_or_draining() => break,
                        () = parent.cancelled() => break,
                    },
                };
                let slot = CallSlot(shared.clone());
                let shared = shared.clone();
                let service = service.clone();
                tokio::spawn(async move {
                    let id = call.id;
                    let request = Request {
                        method: call.method,
                        message: call.message,
                        fds: datagram.fds,
                    };
                    let result = match service {
                        Some(service) => {
                            let sink = StreamSink {
                                shared: shared.clone(),
                                id,
                            };
                            tokio::select! {
                                r = service.call(request, sink) => r,
                                // The caller is gone: abandon the work, close its descriptors.
                                () = shared.states.closed() => return,
                            }
                        }
                        None => Err(Status::unimplemented(format!(
                            "Method {} is not served on this channel",
                            request.method
                        ))),
                    };
                    let (reply, fds) = match result {
                        Ok(r) => (
                            Reply {
                                id,
                                message: r.message,
                                code: 0,
                                error: String::new(),
                                more: false,
                            },
                            r.fds,
                        ),
                        Err(s) => (
                            Reply {
                                id,
                                message: Vec::new(),
                                code: s.code as i32,
                                error: s.message,
                                more: false,
                            },
                            Vec::new(),
                        ),
                    };
                    // Failures are logged and handled (error reply or closed channel)
                    // inside.
                    let _ = shared.send_reply(reply, fds).await;
                    drop(slot);
                    drop(group);
                });
            }
        }
    }
}
