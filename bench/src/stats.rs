//! Latency summaries and the markdown formatting of figures.

use std::fmt::Write;

/// CLOCK_MONOTONIC in nanoseconds: one clock shared by all processes on the machine,
/// so client processes can report start and end times the parent compares.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One measurement: many operations, possibly from several concurrent clients.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Operations per second over the wall time from the first start to the last end.
    pub per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

impl Summary {
    /// From per-operation latencies (ns) and the wall time they took together (ns).
    pub fn new(mut latencies: Vec<u64>, wall_ns: u64) -> Summary {
        latencies.sort_unstable();
        Summary {
            per_sec: latencies.len() as f64 / (wall_ns.max(1) as f64 / 1e9),
            p50_us: percentile(&latencies, 0.50) as f64 / 1e3,
            p99_us: percentile(&latencies, 0.99) as f64 / 1e3,
        }
    }
}

impl Summary {
    /// Each figure's median over several rounds of the same measurement.
    pub fn median(rounds: &[Summary]) -> Summary {
        let mid = |f: fn(&Summary) -> f64| {
            let mut v: Vec<f64> = rounds.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(0.0)
        };
        Summary {
            per_sec: mid(|s| s.per_sec),
            p50_us: mid(|s| s.p50_us),
            p99_us: mid(|s| s.p99_us),
        }
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `value / floor` as `1.23×`.
pub fn ratio(value: f64, floor: f64) -> String {
    if floor > 0.0 {
        format!("{:.2}×", value / floor)
    } else {
        "–".into()
    }
}

/// A markdown table built row by row.
pub struct Table {
    text: String,
}

impl Table {
    pub fn new(headers: &[&str]) -> Table {
        let mut text = format!("| {} |\n|", headers.join(" | "));
        for (i, _) in headers.iter().enumerate() {
            // Left-align the first column, right-align the figures.
            text.push_str(if i == 0 { "---|" } else { "---:|" });
        }
        text.push('\n');
        Table { text }
    }

    pub fn row(&mut self, cells: &[String]) {
        let _ = writeln!(self.text, "| {} |", cells.join(" | "));
    }

    /// Prints the table to stdout at once, so partial results survive a later failure.
    pub fn print(&self, title: &str) {
        println!("\n### {title}\n\n{}", self.text);
    }
}

/// A rate with thousands separators and no decimals: `12 345`.
pub fn rate(per_sec: f64) -> String {
    let n = per_sec.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

pub fn us(value: f64) -> String {
    format!("{value:.1}")
}
