//! Kernel time (CLOCK_MONOTONIC, as `bpf_ktime_get_ns` reports) to wall-clock time.

#![allow(unsafe_code)]

use std::sync::atomic::{AtomicI64, Ordering};

fn now_ns(clock: libc::clockid_t) -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; the clock ids are valid.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec)
}

/// CLOCK_MONOTONIC now, ns.
pub fn monotonic_ns() -> i64 {
    now_ns(libc::CLOCK_MONOTONIC)
}

/// CLOCK_REALTIME now, ns since the Unix epoch.
pub fn realtime_ns() -> i64 {
    now_ns(libc::CLOCK_REALTIME)
}

/// Offset between the monotonic and the realtime clock, refreshed periodically so a
/// wall-clock step (NTP) is followed.
#[derive(Debug, Default)]
pub struct ClockOffset(AtomicI64);

impl ClockOffset {
    pub fn new() -> Self {
        let c = Self(AtomicI64::new(0));
        c.refresh();
        c
    }

    pub fn refresh(&self) {
        // Bracket the realtime read with two monotonic reads and use their midpoint.
        let m1 = monotonic_ns();
        let r = realtime_ns();
        let m2 = monotonic_ns();
        let mid = m1 + (m2 - m1) / 2;
        self.0.store(r - mid, Ordering::Relaxed);
    }

    /// Wall-clock ns for a monotonic timestamp.
    pub fn to_wall_ns(&self, mono_ns: u64) -> i64 {
        (mono_ns as i64).saturating_add(self.0.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_now_to_now() {
        let c = ClockOffset::new();
        let wall = c.to_wall_ns(monotonic_ns() as u64);
        assert!((wall - realtime_ns()).abs() < 50_000_000);
    }
}
