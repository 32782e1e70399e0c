//! Host pressure (SPEC D-4): memory available, 1-minute load average per online CPU, and Linux
//! PSI (`/proc/pressure/memory`, `some avg10`) where it is present. The tier is the worst of
//! them; a gauge that cannot be read counts as critical, so an agent that cannot see the
//! host's pressure never takes it for calm.

use std::fmt;

/// How busy the host is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    Normal,
    Moderate,
    Critical,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Normal => "normal",
            Tier::Moderate => "moderate",
            Tier::Critical => "critical",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One reading. `Err` is a gauge that could not be read; PSI is `None` where the kernel has
/// none (not a gauge then).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Available memory in percent of the total.
    pub mem_available_pct: Result<f64, String>,
    /// 1-minute load average divided by the online CPUs.
    pub load_per_cpu: Result<f64, String>,
    /// PSI memory `some avg10`.
    pub psi_some_avg10: Option<Result<f64, String>>,
}

/// D-4: the tier of a sample, and why (the worst gauge).
pub fn tier(s: &Sample) -> (Tier, String) {
    let mut worst = (Tier::Normal, "calm".to_string());
    let mut consider = |t: Tier, why: String| {
        if t > worst.0 {
            worst = (t, why);
        }
    };
    match &s.mem_available_pct {
        Err(e) => consider(Tier::Critical, format!("memory unreadable ({e})")),
        Ok(p) if *p < 5.0 => consider(Tier::Critical, format!("memory available {p:.1} % < 5 %")),
        Ok(p) if *p < 12.0 => consider(Tier::Moderate, format!("memory available {p:.1} % < 12 %")),
        Ok(_) => {}
    }
    match &s.load_per_cpu {
        Err(e) => consider(Tier::Critical, format!("load unreadable ({e})")),
        Ok(l) if *l >= 1.5 => consider(Tier::Critical, format!("load {l:.2} per CPU ≥ 1.5")),
        Ok(l) if *l >= 1.0 => consider(Tier::Moderate, format!("load {l:.2} per CPU ≥ 1.0")),
        Ok(_) => {}
    }
    match &s.psi_some_avg10 {
        None => {}
        Some(Err(e)) => consider(Tier::Critical, format!("memory pressure unreadable ({e})")),
        Some(Ok(p)) if *p >= 40.0 => {
            consider(Tier::Critical, format!("memory pressure {p:.1} ≥ 40"))
        }
        Some(Ok(p)) if *p >= 10.0 => {
            consider(Tier::Moderate, format!("memory pressure {p:.1} ≥ 10"))
        }
        Some(Ok(_)) => {}
    }
    worst
}

/// Reads the host's pressure. Substituted in tests.
pub trait Gauge: Send + Sync {
    fn sample(&self) -> Sample;
}

/// `MemAvailable` and `MemTotal` of `/proc/meminfo`, as a percentage.
pub fn parse_meminfo(text: &str) -> Result<f64, String> {
    let field = |name: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok())
    };
    let total = field("MemTotal:").ok_or("no MemTotal")?;
    let avail = field("MemAvailable:").ok_or("no MemAvailable")?;
    if total <= 0.0 {
        return Err("MemTotal is 0".into());
    }
    Ok(avail * 100.0 / total)
}

/// The 1-minute load average of `/proc/loadavg`.
pub fn parse_loadavg(text: &str) -> Result<f64, String> {
    text.split_whitespace()
        .next()
        .and_then(|x| x.parse().ok())
        .ok_or_else(|| "malformed".to_string())
}

/// `some avg10` of `/proc/pressure/memory`.
pub fn parse_psi(text: &str) -> Result<f64, String> {
    let line = text
        .lines()
        .find(|l| l.starts_with("some "))
        .ok_or("no `some` line")?;
    line.split_whitespace()
        .find_map(|f| f.strip_prefix("avg10="))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| "no avg10".to_string())
}

/// The running kernel's gauges.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostGauge;

impl Gauge for HostGauge {
    fn sample(&self) -> Sample {
        sys::sample()
    }
}

fn online_cpus() -> Result<f64, String> {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::_NPROCESSORS_ONLN) {
        Ok(Some(n)) if n > 0 => Ok(n as f64),
        Ok(_) => Err("no online CPUs reported".into()),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(target_os = "linux")]
mod sys {
    use super::*;

    pub(super) fn sample() -> Sample {
        let read = |p: &str| std::fs::read_to_string(p).map_err(|e| format!("{p}: {e}"));
        let mem = read("/proc/meminfo").and_then(|t| parse_meminfo(&t));
        let load = read("/proc/loadavg")
            .and_then(|t| parse_loadavg(&t))
            .and_then(|l| Ok(l / online_cpus()?));
        let psi = match std::fs::read_to_string("/proc/pressure/memory") {
            Ok(t) => Some(parse_psi(&t)),
            // No PSI in this kernel: not a gauge.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            // PSI exists but cannot be read (EOPNOTSUPP when disabled at boot): not a gauge either.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => None,
            Err(e) => Some(Err(format!("/proc/pressure/memory: {e}"))),
        };
        Sample {
            mem_available_pct: mem,
            load_per_cpu: load,
            psi_some_avg10: psi,
        }
    }
}

/// macOS: free + inactive + purgeable pages of `host_statistics64(HOST_VM_INFO64)` over
/// `hw.memsize`, and getloadavg(3). Thin shims; reviewed against libc's apple bindings.
#[cfg(target_os = "macos")]
mod sys {
    use super::*;

    fn memory_pct() -> Result<f64, String> {
        let total = crate::facts::macos::sysctl_u64("hw.memsize")
            .map_err(|e| format!("hw.memsize: {e}"))? as f64;
        // SAFETY: vm_statistics64 is plain old data; host_statistics64 fills at most `count`
        // integers of it.
        let mut vm: libc::vm_statistics64 = unsafe { std::mem::zeroed() };
        let mut count = libc::HOST_VM_INFO64_COUNT;
        let rc = unsafe {
            libc::host_statistics64(
                libc::mach_host_self(),
                libc::HOST_VM_INFO64,
                (&mut vm as *mut libc::vm_statistics64).cast(),
                &mut count,
            )
        };
        if rc != 0 {
            return Err(format!("host_statistics64: {rc}"));
        }
        // SAFETY: a read of a kernel-provided constant.
        let page = unsafe { libc::vm_page_size } as f64;
        let avail =
            (vm.free_count as f64 + vm.inactive_count as f64 + vm.purgeable_count as f64) * page;
        if total <= 0.0 {
            Err("hw.memsize is 0".into())
        } else {
            Ok(avail * 100.0 / total)
        }
    }

    pub fn sample() -> Sample {
        let mut l = [0f64; 3];
        // SAFETY: `l` has room for the 3 averages asked for.
        let load = if unsafe { libc::getloadavg(l.as_mut_ptr(), 3) } >= 1 {
            online_cpus().map(|n| l[0] / n)
        } else {
            Err("getloadavg failed".into())
        };
        Sample {
            mem_available_pct: memory_pct(),
            load_per_cpu: load,
            psi_some_avg10: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(mem: f64, load: f64, psi: Option<f64>) -> Sample {
        Sample {
            mem_available_pct: Ok(mem),
            load_per_cpu: Ok(load),
            psi_some_avg10: psi.map(Ok),
        }
    }

    #[test]
    fn d4_tier_truth_table() {
        use Tier::*;
        let cases = [
            (s(50.0, 0.2, None), Normal),
            (s(12.0, 0.2, None), Normal),
            (s(11.9, 0.2, None), Moderate),
            (s(5.0, 0.2, None), Moderate),
            (s(4.9, 0.2, None), Critical),
            (s(50.0, 0.99, None), Normal),
            (s(50.0, 1.0, None), Moderate),
            (s(50.0, 1.49, None), Moderate),
            (s(50.0, 1.5, None), Critical),
            (s(50.0, 0.2, Some(9.9)), Normal),
            (s(50.0, 0.2, Some(10.0)), Moderate),
            (s(50.0, 0.2, Some(40.0)), Critical),
            (s(11.0, 1.6, Some(0.0)), Critical),
        ];
        for (sample, want) in cases {
            assert_eq!(tier(&sample).0, want, "{sample:?}");
        }
    }

    #[test]
    fn d4_an_unreadable_gauge_is_critical() {
        let mut x = s(50.0, 0.1, None);
        x.mem_available_pct = Err("EACCES".into());
        assert_eq!(tier(&x).0, Tier::Critical);
        let mut x = s(50.0, 0.1, None);
        x.load_per_cpu = Err("EIO".into());
        assert_eq!(tier(&x).0, Tier::Critical);
        let mut x = s(50.0, 0.1, None);
        x.psi_some_avg10 = Some(Err("EIO".into()));
        assert_eq!(tier(&x).0, Tier::Critical);
        assert!(tier(&x).1.contains("unreadable"));
    }

    #[test]
    fn d4_parsers() {
        let m = "MemTotal:       24684084 kB\nMemFree:        22000000 kB\nMemAvailable:    2468408 kB\n";
        assert!((parse_meminfo(m).unwrap() - 10.0).abs() < 0.01);
        assert!(parse_meminfo("MemTotal: 1 kB\n").is_err());
        assert_eq!(parse_loadavg("0.52 0.40 0.30 1/200 1234\n").unwrap(), 0.52);
        assert!(parse_loadavg("").is_err());
        let p = "some avg10=12.34 avg60=1.00 avg300=0.00 total=1\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(parse_psi(p).unwrap(), 12.34);
        assert!(parse_psi("full avg10=1\n").is_err());
    }

    #[test]
    fn d4_the_host_gauge_reads_this_machine() {
        let x = HostGauge.sample();
        assert!(x.mem_available_pct.is_ok(), "{x:?}");
        assert!(x.load_per_cpu.is_ok(), "{x:?}");
    }
}
