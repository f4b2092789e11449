//! The `flower` command as a user runs it: cat, ls, errors and the daemon lifecycle.

mod common;

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::process::{Command, Output, Stdio};

use common::*;

fn flower(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(FLOWER)
        .args(args)
        .env_remove("FLOWER_SWITCHBOARD")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let status = wait_child(&mut child);
    let mut out = child.wait_with_output().unwrap();
    out.status = status;
    out
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn listed(daemon: &Daemon) -> Vec<String> {
    let out = flower(&["ls", daemon.path.to_str().unwrap()], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).lines().map(str::to_owned).collect()
}

#[test]
fn cat_listen_and_cat_connect_exchange_both_ways() {
    // On one thread (the default) and on a pool of two.
    for daemon_args in [&[][..], &["--threads", "2"]] {
        cat_exchange(&Daemon::start_with(daemon_args));
    }
}

fn cat_exchange(daemon: &Daemon) {
    let path = daemon.path.to_str().unwrap();
    let mut server = Command::new(FLOWER)
        .args(["cat", "-l", path, "app=echo", r#"{"pod":"p1"}"#])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    server
        .stdin
        .take()
        .unwrap()
        .write_all(b"from server\n")
        .unwrap();
    wait_until("server registration", || {
        listed(daemon) == [r#"{"app":"echo","pod":"p1"}"#]
    });

    let client = flower(&["cat", path, r#"{"app":"echo"}"#], b"from client\n");
    assert!(client.status.success(), "{}", text(&client.stderr));
    assert_eq!(text(&client.stdout), "from server\n");
    assert_eq!(text(&client.stderr), "{\"app\":\"echo\",\"pod\":\"p1\"}\n");

    wait_child(&mut server);
    let server = server.wait_with_output().unwrap();
    assert_eq!(text(&server.stdout), "from client\n");
    assert_eq!(text(&server.stderr), "{\"app\":\"echo\",\"pod\":\"p1\"}\n");
    // One-shot: the registration is gone.
    assert!(listed(daemon).is_empty());
}

#[test]
fn ls_prints_one_json_object_per_matching_target() {
    let daemon = Daemon::start();
    let path = daemon.path.to_str().unwrap();
    let mut servers: Vec<_> = ["a", "b"]
        .iter()
        .map(|n| {
            Command::new(FLOWER)
                .args(["cat", "-l", path, "app=web", &format!("pod={n}")])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    wait_until("two registrations", || listed(&daemon).len() == 2);
    // Oldest registration first; the two processes raced, so compare as a set.
    let mut all = listed(&daemon);
    all.sort();
    assert_eq!(
        all,
        [r#"{"app":"web","pod":"a"}"#, r#"{"app":"web","pod":"b"}"#]
    );
    let out = flower(&["ls", path, "pod=b"], b"");
    assert_eq!(text(&out.stdout), "{\"app\":\"web\",\"pod\":\"b\"}\n");

    // Ambiguity is explained, with the key that tells the targets apart.
    let out = flower(&["cat", path, "app=web"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "flower: Labels match multiple targets, which can be resolved by adding one of the labels [\"pod\"]\n"
    );
    for s in &mut servers {
        s.kill().unwrap();
        s.wait().unwrap();
    }
}

#[test]
fn errors_are_one_clear_line() {
    let daemon = Daemon::start();
    let path = daemon.path.to_str().unwrap();

    let out = flower(&["cat", path, "app=nothing"], b"");
    assert_eq!(
        (out.status.code(), text(&out.stderr)),
        (Some(1), "flower: No matching target found\n".into())
    );

    let out = flower(&["cat", path, "{not json"], b"");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).starts_with("flower: invalid labels"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stderr).lines().count(), 1);

    let missing = daemon.dir.path().join("nobody-home");
    let out = flower(&["ls", missing.to_str().unwrap()], b"");
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("cannot connect to the switchboard at") && err.contains("nobody-home"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1);

    let out = flower(&["cat"], b"");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn the_default_path_comes_from_the_environment() {
    let daemon = Daemon::start();
    let out = Command::new(FLOWER)
        .args(["ls", "app=x"])
        .env("FLOWER_SWITCHBOARD", &daemon.path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn daemon_socket_mode_and_clean_exit() {
    let mut daemon = Daemon::start();
    let meta = std::fs::metadata(&daemon.path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    let status = daemon.terminate();
    assert!(status.success(), "{status:?}");
    assert!(!daemon.path.exists(), "socket file removed on SIGTERM");

    let opened = Daemon::start_with(&["--mode", "0660"]);
    // The socket accepts (root ignores its mode) a moment before the daemon widens
    // its mode from the umask's 0600 to the one asked for.
    let mode = || {
        std::fs::metadata(&opened.path)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    wait_until("the socket mode to be set", || mode() != 0o600);
    assert_eq!(mode(), 0o660);
}

#[test]
fn daemon_replaces_stale_sockets_but_not_live_ones_or_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sb");

    // A stale socket: bound, then its owner went away without unlinking.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let mut first = Command::new(FLOWER)
        .arg("switchboard")
        .arg(&path)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("daemon to replace the stale socket", || {
        Command::new(FLOWER)
            .arg("ls")
            .arg(&path)
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    });

    // A live one is not stolen.
    let second = Command::new(FLOWER)
        .arg("switchboard")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    assert!(
        text(&second.stderr).contains("already listening"),
        "{}",
        text(&second.stderr)
    );
    first.kill().unwrap();
    first.wait().unwrap();

    // Not a socket: refused, left alone.
    let file = dir.path().join("file");
    std::fs::write(&file, "keep me").unwrap();
    let out = Command::new(FLOWER)
        .arg("switchboard")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("is not a socket"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}

#[test]
fn a_busy_live_socket_is_not_taken_over_and_start_up_does_not_wait() {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, connect, listen, socket,
    };
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sb");
    // A listener that never accepts, with its backlog filled.
    let seqpacket = |flags| socket(AddressFamily::Unix, SockType::SeqPacket, flags, None).unwrap();
    let listener = seqpacket(SockFlag::SOCK_CLOEXEC);
    bind(listener.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
    listen(&listener, Backlog::new(0).unwrap()).unwrap();
    let mut queued = Vec::new();
    for _ in 0..64 {
        let fd = seqpacket(SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK);
        if connect(fd.as_raw_fd(), &UnixAddr::new(&path).unwrap()).is_err() {
            break;
        }
        queued.push(fd);
    }
    let mut daemon = Command::new(FLOWER)
        .arg("switchboard")
        .arg(&path)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_child(&mut daemon);
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut daemon.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("already listening"), "{stderr}");
    drop((queued, listener));
}

#[test]
fn help_explains_the_commands() {
    let out = Command::new(FLOWER).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = text(&out.stdout);
    for word in ["switchboard", "cat", "ls", "FLOWER_SWITCHBOARD"] {
        assert!(help.contains(word), "help mentions {word}: {help}");
    }
}
