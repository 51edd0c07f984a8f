//! The one error type of the project: a kind, a message, optional context and a retryable flag.

use std::fmt;
use std::sync::Arc;

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
///
/// It is cheap to clone (the source is shared), so that one failure can be returned to every
/// caller that waited for it (see [`Locker::ready`](crate::Locker::ready)).
#[derive(Clone)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    retryable: bool,
    /// `None`: follows `retryable` (see [`Error::is_definite`]).
    definite: Option<bool>,
    store_answered: bool,
    wrong_node: bool,
    key: Option<String>,
    holder: Option<Box<LockData>>,
    source: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    /// A new error of `kind`; retryable when the kind is retryable by default.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            retryable: kind.is_retryable_by_default(),
            definite: None,
            store_answered: false,
            wrong_node: false,
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
        self.source = Some(Arc::from(source.into()));
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

    /// Overrides whether the error is a definite answer (see [`is_definite`](Self::is_definite)):
    /// backends mark so the retryable failures that are answers, such as a refused connection.
    pub fn set_definite(mut self, definite: bool) -> Self {
        self.definite = Some(definite);
        self
    }

    /// Marks the error as the store's own answer to the call (a server error reply such as
    /// `CLUSTERDOWN` or `TRYAGAIN`, or too few replicas acknowledging a durable write): the
    /// connection carried the call and its answer, so the locker's connection healing does not
    /// count the error as a failure of the connection (see
    /// [`LockerOptions::reconnect_after_failures`](crate::LockerOptions::reconnect_after_failures)).
    pub fn set_store_answered(mut self, answered: bool) -> Self {
        self.store_answered = answered;
        self
    }

    /// Whether the store itself answered with this error (see
    /// [`set_store_answered`](Self::set_store_answered)).
    pub fn store_answered(&self) -> bool {
        self.store_answered
    }

    /// Marks the error as an answer from a node that cannot serve this connection's calls any
    /// more (Redis `READONLY`: a replica, such as an old master after a Sentinel failover,
    /// whose other answers, to reads, still succeed): the locker's connection healing replaces
    /// the connection at once, instead of counting failures in a row that the successful reads
    /// would keep resetting.
    pub fn set_wrong_node(mut self, wrong_node: bool) -> Self {
        self.wrong_node = wrong_node;
        self
    }

    /// Whether the connection reached a node that cannot serve it (see
    /// [`set_wrong_node`](Self::set_wrong_node)).
    pub fn is_wrong_node(&self) -> bool {
        self.wrong_node
    }

    /// Whether the failure is an answer rather than the lack of one: the store, the operating
    /// system or the configuration said no (connection refused, no such host, a file that
    /// cannot be opened, credentials or a database name refused), as opposed to no answer in
    /// time or a passing state (a store busy, loading or electing a leader).
    ///
    /// Every non-retryable error is definite unless a backend says otherwise; a retryable one
    /// is definite only when the backend marked it with [`set_definite`](Self::set_definite).
    /// A [`Locker`](crate::Locker) that has not written its first liveness record yet gives up
    /// its start at once on a definite error, and waits up to `reporter_start_timeout` on any
    /// other (see [`Locker::ready`](crate::Locker::ready)). A definite error may still be
    /// [retryable](Self::is_retryable): a refused connection is what a restarting server
    /// answers, too.
    pub fn is_definite(&self) -> bool {
        self.definite.unwrap_or(!self.retryable)
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

/// Whether an I/O error met while connecting is a definite answer (see [`Error::is_definite`]):
/// the connection was refused, the host or network is unreachable, the name does not resolve,
/// or a file or directory is missing or forbidden. Timeouts, resets and temporary name
/// resolution failures are not.
///
/// For backends: mark the error they map such a failure to with
/// [`Error::set_definite`]`(true)`.
pub fn is_definite_io_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as Io;
    if matches!(
        e.kind(),
        Io::ConnectionRefused | Io::NotFound | Io::PermissionDenied | Io::AddrNotAvailable
    ) {
        return true;
    }
    // EHOSTUNREACH, ENETUNREACH and getaddrinfo's "no such name" have no stable
    // `io::ErrorKind` in the supported Rust versions; their messages are the same on every
    // libc we build for. ("Temporary failure in name resolution" is left out: it passes.)
    // "Connection refused" also catches drivers that keep only the text of the OS error.
    let text = e.to_string();
    [
        "Connection refused",
        "No route to host",
        "Network is unreachable",
        "Name or service not known",
        "nodename nor servname provided",
        "No address associated with hostname",
        "No such host is known",
    ]
    .iter()
    .any(|m| text.contains(m))
}

/// The first [`std::io::Error`] in an error's chain of sources (the error itself included),
/// for backends whose driver wraps the operating system's error.
pub fn find_io_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        next = e.source();
    }
    None
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        // The shared source itself, not the `Arc`, so that callers can downcast it.
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
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
            .field("retryable", &self.retryable)
            .field("definite", &self.is_definite());
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
        let source = std::error::Error::source(&e).expect("a source");
        assert!(source.downcast_ref::<std::io::Error>().is_some());
        let copy = e.clone();
        assert_eq!(copy.to_string(), e.to_string());
    }

    #[test]
    fn io_errors_that_are_answers() {
        use std::io::{Error as Io, ErrorKind as K};
        assert!(is_definite_io_error(&Io::from(K::ConnectionRefused)));
        assert!(is_definite_io_error(&Io::from(K::NotFound)));
        assert!(is_definite_io_error(&Io::other(
            "failed to lookup address information: Name or service not known"
        )));
        assert!(!is_definite_io_error(&Io::from(K::TimedOut)));
        assert!(!is_definite_io_error(&Io::from(K::ConnectionReset)));
        assert!(!is_definite_io_error(&Io::other(
            "failed to lookup address information: Temporary failure in name resolution"
        )));
        let wrapped = Error::unavailable("x").with_source(Io::from(K::ConnectionRefused));
        let found = find_io_error(&wrapped).expect("found in the chain");
        assert_eq!(found.kind(), K::ConnectionRefused);
    }

    #[test]
    fn definite_follows_retryable_unless_set() {
        assert!(!Error::unavailable("reset").is_definite());
        assert!(!Error::new(ErrorKind::Timeout, "slow").is_definite());
        assert!(Error::new(ErrorKind::Auth, "no").is_definite());
        assert!(Error::invalid_input("x").is_definite());
        let refused = Error::unavailable("refused").set_definite(true);
        assert!(refused.is_definite() && refused.is_retryable());
    }
}
