//! `flower`: the switchboard daemon and its tools, as git-style subcommands.

#![forbid(unsafe_code)]

mod args;
mod nri;
mod pod;
mod run;

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use flower_tools::ready::{ReadyFd, Startup};

/// The daemon's connect path allocates many small, short-lived blocks (frames, labels,
/// tokio's aligned task cells); mimalloc serves them in a fraction of glibc's
/// instructions (BENCHMARKS.md, "Connect path, third pass").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use args::{UsageError, default_path, parse_labels, parse_seconds, path_and_labels};

/// Label-routed socket switchboard.
///
/// Processes ask the switchboard for connections by labels instead of calling
/// bind() and connect(). PATH defaults to $FLOWER_SWITCHBOARD, else
/// /run/flower/switchboard for root, else $XDG_RUNTIME_DIR/flower/switchboard.
/// LABELS are a JSON object ('{"app":"web"}') and/or key=value words (one word may
/// hold several: app=web,pod=a). PATH must contain a '/' (./sb); a word that is
/// neither is a usage error. Exit status: 0 done, 1 failed (the message says why),
/// 2 bad command line. RUST_LOG=debug logs every step on stderr.
#[derive(Parser)]
#[command(name = "flower", version, propagate_version = true)]
struct Cli {
    /// Log as JSON lines (every subcommand logs to stderr, filtered by RUST_LOG).
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

/// How long a client command waits.
#[derive(Args, Clone, Copy, Debug)]
struct Patience {
    /// Give up after SECONDS: connecting to the switchboard and each call to it are
    /// bounded by it (default 30 s).
    #[arg(short = 'w', long = "timeout", value_name = "SECONDS", value_parser = parse_seconds)]
    wait: Option<Duration>,
}

/// What a tool that registers or listens takes: a bound, readiness, and where.
#[derive(Args, Clone, Debug)]
struct Tool {
    #[command(flatten)]
    wait: Patience,
    /// Once ready (registered, or listening), write one line to descriptor N (opened
    /// by the caller: the labels, or the bound address) and close it.
    #[arg(long, value_name = "N")]
    ready_fd: Option<RawFd>,
    /// [PATH] LABELS...
    #[arg(required = true, value_name = "[PATH] LABELS")]
    args: Vec<String>,
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
        #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = parse_seconds)]
        call_timeout: Duration,
        /// Seconds one connect may take in all, across resolver candidates and
        /// replicas.
        #[arg(long, value_name = "SECONDS", default_value = "30", value_parser = parse_seconds)]
        connect_deadline: Duration,
        /// Calls served at once per channel; a client pipelining more waits (the
        /// switchboard stops reading its channel). Also bounds its unsent replies.
        #[arg(long, value_name = "N", default_value_t = 64,
              value_parser = clap::value_parser!(u32).range(1..))]
        max_calls_in_flight: u32,
        /// Seconds a reply may wait for a peer that does not read; then the
        /// channel is closed.
        #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = parse_seconds)]
        send_timeout: Duration,
        /// Handles and registrations one uid may hold through the socket path
        /// (a new connection over it is refused with RESOURCE_EXHAUSTED).
        #[arg(long, value_name = "N", default_value_t = 16_384)]
        max_handles_per_uid: usize,
        /// Calls in flight across all the channels of one uid (or one
        /// embedder-made handle); past it their channels wait (backpressure).
        #[arg(long, value_name = "N", default_value_t = 1_024)]
        max_calls_per_uid: usize,
        /// Handles and registrations one embedder-made handle and everything
        /// derived from it may hold (pods are bounded by --pod-max-handles and
        /// --max-targets-per-endpoint instead).
        #[arg(long, value_name = "N", default_value_t = 1_024)]
        max_handles_per_endpoint: usize,
        /// Targets and resolvers one uid may have registered through the socket
        /// path at once (bounds what one registrant adds to every lookup).
        #[arg(long, value_name = "N", default_value_t = 16_384)]
        max_targets_per_uid: usize,
        /// Targets and resolvers one pod (its containers included), or one
        /// embedder-made handle and everything derived from it, may have
        /// registered at once.
        #[arg(long, value_name = "N", default_value_t = 256)]
        max_targets_per_endpoint: usize,
        /// Descriptors kept free for accepting and refusing clearly when handles
        /// have used the rest of the limit (at most a quarter of it).
        #[arg(long, value_name = "N", default_value_t = 256)]
        reserve_descriptors: usize,
        /// New handles and registrations per second one uid (or one pod, or one
        /// embedder-made handle) may make: Constrain, ServerStart, EgressStart and
        /// ResolverStart calls. Past it each such call waits for its turn, keeping
        /// its place among the calls in flight, so a client that makes and drops
        /// handles as fast as it can (whose hang-ups the switchboard must clean up)
        /// is slowed down to this rate and cannot take the switchboard's time from
        /// other uids. 0: no bound.
        #[arg(long, value_name = "RATE", default_value_t = 1_024.0,
              value_parser = parse_rate)]
        new_handles_per_second: f64,
        /// How many new handles and registrations an owner below its rate may make
        /// at once before --new-handles-per-second applies.
        #[arg(long, value_name = "N", default_value_t = 4_096,
              value_parser = clap::value_parser!(u32).range(1..))]
        new_handles_burst: u32,
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
    /// Each direction is half-closed at end of file; exits when both are done, or
    /// at once (quietly) when stdout is closed, as in `flower cat app=x | head -1`.
    ///
    /// Scripts: `flower cat -l app=x </dev/null & flower wait app=x && flower cat app=x`.
    Cat {
        /// Listen: register as a server and accept a single connection. With -w,
        /// also give up if no client comes within SECONDS.
        #[arg(short, long)]
        listen: bool,
        /// With -l: keep serving, one connection after another (with --exec, all at
        /// once), like nc -l -k.
        #[arg(short, long, requires = "listen")]
        keep: bool,
        /// Do not print the connection labels.
        #[arg(short, long)]
        quiet: bool,
        /// Run CMD [ARGS...] per connection with the socket as its stdin and stdout
        /// and the labels in FLOWER_LABELS (JSON) and FLOWER_LABEL_<key>, like inetd or
        /// socat EXEC:. Must come last.
        #[arg(long, value_name = "CMD", num_args = 1.., allow_hyphen_values = true)]
        exec: Option<Vec<String>>,
        #[command(flatten)]
        tool: Tool,
    },
    /// Wait until a target matching LABELS is registered (at most -w, default 30 s).
    ///
    /// Exits 0 once at least one matches, 1 if none did in time. A switchboard
    /// that is still starting is waited for too; with no LABELS, only the
    /// switchboard is: `flower switchboard & flower wait`.
    Wait {
        #[command(flatten)]
        wait: Patience,
        /// [PATH] LABELS...
        #[arg(value_name = "[PATH] [LABELS]")]
        args: Vec<String>,
    },
    /// Turn accepted connections into switchboard connections.
    #[command(subcommand)]
    Ingress(IngressCommand),
    /// Make outbound connections on the switchboard's behalf.
    #[command(subcommand)]
    Egress(EgressCommand),
    /// Print a shell completion script: flower completions bash > /etc/bash_completion.d/flower
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): flower man | man -l -
    Man,
    /// Print the version.
    Version,
    /// List the targets matching LABELS, oldest first, one JSON object per line.
    Ls {
        /// Long form: key=value words, quoted for the shell where needed.
        #[arg(short, long)]
        long: bool,
        /// Keep watching: print {"added":LABELS} and {"removed":LABELS} lines (with
        /// -l: "+ words" and "- words") as targets come and go, until interrupted.
        /// Lists again every 100 ms.
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        wait: Patience,
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
    /// path (anything with a '/' or without a ':'). Port 0 picks a free port and logs
    /// it (and --ready-fd writes it). Each connection carries the labels
    /// address_family, client_address, client_port, server_address, server_port
    /// (Unix: address_family=unix, server_path). A failed push closes that
    /// connection only; if the switchboard restarts, the ingress reconnects.
    /// SIGTERM or SIGINT exit 0 and remove a Unix socket file; a stale one left by a
    /// killed ingress is replaced at start.
    Accept {
        /// Where to listen.
        #[arg(value_parser = parse_address)]
        address: flower_ingress::Address,
        /// Permission bits of a Unix socket file, in octal (connecting needs write).
        #[arg(long, value_parser = parse_mode)]
        mode: Option<u32>,
        #[command(flatten)]
        tool: Tool,
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
        #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = parse_seconds)]
        connect_timeout: Duration,
        /// Allow TCP connects to this CIDR block (repeatable). Once any is given,
        /// only allowed blocks are reachable. Without any, everything but node-local
        /// addresses (loopback, link-local, 0.0.0.0, ::) is.
        #[arg(long, value_name = "CIDR")]
        allow: Vec<flower_egress::Cidr>,
        /// Refuse TCP connects to this CIDR block (repeatable); wins over --allow.
        /// IPv4-mapped IPv6 addresses are matched as the IPv4 address they map.
        #[arg(long, value_name = "CIDR")]
        deny: Vec<flower_egress::Cidr>,
        #[command(flatten)]
        tool: Tool,
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
        #[command(flatten)]
        tool: Tool,
    },
}

fn parse_address(s: &str) -> Result<flower_ingress::Address, String> {
    s.parse()
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("{s:?} is not an octal file mode"))
}

/// A rate per second: 0 or more, finite (`0.5` is one every two seconds).
fn parse_rate(s: &str) -> Result<f64, String> {
    s.parse::<f64>()
        .ok()
        .filter(|r| r.is_finite() && *r >= 0.0)
        .ok_or_else(|| format!("{s:?} is not a rate per second (0 or more)"))
}

/// Logs to stderr, filtered by RUST_LOG (default: info). Only the first call counts.
fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Writes `bytes` to stdout; a reader that went away (`| head`) is not an error.
fn print(bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::from(e).context("writing to stdout"))
        }
        _ => Ok(()),
    }
}

impl Tool {
    /// The switchboard path, the labels, and how to start.
    fn start(&self, ready: Option<ReadyFd>) -> Result<(PathBuf, flower_proto::Labels, Startup)> {
        let (path, labels) = path_and_labels(&self.args)?;
        let startup = Startup {
            wait: self.wait.wait,
            ready,
        };
        Ok((path, labels, startup))
    }
}

impl Command {
    /// The descriptor `--ready-fd` names, if any.
    fn ready_fd(&self) -> Result<Option<RawFd>, UsageError> {
        Ok(match self {
            Command::Cat {
                listen: false,
                tool: Tool {
                    ready_fd: Some(_), ..
                },
                ..
            } => return Err(UsageError("--ready-fd needs -l".into())),
            Command::Cat { tool, .. }
            | Command::Ingress(IngressCommand::Accept { tool, .. })
            | Command::Egress(EgressCommand::Connect { tool, .. })
            | Command::Egress(EgressCommand::Resolve { tool, .. }) => tool.ready_fd,
            _ => None,
        })
    }
}

async fn run(
    command: Command,
    activated: Option<std::os::fd::OwnedFd>,
    ready: Option<ReadyFd>,
) -> Result<()> {
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
            max_targets_per_uid,
            max_targets_per_endpoint,
            reserve_descriptors,
            new_handles_per_second,
            new_handles_burst,
            nofile,
            threads: _,
            pods_socket,
            pods_dir,
            pod_max_handles,
        } => {
            let path = match path {
                Some(p) => p,
                None => default_path()?,
            };
            let config = flower_switchboard::Config {
                call_timeout,
                connect_deadline,
                channel: flower_proto::rpc::Limits {
                    calls_in_flight: max_calls_in_flight as usize,
                    send_timeout: Some(send_timeout),
                },
                max_handles_per_uid,
                max_handles_per_endpoint,
                max_targets_per_uid,
                max_targets_per_endpoint,
                max_calls_per_uid,
                reserve_descriptors,
                new_handles: (new_handles_per_second > 0.0).then_some(flower_switchboard::Rate {
                    per_second: new_handles_per_second,
                    burst: new_handles_burst,
                }),
            };
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
        Command::Cat {
            listen,
            keep,
            quiet,
            exec,
            tool,
        } => {
            let (path, labels) = path_and_labels(&tool.args)?;
            let options = flower_tools::CatOptions {
                listen,
                keep,
                quiet,
                exec,
                wait: tool.wait.wait,
                ready,
            };
            flower_tools::cat(&path, &labels, options).await?;
        }
        Command::Wait { wait, args } => {
            let (path, labels) = path_and_labels(&args)?;
            let limit = wait.wait.unwrap_or(flower_tools::DEFAULT_WAIT);
            flower_tools::wait(&path, &labels, limit).await?;
        }
        Command::Ingress(IngressCommand::Accept {
            address,
            mode,
            tool,
        }) => {
            let (path, labels, startup) = tool.start(ready)?;
            let options = flower_ingress::Options { mode };
            flower_ingress::accept(&address, &path, &labels, options, startup).await?;
        }
        Command::Egress(EgressCommand::Connect {
            allow_unix_prefix,
            connect_timeout,
            allow,
            deny,
            tool,
        }) => {
            let (path, labels, startup) = tool.start(ready)?;
            let options = flower_egress::Options {
                allowed_unix_prefixes: allow_unix_prefix,
                connect_timeout,
                policy: flower_egress::Policy { allow, deny },
            };
            flower_egress::connect(&path, &labels, options, startup).await?;
        }
        Command::Egress(EgressCommand::Resolve {
            hosts_file,
            no_dns,
            tool,
        }) => {
            let (path, labels, startup) = tool.start(ready)?;
            let options = flower_egress::ResolveOptions {
                hosts_file,
                dns: !no_dns,
                ..Default::default()
            };
            flower_egress::resolve(&path, &labels, options, startup).await?;
        }
        Command::Completions { shell } => {
            let mut out = Vec::new();
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "flower", &mut out);
            print(&out)?;
        }
        Command::Man => {
            let mut out = Vec::new();
            clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).render(&mut out)?;
            print(&out)?;
        }
        Command::Version => print(format!("flower {}\n", env!("CARGO_PKG_VERSION")).as_bytes())?,
        Command::Ls {
            long,
            watch,
            wait,
            args,
        } => {
            let (path, labels) = path_and_labels(&args)?;
            let format = match long {
                true => flower_tools::Format::Words,
                false => flower_tools::Format::Json,
            };
            let limit = wait.wait.unwrap_or(flower_tools::DEFAULT_WAIT);
            let mut stdout = std::io::stdout().lock();
            match watch {
                true => flower_tools::watch(&path, &labels, format, limit, &mut stdout).await?,
                false => flower_tools::ls(&path, &labels, format, limit, &mut stdout).await?,
            }
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
            pod::run(command).await?;
        }
        Command::Nri(args) => {
            nri::run(args).await?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    // Before the runtime opens descriptors of its own (see `ReadyFd::claim`).
    let ready = match cli
        .command
        .ready_fd()
        .and_then(|n| n.map(ReadyFd::claim).transpose())
    {
        Err(e) => {
            eprintln!("flower: {e}");
            return ExitCode::from(2);
        }
        Ok(fd) => fd,
    };
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
    let result = runtime.block_on(run(cli.command, activated, ready));
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

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_definition_is_consistent() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
