//! Process metrics read from `/proc/self` on each scrape, named as the Prometheus client
//! libraries name them so the usual dashboards work.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Reads `/proc/self/{stat,status,fd,limits}` and `/proc/stat` when scraped.
#[derive(Debug)]
pub struct ProcessCollector;

/// What one scrape reads. Missing files (not Linux, hardened /proc) leave fields `None`.
#[derive(Debug, Default, PartialEq)]
pub struct Sample {
    pub cpu_seconds: Option<f64>,
    pub start_time_seconds: Option<f64>,
    pub resident_bytes: Option<i64>,
    pub virtual_bytes: Option<i64>,
    pub open_fds: Option<i64>,
    pub max_fds: Option<i64>,
}

fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|t| *t > 0)
        .map_or(100.0, |t| t as f64)
}

/// Fields of `/proc/<pid>/stat` after the command name, which may hold spaces.
fn stat_fields(stat: &str) -> Vec<&str> {
    stat.rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default()
}

/// A `kB` line of `/proc/<pid>/status`, in bytes.
pub fn status_kb(status: &str, key: &str) -> Option<i64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<i64>().ok())
        .map(|kb| kb * 1024)
}

impl Sample {
    /// Parse what was read; `ticks` is the clock tick rate (`CLK_TCK`).
    pub fn parse(
        stat: Option<&str>,
        status: Option<&str>,
        proc_stat: Option<&str>,
        limits: Option<&str>,
        open_fds: Option<i64>,
        ticks: f64,
    ) -> Sample {
        let fields = stat.map(stat_fields).unwrap_or_default();
        // Field N of stat(5) is fields[N - 3]: utime 14, stime 15, starttime 22.
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
        let cpu_seconds = field(14).zip(field(15)).map(|(u, s)| (u + s) / ticks);
        let boot = proc_stat.and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<f64>().ok())
        });
        let start_time_seconds = boot.zip(field(22)).map(|(b, st)| b + st / ticks);
        let max_fds = limits.and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        });
        Sample {
            cpu_seconds,
            start_time_seconds,
            resident_bytes: status.and_then(|s| status_kb(s, "VmRSS")),
            virtual_bytes: status.and_then(|s| status_kb(s, "VmSize")),
            open_fds,
            max_fds,
        }
    }

    /// This process, now.
    pub fn read() -> Sample {
        let read = |p: &str| std::fs::read_to_string(p).ok();
        let fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            // The directory handle itself is one of the entries.
            .map(|d| d.count() as i64 - 1);
        Sample::parse(
            read("/proc/self/stat").as_deref(),
            read("/proc/self/status").as_deref(),
            read("/proc/stat").as_deref(),
            read("/proc/self/limits").as_deref(),
            fds,
            clock_ticks(),
        )
    }
}

fn gauge<V: prometheus_client::encoding::EncodeGaugeValue + std::fmt::Debug + Send + Sync>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: Option<V>,
) -> Result<(), std::fmt::Error> {
    let Some(v) = v else { return Ok(()) };
    let g = ConstGauge::new(v);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = Sample::read();
        if let Some(cpu) = s.cpu_seconds {
            let c = ConstCounter::new(cpu);
            c.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                c.metric_type(),
            )?)?;
        }
        gauge(
            &mut encoder,
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            s.resident_bytes,
        )?;
        gauge(
            &mut encoder,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
            s.virtual_bytes,
        )?;
        gauge(
            &mut encoder,
            "process_open_fds",
            "Number of open file descriptors",
            s.open_fds,
        )?;
        gauge(
            &mut encoder,
            "process_max_fds",
            "Maximum number of open file descriptors",
            s.max_fds,
        )?;
        gauge(
            &mut encoder,
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch in seconds",
            s.start_time_seconds,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let stat = "4242 (lunanode csi) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0 1000 123456 789 18446744073709551615";
        let status =
            "Name:\tlunanode-csi\nVmSize:\t  20000 kB\nVmHWM:\t    6000 kB\nVmRSS:\t    5000 kB\n";
        let proc_stat = "cpu  1 2 3\nbtime 1700000000\nprocesses 5\n";
        let limits = "Limit                     Soft Limit           Hard Limit           Units\nMax open files            1024                 524288               files\n";
        let s = Sample::parse(
            Some(stat),
            Some(status),
            Some(proc_stat),
            Some(limits),
            Some(7),
            100.0,
        );
        assert_eq!(
            s,
            Sample {
                cpu_seconds: Some(3.0),
                start_time_seconds: Some(1_700_000_010.0),
                resident_bytes: Some(5000 * 1024),
                virtual_bytes: Some(20000 * 1024),
                open_fds: Some(7),
                max_fds: Some(1024),
            }
        );
        assert_eq!(
            Sample::parse(None, None, None, None, None, 100.0),
            Sample::default()
        );
    }

    #[test]
    fn reads_this_process() {
        let s = Sample::read();
        assert!(s.resident_bytes.unwrap() > 0);
        assert!(s.open_fds.unwrap() >= 3);
        assert!(s.start_time_seconds.unwrap() > 1.6e9);
    }
}
