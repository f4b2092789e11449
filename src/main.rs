//! `flower`: the switchboard daemon and its tools, as git-style subcommands.

mod args;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

use args::{UsageError, default_path, path_and_labels};

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
        /// Seconds one connect may take in all, across resolver candidates and
        /// replicas.
        #[arg(long, default_value_t = 30.0)]
        connect_deadline: f64,
        /// Calls served at once per channel; a client pipelining more waits (the
        /// switchboard stops reading its channel). Also bounds its unsent replies.
        #[arg(long, value_name = "N", default_value_t = 64,
              value_parser = clap::value_parser!(u32).range(1..))]
        max_calls_in_flight: u32,
        /// Seconds a reply may wait for a peer that does not read; then the
        /// channel is closed.
        #[arg(long, default_value_t = 10.0)]
        send_timeout: f64,
        /// Handles and registrations one uid may hold through the socket path
        /// (a new connection over it is refused with RESOURCE_EXHAUSTED).
        #[arg(long, value_name = "N", default_value_t = 16_384)]
        max_handles_per_uid: usize,
        /// Calls in flight across all the channels of one uid (or one
        /// embedder-made handle); past it their channels wait (backpressure).
        #[arg(long, value_name = "N", default_value_t = 1_024)]
        max_calls_per_uid: usize,
        /// Handles and registrations one embedder-made handle (one per pod) and
        /// everything derived from it may hold.
        #[arg(long, value_name = "N", default_value_t = 1_024)]
        max_handles_per_endpoint: usize,
        /// Descriptors kept free for accepting and refusing clearly when handles
        /// have used the rest of the limit (at most a quarter of it).
        #[arg(long, value_name = "N", default_value_t = 256)]
        reserve_descriptors: usize,
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
        /// Allow TCP connects to this CIDR block (repeatable). Once any is given,
        /// only allowed blocks are reachable. Without any, everything but node-local
        /// addresses (loopback, link-local, 0.0.0.0, ::) is.
        #[arg(long, value_name = "CIDR")]
        allow: Vec<flower_egress::Cidr>,
        /// Refuse TCP connects to this CIDR block (repeatable); wins over --allow.
        /// IPv4-mapped IPv6 addresses are matched as the IPv4 address they map.
        #[arg(long, value_name = "CIDR")]
        deny: Vec<flower_egress::Cidr>,
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
            connect_deadline,
            max_calls_in_flight,
            send_timeout,
            max_handles_per_uid,
            max_calls_per_uid,
            max_handles_per_endpoint,
            reserve_descriptors,
            log_json,
            nofile,
            threads: _,
        } => {
            init_logging(log_json);
            let path = match path {
                Some(p) => p,
                None => default_path()?,
            };
            let call_timeout = seconds(call_timeout, "--call-timeout")?;
            let config = flower_switchboard::Config {
                call_timeout,
                connect_deadline: seconds(connect_deadline, "--connect-deadline")?,
                channel: flower_proto::rpc::Limits {
                    calls_in_flight: max_calls_in_flight as usize,
                    send_timeout: Some(seconds(send_timeout, "--send-timeout")?),
                },
                max_handles_per_uid,
                max_handles_per_endpoint,
                max_calls_per_uid,
                reserve_descriptors,
            };
            flower_switchboard::daemon::run(flower_switchboard::daemon::Options {
                path,
                mode,
                group,
                nofile,
                config,
                activated,
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
            allow,
            deny,
            args,
        }) => {
            init_logging(false);
            let (path, labels) = path_and_labels(&args)?;
            let options = flower_egress::Options {
                allowed_unix_prefixes: allow_unix_prefix,
                connect_timeout: seconds(connect_timeout, "--connect-timeout")?,
                policy: flower_egress::Policy { allow, deny },
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
