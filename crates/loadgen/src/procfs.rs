//! Readings from `/proc`: CPU time of this process and of the servers, the machine's busy and
//! steal time, resident memory; and the open-file limit.

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, Default)]
pub struct ProcStat {
    /// utime + stime, clock ticks.
    pub ticks: u64,
    pub threads: u64,
}

/// `pid` is a number or `self`.
pub fn proc_stat(pid: &str) -> anyhow::Result<ProcStat> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("parsing {path}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime 15, num_threads 20.
    let field = |n: usize| -> anyhow::Result<u64> {
        fields
            .get(n - 3)
            .with_context(|| format!("{path}: no field {n}"))?
            .parse()
            .with_context(|| format!("{path}: field {n}"))
    };
    Ok(ProcStat {
        ticks: field(14)? + field(15)?,
        threads: field(20)?,
    })
}

/// Whole-machine CPU ticks from the first line of `/proc/stat`.
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineStat {
    pub busy: u64,
    pub steal: u64,
    pub total: u64,
}

pub fn machine_stat() -> anyhow::Result<MachineStat> {
    let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = text.lines().next().context("empty /proc/stat")?;
    // cpu user nice system idle iowait irq softirq steal guest guest_nice
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().context("parsing /proc/stat"))
        .collect::<anyhow::Result<_>>()?;
    if v.len() < 8 {
        bail!("short /proc/stat line: {line}");
    }
    let total: u64 = v.iter().sum();
    Ok(MachineStat {
        busy: total - v[3] - v[4] - v[7],
        steal: v[7],
        total,
    })
}

/// Cores of the machine (not `available_parallelism`: that follows this process's affinity).
pub fn machine_cores() -> usize {
    std::fs::read_to_string("/proc/stat").map_or(0, |t| {
        t.lines()
            .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
            .count()
    })
}

/// Memory of a process from `/proc/<pid>/status`, in KiB.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Memory {
    pub rss_kib: u64,
    pub anon_kib: u64,
    pub hwm_kib: u64,
    pub threads: u64,
}

pub fn proc_memory(pid: &str) -> anyhow::Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let kib = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(Memory {
        rss_kib: kib("VmRSS:"),
        anon_kib: kib("RssAnon:"),
        hwm_kib: kib("VmHWM:"),
        threads: kib("Threads:"),
    })
}

/// CPU of this process, the servers and the machine at one instant.
#[derive(Debug, Clone)]
pub struct CpuReading {
    pub at: Instant,
    pub own: ProcStat,
    pub servers: Vec<(u32, Option<ProcStat>)>,
    pub machine: MachineStat,
}

pub fn cpu_reading(server_pids: &[u32]) -> anyhow::Result<CpuReading> {
    Ok(CpuReading {
        at: Instant::now(),
        own: proc_stat("self")?,
        servers: server_pids
            .iter()
            .map(|p| (*p, proc_stat(&p.to_string()).ok()))
            .collect(),
        machine: machine_stat()?,
    })
}

/// CPU use between two readings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CpuUse {
    pub wall_secs: f64,
    /// This load generator, % of one core (user + sys).
    pub loadgen_pct_of_core: f64,
    pub servers: Vec<ServerCpu>,
    /// Busy share of the whole machine, % (100 = every core busy).
    pub machine_busy_pct: f64,
    pub machine_steal_pct: f64,
    pub machine_cores: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerCpu {
    pub pid: u32,
    /// % of one core; None when the process could not be read.
    pub pct_of_core: Option<f64>,
    pub threads: Option<u64>,
}

pub fn cpu_use(a: &CpuReading, b: &CpuReading, clk_tck: u64) -> CpuUse {
    let wall = b.at.duration_since(a.at).as_secs_f64().max(1e-9);
    let pct = |ticks: u64| 100.0 * ticks as f64 / clk_tck.max(1) as f64 / wall;
    let servers = a
        .servers
        .iter()
        .zip(&b.servers)
        .map(|((pid, x), (_, y))| match (x, y) {
            (Some(x), Some(y)) => ServerCpu {
                pid: *pid,
                pct_of_core: Some(pct(y.ticks.saturating_sub(x.ticks))),
                threads: Some(y.threads),
            },
            _ => ServerCpu {
                pid: *pid,
                pct_of_core: None,
                threads: None,
            },
        })
        .collect();
    let total = b.machine.total.saturating_sub(a.machine.total).max(1) as f64;
    CpuUse {
        wall_secs: wall,
        loadgen_pct_of_core: pct(b.own.ticks.saturating_sub(a.own.ticks)),
        servers,
        machine_busy_pct: 100.0 * b.machine.busy.saturating_sub(a.machine.busy) as f64 / total,
        machine_steal_pct: 100.0 * b.machine.steal.saturating_sub(a.machine.steal) as f64 / total,
        machine_cores: machine_cores(),
    }
}

impl CpuUse {
    /// One line, as the report prints it.
    pub fn line(&self, label: &str) -> String {
        let servers = if self.servers.is_empty() {
            "server not measured (no --server-pid)".to_owned()
        } else {
            self.servers
                .iter()
                .map(|s| match (s.pct_of_core, s.threads) {
                    (Some(p), Some(t)) => {
                        format!("server pid {} {p:.1} % of one core ({t} threads)", s.pid)
                    }
                    _ => format!("server pid {} not readable", s.pid),
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "CPU {label} ({:.1} s): loadgen {:.1} % of one core, {servers}; machine {:.1} % busy \
             of {} cores (steal {:.1} %)",
            self.wall_secs,
            self.loadgen_pct_of_core,
            self.machine_busy_pct,
            self.machine_cores,
            self.machine_steal_pct,
        )
    }
}

/// Raises this process's open-file limit to its hard limit; returns (before, after).
pub fn raise_nofile_limit() -> anyhow::Result<(Option<u64>, Option<u64>)> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let before = getrlimit(Resource::Nofile);
    let mut want = before;
    want.current = before.maximum;
    if want.current != before.current {
        setrlimit(Resource::Nofile, want).context("setrlimit(RLIMIT_NOFILE)")?;
    }
    Ok((before.current, getrlimit(Resource::Nofile).current))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_process() {
        let s = proc_stat("self").expect("own stat");
        assert!(s.threads >= 1);
        let m = proc_memory("self").expect("own status");
        assert!(m.rss_kib > 0);
        let a = cpu_reading(&[std::process::id()]).expect("reading");
        let b = cpu_reading(&[std::process::id()]).expect("reading");
        let u = cpu_use(&a, &b, 100);
        assert_eq!(u.servers.len(), 1);
        assert!(u.servers[0].pct_of_core.is_some());
    }

    #[test]
    fn the_open_file_limit_reaches_the_hard_limit() {
        let (_, after) = raise_nofile_limit().expect("setrlimit");
        let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
        assert_eq!(after, hard);
    }
}
