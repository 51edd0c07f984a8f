//! The locker's timings, their defaults and the builder that checks them.

use std::sync::Arc;
use std::time::Duration;

use crate::backend::BackendFactory;
use crate::error::{Error, Result};
use crate::locker::Locker;

/// How often the reporter writes this process's liveness record. One record per process (not
/// per lock) makes frequent writes cheap.
///
/// Value: **2 s**.
pub const DEFAULT_REPORT_EVERY: Duration = Duration::from_secs(2);

/// How long a liveness record lives. A process that stops reporting for this long is dead to
/// the cluster, and its locks are taken over: this bounds how long a crashed job blocks others.
/// It can be short because the reporter runs on its own thread, which a busy job cannot starve.
///
/// Value: **10 s**.
pub const DEFAULT_LIVENESS_TTL: Duration = Duration::from_secs(10);

/// How long the first acquire (or [`Locker::ready`]) waits for the reporter's first
/// successful write when the store does not answer. A definite failure (a refused connection,
/// a file that cannot be opened, credentials refused; see [`Error::is_definite`]) ends the wait
/// at once.
///
/// Value: **15 s**.
pub const DEFAULT_REPORTER_START_TIMEOUT: Duration = Duration::from_secs(15);

/// How often a heartbeat rereads the lock to check nobody took it over (one read).
///
/// Value: **5 s**.
pub const DEFAULT_RECHECK_EVERY: Duration = Duration::from_secs(5);

/// How often a heartbeat extends the lock (one write). Rare, since liveness is carried by the
/// reporter, not by the lock.
///
/// Value: **60 s**.
pub const DEFAULT_EXTEND_EVERY: Duration = Duration::from_secs(60);

/// How long a lock lives without an extension. Long, so a job survives pauses (GC, a blocked
/// runtime, a slow network) without losing its lock.
///
/// Value: **5 min**.
pub const DEFAULT_LOCK_TTL: Duration = Duration::from_secs(5 * 60);

/// How many failures in a row make the locker replace a connection (`0`: never). A failure is
/// an error saying the store is unreachable or did not answer (not one the store itself
/// replied, see [`Error::set_store_answered`]), or each [`DEFAULT_SLOW_CALL_AFTER`] that a
/// call waits while the connection answers nothing; any answer resets the count. Both connections (the jobs' one and the reporter's) heal this way, because a client
/// library may keep a broken connection for good (seen after a Redis Cluster failover).
///
/// Value: **3**.
pub const DEFAULT_RECONNECT_AFTER_FAILURES: u32 = 3;

/// How long a call may wait for the store before each further wait of that length counts as a
/// failure toward [`DEFAULT_RECONNECT_AFTER_FAILURES`], when no other call on the same
/// connection got an answer meanwhile (a busy connection that answers is working). The call
/// itself goes on: a slow answer is still used, until its caller's own deadline. The waits are
/// counted in periods of one ticker per connection, which its calls share (cheaper than a
/// timer per call): a call's first counted wait ends one to two periods after it started.
///
/// Value: **1 s**.
pub const DEFAULT_SLOW_CALL_AFTER: Duration = Duration::from_secs(1);

/// The timings of a [`Locker`]; see the `DEFAULT_*` constants for each default and its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LockerOptions {
    /// See [`DEFAULT_REPORT_EVERY`].
    pub report_every: Duration,
    /// See [`DEFAULT_LIVENESS_TTL`].
    pub liveness_ttl: Duration,
    /// See [`DEFAULT_REPORTER_START_TIMEOUT`].
    pub reporter_start_timeout: Duration,
    /// See [`DEFAULT_RECHECK_EVERY`].
    pub recheck_every: Duration,
    /// See [`DEFAULT_EXTEND_EVERY`].
    pub extend_every: Duration,
    /// See [`DEFAULT_LOCK_TTL`].
    pub lock_ttl: Duration,
    /// Refuse to start (a non-retryable `InvalidInput` from [`Locker::ready`], `acquire` and
    /// `mutex`) rather than only warn when the store says it may take longer to fail over than
    /// `liveness_ttl` ([`Capabilities::failover_time`](crate::Capabilities)). Off by default.
    pub refuse_liveness_shorter_than_failover: bool,
    /// See [`DEFAULT_RECONNECT_AFTER_FAILURES`].
    pub reconnect_after_failures: u32,
    /// See [`DEFAULT_SLOW_CALL_AFTER`].
    pub slow_call_after: Duration,
}

impl Default for LockerOptions {
    fn default() -> Self {
        LockerOptions {
            report_every: DEFAULT_REPORT_EVERY,
            liveness_ttl: DEFAULT_LIVENESS_TTL,
            reporter_start_timeout: DEFAULT_REPORTER_START_TIMEOUT,
            recheck_every: DEFAULT_RECHECK_EVERY,
            extend_every: DEFAULT_EXTEND_EVERY,
            lock_ttl: DEFAULT_LOCK_TTL,
            refuse_liveness_shorter_than_failover: false,
            reconnect_after_failures: DEFAULT_RECONNECT_AFTER_FAILURES,
            slow_call_after: DEFAULT_SLOW_CALL_AFTER,
        }
    }
}

impl LockerOptions {
    /// Checks that the timings make sense together.
    ///
    /// Every duration must be non-zero; the reporter must write at least twice per liveness
    /// TTL, and extensions must come more often than the lock expires, or locks would be lost
    /// in normal operation.
    pub fn validate(&self) -> Result<()> {
        let named = [
            ("report_every", self.report_every),
            ("liveness_ttl", self.liveness_ttl),
            ("reporter_start_timeout", self.reporter_start_timeout),
            ("recheck_every", self.recheck_every),
            ("extend_every", self.extend_every),
            ("lock_ttl", self.lock_ttl),
            ("slow_call_after", self.slow_call_after),
        ];
        for (name, d) in named {
            if d.is_zero() {
                return Err(Error::invalid_input(format!(
                    "{name} must be greater than zero"
                )));
            }
            // Durations are kept as u64 nanoseconds; 100 years is plenty.
            if d > Duration::from_secs(100 * 365 * 24 * 3600) {
                return Err(Error::invalid_input(format!("{name} of {d:?} is too long")));
            }
        }
        // At least two reports per TTL, so that one slow or failed write is not a lapse.
        if self.report_every.saturating_mul(2) > self.liveness_ttl {
            return Err(Error::invalid_input(format!(
                "report_every ({:?}) must be at most half of liveness_ttl ({:?})",
                self.report_every, self.liveness_ttl
            )));
        }
        if self.extend_every >= self.lock_ttl {
            return Err(Error::invalid_input(format!(
                "extend_every ({:?}) must be shorter than lock_ttl ({:?})",
                self.extend_every, self.lock_ttl
            )));
        }
        Ok(())
    }
}

/// Builds a [`Locker`]; made by [`Locker::builder`].
#[must_use]
pub struct LockerBuilder {
    factory: Arc<dyn BackendFactory>,
    options: LockerOptions,
}

impl LockerBuilder {
    pub(crate) fn new(factory: Arc<dyn BackendFactory>) -> Self {
        LockerBuilder {
            factory,
            options: LockerOptions::default(),
        }
    }

    /// Sets every timing at once.
    pub fn options(mut self, options: LockerOptions) -> Self {
        self.options = options;
        self
    }

    /// How often the reporter writes the liveness record ([`DEFAULT_REPORT_EVERY`]).
    pub fn report_every(mut self, d: Duration) -> Self {
        self.options.report_every = d;
        self
    }

    /// How long a liveness record lives ([`DEFAULT_LIVENESS_TTL`]).
    pub fn liveness_ttl(mut self, d: Duration) -> Self {
        self.options.liveness_ttl = d;
        self
    }

    /// How long the first acquire waits for the reporter ([`DEFAULT_REPORTER_START_TIMEOUT`]).
    pub fn reporter_start_timeout(mut self, d: Duration) -> Self {
        self.options.reporter_start_timeout = d;
        self
    }

    /// How often heartbeats reread the lock ([`DEFAULT_RECHECK_EVERY`]).
    pub fn recheck_every(mut self, d: Duration) -> Self {
        self.options.recheck_every = d;
        self
    }

    /// How often heartbeats extend the lock ([`DEFAULT_EXTEND_EVERY`]).
    pub fn extend_every(mut self, d: Duration) -> Self {
        self.options.extend_every = d;
        self
    }

    /// How long a lock lives without an extension ([`DEFAULT_LOCK_TTL`]).
    pub fn lock_ttl(mut self, d: Duration) -> Self {
        self.options.lock_ttl = d;
        self
    }

    /// Refuse to start rather than only warn when the store may take longer to fail over than
    /// the liveness TTL ([`LockerOptions::refuse_liveness_shorter_than_failover`]).
    pub fn refuse_liveness_shorter_than_failover(mut self, refuse: bool) -> Self {
        self.options.refuse_liveness_shorter_than_failover = refuse;
        self
    }

    /// How many failures in a row make the locker replace a connection, `0` for never
    /// ([`DEFAULT_RECONNECT_AFTER_FAILURES`]).
    pub fn reconnect_after_failures(mut self, failures: u32) -> Self {
        self.options.reconnect_after_failures = failures;
        self
    }

    /// How long a call waits for the store before each further wait of that length counts as
    /// a failure ([`DEFAULT_SLOW_CALL_AFTER`]).
    pub fn slow_call_after(mut self, d: Duration) -> Self {
        self.options.slow_call_after = d;
        self
    }

    /// Checks the timings and makes the locker. Nothing connects yet: the reporter thread and
    /// the connections start with the first acquire.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) when the timings are
    /// inconsistent (see [`LockerOptions::validate`]).
    pub fn build(self) -> Result<Locker> {
        self.options.validate()?;
        Ok(Locker::from_parts(self.factory, self.options))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ErrorKind, MemoryBackend};

    #[test]
    fn defaults_are_the_node_librarys() {
        let o = LockerOptions::default();
        assert_eq!(o.report_every, Duration::from_millis(2000));
        assert_eq!(o.liveness_ttl, Duration::from_millis(10_000));
        assert_eq!(o.reporter_start_timeout, Duration::from_millis(15_000));
        assert_eq!(o.recheck_every, Duration::from_millis(5_000));
        assert_eq!(o.extend_every, Duration::from_millis(60_000));
        assert_eq!(o.lock_ttl, Duration::from_millis(300_000));
        assert_eq!(o.reconnect_after_failures, 3);
        assert_eq!(o.slow_call_after, Duration::from_secs(1));
        o.validate().expect("defaults are valid");
    }

    #[test]
    fn inconsistent_timings_are_typed_errors() {
        let cases: Vec<fn(LockerBuilder) -> LockerBuilder> = vec![
            |b| b.lock_ttl(Duration::ZERO),
            |b| b.report_every(Duration::ZERO),
            |b| b.report_every(Duration::from_secs(6)),
            |b| b.extend_every(Duration::from_secs(300)),
            |b| b.recheck_every(Duration::MAX),
            |b| b.slow_call_after(Duration::ZERO),
        ];
        for case in cases {
            let b = case(Locker::builder(MemoryBackend::new()));
            let e = b.build().expect_err("invalid");
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
        }
    }
}
