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
    /// Logs go to stderr, filtered by RUST_LOG (default: info).
    Switchboard {
        /// Socket path to listen on.
        path: Option<PathBuf>,
        /// Permission bits of the socket file, in octal (connecting needs write).
        #[arg(long, default_value = "0600", value_parser = parse_mode)]
        mode: u32,
        /// Group to own the socket file (name or number), e.g. with --mode 0660.
        #[arg(long)]
        group: Option<String>,
        /// Seconds a registered server or egress may take to accept a connection.
        #[arg(long, default_value_t = 10.0)]
        call_timeout: f64,
        /// Log as JSON lines.
        #[arg(long)]
        log_json: bool,
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
    /// List the targets matching LABELS, one JSON object per line.
    Ls {
        /// [PATH] [LABELS...]
        #[arg(value_name = "[PATH] [LABELS]")]
        args: Vec<String>,
    },
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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Switchboard {
            path,
            mode,
            group,
            call_timeout,
            log_json,
        } => {
            init_logging(log_json);
            let path = match path {
                Some(p) => p,
                None => default_path()?,
            };
            let call_timeout = Duration::try_from_secs_f64(call_timeout)
                .map_err(|_| UsageError(format!("invalid --call-timeout {call_timeout}")))?;
            let config = flower_switchboard::Config { call_timeout };
            flower_switchboard::daemon::run(flower_switchboard::daemon::Options {
                path,
                mode,
                group,
                config,
            })
            .await?;
        }
        Command::Cat { listen, args } => {
            init_logging(false);
            let (path, labels) = path_and_labels(&args)?;
            flowercat::cat(&path, &labels, listen).await?;
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(run(cli.command));
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
