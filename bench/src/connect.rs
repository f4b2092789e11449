//! Connect latency and rate: the switchboard against the floor, with concurrent
//! clients, with other targets registered, pinned to one CPU or free, and at scale
//! (100 000 idle handles and 100 000 targets).

use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use flower_proto::Labels;
use flower_proto::client::Switchboard;
use flower_proto::switchboard::Right;

use crate::procs::{self, Ctx, PATIENCE, Proc};
use crate::stats::{Summary, Table, now_ns, rate, ratio, us};
use crate::{blocking_peers, floor};

/// The labels of the measured target; fillers say `bench=filler`, so they contradict.
pub const TARGET: &str = "bench=target";
/// The same target served by the library's blocking server ([`blocking_peers`]).
pub const BLOCKING_TARGET: &str = "bench=blocking";
/// The same, served by the client library registered with `backlog` (the client is
/// answered once the server's Connect is queued).
pub const BACKLOG_TARGET: &str = "bench=backlog";

/// What a client process connects to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// The floor broker at a Unix path.
    Floor,
    /// A `flower switchboard` at a Unix path, `ClientConnect` by labels.
    Switchboard,
    /// The same, from the library's blocking client.
    Blocking,
    /// A TCP address: connect, write 1 byte, read the 1-byte echo.
    Tcp,
    /// A plain Unix stream socket path: `connect()` to it (a server `accept()`s), no
    /// broker at all. What a user does without Flower.
    Direct,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Floor => "floor",
            Kind::Switchboard => "switchboard",
            Kind::Blocking => "blocking",
            Kind::Tcp => "tcp",
            Kind::Direct => "direct",
        }
    }
}

/// `key=value` words into labels.
/// `key=value` words, parsed as every `flower` command parses them.
pub fn parse_labels(words: &[String]) -> Result<Labels> {
    Ok(flower_tools::args::parse_labels(words)?)
}

// ---------------------------------------------------------------- client process

/// `flower-bench client`: warm up, say ready, wait for `go` on stdin, run
/// `iterations` connects, print `result START END` and the latencies (ns).
pub fn client_main(
    kind: Kind,
    target: &str,
    labels: &[String],
    iterations: usize,
    warmup: usize,
) -> Result<()> {
    match kind {
        Kind::Floor => {
            let broker = floor::client(Path::new(target))?;
            timed(iterations, warmup, || floor::connect_once(&broker))
        }
        Kind::Blocking => {
            let mut client =
                blocking_peers::Client::new(Path::new(target), &parse_labels(labels)?)?;
            timed(iterations, warmup, || client.connect_once())
        }
        Kind::Tcp => {
            let addr: SocketAddr = target.parse()?;
            timed(iterations, warmup, || tcp_round_trip(addr))
        }
        Kind::Direct => timed(iterations, warmup, || {
            // Like the others, measured until the client holds a usable descriptor.
            drop(std::os::unix::net::UnixStream::connect(target)?);
            Ok(())
        }),
        Kind::Switchboard => {
            let labels = parse_labels(labels)?;
            let target = target.to_owned();
            procs::run_library(async move {
                let sb = bounded(Switchboard::connect(Path::new(&target))).await??;
                // Bounded by a watchdog rather than a timer per connect: the floor's
                // client pays nothing per connect for its bound (a socket timeout set
                // once), so neither does this one.
                let progress = watchdog(PATIENCE);
                let once = || async {
                    // The connection is closed at once: only the hand-out is measured.
                    sb.client_connect(&labels).await?;
                    progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    anyhow::Ok(())
                };
                for _ in 0..warmup {
                    once().await?;
                }
                ready_and_wait()?;
                // The whole timed loop runs inside one block_on: no runtime re-entry
                // per connect.
                let mut latencies = Vec::with_capacity(iterations);
                let start = now_ns();
                for _ in 0..iterations {
                    let t = now_ns();
                    once().await?;
                    latencies.push(now_ns() - t);
                }
                report(start, now_ns(), &latencies)
            })
        }
    }
}

/// Ends the process with an error when the returned counter has not moved for
/// `patience`: a stuck switchboard fails the run instead of hanging it.
pub fn watchdog(patience: Duration) -> Arc<AtomicU64> {
    let progress = Arc::new(AtomicU64::new(0));
    let seen = progress.clone();
    std::thread::spawn(move || {
        let (mut last, mut since) = (u64::MAX, Instant::now());
        loop {
            std::thread::sleep(Duration::from_millis(250));
            let now = seen.load(std::sync::atomic::Ordering::Relaxed);
            if now != last {
                (last, since) = (now, Instant::now());
            } else if since.elapsed() > patience {
                eprintln!("flower-bench: no connect finished within {patience:?}");
                std::process::exit(1);
            }
        }
    });
    progress
}

/// Bounds a client-side wait, so a stuck switchboard fails the run instead of hanging it.
pub async fn bounded<F: std::future::Future>(f: F) -> Result<F::Output> {
    tokio::time::timeout(PATIENCE, f)
        .await
        .with_context(|| format!("no answer within {PATIENCE:?}"))
}

fn timed(iterations: usize, warmup: usize, mut once: impl FnMut() -> Result<()>) -> Result<()> {
    for _ in 0..warmup {
        once()?;
    }
    ready_and_wait()?;
    let mut latencies = Vec::with_capacity(iterations);
    let start = now_ns();
    for _ in 0..iterations {
        let t = now_ns();
        once()?;
        latencies.push(now_ns() - t);
    }
    report(start, now_ns(), &latencies)
}

/// TCP connect alone completes in the kernel's backlog, before any proxy forwards
/// the socket; a 1-byte round trip measures the real path.
fn tcp_round_trip(addr: SocketAddr) -> Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, PATIENCE)?;
    s.set_read_timeout(Some(PATIENCE))?;
    s.write_all(&[7])?;
    let mut byte = [0];
    s.read_exact(&mut byte)?;
    Ok(())
}

fn ready_and_wait() -> Result<()> {
    println!("ready");
    let mut go = String::new();
    std::io::stdin().lock().read_line(&mut go)?;
    if go.trim() != "go" {
        bail!("expected go, got {go:?}");
    }
    Ok(())
}

fn report(start: u64, end: u64, latencies: &[u64]) -> Result<()> {
    let mut out = format!("result {start} {end}\n");
    for l in latencies {
        out.push_str(&l.to_string());
        out.push(' ');
    }
    out.push('\n');
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(out.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

/// Runs `clients` client processes doing `total` connects between them, started
/// together; `before_go` runs once all are warmed up (e.g. to attach strace).
#[allow(clippy::too_many_arguments)]
pub fn run_clients(
    ctx: &Ctx,
    kind: Kind,
    target: &str,
    labels: &[&str],
    clients: usize,
    total: usize,
    warmup: usize,
    pinned: bool,
    before_go: impl FnOnce() -> Result<()>,
) -> Result<Summary> {
    let each = total.div_ceil(clients).max(1);
    let mut procs = Vec::new();
    for i in 0..clients {
        let (iterations, warmup) = (each.to_string(), warmup.to_string());
        let mut args = vec![
            "client",
            "--kind",
            kind.name(),
            "--target",
            target,
            "--iterations",
            &iterations,
            "--warmup",
            &warmup,
        ];
        for l in labels {
            args.extend(["--label", l]);
        }
        let mut cmd = ctx.helper(&args, pinned);
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped());
        procs.push(Proc::new(&format!("client {i}"), cmd.spawn()?));
    }
    for p in &mut procs {
        p.read_ready()?;
    }
    before_go()?;
    for p in &mut procs {
        p.write_line("go")?;
    }
    let (mut first, mut last, mut latencies) = (u64::MAX, 0, Vec::new());
    for p in &mut procs {
        let head = p.read_line()?;
        let mut times = head
            .strip_prefix("result ")
            .context("bad client result")?
            .split(' ')
            .map(str::parse::<u64>);
        first = first.min(times.next().context("no start")??);
        last = last.max(times.next().context("no end")??);
        for l in p.read_line()?.split_whitespace() {
            latencies.push(l.parse()?);
        }
    }
    Ok(Summary::new(latencies, last - first))
}

// ---------------------------------------------------------------- helper processes

/// `flower-bench filler PATH`: registers `count` servers `{bench=filler, pod=pod-i}`
/// and keeps them registered until killed.
pub fn filler_main(path: &Path, start: usize, count: usize) -> Result<()> {
    hold(path, count, move |sb, i| async move {
        let labels = Labels::from([
            ("bench".into(), "filler".into()),
            ("pod".into(), format!("pod-{}", start + i)),
        ]);
        Ok(Box::new(sb.server_start(&labels).await?) as Box<dyn Send>)
    })
}

/// `flower-bench holder PATH`: holds `count` idle handles derived with Constrain.
pub fn holder_main(path: &Path, count: usize) -> Result<()> {
    hold(path, count, |sb, i| async move {
        let out = Labels::from([("holder".into(), format!("h-{i}"))]);
        let handle = sb
            .constrain(&[Right::ClientConnect], &Labels::new(), &out)
            .await?;
        Ok(Box::new(handle) as Box<dyn Send>)
    })
}

/// Makes `count` objects with pipelined calls (batches of 128, the switchboard's
/// per-channel concurrency), says ready, and keeps them alive until killed.
fn hold<F, Fut>(path: &Path, count: usize, make: F) -> Result<()>
where
    F: Fn(Switchboard, usize) -> Fut,
    Fut: std::future::Future<Output = Result<Box<dyn Send>>> + Send + 'static,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let sb = bounded(Switchboard::connect(path)).await??;
        let mut kept = Vec::with_capacity(count);
        let mut i = 0;
        while i < count {
            let mut batch = tokio::task::JoinSet::new();
            for j in i..(i + 128).min(count) {
                batch.spawn(bounded(make(sb.clone(), j)));
            }
            while let Some(made) = batch.join_next().await {
                kept.push(made???);
            }
            i += 128;
        }
        println!("ready {}", kept.len());
        std::future::pending::<()>().await;
        Ok(())
    })
}

// ---------------------------------------------------------------- orchestration

/// Options of the connect runs.
pub struct Opts {
    pub iterations: usize,
    pub warmup: usize,
    pub rounds: usize,
    pub clients: Vec<usize>,
    pub targets: Vec<usize>,
    pub pinned: Vec<bool>,
}

/// A floor broker and server, ready for clients at the returned path.
pub fn start_floor(ctx: &Ctx, pinned: bool) -> Result<(Proc, Proc, String)> {
    let path = ctx.path("floor");
    let p = path.to_str().context("non-UTF-8 temp path")?;
    let (broker, _) = ctx.start_helper("floor broker", &["floor-broker", p], pinned)?;
    let (server, _) = ctx.start_helper("floor server", &["floor-server", p], pinned)?;
    Ok((broker, server, p.to_owned()))
}

/// A switchboard and its measured targets: [`TARGET`] served by the client library
/// (a `serve` helper) and [`BLOCKING_TARGET`] by a `blocking-server`.
pub struct RunningSwitchboard {
    pub daemon: Proc,
    pub servers: [Proc; 4],
    pub path: String,
    /// A plain Unix listener's path, for the direct-connect rows.
    pub direct: String,
}

pub fn start_switchboard(ctx: &Ctx, pinned: bool) -> Result<RunningSwitchboard> {
    let (daemon, path) = ctx.switchboard(pinned)?;
    let p = path.to_str().context("non-UTF-8 temp path")?.to_owned();
    let (server, _) = ctx.start_helper(
        "server",
        &["serve", "--switchboard", &p, "--label", TARGET],
        pinned,
    )?;
    let (blocking_server, _) = ctx.start_helper(
        "blocking server",
        &["blocking-server", &p, "--label", BLOCKING_TARGET],
        pinned,
    )?;
    let (backlog_server, _) = ctx.start_helper(
        "backlog server",
        &[
            "serve",
            "--switchboard",
            &p,
            "--label",
            BACKLOG_TARGET,
            "--backlog",
        ],
        pinned,
    )?;
    let direct = ctx.path("direct");
    let direct = direct.to_str().context("non-UTF-8 temp path")?.to_owned();
    let (direct_server, _) =
        ctx.start_helper("direct server", &["serve", "--unix", &direct], pinned)?;
    Ok(RunningSwitchboard {
        daemon,
        servers: [server, blocking_server, backlog_server, direct_server],
        path: p,
        direct,
    })
}

/// Registers fillers `start..start+count` in a helper process.
pub fn start_filler(
    ctx: &Ctx,
    path: &str,
    start: usize,
    count: usize,
    pinned: bool,
) -> Result<Proc> {
    let (s, c) = (start.to_string(), count.to_string());
    let (p, _) = ctx.start_helper(
        "filler",
        &["filler", path, "--start", &s, "--count", &c],
        pinned,
    )?;
    Ok(p)
}

/// The floor and the switchboard, measured in alternating rounds under the same
/// conditions; each side's figures are the medians over the rounds, which keeps a
/// burst of background load from landing on one side only. The switchboard is
/// measured twice: with the client library's peers, and with blocking peers like the
/// floor's, which isolates the broker.
pub struct Pair<'a> {
    pub ctx: &'a Ctx,
    pub opts: &'a Opts,
    pub floor: &'a str,
    pub switchboard: &'a str,
    pub direct: &'a str,
    pub pinned: bool,
}

impl Pair<'_> {
    pub fn measure(&self, clients: usize) -> Result<Measured> {
        let o = self.opts;
        let per_round = (o.iterations / o.rounds.max(1)).max(1);
        let (mut floor, mut flower, mut blocking) = (Vec::new(), Vec::new(), Vec::new());
        let (mut backlog, mut direct) = (Vec::new(), Vec::new());
        for _ in 0..o.rounds.max(1) {
            let run = |kind, path, labels: &[&str]| {
                run_clients(
                    self.ctx,
                    kind,
                    path,
                    labels,
                    clients,
                    per_round,
                    o.warmup,
                    self.pinned,
                    || Ok(()),
                )
            };
            floor.push(run(Kind::Floor, self.floor, &[])?);
            flower.push(run(Kind::Switchboard, self.switchboard, &[TARGET])?);
            blocking.push(run(Kind::Blocking, self.switchboard, &[BLOCKING_TARGET])?);
            backlog.push(run(Kind::Switchboard, self.switchboard, &[BACKLOG_TARGET])?);
            direct.push(run(Kind::Direct, self.direct, &[])?);
        }
        Ok(Measured {
            floor: Summary::median(&floor),
            library: Summary::median(&flower),
            blocking: Summary::median(&blocking),
            backlog: Summary::median(&backlog),
            direct: Summary::median(&direct),
        })
    }
}

/// One paired measurement: the floor and the switchboard with each kind of peers.
pub struct Measured {
    pub floor: Summary,
    pub library: Summary,
    pub blocking: Summary,
    /// Library peers, the server registered with `backlog`.
    pub backlog: Summary,
    /// No broker: a plain Unix `connect()` to a listening path.
    pub direct: Summary,
}

impl Measured {
    /// The table rows, library peers first, the direct path last.
    fn rows(&self, table: &mut Table, mode: &str, clients: usize, targets: &str) {
        for (peers, s) in [
            ("library", &self.library),
            ("blocking", &self.blocking),
            ("library+backlog", &self.backlog),
            ("direct unix", &self.direct),
        ] {
            table.row(&row(mode, peers, clients, targets, &self.floor, s));
        }
    }
}

fn mode_name(pinned: bool) -> &'static str {
    if pinned { "pinned" } else { "free" }
}

/// Header shared by the connect tables.
const HEADERS: &[&str] = &[
    "mode",
    "peers",
    "clients",
    "other targets",
    "floor connects/s",
    "connects/s",
    "× floor",
    "floor p50 µs",
    "p50 µs",
    "× floor",
    "floor p99 µs",
    "p99 µs",
    "× floor",
];

fn row(
    mode: &str,
    peers: &str,
    clients: usize,
    targets: &str,
    f: &Summary,
    s: &Summary,
) -> Vec<String> {
    vec![
        mode.into(),
        peers.into(),
        clients.to_string(),
        targets.into(),
        rate(f.per_sec),
        rate(s.per_sec),
        ratio(s.per_sec, f.per_sec),
        us(f.p50_us),
        us(s.p50_us),
        ratio(s.p50_us, f.p50_us),
        us(f.p99_us),
        us(s.p99_us),
        ratio(s.p99_us, f.p99_us),
    ]
}

/// Descriptors kept free for everything but the fillers' registrations.
const FD_MARGIN: usize = 2_000;

/// The target counts to register, in increasing order, capped to what the descriptor
/// limit allows: the switchboard holds one descriptor per registered target.
fn capped_targets(wanted: &[usize]) -> Vec<usize> {
    let max = wanted.iter().copied().max().unwrap_or(0);
    let limit = procs::raise_nofile((max + FD_MARGIN) as u64) as usize;
    let room = limit.saturating_sub(FD_MARGIN);
    let mut targets: Vec<usize> = wanted
        .iter()
        .map(|&n| n.min(room))
        .filter(|&n| n > 0)
        .collect();
    targets.sort_unstable();
    targets.dedup();
    // Said once, though each mode asks.
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if max > room && !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
        println!(
            "\nNote: RLIMIT_NOFILE allows {limit} descriptors per process and may not be raised \
             here (no CAP_SYS_RESOURCE); other targets capped at {room} instead of {max}."
        );
    }
    targets
}

/// The connect matrix: for each mode, the switchboard with only the target, then
/// with more and more other targets registered; each row paired with the floor.
pub fn connect_bench(ctx: &Ctx, o: &Opts) -> Result<()> {
    let mut table = Table::new(HEADERS);
    for &pinned in &o.pinned {
        let mode = mode_name(pinned);
        eprintln!("connect, {mode}");
        let (_broker, _floor_server, floor) = start_floor(ctx, pinned)?;
        let sb = start_switchboard(ctx, pinned)?;
        let switchboard = &sb.path;
        let pair = Pair {
            ctx,
            opts: o,
            floor: &floor,
            switchboard,
            direct: &sb.direct,
            pinned,
        };
        for &c in &o.clients {
            eprintln!("  {c} clients");
            pair.measure(c)?.rows(&mut table, mode, c, "0");
        }
        // Fillers are added incrementally; each helper stays alive until the end.
        let mut fillers = Vec::new();
        let mut registered = 0;
        for n in capped_targets(&o.targets) {
            let t0 = std::time::Instant::now();
            fillers.push(start_filler(
                ctx,
                switchboard,
                registered,
                n - registered,
                pinned,
            )?);
            eprintln!("  registered {n} other targets in {:?}", t0.elapsed());
            registered = n;
            for &c in &o.clients {
                eprintln!("  {n} other targets, {c} clients");
                pair.measure(c)?.rows(&mut table, mode, c, &n.to_string());
            }
        }
    }
    table.print("Switchboard connect vs the floor (paired rounds, same mode and client count)");
    Ok(())
}

/// Options of the scale run.
pub struct ScaleOpts {
    pub handles: usize,
    pub targets: usize,
}

/// Idle handles and targets by the hundred thousand in one switchboard: memory per
/// handle and per target, and connect figures with that load in place.
pub fn scale_bench(ctx: &Ctx, o: &Opts, s: &ScaleOpts) -> Result<()> {
    // The switchboard holds one descriptor per handle and per target, the holder and
    // the filler one per object they keep; all inherit our limit.
    let wanted = (s.handles + s.targets + FD_MARGIN) as u64;
    let limit = procs::raise_nofile(wanted);
    let (mut handles, mut targets) = (s.handles, s.targets);
    if limit < wanted {
        let room = (limit as usize).saturating_sub(FD_MARGIN);
        let scale = room as f64 / (handles + targets).max(1) as f64;
        handles = (handles as f64 * scale) as usize;
        targets = (targets as f64 * scale) as usize;
        println!(
            "\nNote: RLIMIT_NOFILE allows {limit} descriptors per process and may not be \
             raised here (no CAP_SYS_RESOURCE); scale capped to {handles} handles and \
             {targets} targets in one switchboard."
        );
    }
    eprintln!("scale: {handles} handles, {targets} targets");
    let (_broker, _floor_server, floor) = start_floor(ctx, false)?;
    let sb = start_switchboard(ctx, false)?;
    let (daemon, switchboard) = (&sb.daemon, &sb.path);
    let pair = Pair {
        ctx,
        opts: o,
        floor: &floor,
        switchboard,
        direct: &sb.direct,
        pinned: false,
    };
    let mut table = Table::new(HEADERS);
    for &c in &o.clients {
        eprintln!("  no load, {c} clients");
        pair.measure(c)?.rows(&mut table, "free, no load", c, "0");
    }
    let rss0 = procs::vm_rss_kib(daemon.pid())?;
    let t0 = std::time::Instant::now();
    let _filler = start_filler(ctx, switchboard, 0, targets, false)?;
    let filler_time = t0.elapsed();
    let rss1 = procs::vm_rss_kib(daemon.pid())?;
    let t0 = std::time::Instant::now();
    let (_holder, held) = ctx.start_helper(
        "holder",
        &["holder", switchboard, "--count", &handles.to_string()],
        false,
    )?;
    let holder_time = t0.elapsed();
    let rss2 = procs::vm_rss_kib(daemon.pid())?;
    eprintln!("  registered in {filler_time:?}, {held} handles in {holder_time:?}");
    for &c in &o.clients {
        eprintln!("  under load, {c} clients");
        let load = format!("free, {handles} handles");
        pair.measure(c)?
            .rows(&mut table, &load, c, &targets.to_string());
    }
    let per = |delta: i64, n: usize| {
        if n == 0 {
            "–".to_owned()
        } else {
            format!("{:.2}", delta as f64 / n as f64)
        }
    };
    let (d1, d2) = (rss1 as i64 - rss0 as i64, rss2 as i64 - rss1 as i64);
    let mut mem = Table::new(&["switchboard VmRSS", "KiB", "Δ KiB", "n", "KiB each"]);
    mem.row(&[
        "target server only".into(),
        rss0.to_string(),
        "".into(),
        "".into(),
        "".into(),
    ]);
    mem.row(&[
        format!(
            "+ {targets} targets (registered in {:.1} s)",
            filler_time.as_secs_f64()
        ),
        rss1.to_string(),
        d1.to_string(),
        targets.to_string(),
        per(d1, targets),
    ]);
    mem.row(&[
        format!(
            "+ {handles} idle handles (made in {:.1} s)",
            holder_time.as_secs_f64()
        ),
        rss2.to_string(),
        d2.to_string(),
        handles.to_string(),
        per(d2, handles),
    ]);
    mem.print("Switchboard memory at scale");
    table.print("Connect under load vs the floor (free mode, paired rounds)");
    Ok(())
}
