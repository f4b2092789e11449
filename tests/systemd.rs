//! The daemon under a service manager: readiness notification and socket activation,
//! with the manager's side played by the test.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use common::*;
use flower_proto::Labels;
use flower_proto::client::Switchboard;

#[test]
fn tells_the_service_manager_when_ready_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let manager = UnixDatagram::bind(dir.path().join("notify")).unwrap();
    manager.set_read_timeout(Some(PATIENCE)).unwrap();
    let path = dir.path().join("switchboard");
    let mut daemon = Command::new(FLOWER)
        .arg("switchboard")
        .arg(&path)
        .env("NOTIFY_SOCKET", dir.path().join("notify"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0; 256];
    let n = manager.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");
    // Ready means ready: the socket accepts at once.
    assert!(
        std::os::unix::net::UnixStream::connect(&path).is_err(),
        "not a stream socket"
    );
    let channel = seqpacket();
    nix::sys::socket::connect(
        channel.as_raw_fd(),
        &nix::sys::socket::UnixAddr::new(&path).unwrap(),
    )
    .unwrap();
    assert!(terminate(&mut daemon).success());
    let n = manager.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_a_socket_passed_by_the_service_manager() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("activated");
    // The manager binds and listens; the daemon gets the socket as descriptor 3.
    let listener = seqpacket();
    nix::sys::socket::bind(
        listener.as_raw_fd(),
        &nix::sys::socket::UnixAddr::new(&path).unwrap(),
    )
    .unwrap();
    nix::sys::socket::listen(&listener, nix::sys::socket::Backlog::new(16).unwrap()).unwrap();
    let raw = listener.as_raw_fd();
    let mut command = Command::new("sh");
    command
        .args([
            "-c",
            r#"LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" switchboard "$1""#,
        ])
        .arg(FLOWER)
        .arg(dir.path().join("unused-path"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    // SAFETY: dup2 and fcntl are async-signal-safe; the listener ends up at 3
    // without CLOEXEC.
    unsafe {
        command.pre_exec(move || {
            // dup2(3, 3) would keep close-on-exec: then just clear the flag.
            let done = if raw == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(raw, 3)
            };
            if done < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut daemon = command.spawn().unwrap();
    drop(listener);

    let sb = Switchboard::connect(&path).await.unwrap();
    assert!(list(&sb, &Labels::new()).await.is_empty());
    let _server = sb.server_start(&labels(&[("app", "x")])).await.unwrap();
    assert_eq!(list(&sb, &Labels::new()).await.len(), 1);
    assert!(terminate(&mut daemon).success());
    // The socket file belongs to the manager: it is left in place, and the path the
    // daemon was given was never created.
    assert!(path.exists());
    assert!(!dir.path().join("unused-path").exists());
}

#[test]
fn a_wrong_listen_fds_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    // LISTEN_FDS says one socket, but descriptor 3 is closed.
    let output = Command::new("sh")
        .args([
            "-c",
            r#"exec 3>&-; LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" switchboard "$1""#,
        ])
        .arg(FLOWER)
        .arg(dir.path().join("sb"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("descriptor 3 is not open"), "{stderr}");
}

/// The example units in `examples/systemd/` pass `systemd-analyze verify` (the service
/// alone too: it must work without the socket unit) and the service's sandbox rates
/// at most 1.0 in `systemd-analyze security` (0 is fully locked down, 10 not at all).
#[test]
fn the_example_units_verify_and_are_sandboxed() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/systemd");
    let dir = tempfile::tempdir().unwrap();
    // verify checks that ExecStart= names an executable: point it at the one built.
    for unit in ["flower-switchboard.service", "flower-switchboard.socket"] {
        let text = std::fs::read_to_string(examples.join(unit)).unwrap();
        assert!(
            !text.contains("Requires="),
            "{unit} must not require the other unit"
        );
        std::fs::write(
            dir.path().join(unit),
            text.replace("/usr/local/bin/flower", FLOWER),
        )
        .unwrap();
    }
    let service = dir.path().join("flower-switchboard.service");
    let socket = dir.path().join("flower-switchboard.socket");
    let analyze = |args: &[&std::ffi::OsStr]| {
        let out = Command::new("systemd-analyze")
            .args(args)
            .output()
            .expect("systemd-analyze (scripts/test installs systemd)");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, out) = analyze(&["verify".as_ref(), socket.as_os_str(), service.as_os_str()]);
    assert!(ok, "{out}");
    // The service alone, as when the socket unit is not installed.
    let alone = tempfile::tempdir().unwrap();
    std::fs::copy(&service, alone.path().join("flower-switchboard.service")).unwrap();
    let (ok, out) = analyze(&[
        "verify".as_ref(),
        alone.path().join("flower-switchboard.service").as_os_str(),
    ]);
    assert!(ok, "{out}");
    let (ok, out) = analyze(&[
        "security".as_ref(),
        "--offline=yes".as_ref(),
        "--threshold=10".as_ref(),
        service.as_os_str(),
    ]);
    assert!(ok, "exposure above 1.0:\n{out}");
    assert!(out.contains("Overall exposure level"), "{out}");
    // The sysusers.d file creates the user and its group.
    let sysusers = std::fs::read_to_string(examples.join("flower.sysusers")).unwrap();
    assert!(
        sysusers.lines().any(|l| l.starts_with("u flower ")),
        "{sysusers}"
    );
}
