//! Syscalls per connect of the switchboard and its server vs the floor broker and
//! its server: `strace -c -f -p PID`
//! attached to each process (all its threads) while one warmed-up client runs N
//! connects. Start-up and warm-up are not counted.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::connect::{self, Kind, TARGET, run_clients};
use crate::procs::{self, Ctx, Proc};
use crate::stats::Table;

/// Calls per syscall name, from an `strace -c` summary.
type Counts = BTreeMap<String, u64>;

/// Attaches strace to `pid` and returns it once strace reports the attachment.
fn attach(pid: u32, out: &std::path::Path) -> Result<Proc> {
    let mut child = Command::new("strace")
        .args(["-c", "-f", "-o"])
        .arg(out)
        .args(["-p", &pid.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run strace")?;
    let mut stderr = BufReader::new(child.stderr.take().context("stderr not piped")?);
    let proc = Proc::new("strace", child);
    let mut line = String::new();
    if stderr.read_line(&mut line)? == 0 || !line.contains("attached") {
        bail!("strace could not attach: {}", line.trim());
    }
    // -f attaches every thread of the process; give it a moment for the rest.
    std::thread::sleep(std::time::Duration::from_millis(300));
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    Ok(proc)
}

/// Detaches strace (SIGINT makes it write its summary) and parses the summary.
fn detach(mut strace: Proc, out: &std::path::Path) -> Result<Counts> {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(strace.pid() as i32),
        nix::sys::signal::Signal::SIGINT,
    )?;
    strace.child.wait()?;
    let text = std::fs::read_to_string(out)?;
    let mut counts = Counts::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        // "% time seconds usecs/call calls [errors] syscall"; skip headers and total.
        if words.len() >= 5
            && words[0].parse::<f64>().is_ok()
            && let (Ok(calls), Some(name)) = (words[3].parse::<u64>(), words.last())
            && *name != "total"
        {
            counts.insert(name.to_string(), calls);
        }
    }
    Ok(counts)
}

/// Runs `n` connects of `kind` with strace attached to each of `pids`.
fn count(
    ctx: &Ctx,
    kind: Kind,
    pids: &[u32],
    target: &str,
    labels: &[&str],
    n: usize,
) -> Result<Vec<Counts>> {
    let outs: Vec<_> = pids.iter().map(|_| ctx.path("strace")).collect();
    let mut straces = Vec::new();
    run_clients(ctx, kind, target, labels, 1, n, 100, false, || {
        for (pid, out) in pids.iter().zip(&outs) {
            straces.push(attach(*pid, out)?);
        }
        Ok(())
    })?;
    straces
        .into_iter()
        .zip(&outs)
        .map(|(strace, out)| detach(strace, out))
        .collect()
}

pub fn syscalls_bench(ctx: &Ctx, n: usize) -> Result<()> {
    if !procs::on_path("strace") {
        println!("\n(strace not on PATH: the syscall comparison was skipped)");
        return Ok(());
    }
    eprintln!("syscalls: {n} connects under strace");
    let (broker, floor_server, floor_path) = connect::start_floor(ctx, false)?;
    let floor = count(
        ctx,
        Kind::Floor,
        &[broker.pid(), floor_server.pid()],
        &floor_path,
        &[],
        n,
    );
    let sb = connect::start_switchboard(ctx, false)?;
    let flower = count(
        ctx,
        Kind::Switchboard,
        &[sb.daemon.pid(), sb.servers[0].pid()],
        &sb.path,
        &[TARGET],
        n,
    );
    let columns = match (floor, flower) {
        (Ok(floor), Ok(flower)) => [&flower[0], &floor[0], &flower[1], &floor[1]].map(Clone::clone),
        (Err(e), _) | (_, Err(e)) => {
            // ptrace may be forbidden (containers, yama); not a benchmark failure.
            println!("\n(strace failed, the syscall comparison was skipped: {e:#})");
            return Ok(());
        }
    };
    let per = |c: &Counts, name: &str| c.get(name).copied().unwrap_or(0) as f64 / n as f64;
    let names: std::collections::BTreeSet<&String> =
        columns.iter().flat_map(|c| c.keys()).collect();
    let mut names: Vec<&String> = names.into_iter().collect();
    let weight = |name: &str| columns.iter().map(|c| per(c, name)).sum::<f64>();
    names.sort_by(|a, b| weight(b).total_cmp(&weight(a)));
    let mut t = Table::new(&[
        "syscall",
        "switchboard daemon",
        "floor broker",
        "flower-lib server",
        "floor server",
    ]);
    let mut total = vec!["**total**".to_owned()];
    total.extend(
        columns
            .iter()
            .map(|c| format!("**{:.2}**", c.values().sum::<u64>() as f64 / n as f64)),
    );
    t.row(&total);
    for name in names {
        if weight(name) >= 0.01 {
            let mut row = vec![name.clone()];
            row.extend(columns.iter().map(|c| format!("{:.2}", per(c, name))));
            t.row(&row);
        }
    }
    t.print(&format!(
        "Syscalls per connect (strace -c -f -p, {n} connects, 1 client)"
    ));
    Ok(())
}
