//! A monotonic clock shared by the locker, its heartbeats and its reporter thread, read as
//! `u64` nanoseconds so that deadlines fit in atomics.

use std::time::{Duration, Instant};

/// Nanoseconds since the locker was built, plus one (so that 0 can mean "never").
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    base: Instant,
}

impl Clock {
    pub(crate) fn new() -> Self {
        Clock {
            base: Instant::now(),
        }
    }

    pub(crate) fn now(&self) -> u64 {
        nanos(self.base.elapsed()).saturating_add(1)
    }
}

/// A duration in nanoseconds, saturating (option validation keeps durations far below the limit).
pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
