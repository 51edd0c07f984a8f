//! The clock of every local deadline (lock TTL, liveness freshness, retry windows), shared by
//! the locker, its heartbeats and its reporter thread, read as `u64` nanoseconds so that
//! deadlines fit in atomics.
//!
//! It must keep counting while the machine is suspended: the store's TTLs run on during a
//! suspend (the store is another machine), so a clock that stops would let a process wake up
//! believing that a lock whose TTL ran out is still its own. `Instant` does not do that on
//! Linux (it reads `CLOCK_MONOTONIC`, which stops during suspend), so this clock reads:
//! - Linux and Android: `CLOCK_BOOTTIME`, which is `CLOCK_MONOTONIC` plus the time suspended;
//! - Apple platforms: `CLOCK_MONOTONIC`, which there counts the time asleep
//!   (`mach_continuous_time`);
//! - elsewhere: `Instant`, which on some platforms stops during suspend. There a suspend is
//!   covered only by fencing tokens, as any pause of the process (see ARCHITECTURE.md).

use std::time::Duration;

/// Which source a [`Clock`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClockSource {
    /// `CLOCK_BOOTTIME` (Linux, Android): counts suspended time.
    #[cfg_attr(not(any(target_os = "linux", target_os = "android")), allow(dead_code))]
    Boottime,
    /// `CLOCK_MONOTONIC` on Apple platforms: counts time asleep.
    #[cfg_attr(not(target_vendor = "apple"), allow(dead_code))]
    AppleMonotonic,
    /// `std::time::Instant`: may stop during suspend.
    #[cfg_attr(
        any(target_os = "linux", target_os = "android", target_vendor = "apple"),
        allow(dead_code)
    )]
    Instant,
}

/// Nanoseconds since the locker was built, plus one (so that 0 can mean "never").
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    base: u64,
}

impl Clock {
    pub(crate) fn new() -> Self {
        Clock { base: raw_now() }
    }

    pub(crate) fn now(&self) -> u64 {
        raw_now().saturating_sub(self.base).saturating_add(1)
    }

    /// The source this build reads.
    pub(crate) const SOURCE: ClockSource = source();
}

/// The clock of the locker's local deadlines, as a [`Duration`] from an arbitrary start. It
/// keeps counting while the machine is suspended where the platform allows it
/// (`CLOCK_BOOTTIME` on Linux and Android, `CLOCK_MONOTONIC` on Apple platforms; elsewhere
/// `Instant`). For a backend that keeps a lower bound of a store-side expiry and compares it
/// with a lock's deadline: on Linux, `Instant` stops during a suspend while the store's TTL
/// runs on, so a bound kept with it could be too late.
///
/// ```
/// let before = locker_core::suspend_aware_now();
/// assert!(locker_core::suspend_aware_now() >= before);
/// ```
pub fn suspend_aware_now() -> Duration {
    Duration::from_nanos(raw_now())
}

#[cfg(any(target_os = "linux", target_os = "android", target_vendor = "apple"))]
const fn source() -> ClockSource {
    if cfg!(target_vendor = "apple") {
        ClockSource::AppleMonotonic
    } else {
        ClockSource::Boottime
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android", target_vendor = "apple")))]
const fn source() -> ClockSource {
    ClockSource::Instant
}

/// The source's reading in nanoseconds (an arbitrary origin).
#[cfg(any(target_os = "linux", target_os = "android", target_vendor = "apple"))]
pub(crate) fn raw_now() -> u64 {
    use nix::time::{clock_gettime, ClockId};
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let id = ClockId::CLOCK_BOOTTIME;
    #[cfg(target_vendor = "apple")]
    let id = ClockId::CLOCK_MONOTONIC;
    match clock_gettime(id) {
        Ok(ts) => {
            let secs = u64::try_from(ts.tv_sec()).unwrap_or(0);
            let subsec = u64::try_from(ts.tv_nsec()).unwrap_or(0);
            secs.saturating_mul(1_000_000_000).saturating_add(subsec)
        }
        // Cannot happen for these clock ids on these systems (the kernel has had them for
        // over a decade). Never panic on it: read as the far future, so that every deadline
        // has passed and locks are reported lost rather than held too long (the safe side).
        Err(_) => u64::MAX / 2,
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android", target_vendor = "apple")))]
pub(crate) fn raw_now() -> u64 {
    instant_now()
}

#[cfg(not(any(target_os = "linux", target_os = "android", target_vendor = "apple")))]
fn instant_now() -> u64 {
    use std::sync::OnceLock;
    use std::time::Instant;
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    nanos(ORIGIN.get_or_init(Instant::now).elapsed())
}

/// A duration in nanoseconds, saturating (option validation keeps durations far below the limit).
pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Local deadlines must count suspended time: on Linux the clock is `CLOCK_BOOTTIME`
    /// (a suspend cannot be caused in a test, so this checks the source directly: a reading
    /// lies between two `CLOCK_BOOTTIME` readings taken around it).
    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[test]
    fn the_clock_reads_boottime() {
        use nix::time::{clock_gettime, ClockId};
        let boot = || {
            let ts = clock_gettime(ClockId::CLOCK_BOOTTIME).expect("CLOCK_BOOTTIME");
            ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
        };
        assert_eq!(Clock::SOURCE, ClockSource::Boottime);
        let clock = Clock::new();
        for _ in 0..1000 {
            let before = boot();
            let reading = clock.base + clock.now() - 1;
            let after = boot();
            assert!(
                before <= reading && reading <= after,
                "{before} {reading} {after}"
            );
        }
    }

    #[test]
    fn the_clock_never_goes_backwards_and_starts_above_zero() {
        let clock = Clock::new();
        let mut last = clock.now();
        assert!(last >= 1);
        for _ in 0..10_000 {
            let now = clock.now();
            assert!(now >= last);
            last = now;
        }
    }
}
