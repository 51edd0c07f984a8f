//! The one error type of the project: a kind, a message, optional context and a retryable flag.

use std::fmt;

use crate::record::LockData;

/// A boxed error from a driver or from the operating system.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A `Result` whose error is this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, in a form code can match on.
///
/// New kinds may be added in minor releases, so a `match` needs a wildcard arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The backend could not be reached, or the connection broke. Retryable.
    Unavailable,
    /// The backend did not answer in time. Retryable.
    Timeout,
    /// A record in the backend is not one of ours (not JSON, or not a lock/liveness record).
    Corrupt,
    /// The backend refused our credentials or permissions, or we refused the backend's TLS
    /// certificate. Not retryable: the configuration must change.
    Auth,
    /// The caller passed something the library cannot accept (empty key, zero TTL, ...).
    InvalidInput,
    /// The lock this job held is gone or owned by someone else: the job must stop (seppuku).
    LockLost,
    /// The locker is draining (see [`Locker::drain`](crate::Locker::drain)): jobs must stop.
    Draining,
    /// [`Locker::mutex`](crate::Locker::mutex) waited its whole timeout and someone still holds the lock.
    MutexTimeout,
    /// The locker was shut down or abandoned and accepts no more work.
    Shutdown,
    /// Anything else.
    Other,
}

impl ErrorKind {
    /// Whether an operation that failed with this kind may succeed if tried again as it is.
    pub fn is_retryable_by_default(self) -> bool {
        matches!(self, ErrorKind::Unavailable | ErrorKind::Timeout)
    }

    fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Unavailable => "backend unavailable",
            ErrorKind::Timeout => "timed out",
            ErrorKind::Corrupt => "corrupt record",
            ErrorKind::Auth => "authentication failed",
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::LockLost => "lock lost",
            ErrorKind::Draining => "draining",
            ErrorKind::MutexTimeout => "mutex timeout",
            ErrorKind::Shutdown => "locker shut down",
            ErrorKind::Other => "error",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of every fallible call in this project, backends included.
///
/// It carries a [`kind`](Error::kind) to match on, whether it is
/// [retryable](Error::is_retryable), the lock key it concerns when there is one, and, for
/// [`ErrorKind::LockLost`] and [`ErrorKind::MutexTimeout`], the record of the process that holds
/// the lock now ([`holder`](Error::holder)).
#[derive(thiserror::Error)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    retryable: bool,
    key: Option<String>,
    holder: Option<Box<LockData>>,
    #[source]
    source: Option<BoxError>,
}

impl Error {
    /// A new error of `kind`; retryable when the kind is retryable by default.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            retryable: kind.is_retryable_by_default(),
            key: None,
            holder: None,
            source: None,
        }
    }

    /// Shorthand for an [`ErrorKind::InvalidInput`] error.
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidInput, message)
    }

    /// Shorthand for an [`ErrorKind::Corrupt`] error.
    pub fn corrupt(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Corrupt, message)
    }

    /// Shorthand for an [`ErrorKind::Unavailable`] error.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Unavailable, message)
    }

    /// Attaches the underlying error (a driver's, an I/O error, ...).
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Attaches the lock key this error concerns.
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Attaches the record of the current holder of the lock.
    pub fn with_holder(mut self, holder: LockData) -> Self {
        self.holder = Some(Box::new(holder));
        self
    }

    /// Overrides whether the error is retryable (for example a driver error that says "try again").
    pub fn set_retryable(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whether the same call may succeed if made again later.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// The human-readable message, without the kind.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The lock key this error concerns, if any.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// For [`ErrorKind::LockLost`] and [`ErrorKind::MutexTimeout`]: who holds the lock now, when known.
    pub fn holder(&self) -> Option<&LockData> {
        self.holder.as_deref()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind)?;
        if let Some(key) = &self.key {
            write!(f, " (key {key:?})")?;
        }
        write!(f, ": {}", self.message)?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind)
            .field("message", &self.message)
            .field("retryable", &self.retryable);
        if let Some(key) = &self.key {
            d.field("key", key);
        }
        if let Some(holder) = &self.holder {
            d.field("holder", &holder.owner_hash);
        }
        if let Some(source) = &self.source {
            d.field("source", source);
        }
        d.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_follows_kind_unless_overridden() {
        assert!(Error::unavailable("down").is_retryable());
        assert!(Error::new(ErrorKind::Timeout, "slow").is_retryable());
        assert!(!Error::corrupt("x").is_retryable());
        assert!(!Error::invalid_input("x")
            .set_retryable(false)
            .is_retryable());
        assert!(Error::new(ErrorKind::Other, "TRYAGAIN")
            .set_retryable(true)
            .is_retryable());
    }

    #[test]
    fn display_names_kind_key_message_and_source() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = Error::unavailable("cannot connect")
            .with_key("job")
            .with_source(io);
        assert_eq!(
            e.to_string(),
            "backend unavailable (key \"job\"): cannot connect: refused"
        );
        assert!(std::error::Error::source(&e).is_some());
    }
}
