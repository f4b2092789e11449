//! `flower`: the switchboard daemon and its tools, as git-style subcommands.

mod args;
mod nri;
mod pod;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

use args::{UsageError, default_path, parse_labels, path_and_labels};

/// Label-routed socket switchboard.
///
/// Processes ask the switchboard for connections by labels instead of calling
/// bind() and connect(). PATH defaults to $FLOWER_SWITCHBOARD, else
/// /run/flower/switchboard for root, else $XDG_RUNTIME_DIR/flower/switchboard.
/// LABELS are a JSON object ('{"app":"web"}') and/or key=value words.
#[derive(Parser)]
#[command(name = "flower", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the switchboard daemon on PATH.
    ///
    /// Replaces a stale socket file left by a dead daemon; refuses to take over a
    /// live one. SIGTERM or SIGINT removes the socket file and exits 0.
    /// Logs go to stderr, filtered by RUST_LOG (default: info). Under systemd,
    /// Type=notify and socket activation (ListenSequentialPacket=) are supported;
    /// see examples/systemd.
    Switchboard {
        /// Socket path to listen on.
        path: Option<PathBuf>,
        /// Permission bits of the socket file, in octal (connecting needs write).
        #[arg(long, default_value = "0600", value_parser = parse_mode)]
        mode: u32,
        /// Group to own the socket file (name or number), e.g. with --mode 0660.
        #[arg(long)]
        group: Option<String>,
        /// Seconds a registered server, egress or resolver may take to answer.
        #[arg(long, default_value_t = 10.0)]
        call_timeout: f64,
        /// Log as JSON lines.
        #[arg(long)]
        log_json: bool,
        /// Descriptor limit (each handle and target holds one). Default: raise the
        /// soft limit to the hard one, and the hard one to fs.nr_open if permitted.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(16..))]
        nofile: Option<u64>,
        /// Worker threads. 1 (the default) serves everything on one thread, with
        /// no cross-thread wake-ups: on 2 CPUs with 1 to 8 clients it measured a
        /// little faster on average than a pool (BENCHMARKS.md). More spreads
        /// handles over a pool, for many busy clients on many CPUs.
        #[arg(long, value_name = "N", default_value_t = 1,
              value_parser = clap::value_parser!(u16).range(1..))]
        threads: u16,
        /// Serve the pod API (gRPC, mode 0600: whoever can open it controls every
        /// pod) on this socket. Default with --pods-dir: /run/flower/pods.sock for
        /// root, else $XDG_RUNTIME_DIR/flower/pods.sock.
        #[arg(long, value_name = "PATH")]
        pods_socket: Option<PathBuf>,
        /// Where pod endpoints (DIR/UID/switchboard) and registrations live. Default
        /// with --pods-socket: /run/flower/pods for root, else
        /// $XDG_RUNTIME_DIR/flower/pods.
        #[arg(long, value_name = "DIR")]
        pods_dir: Option<PathBuf>,
        /// Handles one pod or container endpoint may hold at a time (accepted and
        /// constrained); beyond it a connection is closed, Constrain fails.
        #[arg(long, value_name = "N", default_value_t = flower_switchboard::pods::DEFAULT_MAX_HANDLES as u32,
              value_parser = clap::value_parser!(u32).range(1..))]
        pod_max_handles: u32,
    },
    /// Connect to the target matching LABELS and relay stdin/stdout, like nc.
    ///
    /// Prints the connection labels as JSON on stderr once connected. With -l,
    /// registers as a server under LABELS instead and serves one connection.
    /// Each direction is half-closed at end of file; exits when both are done.
    Cat {
        /// Listen: register as a server and accept a single connection.
        #[arg(short, long)]
        listen: bool,
        /// [PATH] LABELS...
        #[arg(required = true, value_name = "[PATH] LABELS")]
        args: Vec<String>,
    },
    /// Turn accepted connections into switchboard connections.
    #[command(subcommand)]
    Ingress(IngressCommand),
    /// Make outbound connections on the switchboard's behalf.
    #[command(subcommand)]
    Egress(EgressCommand),
    /// List the targets matching LABELS, one JSON object per line.
    Ls {
        /// [PATH] [LABELS...]
        #[arg(value_name = "[PATH] [LABELS]")]
        args: Vec<String>,
    },
    /// Run CMD with a constrained handle as its only extra descriptor.
    ///
    /// The descriptor's number is in FLOWER_SWITCHBOARD_FD (FLOWER_SWITCHBOARD is
    /// removed); the flower tools and client libraries use it instead of a path.
    /// The handle can do no more than this one: --rights can only drop rights
    /// (omitted, the child keeps them all), --in labels are forced onto everything
    /// it registers, --out labels onto everything it connects to or lists.
    ///
    /// Example: flower run --rights SERVER_START --in app=web -- flower cat -l app=web
    Run {
        /// Socket path of the switchboard (or FLOWER_SWITCHBOARD_FD's handle).
        path: Option<PathBuf>,
        /// Rights to keep, comma-separated (e.g. SERVER_START,CLIENT_CONNECT).
        #[arg(long, value_name = "R,..", value_parser = pod::parse_rights)]
        rights: Option<pod::RightList>,
        /// Labels forced onto everything the child registers.
        #[arg(long = "in", value_name = "LABELS")]
        in_labels: Vec<String>,
        /// Labels forced onto everything the child connects to or lists.
        #[arg(long = "out", value_name = "LABELS")]
        out_labels: Vec<String>,
        /// The command and its arguments.
        #[arg(last = true, required = true, value_name = "CMD ARGS")]
        command: Vec<std::ffi::OsString>,
    },
    /// Register and revoke pods through the pod API (see flower switchboard
    /// --pods-socket).
    #[command(subcommand)]
    Pod(pod::PodCommand),
    Nri(nri::NriArgs),
}

#[derive(Subcommand)]
enum IngressCommand {
    /// Accept on ADDRESS and push each connection to the server matching LABELS.
    ///
    /// ADDRESS is IPv4:port (0.0.0.0:80), [IPv6]:port ([::]:80) or a Unix socket
    /// path. Port 0 picks a free port and logs it. Each connection carries the labels
    /// address_family, client_address, client_port, server_address, server_port
    /// (Unix: address_family=unix, server_path). A failed push closes that
    /// connection only; if the switchboard restarts, the ingress reconnects.
    Accept {
        /// Where to listen.
        #[arg(value_parser = parse_address)]
        address: flower_ingress::Address,
        /// [PATH] LABELS...
        #[arg(required = true, value_name = "[PATH] LABELS")]
        args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum EgressCommand {
    /// Register as an egress under LABELS and make the connections clients ask for.
    ///
    /// Connection labels address_family=inet|inet6 with numeric server_address and
    /// server_port make a TCP connection; address_family=unix with server_path
    /// connects to a Unix stream socket, only under an --allow-unix-prefix directory.
    /// Re-registers when the switchboard restarts.
    Connect {
        /// Allow Unix-path connects under this directory (repeatable; none by default).
        #[arg(long = "allow-unix-prefix", value_name = "DIR")]
        allow_unix_prefix: Vec<PathBuf>,
        /// Seconds to wait for an outbound connect.
        #[arg(long, default_value_t = 10.0)]
        connect_timeout: f64,
        /// [PATH] LABELS...
        #[arg(required = true, value_name = "[PATH] LABELS")]
        args: Vec<String>,
    },
    /// Register as a resolver that turns host names into addresses for egress.
    ///
    /// Connects that carry server_hostname and server_service (and do not
    /// contradict LABELS) are expanded into one candidate per address, with
    /// address_family, server_address and server_port; LABELS are added to each, so
    /// they reach the egress registered under the same LABELS. The switchboard tries
    /// the candidates in random order until one connects. Names come from the
    /// hosts file, then localhost, then DNS (/etc/resolv.conf); answers are cached
    /// for the records' TTL (hosts-file answers for 10 s). Services are port numbers
    /// or names from /etc/services.
    ///
    /// Example: flower egress resolve net=out & flower egress connect net=out &
    ///          flower cat server_hostname=localhost server_service=8080
    Resolve {
        /// Hosts file consulted before DNS.
        #[arg(long, default_value = "/etc/hosts", value_name = "FILE")]
        hosts_file: PathBuf,
        /// Answer only from numeric names, the hosts file and localhost.
        #[arg(long)]
        no_dns: bool,
        /// [PATH] LABELS...
        #[arg(required = true, value_name = "[PATH] LABELS")]
        args: Vec<String>,
    },
}

fn parse_address(s: &str) -> Result<flower_ingress::Address, String> {
    s.parse()
}

fn seconds(value: f64, flag: &str) -> Result<Duration, UsageError> {
    Duration::try_from_secs_f64(value).map_err(|_| UsageError(format!("invalid {flag} {value}")))
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("{s:?} is not an octal file mode"))
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(command: Command, activated: Option<std::os::fd::OwnedFd>) -> Result<()> {
    match command {
        Command::Switchboard {
            path,
            mode,
            group,
            call_timeout,
            log_json,
            nofile,
            threads: _,
            pods_socket,
            pods_dir,
            pod_max_handles,
        } => {
            init_logging(log_json);
            let path = match path {
                Some(p) => p,
                None => default_path()?,
            };
            let call_timeout = seconds(call_timeout, "--call-timeout")?;
            let config = flower_switchboard::Config { call_timeout };
            let pods = match (pods_socket, pods_dir) {
                (None, None) => None,
                (socket, dir) => Some(flower_switchboard::daemon::PodsOptions {
                    socket: socket.map_or_else(pod::default_pods_socket, Ok)?,
                    dir: dir.map_or_else(pod::default_pods_dir, Ok)?,
                    max_handles: pod_max_handles as usize,
                }),
            };
            flower_switchboard::daemon::run(flower_switchboard::daemon::Options {
                path,
                mode,
                group,
                nofile,
                config,
                activated,
                pods,
            })
            .await?;
        }
        Command::Cat { listen, args } => {
            init_logging(false);
            let (path, labels) = path_and_labels(&args)?;
            flowercat::cat(&path, &labels, listen).await?;
        }
        Command::Ingress(IngressCommand::Accept { address, args }) => {
            init_logging(false);
            let (path, labels) = path_and_labels(&args)?;
            flower_ingress::accept(&address, &path, &labels).await?;
        }
        Command::Egress(EgressCommand::Connect {
            allow_unix_prefix,
            connect_timeout,
            args,
        }) => {
            init_logging(false);
            let (path, labels) = path_and_labels(&args)?;
            let options = flower_egress::Options {
                allowed_unix_prefixes: allow_unix_prefix,
                connect_timeout: seconds(connect_timeout, "--connect-timeout")?,
            };
            flower_egress::connect(&path, &labels, options).await?;
        }
        Command::Egress(EgressCommand::Resolve {
            hosts_file,
            no_dns,
            args,
        }) => {
            init_logging(false);
            let (path, labels) = path_and_labels(&args)?;
            let options = flower_egress::ResolveOptions {
                hosts_file,
                dns: !no_dns,
                ..Default::default()
            };
            flower_egress::resolve(&path, &labels, options).await?;
        }
        Command::Ls { args } => {
            init_logging(false);
            let (path, labels) = path_and_labels(&args)?;
            flowercat::ls(&path, &labels, &mut std::io::stdout().lock()).await?;
        }
        Command::Run {
            path,
            rights,
            in_labels,
            out_labels,
            command,
        } => {
            init_logging(false);
            let path = match path {
                Some(p) => p,
                None => default_path()?,
            };
            let (in_labels, out_labels) = (parse_labels(&in_labels)?, parse_labels(&out_labels)?);
            run::run(
                &path,
                rights.map(|r| r.0),
                &in_labels,
                &out_labels,
                &command,
            )
            .await?;
        }
        Command::Pod(command) => {
            init_logging(false);
            pod::run(command).await?;
        }
        Command::Nri(args) => {
            init_logging(args.log_json);
            nri::run(args).await?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let threads = match &cli.command {
        Command::Switchboard { threads, .. } => Some(*threads),
        _ => None,
    };
    // Before the runtime opens its own descriptors (see `daemon::Options::activated`).
    let activated = match threads.map(|_| flower_switchboard::systemd::activated_listener()) {
        Some(Err(e)) => {
            eprintln!("flower: {e}");
            return ExitCode::FAILURE;
        }
        Some(Ok(fd)) => fd,
        None => None,
    };
    // One thread unless the switchboard is asked for a pool: the tools' work per
    // connection is a few syscalls, and a pool only adds cross-thread wake-ups.
    let mut builder = match threads {
        Some(n) if n > 1 => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n.into());
            builder
        }
        _ => tokio::runtime::Builder::new_current_thread(),
    };
    let runtime = builder.enable_all().build().expect("tokio runtime");
    let result = runtime.block_on(run(cli.command, activated));
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flower: {e:#}");
            if e.is::<UsageError>() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    };
    // Do not wait for a blocked stdin reader thread at runtime shutdown.
    runtime.shutdown_background();
    code
}
