//! The README's walkthrough, run exactly as printed: its `sh` blocks, in order, in one
//! shell. A trailing `# prints TEXT` comment means TEXT appears in the output;
//! `# fails: TEXT` means the command fails with `flower: TEXT`. No other error may
//! appear.

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::FLOWER;

/// The `sh` blocks of the section that starts with `## A five-minute walkthrough`.
fn walkthrough() -> Vec<String> {
    let readme = include_str!("../README.md");
    let section = readme
        .split_once("## A five-minute walkthrough")
        .expect("the README has a walkthrough")
        .1;
    let section = section.split("\n## ").next().unwrap();
    let mut blocks = Vec::new();
    let mut rest = section;
    while let Some((_, after)) = rest.split_once("```sh\n") {
        let (block, after) = after.split_once("```").expect("closed block");
        blocks.push(block.to_owned());
        rest = after;
    }
    blocks
}

/// What the comments promise: (expected text, is an error).
fn promises(script: &str) -> Vec<(String, bool)> {
    let mut all = Vec::new();
    for line in script.lines() {
        if let Some((_, comment)) = line.split_once("# prints ") {
            all.push((comment.trim().to_owned(), false));
        } else if let Some((_, comment)) = line.split_once("# fails: ") {
            all.push((format!("flower: {}", comment.trim()), true));
        }
    }
    all
}

#[test]
fn the_readme_walkthrough_runs_as_printed() {
    let blocks = walkthrough();
    assert!(blocks.len() >= 6, "found {} blocks", blocks.len());
    let script = blocks.concat();
    let promised = promises(&script);
    assert!(promised.len() >= 8, "{promised:?}");

    let dir = tempfile::tempdir().unwrap();
    // The build step is the reader's; here the binary under test is on PATH instead.
    let fake = dir.path().join("bin");
    std::fs::create_dir(&fake).unwrap();
    std::fs::write(fake.join("cargo"), "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(
        fake.join("cargo"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let bin = std::path::Path::new(FLOWER).parent().unwrap();
    let path = format!(
        "{}:{}:{}",
        fake.display(),
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let file = dir.path().join("walkthrough.sh");
    std::fs::write(
        &file,
        format!("trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n{script}"),
    )
    .unwrap();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let mut child = Command::new("bash")
        .arg(&file)
        .env("PATH", path)
        .env("TMPDIR", &tmp)
        .env("RUST_LOG", "warn")
        .env_remove("FLOWER_SWITCHBOARD")
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let group = nix::unistd::Pid::from_raw(-(child.id() as i32));
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
            panic!("the walkthrough did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Anything left of the walkthrough goes too.
    let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let all = format!("{stdout}{stderr}");
    for (text, _) in &promised {
        assert!(
            all.contains(text.as_str()),
            "the README promises {text:?}:\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
        );
    }
    for line in stderr
        .lines()
        .filter(|l| l.contains("flower: ") || l.contains("rror"))
    {
        assert!(
            promised.iter().any(|(text, error)| *error && line == text),
            "unexpected error {line:?}:\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
        );
    }
    // The server saw who connected over TCP.
    assert!(
        stderr.contains("\"client_address\":\"127.0.0.1\""),
        "{stderr}"
    );
    assert!(stdout.contains("hi\n"), "{stdout}");
}
