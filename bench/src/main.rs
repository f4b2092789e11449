//! `flower-bench`: end-to-end benchmarks of Flower against a minimal broker (the
//! "floor"), with every broker, daemon, server and client in its own process.
//!
//! Figures go to stdout as markdown tables; progress goes to stderr. See
//! BENCHMARKS.md for the method and the results.

mod blocking_peers;
mod connect;
mod dataplane;
mod floor;
mod procs;
mod revoke;
mod soak;
mod stats;
mod syscalls;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand, ValueEnum};

use connect::Kind;
use dataplane::{Behavior, Source};

/// End-to-end benchmarks of Flower, as ratios to a minimal socketpair broker.
///
/// The floor is the least a broker can do to hand out a connection: a 1-byte request
/// on SOCK_SEQPACKET, socketpair(), one end to a server with SCM_RIGHTS, wait for its
/// 1-byte ack, the other end to the client. Every figure is reported next to the
/// floor (or the direct path) measured in the same run. Needs the `flower` binary
/// (default: next to this executable).
#[derive(Parser)]
#[command(name = "flower-bench", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Everything below, with the defaults (takes a few minutes).
    All(Opts),
    /// The floor broker alone.
    Floor(Opts),
    /// Connect rate and latency: floor vs switchboard, by clients, targets and mode.
    Connect(Opts),
    /// Memory per idle handle and per target at scale, and connects under that load.
    Scale(Opts),
    /// Bulk throughput: switchboard vs socketpair, ingress vs direct TCP (vs socat).
    Dataplane(Opts),
    /// Connect rate and added latency through the ingress vs direct TCP.
    Ingress(Opts),
    /// Syscalls per connect of the daemon and the server, switchboard vs floor (strace).
    Syscalls(Opts),
    /// Revocation: UnregisterPod latency and daemon CPU with N handles in the pod.
    Revoke(Opts),
    /// Many connects, then hostile clients for a while: the daemon's descriptors and
    /// memory must return to their baseline.
    Soak {
        #[command(flatten)]
        opts: Opts,
        /// Connects in the first stage.
        #[arg(long, default_value_t = 1_000_000)]
        connects: usize,
        /// Concurrent connecting clients in the first stage.
        #[arg(long = "soak-clients", default_value_t = 4)]
        soak_clients: usize,
        /// Hostile threads in the second stage.
        #[arg(long, default_value_t = 16)]
        hostile: usize,
        /// Seconds the hostile stage lasts.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Run the hostile clients as this uid (as root), so that the per-uid
        /// limits apply to them and not to the bystander.
        #[arg(long)]
        hostile_uid: Option<u32>,
    },
    #[command(hide = true)]
    SoakAttacker {
        path: PathBuf,
        #[arg(long)]
        threads: usize,
        #[arg(long)]
        seconds: u64,
    },

    // Helper processes, started by the commands above.
    #[command(hide = true)]
    FloorBroker { path: PathBuf },
    #[command(hide = true)]
    FloorServer { path: PathBuf },
    #[command(hide = true)]
    BlockingServer {
        path: PathBuf,
        #[arg(long)]
        label: Vec<String>,
    },
    #[command(hide = true)]
    Client {
        #[arg(long, value_enum)]
        kind: Kind,
        #[arg(long)]
        target: String,
        #[arg(long)]
        label: Vec<String>,
        #[arg(long)]
        iterations: usize,
        #[arg(long)]
        warmup: usize,
    },
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        switchboard: Option<PathBuf>,
        #[arg(long)]
        label: Vec<String>,
        #[arg(long)]
        tcp: Option<String>,
        #[arg(long)]
        fd: Option<i32>,
        #[arg(long)]
        unix: Option<PathBuf>,
        /// With --switchboard: register with `backlog`.
        #[arg(long)]
        backlog: bool,
        #[arg(long, value_enum, default_value = "drop")]
        behavior: Behavior,
        #[arg(long, default_value_t = 65536)]
        chunk: usize,
    },
    #[command(hide = true)]
    Filler {
        path: PathBuf,
        #[arg(long, default_value_t = 0)]
        start: usize,
        #[arg(long)]
        count: usize,
    },
    #[command(hide = true)]
    Holder {
        path: PathBuf,
        #[arg(long)]
        count: usize,
    },
}

/// Whether processes are pinned to one CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Daemon, broker, server and clients all on one CPU (the first allowed).
    Pinned,
    /// Left to the scheduler.
    Free,
}

/// Options shared by all commands; each uses the ones that concern it.
#[derive(Args, Clone)]
struct Opts {
    /// The `flower` binary [default: `flower` next to this executable].
    #[arg(long)]
    flower: Option<PathBuf>,
    /// Run the switchboard with this many tokio worker threads (its `--threads`;
    /// for experiments) [default: the daemon's own, one thread].
    #[arg(long)]
    daemon_workers: Option<usize>,
    /// The tokio runtime of the client-library peers (the `library` and
    /// `library+backlog` clients and their servers).
    #[arg(long, value_enum, default_value = "current-thread")]
    library_runtime: procs::LibraryRuntime,
    /// Where those peers run their connect or accept loop: `task` (spawned, the way
    /// the client library's docs advise) or `block-on` (the `block_on` future
    /// itself, as a loop written straight in `#[tokio::main]`).
    #[arg(long, value_enum, default_value = "task")]
    library_loop: procs::LibraryLoop,
    /// Timed connects per measurement, split evenly between the clients.
    #[arg(long, default_value_t = 20_000)]
    iterations: usize,
    /// Rounds each measurement is split into, alternating floor and switchboard
    /// (medians are reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Untimed connects each client makes first.
    #[arg(long, default_value_t = 200)]
    warmup: usize,
    /// Concurrent client processes to measure with (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,2,8")]
    clients: Vec<usize>,
    /// Numbers of other (contradicting) targets to register (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "10,1000,100000")]
    targets: Vec<usize>,
    /// Modes for `connect` and `floor` (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "free,pinned")]
    modes: Vec<Mode>,
    /// `scale`: idle handles held open, and targets registered, at once.
    #[arg(long, default_value_t = 100_000)]
    scale: usize,
    /// `dataplane`: bytes per transfer (suffixes KiB, MiB, GiB).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    bytes: u64,
    /// `dataplane`: bytes per write (suffixes KiB, MiB).
    #[arg(long, default_value = "64KiB", value_parser = parse_size)]
    chunk: u64,
    /// `dataplane`: transfers per path (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// `ingress`: timed TCP connects (+ 1-byte echo) per measurement.
    #[arg(long, default_value_t = 5_000)]
    ingress_iterations: usize,
    /// `revoke`: handles held open in the pod (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,100,1000,5000")]
    pod_handles: Vec<usize>,
    /// `revoke`: rounds per handle count (the median is reported).
    #[arg(long, default_value_t = 10)]
    revoke_rounds: usize,
    /// `syscalls`: connects counted under strace (0 skips it in `all`).
    #[arg(long, default_value_t = 2_000)]
    strace_connects: usize,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, ""), |i| s.split_at(i));
    let n: u64 = digits.parse().map_err(|_| format!("invalid size {s:?}"))?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "KiB" | "K" => 10,
        "MiB" | "M" => 20,
        "GiB" | "G" => 30,
        _ => return Err(format!("invalid size unit in {s:?} (use KiB, MiB or GiB)")),
    };
    Ok(n << shift)
}

impl Opts {
    fn connect(&self) -> connect::Opts {
        connect::Opts {
            iterations: self.iterations,
            warmup: self.warmup,
            rounds: self.rounds,
            clients: self.clients.clone(),
            targets: self.targets.clone(),
            pinned: self.modes.iter().map(|m| *m == Mode::Pinned).collect(),
        }
    }
    fn data(&self) -> dataplane::DataOpts {
        dataplane::DataOpts {
            bytes: self.bytes,
            chunk: self.chunk as usize,
            repeats: self.repeats,
        }
    }
    fn ingress(&self) -> dataplane::IngressOpts {
        dataplane::IngressOpts {
            iterations: self.ingress_iterations,
            warmup: self.warmup.min(self.ingress_iterations),
            clients: self.clients.clone(),
        }
    }
    fn revoke(&self) -> revoke::RevokeOpts {
        revoke::RevokeOpts {
            handles: self.pod_handles.clone(),
            rounds: self.revoke_rounds,
        }
    }
    fn scale(&self) -> connect::ScaleOpts {
        connect::ScaleOpts {
            handles: self.scale,
            targets: self.scale,
        }
    }
}

fn machine() {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("Machine: {cpus} CPUs, {cpu}");
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::All(o) => {
            let ctx = procs::Ctx::new(o.flower.clone(), o.daemon_workers)?
                .with_runtime(o.library_runtime, o.library_loop);
            machine();
            connect::connect_bench(&ctx, &o.connect())?;
            if o.scale > 0 {
                connect::scale_bench(&ctx, &o.connect(), &o.scale())?;
            }
            dataplane::dataplane_bench(&ctx, &o.data())?;
            dataplane::ingress_bench(&ctx, &o.ingress())?;
            if o.strace_connects > 0 {
                syscalls::syscalls_bench(&ctx, o.strace_connects)?;
            }
            revoke::revoke_bench(&ctx, &o.revoke())?;
        }
        Command::Floor(o) => {
            let ctx = procs::Ctx::new(o.flower.clone(), o.daemon_workers)?
                .with_runtime(o.library_runtime, o.library_loop);
            machine();
            let c = o.connect();
            let mut t = stats::Table::new(&["mode", "clients", "connects/s", "p50 µs", "p99 µs"]);
            for &pinned in &c.pinned {
                let (_broker, _server, path) = connect::start_floor(&ctx, pinned)?;
                for &n in &c.clients {
                    let f = connect::run_clients(
                        &ctx,
                        Kind::Floor,
                        &path,
                        &[],
                        n,
                        c.iterations,
                        c.warmup,
                        pinned,
                        || Ok(()),
                    )?;
                    let mode = if pinned { "pinned" } else { "free" };
                    t.row(&[
                        mode.into(),
                        n.to_string(),
                        stats::rate(f.per_sec),
                        stats::us(f.p50_us),
                        stats::us(f.p99_us),
                    ]);
                }
            }
            t.print("Floor broker");
        }
        Command::Connect(o) => {
            let ctx = procs::Ctx::new(o.flower.clone(), o.daemon_workers)?
                .with_runtime(o.library_runtime, o.library_loop);
            machine();
            connect::connect_bench(&ctx, &o.connect())?;
        }
        Command::Scale(o) => {
            let ctx = procs::Ctx::new(o.flower.clone(), o.daemon_workers)?
                .with_runtime(o.library_runtime, o.library_loop);
            machine();
            connect::scale_bench(&ctx, &o.connect(), &o.scale())?;
        }
        Command::Dataplane(o) => {
            let ctx = procs::Ctx::new(o.flower.clone(), o.daemon_workers)?
                .with_runtime(o.library_runtime, o.library_loop);
            machine();
            dataplane::dataplane_bench(&ctx, &o.data())?;
        }
        Command::Ingress(o) => {
            let ctx = procs::Ctx::new(o.flower.clone(), o.daemon_workers)?
                .with_runtime(o.library_runtime, o.library_loop);
            machine();
            dataplane::ingress_bench(&ctx, &o.ingress())?;
        }
        Command::Revoke(o) => {
            let ctx = procs::Ctx::new(o.flower.clone(), o.daemon_workers)?
                .with_runtime(o.library_runtime, o.library_loop);
            machine();
            revoke::revoke_bench(&ctx, &o.revoke())?;
        }
        Command::Syscalls(o) => {
            let ctx = procs::Ctx::new(o.flower.clone(), o.daemon_workers)?
                .with_runtime(o.library_runtime, o.library_loop);
            machine();
            syscalls::syscalls_bench(&ctx, o.strace_connects)?;
        }
        Command::Soak {
            opts,
            connects,
            soak_clients,
            hostile,
            seconds,
            hostile_uid,
        } => {
            let ctx = procs::Ctx::new(opts.flower.clone(), opts.daemon_workers)?
                .with_runtime(opts.library_runtime, opts.library_loop);
            machine();
            soak::soak_bench(
                &ctx,
                &soak::SoakOpts {
                    connects,
                    clients: soak_clients,
                    hostile,
                    seconds,
                    hostile_uid,
                },
            )?;
        }
        Command::SoakAttacker {
            path,
            threads,
            seconds,
        } => soak::attacker_main(&path, threads, seconds)?,
        Command::FloorBroker { path } => floor::broker_main(&path)?,
        Command::FloorServer { path } => floor::server_main(&path)?,
        Command::BlockingServer { path, label } => {
            blocking_peers::server_main(&path, &connect::parse_labels(&label)?)?
        }
        Command::Client {
            kind,
            target,
            label,
            iterations,
            warmup,
        } => connect::client_main(kind, &target, &label, iterations, warmup)?,
        Command::Serve {
            switchboard,
            label,
            tcp,
            fd,
            unix,
            backlog,
            behavior,
            chunk,
        } => {
            let source = match (&switchboard, &tcp, fd, &unix) {
                (Some(path), None, None, None) => Source::Switchboard(path, &label, backlog),
                (None, Some(address), None, None) => Source::Tcp(address),
                (None, None, Some(fd), None) => Source::Fd(fd),
                (None, None, None, Some(path)) => Source::Unix(path),
                _ => anyhow::bail!("serve needs exactly one of --switchboard, --tcp, --fd, --unix"),
            };
            dataplane::serve_main(source, behavior, chunk)?
        }
        Command::Filler { path, start, count } => connect::filler_main(&path, start, count)?,
        Command::Holder { path, count } => connect::holder_main(&path, count)?,
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flower-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
