//! The receive path: the fuzzer's bytes are sent as one SOCK_SEQPACKET datagram with
//! 0 to 7 descriptors (more than the protocol's 4 on purpose), received with the
//! transport's checks, then decoded and claimed as the switchboard would. Every 4096
//! runs the process's descriptor count is checked: nothing may leak.
#![no_main]

use std::cell::Cell;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use flower_proto::transport::{self, seqpacket_pair};
use libfuzzer_sys::fuzz_target;
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg, setsockopt, sockopt};

#[path = "common.rs"]
mod common;

thread_local! {
    static PAIR: (OwnedFd, OwnedFd) = {
        let (a, b) = seqpacket_pair().unwrap();
        // Room for the largest datagram.
        setsockopt(&a, sockopt::SndBuf, &(1 << 20)).unwrap();
        setsockopt(&b, sockopt::RcvBuf, &(1 << 20)).unwrap();
        transport::set_timeouts(b.as_fd(), Some(std::time::Duration::from_secs(1))).unwrap();
        (a, b)
    };
    static RUNS: Cell<u64> = const { Cell::new(0) };
    static BASELINE: Cell<usize> = const { Cell::new(0) };
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, bytes)) = data.split_first() else {
        return;
    };
    // A zero-length datagram reads as end of stream; the transport treats it so.
    if bytes.is_empty() {
        return;
    }
    let count = usize::from(first % 8);
    PAIR.with(|(a, b)| {
        let fds: Vec<OwnedFd> = (0..count)
            .map(|i| match i % 3 {
                0 => a.try_clone().unwrap(),
                1 => OwnedFd::from(std::fs::File::open("/dev/null").unwrap()),
                _ => transport::stream_pair().unwrap().0,
            })
            .collect();
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let rights = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
        if sendmsg::<()>(a.as_raw_fd(), &[IoSlice::new(bytes)], cmsgs, MsgFlags::MSG_NOSIGNAL, None)
            .is_err()
        {
            return;
        }
        drop(fds);
        match transport::recv_blocking(b.as_fd()) {
            Ok(Ok(Some(datagram))) => {
                assert!(datagram.fds.len() <= transport::MAX_FDS);
                assert!(datagram.bytes.len() <= transport::MAX_DATAGRAM);
                common::exercise(&datagram.bytes, datagram.fds);
            }
            Ok(Ok(None)) => panic!("a non-empty datagram read as end of stream"),
            Ok(Err(_refused)) => {}
            Err(e) => panic!("receive failed: {e}"),
        }
    });
    let runs = RUNS.with(|r| {
        r.set(r.get() + 1);
        r.get()
    });
    if runs == 1 {
        BASELINE.with(|b| b.set(open_fds()));
    } else if runs % 4096 == 0 {
        let (now, baseline) = (open_fds(), BASELINE.with(Cell::get));
        assert!(now <= baseline, "descriptors leaked: {now} open, {baseline} at the start");
    }
});
