//! Recoverable errors that happen in the background, for callers that want to see them.

use std::sync::Arc;

use tokio::sync::broadcast;

use crate::error::Error;

/// Where a [`BackgroundError`] happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BackgroundSource {
    /// The reporter thread failed to connect or to write the liveness record; it keeps trying.
    Reporter,
    /// A heartbeat's recheck or extension failed with a retryable error; it is tried again.
    Heartbeat,
    /// Releasing a lock failed; retryable failures are retried until the lock would have
    /// expired anyway.
    Release,
    /// A connection failed several times in a row, and a new one could not be made; it is
    /// tried again with a backoff. See
    /// [`LockerOptions::reconnect_after_failures`](crate::LockerOptions::reconnect_after_failures).
    Connection,
    /// A waiter could not subscribe to the store's release notifications; it polls instead.
    Wait,
    /// A held lock was lost (taken over, gone from the store, expired, or this process's
    /// liveness lapsed); its job's next beat fails. Sent once per lost lock, with the error
    /// the beat gives. Not logged again here: the loss itself is logged at WARN.
    LockLost,
}

impl BackgroundSource {
    /// The source as a metric label: `reporter`, `heartbeat`, `release`, `connection`, `wait`,
    /// `lock_lost`.
    pub fn label(self) -> &'static str {
        match self {
            BackgroundSource::Reporter => "reporter",
            BackgroundSource::Heartbeat => "heartbeat",
            BackgroundSource::Release => "release",
            BackgroundSource::Connection => "connection",
            BackgroundSource::Wait => "wait",
            BackgroundSource::LockLost => "lock_lost",
        }
    }
}

impl std::fmt::Display for BackgroundSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackgroundSource::Reporter => "liveness reporter",
            BackgroundSource::Heartbeat => "heartbeat",
            BackgroundSource::Release => "release",
            BackgroundSource::Connection => "connection",
            BackgroundSource::Wait => "wait",
            BackgroundSource::LockLost => "lock lost",
        })
    }
}

/// A recoverable error that no caller was waiting for, sent to
/// [`Locker::subscribe_errors`](crate::Locker::subscribe_errors) and logged with `tracing`.
#[derive(Debug, Clone)]
pub struct BackgroundError {
    /// Where it happened.
    pub source: BackgroundSource,
    /// What happened.
    pub error: Arc<Error>,
}

/// `{source}: {error}`, e.g. `liveness reporter: backend unavailable: connection refused`.
impl std::fmt::Display for BackgroundError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.source, self.error)
    }
}

/// How many background errors a slow subscriber may fall behind before it misses some.
const CAPACITY: usize = 256;

#[derive(Debug, Clone)]
pub(crate) struct Events {
    tx: broadcast::Sender<BackgroundError>,
}

impl Events {
    pub(crate) fn new() -> Self {
        Events {
            tx: broadcast::channel(CAPACITY).0,
        }
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<BackgroundError> {
        self.tx.subscribe()
    }

    pub(crate) fn emit(&self, source: BackgroundSource, error: Error) {
        crate::metrics::background_error(source);
        // Once: an application that subscribed reports them itself. A lost lock was logged
        // where it was found.
        if source != BackgroundSource::LockLost {
            if self.tx.receiver_count() == 0 {
                tracing::warn!(%source, error = %error, "distributed-locker background error");
            } else {
                tracing::debug!(%source, error = %error, "distributed-locker background error");
            }
        }
        // No subscriber is fine: the error was logged.
        let _ = self.tx.send(BackgroundError {
            source,
            error: Arc::new(error),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_background_error_displays_its_source_and_error() {
        let e = BackgroundError {
            source: BackgroundSource::Reporter,
            error: Arc::new(Error::unavailable("connection refused")),
        };
        assert_eq!(
            e.to_string(),
            "liveness reporter: backend unavailable: connection refused"
        );
    }
}
