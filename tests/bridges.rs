//! Ingress and egress as real processes, with real TCP on loopback and Unix sockets.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};

use common::*;
use flower_proto::client::Switchboard;
use flower_proto::{Code, Labels};

/// A tool process (ingress or egress) that is killed on drop.
struct Tool(Child);

impl Drop for Tool {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `flower ingress accept ADDRESS PATH LABELS` and returns it with the address it
/// logged as bound.
fn ingress(address: &str, path: &std::path::Path, labels: &str) -> (Tool, String) {
    let mut child = Command::new(FLOWER)
        .args(["ingress", "accept", address])
        .arg(path)
        .arg(labels)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    // A thread reads the log, hands over the "listening" line and keeps draining,
    // so the tool never blocks on a full pipe and the wait here is bounded.
    let (found, listening) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if line.contains("ingress listening") {
                let _ = found.send(line);
            }
        }
    });
    let line = listening
        .recv_timeout(PATIENCE)
        .expect("ingress never logged its listening address");
    let bound = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("address=").or(w.strip_prefix("path=")));
    (Tool(child), bound.unwrap_or_default().to_owned())
}

/// `flower egress SUBCOMMAND EXTRA... PATH LABELS`, killed on drop.
fn egress_tool(subcommand: &str, path: &std::path::Path, labels: &str, extra: &[&str]) -> Tool {
    Tool(
        Command::new(FLOWER)
            .args(["egress", subcommand])
            .args(extra)
            .arg(path)
            .arg(labels)
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap(),
    )
}

/// The tests' servers listen on loopback, which an egress refuses unless allowed.
fn egress(path: &std::path::Path, labels: &str, extra: &[&str]) -> Tool {
    let mut args = vec!["--allow", "127.0.0.0/8", "--allow", "::1"];
    args.extend_from_slice(extra);
    egress_tool("connect", path, labels, &args)
}

/// The DNS resolver; hosts file and DNS as `extra` says.
fn resolver(path: &std::path::Path, labels: &str, extra: &[&str]) -> Tool {
    egress_tool("resolve", path, labels, extra)
}

/// Connects by host name until the resolver has registered (it starts concurrently).
async fn connect_by_name(sb: &Switchboard, name: &Labels) -> flower_proto::client::Connection {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        match sb.client_connect(name).await {
            Ok(conn) => return conn,
            Err(e) if std::time::Instant::now() > deadline => panic!("never connected: {e}"),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
}

/// Labels naming a host and service, for the resolver.
fn by_name(host: &str, service: &str) -> Labels {
    labels(&[("server_hostname", host), ("server_service", service)])
}

/// Labels asking the `net=out` egress for TCP to 127.0.0.1:`port`.
fn to_loopback(port: &str) -> Labels {
    labels(&[
        ("net", "out"),
        ("address_family", "inet"),
        ("server_address", "127.0.0.1"),
        ("server_port", port),
    ])
}

/// Handed-out connections are in blocking mode, like socketpairs: a plain blocking
/// `read` must work on them.
fn assert_blocking(fd: &std::os::fd::OwnedFd) {
    let flags = nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(fd),
        nix::fcntl::FcntlArg::F_GETFL,
    )
    .unwrap();
    assert_eq!(flags & libc::O_NONBLOCK, 0, "socket is non-blocking");
}

fn unix(fd: std::os::fd::OwnedFd) -> std::os::unix::net::UnixStream {
    let s = std::os::unix::net::UnixStream::from(fd);
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s
}

fn tcp(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s
}

async fn wait_listed(sb: &Switchboard, filter: &Labels) {
    wait_until_async("registration", || async {
        list(sb, filter).await.len() == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_forwards_tcp_with_address_labels() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let mut server = root.server_start(&labels(&[("app", "web")])).await.unwrap();
    for (listen, family) in [("127.0.0.1:0", "inet"), ("[::1]:0", "inet6")] {
        if family == "inet6" && TcpListener::bind("[::1]:0").is_err() {
            continue; // no IPv6 loopback on this machine
        }
        let (_ingress, bound) = ingress(listen, &daemon.path, "app=web");
        let bound_addr: SocketAddr = bound.parse().unwrap();
        let mut outside = tcp(&bound);
        let incoming = tokio::time::timeout(PATIENCE, server.accept())
            .await
            .unwrap()
            .unwrap();
        let l = &incoming.labels;
        assert_eq!(l["app"], "web");
        assert_eq!(l["address_family"], family);
        assert_eq!(
            l["client_address"],
            outside.local_addr().unwrap().ip().to_string()
        );
        assert_eq!(
            l["client_port"],
            outside.local_addr().unwrap().port().to_string()
        );
        assert_eq!(l["server_address"], bound_addr.ip().to_string());
        assert_eq!(l["server_port"], bound_addr.port().to_string());
        assert_blocking(&incoming.socket);
        exchange(&mut outside, &mut unix(incoming.socket));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_accepts_on_unix_paths_and_survives_failed_pushes() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let socket_path = daemon.dir.path().join("ingress.sock");
    let (_ingress, _) = ingress(socket_path.to_str().unwrap(), &daemon.path, "app=local");

    // No server yet: that one connection is closed, the ingress goes on.
    let mut early = std::os::unix::net::UnixStream::connect(&socket_path).unwrap();
    early.set_read_timeout(Some(PATIENCE)).unwrap();
    assert_eq!(
        early.read(&mut [0; 1]).unwrap(),
        0,
        "refused connection is closed"
    );

    let mut server = root
        .server_start(&labels(&[("app", "local")]))
        .await
        .unwrap();
    let mut outside = std::os::unix::net::UnixStream::connect(&socket_path).unwrap();
    outside.set_read_timeout(Some(PATIENCE)).unwrap();
    let incoming = tokio::time::timeout(PATIENCE, server.accept())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(incoming.labels["address_family"], "unix");
    exchange(&mut outside, &mut unix(incoming.socket));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_connects_tcp_and_reports_errors() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let _egress = egress(&daemon.path, "net=out", &[]);
    wait_listed(&root, &labels(&[("net", "out")])).await;

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let want = to_loopback(&port);
    let conn = root.client_connect(&want).await.unwrap();
    assert_blocking(&conn.socket);
    let (mut far, _) = listener.accept().unwrap();
    far.set_read_timeout(Some(PATIENCE)).unwrap();
    exchange(&mut unix(conn.socket), &mut far);

    // Refused: a port nobody listens on any more.
    let closed_port = {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
            .to_string()
    };
    let refused = to_loopback(&closed_port);
    let err = root.client_connect(&refused).await.unwrap_err();
    assert_eq!(err.code, Code::Unavailable);
    assert!(
        err.message.contains("Connection refused"),
        "{}",
        err.message
    );

    let missing = labels(&[
        ("net", "out"),
        ("address_family", "inet"),
        ("server_address", "127.0.0.1"),
    ]);
    let err = root.client_connect(&missing).await.unwrap_err();
    assert_eq!(
        (err.code, err.message.as_str()),
        (Code::InvalidArgument, "Missing label server_port")
    );
    let named = labels(&[
        ("net", "out"),
        ("address_family", "inet"),
        ("server_address", "localhost"),
        ("server_port", "80"),
    ]);
    let err = root.client_connect(&named).await.unwrap_err();
    assert_eq!(err.code, Code::InvalidArgument);
    assert!(
        err.message.contains("not a numeric IP address"),
        "{}",
        err.message
    );
    let err = root
        .client_connect(&labels(&[("net", "out")]))
        .await
        .unwrap_err();
    assert_eq!(err.message, "Missing label address_family");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_refuses_unix_paths_outside_the_allow_list() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let allowed = daemon.dir.path().join("allowed");
    std::fs::create_dir(&allowed).unwrap();
    let _egress = egress(
        &daemon.path,
        "net=unix",
        &["--allow-unix-prefix", allowed.to_str().unwrap()],
    );
    wait_listed(&root, &labels(&[("net", "unix")])).await;

    // The switchboard's own socket: never.
    let own = labels(&[
        ("net", "unix"),
        ("address_family", "unix"),
        ("server_path", daemon.path.to_str().unwrap()),
    ]);
    let err = root.client_connect(&own).await.unwrap_err();
    assert_eq!(err.code, Code::PermissionDenied);
    assert!(
        err.message.contains("not under a prefix"),
        "{}",
        err.message
    );
    // Nor by walking out of the allowed directory.
    let sneaky = format!("{}/../switchboard", allowed.display());
    let err = root
        .client_connect(&labels(&[
            ("net", "unix"),
            ("address_family", "unix"),
            ("server_path", &sneaky),
        ]))
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::PermissionDenied);

    // Inside the allowed directory: works.
    let inside = allowed.join("svc.sock");
    let listener = std::os::unix::net::UnixListener::bind(&inside).unwrap();
    let ok = labels(&[
        ("net", "unix"),
        ("address_family", "unix"),
        ("server_path", inside.to_str().unwrap()),
    ]);
    let conn = root.client_connect(&ok).await.unwrap();
    let (far, _) = listener.accept().unwrap();
    far.set_read_timeout(Some(PATIENCE)).unwrap();
    exchange(&mut unix(conn.socket), &mut { far });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_and_egress_survive_a_switchboard_restart() {
    let mut daemon = Daemon::start();
    let (ingress_tool, bound) = ingress(
        "127.0.0.1:0",
        &daemon.path,
        r#"{"app":"web","net":"local"}"#,
    );
    let egress_tool = egress(&daemon.path, "net=out", &[]);
    let resolver_tool = resolver(&daemon.path, "net=out", &["--no-dns"]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    {
        // Both must have registered once: a tool that never reached the
        // switchboard exits rather than retrying.
        let root = daemon.connect().await;
        wait_listed(&root, &labels(&[("net", "out")])).await;
        drop(connect_by_name(&root, &by_name("localhost", &port)).await);
        drop(listener.accept().unwrap());
    }
    assert!(daemon.terminate().success());

    // A new switchboard on the same path.
    let restarted = Command::new(FLOWER)
        .arg("switchboard")
        .arg(&daemon.path)
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    daemon.child = restarted;
    let deadline = std::time::Instant::now() + PATIENCE;
    let root = loop {
        match Switchboard::connect(&daemon.path).await {
            Ok(sb) => break sb,
            Err(e) if std::time::Instant::now() > deadline => panic!("no restart: {e}"),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    };
    wait_listed(&root, &labels(&[("net", "out")])).await;
    let mut server = root
        .server_start(&labels(&[("app", "web"), ("net", "local")]))
        .await
        .unwrap();

    let mut outside = tcp(&bound);
    let incoming = tokio::time::timeout(PATIENCE, server.accept())
        .await
        .unwrap()
        .unwrap();
    exchange(&mut outside, &mut unix(incoming.socket));

    let conn = root.client_connect(&to_loopback(&port)).await.unwrap();
    let (mut far, _) = listener.accept().unwrap();
    far.set_read_timeout(Some(PATIENCE)).unwrap();
    exchange(&mut unix(conn.socket), &mut far);

    // The resolver re-registered too.
    let conn = connect_by_name(&root, &by_name("localhost", &port)).await;
    let (mut far, _) = listener.accept().unwrap();
    far.set_read_timeout(Some(PATIENCE)).unwrap();
    exchange(&mut unix(conn.socket), &mut far);
    drop((ingress_tool, egress_tool, resolver_tool));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_forwarded_connections_leak_nothing() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let mut server = root
        .server_start(&labels(&[("app", "web"), ("net", "local")]))
        .await
        .unwrap();
    let (ingress_tool, bound) = ingress(
        "127.0.0.1:0",
        &daemon.path,
        r#"{"app":"web","net":"local"}"#,
    );
    let egress_tool = egress(&daemon.path, "net=out", &[]);
    wait_listed(&root, &labels(&[("net", "out")])).await;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let out = to_loopback(&port);

    let one_each = async |server: &mut flower_proto::client::Server| {
        let mut outside = tcp(&bound);
        let incoming = tokio::time::timeout(PATIENCE, server.accept())
            .await
            .unwrap()
            .unwrap();
        exchange(&mut outside, &mut unix(incoming.socket));
        let conn = root.client_connect(&out).await.unwrap();
        let (mut far, _) = listener.accept().unwrap();
        far.set_read_timeout(Some(PATIENCE)).unwrap();
        exchange(&mut unix(conn.socket), &mut far);
    };
    one_each(&mut server).await;
    let base = (
        daemon.baseline(&root).await,
        fd_count(ingress_tool.0.id()),
        fd_count(egress_tool.0.id()),
    );
    for _ in 0..2000 {
        one_each(&mut server).await;
    }
    daemon.settle_fds(base.0).await;
    wait_until("ingress descriptors to settle", || {
        fd_count(ingress_tool.0.id()) <= base.1
    });
    wait_until("egress descriptors to settle", || {
        fd_count(egress_tool.0.id()) <= base.2
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cat_reaches_localhost_by_name_through_resolver_and_egress() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let _egress = egress(&daemon.path, "net=out", &[]);
    let _resolver = resolver(&daemon.path, "net=out", &["--no-dns"]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let name = by_name("localhost", &port);

    // The library sees what the name resolved to.
    let conn = connect_by_name(&root, &name).await;
    assert_eq!(conn.labels["server_address"], "127.0.0.1");
    assert_eq!(conn.labels["server_port"], port);
    assert_eq!(conn.labels["net"], "out");
    let (mut far, _) = listener.accept().unwrap();
    far.set_read_timeout(Some(PATIENCE)).unwrap();
    exchange(&mut unix(conn.socket), &mut far);

    // And so does `flower cat`, with the exact form from the docs.
    let mut cat = Command::new(FLOWER)
        .arg("cat")
        .arg(&daemon.path)
        .arg(format!(
            r#"{{"server_hostname":"localhost","server_service":"{port}"}}"#
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    cat.stdin.take().unwrap().write_all(b"ping").unwrap();
    let (mut far, _) = listener.accept().unwrap();
    far.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut got = [0; 4];
    far.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    far.write_all(b"pong").unwrap();
    drop(far);
    let mut out = Vec::new();
    cat.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    assert_eq!(out, b"pong");
    assert!(wait_child(&mut cat).success());

    // Unknown names and services are clear errors.
    let err = root
        .client_connect(&by_name("nowhere.invalid", "80"))
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::NotFound);
    assert!(
        err.message.starts_with("Cannot resolve nowhere.invalid"),
        "{err}"
    );
    let err = root
        .client_connect(&by_name("localhost", "no-such-service"))
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::InvalidArgument);
    assert!(err.message.contains("no-such-service"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_whose_first_address_refuses_still_connects() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    // Nothing listens on 127.0.0.2 (or on ::1) at that port: those refuse.
    let hosts = daemon.dir.path().join("hosts");
    std::fs::write(
        &hosts,
        "127.0.0.2 twohomes\n::1 twohomes\n127.0.0.1 twohomes\n",
    )
    .unwrap();
    let _egress = egress(&daemon.path, "net=out", &[]);
    let _resolver = resolver(
        &daemon.path,
        "net=out",
        &["--no-dns", "--hosts-file", hosts.to_str().unwrap()],
    );
    let name = by_name("twohomes", &port);
    connect_by_name(&root, &name).await;
    // Candidates are tried in random order, so over 30 connects the refusing
    // addresses come first most times; every connect must still succeed.
    for _ in 0..30 {
        let conn = root.client_connect(&name).await.unwrap();
        assert_eq!(conn.labels["server_address"], "127.0.0.1");
    }
    let mut accepted = 0;
    while listener.accept().is_ok() {
        accepted += 1;
    }
    assert_eq!(accepted, 31);
}
