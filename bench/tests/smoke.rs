//! Runs the whole benchmark with tiny sizes: every command path works end to end and
//! prints figures. No root, no fixed ports, every wait bounded.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BENCH: &str = env!("CARGO_BIN_EXE_flower-bench");

/// The `flower` binary: next to flower-bench when cargo built it for this run (as
/// `cargo test --workspace` does); otherwise built here, into a private target
/// directory, since the shared one stays locked while cargo runs the tests.
fn flower() -> PathBuf {
    let beside = Path::new(BENCH).with_file_name("flower");
    if beside.is_file() {
        return beside;
    }
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("flower-build");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let status = Command::new(env!("CARGO"))
        .args(["build", "--locked", "--bin", "flower", "--target-dir"])
        .arg(&target)
        .current_dir(workspace)
        .status()
        .expect("run cargo build --bin flower");
    assert!(status.success(), "cargo build --bin flower failed");
    target.join("debug/flower")
}

#[test]
fn all_benchmarks_run_with_tiny_sizes() {
    let flower = flower();
    let out_path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("smoke-stdout.md");
    let err_path = out_path.with_extension("stderr");
    let out = std::fs::File::create(&out_path).unwrap();
    let err = std::fs::File::create(&err_path).unwrap();
    let mut child = Command::new(BENCH)
        .arg("all")
        .arg("--flower")
        .arg(&flower)
        .args(["--iterations", "50", "--warmup", "5", "--rounds", "1"])
        .args([
            "--clients",
            "1,2",
            "--targets",
            "10",
            "--modes",
            "free,pinned",
        ])
        .args(["--scale", "100", "--bytes", "1MiB", "--repeats", "1"])
        .args(["--ingress-iterations", "20", "--strace-connects", "0"])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("start flower-bench");
    // Should take a few seconds; a hang is a failure, not a stuck CI job.
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("flower-bench did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap();
    if !status.success() {
        let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
        let tail: Vec<&str> = stderr.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        panic!(
            "flower-bench failed ({status}):\n{stdout}\n--- stderr (last 40 lines) ---\n{}",
            tail.join("\n")
        );
    }
    for expected in [
        "Switchboard connect vs the floor",
        "| free | library | 2 | 10 |",
        "| free | blocking | 2 | 10 |",
        "| pinned | library | 1 | 0 |",
        "| pinned | blocking | 1 | 0 |",
        "Switchboard memory at scale",
        "switchboard ClientConnect",
        "flower ingress (TCP)",
        "Ingress: TCP connect",
        "× floor",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
}
