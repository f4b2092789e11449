//! A real container for the tests: `runc` running a busybox rootfs built here, with
//! the `flower` binary (at /bin/flower) and the libraries `ldd` names bind-mounted
//! read-only. A test adds its own mounts and environment — a pod's endpoint
//! directory, or the adjustment an NRI plugin answered — before running it.
//!
//! Needs root, `runc` and a static busybox (`scripts/test` installs both).
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::FLOWER;

/// Containers start slower than processes.
pub const CONTAINER_PATIENCE: Duration = Duration::from_secs(30);

fn find_busybox() -> PathBuf {
    for candidate in ["/bin/busybox", "/usr/bin/busybox"] {
        if Path::new(candidate).exists() {
            return candidate.into();
        }
    }
    panic!("busybox is not installed (scripts/test installs busybox-static)");
}

/// The absolute paths of the shared libraries `ldd` lists for `binary`.
fn libraries(binary: &str) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(binary).output().expect("ldd");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// A container's bundle: the rootfs and the OCI config from `runc spec`, running
/// `/bin/sh -c SCRIPT` with PATH=/bin.
pub struct Bundle {
    dir: tempfile::TempDir,
    pub config: Value,
}

impl Bundle {
    pub fn new(script: &str) -> Bundle {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        for sub in ["bin", "proc", "dev", "sys", "tmp", "run/flower"] {
            std::fs::create_dir_all(rootfs.join(sub)).unwrap();
        }
        std::fs::copy(find_busybox(), rootfs.join("bin/busybox")).unwrap();
        std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).unwrap();
        let status = Command::new("runc")
            .arg("spec")
            .current_dir(dir.path())
            .status()
            .expect("runc (scripts/test installs it)");
        assert!(status.success(), "runc spec failed");
        let spec = std::fs::read(dir.path().join("config.json")).unwrap();
        let mut config: Value = serde_json::from_slice(&spec).unwrap();
        config["root"] = json!({ "path": "rootfs", "readonly": true });
        config["process"]["terminal"] = json!(false);
        config["process"]["args"] = json!(["/bin/sh", "-c", script]);
        config["process"]["env"] = json!(["PATH=/bin", "RUST_LOG=warn"]);
        config["hostname"] = json!("pod");
        let mut bundle = Bundle { dir, config };
        bundle.bind_file(Path::new(FLOWER), Path::new("/bin/flower"));
        for library in libraries(FLOWER) {
            bundle.bind_file(&library, &library);
        }
        bundle
    }

    /// A read-only bind mount of the host file `source` at `destination`, over an
    /// empty file made in the rootfs.
    fn bind_file(&mut self, source: &Path, destination: &Path) {
        let target = self
            .dir
            .path()
            .join("rootfs")
            .join(destination.strip_prefix("/").unwrap());
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::write(&target, b"").unwrap();
        self.mount(json!({
            "destination": destination,
            "type": "bind",
            "source": source,
            "options": ["bind", "ro"],
        }));
    }

    /// Adds an OCI mount.
    pub fn mount(&mut self, mount: Value) {
        self.config["mounts"].as_array_mut().unwrap().push(mount);
    }

    /// Sets an environment variable, replacing one of the same name.
    pub fn env(&mut self, key: &str, value: &str) {
        let env = self.config["process"]["env"].as_array_mut().unwrap();
        env.retain(|e| !e.as_str().unwrap().starts_with(&format!("{key}=")));
        env.push(format!("{key}={value}").into());
    }

    /// Starts the container as `runc run`, with its state under the bundle.
    pub fn run(self, tag: &str) -> Container {
        let config = serde_json::to_vec_pretty(&self.config).unwrap();
        std::fs::write(self.dir.path().join("config.json"), config).unwrap();
        let id = format!("flower-test-{}-{tag}", std::process::id());
        let state = self.dir.path().join("state");
        let runc = Command::new("runc")
            .arg("--root")
            .arg(&state)
            .args(["run", "--bundle"])
            .arg(self.dir.path())
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("runc run");
        Container {
            id,
            runc,
            state,
            _bundle: self.dir,
        }
    }
}

/// A running container, killed and deleted however the test ends.
pub struct Container {
    pub id: String,
    pub runc: Child,
    state: PathBuf,
    _bundle: tempfile::TempDir,
}

impl Container {
    /// Waits (bounded) for the container to exit; its status and stdout.
    pub async fn finish(&mut self) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + CONTAINER_PATIENCE;
        let status = loop {
            if let Some(status) = self.runc.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "container {} did not finish",
                self.id
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let mut out = String::new();
        self.runc
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        (status, out)
    }

    /// Its stderr once it has exited (for failure messages).
    pub fn stderr(&mut self) -> String {
        let mut err = String::new();
        if let Some(mut stderr) = self.runc.stderr.take() {
            let _ = stderr.read_to_string(&mut err);
        }
        err
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let runc = |args: &[&str]| {
            let _ = Command::new("runc")
                .arg("--root")
                .arg(&self.state)
                .args(args)
                .stderr(Stdio::null())
                .status();
        };
        runc(&["kill", &self.id, "KILL"]);
        let _ = self.runc.kill();
        let _ = self.runc.wait();
        runc(&["delete", "--force", &self.id]);
    }
}
