//! The tools behave as nc, socat and kubectl users expect: bounded waits, readiness
//! for scripts, exit codes, argument rules, quiet ends, socket files cleaned up, logs.

mod common;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `flower ARGS` with stdin closed, bounded by PATIENCE.
fn flower(args: &[&str]) -> Output {
    let child = Command::new(FLOWER)
        .args(args)
        .env_remove("FLOWER_SWITCHBOARD")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    finish(child)
}

/// The command failed with exit status `code` and exactly `stderr`.
fn assert_fails(out: &Output, code: i32, stderr: &str) {
    assert_eq!(
        (out.status.code(), text(&out.stderr).as_str()),
        (Some(code), stderr)
    );
}

fn finish(mut child: std::process::Child) -> Output {
    let status = wait_child(&mut child);
    let mut out = child.wait_with_output().unwrap();
    out.status = status;
    out
}

/// Runs a bash script with `flower` on PATH and FLOWER_SWITCHBOARD set.
fn script(daemon: &Daemon, body: &str) -> Output {
    let bin = std::path::Path::new(FLOWER).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    use std::os::unix::process::CommandExt;
    let mut child = Command::new("bash")
        .process_group(0)
        .args(["-euo", "pipefail", "-c", body])
        .env("PATH", path)
        .env("FLOWER_SWITCHBOARD", &daemon.path)
        .env("RUST_LOG", "warn")
        .current_dir(daemon.dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Scripts start many processes: allow them longer than one step.
    let deadline = Instant::now() + 3 * PATIENCE;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            kill_group(&child);
            panic!("script did not finish: {body}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Whatever the script left running would hold its output open forever.
    kill_group(&child);
    finish(child)
}

/// Kills the script's process group: the script and everything it started.
fn kill_group(child: &std::process::Child) {
    let group = nix::unistd::Pid::from_raw(-(child.id() as i32));
    let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
}

/// A SEQPACKET socket that accepts connections and never answers a call.
fn silent_switchboard(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("silent");
    use nix::sys::socket::{Backlog, UnixAddr, accept, bind, listen};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let fd = seqpacket();
    bind(fd.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
    listen(&fd, Backlog::new(16).unwrap()).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        while let Ok(raw) = accept(fd.as_raw_fd()) {
            // SAFETY: accept returned a new descriptor nothing else owns.
            held.push(unsafe { OwnedFd::from_raw_fd(raw) });
        }
    });
    path
}

#[test]
fn a_switchboard_that_never_answers_is_a_bounded_error() {
    let dir = tempfile::tempdir().unwrap();
    let silent = silent_switchboard(dir.path());
    let silent = silent.to_str().unwrap();
    for args in [
        &["ls", "-w", "0.3", silent][..],
        &["cat", "-w", "0.3", silent, "app=x"],
        &["cat", "-l", "-w", "0.3", silent, "app=x"],
        &["wait", "-w", "0.3", silent, "app=x"],
        &["egress", "connect", "-w", "0.3", silent, "net=out"],
        &["egress", "resolve", "-w", "0.3", silent, "net=out"],
        &[
            "ingress",
            "accept",
            "-w",
            "0.3",
            "127.0.0.1:0",
            silent,
            "app=x",
        ],
    ] {
        let started = Instant::now();
        let out = flower(args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains("timed out after 0.3s"), "{args:?}: {err}");
        assert!(started.elapsed() < Duration::from_secs(5), "{args:?}");
    }
}

#[test]
fn a_server_waits_for_its_client_only_as_long_as_told() {
    let daemon = Daemon::start();
    let path = daemon.path.to_str().unwrap();
    let out = flower(&["cat", "-l", "-w", "0.3", path, "app=lonely"]);
    assert_fails(
        &out,
        1,
        "flower: timed out after 0.3s waiting for a client\n",
    );
    let out = flower(&["wait", "-w", "0.2", path, "app=none"]);
    assert_fails(
        &out,
        1,
        "flower: no target matching {\"app\":\"none\"} within 0.2s\n",
    );
}

#[test]
fn scripts_can_wait_for_a_server_instead_of_racing_it() {
    let daemon = Daemon::start();
    // Without `flower wait` this failed about 6 times in 10.
    let out = script(
        &daemon,
        r#"for i in $(seq 10); do
             echo "hi $i" | flower cat -l app=x 2>/dev/null &
             flower wait app=x
             flower cat app=x 2>/dev/null </dev/null
             wait
           done"#,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).lines().count(),
        10,
        "{}",
        text(&out.stdout)
    );

    // --ready-fd: one line once registered (cat -l) or listening (ingress).
    let out = script(
        &daemon,
        // One FIFO per step: a reader that reopened the previous step's FIFO could
        // meet that step's writer just before it closes, and read end of file.
        r#"mkfifo ready1 ready2 ready3 ready4
           echo served | flower cat -l --ready-fd 3 app=y 3>ready1 2>/dev/null &
           read -r line <ready1; echo "ready: $line"
           flower cat app=y 2>/dev/null </dev/null
           wait
           flower ingress accept --ready-fd 3 127.0.0.1:0 app=y 3>ready2 &
           read -r address <ready2; echo "ingress: $address"
           flower egress connect --ready-fd 3 net=out 3>ready3 &
           read -r line <ready3; echo "egress: $line"
           flower egress resolve --ready-fd 3 net=out 3>ready4 &
           read -r line <ready4; echo "resolver: $line"
           kill $(jobs -p); wait || true"#,
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}\n{stdout}", text(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[..2], ["ready: {\"app\":\"y\"}", "served"], "{stdout}");
    assert!(lines[2].starts_with("ingress: 127.0.0.1:"), "{stdout}");
    assert_ne!(lines[2], "ingress: 127.0.0.1:0");
    assert_eq!(
        lines[3..],
        ["egress: {\"net\":\"out\"}", "resolver: {\"net\":\"out\"}"]
    );

    let out = flower(&["cat", "-l", "--ready-fd", "987", "app=z"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--ready-fd 987: descriptor is not open"));
}

#[test]
fn command_line_mistakes_are_usage_errors() {
    let daemon = Daemon::start();
    let path = daemon.path.to_str().unwrap();
    for (args, message) in [
        (
            &["cat", "app"][..],
            "flower: invalid label \"app\": expected key=value or a JSON object (a switchboard PATH contains a '/', e.g. ./app)\n",
        ),
        (
            &["cat", path, "app=a,b"],
            "flower: invalid label \"b\" in \"app=a,b\": expected key=value (give a value containing ',' as JSON)\n",
        ),
        (
            &["cat", "--ready-fd", "3", path, "app=x"],
            "flower: --ready-fd needs -l\n",
        ),
    ] {
        let out = flower(args);
        assert_eq!(
            (out.status.code(), text(&out.stderr)),
            (Some(2), message.to_owned()),
            "{args:?}"
        );
    }
    for args in [
        &["switchboard", "--call-timeout", "0", path][..],
        &["ls", "-w", "0", path],
        &["cat", "-w", "-1", path, "app=x"],
        &["ingress", "accept", "localhost:80", path, "app=x"],
    ] {
        let out = flower(args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }

    // A comma lists several labels, as in kubectl selectors.
    let mut server = Command::new(FLOWER)
        .args(["cat", "-l", path, "app=web,pod=a"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = flower(&["wait", path, "pod=a"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = flower(&["ls", path]);
    assert_eq!(text(&out.stdout), "{\"app\":\"web\",\"pod\":\"a\"}\n");
    let out = flower(&["ls", "-l", path]);
    assert_eq!(text(&out.stdout), "app=web pod=a\n");
    server.kill().unwrap();
    server.wait().unwrap();
}

#[test]
fn an_unknown_group_leaves_no_socket_behind() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sb");
    let out = flower(&[
        "switchboard",
        "--group",
        "no-such-group-here",
        path.to_str().unwrap(),
    ]);
    assert_fails(&out, 1, "flower: unknown group no-such-group-here\n");
    assert!(!path.exists(), "no socket file left");
}

#[test]
fn a_closed_stdout_ends_cat_quietly() {
    let daemon = Daemon::start();
    let out = script(
        &daemon,
        r#"yes | flower cat -l app=big 2>server.err >/dev/null &
           flower wait app=big
           flower cat app=big 2>client.err </dev/null | head -2
           wait
           echo "client: $(cat client.err)"
           echo "server: $(cat server.err)""#,
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}\n{stdout}", text(&out.stderr));
    assert_eq!(
        stdout,
        "y\ny\nclient: {\"app\":\"big\"}\nserver: {\"app\":\"big\"}\n"
    );
    // A failure names the direction that failed.
    let out = script(
        &daemon,
        r#"echo hi | flower cat -l app=full 2>/dev/null >/dev/null &
           flower wait app=full
           flower cat app=full </dev/null >/dev/full"#,
    );
    assert_fails(
        &out,
        1,
        "{\"app\":\"full\"}\nflower: writing to stdout: No space left on device (os error 28)\n",
    );
}

#[test]
fn ingress_on_a_unix_path_cleans_up_and_restarts() {
    let daemon = Daemon::start();
    let path = daemon.path.to_str().unwrap();
    let socket = daemon.dir.path().join("rel.sock");
    // Started through bash for --ready-fd; `exec` keeps the pid the ingress's.
    let start = |extra: &str| {
        let mut child = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "exec {FLOWER} ingress accept --ready-fd 3 {extra} rel.sock {path} app=u 3>&1 >/dev/null"
            ))
            .current_dir(daemon.dir.path())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        (child, line)
    };
    let (mut first, line) = start("--mode 0660");
    assert_eq!(line, "rel.sock\n");
    assert_eq!(
        std::fs::metadata(&socket).unwrap().permissions().mode() & 0o7777,
        0o660
    );
    assert!(terminate(&mut first).success());
    assert!(!socket.exists(), "the socket file is removed on SIGTERM");
    // A killed ingress leaves its file; the next one replaces it.
    let (mut second, line) = start("");
    assert_eq!(line, "rel.sock\n");
    second.kill().unwrap();
    second.wait().unwrap();
    assert!(socket.exists());
    let (mut third, line) = start("");
    assert_eq!(line, "rel.sock\n", "replaced the stale socket");
    // A live one is not taken over.
    let (mut fourth, line) = start("");
    assert_eq!(line, "");
    assert_eq!(wait_child(&mut fourth).code(), Some(1));
    let mut err = String::new();
    fourth
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(err, "flower: something is already listening at rel.sock\n");
    assert!(terminate(&mut third).success());
    assert!(!socket.exists());
}

#[test]
fn logs_say_what_happened_with_the_labels() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sb");
    let mut daemon = Command::new(FLOWER)
        .args(["switchboard", "--log-json", "--call-timeout", "0.2"])
        .arg(&path)
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let p = path.to_str().unwrap();
    wait_until("the daemon", || flower(&["ls", p]).status.success());
    let client = Command::new(FLOWER)
        .args(["--log-json", "ls", p, "app=logged"])
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    assert!(client.status.success());
    let line = text(&client.stderr);
    let first = line.lines().next().expect("the client logs");
    let json: serde_json::Value = serde_json::from_str(first).expect("a JSON line");
    assert!(json["fields"]["message"].is_string(), "{line}");

    // A server that registers and never answers: registration, connect, timeout.
    let mut server = Command::new(FLOWER)
        .args(["egress", "connect", p, "app=logged"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(flower(&["wait", p, "app=logged"]).status.success());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.id() as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    let out = flower(&["cat", p, "app=logged", "address_family=inet"]);
    assert_fails(&out, 1, "flower: Target did not answer within 200ms\n");
    server.kill().unwrap();
    server.wait().unwrap();
    terminate(&mut daemon);
    let mut log = String::new();
    daemon
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    for needle in [
        "registering",
        "target registered",
        "connecting",
        "did not answer within 200ms",
        "connect failed",
        "\\\"app\\\": \\\"logged\\\"",
    ] {
        assert!(log.contains(needle), "daemon log has {needle:?}:\n{log}");
    }
    for line in log.lines() {
        serde_json::from_str::<serde_json::Value>(line).expect("every line is JSON");
    }
}

#[test]
fn cat_keeps_serving_and_runs_a_command_per_connection() {
    let daemon = Daemon::start();
    let out = script(
        &daemon,
        r#"flower cat -l -k -q app=e --exec sh -c 'echo "hi $FLOWER_LABEL_app $FLOWER_LABELS"; cat' &
           server=$!
           flower wait app=e
           # Three clients at once: each gets its own command.
           clients=()
           for i in 1 2 3; do echo "client $i" | flower cat -q app=e > out.$i & clients+=($!); done
           wait "${clients[@]}"
           cat out.1 out.2 out.3
           flower ls
           kill $server
           # One-shot: the command's failure is the server's.
           flower cat -l app=f --exec false 2>server.err &
           server=$!
           flower wait app=f
           flower cat -q app=f </dev/null
           wait $server || echo "server: $(cat server.err)""#,
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}\n{stdout}", text(&out.stderr));
    let expected = (1..=3)
        .map(|i| format!("hi e {{\"app\":\"e\"}}\nclient {i}\n"))
        .collect::<String>();
    assert_eq!(
        stdout,
        format!(
            "{expected}{{\"app\":\"e\"}}\nserver: {{\"app\":\"f\"}}\nflower: false exit status: 1\n"
        )
    );
}

#[test]
fn completions_man_page_and_version_come_from_the_command_line_definition() {
    let out = flower(&["completions", "bash"]);
    assert!(out.status.success());
    let script = text(&out.stdout);
    for word in ["_flower", "--ready-fd", "--timeout", "wait"] {
        assert!(script.contains(word), "completions mention {word}");
    }
    let out = flower(&["man"]);
    assert!(out.status.success());
    assert!(text(&out.stdout).starts_with(".ie"), "roff");
    assert!(text(&out.stdout).contains("switchboard"));
    let out = flower(&["version"]);
    assert_eq!(
        text(&out.stdout),
        format!("flower {}\n", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(
        flower(&["completions", "nosuchshell"]).status.code(),
        Some(2)
    );
}

#[test]
fn ls_watch_prints_targets_as_they_come_and_go() {
    let daemon = Daemon::start();
    let out = script(
        &daemon,
        r#"flower ls --watch app=w > watch.json & watcher=$!
           flower ls --watch -l app=w > watch.words & words=$!
           flower cat -l app=w pod=1 </dev/null & server=$!
           flower wait app=w
           until grep -q added watch.json && grep -q + watch.words; do sleep 0.05; done
           kill $server; wait $server || true
           until grep -q removed watch.json && grep -q - watch.words; do sleep 0.05; done
           kill $watcher $words
           cat watch.json watch.words"#,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "{\"added\":{\"app\":\"w\",\"pod\":\"1\"}}\n{\"removed\":{\"app\":\"w\",\"pod\":\"1\"}}\n\
         + app=w pod=1\n- app=w pod=1\n"
    );
}
