//! The capability boundary against a hostile local process: each test is an attack
//! that once worked. After each, a bystander handle still works and the daemon's
//! descriptor count is back to its baseline.

mod common;

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use common::*;
use flower_proto::client::Switchboard;
use flower_proto::switchboard as sb;
use flower_proto::switchboard::Right;
use flower_proto::{Code, Fd, Labels};
use prost::Message;

const INGRESS_CONNECT: &str = "/flower.protocol.switchboard.Switchboard/IngressConnect";
const CONSTRAIN: &str = "/flower.protocol.switchboard.Switchboard/Constrain";
const LIST: &str = "/flower.protocol.switchboard.Switchboard/List";
const CLIENT_CONNECT: &str = "/flower.protocol.switchboard.Switchboard/ClientConnect";
const SERVER_START: &str = "/flower.protocol.switchboard.Switchboard/ServerStart";

/// An `O_PATH` descriptor of `path`: `fstat` calls it a socket when `path` is one.
fn o_path(path: &std::path::Path) -> OwnedFd {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(path)
        .unwrap();
    OwnedFd::from(file)
}

/// A bystander's call still goes through.
async fn bystander_works(bystander: &Switchboard) {
    let err = tokio::time::timeout(
        PATIENCE,
        bystander.client_connect(&labels(&[("app", "nothing")])),
    )
    .await
    .expect("bystander answered in time")
    .unwrap_err();
    assert_eq!(err.code, Code::NotFound, "bystander still served");
}

/// IngressConnect with an `O_PATH` descriptor of the switchboard's own socket file:
/// a server that got it could connect through `/proc/self/fd/N` to a full handle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_o_path_descriptor_is_not_a_connection() {
    let daemon = Daemon::start();
    let bystander = daemon.connect().await;
    let mut server = bystander
        .server_start(&labels(&[("app", "victim")]))
        .await
        .unwrap();
    let baseline = daemon.baseline(&bystander).await;

    let ch = raw_connect(&daemon.path).await;
    let request = sb::IngressConnectRequest {
        client: Some(Fd { slot: 0 }),
        out_labels: labels(&[("app", "victim")]),
    };
    send_raw(
        &ch,
        &call_frame(1, INGRESS_CONNECT, request.encode_to_vec()),
        &[o_path(&daemon.path)],
    )
    .await;
    let (reply, _) = recv_reply(&ch).await.unwrap();
    assert_eq!(Code::from_i32(reply.code), Code::InvalidArgument);
    assert_eq!(
        reply.error,
        "Descriptor field client is not a SOCK_STREAM socket of AF_UNIX, AF_INET or AF_INET6"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), server.accept())
            .await
            .is_err(),
        "the server must not be offered the descriptor"
    );
    // A SEQPACKET socket is a socket, but not a connection either.
    let (seqpacket, _other) = flower_proto::transport::seqpacket_pair().unwrap();
    send_raw(
        &ch,
        &call_frame(2, INGRESS_CONNECT, request.encode_to_vec()),
        &[seqpacket],
    )
    .await;
    let (reply, _) = recv_reply(&ch).await.unwrap();
    assert_eq!(Code::from_i32(reply.code), Code::InvalidArgument);
    drop(ch);
    bystander_works(&bystander).await;
    daemon.settle_fds(baseline).await;
}

/// An egress that answers with an `O_PATH` descriptor of the switchboard's socket:
/// the client must get an error, not the descriptor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_egress_cannot_hand_out_an_o_path_descriptor() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let baseline = daemon.baseline(&root).await;
    let hostile = root
        .constrain(
            &[Right::EgressStart],
            &labels(&[("kind", "egress")]),
            &Labels::new(),
        )
        .await
        .unwrap();
    let mut egress = hostile.egress_start(&Labels::new()).await.unwrap();
    let path = daemon.path.clone();
    let answering = tokio::spawn(async move {
        while let Some(request) = egress.next().await {
            request.respond(Ok(o_path(&path)));
        }
    });
    let err = tokio::time::timeout(
        PATIENCE,
        root.client_connect(&labels(&[("kind", "egress")])),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert_eq!(err.code, Code::Internal, "{err}");
    assert!(err.message.contains("Egress replied badly"), "{err}");
    answering.abort();
    let _ = answering.await;
    drop(hostile);
    // The egress target goes with its registration; until the switchboard has seen
    // that, the bystander's labels would still match it.
    wait_until_async("the egress target to go", || async {
        list(&root, &Labels::new()).await.is_empty()
    })
    .await;
    bystander_works(&root).await;
    daemon.settle_fds(baseline).await;
}

/// Kills a tool process on drop.
struct Tool(std::process::Child);

impl Drop for Tool {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Counts connections accepted on `listener` until `stop`.
fn count_accepts(
    listener: std::os::unix::net::UnixListener,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    use std::sync::atomic::Ordering;
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok(_) => n += 1,
                Err(_) => std::thread::sleep(Duration::from_micros(200)),
            }
        }
        n
    })
}

/// A process that can write under the allowed prefix swaps a directory and a
/// symlink to outside it (`renameat2(RENAME_EXCHANGE)`) as fast as it can while
/// connects name a socket in that directory: none may reach the socket outside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_unix_paths_cannot_be_swapped_out_of_the_prefix() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let top = daemon.dir.path();
    let allowed = top.join("allowed");
    let outside = top.join("outside");
    std::fs::create_dir_all(allowed.join("d")).unwrap();
    std::fs::create_dir(&outside).unwrap();
    std::os::unix::fs::symlink("../outside", allowed.join("link")).unwrap();
    let inside = std::os::unix::net::UnixListener::bind(allowed.join("d/s")).unwrap();
    let escaped = std::os::unix::net::UnixListener::bind(outside.join("s")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let inside = count_accepts(inside, stop.clone());
    let escaped = count_accepts(escaped, stop.clone());

    let _egress = Tool(
        std::process::Command::new(FLOWER)
            .args(["egress", "connect", "--allow-unix-prefix"])
            .arg(&allowed)
            .arg(&daemon.path)
            .arg("net=unix")
            .env("RUST_LOG", "error")
            .spawn()
            .unwrap(),
    );
    wait_until_async("egress registration", || async {
        list(&root, &labels(&[("net", "unix")])).await.len() == 1
    })
    .await;

    let swapper = {
        let (a, b, stop) = (allowed.join("d"), allowed.join("link"), stop.clone());
        std::thread::spawn(move || {
            let mut swaps = 0u64;
            while !stop.load(Ordering::Relaxed) {
                nix::fcntl::renameat2(None, &a, None, &b, nix::fcntl::RenameFlags::RENAME_EXCHANGE)
                    .unwrap();
                swaps += 1;
            }
            swaps
        })
    };
    let target = labels(&[
        ("net", "unix"),
        ("address_family", "unix"),
        ("server_path", allowed.join("d/s").to_str().unwrap()),
    ]);
    let (mut attempts, mut refused) = (0, 0);
    let end = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < end {
        attempts += 1;
        match root.client_connect(&target).await {
            Ok(_) => {}
            Err(e) if e.code == Code::PermissionDenied => refused += 1,
            Err(_) => {}
        }
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    let (inside, escaped) = (inside.join().unwrap(), escaped.join().unwrap());
    eprintln!(
        "{attempts} connects, {swaps} swaps: {inside} inside, {refused} refused, {escaped} escaped"
    );
    assert_eq!(escaped, 0, "a connect escaped the allowed prefix");
    assert!(inside > 0 && refused > 0, "both outcomes should occur");
}

// ---- descriptors and memory a client may pin ----

const NOBODY: u32 = 65_534;

/// A command that starts `program` as `uid` even when the directories above it (a
/// 0700 checkout or temp dir) are closed to that uid: it is executed through
/// `/proc/self/fd/N` of a descriptor opened here, so no directory is searched. Keep
/// the returned file until the child has started.
fn command_as(
    program: &std::path::Path,
    name: &str,
    uid: u32,
) -> (Option<std::fs::File>, std::process::Command) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let file = std::fs::File::open(program).expect("open the program");
    let mut command = std::process::Command::new(format!("/proc/self/fd/{}", file.as_raw_fd()));
    command.arg0(name).uid(uid).gid(uid);
    (Some(file), command)
}
const ATTACK_ENV: &str = "FLOWER_HARDENING_ATTACK";

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The daemon's resident set, in KiB.
fn rss_kib(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A daemon started as `uid` (when we are root; else as ourselves) with `extra`
/// flags, on a socket anyone may connect to.
/// A bystander's handle with a server registered at `app=web` that takes and drops
/// every connection, and the daemon's descriptor baseline after that.
async fn serving_bystander(daemon: &Daemon) -> (Switchboard, usize) {
    let bystander = daemon.connect().await;
    let mut server = bystander
        .server_start(&labels(&[("app", "web")]))
        .await
        .unwrap();
    tokio::spawn(async move { while server.accept().await.is_some() {} });
    let baseline = daemon.baseline(&bystander).await;
    (bystander, baseline)
}

fn daemon_as(uid: Option<u32>, extra: &[&str]) -> Daemon {
    use std::os::unix::fs::PermissionsExt;
    raise_nofile_limit();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let path = dir.path().join("switchboard");
    let (_program, mut command) = match uid.filter(|_| is_root()) {
        Some(uid) => command_as(std::path::Path::new(FLOWER), "flower", uid),
        None => (None, std::process::Command::new(FLOWER)),
    };
    command
        .arg("switchboard")
        .arg(&path)
        .args(["--mode", "0666"])
        .args(extra)
        .env("RUST_LOG", "error")
        .stdin(std::process::Stdio::null());
    let child = command.spawn().expect("start flower switchboard");
    let daemon = Daemon { child, path, dir };
    wait_until("switchboard socket", || daemon.path.exists());
    std::thread::sleep(Duration::from_millis(100));
    daemon
}

/// The attacker, run in a child process (as another uid when we are root): 16
/// channels that send Constrain calls and never read a reply, then one more
/// connection whose first call must be refused with a clear error. Prints
/// `REFUSED <code> <message>` and waits to be killed, holding everything.
#[test]
#[ignore = "run by exhausting_descriptors_hurts_only_the_attacker in a child process"]
fn attacker() {
    let Ok(path) = std::env::var(ATTACK_ENV) else {
        return;
    };
    let path = std::path::PathBuf::from(path);
    let frame = call_frame(
        1,
        CONSTRAIN,
        sb::ConstrainRequest::default().encode_to_vec(),
    );
    let mut held = Vec::new();
    for _ in 0..16 {
        let fd = flower_proto::transport::connect_blocking(&path, Some(Duration::from_millis(50)))
            .unwrap();
        // Until the daemon stops reading (or cuts us off).
        for _ in 0..2_000 {
            if flower_proto::transport::send_blocking(std::os::fd::AsFd::as_fd(&fd), &frame, &[])
                .is_err()
            {
                break;
            }
        }
        held.push(fd);
    }
    let mut sb = flower_proto::blocking::Switchboard::connect(&path).unwrap();
    let err = sb.client_connect(&Labels::new()).unwrap_err();
    println!("REFUSED {} {}", err.code as i32, err.message);
    std::thread::sleep(Duration::from_secs(60));
    drop(held);
}

/// The attack that took every descriptor of the daemon: channels full of Constrain
/// calls whose replies are never read. Now the attacker's uid holds at most its
/// share, its next connection is told so, its silent channels are cut off, and a
/// bystander (another uid) connects, constrains and connects as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausting_descriptors_hurts_only_the_attacker() {
    use std::io::BufRead;
    let daemon = daemon_as(
        None,
        &[
            "--nofile",
            "2048",
            "--max-handles-per-uid",
            "300",
            "--send-timeout",
            "1",
        ],
    );
    let (bystander, baseline) = serving_bystander(&daemon).await;

    let this = std::env::current_exe().unwrap();
    let (_program, mut attack) = match is_root() {
        true => command_as(&this, "hardening", NOBODY),
        false => (None, std::process::Command::new(&this)),
    };
    attack
        .args(["--ignored", "--exact", "attacker", "--nocapture", "-q"])
        .env(ATTACK_ENV, &daemon.path)
        .stdout(std::process::Stdio::piped());
    let mut attacker = Tool(attack.spawn().unwrap());
    let stdout = attacker.0.stdout.take().unwrap();
    let refused = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.starts_with("REFUSED"))
    });
    let refused = tokio::time::timeout(Duration::from_secs(30), refused)
        .await
        .expect("the attacker's extra connection is answered")
        .unwrap()
        .expect("the attacker reports");
    assert!(
        refused.starts_with(&format!("REFUSED {} Uid ", Code::ResourceExhausted as i32)),
        "{refused}"
    );
    assert!(refused.contains("--max-handles-per-uid"), "{refused}");
    // The attacker holds its share and no more.
    let held = daemon.fd_count();
    assert!(
        held <= baseline + 300 + 16,
        "{held} descriptors held, baseline {baseline}: {:?}",
        fd_targets(daemon.pid())
            .iter()
            .filter(|t| !t.contains("socket:"))
            .collect::<Vec<_>>()
    );

    if !is_root() {
        // One uid for both: the bystander's new connections share the attacker's
        // quota, and are told so at once instead of waiting.
        let fresh = daemon.connect().await;
        let err = refusal(
            tokio::time::timeout(PATIENCE, fresh.client_connect(&labels(&[("app", "web")])))
                .await
                .expect("answered in time"),
        );
        assert_eq!(err.code, Code::ResourceExhausted, "{err}");
        drop(attacker);
        daemon.settle_fds(baseline).await;
        bystander_works(&bystander).await;
        return;
    }
    // A bystander of another uid is served as usual.
    for _ in 0..20 {
        let fresh = daemon.connect().await;
        let narrow = fresh
            .constrain(&[Right::ClientConnect], &Labels::new(), &Labels::new())
            .await
            .unwrap();
        narrow
            .client_connect(&labels(&[("app", "web")]))
            .await
            .unwrap();
    }
    bystander_works(&bystander).await;

    drop(attacker);
    daemon.settle_fds(baseline).await;
    bystander_works(&bystander).await;
}

/// The `SOCK_SEQPACKET` sockets `pid` holds open: its listener, handles and
/// registration channels, and nothing else (connections and the socketpair pool are
/// stream sockets), so the count does not move with the pool.
fn channels(pid: u32) -> usize {
    let seqpacket: std::collections::HashSet<String> = std::fs::read_to_string("/proc/net/unix")
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // Num RefCount Protocol Flags Type St Inode [Path]
            (fields.get(4) == Some(&"0005")).then(|| fields.get(6).map(|i| i.to_string()))?
        })
        .collect();
    fd_targets(pid)
        .iter()
        .filter_map(|t| t.split_once("->socket:[")?.1.strip_suffix(']'))
        .filter(|inode| seqpacket.contains(*inode))
        .count()
}

const PACE_ENV: &str = "FLOWER_HARDENING_PACE";
/// Constrain calls the pacing attacker sends at once.
const PACE_CALLS: u64 = 20;

/// The pacing attacker, run in a child process (as another uid when we are root):
/// pipelines [`PACE_CALLS`] Constrain calls on one connection and reads replies
/// until it holds the number of new handles in `PACE_ENV_expect`; prints `GOT n`.
/// Then, once told (a line on stdin), takes whatever else has arrived without
/// waiting and prints `MORE n`; then waits to be killed, holding everything.
#[test]
#[ignore = "run by one_uids_churn_is_paced_and_another_uid_is_not in a child process"]
fn pacing_attacker() {
    use flower_proto::transport::{connect_blocking, recv_blocking, send_blocking};
    use std::io::BufRead;
    use std::os::fd::AsFd;
    let Ok(path) = std::env::var(PACE_ENV) else {
        return;
    };
    let expect: usize = std::env::var(format!("{PACE_ENV}_EXPECT"))
        .unwrap()
        .parse()
        .unwrap();
    let fd = connect_blocking(std::path::Path::new(&path), None).unwrap();
    for id in 1..=PACE_CALLS {
        let frame = call_frame(
            id,
            CONSTRAIN,
            sb::ConstrainRequest::default().encode_to_vec(),
        );
        send_blocking(fd.as_fd(), &frame, &[]).unwrap();
    }
    let take = |datagram: flower_proto::transport::Datagram| {
        let reply = match flower_proto::Frame::decode(&datagram.bytes[..])
            .unwrap()
            .kind
        {
            Some(flower_proto::frame::Kind::Reply(reply)) => reply,
            other => panic!("expected a reply, got {other:?}"),
        };
        assert_eq!(reply.code, Code::Ok as i32, "{reply:?}");
        assert_eq!(
            datagram.fds.len(),
            1,
            "a Constrain reply carries the new handle"
        );
        datagram.fds
    };
    let mut handles = Vec::new();
    while handles.len() < expect {
        let datagram = recv_blocking(fd.as_fd()).unwrap().unwrap().unwrap();
        handles.extend(take(datagram));
    }
    println!("GOT {}", handles.len());
    let mut stdin = std::io::stdin().lock();
    let mut line = String::new();
    stdin.read_line(&mut line).unwrap();
    flower_proto::transport::set_nonblocking(fd.as_fd(), true).unwrap();
    let mut more = 0;
    while let Ok(Ok(Some(datagram))) = recv_blocking(fd.as_fd()) {
        handles.extend(take(datagram));
        more += 1;
    }
    println!("MORE {more}");
    let _ = stdin.read_line(&mut line);
    drop(handles);
}

/// A uid that makes handles as fast as it can (and could drop them as fast, leaving
/// the switchboard to clean up after it) is paced: past its burst, its Constrain calls
/// wait for their turn. Another uid's connections, Constrain calls and connects are
/// served meanwhile. Once the attacker is gone, its waiting calls are dropped (also
/// those it left queued behind a channel full of waiting calls) and the descriptors
/// return to the baseline. The rate here is one handle per 1 000 s,
/// so "still waiting" cannot be a slow machine's doing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_uids_churn_is_paced_and_another_uid_is_not() {
    use std::io::{BufRead, Write};
    const BURST: usize = 8;
    let daemon = daemon_as(
        None,
        &[
            "--new-handles-per-second",
            "0.001",
            "--new-handles-burst",
            &BURST.to_string(),
            // So the attacker's waiting calls fill its channel's places, and the
            // switchboard must notice its hang-up without reading.
            "--max-calls-in-flight",
            "4",
        ],
    );
    // One new registration of the bystander's uid.
    let (bystander, baseline) = serving_bystander(&daemon).await;
    let channels_before = channels(daemon.pid());
    let rss_before = rss_kib(daemon.pid());

    // As root the attacker is uid 65534 with a bucket of its own; otherwise it shares
    // the bystander's, of which the registration above took one.
    let expect = if is_root() { BURST } else { BURST - 1 };
    let this = std::env::current_exe().unwrap();
    let (_program, mut attack) = match is_root() {
        true => command_as(&this, "hardening", NOBODY),
        false => (None, std::process::Command::new(&this)),
    };
    attack
        .args([
            "--ignored",
            "--exact",
            "pacing_attacker",
            "--nocapture",
            "-q",
        ])
        .env(PACE_ENV, &daemon.path)
        .env(format!("{PACE_ENV}_EXPECT"), expect.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut attacker = Tool(attack.spawn().unwrap());
    let mut to_attacker = attacker.0.stdin.take().unwrap();
    let mut from_attacker = std::io::BufReader::new(attacker.0.stdout.take().unwrap());
    // The test harness prints lines of its own around the attacker's.
    let mut line = |what: &str| loop {
        let mut line = String::new();
        let n = from_attacker.read_line(&mut line).unwrap();
        assert!(n > 0, "the attacker exited before it said {what}");
        if line.starts_with(what) {
            break line.trim().to_owned();
        }
    };
    let got = tokio::task::block_in_place(|| line("GOT"));
    assert_eq!(got, format!("GOT {expect}"));

    if is_root() {
        // Another uid: new connections and new handles as usual.
        for _ in 0..2 {
            let fresh = daemon.connect().await;
            let narrow = tokio::time::timeout(
                PATIENCE,
                fresh.constrain(&[Right::ClientConnect], &Labels::new(), &Labels::new()),
            )
            .await
            .expect("another uid's Constrain is not paced by the attacker's")
            .unwrap();
            narrow
                .client_connect(&labels(&[("app", "web")]))
                .await
                .unwrap();
        }
    } else {
        // One uid: its Constrain calls wait their turn too, but connects through its
        // handles (which make no handle) go through.
        let fresh = raw_connect(&daemon.path).await;
        let frame = call_frame(
            1,
            CONSTRAIN,
            sb::ConstrainRequest::default().encode_to_vec(),
        );
        send_raw(&fresh, &frame, &[]).await;
        bystander
            .client_connect(&labels(&[("app", "web")]))
            .await
            .unwrap();
        assert!(
            fresh.try_recv().is_none(),
            "the same uid's Constrain waits its turn"
        );
    }
    for _ in 0..100 {
        bystander
            .client_connect(&labels(&[("app", "web")]))
            .await
            .unwrap();
    }
    bystander_works(&bystander).await;

    // All the while, none of the attacker's waiting calls was answered.
    writeln!(to_attacker, "count").unwrap();
    let more = tokio::task::block_in_place(|| line("MORE"));
    assert_eq!(more, "MORE 0", "the attacker's calls past its burst wait");

    // The attacker's channel and the handles it holds, whatever the socketpair pool
    // (stream sockets) holds at the moment.
    let held = channels(daemon.pid());
    assert!(
        held >= channels_before + 1 + expect,
        "{held} channels, {channels_before} before the attack"
    );
    drop(to_attacker);
    drop(attacker);
    wait_until("the attacker's channels to close", || {
        channels(daemon.pid()) <= channels_before
    });
    daemon.settle_fds(baseline).await;
    bystander_works(&bystander).await;
    let rss_after = rss_kib(daemon.pid());
    assert!(
        rss_after < rss_before + 4 * 1024,
        "RSS {rss_before} KiB before, {rss_after} KiB after"
    );
}

/// A reply the kernel refuses (`ETOOMANYREFS`: the daemon's user has more
/// descriptors in flight than its limit, because a client reads nothing) still
/// answers the call, with an error and without descriptors; nothing waits forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_that_cannot_be_sent_is_an_error_reply() {
    // Root may have any number of descriptors in flight: run the daemon as nobody.
    let daemon = daemon_as(Some(NOBODY), &["--nofile", "64"]);
    let root = daemon.connect().await;
    let mut server = root.server_start(&labels(&[("app", "web")])).await.unwrap();
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(conn) = server.accept().await {
            held.push(conn);
        }
    });
    let baseline = daemon.baseline(&root).await;
    let ch = raw_connect(&daemon.path).await;
    let request = sb::ClientConnectRequest {
        out_labels: labels(&[("app", "web")]),
    };
    let calls = 150u64;
    for id in 1..=calls {
        send_raw(
            &ch,
            &call_frame(id, CLIENT_CONNECT, request.encode_to_vec()),
            &[],
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..calls {
        let (reply, fds) = recv_reply(&ch).await.expect("every call is answered");
        if reply.code == 0 {
            assert_eq!(fds.len(), 1);
            ok += 1;
        } else {
            assert!(fds.is_empty());
            refused += 1;
        }
    }
    eprintln!("{ok} connected, {refused} refused");
    if is_root() {
        assert!(refused > 0, "the descriptor limit should have been hit");
    }
    drop(ch);
    held.abort();
    bystander_works(&root).await;
    daemon.settle_fds(baseline).await;
}

/// 128 List calls over 16 targets of 40 KB each from a client that never reads:
/// the daemon's memory stays bounded, the client is cut off after the send
/// timeout, and everything is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_list_reader_is_cut_off_and_memory_stays_bounded() {
    let daemon = Daemon::start_with(&["--send-timeout", "1"]);
    let root = daemon.connect().await;
    let mut servers = Vec::new();
    for i in 0..16 {
        let big = "x".repeat(40_000);
        servers.push(
            root.server_start(&labels(&[("big", &big), ("n", &i.to_string())]))
                .await
                .unwrap(),
        );
    }
    let baseline = daemon.baseline(&root).await;
    let rss_before = rss_kib(daemon.pid());
    let ch = raw_connect(&daemon.path).await;
    let list = sb::ListRequest::default().encode_to_vec();
    for id in 1..=128 {
        send_raw(&ch, &call_frame(id, LIST, list.clone()), &[]).await;
    }
    let mut peak = 0;
    let started = Instant::now();
    // Cut off after about a second of not reading.
    // Cut off once the daemon has accepted the channel (under load that can come
    // after the calls were sent) and then closed it again.
    let mut accepted = false;
    let cut = loop {
        peak = peak.max(rss_kib(daemon.pid()));
        let fds = daemon.fd_count();
        accepted |= fds > baseline;
        if accepted && fds <= baseline {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the stalled reader was never cut off"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!(
        "RSS {rss_before} KiB before, {peak} KiB peak, {} KiB after; cut off after {cut:?}",
        rss_kib(daemon.pid())
    );
    assert!(
        peak < rss_before + 30_000,
        "memory grew from {rss_before} KiB to {peak} KiB"
    );
    // The channel was closed by the daemon: what it queued, then end of stream.
    let mut replies = 0;
    while recv_reply(&ch).await.is_some() {
        replies += 1;
    }
    assert!(replies < 128 * 17, "cut off before everything was sent");
    assert_eq!(list_all(&root).await, 16);
    daemon.settle_fds(baseline).await;
}

async fn list_all(sb: &Switchboard) -> usize {
    list(sb, &Labels::new()).await.len()
}

/// A target whose labels (with those its handle forces) fit a registration but not
/// a List reply is refused up front: it would cut everyone's List short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_too_large_to_list_is_refused() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let _small = root.server_start(&labels(&[("app", "a")])).await.unwrap();
    let forced = labels(&[("pod", &"p".repeat(40_000))]);
    let narrow = root
        .constrain(&[Right::ServerStart], &forced, &Labels::new())
        .await
        .unwrap();
    let err = refusal(
        narrow
            .server_start(&labels(&[("app", &"b".repeat(30_000))]))
            .await,
    );
    assert_eq!(err.code, Code::InvalidArgument, "{err}");
    assert!(err.message.contains("do not fit a List reply"), "{err}");
    let _later = root.server_start(&labels(&[("app", "c")])).await.unwrap();
    assert_eq!(list_all(&root).await, 2, "everyone's List is whole");
}

/// A connect across many candidates that never answer ends at the connect
/// deadline, not after candidates × call timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_has_one_overall_deadline() {
    let daemon = Daemon::start_with(&["--call-timeout", "1", "--connect-deadline", "2.5"]);
    let root = daemon.connect().await;
    // Five replicas registered on raw channels that never answer Server.Connect.
    let mut silent = Vec::new();
    for i in 0..5 {
        let ch = raw_connect(&daemon.path).await;
        let request = sb::ServerStartRequest {
            in_labels: labels(&[("app", "web"), ("replica", &i.to_string())]),
            ..Default::default()
        };
        send_raw(
            &ch,
            &call_frame(1, SERVER_START, request.encode_to_vec()),
            &[],
        )
        .await;
        let (reply, fds) = recv_reply(&ch).await.unwrap();
        assert_eq!(reply.code, 0, "{}", reply.error);
        silent.push((ch, fds));
    }
    let mut resolver = root
        .resolver_start(&["service"], &Labels::new(), &labels(&[("app", "web")]))
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Some(request) = resolver.next().await {
            request.respond(Ok(flower_proto::resolver::ResolveResponse {
                targets: (0..5)
                    .map(|i| flower_proto::resolver::Candidate {
                        out_labels: labels(&[("replica", &i.to_string())]),
                        weight: 1,
                    })
                    .collect(),
                max_cache_duration_seconds: 0,
            }));
        }
    });
    let started = Instant::now();
    let err = root
        .client_connect(&labels(&[("service", "web")]))
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.code, Code::DeadlineExceeded, "{err}");
    assert!(err.message.contains("connect deadline"), "{err}");
    assert!(
        took < Duration::from_secs(4),
        "took {took:?}, deadline 2.5 s"
    );
}

/// By default an egress does not reach node-local services, however the address is
/// spelled; the operator can allow them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_keeps_node_local_addresses_out_of_reach() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let start = |labels: &str, extra: &[&str]| {
        Tool(
            std::process::Command::new(FLOWER)
                .args(["egress", "connect"])
                .args(extra)
                .arg(&daemon.path)
                .arg(labels)
                .env("RUST_LOG", "error")
                .spawn()
                .unwrap(),
        )
    };
    let _default = start("net=default", &[]);
    let _allowed = start("net=allowed", &["--allow", "127.0.0.0/8"]);
    for net in ["default", "allowed"] {
        wait_until_async("egress registration", || async {
            list(&root, &labels(&[("net", net)])).await.len() == 1
        })
        .await;
    }
    for (family, address) in [
        ("inet", "127.0.0.1"),
        ("inet", "0.0.0.0"),
        ("inet6", "::ffff:127.0.0.1"),
        ("inet6", "::1"),
        ("inet6", "::"),
    ] {
        let err = root
            .client_connect(&labels(&[
                ("net", "default"),
                ("address_family", family),
                ("server_address", address),
                ("server_port", &port),
            ]))
            .await
            .unwrap_err();
        assert_eq!(err.code, Code::PermissionDenied, "{address}: {err}");
    }
    root.client_connect(&labels(&[
        ("net", "allowed"),
        ("address_family", "inet6"),
        ("server_address", "::ffff:127.0.0.1"),
        ("server_port", &port),
    ]))
    .await
    .expect("allowed with --allow");
}

/// Finding 5's bound: one uid may have at most `--max-targets-per-uid` targets and
/// resolvers at once, whichever handles it registers them through; the refusal
/// names the flag; a target that goes away makes room; the descriptor count returns
/// to its baseline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_per_uid_are_bounded() {
    let daemon = Daemon::start_with(&["--max-targets-per-uid", "3"]);
    let root = daemon.connect().await;
    let baseline = daemon.baseline(&root).await;
    let narrow = root
        .constrain(
            &[Right::ServerStart],
            &labels(&[("tenant", "a")]),
            &Labels::new(),
        )
        .await
        .unwrap();
    let first = root.server_start(&labels(&[("app", "1")])).await.unwrap();
    let _second = narrow.server_start(&labels(&[("app", "2")])).await.unwrap();
    let _resolver = daemon
        .connect()
        .await
        .resolver_start(&["server_hostname"], &Labels::new(), &Labels::new())
        .await
        .unwrap();
    let err = refusal(narrow.server_start(&labels(&[("app", "3")])).await);
    assert_eq!(err.code, Code::ResourceExhausted, "{err}");
    assert!(err.message.contains("--max-targets-per-uid"), "{err}");
    let err = refusal(root.egress_start(&labels(&[("net", "out")])).await);
    assert_eq!(err.code, Code::ResourceExhausted, "{err}");
    bystander_works(&root).await;

    drop(first);
    let deadline = Instant::now() + PATIENCE;
    let third = loop {
        match narrow.server_start(&labels(&[("app", "3")])).await {
            Ok(server) => break server,
            Err(e) => assert_eq!(e.code, Code::ResourceExhausted, "{e}"),
        }
        assert!(
            Instant::now() < deadline,
            "the freed target's slot came back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    drop(third);
    drop(_second);
    drop(_resolver);
    drop(narrow);
    daemon.settle_fds(baseline).await;
}

/// Serves `resolver` in a task, answering every `Resolve` with one candidate:
/// `dest=<dest>`. Returns the task (abort it to close the registration) and the
/// number of calls so far.
fn answer_with(
    mut resolver: flower_proto::client::Resolver,
    dest: &'static str,
) -> (
    tokio::task::JoinHandle<()>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = calls.clone();
    let task = tokio::spawn(async move {
        while let Some(request) = resolver.next().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            request.respond(Ok(flower_proto::resolver::ResolveResponse {
                targets: vec![flower_proto::resolver::Candidate {
                    out_labels: labels(&[("dest", dest)]),
                    weight: 1,
                }],
                max_cache_duration_seconds: 0,
            }));
        }
    });
    (task, calls)
}

/// A narrowly constrained handle with RESOLVER_START that registers first neither
/// blocks the operator's resolver nor steers names for anyone outside its labels: its
/// resolver's scope is the handle's fixed in-labels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_resolver_steers_only_its_own_names() {
    use std::sync::atomic::Ordering::SeqCst;
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let bystander = root
        .constrain(&[Right::ClientConnect], &Labels::new(), &Labels::new())
        .await
        .unwrap();
    let mut servers = Vec::new();
    for dest in ["operator", "tenant-a", "tenant-b"] {
        let mut server = root
            .server_start(&labels(&[("app", "web"), ("dest", dest)]))
            .await
            .unwrap();
        servers.push(tokio::spawn(async move {
            while server.accept().await.is_some() {}
        }));
    }
    let baseline = daemon.baseline(&root).await;
    let name = labels(&[("server_hostname", "shop.example")]);

    // Tenant a's handle, as an operator would hand it out: only the right, and
    // everything it registers or connects to carries tenant=a.
    let tenant = |t: &str| labels(&[("tenant", t)]);
    let a = root
        .constrain(&[Right::ResolverStart], &tenant("a"), &tenant("a"))
        .await
        .unwrap();
    let (a_task, a_calls) = answer_with(
        a.resolver_start(&["server_hostname"], &Labels::new(), &Labels::new())
            .await
            .unwrap(),
        "tenant-a",
    );
    // The operator's resolver for the same key still registers.
    let operator = root
        .resolver_start(&["server_hostname"], &Labels::new(), &Labels::new())
        .await
        .expect("the operator's resolver is not blocked by a tenant's");
    let (operator_task, operator_calls) = answer_with(operator, "operator");
    // A second resolver in tenant a's own scope, with nothing to tell them apart, is
    // refused as before.
    let err = refusal(
        a.resolver_start(&["server_hostname"], &Labels::new(), &Labels::new())
            .await,
    );
    assert_eq!(err.code, Code::FailedPrecondition, "{err}");
    assert_eq!(
        err.message,
        "Another resolver with the same resolve labels and no conflicting labels exists"
    );

    // A bystander's name goes to the operator's resolver.
    let conn = bystander.client_connect(&name).await.unwrap();
    assert_eq!(conn.labels["dest"], "operator", "{:?}", conn.labels);
    assert_eq!(operator_calls.load(SeqCst), 1);
    assert_eq!(a_calls.load(SeqCst), 0, "the tenant saw a bystander's name");

    // A connect carrying tenant=a (its handle forces it) goes to the tenant's.
    let a_client = root
        .constrain(&[Right::ClientConnect], &Labels::new(), &tenant("a"))
        .await
        .unwrap();
    let conn = a_client.client_connect(&name).await.unwrap();
    assert_eq!(conn.labels["dest"], "tenant-a", "{:?}", conn.labels);
    assert_eq!(conn.labels["tenant"], "a");
    assert_eq!(a_calls.load(SeqCst), 1);

    // Tenant b registers its own, and it answers only tenant b's connects.
    let b = root
        .constrain(&[Right::ResolverStart], &tenant("b"), &tenant("b"))
        .await
        .unwrap();
    let (b_task, b_calls) = answer_with(
        b.resolver_start(&["server_hostname"], &Labels::new(), &Labels::new())
            .await
            .expect("tenant b is not blocked by tenant a"),
        "tenant-b",
    );
    let b_client = root
        .constrain(&[Right::ClientConnect], &Labels::new(), &tenant("b"))
        .await
        .unwrap();
    let conn = b_client.client_connect(&name).await.unwrap();
    assert_eq!(conn.labels["dest"], "tenant-b", "{:?}", conn.labels);
    let conn = bystander.client_connect(&name).await.unwrap();
    assert_eq!(conn.labels["dest"], "operator");
    assert_eq!(
        (
            operator_calls.load(SeqCst),
            a_calls.load(SeqCst),
            b_calls.load(SeqCst)
        ),
        (2, 1, 1)
    );
    drop(conn);

    for task in [a_task, operator_task, b_task] {
        task.abort();
        let _ = task.await;
    }
    drop((a, b, a_client, b_client));
    bystander_works(&bystander).await;
    daemon.settle_fds(baseline).await;
}
