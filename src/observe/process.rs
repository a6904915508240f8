//! The standard `process_*` metrics (as the Prometheus client libraries name them), read from
//! `/proc/self` at scrape time.
//!
//! On a system without `/proc` the series are simply absent: a scrape never fails for them.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

/// Clock ticks per second in `/proc/<pid>/stat`: the kernel's USER_HZ, which Linux fixes at 100
/// for user space on every architecture it exposes `/proc` on (the Go and Python clients' procfs
/// readers assume the same rather than call sysconf).
const USER_HZ: f64 = 100.0;

/// `process_cpu_seconds_total`, `process_resident_memory_bytes`, `process_virtual_memory_bytes`,
/// `process_open_fds`, `process_max_fds`, `process_start_time_seconds`.
#[derive(Debug, Default)]
pub struct ProcessCollector;

/// The figures of one scrape; each is `None` when its source could not be read.
#[derive(Debug, Default, PartialEq)]
struct Sample {
    cpu_seconds: Option<f64>,
    resident_bytes: Option<i64>,
    virtual_bytes: Option<i64>,
    open_fds: Option<i64>,
    max_fds: Option<i64>,
    start_time_seconds: Option<f64>,
}

impl Sample {
    fn read() -> Sample {
        let mut s = Sample::default();
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            if let Some(f) = stat_fields(&stat) {
                s.cpu_seconds = Some((f.utime + f.stime) as f64 / USER_HZ);
                s.virtual_bytes = i64::try_from(f.vsize).ok();
                s.start_time_seconds = boot_time().map(|boot| boot as f64 + f.starttime as f64 / USER_HZ);
            }
        }
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            s.resident_bytes = status_kib(&status, "VmRSS:").map(|kib| kib * 1024);
        }
        s.open_fds = std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count() as i64);
        if let Ok(limits) = std::fs::read_to_string("/proc/self/limits") {
            s.max_fds = max_open_files(&limits);
        }
        s
    }
}

struct StatFields {
    utime: u64,
    stime: u64,
    starttime: u64,
    vsize: u64,
}

/// Fields of `/proc/self/stat` (proc(5)). The command name, field 2, is in parentheses and may
/// itself hold spaces and parentheses, so counting starts after the last `)`.
fn stat_fields(stat: &str) -> Option<StatFields> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // `rest` starts at field 3 (state), so field N is at index N - 3.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |field: usize| f.get(field - 3)?.parse::<u64>().ok();
    Some(StatFields {
        utime: n(14)?,
        stime: n(15)?,
        starttime: n(22)?,
        vsize: n(23)?,
    })
}

/// `btime` from `/proc/stat`: the boot time in seconds since the epoch.
fn boot_time() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// A `Key:   1234 kB` line of `/proc/self/status`.
fn status_kib(status: &str, key: &str) -> Option<i64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The soft limit of `Max open files` in `/proc/self/limits`.
fn max_open_files(limits: &str) -> Option<i64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line.trim_start_matches("Max open files").split_whitespace().next()?;
    match soft {
        "unlimited" => Some(i64::MAX),
        n => n.parse().ok(),
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = Sample::read();
        if let Some(v) = s.cpu_seconds {
            let m = encoder.encode_descriptor(
                "process_cpu",
                "Total user and system CPU time spent in seconds",
                Some(&Unit::Seconds),
                MetricType::Counter,
            )?;
            ConstCounter::new(v).encode(m)?;
        }
        let gauges = [
            (
                "process_resident_memory",
                "Resident memory size in bytes",
                Some(Unit::Bytes),
                s.resident_bytes,
            ),
            (
                "process_virtual_memory",
                "Virtual memory size in bytes",
                Some(Unit::Bytes),
                s.virtual_bytes,
            ),
            ("process_open_fds", "Number of open file descriptors", None, s.open_fds),
            (
                "process_max_fds",
                "Maximum number of open file descriptors (soft limit)",
                None,
                s.max_fds,
            ),
        ];
        for (name, help, unit, value) in gauges {
            if let Some(v) = value {
                let m = encoder.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?;
                ConstGauge::new(v).encode(m)?;
            }
        }
        if let Some(v) = s.start_time_seconds {
            let m = encoder.encode_descriptor(
                "process_start_time",
                "Start time of the process since unix epoch in seconds",
                Some(&Unit::Seconds),
                MetricType::Gauge,
            )?;
            ConstGauge::new(v).encode(m)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_parse() {
        let stat = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 500 0 0 0 250 130 0 0 20 0 9 0 123456 104857600 2560 18446744073709551615";
        let f = stat_fields(stat).unwrap();
        assert_eq!((f.utime, f.stime, f.starttime, f.vsize), (250, 130, 123456, 104857600));
        assert_eq!(status_kib("Name:\tx\nVmRSS:\t   10240 kB\n", "VmRSS:"), Some(10240));
        let limits = "Limit                     Soft Limit           Hard Limit           Units\nMax open files            1024                 524288               files\n";
        assert_eq!(max_open_files(limits), Some(1024));
    }

    #[test]
    fn this_process_is_sampled_on_linux() {
        if !std::path::Path::new("/proc/self/stat").exists() {
            return;
        }
        let s = Sample::read();
        assert!(s.cpu_seconds.is_some() && s.start_time_seconds.is_some());
        assert!(s.resident_bytes.unwrap() > 0 && s.open_fds.unwrap() > 0 && s.max_fds.unwrap() > 0);
    }
}
