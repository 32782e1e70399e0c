//! Time sources (SPEC "Time").
//!
//! Persisted instants are wall-clock milliseconds since the Unix epoch; every interval measured
//! while the agent runs (heartbeats, backoff, grace, staleness, coalescing) uses CLOCK_BOOTTIME,
//! so a wall-clock step neither expires nor strands anything. The [`Clock`] trait lets the
//! rules that depend on time be tested with an injected clock.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds on CLOCK_BOOTTIME (monotonic, counts suspend). macOS has no BOOTTIME; its
/// CLOCK_MONOTONIC also counts sleep.
pub fn boottime_ms() -> u64 {
    #[cfg(target_os = "linux")]
    let id = nix::time::ClockId::CLOCK_BOOTTIME;
    #[cfg(not(target_os = "linux"))]
    let id = nix::time::ClockId::CLOCK_MONOTONIC;
    match nix::time::clock_gettime(id) {
        Ok(ts) => (ts.tv_sec() as u64) * 1000 + (ts.tv_nsec() as u64) / 1_000_000,
        // clock_gettime on a supported clock id cannot fail; 0 would make every loop look stale,
        // which fails loud rather than silent.
        Err(_) => 0,
    }
}

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Microseconds on CLOCK_MONOTONIC, as `MONOTONIC_USEC=` of sd_notify(3) wants.
pub fn monotonic_usec() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => (ts.tv_sec() as u64) * 1_000_000 + (ts.tv_nsec() as u64) / 1000,
        Err(_) => 0,
    }
}

/// A clock the time-dependent rules read; the real one, or a test's.
pub trait Clock: Send + Sync {
    /// CLOCK_BOOTTIME milliseconds.
    fn boot_ms(&self) -> u64;
    /// Wall-clock milliseconds since the epoch.
    fn wall_ms(&self) -> u64;
}

/// The system clocks.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn boot_ms(&self) -> u64 {
        boottime_ms()
    }
    fn wall_ms(&self) -> u64 {
        wall_ms()
    }
}

/// Format wall-clock milliseconds as RFC 3339 UTC with millisecond precision
/// (`2026-11-24T07:52:30.123Z`). Display only: instants are compared as integers.
pub fn rfc3339_ms(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let millis = ms % 1000;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Parse the RFC 3339 forms this program prints and operators type (`2026-11-24T07:52:30Z`,
/// with optional fraction, or a bare date `2026-11-24` meaning midnight UTC, or a `+hh:mm`
/// offset). Returns wall-clock milliseconds.
pub fn parse_rfc3339_ms(s: &str) -> Option<u64> {
    let s = s.trim();
    let (date, time) = match s.split_once(['T', 't', ' ']) {
        Some((d, t)) => (d, Some(t)),
        None => (s, None),
    };
    let mut parts = date.splitn(3, '-');
    let y: i64 = parts.next()?.parse().ok()?;
    let m: u32 = parts.next()?.parse().ok()?;
    let d: u32 = parts.next()?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let days = days_from_civil(y, m, d);
    let mut secs = days * 86_400;
    let mut millis = 0i64;
    if let Some(t) = time {
        let (clock, offset_secs) = if let Some(c) = t.strip_suffix(['Z', 'z']) {
            (c, 0i64)
        } else if let Some(pos) = t.rfind(['+', '-']) {
            let (c, off) = t.split_at(pos);
            let sign = if off.starts_with('-') { -1 } else { 1 };
            let (oh, om) = off[1..].split_once(':')?;
            (
                c,
                sign * (oh.parse::<i64>().ok()? * 3600 + om.parse::<i64>().ok()? * 60),
            )
        } else {
            (t, 0)
        };
        let (hms, frac) = match clock.split_once('.') {
            Some((a, b)) => (a, Some(b)),
            None => (clock, None),
        };
        let mut f = hms.splitn(3, ':');
        let h: i64 = f.next()?.parse().ok()?;
        let mi: i64 = f.next()?.parse().ok()?;
        let se: i64 = f.next().unwrap_or("0").parse().ok()?;
        if h > 23 || mi > 59 || se > 60 {
            return None;
        }
        secs += h * 3600 + mi * 60 + se - offset_secs;
        if let Some(fr) = frac {
            let digits: String = fr.chars().take(3).collect();
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            millis = digits.parse::<i64>().ok()? * 10i64.pow(3 - digits.len() as u32);
        }
    }
    let total = secs * 1000 + millis;
    u64::try_from(total).ok()
}

// Howard Hinnant's civil-date algorithms (public domain), in days since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 } as i64;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// An injected clock for tests: boottime and wall time move independently.
#[cfg(test)]
pub mod fake {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    pub struct FakeClock {
        boot: AtomicU64,
        wall: AtomicU64,
    }

    impl FakeClock {
        pub fn new() -> Arc<FakeClock> {
            Arc::new(FakeClock {
                boot: AtomicU64::new(1_000_000),
                wall: AtomicU64::new(1_795_000_000_000),
            })
        }
        /// Time passes on both clocks.
        pub fn pass(&self, ms: u64) {
            self.boot.fetch_add(ms, Ordering::SeqCst);
            self.wall.fetch_add(ms, Ordering::SeqCst);
        }
        /// Only the wall clock steps (an NTP jump or an operator's date).
        pub fn step_wall(&self, ms: i64) {
            let w = self.wall.load(Ordering::SeqCst) as i64 + ms;
            self.wall.store(w as u64, Ordering::SeqCst);
        }
    }

    impl super::Clock for FakeClock {
        fn boot_ms(&self) -> u64 {
            self.boot.load(Ordering::SeqCst)
        }
        fn wall_ms(&self) -> u64 {
            self.wall.load(Ordering::SeqCst)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips() {
        for ms in [0u64, 1_795_506_414_420, 951_782_400_000, 4_102_444_799_999] {
            let s = rfc3339_ms(ms);
            assert_eq!(parse_rfc3339_ms(&s), Some(ms), "{s}");
        }
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn rfc3339_parses_operator_forms() {
        assert_eq!(parse_rfc3339_ms("1970-01-02"), Some(86_400_000));
        assert_eq!(parse_rfc3339_ms("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:01.5Z"), Some(1500));
        assert_eq!(parse_rfc3339_ms("yesterday"), None);
        assert_eq!(parse_rfc3339_ms("2026-13-01"), None);
        assert_eq!(parse_rfc3339_ms("1969-12-31"), None);
    }

    #[test]
    fn boottime_is_monotonic_and_nonzero() {
        let a = boottime_ms();
        let b = boottime_ms();
        assert!(a > 0 && b >= a);
    }
}
