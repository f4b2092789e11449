//! Process plumbing: every broker, switchboard, server and client runs as its own
//! process, so that the figures include real context switches and real descriptor
//! passing between address spaces.
//!
//! Helper processes are this executable re-run with a hidden subcommand. They print
//! one `ready ...` line on stdout once set up; children die with the bench
//! (`PR_SET_PDEATHSIG`) and every process bounds its own waits, so nothing here can
//! hang forever or leak processes.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::sys::socket::{self, UnixAddr};

/// Upper bound for anything a process waits for (a connect, a reply, start-up).
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The CPU pinned runs put every process on: the first one we may run on (CPU 0
/// unless a cpuset says otherwise).
pub fn pinned_cpu() -> usize {
    allowed_cpus().first().copied().unwrap_or(0)
}

/// What every run needs to start processes.
pub struct Ctx {
    /// The `flower` binary.
    pub flower: PathBuf,
    /// This executable, re-run for helper processes.
    pub exe: PathBuf,
    /// A private directory for socket paths, removed on drop.
    pub dir: TempDir,
    /// Tokio worker threads for the switchboard (`--threads`); None: its default.
    pub daemon_workers: Option<usize>,
    /// The runtime of the library peers, passed to helpers in [`RUNTIME_ENV`].
    pub runtime: LibraryRuntime,
    /// Where the library peers' loops run, passed to helpers in [`LOOP_ENV`].
    pub library_loop: LibraryLoop,
}

/// Where a client-library peer runs its loop ([`run_library`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LibraryLoop {
    /// In a spawned task.
    #[default]
    Task,
    /// As the `block_on` future.
    BlockOn,
}

/// Which tokio runtime the client-library peers run on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LibraryRuntime {
    /// `new_current_thread`: everything on the calling thread.
    #[default]
    CurrentThread,
    /// `new_multi_thread` with the default workers (one per CPU); the loop runs in
    /// `block_on` on the main thread, so the reactor is driven by a worker.
    MultiThread,
}

/// How a helper learns its [`LibraryRuntime`].
const RUNTIME_ENV: &str = "FLOWER_BENCH_RUNTIME";

/// The runtime a library-peer helper runs on, as its parent chose.
pub fn library_runtime() -> Result<tokio::runtime::Runtime> {
    let multi = std::env::var(RUNTIME_ENV).is_ok_and(|v| v == "multi-thread");
    let mut builder = if multi {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    Ok(builder.enable_all().build()?)
}

/// Runs a library peer's loop: in a task of its own (the default), or, with
/// `FLOWER_BENCH_LOOP=block-on`, as the `block_on` future itself. A loop in
/// `block_on` that another task wakes (the registration's reader handing over a
/// connection) costs a poll of the reactor per wake on the current-thread runtime,
/// and a thread wake-up on the multi-thread one (BENCHMARKS.md).
pub fn run_library<T: Send + 'static>(
    f: impl std::future::Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    let rt = library_runtime()?;
    if std::env::var(LOOP_ENV).is_ok_and(|v| v == "block-on") {
        return rt.block_on(f);
    }
    rt.block_on(async { tokio::spawn(f).await? })
}

/// How a helper learns where its library loop runs ([`run_library`]).
const LOOP_ENV: &str = "FLOWER_BENCH_LOOP";

impl Ctx {
    pub fn new(flower: Option<PathBuf>, daemon_workers: Option<usize>) -> Result<Ctx> {
        let exe = std::env::current_exe().context("cannot find this executable")?;
        let flower = match flower {
            Some(f) => f,
            None => exe.with_file_name("flower"),
        };
        if !flower.is_file() {
            bail!(
                "no flower binary at {} (build it with `cargo build --release`, or pass --flower PATH)",
                flower.display()
            );
        }
        Ok(Ctx {
            flower,
            exe,
            dir: TempDir::new()?,
            daemon_workers,
            runtime: LibraryRuntime::CurrentThread,
            library_loop: LibraryLoop::Task,
        })
    }

    /// Library-peer helpers run on `runtime`, their loops as `library_loop` says.
    pub fn with_runtime(mut self, runtime: LibraryRuntime, library_loop: LibraryLoop) -> Ctx {
        self.runtime = runtime;
        self.library_loop = library_loop;
        self
    }

    /// A fresh socket path in the private directory.
    pub fn path(&self, name: &str) -> PathBuf {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        self.dir.0.join(format!("{name}-{n}"))
    }

    /// This executable with a (hidden) subcommand.
    pub fn helper(&self, args: &[&str], pinned: bool) -> Command {
        self.helper_on(args, pinned.then(pinned_cpu))
    }

    /// This executable with a (hidden) subcommand, on one CPU if `cpu` is given.
    pub fn helper_on(&self, args: &[&str], cpu: Option<usize>) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.args(args);
        let runtime = match self.runtime {
            LibraryRuntime::CurrentThread => "current-thread",
            LibraryRuntime::MultiThread => "multi-thread",
        };
        cmd.env(RUNTIME_ENV, runtime);
        if self.library_loop == LibraryLoop::BlockOn {
            cmd.env(LOOP_ENV, "block-on");
        }
        prepare_on(&mut cmd, cpu);
        cmd
    }

    /// Starts `flower switchboard PATH` and waits until it accepts connections.
    pub fn switchboard(&self, pinned: bool) -> Result<(Proc, PathBuf)> {
        self.switchboard_with(&[], pinned)
    }

    /// [`Ctx::switchboard`] with `extra` arguments.
    pub fn switchboard_with(&self, extra: &[&str], pinned: bool) -> Result<(Proc, PathBuf)> {
        let path = self.path("switchboard");
        let mut cmd = Command::new(&self.flower);
        // The bench measures speed, not the per-uid bounds: every peer here is one uid.
        cmd.arg("switchboard")
            .arg(&path)
            .args([
                "--max-handles-per-uid",
                "1000000",
                "--max-targets-per-uid",
                "1000000",
            ])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        if let Some(n) = self.daemon_workers {
            cmd.arg("--threads").arg(n.to_string());
        }
        prepare(&mut cmd, pinned);
        let child = cmd.spawn().context("cannot start flower switchboard")?;
        let proc = Proc::new("switchboard", child);
        wait_connectable(&path)?;
        Ok((proc, path))
    }

    /// Starts a helper and waits for its `ready` line; returns the rest of that line.
    pub fn start_helper(&self, name: &str, args: &[&str], pinned: bool) -> Result<(Proc, String)> {
        self.start_helper_on(name, args, pinned.then(pinned_cpu))
    }

    /// [`Ctx::start_helper`] on one CPU if `cpu` is given.
    pub fn start_helper_on(
        &self,
        name: &str,
        args: &[&str],
        cpu: Option<usize>,
    ) -> Result<(Proc, String)> {
        let mut cmd = self.helper_on(args, cpu);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let mut proc = Proc::new(name, child);
        let rest = proc.read_ready()?;
        Ok((proc, rest))
    }
}

/// Children die with the bench, and pinned runs share one CPU.
fn prepare(cmd: &mut Command, pinned: bool) {
    prepare_on(cmd, pinned.then(pinned_cpu))
}

fn prepare_on(cmd: &mut Command, cpu: Option<usize>) {
    // SAFETY: only async-signal-safe calls (prctl, sched_setaffinity) run in the child.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if let Some(cpu) = cpu {
                pin_to(cpu)?;
            }
            Ok(())
        });
    }
}

/// The CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity only writes it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Restricts the calling thread (a process, before exec) to one CPU.
pub fn pin_to(cpu: usize) -> std::io::Result<()> {
    pin_to_set(&[cpu])
}

/// Restricts the calling thread (a process, before exec) to a set of CPUs.
pub fn pin_to_set(cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; the calls only read/write it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A child process, killed and reaped on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
    stdout: Option<BufReader<ChildStdout>>,
    stdin: Option<ChildStdin>,
}

impl Proc {
    pub fn new(name: &str, mut child: Child) -> Proc {
        let stdout = child.stdout.take().map(BufReader::new);
        let stdin = child.stdin.take();
        Proc {
            name: name.to_owned(),
            child,
            stdout,
            stdin,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// One line of the child's stdout. Bounded because every child bounds its own
    /// waits and exits (closing the pipe) when one runs out.
    pub fn read_line(&mut self) -> Result<String> {
        let out = self.stdout.as_mut().context("stdout not piped")?;
        let mut line = String::new();
        if out.read_line(&mut line)? == 0 {
            let status = self.child.wait()?;
            bail!("{} exited ({status}) before answering", self.name);
        }
        Ok(line.trim_end().to_owned())
    }

    /// Waits for `ready ...` and returns what follows `ready`.
    pub fn read_ready(&mut self) -> Result<String> {
        let line = self.read_line()?;
        match line.strip_prefix("ready") {
            Some(rest) => Ok(rest.trim().to_owned()),
            None => bail!("{} said {line:?} instead of ready", self.name),
        }
    }

    pub fn write_line(&mut self, line: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin not piped")?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private temporary directory, removed on drop (std has none; avoids a dependency).
pub struct TempDir(pub PathBuf);

impl TempDir {
    fn new() -> Result<TempDir> {
        let base = std::env::temp_dir().join(format!(
            "flower-bench-{}-{}",
            std::process::id(),
            crate::stats::now_ns()
        ));
        std::fs::create_dir_all(&base)
            .with_context(|| format!("cannot create {}", base.display()))?;
        Ok(TempDir(base))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls until a SOCK_SEQPACKET connect to `path` succeeds (the probe is closed).
pub fn wait_connectable(path: &Path) -> Result<()> {
    let deadline = Instant::now() + PATIENCE;
    let addr = UnixAddr::new(path)?;
    loop {
        let fd = crate::floor::seqpacket_socket()?;
        if socket::connect(fd.as_raw_fd(), &addr).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listening at {} after {PATIENCE:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Resident set size of a process, in KiB (`VmRSS` in /proc/PID/status).
pub fn vm_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/PID/status")
}

/// Raises this process's descriptor limit so that children (which inherit it) can
/// hold `wanted` descriptors. With CAP_SYS_RESOURCE (normally root) the hard limit
/// may go up to fs.nr_open; without it
/// only the soft limit up to the hard one. Returns the resulting soft limit.
pub fn raise_nofile(wanted: u64) -> u64 {
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(hard);
    let new_hard = hard.max(wanted.min(nr_open));
    if new_hard > hard && setrlimit(Resource::RLIMIT_NOFILE, new_hard, new_hard).is_ok() {
        return new_hard;
    }
    if setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

/// Whether `program` is on PATH.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

impl Ctx {
    /// Starts `flower ingress accept 127.0.0.1:0 PATH LABEL` and returns it with the
    /// address it logged as bound (the way tests/bridges.rs learns the port).
    pub fn ingress(&self, switchboard: &str, label: &str, pinned: bool) -> Result<(Proc, String)> {
        let mut cmd = Command::new(&self.flower);
        cmd.args(["ingress", "accept", "127.0.0.1:0", switchboard, label])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stderr(Stdio::piped());
        prepare(&mut cmd, pinned);
        let mut child = cmd.spawn().context("cannot start flower ingress")?;
        let mut stderr = BufReader::new(child.stderr.take().context("stderr not piped")?);
        let proc = Proc::new("ingress", child);
        let mut line = String::new();
        loop {
            line.clear();
            if stderr.read_line(&mut line)? == 0 {
                bail!("ingress exited before listening");
            }
            if line.contains("ingress listening") {
                break;
            }
        }
        // Keep draining stderr so the ingress never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
        let address = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("address="))
            .context("ingress did not log its address")?;
        Ok((proc, address.to_owned()))
    }
}
