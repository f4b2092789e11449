//! Two nodes on one machine: two network namespaces joined by a veth pair, each with
//! its own switchboard, ingress and egress (run inside the namespace with
//! `ip netns exec`). A client on node 1 reaches a server on node 2 by labels:
//! client → egress (node 1) → TCP across the veth → ingress (node 2) → server.
//!
//! Addresses are from the benchmarking range 198.18.0.0/15, inside the namespaces
//! only: no host-side interface, no route out. The namespaces are named uniquely
//! per run and always deleted, also when the test panics.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use common::*;
use flower_proto::client::Switchboard;

const NODE1_ADDRESS: &str = "198.18.0.1";
const NODE2_ADDRESS: &str = "198.18.0.2";

fn ip(args: &[&str]) {
    let status = Command::new("ip")
        .args(args)
        .status()
        .expect("run ip (iproute2)");
    assert!(status.success(), "ip {} failed", args.join(" "));
}

/// Two network namespaces joined by a veth pair; deleted on drop (which deletes
/// the veth pair with them).
struct Nodes {
    names: [String; 2],
}

impl Nodes {
    fn create() -> Nodes {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let run = format!(
            "flower-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let nodes = Nodes {
            names: [format!("{run}-n1"), format!("{run}-n2")],
        };
        let [n1, n2] = &nodes.names;
        // The guard exists before the first namespace does: a failure below still
        // deletes whatever was made.
        ip(&["netns", "add", n1]);
        ip(&["netns", "add", n2]);
        // Made inside node 1 with its peer inside node 2: never on the host.
        ip(&[
            "-n", n1, "link", "add", "veth0", "type", "veth", "peer", "name", "veth0", "netns", n2,
        ]);
        for (ns, address) in [(n1, NODE1_ADDRESS), (n2, NODE2_ADDRESS)] {
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{address}/30"),
                "dev",
                "veth0",
            ]);
            ip(&["-n", ns, "link", "set", "veth0", "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        nodes
    }

    /// `program args` inside node `n` (0 or 1).
    fn command(&self, n: usize, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.names[n], program]);
        command
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("ip")
                .args(["netns", "del", name])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A process killed on drop.
struct Tool(Child);

impl Drop for Tool {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `command` and returns it with the first stderr line containing `marker`;
/// the rest of stderr is drained so the tool never blocks on the pipe.
fn spawn_until_logged(mut command: Command, marker: &'static str) -> (Tool, String) {
    let mut child = command.stderr(Stdio::piped()).spawn().unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let (found, line) = mpsc::channel();
    std::thread::spawn(move || {
        for text in stderr.lines().map_while(Result::ok) {
            if text.contains(marker) {
                let _ = found.send(text);
            }
        }
    });
    let line = line
        .recv_timeout(PATIENCE)
        .unwrap_or_else(|_| panic!("never logged {marker:?}"));
    (Tool(child), line)
}

/// A switchboard in node `n`, on a socket under `dir`.
async fn switchboard(nodes: &Nodes, n: usize, dir: &Path) -> (Tool, PathBuf, Switchboard) {
    let path = dir.join(format!("node{}.sock", n + 1));
    let mut command = nodes.command(n, FLOWER);
    command
        .arg("switchboard")
        .arg(&path)
        .env("RUST_LOG", "warn");
    let tool = Tool(command.spawn().unwrap());
    let deadline = Instant::now() + PATIENCE;
    let sb = loop {
        if let Ok(sb) = Switchboard::connect(&path).await {
            break sb;
        }
        assert!(
            Instant::now() < deadline,
            "switchboard of node {} never came up",
            n + 1
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    (tool, path, sb)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_on_node_1_reaches_a_server_on_node_2_by_labels() {
    let nodes = Nodes::create();
    let dir = tempfile::tempdir().unwrap();

    // No route out of either node: only the /30 across the veth.
    for n in 0..2 {
        let routes = nodes
            .command(n, "ip")
            .args(["route", "show"])
            .output()
            .unwrap();
        let routes = String::from_utf8(routes.stdout).unwrap();
        assert_eq!(
            routes.trim(),
            format!(
                "198.18.0.0/30 dev veth0 proto kernel scope link src {}",
                [NODE1_ADDRESS, NODE2_ADDRESS][n]
            )
        );
    }

    let (_sb1, path1, node1) = switchboard(&nodes, 0, dir.path()).await;
    let (_sb2, path2, node2) = switchboard(&nodes, 1, dir.path()).await;

    // Node 2: an ingress on its veth address, and a server it forwards to.
    let mut ingress = nodes.command(1, FLOWER);
    ingress
        .args(["ingress", "accept", &format!("{NODE2_ADDRESS}:0")])
        .arg(&path2)
        .arg("app=web")
        .env("RUST_LOG", "info");
    let (_ingress, line) = spawn_until_logged(ingress, "ingress listening");
    let bound = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("address="))
        .expect("the ingress logs its address");
    let port = bound.rsplit(':').next().unwrap().to_owned();

    let mut server = nodes.command(1, FLOWER);
    server
        .args(["cat", "-l"])
        .arg(&path2)
        .args(["app=web", "node=2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut server = Tool(server.spawn().unwrap());
    wait_until_async("the server on node 2", || async {
        list(&node2, &labels(&[("app", "web")])).await.len() == 1
    })
    .await;

    // Node 1: an egress for outbound TCP.
    let mut egress = nodes.command(0, FLOWER);
    egress
        .args(["egress", "connect"])
        .arg(&path1)
        .arg("net=out")
        .env("RUST_LOG", "warn");
    let _egress = Tool(egress.spawn().unwrap());
    wait_until_async("the egress on node 1", || async {
        list(&node1, &labels(&[("net", "out")])).await.len() == 1
    })
    .await;

    // The client on node 1 asks by labels; only TCP crosses to node 2.
    let mut client = nodes.command(0, FLOWER);
    client
        .arg("cat")
        .arg(&path1)
        .args([
            "net=out",
            "address_family=inet",
            &format!("server_address={NODE2_ADDRESS}"),
            &format!("server_port={port}"),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut client = Tool(client.spawn().unwrap());

    server
        .0
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello from node 2\n")
        .unwrap();
    client
        .0
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello from node 1\n")
        .unwrap();
    let client_status = wait_child(&mut client.0);
    let server_status = wait_child(&mut server.0);
    let output = |child: &mut Child| {
        let (mut out, mut err) = (String::new(), String::new());
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (out, err)
    };
    let (client_out, client_err) = output(&mut client.0);
    let (server_out, server_err) = output(&mut server.0);
    assert!(client_status.success(), "client: {client_err}");
    assert!(server_status.success(), "server: {server_err}");
    assert_eq!(client_out, "hello from node 2\n");
    assert_eq!(server_out, "hello from node 1\n");

    // The server saw the connection as node 2's ingress labelled it: from node 1's
    // address, to its own address and port.
    let seen: serde_json::Map<String, serde_json::Value> = server_err
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no labels on the server's stderr: {server_err}"));
    let want = [
        ("app", "web"),
        ("node", "2"),
        ("address_family", "inet"),
        ("client_address", NODE1_ADDRESS),
        ("server_address", NODE2_ADDRESS),
        ("server_port", port.as_str()),
    ];
    for (key, value) in want {
        assert_eq!(
            seen.get(key).and_then(|v| v.as_str()),
            Some(value),
            "{key} in {seen:?}"
        );
    }
    assert!(seen.contains_key("client_port"), "{seen:?}");
}
