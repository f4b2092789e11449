//! Readiness for scripts: `--ready-fd N` writes one line to descriptor N once the
//! tool is ready (registered, or listening) and closes it.
//!
//! ```sh
//! exec 3< <(flower cat -l app=web --ready-fd 3 </dev/null)   # or a FIFO, or a pipe
//! read -r registered <&3                                     # {"app":"web"}
//! ```
//!
//! The descriptor is claimed before the tool opens any of its own: [`ReadyFd::claim`]
//! must run first thing in `main`, so a number the caller did not open is an error
//! instead of one of ours (an event loop's, say) being written to and closed.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};

use crate::args::UsageError;

/// Where to say "ready".
#[derive(Debug)]
pub struct ReadyFd(File);

impl ReadyFd {
    /// Takes descriptor `n` over: checks that it is open, reopens what it refers to
    /// (a pipe, FIFO or file, for writing, close-on-exec) and closes `n` itself.
    pub fn claim(n: RawFd) -> Result<ReadyFd, UsageError> {
        let bad = |why: String| UsageError(format!("--ready-fd {n}: {why}"));
        if n <= 2 {
            return Err(bad(
                "must be 3 or above (0, 1 and 2 are the standard streams)".into(),
            ));
        }
        nix::fcntl::fcntl(n, nix::fcntl::FcntlArg::F_GETFD)
            .map_err(|e| bad(format!("descriptor is not open ({e})")))?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/proc/self/fd/{n}"))
            .map_err(|e| bad(format!("cannot write to it ({e})")))?;
        if file.as_raw_fd() != n {
            let _ = nix::unistd::close(n);
        }
        Ok(ReadyFd(file))
    }

    /// Writes `line` and a newline, then closes the descriptor. A reader that went
    /// away is not an error: being ready does not depend on it.
    pub fn notify(self, line: &str) {
        let mut file = self.0;
        if let Err(e) = writeln!(file, "{line}") {
            tracing::debug!("cannot write the ready line: {e}");
        }
    }
}

/// Notifies `ready`, if any, with `line`; logs readiness either way.
pub fn notify(ready: &mut Option<ReadyFd>, line: &str) {
    tracing::debug!(line, "ready");
    if let Some(fd) = ready.take() {
        fd.notify(line);
    }
}

/// How a long-running tool (ingress, egress, resolver) starts: the bound on each
/// attempt to register, and whom to tell once it is ready.
#[derive(Debug, Default)]
pub struct Startup {
    /// `-w`: each connect-and-register attempt takes at most this long
    /// ([`crate::DEFAULT_WAIT`] when `None`).
    pub wait: Option<std::time::Duration>,
    pub ready: Option<ReadyFd>,
}

impl Startup {
    pub fn wait(&self) -> std::time::Duration {
        self.wait.unwrap_or(crate::DEFAULT_WAIT)
    }
}
