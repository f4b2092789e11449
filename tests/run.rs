//! `flower run`: the child gets a constrained handle in FLOWER_SWITCHBOARD_FD and no
//! other descriptor, the tools use it, and it can never widen its rights.

mod common;

use std::process::{Command, Output, Stdio};

use common::{Daemon, FLOWER, labels, list, wait_until_async};

fn flower(args: &[&str]) -> Output {
    Command::new(FLOWER)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn child_inherits_only_the_handle() {
    let daemon = Daemon::start();
    let path = daemon.path.to_str().unwrap();
    // A descriptor this test leaks to `flower run` (no close-on-exec) must not reach
    // the child.
    let leaked = nix::fcntl::open(
        "/dev/null",
        nix::fcntl::OFlag::O_RDONLY,
        nix::sys::stat::Mode::empty(),
    )
    .unwrap();
    let leaked_number = leaked;
    let out = Command::new(FLOWER)
        .args(["run", path, "--rights", "LIST", "--", "sh", "-c"])
        .arg(
            "echo \"fd=$FLOWER_SWITCHBOARD_FD path=${FLOWER_SWITCHBOARD-unset}\"; \
             for f in /proc/self/fd/*; do echo \"${f##*/} $(readlink $f)\"; done",
        )
        .env("FLOWER_SWITCHBOARD", path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    nix::unistd::close(leaked).unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    let fd: String = header
        .strip_prefix("fd=")
        .and_then(|h| h.split(' ').next())
        .unwrap()
        .to_owned();
    assert!(header.ends_with("path=unset"), "{header}");
    let mut seen = Vec::new();
    for line in lines {
        let (number, target) = line.split_once(' ').unwrap_or((line, ""));
        // The shell's own listing of /proc/self/fd: gone by the time readlink looks.
        if target.is_empty() || target.starts_with("/proc/") {
            continue;
        }
        if number == fd {
            assert!(target.starts_with("socket:"), "{line}");
        }
        seen.push(number.to_owned());
    }
    seen.sort();
    let mut expected = vec!["0".to_owned(), "1".into(), "2".into(), fd.clone()];
    expected.sort();
    assert_eq!(
        seen, expected,
        "only stdio and the handle (leaked was {leaked_number}):\n{text}"
    );
}

#[tokio::test]
async fn tools_in_the_child_use_the_handle_and_its_labels() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let path = daemon.path.to_str().unwrap().to_owned();
    // No PATH for the child's `flower cat -l`: it uses the inherited handle, whose
    // in-labels are forced onto its registration.
    let mut child = Command::new(FLOWER)
        .args([
            "run", &path, "--in", "team=a", "--", FLOWER, "cat", "-l", "svc=echo",
        ])
        .env_remove("FLOWER_SWITCHBOARD")
        .env("XDG_RUNTIME_DIR", "/nonexistent")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until_async("the child to register", || {
        let root = root.clone();
        async move { !list(&root, &labels(&[("svc", "echo")])).await.is_empty() }
    })
    .await;
    let found = list(&root, &labels(&[("svc", "echo")])).await;
    assert_eq!(found[0], labels(&[("svc", "echo"), ("team", "a")]));
    // The child cannot register as another team: the in-label is fixed.
    let out = flower(&[
        "run", &path, "--in", "team=a", "--", FLOWER, "cat", "-l", "team=b",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("In-labels [\"team\"]"),
        "{}",
        stderr(&out)
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn the_child_cannot_widen_its_rights() {
    let daemon = Daemon::start();
    let path = daemon.path.to_str().unwrap();
    // Listing is all it may do: serving fails with the missing right named.
    let out = flower(&[
        "run", path, "--rights", "LIST", "--", FLOWER, "cat", "-l", "x=1",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(r#"Rights ["SERVER_START"] are not present on this handle"#),
        "{}",
        stderr(&out)
    );
    // A nested run cannot ask for more either.
    let out = flower(&[
        "run",
        path,
        "--rights",
        "LIST",
        "--",
        FLOWER,
        "run",
        "--rights",
        "LIST,SERVER_START",
        "--",
        "true",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("SERVER_START"), "{}", stderr(&out));
    // Without --rights a nested run keeps exactly what it has (here LIST), no more.
    let out = flower(&[
        "run", path, "--rights", "LIST", "--", FLOWER, "run", "--", FLOWER, "ls",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = flower(&[
        "run", path, "--rights", "LIST", "--", FLOWER, "run", "--", FLOWER, "cat", "-l", "x=1",
    ]);
    assert!(stderr(&out).contains("SERVER_START"), "{}", stderr(&out));
    // An empty rights list means none at all.
    let out = flower(&["run", path, "--rights", "", "--", FLOWER, "ls"]);
    assert!(stderr(&out).contains("LIST"), "{}", stderr(&out));
}

#[test]
fn a_bad_inherited_descriptor_is_refused_clearly() {
    for (value, expected) in [
        ("0", "not an AF_UNIX SOCK_SEQPACKET socket"),
        ("999", "not open"),
        ("x", "not a descriptor number"),
    ] {
        let out = Command::new(FLOWER)
            .args(["ls"])
            .env("FLOWER_SWITCHBOARD_FD", value)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(err.contains(expected), "{value}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

#[test]
fn usage_errors_exit_2() {
    let out = flower(&["run", "/nonexistent", "--rights", "FLY", "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    let out = flower(&["run", "/nonexistent"]);
    assert_eq!(out.status.code(), Some(2));
    let out = flower(&["run", "/nonexistent", "--", "true"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
}

/// The blocking client takes the inherited handle too. This test re-runs itself
/// under `flower run` as the child.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_client_uses_the_inherited_handle() {
    if std::env::var_os("FLOWER_TEST_BLOCKING_CHILD").is_some() {
        // The path is ignored: FLOWER_SWITCHBOARD_FD wins.
        let mut sb =
            flower_proto::blocking::Switchboard::connect(std::path::Path::new("/nonexistent"))
                .expect("the inherited handle");
        let mut server = sb
            .server_start(&labels(&[("svc", "blocking")]))
            .expect("register");
        server.accept().expect("one connection");
        return;
    }
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let mut child = Command::new(FLOWER)
        .arg("run")
        .arg(&daemon.path)
        .args(["--rights", "SERVER_START", "--in", "team=blocking", "--"])
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "blocking_client_uses_the_inherited_handle",
            "--nocapture",
        ])
        .env("FLOWER_TEST_BLOCKING_CHILD", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_until_async("the blocking child to register", || {
        let root = root.clone();
        async move {
            !list(&root, &labels(&[("svc", "blocking")]))
                .await
                .is_empty()
        }
    })
    .await;
    let found = list(&root, &labels(&[("svc", "blocking")])).await;
    assert_eq!(found[0]["team"], "blocking");
    root.client_connect(&labels(&[("svc", "blocking")]))
        .await
        .expect("connect to the child");
    let status = tokio::task::spawn_blocking(move || common::wait_child(&mut child))
        .await
        .unwrap();
    assert!(status.success());
}
