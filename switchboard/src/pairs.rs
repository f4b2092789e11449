//! Connection socketpairs made ahead of time.
//!
//! A `socketpair()` is the costliest step of a connect inside the switchboard. A small
//! pool moves it off the connect path: a connect takes a ready pair, and when the pool
//! runs low one task refills it, after the connect that noticed has answered (on the
//! one-thread runtime a spawned task runs only once the current one yields). Up to
//! sixteen descriptors are held for it, from the start; when the pool is empty a connect makes its own pair.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use flower_proto::transport::stream_pair;

/// Pairs kept ready.
const CAPACITY: usize = 8;
/// Descriptors the pool holds when full, outside the handles' budget.
pub(crate) const DESCRIPTORS: usize = 2 * CAPACITY;

#[derive(Clone)]
pub(crate) struct Pairs(Arc<Inner>);

#[derive(Default)]
struct Inner {
    ready: Mutex<Vec<(OwnedFd, OwnedFd)>>,
    refilling: AtomicBool,
}

impl Pairs {
    /// A full pool: the descriptors it holds are there from the start, so a daemon's
    /// descriptor count does not grow with its first connects.
    pub fn new() -> Pairs {
        let pairs = Pairs(Arc::default());
        pairs.0.refill();
        pairs
    }

    /// A connected SOCK_STREAM pair, from the pool when it has one.
    pub fn take(&self) -> io::Result<(OwnedFd, OwnedFd)> {
        let (pair, left) = {
            let mut ready = self.0.ready.lock().unwrap();
            (ready.pop(), ready.len())
        };
        if left < CAPACITY / 2 && !self.0.refilling.swap(true, Ordering::AcqRel) {
            let pool = self.0.clone();
            tokio::spawn(async move { pool.refill() });
        }
        match pair {
            Some(pair) => Ok(pair),
            None => stream_pair(),
        }
    }
}

impl Inner {
    fn refill(&self) {
        let missing = CAPACITY.saturating_sub(self.ready.lock().unwrap().len());
        let mut made = Vec::with_capacity(missing);
        for _ in 0..missing {
            // Out of descriptors: leave the pool short; connects make their own.
            match stream_pair() {
                Ok(pair) => made.push(pair),
                Err(_) => break,
            }
        }
        self.ready.lock().unwrap().extend(made);
        self.refilling.store(false, Ordering::Release);
    }
}
