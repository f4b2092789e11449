//! Counting a scope: how many handles and targets it holds, with a bound on handles.
//!
//! Only scopes an embedder asked to count ([`crate::Switchboard::counted_scope`],
//! e.g. a pod's) pay for this; a handle of a plain scope carries `None`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use flower_proto::Status;
use tokio::sync::Notify;

#[derive(Debug)]
pub(crate) struct ScopeCounts {
    handles: AtomicUsize,
    targets: AtomicUsize,
    max_handles: usize,
    /// Notified whenever a count drops.
    dropped: Notify,
}

impl ScopeCounts {
    pub fn new(max_handles: usize) -> Arc<ScopeCounts> {
        Arc::new(ScopeCounts {
            handles: AtomicUsize::new(0),
            targets: AtomicUsize::new(0),
            max_handles,
            dropped: Notify::new(),
        })
    }

    pub fn handles(&self) -> usize {
        self.handles.load(Ordering::Acquire)
    }

    pub fn targets(&self) -> usize {
        self.targets.load(Ordering::Acquire)
    }

    /// Counts one more handle, unless the scope is full.
    pub fn handle(self: &Arc<Self>) -> Result<HandleCount, Status> {
        let counted = self
            .handles
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_handles).then_some(n + 1)
            });
        match counted {
            Ok(_) => Ok(HandleCount(self.clone())),
            Err(_) => Err(Status::resource_exhausted(format!(
                "This endpoint has reached its limit of {} handles",
                self.max_handles
            ))),
        }
    }

    /// Counts one more target (bounded elsewhere, per scope, if at all).
    pub fn target(self: &Arc<Self>) -> TargetCount {
        self.targets.fetch_add(1, Ordering::AcqRel);
        TargetCount(self.clone())
    }

    /// Resolves once both counts are zero.
    pub async fn empty(&self) {
        loop {
            let dropped = self.dropped.notified();
            if self.handles() == 0 && self.targets() == 0 {
                return;
            }
            dropped.await;
        }
    }

    fn release(&self, count: &AtomicUsize) {
        count.fetch_sub(1, Ordering::AcqRel);
        self.dropped.notify_waiters();
    }
}

/// One counted handle: released when the handle's service is dropped (its channel
/// closed, by either side or by revocation).
#[derive(Debug)]
pub(crate) struct HandleCount(Arc<ScopeCounts>);

impl HandleCount {
    /// Another handle in the same scope (Constrain).
    pub fn another(&self) -> Result<HandleCount, Status> {
        self.0.handle()
    }

    pub fn target(&self) -> TargetCount {
        self.0.target()
    }
}

impl Drop for HandleCount {
    fn drop(&mut self) {
        self.0.release(&self.0.handles);
    }
}

/// One counted target: released when its registration is removed.
#[derive(Debug)]
pub(crate) struct TargetCount(Arc<ScopeCounts>);

impl Drop for TargetCount {
    fn drop(&mut self) {
        self.0.release(&self.0.targets);
    }
}
