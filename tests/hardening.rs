//! The capability boundary against a hostile local process: each test is an attack
//! that once worked. After each, a bystander handle still works and the daemon's
//! descriptor count is back to its baseline.

mod common;

use std::os::fd::OwnedFd;
use std::time::Duration;

use common::*;
use flower_proto::client::Switchboard;
use flower_proto::switchboard as sb;
use flower_proto::switchboard::Right;
use flower_proto::{Code, Fd, Labels};
use prost::Message;

const INGRESS_CONNECT: &str = "/flower.protocol.switchboard.Switchboard/IngressConnect";
const CONSTRAIN: &str = "/flower.protocol.switchboard.Switchboard/Constrain";
const LIST: &str = "/flower.protocol.switchboard.Switchboard/List";

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
    drop(hostile);
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
