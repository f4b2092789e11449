//! Calls and replies over a [`Channel`] (docs/PROTOCOL.md §2, §4).
//!
//! A [`Peer`] owns one channel. Replies are routed to the calls waiting for them (so
//! callers may pipeline and replies may come in any order), by one of two readers:
//!
//! * a **reader task** ([`Peer::spawn`], [`Peer::serve`]), for channels that answer
//!   calls or must notice at once when the other side hangs up (the switchboard's
//!   registration channels). It hands incoming calls to a [`Service`], at most
//!   [`Limits::calls_in_flight`] at once: past that it stops reading and the kernel's
//!   socket buffer pushes back on the sender. A call whose service answers on its
//!   first poll is answered inline; only one that must wait gets a task of its own.
//! * the **callers themselves** ([`Peer::client`]), for a client's handle: a caller
//!   that has sent its call takes the channel's read lock and reads until its reply
//!   arrives, handing any other caller's reply on. A lone caller is woken by the
//!   reactor directly, with no second task and no cross-thread hand-off; a hang-up is
//!   noticed on the next call or [`Peer::is_closed`].
//!
//! A call holds its place until its reply is sent, so the replies (and descriptors)
//! waiting to go out are bounded by the same number; a peer that lets them wait
//! longer than [`Limits::send_timeout`] (it stopped reading) is cut off. A reply that
//! cannot be sent (it is too large, or the kernel refuses its descriptors, e.g.
//! `ETOOMANYREFS`) is replaced by an error reply without descriptors; if even that
//! fails the channel is closed. A caller never waits for a reply that was silently
//! dropped.
//!
//! Framing violations (undecodable frame, oversize datagram, too many descriptors,
//! truncated control data) close the channel: there is no call id to answer. Errors
//! inside a well-formed call (bad message, descriptor mismatch, unknown method) get an
//! error reply and the channel keeps working.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use prost::Message;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::fds::{FdFields, Fds, OutFds};
use crate::frame::{self, Kind};
use crate::hash::NumMap;
use crate::transport::{Channel, MAX_DATAGRAM, Received, RecvError};
use crate::{Code, Reply, Status};

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

/// What a typed method of a generated service trait returns: the reply message and
/// the descriptors its `Fd` fields name.
pub type Answer<T> = Result<(T, OutFds), Status>;

/// The answering side of a channel. Implemented by the generated `rpc::Serve<S>` of
/// each service, which decodes requests for a typed service trait.
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

/// The intermediate replies of a streaming method, typed by the generated trait.
pub struct Stream<T> {
    sink: StreamSink,
    _item: std::marker::PhantomData<fn(T)>,
}

impl<T: Message> Stream<T> {
    pub fn new(sink: StreamSink) -> Stream<T> {
        Stream {
            sink,
            _item: std::marker::PhantomData,
        }
    }

    /// Sends one item (`more = true`); waits while the channel is full.
    pub async fn send(&self, item: &T) -> Result<(), Status> {
        self.sink.send(item).await
    }
}

impl StreamSink {
    pub async fn send<T: Message>(&self, message: &T) -> Result<(), Status> {
        let reply = frame::reply(self.id, Ok(message.encode_to_vec()), true);
        self.shared.send_reply(reply, Vec::new()).await
    }
}

/// One reply and the descriptors that came with it.
type Delivery = (Reply, Vec<OwnedFd>);

/// Where the replies to one call wait for its caller: the first in place, further
/// ones (of a stream) in a queue. Cheaper than a channel per call — a unary call
/// allocates nothing but the slot — and filling it wakes the caller only when it is
/// waiting, so a caller that reads its own reply does not wake itself.
#[derive(Default)]
struct Slot(Mutex<SlotState>);

#[derive(Default)]
struct SlotState {
    first: Option<Delivery>,
    more: std::collections::VecDeque<Delivery>,
    /// No more replies will come (the last was delivered, or the channel closed).
    ended: bool,
    waker: Option<std::task::Waker>,
}

/// What a caller finds in its slot.
enum Found {
    Reply(Delivery),
    Ended,
    Empty,
}

impl Slot {
    fn put(&self, delivery: Delivery) {
        let mut state = self.0.lock().unwrap();
        if state.first.is_none() && state.more.is_empty() {
            state.first = Some(delivery);
        } else {
            state.more.push_back(delivery);
        }
        let waker = state.waker.take();
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn end(&self) {
        let mut state = self.0.lock().unwrap();
        state.ended = true;
        let waker = state.waker.take();
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn take(&self) -> Found {
        self.0.lock().unwrap().pop()
    }

    /// Waits for the next reply; `None` once none will come.
    async fn next(&self) -> Option<Delivery> {
        std::future::poll_fn(|cx| {
            // The waker is left under the same lock that found the slot empty, so a
            // reply put in meanwhile cannot be missed.
            let mut state = self.0.lock().unwrap();
            match state.pop() {
                Found::Reply(delivery) => std::task::Poll::Ready(Some(delivery)),
                Found::Ended => std::task::Poll::Ready(None),
                Found::Empty => {
                    match &mut state.waker {
                        Some(w) if w.will_wake(cx.waker()) => {}
                        w => *w = Some(cx.waker().clone()),
                    }
                    std::task::Poll::Pending
                }
            }
        })
        .await
    }
}

impl SlotState {
    fn pop(&mut self) -> Found {
        match self.first.take().or_else(|| self.more.pop_front()) {
            Some(delivery) => Found::Reply(delivery),
            None if self.ended => Found::Ended,
            None => Found::Empty,
        }
    }
}

/// The routing side of a [`Slot`]: dropping it (the last reply was routed, the
/// channel closed, the caller gave up) ends the slot.
struct ReplyTx(Arc<Slot>);

impl Drop for ReplyTx {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// Call ids are ours (sequential): a peer that sends replies with made-up ids only
/// misses.
type Pending = NumMap<u64, ReplyTx>;

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
    pending: Mutex<Pending>,
    next_id: AtomicU64,
    states: States,
    /// Incoming calls in flight (permits are returned by [`CallSlot`]).
    calls: Semaphore,
    limits: Limits,
    charge: Option<Arc<dyn Charge>>,
    /// Calls in flight shared with other channels (the switchboard: per uid).
    group_calls: Option<Arc<Semaphore>>,
    on_close: Mutex<OnClose>,
    /// Callers read the channel themselves (no reader task), holding `read_lock`.
    direct: bool,
    read_lock: tokio::sync::Mutex<()>,
}

impl Shared {
    async fn send_frame(&self, bytes: Vec<u8>, fds: &[OwnedFd]) -> Result<(), Status> {
        if bytes.len() > MAX_DATAGRAM {
            return Err(Status::resource_exhausted(format!(
                "Message of {} bytes exceeds the {MAX_DATAGRAM}-byte datagram limit",
                bytes.len()
            )));
        }
        let sent = match self.channel.try_send(&bytes, fds) {
            // The peer is not keeping up. Boxed: every future that sends (a reply, a
            // call, a spawned call's whole task) would otherwise carry this rare
            // wait's timer and waiters inline, and be copied with them.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                Box::pin(self.send_when_room(&bytes, fds)).await?
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

    /// Waits for room in the peer's queue (bounded by the send timeout), charging the
    /// descriptors that wait; `Err` when they cannot be charged or the channel closes.
    async fn send_when_room(
        &self,
        bytes: &[u8],
        fds: &[OwnedFd],
    ) -> Result<std::io::Result<()>, Status> {
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
            r = self.channel.send_after_full(bytes, fds, self.limits.send_timeout) => Ok(r),
            () = self.states.closed() => Err(closed_status()),
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
            .send_frame(frame::encode(Kind::Reply(reply)), &fds)
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
        let error = Status::new(status.code, format!("Reply could not be sent: {status}"));
        let error = frame::encode(Kind::Reply(frame::reply(id, Err(error), false)));
        if let Err(again) = self.send_frame(error, &[]).await {
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
        // Waiting callers see their slots end: UNAVAILABLE. (Ended outside the lock.)
        let gone = std::mem::take(&mut *self.pending.lock().unwrap());
        drop(gone);
    }

    /// Hands a reply to the call waiting for it. A send error means the caller gave
    /// up; the descriptors close here.
    fn route(&self, reply: Reply, fds: Vec<OwnedFd>) {
        let mut pending = self.pending.lock().unwrap();
        if reply.more {
            let slot = pending.get(&reply.id).map(|tx| tx.0.clone());
            drop(pending);
            match slot {
                Some(slot) => slot.put((reply, fds)),
                None => tracing::debug!(id = reply.id, "reply to no outstanding call, dropped"),
            }
            return;
        }
        let tx = pending.remove(&reply.id);
        drop(pending);
        match tx {
            // Dropping `tx` afterwards ends the slot: this was the last reply.
            Some(tx) => tx.0.put((reply, fds)),
            None => tracing::debug!(id = reply.id, "reply to no outstanding call, dropped"),
        }
    }

    /// What a caller-read channel does with one received datagram: replies are routed,
    /// calls refused (nothing is served on a client's handle). `false`: the channel is
    /// finished (closed, reset or broken) and has been closed.
    fn take_direct(self: &Arc<Self>, received: Received) -> bool {
        !matches!(self.take_direct_for(received, None), Taken::Finished)
    }

    /// [`Shared::take_direct`] for the reader of call `mine`: its own reply is returned
    /// rather than routed, so the reader does not wake itself.
    fn take_direct_for(self: &Arc<Self>, received: Received, mine: Option<u64>) -> Taken {
        let datagram = match received {
            Ok(Some(d)) => d,
            Ok(None) => {
                self.finish(None);
                return Taken::Finished;
            }
            Err(e) => {
                self.finish(Some(e.to_string()));
                return Taken::Finished;
            }
        };
        match frame::decode(&datagram.bytes) {
            Ok(Kind::Reply(reply)) if Some(reply.id) == mine => {
                return Taken::Mine((reply, datagram.fds));
            }
            Ok(Kind::Reply(reply)) => self.route(reply, datagram.fds),
            Ok(Kind::Call(call)) => {
                drop(datagram.fds);
                let shared = self.clone();
                let refusal = Status::unimplemented(format!(
                    "Method {} is not served on this channel",
                    call.method
                ));
                tokio::spawn(async move {
                    let _ = shared
                        .send_reply(frame::reply(call.id, Err(refusal), false), Vec::new())
                        .await;
                });
            }
            Err(e) => {
                self.finish(Some(e.to_string()));
                return Taken::Finished;
            }
        }
        Taken::Other
    }

    fn finish(&self, why: Option<String>) -> bool {
        if let Some(why) = why {
            tracing::debug!("closing channel: {why}");
        }
        self.close();
        false
    }
}

/// What one datagram read by a caller was.
enum Taken {
    /// The reply the reader waits for.
    Mine(Delivery),
    /// Something else, routed or answered.
    Other,
    /// The channel is finished and has been closed.
    Finished,
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

    /// A calling side with no reader task: each caller reads the channel itself until
    /// its reply arrives (see the module documentation). Nothing is served on it, and
    /// a hang-up is noticed by the next call, [`Peer::closed`] or [`Peer::is_closed`].
    pub fn client(channel: Channel) -> Peer {
        Peer {
            owner: Arc::new(Owner {
                shared: new_shared(channel, true, Limits::default(), None, None),
            }),
        }
    }

    /// Serves `service` on `channel` with no calling side and no owner: the channel
    /// lives until the other end closes it or `parent` is cancelled. With
    /// `group_calls`, each call also holds a permit of that semaphore, shared with
    /// other channels (one uid's), while it is served.
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
                && let Ok(Kind::Call(call)) = frame::decode(&datagram.bytes)
            {
                let reply = frame::encode(Kind::Reply(frame::reply(call.id, Err(status), false)));
                let _ = tokio::time::timeout(patience, channel.send(&reply, &[])).await;
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
        let shared = &self.owner.shared;
        if !shared.direct {
            return shared.states.closed().await;
        }
        // Nobody else may be reading: read (routing replies) until the end.
        while !shared.states.is_closed() {
            tokio::select! {
                guard = shared.read_lock.lock() => {
                    while shared.take_direct(shared.channel.recv().await) {}
                    drop(guard);
                }
                () = shared.states.closed() => {}
            }
        }
    }

    pub fn is_closed(&self) -> bool {
        let shared = &self.owner.shared;
        if shared.direct && !shared.states.is_closed() {
            // Look without waiting, unless a caller is reading right now.
            if let Ok(_guard) = shared.read_lock.try_lock() {
                while let Some(received) = shared.channel.try_recv() {
                    if !shared.take_direct(received) {
                        break;
                    }
                }
            }
        }
        shared.states.is_closed()
    }

    /// Whether the channel is closed or its other end has hung up (the kernel says
    /// so at once, before the reader has seen the end of what is queued): one
    /// zero-timeout poll unless already closed.
    pub fn peer_closed(&self) -> bool {
        let shared = &self.owner.shared;
        shared.states.is_closed() || shared.channel.peer_closed()
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

    /// Sends a call without waiting for its reply, which is discarded when it comes.
    /// For calls whose outcome the caller learns some other way.
    pub async fn send_only<M: Method>(
        &self,
        request: &M::Request,
        fds: Vec<OwnedFd>,
    ) -> Result<(), Status> {
        let shared = &self.owner.shared;
        if shared.states.is_closed() {
            return Err(closed_status());
        }
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        shared.send_frame(frame::call::<M>(id, request), &fds).await
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
        let slot = Arc::new(Slot::default());
        shared
            .pending
            .lock()
            .unwrap()
            .insert(id, ReplyTx(slot.clone()));
        let replies = Replies {
            shared: shared.clone(),
            id,
            slot,
            done: false,
            _method: std::marker::PhantomData,
        };
        // On failure `replies` is dropped, which forgets the pending id.
        shared
            .send_frame(frame::call::<M>(id, request), &fds)
            .await?;
        Ok(replies)
    }
}

/// Replies to one call. Dropping it abandons the call: a late reply is discarded
/// (and its descriptors closed) by the reader.
pub struct Replies<M: Method> {
    shared: Arc<Shared>,
    id: u64,
    slot: Arc<Slot>,
    done: bool,
    _method: std::marker::PhantomData<fn() -> M>,
}

impl<M: Method> Replies<M> {
    /// The next reply; `None` after the last one of a stream.
    pub async fn next(&mut self) -> Option<Result<(M::Response, Fds), Status>> {
        if self.done {
            return None;
        }
        let received = match self.shared.direct {
            false => self.slot.next().await,
            true => self.read_direct().await,
        };
        let Some((reply, fds)) = received else {
            self.done = true;
            return Some(Err(closed_status()));
        };
        if !reply.more || !M::STREAMING || reply.code != Code::Ok as i32 {
            self.done = true;
        }
        if M::STREAMING && !reply.more && reply.code == Code::Ok as i32 {
            // The final reply of a stream only says "done".
            return None;
        }
        Some(frame::reply_result::<M>(reply, fds))
    }
}

impl<M: Method> Replies<M> {
    /// Waits for the next reply on a caller-read channel: delivered by whoever holds
    /// the read lock, or read here once this call holds it. A reply read here for this
    /// call is returned directly, without passing through the slot.
    async fn read_direct(&mut self) -> Option<Delivery> {
        let shared = self.shared.clone();
        match self.slot.take() {
            Found::Reply(delivery) => return Some(delivery),
            Found::Ended => return None,
            Found::Empty => {}
        }
        tokio::select! {
            biased;
            delivery = self.slot.next() => delivery,
            guard = shared.read_lock.lock() => {
                loop {
                    // Routed to us before we held the lock.
                    match self.slot.take() {
                        Found::Reply(delivery) => return Some(delivery),
                        Found::Ended => return None,
                        Found::Empty => {}
                    }
                    match shared.take_direct_for(shared.channel.recv().await, Some(self.id)) {
                        Taken::Mine(delivery) => return Some(delivery),
                        Taken::Other => {}
                        Taken::Finished => {
                            drop(guard);
                            return match self.slot.take() {
                                Found::Reply(delivery) => Some(delivery),
                                _ => None,
                            };
                        }
                    }
                }
            }
        }
    }
}

impl<M: Method> Drop for Replies<M> {
    fn drop(&mut self) {
        let tx = self.shared.pending.lock().unwrap().remove(&self.id);
        // Nobody waits on the slot any more: ending it must not wake this task, which
        // may have left its waker there (a caller that read its own reply).
        self.slot.0.lock().unwrap().waker = None;
        drop(tx);
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
    let shared = new_shared(channel, false, limits, charge, group_calls);
    tokio::spawn(read_loop(shared.clone(), service, parent.clone()));
    shared
}

fn new_shared(
    channel: Channel,
    direct: bool,
    limits: Limits,
    charge: Option<Arc<dyn Charge>>,
    group_calls: Option<Arc<Semaphore>>,
) -> Arc<Shared> {
    Arc::new(Shared {
        channel,
        pending: Mutex::new(Pending::default()),
        next_id: AtomicU64::new(1),
        states: States::default(),
        calls: Semaphore::new(limits.calls_in_flight.max(1)),
        limits,
        charge,
        group_calls,
        on_close: Mutex::new(OnClose::Pending(None)),
        direct,
        read_lock: tokio::sync::Mutex::new(()),
    })
}

/// An incoming call's place among the [`Limits::calls_in_flight`], and among its
/// group's if the channel is in one; freed on drop.
struct CallSlot {
    shared: Arc<Shared>,
    _group: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Drop for CallSlot {
    fn drop(&mut self) {
        self.shared.calls.add_permits(1);
    }
}

/// Datagrams a reader takes in a row, without waiting, before it lets other tasks run.
const BURST: u32 = 8;

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
    // One waiter for "stop", registered once for the channel's life rather than made
    // and dropped again around every datagram.
    let stop = async {
        tokio::select! {
            () = shared.states.closed_or_draining() => {}
            () = parent.cancelled() => {}
        }
    };
    tokio::pin!(stop);
    // Datagrams taken without waiting since this task last let others run. A peer
    // that keeps its queue full (a flood) would otherwise keep the thread for a whole
    // coop budget of calls per turn, and with many such channels everyone else's
    // calls wait behind all of them.
    let mut burst = 0;
    loop {
        // The flags, not the waiter: polling a registered waiter takes its list's lock.
        if shared.states.is_closed() || shared.states.is_draining() || parent.is_cancelled() {
            break;
        }
        let recv = shared.channel.recv();
        tokio::pin!(recv);
        let received = match futures::poll!(&mut recv) {
            std::task::Poll::Ready(r) => {
                burst += 1;
                if burst > BURST {
                    burst = 0;
                    tokio::task::yield_now().await;
                }
                r
            }
            std::task::Poll::Pending => {
                burst = 0;
                tokio::select! {
                    biased;
                    () = &mut stop => break,
                    r = &mut recv => r,
                }
            }
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
        let frame = match frame::decode(&datagram.bytes) {
            Ok(kind) => kind,
            Err(e) => {
                tracing::warn!("closing channel: {e}");
                break;
            }
        };
        match frame {
            Kind::Reply(reply) => shared.route(reply, datagram.fds),
            Kind::Call(call) => {
                if !serve_call(shared, service.as_ref(), parent, call, datagram.fds).await {
                    break;
                }
            }
        }
    }
}

/// Serves one incoming call: waits for its place among the calls in flight (and the
/// group's), then answers it inline if the service finishes on its first poll, or
/// from a task of its own. `false`: the channel is closing, stop reading.
async fn serve_call(
    shared: &Arc<Shared>,
    service: Option<&Arc<dyn Service>>,
    parent: &CancellationToken,
    call: crate::Call,
    fds: Vec<OwnedFd>,
) -> bool {
    // A free place is taken at once; only a full channel waits (and watches for
    // the channel closing meanwhile).
    let mut waited = false;
    match shared.calls.try_acquire() {
        Ok(p) => p.forget(),
        Err(_) => {
            waited = true;
            match wait_for_place(shared, parent, shared.calls.acquire()).await {
                Ok(p) => p.expect("semaphore never closed").forget(),
                Err(stop) => return stop,
            }
        }
    }
    // And a place among the group's, if the channel is in one.
    let group = match &shared.group_calls {
        None => None,
        Some(group) => match group.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                waited = true;
                match wait_for_place(shared, parent, group.clone().acquire_owned()).await {
                    Ok(p) => Some(p.expect("semaphore never closed")),
                    Err(stop) => {
                        shared.calls.add_permits(1);
                        return stop;
                    }
                }
            }
        },
    };
    let slot = CallSlot {
        shared: shared.clone(),
        _group: group,
    };
    // A caller that hung up while its calls waited for their place has nobody to
    // answer: what it left queued is not served (a flood's channels drain at once
    // instead of costing the work of every call in them). Watched during the wait,
    // and checked once after it (the hang-up may not have reached the reactor yet);
    // the usual path makes no extra system call.
    if waited && shared.channel.peer_closed() {
        return hung_up();
    }
    let id = call.id;
    let request = Request {
        method: call.method,
        message: call.message,
        fds,
    };
    let Some(service) = service.cloned() else {
        let refusal = Status::unimplemented(format!(
            "Method {} is not served on this channel",
            request.method
        ));
        answer(shared, id, Err(refusal), slot).await;
        return true;
    };
    let sink = StreamSink {
        shared: shared.clone(),
        id,
    };
    let mut work = service.call(request, sink);
    // Most calls (a server taking a connection, a registration) finish on their
    // first poll: answer those here, with no task to spawn and wake.
    match futures::poll!(&mut work) {
        std::task::Poll::Ready(result) => answer(shared, id, result, slot).await,
        std::task::Poll::Pending => {
            let shared = shared.clone();
            tokio::spawn(async move {
                let result = tokio::select! {
                    r = work => r,
                    // The caller is gone: abandon the work, close its descriptors.
                    () = shared.states.closed() => return,
                };
                answer(&shared, id, result, slot).await;
            });
        }
    }
    true
}

/// Waits for a place among the calls in flight (`acquire`) while watching for the
/// channel closing or draining, the reader being told to stop, and the caller
/// hanging up; `Err` holds what [`serve_call`] then returns.
async fn wait_for_place<T>(
    shared: &Shared,
    parent: &CancellationToken,
    acquire: impl Future<Output = T>,
) -> Result<T, bool> {
    tokio::select! {
        p = acquire => Ok(p),
        () = shared.states.closed_or_draining() => Err(false),
        () = parent.cancelled() => Err(false),
        () = shared.channel.hung_up() => Err(hung_up()),
    }
}

/// What [`serve_call`] returns for a caller that hung up with calls still queued.
fn hung_up() -> bool {
    tracing::debug!("closing channel: the caller hung up with calls still queued");
    false
}

/// Sends the final reply of call `id`, then frees its slot.
async fn answer(shared: &Arc<Shared>, id: u64, result: Result<Response, Status>, slot: CallSlot) {
    let (reply, fds) = match result {
        Ok(r) => (frame::reply(id, Ok(r.message), false), r.fds),
        Err(s) => (frame::reply(id, Err(s), false), Vec::new()),
    };
    let _ = shared.send_reply(reply, fds).await;
    drop(slot);
}
