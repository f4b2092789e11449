//! The whole-node walkthrough (`examples/demo.sh`) runs and curl gets its page, both
//! through the ingress and, by name, through resolver + egress + ingress.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::FLOWER;

/// Runs examples/demo.sh on the binaries under test, at most 60 s.
fn run_demo(port: Option<&str>) -> std::process::Output {
    let hello_web = std::path::Path::new(FLOWER)
        .parent()
        .unwrap()
        .join("examples/hello_web");
    assert!(
        hello_web.exists(),
        "cargo test builds examples: {hello_web:?}"
    );
    let mut command = Command::new("bash");
    command
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/demo.sh"))
        .env("FLOWER", FLOWER)
        .env("HELLO_WEB", &hello_web)
        .env_remove("PORT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(port) = port {
        command.env("PORT", port);
    }
    let mut child = command.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("demo did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn demo_script_serves_a_page_through_the_switchboard() {
    assert!(
        Command::new("curl").arg("--version").output().is_ok(),
        "the demo needs curl (scripts/test installs it)"
    );
    let output = run_demo(None);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        stdout
            .matches("Hello from a server that never called bind")
            .count(),
        2,
        "{stdout}"
    );
    assert!(stdout.contains("request: GET / HTTP/1.1"), "{stdout}");
    assert!(
        stdout.contains("request: GET /by-name HTTP/1.0"),
        "{stdout}"
    );
    assert!(
        stdout.contains("\"client_address\": \"127.0.0.1\""),
        "{stdout}"
    );
}

#[test]
fn a_failed_demo_keeps_the_log_that_explains_it() {
    // The port the demo asks for is taken.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let output = run_demo(Some(&port));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("Address already in use"), "{stderr}");
    let kept = stderr
        .lines()
        .find_map(|l| l.strip_prefix("demo: failed; the logs are in "))
        .and_then(|l| l.strip_suffix(':'))
        .unwrap_or_else(|| panic!("{stderr}"));
    let log = std::path::Path::new(kept).join("ingress.log");
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("Address already in use")
    );
    std::fs::remove_dir_all(kept).unwrap();
    drop(busy);
}
