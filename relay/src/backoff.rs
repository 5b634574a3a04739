//! Exponential backoff with full jitter: the n-th retry waits a uniformly random time in
//! `[0, min(max, initial * 2^n)]`, so a fleet of relays and nodes restarting together
//! spreads its reconnects instead of storming in lockstep.

use std::{
    hash::{BuildHasher, Hasher},
    time::Duration,
};

/// Backoff policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Upper bound of the first retry's delay.
    pub initial: Duration,
    /// Upper bound of any delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            // Fast first retry: most failures are a node restarting.
            initial: Duration::from_millis(200),
            // Hubble's relay retries unreachable peers at most every 30 s as well.
            max: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The ceiling of retry `attempt` (0-based): `min(max, initial * 2^attempt)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// A delay for retry `attempt`, drawn uniformly from `[0, ceiling(attempt)]`.
    pub fn delay(&self, attempt: u32, rng: &mut Jitter) -> Duration {
        let ceiling = self.ceiling(attempt).as_nanos().min(u128::from(u64::MAX)) as u64;
        Duration::from_nanos(rng.below(ceiling.saturating_add(1)))
    }
}

/// A small, seedable random source (splitmix64) for jitter; seeded from the process'
/// random hasher keys by default, so two relays never draw the same sequence.
#[derive(Debug, Clone)]
pub struct Jitter(u64);

impl Default for Jitter {
    fn default() -> Self {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(crate::wire::now_ns() as u64);
        Self(h.finish())
    }
}

impl Jitter {
    pub fn seeded(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, n)` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_up_to_the_maximum() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        assert_eq!(b.ceiling(0), Duration::from_millis(100));
        assert_eq!(b.ceiling(1), Duration::from_millis(200));
        assert_eq!(b.ceiling(4), Duration::from_millis(1600));
        assert_eq!(b.ceiling(5), Duration::from_secs(2));
        assert_eq!(b.ceiling(1000), Duration::from_secs(2));
    }

    #[test]
    fn delays_are_spread_over_the_whole_range() {
        let b = Backoff {
            initial: Duration::from_millis(1000),
            max: Duration::from_secs(1),
        };
        let mut rng = Jitter::seeded(42);
        let delays: Vec<Duration> = (0..2000).map(|_| b.delay(3, &mut rng)).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(1)));
        // Full jitter: every tenth of the range gets some retries, none gets most.
        let mut buckets = [0u32; 10];
        for d in &delays {
            buckets[((d.as_millis() as usize) / 100).min(9)] += 1;
        }
        for (i, n) in buckets.iter().enumerate() {
            assert!((100..=300).contains(n), "bucket {i} has {n} of 2000 delays");
        }
    }

    #[test]
    fn two_relays_draw_different_delays() {
        let b = Backoff::default();
        let (mut a, mut c) = (Jitter::default(), Jitter::default());
        let da: Vec<_> = (0..8).map(|i| b.delay(i, &mut a)).collect();
        let dc: Vec<_> = (0..8).map(|i| b.delay(i, &mut c)).collect();
        assert_ne!(da, dc);
    }
}
