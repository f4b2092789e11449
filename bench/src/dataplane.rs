//! The data plane: once connected, Flower should cost nothing. Bulk throughput over a
//! switchboard-handed-out socketpair vs a plain socketpair, through an ingress-handed
//! TCP socket vs direct TCP (and a socat proxy for contrast); and the connect rate and
//! added latency of going through the ingress.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use flower_proto::client::{ServerOptions, Switchboard};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType};

use crate::connect::{Kind, bounded, parse_labels, run_clients};
use crate::procs::{self, Ctx, PATIENCE, Proc};
use crate::stats::{Table, rate, ratio, us};

/// What a `serve` helper does with each connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Behavior {
    /// Close it at once (the connect benchmarks).
    Drop,
    /// Read to end of stream, then answer the byte count as a little-endian u64.
    Sink,
    /// Read one byte, write it back, close.
    Echo,
}

/// Where a `serve` helper gets its connections.
pub enum Source<'a> {
    /// Register with the switchboard at this path under these labels (with
    /// `backlog`: answered as soon as a Connect is queued).
    Switchboard(&'a Path, &'a [String], bool),
    /// Listen on this Unix stream socket path.
    Unix(&'a Path),
    /// Listen on this TCP address (port 0: any); prints the bound address.
    Tcp(&'a str),
    /// One connection, already open as this descriptor (a socketpair end).
    Fd(i32),
}

/// `flower-bench serve`: say `ready [ADDRESS]`, then serve connections forever.
pub fn serve_main(source: Source, behavior: Behavior, chunk: usize) -> Result<()> {
    match source {
        Source::Fd(fd) => {
            println!("ready");
            // SAFETY: the parent handed us this descriptor, and nothing else uses it.
            handle(unsafe { OwnedFd::from_raw_fd(fd) }, behavior, chunk)
        }
        Source::Tcp(address) => {
            let listener = TcpListener::bind(address)?;
            println!("ready {}", listener.local_addr()?);
            loop {
                let (stream, _) = listener.accept()?;
                dispatch(stream.into(), behavior, chunk);
            }
        }
        Source::Unix(path) => {
            let listener = std::os::unix::net::UnixListener::bind(path)?;
            println!("ready");
            loop {
                let (stream, _) = listener.accept()?;
                dispatch(stream.into(), behavior, chunk);
            }
        }
        Source::Switchboard(path, labels, backlog) => {
            let labels = parse_labels(labels)?;
            let path = path.to_owned();
            crate::procs::run_library(async move {
                let sb = bounded(Switchboard::connect(&path)).await??;
                let options = ServerOptions { backlog };
                let mut server = bounded(sb.server_start_with(&labels, &options)).await??;
                println!("ready");
                while let Some(conn) = server.accept().await {
                    dispatch(conn.socket, behavior, chunk);
                }
                bail!("the switchboard closed the registration")
            })
        }
    }
}

/// Drop and echo are done inline (they are quick, and both the direct and the
/// Flower path pay the same); a sink, which lasts, gets its own thread.
fn dispatch(fd: OwnedFd, behavior: Behavior, chunk: usize) {
    if behavior == Behavior::Sink {
        std::thread::spawn(move || handle(fd, behavior, chunk));
    } else {
        let _ = handle(fd, behavior, chunk);
    }
}

fn handle(fd: OwnedFd, behavior: Behavior, chunk: usize) -> Result<()> {
    if behavior == Behavior::Drop {
        // No syscall but close(2), like the floor server.
        return Ok(());
    }
    // Any stream socket (Unix or TCP): plain read(2)/write(2) through a File.
    // Connections arrive blocking (socketpairs and the ingress's TCP sockets alike).
    set_recv_timeout(&fd, PATIENCE)?;
    let mut s = std::fs::File::from(fd);
    match behavior {
        Behavior::Drop => unreachable!(),
        Behavior::Echo => {
            let mut byte = [0];
            s.read_exact(&mut byte)?;
            s.write_all(&byte)?;
        }
        Behavior::Sink => {
            let mut buf = vec![0u8; chunk];
            let mut total = 0u64;
            loop {
                match s.read(&mut buf)? {
                    0 => break,
                    n => total += n as u64,
                }
            }
            s.write_all(&total.to_le_bytes())?;
        }
    }
    Ok(())
}

fn set_recv_timeout(fd: &OwnedFd, t: Duration) -> Result<()> {
    let tv = nix::sys::time::TimeVal::new(t.as_secs() as i64, 0);
    socket::setsockopt(fd, socket::sockopt::ReceiveTimeout, &tv)?;
    Ok(())
}

/// Writes `bytes` in `chunk`-sized writes, half-closes, and waits for the sink's count.
/// Returns GiB/s, timed from the first write to the sink's answer.
fn push(fd: OwnedFd, bytes: u64, chunk: usize) -> Result<f64> {
    set_recv_timeout(&fd, Duration::from_secs(120))?;
    let mut s = std::fs::File::from(fd);
    let buf = vec![0x5au8; chunk];
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk as u64) as usize;
        s.write_all(&buf[..n])?;
        left -= n as u64;
    }
    socket::shutdown(s.as_raw_fd(), socket::Shutdown::Write)?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count)
        .context("the sink did not answer")?;
    let elapsed = start.elapsed().as_secs_f64();
    if u64::from_le_bytes(count) != bytes {
        bail!(
            "the sink received {} of {bytes} bytes",
            u64::from_le_bytes(count)
        );
    }
    Ok(bytes as f64 / (1u64 << 30) as f64 / elapsed)
}

fn tcp(address: &str) -> Result<OwnedFd> {
    let addr = address.parse()?;
    let s = TcpStream::connect_timeout(&addr, PATIENCE)?;
    s.set_nodelay(true)?;
    Ok(s.into())
}

/// Options of the data-plane runs.
pub struct DataOpts {
    pub bytes: u64,
    pub chunk: usize,
    pub repeats: usize,
}

/// Median and spread of repeated throughput figures.
struct Throughput {
    median: f64,
    min: f64,
    max: f64,
}

impl Throughput {
    fn new(mut v: Vec<f64>) -> Throughput {
        v.sort_by(f64::total_cmp);
        Throughput {
            median: v[v.len() / 2],
            min: v[0],
            max: v[v.len() - 1],
        }
    }
}

/// Starts a socat TCP proxy on a free loopback port to `to`, if socat is installed.
fn socat(to: &str, chunk: usize) -> Result<Option<(Proc, String)>> {
    if !procs::on_path("socat") {
        return Ok(None);
    }
    // socat cannot report a port it picked: take a free one (a small race, fine here).
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let child = std::process::Command::new("socat")
        .arg("-b")
        .arg(chunk.to_string())
        .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork"))
        .arg(format!("TCP:{to}"))
        .stdin(std::process::Stdio::null())
        .spawn()?;
    let proc = Proc::new("socat", child);
    let address = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + PATIENCE;
    // The probe connection is forwarded and closed; the sink answers it with 0.
    while TcpStream::connect(&address).is_err() {
        if Instant::now() > deadline {
            bail!("socat did not listen on {address}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(Some((proc, address)))
}

/// Sends `bytes` over a fresh plain socketpair to a sink process (the baseline).
fn over_socketpair(ctx: &Ctx, o: &DataOpts, sink_cpu: Option<usize>) -> Result<f64> {
    let (mine, theirs) = socket::socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    let chunk = o.chunk.to_string();
    let mut cmd = ctx.helper_on(
        &[
            "serve",
            "--fd",
            "3",
            "--behavior",
            "sink",
            "--chunk",
            &chunk,
        ],
        sink_cpu,
    );
    let raw = theirs.as_raw_fd();
    // SAFETY: dup2/fcntl are async-signal-safe; the child gets the end as fd 3.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            if raw == 3 {
                libc::fcntl(3, libc::F_SETFD, 0);
            } else {
                libc::dup2(raw, 3);
            }
            Ok(())
        });
    }
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut sink = Proc::new("sink", cmd.spawn()?);
    drop(theirs);
    sink.read_ready()?;
    push(mine, o.bytes, o.chunk)
}

/// Every path is set up first; then the repeats go round all paths in turn, so that
/// a burst of background load does not land on one path only.
pub fn dataplane_bench(ctx: &Ctx, o: &DataOpts) -> Result<()> {
    eprintln!(
        "data plane: {} MiB in {} KiB writes, {} repeats",
        o.bytes >> 20,
        o.chunk >> 10,
        o.repeats
    );
    let chunk = o.chunk.to_string();
    // Throughput on a small machine swings with where the scheduler puts the writer
    // and the sink; fix it: the writer (this thread) on the first CPU, every sink on
    // the last, the same for all paths. The switchboard and ingress are not in the
    // data path and stay free.
    let cpus = procs::allowed_cpus();
    let (writer_cpu, sink_cpu) = match (cpus.first(), cpus.last()) {
        (Some(&w), Some(&s)) if w != s => (Some(w), Some(s)),
        _ => (None, None),
    };
    let (_daemon, path) = ctx.switchboard(false)?;
    let p = path.to_str().context("non-UTF-8 temp path")?;
    // One sink serves both the socketpairs of ClientConnect and the ingress's TCP.
    let (_sink, _) = ctx.start_helper_on(
        "sink",
        &[
            "serve",
            "--switchboard",
            p,
            "--label",
            "bench=sink",
            "--behavior",
            "sink",
            "--chunk",
            &chunk,
        ],
        sink_cpu,
    )?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let sb = rt.block_on(bounded(Switchboard::connect(&path)))??;
    let labels = parse_labels(&["bench=sink".into()])?;
    let (_tcp_sink, direct_addr) = ctx.start_helper_on(
        "tcp sink",
        &[
            "serve",
            "--tcp",
            "127.0.0.1:0",
            "--behavior",
            "sink",
            "--chunk",
            &chunk,
        ],
        sink_cpu,
    )?;
    let (_ingress, ingress_addr) = ctx.ingress(p, "bench=sink", false)?;
    let socat = socat(&direct_addr, o.chunk)?;

    type Path<'a> = (&'a str, Box<dyn Fn() -> Result<f64> + 'a>);
    let mut paths: Vec<Path> = vec![
        (
            "plain socketpair()",
            Box::new(|| over_socketpair(ctx, o, sink_cpu)),
        ),
        (
            "switchboard ClientConnect",
            Box::new(|| {
                let conn = rt.block_on(bounded(sb.client_connect(&labels)))??;
                push(conn.socket, o.bytes, o.chunk)
            }),
        ),
        (
            "direct TCP 127.0.0.1",
            Box::new(|| push(tcp(&direct_addr)?, o.bytes, o.chunk)),
        ),
        (
            "flower ingress (TCP)",
            Box::new(|| push(tcp(&ingress_addr)?, o.bytes, o.chunk)),
        ),
    ];
    if let Some((_, addr)) = &socat {
        paths.push((
            "socat TCP proxy",
            Box::new(|| push(tcp(addr)?, o.bytes, o.chunk)),
        ));
    }
    if let Some(cpu) = writer_cpu {
        procs::pin_to(cpu)?;
    }
    let mut figures: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let result = (|| {
        for r in 0..o.repeats.max(1) {
            for ((name, once), v) in paths.iter().zip(&mut figures) {
                eprintln!("  {name}, round {}", r + 1);
                v.push(once()?);
            }
        }
        anyhow::Ok(())
    })();
    // Processes started later (other benchmarks) must not inherit the writer's CPU.
    procs::pin_to_set(&cpus)?;
    result?;
    let results: Vec<Throughput> = figures.into_iter().map(Throughput::new).collect();

    let mut t = Table::new(&[
        "path",
        "GiB/s (median)",
        "min–max",
        "× baseline",
        "baseline",
    ]);
    // Unix paths compare with the socketpair, TCP paths with direct TCP.
    for (i, ((name, _), x)) in paths.iter().zip(&results).enumerate() {
        let (base, base_name) = match i {
            0 => (&results[0], "itself"),
            1 => (&results[0], "socketpair"),
            2 => (&results[2], "itself"),
            _ => (&results[2], "direct TCP"),
        };
        t.row(&[
            name.to_string(),
            format!("{:.2}", x.median),
            format!("{:.2}–{:.2}", x.min, x.max),
            ratio(x.median, base.median),
            base_name.into(),
        ]);
    }
    if socat.is_none() {
        println!("\n(socat not on PATH: the proxy contrast was skipped; apt-get install -y socat)");
    }
    t.print(&format!(
        "Bulk throughput, {} MiB in {} KiB writes, median of {}, writer on CPU {} and sink on CPU {}",
        o.bytes >> 20,
        o.chunk >> 10,
        o.repeats,
        writer_cpu.map_or("any".into(), |c| c.to_string()),
        sink_cpu.map_or("any".into(), |c| c.to_string()),
    ));
    Ok(())
}

/// Options of the ingress connect runs.
pub struct IngressOpts {
    pub iterations: usize,
    pub warmup: usize,
    pub clients: Vec<usize>,
}

/// Connects per second and latency (connect + 1-byte echo) through the ingress vs
/// straight to a TCP listener.
pub fn ingress_bench(ctx: &Ctx, o: &IngressOpts) -> Result<()> {
    eprintln!("ingress connect");
    let (_daemon, path) = ctx.switchboard(false)?;
    let p = path.to_str().context("non-UTF-8 temp path")?;
    let (_server, _) = ctx.start_helper(
        "echo server",
        &[
            "serve",
            "--switchboard",
            p,
            "--label",
            "bench=echo",
            "--behavior",
            "echo",
        ],
        false,
    )?;
    let (_ingress, ingress_addr) = ctx.ingress(p, "bench=echo", false)?;
    let (_direct, direct_addr) = ctx.start_helper(
        "tcp echo",
        &["serve", "--tcp", "127.0.0.1:0", "--behavior", "echo"],
        false,
    )?;
    let socat = socat(&direct_addr, 65536)?;
    let mut t = Table::new(&[
        "path",
        "clients",
        "connects/s",
        "× direct",
        "p50 µs",
        "× direct",
        "p99 µs",
        "× direct",
        "added p50 µs",
    ]);
    for &c in &o.clients {
        let run = |name: &str, addr: &str| {
            eprintln!("  {name}, {c} clients");
            run_clients(
                ctx,
                Kind::Tcp,
                addr,
                &[],
                c,
                o.iterations,
                o.warmup,
                false,
                || Ok(()),
            )
        };
        let direct = run("direct TCP", &direct_addr)?;
        let mut paths = vec![("flower ingress", run("flower ingress", &ingress_addr)?)];
        if let Some((_, addr)) = &socat {
            paths.push(("socat proxy (fork)", run("socat proxy", addr)?));
        }
        t.row(&[
            "direct TCP".into(),
            c.to_string(),
            rate(direct.per_sec),
            "1.00×".into(),
            us(direct.p50_us),
            "1.00×".into(),
            us(direct.p99_us),
            "1.00×".into(),
            "0".into(),
        ]);
        for (name, s) in paths {
            t.row(&[
                name.into(),
                c.to_string(),
                rate(s.per_sec),
                ratio(s.per_sec, direct.per_sec),
                us(s.p50_us),
                ratio(s.p50_us, direct.p50_us),
                us(s.p99_us),
                ratio(s.p99_us, direct.p99_us),
                us(s.p50_us - direct.p50_us),
            ]);
        }
    }
    t.print("Ingress: TCP connect + 1-byte echo, vs direct TCP");
    Ok(())
}
