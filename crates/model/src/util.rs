//! Two small helpers every layer needs and that had been written once per crate: the wall
//! clock in Unix milliseconds (the unit of drain stamps and cache files) and a xorshift
//! generator for jitter and spreading work (never for anything secret). Reading the clock is
//! the only thing here that looks outside the process.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Wall-clock time in Unix milliseconds; 0 on a clock set before 1970.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The golden-ratio constant: an odd, well-mixed seed and salt step.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// xorshift64* (Vigna): a fast, small pseudo-random sequence, good enough to spread probes and
/// retries; not for secrets.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// A fixed sequence (benchmarks that should pick the same things each run). A zero seed,
    /// on which xorshift would stay at zero, is replaced.
    pub fn new(seed: u64) -> Self {
        XorShift(if seed == 0 { GOLDEN } else { seed })
    }

    /// A different sequence for every call, even several in the same nanosecond or in
    /// processes started together (so clients do not retry in lockstep).
    pub fn from_clock() -> Self {
        static SALT: AtomicU64 = AtomicU64::new(GOLDEN);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let salt = SALT.fetch_add(GOLDEN, Ordering::Relaxed);
        XorShift((nanos ^ salt ^ u64::from(std::process::id())) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in `[0, n)`; 0 when `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// Uniform-ish in `[0, d)`, to the nanosecond.
    pub fn duration_below(&mut self, d: Duration) -> Duration {
        let nanos = d.as_nanos().min(u128::from(u64::MAX)) as u64;
        Duration::from_nanos(self.below(nanos))
    }

    /// Uniform-ish in `[lo, hi)`; `lo` when the range is empty.
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        lo + self.duration_below(hi.saturating_sub(lo))
    }

    /// `d` scaled by a random factor in `[1 - frac, 1 + frac)`.
    pub fn jitter(&mut self, d: Duration, frac: f64) -> Duration {
        let spread = d.mul_f64(frac * 2.0);
        d.mul_f64(1.0 - frac) + self.duration_below(spread)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_stay_in_range_and_seeds_differ() {
        let mut r = XorShift::from_clock();
        for _ in 0..1000 {
            assert!(r.below(7) < 7);
            let j = r.jitter(Duration::from_secs(1), 0.1);
            assert!(j >= Duration::from_millis(900) && j < Duration::from_millis(1100));
        }
        assert_eq!(r.below(0), 0);
        let (lo, hi) = (Duration::from_millis(300), Duration::from_millis(2000));
        let b = r.between(lo, hi);
        assert!(b >= lo && b < hi);
        assert_eq!(r.between(hi, lo), hi);
        assert_eq!(r.duration_below(Duration::ZERO), Duration::ZERO);
        assert_ne!(
            XorShift::from_clock().next_u64(),
            XorShift::from_clock().next_u64()
        );
        let mut zero = XorShift::new(0);
        assert_ne!(zero.next_u64(), 0, "a zero seed must not stick at zero");
    }
}
