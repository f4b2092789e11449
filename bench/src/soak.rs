//! `flower-bench soak`: many connects and many hostile clients against one daemon; its
//! descriptor count and resident memory must come back to where they started.
//!
//! A blocking server takes and closes every connection. First `--connects` connects
//! from `--clients` blocking clients; then, for `--seconds`, `--hostile` threads
//! attack while one bystander keeps connecting: Constrain and List floods whose
//! replies are never read, garbage datagrams, `O_PATH` descriptors passed as
//! connections, descriptor-slot mismatches, hang-ups mid-call. Figures: rates, the
//! bystander's failures and worst latency, descriptors and RSS at each stage.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use flower_proto::frame::Kind;
use flower_proto::switchboard as sb;
use flower_proto::transport;
use flower_proto::{Call, Fd, Frame, Labels};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use prost::Message;

use crate::blocking_peers::Client;
use crate::procs::Ctx;
use crate::stats;

pub struct SoakOpts {
    pub connects: usize,
    pub clients: usize,
    pub hostile: usize,
    pub seconds: u64,
    /// Run the hostile clients as this uid, in a helper process (needs root).
    pub hostile_uid: Option<u32>,
}

/// Runs `threads` attackers against `path` for `seconds`; returns the attacks made.
fn attack_for(path: &Path, threads: usize, seconds: u64) -> u64 {
    let stop = Arc::new(AtomicBool::new(false));
    let attacks = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..threads)
        .map(|i| {
            let (path, stop, attacks) = (path.to_owned(), stop.clone(), attacks.clone());
            std::thread::spawn(move || {
                let mut n = i as u64;
                while !stop.load(Ordering::Relaxed) {
                    let _ = attack(&path, n);
                    n += 1;
                    attacks.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    attacks.load(Ordering::Relaxed)
}

/// `flower-bench soak-attacker`: [`attack_for`], then prints `attacks N`.
pub fn attacker_main(path: &Path, threads: usize, seconds: u64) -> Result<()> {
    println!("ready");
    println!("attacks {}", attack_for(path, threads, seconds));
    Ok(())
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn rss_kib(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn call(id: u64, method: &str, message: Vec<u8>) -> Vec<u8> {
    Frame {
        kind: Some(Kind::Call(Call {
            id,
            method: method.into(),
            message,
        })),
    }
    .encode_to_vec()
}

const CONSTRAIN: &str = "/flower.protocol.switchboard.Switchboard/Constrain";
const LIST: &str = "/flower.protocol.switchboard.Switchboard/List";
const INGRESS_CONNECT: &str = "/flower.protocol.switchboard.Switchboard/IngressConnect";

fn send(fd: &OwnedFd, bytes: &[u8], with: &[&OwnedFd]) -> bool {
    let raw: Vec<i32> = with.iter().map(|f| f.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
    sendmsg::<()>(
        fd.as_raw_fd(),
        &[IoSlice::new(bytes)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .is_ok()
}

/// One attack of kind `n % 6` on a fresh connection, which is then dropped.
fn attack(path: &Path, n: u64) -> Result<()> {
    let fd = transport::connect_blocking(path, Some(Duration::from_millis(20)))?;
    match n % 6 {
        // Calls whose replies are never read, until the daemon stops reading.
        0 => {
            let frame = call(
                1,
                CONSTRAIN,
                sb::ConstrainRequest::default().encode_to_vec(),
            );
            for _ in 0..400 {
                if !send(&fd, &frame, &[]) {
                    break;
                }
            }
        }
        1 => {
            let frame = call(1, LIST, sb::ListRequest::default().encode_to_vec());
            for _ in 0..400 {
                if !send(&fd, &frame, &[]) {
                    break;
                }
            }
        }
        2 => {
            let garbage: Vec<u8> = (0..(n % 300 + 1)).map(|i| (i * 7 + n) as u8).collect();
            send(&fd, &garbage, &[]);
        }
        3 => {
            use std::os::unix::fs::OpenOptionsExt;
            let o_path = OwnedFd::from(
                std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_PATH)
                    .open(path)?,
            );
            let request = sb::IngressConnectRequest {
                client: Some(Fd { slot: 0 }),
                out_labels: Labels::new(),
            };
            send(
                &fd,
                &call(1, INGRESS_CONNECT, request.encode_to_vec()),
                &[&o_path],
            );
            let _ = transport::recv_blocking(fd.as_fd());
        }
        4 => {
            let null = OwnedFd::from(std::fs::File::open("/dev/null")?);
            let request = sb::IngressConnectRequest {
                client: Some(Fd { slot: 3 }),
                out_labels: Labels::new(),
            };
            send(
                &fd,
                &call(1, INGRESS_CONNECT, request.encode_to_vec()),
                &[&null, &null, &null, &null],
            );
        }
        // A call, then a hang-up before the reply.
        _ => {
            send(
                &fd,
                &call(1, LIST, sb::ListRequest::default().encode_to_vec()),
                &[],
            );
        }
    }
    Ok(())
}

pub fn soak_bench(ctx: &Ctx, o: &SoakOpts) -> Result<()> {
    let (daemon, path) = match o.hostile_uid {
        None => ctx.switchboard(false)?,
        // Another uid must be able to reach the socket.
        Some(_) => {
            let path = ctx.path("switchboard");
            let child = std::process::Command::new(&ctx.flower)
                .arg("switchboard")
                .arg(&path)
                .args(["--mode", "0666"])
                .env("RUST_LOG", "error")
                .stdin(std::process::Stdio::null())
                .spawn()?;
            crate::procs::wait_connectable(&path)?;
            (crate::procs::Proc::new("switchboard", child), path)
        }
    };
    let pid = daemon.pid();
    let labels: Labels = [("app".to_owned(), "soak".to_owned())].into();
    let (_server, _) = ctx.start_helper(
        "blocking server",
        &[
            "blocking-server",
            path.to_str().unwrap(),
            "--label",
            "app=soak",
        ],
        false,
    )?;
    let mut warm = Client::new(&path, &labels)?;
    for _ in 0..1_000 {
        warm.connect_once()?;
    }
    drop(warm);
    std::thread::sleep(Duration::from_millis(200));
    let (fd0, rss0) = (fds(pid), rss_kib(pid));
    let mut t = stats::Table::new(&["stage", "what", "daemon fds", "daemon RSS KiB"]);
    t.row(&[
        "baseline".into(),
        "after 1 000 warm-up connects".into(),
        fd0.to_string(),
        rss0.to_string(),
    ]);

    // Connects.
    let started = Instant::now();
    let per_client = o.connects / o.clients.max(1);
    let workers: Vec<_> = (0..o.clients)
        .map(|_| {
            let (path, labels) = (path.clone(), labels.clone());
            std::thread::spawn(move || -> Result<()> {
                let mut client = Client::new(&path, &labels)?;
                for _ in 0..per_client {
                    client.connect_once()?;
                }
                Ok(())
            })
        })
        .collect();
    for w in workers {
        w.join().expect("client thread")?;
    }
    let took = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    t.row(&[
        "connects".into(),
        format!(
            "{} connects by {} clients in {:.1} s ({} /s)",
            per_client * o.clients,
            o.clients,
            took.as_secs_f64(),
            stats::rate((per_client * o.clients) as f64 / took.as_secs_f64())
        ),
        fds(pid).to_string(),
        rss_kib(pid).to_string(),
    ]);

    // Hostile clients and a bystander.
    let stop = Arc::new(AtomicBool::new(false));
    let mut peak_fds = 0;
    let mut peak_rss = 0;
    let (hostile, seconds) = (o.hostile, o.seconds);
    let attackers: std::thread::JoinHandle<Result<u64>> = match o.hostile_uid {
        None => {
            let path = path.clone();
            std::thread::spawn(move || Ok(attack_for(&path, hostile, seconds)))
        }
        Some(uid) => {
            use std::os::unix::process::CommandExt;
            let mut cmd = ctx.helper(
                &[
                    "soak-attacker",
                    path.to_str().unwrap(),
                    "--threads",
                    &hostile.to_string(),
                    "--seconds",
                    &seconds.to_string(),
                ],
                false,
            );
            cmd.uid(uid)
                .gid(uid)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped());
            let mut proc = crate::procs::Proc::new("attacker", cmd.spawn()?);
            proc.read_ready()?;
            std::thread::spawn(move || {
                let line = proc.read_line()?;
                Ok(line
                    .strip_prefix("attacks ")
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or(0))
            })
        }
    };
    let bystander = {
        let (path, labels, stop) = (path.clone(), labels.clone(), stop.clone());
        std::thread::spawn(move || -> (u64, u64, Duration) {
            let (mut ok, mut failed, mut worst) = (0, 0, Duration::ZERO);
            let mut client = None;
            while !stop.load(Ordering::Relaxed) {
                let began = Instant::now();
                let c = match &mut client {
                    Some(c) => c,
                    None => match Client::new(&path, &labels) {
                        Ok(c) => client.insert(c),
                        Err(_) => {
                            failed += 1;
                            continue;
                        }
                    },
                };
                match c.connect_once() {
                    Ok(()) => ok += 1,
                    Err(_) => {
                        failed += 1;
                        client = None;
                    }
                }
                worst = worst.max(began.elapsed());
            }
            (ok, failed, worst)
        })
    };
    let end = Instant::now() + Duration::from_secs(o.seconds);
    while Instant::now() < end {
        peak_fds = peak_fds.max(fds(pid));
        peak_rss = peak_rss.max(rss_kib(pid));
        std::thread::sleep(Duration::from_millis(100));
    }
    let attacks = attackers.join().expect("attackers")?;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed, worst) = bystander.join().expect("bystander");
    t.row(&[
        "attack (peak)".into(),
        format!(
            "{} hostile threads{}, {} attacks in {} s; bystander {} connects, {} failed, worst {:.1} ms",
            o.hostile,
            o.hostile_uid.map(|u| format!(" as uid {u}")).unwrap_or_default(),
            attacks,
            o.seconds,
            ok,
            failed,
            worst.as_secs_f64() * 1e3
        ),
        peak_fds.to_string(),
        peak_rss.to_string(),
    ]);
    // Cut-off silent peers and freed replies take up to the send timeout (10 s).
    let began = Instant::now();
    let settle = began + Duration::from_secs(60);
    let mut said = Instant::now();
    while Instant::now() < settle && fds(pid) > fd0 {
        if said.elapsed() >= Duration::from_secs(5) {
            eprintln!(
                "settling: {} descriptors, {} KiB after {:?}",
                fds(pid),
                rss_kib(pid),
                began.elapsed()
            );
            said = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("settled after {:?}", began.elapsed());
    t.row(&[
        "after".into(),
        "attackers gone, settled".into(),
        fds(pid).to_string(),
        rss_kib(pid).to_string(),
    ]);
    t.print("Soak: connects and hostile clients against one daemon");
    Ok(())
}
