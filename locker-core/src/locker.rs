//! [`Locker`]: acquire, run, release, inspect, drain and shut down.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::{broadcast, watch, Notify, OnceCell};
use tracing::Instrument;

use crate::backend::{
    AcquireDecision, AcquireOutcome, BackendFactory, LockBackend, ReleaseOutcome,
};
use crate::clock::{nanos, Clock};
use crate::error::{Error, ErrorKind, Result};
use crate::events::{BackgroundError, BackgroundSource, Events};
use crate::hash::{new_owner_hash, new_process_hash, parse_owner_hash, validate_key};
use crate::healing::Healing;
use crate::heartbeat::{Heartbeat, LockState, Loss};
use crate::options::{LockerBuilder, LockerOptions};
use crate::record::LockData;
use crate::reporter::{release_with_retry, Liveness, ReleaseKind, Reporter};
use crate::wait::{ReleaseWatch, Wait, WatchHub};

/// What to lock: a key, and optionally a trace kept in the record and in the owner hash.
///
/// `&str` and `String` convert into it, so `locker.acquire("job")` works; add a trace with
/// [`LockRequest::trace`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockRequest {
    key: String,
    pub(crate) trace: Option<String>,
    /// Set for a permit of a [`Semaphore`](crate::Semaphore): written into the record as
    /// `"permits"`, so that callers that disagree on the count find out.
    permits: Option<u32>,
}

impl LockRequest {
    /// A request for `key`, without trace.
    pub fn new(key: impl Into<String>) -> Self {
        LockRequest {
            key: key.into(),
            trace: None,
            permits: None,
        }
    }

    /// Attaches a trace (a request id, a job run id); an empty trace is no trace.
    pub fn trace(mut self, trace: impl Into<String>) -> Self {
        let trace = trace.into();
        self.trace = (!trace.is_empty()).then_some(trace);
        self
    }

    /// The key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The request for one permit slot of a semaphore.
    pub(crate) fn permit(key: String, trace: Option<String>, permits: u32) -> Self {
        LockRequest {
            key,
            trace,
            permits: Some(permits),
        }
    }
}

impl From<&str> for LockRequest {
    fn from(key: &str) -> Self {
        LockRequest::new(key)
    }
}

impl From<String> for LockRequest {
    fn from(key: String) -> Self {
        LockRequest::new(key)
    }
}

impl From<&String> for LockRequest {
    fn from(key: &String) -> Self {
        LockRequest::new(key.clone())
    }
}

/// What [`Locker::acquire`] got.
#[derive(Debug)]
#[must_use]
pub enum LockAttempt {
    /// The lock is ours until the guard is released or dropped.
    Acquired(LockGuard),
    /// A live process holds the lock; this is its record.
    Held(LockData),
}

/// What [`Locker::acquire_and_run`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum RunOutcome<T> {
    /// The lock was acquired, the job ran and returned this, and the lock was released.
    Ran(T),
    /// A live process holds the lock, so the job did not run; this is its record.
    Held(LockData),
}

/// What [`Locker::owner_status`] found for an owner hash, as the Node library's
/// `readOwnerHashStatus`. For debugging and dashboards only: it is stale as soon as it returns.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum OwnerStatus {
    /// That owner holds the lock and its process is alive.
    Running {
        /// The lock key.
        key: String,
        /// The stored record.
        lock: LockData,
    },
    /// A live process other than that owner holds the lock.
    HeldByOther {
        /// The lock key.
        key: String,
        /// The record of the current holder.
        lock: LockData,
    },
    /// No lock is stored under the key.
    NoKey {
        /// The lock key.
        key: String,
    },
    /// A lock is stored, but its process has no liveness record: it is free to take.
    NoRunningProcess {
        /// The lock key.
        key: String,
        /// The stale record.
        lock: LockData,
    },
    /// The string is not an owner hash.
    Malformed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    ShutDown,
    Abandoned,
}

pub(crate) struct Inner {
    pub(crate) options: LockerOptions,
    pub(crate) clock: Clock,
    pub(crate) events: Events,
    factory: Arc<dyn BackendFactory>,
    process_hash: Arc<str>,
    backend: OnceCell<Arc<dyn LockBackend>>,
    reporter: OnceCell<Reporter>,
    draining: AtomicBool,
    /// The locks held at the first drain were counted as lost (`drained`) once.
    drain_counted: AtomicBool,
    /// Turns `true` on drain, to wake sleeping heartbeats at once.
    drain_signal: watch::Sender<bool>,
    drain_reason: RwLock<Option<String>>,
    phase: RwLock<Phase>,
    held: Mutex<HashMap<u64, Weak<LockState>>>,
    /// Notified whenever a lock leaves `held`, for `shutdown` to wait on.
    held_changed: Notify,
    pub(crate) next_id: AtomicU64,
    reporter_stopped: OnceCell<()>,
    /// Wakes this locker's waiters of a key when one of its own locks on it is released.
    pub(crate) local_releases: WatchHub,
    /// The waiters of this locker, in line per key: only the first of each line tries the
    /// store, so that many waiters on one key cost the store what one does.
    lines: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Inner {
    pub(crate) async fn backend(&self) -> Result<Arc<dyn LockBackend>> {
        self.backend
            .get_or_try_init(|| async {
                let backend = self.factory.connect().await?;
                Ok::<_, Error>(Healing::wrap(
                    backend,
                    self.factory.clone(),
                    "job",
                    &self.options,
                    self.events.clone(),
                ))
            })
            .await
            .cloned()
    }

    pub(crate) fn drain_signal(&self) -> watch::Receiver<bool> {
        self.drain_signal.subscribe()
    }

    pub(crate) fn liveness(&self) -> Option<&Liveness> {
        self.reporter.get().map(|r| &*r.liveness)
    }

    pub(crate) fn check_draining(&self) -> Result<()> {
        if !self.draining.load(Ordering::Acquire) {
            return Ok(());
        }
        let reason = self
            .drain_reason
            .read()
            .ok()
            .and_then(|r| r.clone())
            .unwrap_or_default();
        Err(Error::new(
            ErrorKind::Draining,
            format!("this locker takes no more work ({reason})"),
        ))
    }

    fn phase(&self) -> Phase {
        self.phase.read().map(|p| *p).unwrap_or(Phase::ShutDown)
    }

    fn check_running(&self) -> Result<()> {
        match self.phase() {
            Phase::Running => self.check_draining(),
            Phase::ShutDown => Err(Error::new(ErrorKind::Shutdown, "the locker was shut down")),
            Phase::Abandoned => Err(Error::new(ErrorKind::Shutdown, "the locker was abandoned")),
        }
    }

    /// Moves from `Running` to `phase`; returns the phase found (unchanged unless `Running`).
    fn set_phase_from_running(&self, phase: Phase) -> Phase {
        let mut p = self.phase_mut();
        let found = *p;
        if found == Phase::Running {
            *p = phase;
        }
        found
    }

    fn set_phase(&self, phase: Phase) -> Phase {
        std::mem::replace(&mut *self.phase_mut(), phase)
    }

    fn phase_mut(&self) -> std::sync::RwLockWriteGuard<'_, Phase> {
        match self.phase.write() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Starts the reporter on first use and waits until this process's liveness record is
    /// fresh, so that no lock is ever taken by a process the cluster would think dead.
    async fn ensure_alive(&self) -> Result<()> {
        let reporter = self
            .reporter
            .get_or_try_init(|| async {
                // Never start a reporter for a locker that already stopped.
                self.check_running()?;
                Reporter::spawn(
                    self.factory.clone(),
                    &self.options,
                    self.clock,
                    self.process_hash.clone(),
                    self.events.clone(),
                )
            })
            .await?;
        // A shutdown may have started (and found no reporter to stop) while this one started.
        if let Err(e) = self.check_running() {
            if self.phase() == Phase::ShutDown && self.running_keys().is_empty() {
                reporter.stop_detached(true);
            }
            return Err(e);
        }
        reporter
            .liveness
            .wait_fresh(self.options.reporter_start_timeout)
            .await
    }

    /// Calls `f` with every lock still registered (whose guard or heartbeat is alive).
    pub(crate) fn for_each_held(&self, mut f: impl FnMut(Arc<LockState>)) {
        let states: Vec<Arc<LockState>> = match self.held.lock() {
            Ok(held) => held.values().filter_map(Weak::upgrade).collect(),
            Err(_) => return,
        };
        states.into_iter().for_each(&mut f);
    }

    /// Forgets a lock whose job has ended (its release is done or queued). When `shutdown`
    /// is waiting, wakes it; when a bounded shutdown gave up waiting and this was the last
    /// lock, stops the reporter now (after the releases already queued to it).
    fn unregister(&self, id: u64) {
        let now_empty = match self.held.lock() {
            Ok(mut held) => {
                let removed = held.remove(&id).is_some();
                if removed {
                    crate::metrics::held_changed(-1.0);
                }
                removed && held.is_empty()
            }
            Err(_) => false,
        };
        // Only `shutdown` waits for this, and only after it left `Running`: a removal that saw
        // `Running` happened before that, so the shutdown's first look at `held` sees it.
        let phase = self.phase();
        if phase != Phase::Running {
            self.held_changed.notify_waiters();
        }
        if now_empty && phase == Phase::ShutDown {
            if let Some(reporter) = self.reporter.get() {
                reporter.stop_detached(true);
            }
        }
    }

    /// The keys whose jobs still hold their locks. A lock already lost (taken over, expired,
    /// or lapsed with this process's liveness) is no longer held by its job, whose next beat
    /// fails anyway: it does not keep a shutdown waiting.
    fn running_keys(&self) -> Vec<String> {
        let now = self.clock.now();
        match self.held.lock() {
            Ok(held) => held
                .values()
                .filter_map(Weak::upgrade)
                .filter(|s| s.still_held(now))
                .map(|s| s.key.clone())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Stops the reporter thread once, deleting this process's liveness record; concurrent
    /// callers all wait for the one stop.
    async fn stop_reporter(&self) {
        self.reporter_stopped
            .get_or_init(|| async {
                if let Some(reporter) = self.reporter.get() {
                    reporter.stop(true, false).await;
                }
                tracing::info!(process_hash = %self.process_hash, "locker shut down");
            })
            .await;
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(reporter) = self.reporter.get() {
            // No guard is alive (each holds the locker), so nothing is held: let the thread
            // delete the liveness record (unless abandoned) and exit. After a shutdown the
            // thread is already gone and this does nothing.
            reporter.stop_detached(self.phase() != Phase::Abandoned);
        }
    }
}

/// Runs jobs under cluster-wide locks.
///
/// Each held key has a lock record with a long TTL, and each `Locker` keeps a short-lived
/// liveness record for its process, written by a reporter thread with its own connection. A
/// lock whose process has no liveness record is free: the next acquire takes it over.
/// ARCHITECTURE.md in the repository describes the design.
///
/// Cheap to clone: clones share one reporter thread, one process hash and one connection.
/// Build it with [`Locker::builder`].
///
/// # Examples
/// ```
/// # extern crate locker_core as locker;
/// use std::time::Duration;
/// use locker::{LockAttempt, Locker, MemoryBackend};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), locker::Error> {
/// let store = MemoryBackend::new();
/// let a = Locker::builder(store.clone()).build()?;
/// let b = Locker::builder(store).lock_ttl(Duration::from_secs(120)).build()?;
///
/// let LockAttempt::Acquired(guard) = a.acquire("invoice-run").await? else { unreachable!() };
/// assert!(matches!(b.acquire("invoice-run").await?, LockAttempt::Held(_)));
/// guard.release().await?;
/// assert!(matches!(b.acquire("invoice-run").await?, LockAttempt::Acquired(_)));
/// # a.shutdown().await; b.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Locker {
    pub(crate) inner: Arc<Inner>,
}

impl Locker {
    /// Starts building a locker over the backends that `factory` connects to.
    pub fn builder(factory: impl BackendFactory) -> LockerBuilder {
        LockerBuilder::new(Arc::new(factory))
    }

    pub(crate) fn from_parts(factory: Arc<dyn BackendFactory>, options: LockerOptions) -> Self {
        tracing::debug!(clock = ?Clock::SOURCE, "local deadlines read this clock");
        Locker {
            inner: Arc::new(Inner {
                options,
                clock: Clock::new(),
                events: Events::new(),
                factory,
                process_hash: new_process_hash().into(),
                backend: OnceCell::new(),
                reporter: OnceCell::new(),
                draining: AtomicBool::new(false),
                drain_counted: AtomicBool::new(false),
                drain_signal: watch::channel(false).0,
                drain_reason: RwLock::new(None),
                phase: RwLock::new(Phase::Running),
                held: Mutex::new(HashMap::new()),
                held_changed: Notify::new(),
                next_id: AtomicU64::new(0),
                reporter_stopped: OnceCell::new(),
                local_releases: WatchHub::new(),
                lines: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// This locker's process hash, `{hostname}/{pid}.{nanos}`.
    pub fn process_hash(&self) -> &str {
        &self.inner.process_hash
    }

    /// The timings in use.
    pub fn options(&self) -> &LockerOptions {
        &self.inner.options
    }

    /// Subscribes to background errors, each tagged with its [`BackgroundSource`]: the
    /// reporter's failed connects and liveness writes (`Reporter`), failed rechecks and
    /// extensions that are tried again (`Heartbeat`), failed releases (`Release`), failed
    /// reconnects of a connection that kept failing (`Connection`), failed subscriptions of
    /// waiters (`Wait`), and held locks that were lost (`LockLost`).
    ///
    /// Each is logged with `tracing` too: at WARN while nobody subscribes, at DEBUG while a
    /// receiver exists (the application reports them itself, not twice). A receiver that is
    /// held but never read still counts as a subscriber, so the errors are then logged at
    /// DEBUG, not WARN. A lost lock is the exception: it is logged once, at WARN, when it is
    /// found, whether or not anyone subscribes.
    ///
    /// The receiver is a [`tokio::sync::broadcast`] one, with room for 256 errors: a receiver
    /// that falls further behind gets [`RecvError::Lagged`](broadcast::error::RecvError::Lagged)
    /// once (with the number it missed), then the newer errors. So a loop must go on after
    /// `Lagged`, and end only on `Closed` (the locker is gone):
    ///
    /// ```
    /// # extern crate locker_core as locker;
    /// use tokio::sync::broadcast::error::RecvError;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), locker::Error> {
    /// # let locker = locker::Locker::builder(locker::MemoryBackend::new()).build()?;
    /// let mut errors = locker.subscribe_errors();
    /// tokio::spawn(async move {
    ///     loop {
    ///         match errors.recv().await {
    ///             Ok(e) => eprintln!("{e}"),
    ///             Err(RecvError::Lagged(missed)) => eprintln!("{missed} background errors missed"),
    ///             Err(RecvError::Closed) => break,
    ///         }
    ///     }
    /// });
    /// # locker.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn subscribe_errors(&self) -> broadcast::Receiver<BackgroundError> {
        self.inner.events.subscribe()
    }

    /// Starts the liveness reporter (if no call did yet) and waits until it has written this
    /// process's first liveness record: from then on the backend is known to work, and
    /// [`acquire`](Self::acquire) and its kin do not wait for the reporter again. Call it at
    /// start-up to fail fast on a wrong URL, password or path, before any job is scheduled.
    ///
    /// Returns at once when the record is fresh. A *definite* failure of the reporter's latest
    /// attempt to connect or write (see [`Error::is_definite`]: connection refused, no such
    /// host, a SQLite file that cannot be opened, credentials or database name refused, a TLS
    /// certificate not trusted) is returned as soon as it is known, not after the timeout.
    /// A store that does not answer is waited for up to
    /// [`reporter_start_timeout`](crate::LockerOptions::reporter_start_timeout).
    ///
    /// The reporter keeps trying every `report_every` after a failure, so a later call
    /// succeeds once the store is back.
    ///
    /// # Errors
    /// The definite error as the backend reported it, with its kind: a refused connection is a
    /// retryable [`ErrorKind::Unavailable`]; credentials refused are [`ErrorKind::Auth`]; a
    /// missing directory or database is [`ErrorKind::InvalidInput`] (neither is retryable).
    /// [`ErrorKind::Timeout`], naming the reporter's last error, when the store did not answer
    /// within `reporter_start_timeout`. [`ErrorKind::Shutdown`] after a shutdown.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future stops the waiting; the reporter keeps running.
    ///
    /// # Examples
    /// ```
    /// # extern crate locker_core as locker;
    /// use std::sync::Arc;
    /// use locker::{factory_fn, Error, ErrorKind, LockBackend, Locker, MemoryBackend};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Error> {
    /// let locker = Locker::builder(MemoryBackend::new()).build()?;
    /// locker.ready().await?; // the backend works: go on starting the service
    /// # locker.shutdown().await;
    ///
    /// // A backend that cannot be opened fails at once, not after the start timeout.
    /// let broken = Locker::builder(factory_fn(|| async {
    ///     Err::<Arc<dyn LockBackend>, _>(Error::invalid_input(
    ///         "cannot open /nonexistent/locks.db: No such file or directory",
    ///     ))
    /// }))
    /// .build()?;
    /// let e = broken.ready().await.unwrap_err();
    /// assert_eq!(e.kind(), ErrorKind::InvalidInput);
    /// assert!(!e.is_retryable());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn ready(&self) -> Result<()> {
        self.inner.check_running()?;
        self.inner.ensure_alive().await
    }

    /// Tries once to acquire the lock. Low-level: prefer [`acquire_and_run`](Self::acquire_and_run).
    ///
    /// Starts the liveness reporter on first use and waits for its first successful write, as
    /// [`ready`](Self::ready) does: a definite failure (a refused connection, a file that
    /// cannot be opened, credentials refused) is returned at once, and a store that does not
    /// answer is waited for up to `reporter_start_timeout`. When a lock is held by a process that has no liveness record,
    /// it is taken over: the dead owner's lock is replaced only if it is still theirs. Costs one
    /// backend call whatever the outcome when the backend decides in one call
    /// ([`Capabilities::checked_acquire`](crate::Capabilities::checked_acquire): Redis standalone,
    /// or a cluster with a hash-tagged key prefix); otherwise one when the key is free, two when
    /// it is held by a live process, three when taken over (four if the backend has no atomic
    /// `take_over`).
    ///
    /// A second acquire of a key this locker already holds returns [`LockAttempt::Held`].
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for an empty or oversized key or trace, [`ErrorKind::Draining`]
    /// or [`ErrorKind::Shutdown`] once the locker stops taking work, [`ErrorKind::Timeout`] when
    /// the reporter cannot write, the reporter's definite start error (see
    /// [`ready`](Self::ready)), and backend errors.
    ///
    /// # Cancel safety
    /// If the future is dropped while an acquire is in flight, the lock may have been stored
    /// with no guard to hold it: it is released in the background (only if it is ours), as for
    /// a dropped [`LockGuard`].
    pub async fn acquire(&self, request: impl Into<LockRequest>) -> Result<LockAttempt> {
        let request = request.into();
        let span = tracing::debug_span!(
            "locker.acquire",
            key = %request.key,
            owner_hash = tracing::field::Empty,
            fencing_token = tracing::field::Empty,
        );
        let started = std::time::Instant::now();
        let result = self.acquire_once(request).instrument(span.clone()).await;
        let outcome = match &result {
            Ok(LockAttempt::Acquired(guard)) => {
                span.record("owner_hash", guard.owner_hash());
                if let Some(token) = guard.fencing_token() {
                    span.record("fencing_token", token);
                }
                "acquired"
            }
            Ok(LockAttempt::Held(_)) => "held",
            Err(_) => "error",
        };
        crate::metrics::acquire(outcome, started.elapsed());
        result
    }

    async fn acquire_once(&self, request: LockRequest) -> Result<LockAttempt> {
        let inner = &self.inner;
        validate_key(&request.key)?;
        inner.check_running()?;
        let owner_hash =
            new_owner_hash(&request.key, &inner.process_hash, request.trace.as_deref())?;
        // The reporter starts (and reports its errors) even when the main connection cannot
        // be made yet.
        inner.ensure_alive().await?;
        let backend = inner.backend().await?;
        if let Some(max) = backend.capabilities().max_key_len {
            if request.key.len() > max {
                return Err(Error::invalid_input(format!(
                    "lock key is {} bytes, more than this backend's limit of {max}",
                    request.key.len()
                )));
            }
        }
        let key = request.key;
        let ttl = inner.options.lock_ttl;
        let mut data = LockData::new(owner_hash, inner.process_hash.to_string(), request.trace);
        if let Some(permits) = request.permits {
            data.extra
                .insert(crate::semaphore::PERMITS_FIELD.into(), permits.into());
        }

        // No acquire is sent while this process's own liveness record may be missing.
        inner.ensure_alive().await?;
        let sent_at = inner.clock.now();
        // If this future is dropped while a write is in flight, the lock may be stored with no
        // guard to release it: release it (if ours) in the background.
        let pending = PendingAcquire::new(inner, &key, &data.owner_hash, sent_at);
        let outcome = backend.acquire_checked(&key, &data, ttl).await?;
        pending.disarm();
        let holder = match outcome {
            AcquireDecision::Acquired(stored) => {
                tracing::debug!(key = %key, owner_hash = %stored.owner_hash, fencing_token = ?stored.fencing_token, "acquired lock");
                return self.guard(key, stored, sent_at).await;
            }
            AcquireDecision::TookOver { stored, dead } => {
                crate::metrics::took_over();
                tracing::warn!(key = %key, owner_hash = %stored.owner_hash, dead_owner = %dead.owner_hash, fencing_token = ?stored.fencing_token, "took over the lock of a dead process");
                return self.guard(key, stored, sent_at).await;
            }
            // Our own record, found by an acquire sent again after a lost connection.
            AcquireDecision::HeldByLive(stored) | AcquireDecision::Held(stored)
                if stored.owner_hash == data.owner_hash =>
            {
                tracing::debug!(key = %key, owner_hash = %stored.owner_hash, fencing_token = ?stored.fencing_token, "acquired lock");
                return self.guard(key, stored, sent_at).await;
            }
            AcquireDecision::HeldByLive(holder) => return Ok(LockAttempt::Held(holder)),
            AcquireDecision::Held(holder) => holder,
        };
        if backend.read_process(&holder.process_hash).await?.is_some() {
            return Ok(LockAttempt::Held(holder));
        }
        // The holder's process is dead: replace its lock, but only if it is still its lock.
        inner.ensure_alive().await?;
        let sent_at = inner.clock.now();
        let pending = PendingAcquire::new(inner, &key, &data.owner_hash, sent_at);
        let outcome = backend
            .take_over(&key, &data, ttl, &holder.owner_hash)
            .await?;
        pending.disarm();
        match ours_if_replayed(outcome, &data.owner_hash) {
            AcquireOutcome::Acquired(stored) => {
                crate::metrics::took_over();
                tracing::warn!(key = %key, owner_hash = %stored.owner_hash, dead_owner = %holder.owner_hash, fencing_token = ?stored.fencing_token, "took over the lock of a dead process");
                self.guard(key, stored, sent_at).await
            }
            AcquireOutcome::Held(holder) => Ok(LockAttempt::Held(holder)),
        }
    }

    /// Registers a stored lock and hands out its guard, only if it is still certainly ours
    /// now; otherwise releases it (if still ours) in the background and fails.
    async fn guard(&self, key: String, stored: LockData, sent_at: u64) -> Result<LockAttempt> {
        let inner = &self.inner;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(LockState::new(inner.clone(), id, key, stored, sent_at));
        if let Ok(mut held) = inner.held.lock() {
            held.insert(id, Arc::downgrade(&state));
            crate::metrics::held_changed(1.0);
        }
        let guard = LockGuard { state };
        // `shutdown` sets the phase before it waits for the held locks, so a lock registered
        // after that is seen here. Dropping the guard releases it (if still ours).
        inner.check_running()?;
        // The reply is only as fresh as now: if this process's liveness record may have
        // lapsed since the call was sent (a freeze, a starved runtime), another process may
        // already have taken the lock over; if the reply came after the lock TTL, it may have
        // expired. The same checks as every beat's, in the same place.
        if let Err(e) = guard.state.check_local(inner.clock.now()) {
            if e.kind() != ErrorKind::LockLost {
                return Err(e);
            }
            return Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "the store's answer to the acquire came too late to be trusted ({}); the \
                     lock was given up, try again",
                    e.message()
                ),
            )
            .with_key(guard.key().to_owned()));
        }
        guard.state.handed_out.store(true, Ordering::Release);
        Ok(LockAttempt::Acquired(guard))
    }

    /// Acquires the lock, runs `job` with a [`Heartbeat`], and releases the lock when the job
    /// ends, whether it returns a value, an error, or panics (the panic then resumes).
    ///
    /// The job must call [`Heartbeat::beat`] (or [`Heartbeat::sleep`], or race against
    /// [`Heartbeat::lost`]) often, and stop when it fails: that is how a job whose lock was
    /// taken over stops (seppuku).
    ///
    /// If releasing fails with a retryable error, the release is retried in the background
    /// (until the lock would have expired anyway) and the job's value is still returned;
    /// the failures go to [`subscribe_errors`](Self::subscribe_errors).
    ///
    /// # Cancel safety
    /// Dropping the returned future drops the job and releases the lock in the background.
    pub async fn acquire_and_run<F, Fut, T>(
        &self,
        request: impl Into<LockRequest>,
        job: F,
    ) -> Result<RunOutcome<T>>
    where
        F: FnOnce(Heartbeat) -> Fut,
        Fut: Future<Output = T>,
    {
        match self.acquire(request).await? {
            LockAttempt::Held(holder) => Ok(RunOutcome::Held(holder)),
            LockAttempt::Acquired(guard) => Ok(RunOutcome::Ran(guard.run(job).await)),
        }
    }

    /// Acquires the lock, waiting while someone else holds it, as `wait` says: the one way
    /// this library waits for a lock ([`mutex`](Self::mutex) and `locker run --wait` use it).
    ///
    /// A waiter is woken by the store when the lock is released, on backends that can notify
    /// ([`Capabilities::release_events`](crate::Capabilities::release_events): Redis
    /// standalone, the in-memory store); tries again when the holder's liveness record would
    /// expire (where the backend can tell, see
    /// [`LockBackend::liveness_left`](crate::LockBackend::liveness_left)), so that a dead
    /// holder's lock is taken over within about a liveness TTL; and otherwise polls with a
    /// jittered exponential backoff (see [`Wait`]). A wake-up only leads to another acquire:
    /// a lost notification costs latency, never safety.
    ///
    /// Waiters of one key in one locker wait in line: only the first tries the store, the
    /// others wait for their turn, in order. So many waiters cost the store what one does, and
    /// they get the lock in the order they came (across processes, whoever tries first after a
    /// release wins).
    ///
    /// At least one try is made, even with a zero limit. The limit bounds the wait for the
    /// holder; the first try also waits for the liveness reporter's first write, as
    /// [`acquire`](Self::acquire) does.
    ///
    /// # Errors
    /// [`ErrorKind::MutexTimeout`], with [`Error::holder`] naming who held the lock at the last
    /// try, when the limit passed; [`ErrorKind::Draining`] or [`ErrorKind::Shutdown`] when the
    /// locker stops taking work meanwhile (the wait ends at once); and every error of
    /// [`acquire`](Self::acquire), at the first try that meets it (a store that fails while
    /// a waiter waits ends the wait).
    ///
    /// # Cancel safety
    /// Cancel-safe: dropping the future while it waits leaves nothing behind; dropping it while
    /// an acquire is in flight is handled as for [`acquire`](Self::acquire) (a lock stored with
    /// no guard is released in the background).
    ///
    /// # Examples
    /// ```
    /// # extern crate locker_core as locker;
    /// use std::time::Duration;
    /// use locker::{ErrorKind, Locker, MemoryBackend, Wait};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), locker::Error> {
    /// let store = MemoryBackend::new();
    /// let (a, b) = (Locker::builder(store.clone()).build()?, Locker::builder(store).build()?);
    ///
    /// let guard = a.acquire_wait("report", Wait::up_to(Duration::from_secs(5))).await?;
    /// let e = b.acquire_wait("report", Wait::up_to(Duration::from_millis(50))).await.unwrap_err();
    /// assert_eq!(e.kind(), ErrorKind::MutexTimeout);
    /// assert_eq!(e.holder().map(|h| h.owner_hash.as_str()), Some(guard.owner_hash()));
    ///
    /// // Woken by the release, not by a poll.
    /// let waiter = tokio::spawn(async move { b.acquire_wait("report", Wait::forever()).await });
    /// tokio::time::sleep(Duration::from_millis(20)).await;
    /// guard.release().await?;
    /// let guard = waiter.await.expect("waiter")?;
    /// # guard.release().await?;
    /// # a.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn acquire_wait(
        &self,
        request: impl Into<LockRequest>,
        wait: Wait,
    ) -> Result<LockGuard> {
        self.wait_for(Target::Lock(request.into()), wait).await
    }

    /// Waits for a lock or for any permit of a semaphore: one loop for both, so that every
    /// way to wait wakes, times out, stops on a drain and is counted in the metrics the same
    /// way.
    pub(crate) async fn wait_for(&self, target: Target, wait: Wait) -> Result<LockGuard> {
        let started = std::time::Instant::now();
        let result = self.wait_loop(target, wait).await;
        let outcome = match &result {
            Ok(_) => "acquired",
            Err(e) if e.kind() == ErrorKind::MutexTimeout => "timeout",
            Err(_) => "error",
        };
        crate::metrics::waited(outcome, started.elapsed());
        result
    }

    async fn wait_loop(&self, target: Target, wait: Wait) -> Result<LockGuard> {
        for key in target.keys() {
            validate_key(key)?;
        }
        let inner = &self.inner;
        let started = tokio::time::Instant::now();
        let deadline = wait.limit().and_then(|limit| started.checked_add(limit));
        let timed_out = |holders: Vec<LockData>| {
            let waited = wait.limit().unwrap_or_default();
            let message = match &target {
                Target::Lock(_) => format!(
                    "{} still holds the lock after waiting {waited:?}",
                    holders.first().map_or("someone", |h| h.owner_hash.as_str())
                ),
                Target::Permits(sem) => format!(
                    "all {} permits are still held after waiting {waited:?}",
                    sem.permits
                ),
            };
            let e = Error::new(ErrorKind::MutexTimeout, message).with_key(target.key().to_owned());
            match holders.into_iter().next() {
                Some(holder) => e.with_holder(holder),
                None => e,
            }
        };
        let line = Line::join(inner, target.line_key());
        let turn = match deadline {
            None => Some(line.turn().await),
            Some(deadline) => tokio::time::timeout_at(deadline, line.turn()).await.ok(),
        };
        let Some(_turn) = turn else {
            // The limit passed in line behind this locker's other waiters: one last try.
            return match self.try_target(&target).await? {
                Ok(guard) => Ok(guard),
                Err(holders) => Err(timed_out(holders)),
            };
        };
        let backend = inner.backend().await?;
        let mut local: Vec<ReleaseWatch> = target
            .keys()
            .map(|key| inner.local_releases.watch(key).0)
            .collect();
        let mut drain = inner.drain_signal();
        let events = backend.capabilities().release_events;
        let mut store: Vec<ReleaseWatch> = Vec::new();
        // Backends without release events may still wake waiters of their own process.
        let mut can_watch = true;
        let mut attempt = 0u32;
        loop {
            let holders = match self.try_target(&target).await? {
                Ok(guard) => return Ok(guard),
                Err(holders) => holders,
            };
            let now = tokio::time::Instant::now();
            if deadline.is_some_and(|d| d <= now) {
                return Err(timed_out(holders));
            }
            if store.is_empty() && can_watch {
                match subscribe_all(&*backend, &target, deadline).await {
                    Ok(Some(watches)) => store = watches,
                    Ok(None) => can_watch = false,
                    Err(e) => inner
                        .events
                        .emit(BackgroundSource::Wait, e.with_key(target.key().to_owned())),
                }
                // A release between the try and the subscription would go unseen: try again
                // at once after each new subscription (one per pause at most: a watch that
                // ends is made again only after the pause).
                if !store.is_empty() {
                    continue;
                }
            }
            let mut pause = wait.pause(
                attempt,
                inner.options.recheck_every,
                events && !store.is_empty(),
            );
            attempt = attempt.saturating_add(1);
            if !wait.has_custom_backoff() && pause >= LIVENESS_LOOKUP_ABOVE {
                // Try again when a holder would be found dead, if it stops reporting.
                let mut asked: Vec<&str> = Vec::new();
                for holder in &holders {
                    let process = holder.process_hash.as_str();
                    if *process == *inner.process_hash || asked.contains(&process) {
                        continue;
                    }
                    asked.push(process);
                    if let Ok(Some(left)) = bounded(deadline, backend.liveness_left(process)).await
                    {
                        pause = pause.min(left + LIVENESS_MARGIN);
                    }
                }
            }
            // A backoff may answer `Duration::MAX` ("only wake-ups"): a far instant, not an
            // overflow.
            let until = now
                .checked_add(pause)
                .unwrap_or_else(|| now + Duration::from_secs(30 * 365 * 24 * 3600));
            let until = deadline.map_or(until, |d| until.min(d));
            loop {
                let phase_changed = inner.held_changed.notified();
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => break,
                    alive = any_released(&mut store) => {
                        if alive {
                            break;
                        }
                        // A backend subscription ended: sleep on, and subscribe again after
                        // the pause.
                        store.clear();
                    }
                    _ = any_released(&mut local) => break,
                    _ = drain.changed() => break,
                    // `abandon` (and the end of a shutdown) wake waiters too.
                    () = phase_changed => break,
                }
            }
        }
    }

    /// One try of what a waiter waits for: the guard, or who holds the lock (every permit).
    async fn try_target(
        &self,
        target: &Target,
    ) -> Result<std::result::Result<LockGuard, Vec<LockData>>> {
        match target {
            Target::Lock(request) => Ok(match self.acquire(request.clone()).await? {
                LockAttempt::Acquired(guard) => Ok(guard),
                LockAttempt::Held(holder) => Err(vec![holder]),
            }),
            Target::Permits(sem) => sem.try_once(self).await,
        }
    }

    /// Runs `job` under the lock, waiting for it as `wait` says (see
    /// [`acquire_wait`](Self::acquire_wait)), and releases it when the job ends, as
    /// [`acquire_and_run`](Self::acquire_and_run) does.
    ///
    /// # Errors
    /// [`ErrorKind::MutexTimeout`], with [`Error::holder`] naming who holds the lock, when the
    /// limit passes; and every error of [`acquire_wait`](Self::acquire_wait).
    ///
    /// # Cancel safety
    /// Dropping the future while it waits leaves nothing behind; once the job runs, it drops
    /// the job and releases the lock in the background.
    ///
    /// # Examples
    /// ```
    /// # extern crate locker_core as locker;
    /// use std::time::Duration;
    /// use locker::{Locker, MemoryBackend, Wait};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), locker::Error> {
    /// let locker = Locker::builder(MemoryBackend::new()).build()?;
    /// let total = locker
    ///     .mutex("ledger", Wait::up_to(Duration::from_secs(30)), |heartbeat| async move {
    ///         heartbeat.beat().await?;
    ///         Ok::<_, locker::Error>(42)
    ///     })
    ///     .await??;
    /// assert_eq!(total, 42);
    /// # locker.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn mutex<F, Fut, T>(
        &self,
        request: impl Into<LockRequest>,
        wait: Wait,
        job: F,
    ) -> Result<T>
    where
        F: FnOnce(Heartbeat) -> Fut,
        Fut: Future<Output = T>,
    {
        let guard = self.acquire_wait(request, wait).await?;
        Ok(guard.run(job).await)
    }

    /// The record of the lock under `key` if a live process holds it; `None` when it may be
    /// free. Probabilistic, as any read of a lock: the answer may be stale when it arrives.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads, so a dropped call changes nothing.
    pub async fn inspect(&self, key: &str) -> Result<Option<LockData>> {
        validate_key(key)?;
        let backend = self.inner.backend().await?;
        let Some(lock) = backend.read(key).await? else {
            return Ok(None);
        };
        let alive = backend.read_process(&lock.process_hash).await?.is_some();
        Ok(alive.then_some(lock))
    }

    /// Whether the job with this owner hash is running somewhere; see [`OwnerStatus`].
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads, so a dropped call changes nothing.
    pub async fn owner_status(&self, owner_hash: &str) -> Result<OwnerStatus> {
        let Some(parsed) = parse_owner_hash(owner_hash) else {
            return Ok(OwnerStatus::Malformed);
        };
        let key = parsed.key.to_owned();
        if validate_key(&key).is_err() {
            return Ok(OwnerStatus::Malformed);
        }
        let backend = self.inner.backend().await?;
        let Some(lock) = backend.read(&key).await? else {
            return Ok(OwnerStatus::NoKey { key });
        };
        if backend.read_process(&lock.process_hash).await?.is_none() {
            return Ok(OwnerStatus::NoRunningProcess { key, lock });
        }
        if lock.owner_hash != owner_hash {
            return Ok(OwnerStatus::HeldByOther { key, lock });
        }
        Ok(OwnerStatus::Running { key, lock })
    }

    /// Marks the locker as draining: from now on every heartbeat (and every acquire) fails
    /// with [`ErrorKind::Draining`] and `reason`, so running jobs stop at their next beat.
    /// Their locks are released as their jobs end.
    pub fn drain(&self, reason: impl Into<String>) {
        let reason = reason.into();
        tracing::info!(%reason, "locker draining");
        if !self.inner.drain_counted.swap(true, Ordering::AcqRel) {
            let mut held = 0;
            self.inner.for_each_held(|state| {
                if !state.released.load(Ordering::Acquire) {
                    held += 1;
                }
            });
            crate::metrics::lost_for("drained", held);
        }
        if let Ok(mut r) = self.inner.drain_reason.write() {
            *r = Some(reason);
        }
        self.inner.draining.store(true, Ordering::Release);
        self.inner.drain_signal.send_replace(true);
    }

    /// Whether [`drain`](Self::drain) was called.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }

    /// Stops cleanly: drains, waits for every job that holds a lock to end (their locks are
    /// released as they end), then stops the reporter thread and deletes this process's
    /// liveness record, so others can take over at once. Afterwards every call fails with
    /// [`ErrorKind::Shutdown`]. Idempotent; concurrent calls all wait for the one shutdown;
    /// failures are sent to [`subscribe_errors`](Self::subscribe_errors).
    ///
    /// **No lock is released, and the liveness record is not deleted, while a job holding it
    /// still runs**: releasing under a running job would let another process start the same
    /// job while this one still works. Draining makes every beat fail, so a job that beats
    /// stops at its next beat, and [`Heartbeat::lost`] and [`Heartbeat::sleep`] wake at once.
    /// A job that never beats, or a [`LockGuard`] kept alive without a job, keeps `shutdown`
    /// waiting (it logs the keys it waits for every `recheck_every`); use
    /// [`shutdown_timeout`](Self::shutdown_timeout) to bound the wait. Draining stops
    /// extensions too, so such a lock still expires `lock_ttl` after its last extension (as it
    /// would for a job that never beats), and is no longer waited for from then on.
    ///
    /// The Node library's `terminate()` releases nothing and stops at once; `shutdown` is the
    /// clean path between that and a crash ([`abandon`](Self::abandon) is the crash).
    ///
    /// # Cancel safety
    /// Dropping the future stops the waiting, not the shutdown: the locker stays draining and
    /// refuses new work; the reporter is stopped when the last lock is released.
    pub async fn shutdown(&self) {
        let _ = self.shutdown_within(None).await;
    }

    /// [`shutdown`](Self::shutdown), waiting at most `limit` for running jobs to end.
    ///
    /// Returns the keys of the jobs still running when the time is up (empty when the
    /// shutdown completed). Their locks are not released under them: the reporter thread keeps
    /// this process's liveness record alive until their guards are released or dropped, then
    /// releases, deletes the liveness record and stops by itself.
    ///
    /// # Cancel safety
    /// As [`shutdown`](Self::shutdown): once polled, dropping the future stops the waiting, not
    /// the shutdown. The locker stays draining and refuses new work; the reporter is stopped
    /// when the last lock is released.
    ///
    /// # Examples
    /// ```
    /// # extern crate locker_core as locker;
    /// # use std::time::Duration;
    /// # use locker::{LockAttempt, Locker, MemoryBackend};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), locker::Error> {
    /// let locker = Locker::builder(MemoryBackend::new()).build()?;
    /// let LockAttempt::Acquired(guard) = locker.acquire("export").await? else { unreachable!() };
    /// // A job that ignores the drain still holds "export" when the time is up.
    /// let still_running = locker.shutdown_timeout(Duration::from_millis(50)).await;
    /// assert_eq!(still_running, ["export"]);
    /// drop(guard); // released now; the reporter then stops by itself
    /// # Ok(())
    /// # }
    /// ```
    pub async fn shutdown_timeout(&self, limit: Duration) -> Vec<String> {
        self.shutdown_within(Some(limit)).await
    }

    async fn shutdown_within(&self, limit: Option<Duration>) -> Vec<String> {
        let inner = &self.inner;
        match inner.set_phase_from_running(Phase::ShutDown) {
            Phase::Abandoned => return Vec::new(),
            Phase::Running => {
                if !inner.draining.load(Ordering::Acquire) {
                    self.drain("the locker is shutting down");
                }
            }
            Phase::ShutDown => {}
        }
        let clock = inner.clock;
        let deadline = limit.map(|l| clock.now().saturating_add(nanos(l)));
        let warn_every = inner.options.recheck_every;
        loop {
            let notified = inner.held_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if inner.phase() == Phase::Abandoned {
                return Vec::new();
            }
            let running = inner.running_keys();
            if running.is_empty() {
                break;
            }
            let now = clock.now();
            let mut wait = warn_every;
            if let Some(deadline) = deadline {
                if now >= deadline {
                    tracing::warn!(keys = ?running, "shutdown time is up; jobs still hold these locks, which stay held (and this process alive) until they end");
                    return running;
                }
                wait = wait.min(Duration::from_nanos(deadline - now));
            }
            if tokio::time::timeout(wait, notified).await.is_err() && deadline.is_none() {
                tracing::warn!(keys = ?running, "shutdown waits for jobs that still hold these locks");
            }
        }
        inner.stop_reporter().await;
        Vec::new()
    }

    /// Stops the reporter thread as if the process had crashed: no lock is released and the
    /// liveness record is left to expire, so other processes take the locks over after
    /// `liveness_ttl`. Also ends a [`shutdown`](Self::shutdown) that waits for jobs (it then
    /// returns), or the wait that [`shutdown_timeout`](Self::shutdown_timeout) left behind.
    /// For tests of takeover, and for a process that must stop touching the store at once.
    /// Afterwards every call fails with [`ErrorKind::Shutdown`].
    ///
    /// # Cancel safety
    /// Cancel safe: the first poll marks the locker abandoned, marks its locks lost and tells
    /// the reporter thread (if one started) to stop. Dropping the future after that only ends
    /// the wait for the thread, which exits by itself.
    pub async fn abandon(&self) {
        let inner = &self.inner;
        // Also out of a shutdown that waits (or gave up waiting) for running jobs.
        if inner.set_phase(Phase::Abandoned) == Phase::Abandoned {
            return;
        }
        if let Ok(mut held) = inner.held.lock() {
            // Their guards' later `unregister` finds nothing to remove.
            crate::metrics::held_changed(-(held.len() as f64));
            for state in held.drain().filter_map(|(_, w)| w.upgrade()) {
                state.released.store(true, Ordering::Release);
                state.mark_lost(Loss::Abandoned);
            }
        }
        inner.held_changed.notify_waiters();
        if let Some(reporter) = inner.reporter.get() {
            reporter.stop(false, true).await;
        }
    }
}

impl fmt::Debug for Locker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Locker")
            .field("process_hash", &self.inner.process_hash)
            .field("options", &self.inner.options)
            .field("phase", &self.inner.phase())
            .field("draining", &self.is_draining())
            .finish()
    }
}

/// A held lock, from [`Locker::acquire`]. Low-level: [`Locker::acquire_and_run`] manages the
/// guard for you.
///
/// Keep the lock by calling [`Heartbeat::beat`] on [`heartbeat`](Self::heartbeat) (or
/// [`extend`](Self::extend) yourself before the lock TTL passes), and end it with
/// [`release`](Self::release).
///
/// # Drop
/// Dropping a guard that was not released releases the lock in the background, on the
/// locker's reporter thread (which is why it works outside a runtime, too), retrying retryable
/// errors until the lock would have expired anyway. If the locker was shut down or abandoned,
/// nothing more is sent.
///
/// **Call [`Locker::shutdown`] before the process exits**: the background release runs on the
/// reporter thread, which dies with the process. A process that drops its guards and exits at
/// once leaves its locks behind, until its liveness record expires (`liveness_ttl`) and
/// another process takes them over; `shutdown` waits for the releases and deletes the
/// liveness record, so that others get the locks at once.
#[must_use = "dropping the guard releases the lock"]
pub struct LockGuard {
    state: Arc<LockState>,
}

impl LockGuard {
    /// A heartbeat for this lock, to hand to the job.
    pub fn heartbeat(&self) -> Heartbeat {
        Heartbeat {
            state: self.state.clone(),
        }
    }

    /// The lock key.
    pub fn key(&self) -> &str {
        &self.state.key
    }

    /// This acquisition's owner hash.
    pub fn owner_hash(&self) -> &str {
        &self.state.owner_hash
    }

    /// The stored record, as last written by this guard.
    pub fn lock_data(&self) -> LockData {
        self.state.lock_data()
    }

    /// The fencing token, when the backend assigns them.
    pub fn fencing_token(&self) -> Option<u64> {
        self.state.fencing_token
    }

    /// Extends the lock now (one write), whatever the heartbeat schedule says.
    ///
    /// # Errors
    /// [`ErrorKind::LockLost`], naming the new holder when there is one, if the lock is no
    /// longer ours; backend errors as they come (a retryable one is also reported in the
    /// background and leaves the lock held).
    ///
    /// # Cancel safety
    /// Cancel safe: an extension dropped during its write may or may not have landed; either
    /// way the lock stays ours and the heartbeat extends it again when due.
    pub async fn extend(&self) -> Result<()> {
        let now = self.state.locker.clock.now();
        self.heartbeat_check()?;
        self.state.extend_now(now).await
    }

    fn heartbeat_check(&self) -> Result<()> {
        if self.state.released.load(Ordering::Acquire) {
            return Err(self.state.lose(Loss::Released));
        }
        Ok(())
    }

    /// Releases the lock (deletes it only if it is still ours), retrying retryable errors until
    /// the lock would have expired anyway.
    ///
    /// # Cancel safety
    /// If the future is dropped, the release continues in the background as for a dropped guard.
    pub async fn release(self) -> Result<ReleaseOutcome> {
        let state = self.state.clone();
        let inner = &state.locker;
        if state.released.swap(true, Ordering::AcqRel) {
            return Ok(ReleaseOutcome::NoKey);
        }
        state.mark_lost(Loss::Released);
        // From here the guard's Drop does nothing; a cancelled release hands off through this.
        let mut handoff = ReleaseHandoff {
            state: &state,
            armed: true,
        };
        let backend = inner.backend().await?;
        let deadline = state.valid_until.load(Ordering::Acquire);
        let retry_every = inner.options.recheck_every;
        let result = release_with_retry(
            &*backend,
            &state.key,
            &state.owner_hash,
            deadline,
            inner.clock,
            retry_every,
            &inner.events,
        )
        .instrument(release_span(&state))
        .await;
        handoff.armed = false;
        if matches!(result, Ok(ReleaseOutcome::Released)) {
            inner.local_releases.notify(&state.key);
        }
        drop(self);
        result
    }

    /// Runs a job with this guard's heartbeat and releases afterwards; a panic is resumed once
    /// the release was attempted.
    pub(crate) async fn run<F, Fut, T>(self, job: F) -> T
    where
        F: FnOnce(Heartbeat) -> Fut,
        Fut: Future<Output = T>,
    {
        let span = tracing::debug_span!(
            "locker.run",
            key = %self.state.key,
            owner_hash = %self.state.owner_hash,
            fencing_token = tracing::field::Empty,
        );
        if let Some(token) = self.state.fencing_token {
            span.record("fencing_token", token);
        }
        let result = AssertUnwindSafe(job(self.heartbeat()))
            .catch_unwind()
            .instrument(span)
            .await;
        self.release_after_run().await;
        match result {
            Ok(value) => value,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// One release attempt; a retryable failure continues in the background, anything else is
    /// reported. The job's result matters more than the release's, which expires anyway.
    async fn release_after_run(self) {
        let state = self.state.clone();
        let inner = &state.locker;
        if state.released.swap(true, Ordering::AcqRel) {
            return;
        }
        state.mark_lost(Loss::Released);
        let mut handoff = ReleaseHandoff {
            state: &state,
            armed: true,
        };
        let result = match inner.backend().await {
            Ok(backend) => {
                backend
                    .release(&state.key, &state.owner_hash)
                    .instrument(release_span(&state))
                    .await
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(outcome) => {
                handoff.armed = false;
                inner.local_releases.notify(&state.key);
                log_release(&state.key, &state.owner_hash, &outcome);
            }
            Err(e) if e.is_retryable() => {
                inner
                    .events
                    .emit(BackgroundSource::Release, e.with_key(state.key.clone()));
                // `handoff` is armed: dropping it hands the retries to the reporter thread.
            }
            Err(e) => {
                handoff.armed = false;
                inner
                    .events
                    .emit(BackgroundSource::Release, e.with_key(state.key.clone()));
            }
        }
        drop(handoff);
        drop(self);
    }
}

/// The span of a release: key, owner hash, fencing token.
fn release_span(state: &LockState) -> tracing::Span {
    let span = tracing::debug_span!(
        "locker.release",
        key = %state.key,
        owner_hash = %state.owner_hash,
        fencing_token = tracing::field::Empty,
    );
    if let Some(token) = state.fencing_token {
        span.record("fencing_token", token);
    }
    span
}

/// Logs a release's outcome: DEBUG when the lock was released, INFO when it was no longer
/// ours to release (it expired, or someone else holds it now: the job's lock was lost).
pub(crate) fn log_release(key: &str, owner_hash: &str, outcome: &ReleaseOutcome) {
    crate::metrics::release(outcome);
    match outcome {
        ReleaseOutcome::Released => tracing::debug!(key, owner_hash, "released lock"),
        ReleaseOutcome::NoKey => tracing::info!(
            key,
            owner_hash,
            "nothing to release: the lock had expired or was released already"
        ),
        ReleaseOutcome::Held(holder) => tracing::info!(
            key,
            owner_hash,
            holder = %holder.owner_hash,
            "nothing released: someone else holds the lock now"
        ),
    }
}

/// Sends a release to the reporter thread when dropped while armed.
struct ReleaseHandoff<'a> {
    state: &'a Arc<LockState>,
    armed: bool,
}

impl Drop for ReleaseHandoff<'_> {
    fn drop(&mut self) {
        if self.armed {
            release_in_background(self.state);
        }
    }
}

fn release_in_background(state: &LockState) {
    release_key_in_background(
        &state.locker,
        &state.key,
        &state.owner_hash,
        state.valid_until.load(Ordering::Acquire),
        ReleaseKind::Held,
    );
}

/// A "holder" with our own owner hash is our own write, replayed by a client library after a
/// reconnect (the first attempt landed, its answer was lost): the lock is ours.
fn ours_if_replayed(outcome: AcquireOutcome, owner_hash: &str) -> AcquireOutcome {
    match outcome {
        AcquireOutcome::Held(stored) if stored.owner_hash == owner_hash => {
            AcquireOutcome::Acquired(stored)
        }
        other => other,
    }
}

/// Hands a release (only if `owner_hash` still owns `key`) to the reporter thread. Also while
/// a shutdown waits for jobs to end (their releases must go through); not after `abandon`,
/// which leaves every lock to expire as a crash would.
fn release_key_in_background(
    inner: &Inner,
    key: &str,
    owner_hash: &str,
    deadline: u64,
    kind: ReleaseKind,
) {
    if inner.phase() == Phase::Abandoned {
        return;
    }
    let sent = inner.reporter.get().is_some_and(|r| {
        r.release_in_background(key.to_owned(), owner_hash.to_owned(), deadline, kind)
    });
    if !sent {
        inner.events.emit(
            BackgroundSource::Release,
            Error::new(
                ErrorKind::Shutdown,
                "the reporter thread is gone; the lock will expire by itself",
            )
            .with_key(key),
        );
    }
}

/// Releases, in the background, a lock whose acquire was cancelled mid-flight.
struct PendingAcquire<'a> {
    inner: &'a Inner,
    key: &'a str,
    owner_hash: &'a str,
    deadline: u64,
    armed: bool,
}

impl<'a> PendingAcquire<'a> {
    fn new(inner: &'a Inner, key: &'a str, owner_hash: &'a str, sent_at: u64) -> Self {
        PendingAcquire {
            inner,
            key,
            owner_hash,
            deadline: sent_at.saturating_add(crate::clock::nanos(inner.options.lock_ttl)),
            armed: true,
        }
    }

    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for PendingAcquire<'_> {
    fn drop(&mut self) {
        if self.armed {
            // The write may still be on its way (a pipelined command, a statement the server
            // runs after the client gave up), and the release runs on another connection:
            // it could overtake the write it undoes. So the reporter keeps undoing until the
            // write has been found and deleted, or could no longer land.
            release_key_in_background(
                self.inner,
                self.key,
                self.owner_hash,
                self.deadline,
                ReleaseKind::InFlightAcquire,
            );
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let state = &self.state;
        if !state.released.swap(true, Ordering::AcqRel) {
            state.mark_lost(Loss::Released);
            tracing::debug!(key = %state.key, "lock guard dropped; releasing in the background");
            release_in_background(state);
        }
        // Every way a guard ends (release, release after a run, a cancelled release, a drop)
        // ends here, after its release is done or queued to the reporter: only then may a
        // shutdown that waits for it stop the reporter.
        state.locker.unregister(state.id);
    }
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("key", &self.state.key)
            .field("owner_hash", &self.state.owner_hash)
            .field("fencing_token", &self.state.fencing_token)
            .finish()
    }
}

/// `call`, or a timeout error once `deadline` (if any) has passed.
async fn bounded<T>(
    deadline: Option<tokio::time::Instant>,
    call: impl Future<Output = Result<T>>,
) -> Result<T> {
    match deadline {
        None => call.await,
        Some(deadline) => tokio::time::timeout_at(deadline, call)
            .await
            .unwrap_or_else(|_| {
                Err(Error::new(
                    ErrorKind::Timeout,
                    "the wait's limit passed during a call to the store",
                ))
            }),
    }
}

/// What a waiter waits for.
pub(crate) enum Target {
    /// One lock.
    Lock(LockRequest),
    /// Any permit of a semaphore.
    Permits(crate::semaphore::Permits),
}

impl Target {
    /// The key a waiter waits in line for, and names in its errors.
    fn key(&self) -> &str {
        match self {
            Target::Lock(request) => &request.key,
            Target::Permits(sem) => &sem.key,
        }
    }

    /// The key of this locker's line of waiters: a semaphore's is apart from a lock's on the
    /// same key, so that a semaphore's waiter never waits behind a lock's.
    fn line_key(&self) -> &str {
        match self {
            Target::Lock(request) => &request.key,
            Target::Permits(sem) => &sem.line_key,
        }
    }

    /// The keys whose release wakes the waiter.
    fn keys(&self) -> Box<dyn Iterator<Item = &str> + Send + '_> {
        match self {
            Target::Lock(request) => Box::new(std::iter::once(request.key.as_str())),
            Target::Permits(sem) => Box::new(sem.slot_keys.iter().map(String::as_str)),
        }
    }
}

/// Subscribes to the release of every key of `target`: `None` when the backend cannot notify.
async fn subscribe_all(
    backend: &dyn LockBackend,
    target: &Target,
    deadline: Option<tokio::time::Instant>,
) -> Result<Option<Vec<ReleaseWatch>>> {
    let mut watches = Vec::new();
    for key in target.keys() {
        // Never past the wait's limit (a store that does not answer a subscription).
        match bounded(deadline, backend.watch_release(key)).await? {
            Some(watch) => watches.push(watch),
            None => return Ok(None),
        }
    }
    Ok(Some(watches))
}

/// Waits until any of `watches` fires: `true` for a release, `false` when one ended. Never
/// ends when there are none.
async fn any_released(watches: &mut [ReleaseWatch]) -> bool {
    if watches.is_empty() {
        return std::future::pending().await;
    }
    let (alive, _, _) =
        futures::future::select_all(watches.iter_mut().map(|w| Box::pin(w.released()))).await;
    alive
}

/// Below this pause, a waiter does not ask for the holder's liveness record's TTL (the pause
/// ends sooner than any liveness TTL anyway).
const LIVENESS_LOOKUP_ABOVE: Duration = Duration::from_millis(100);

/// How long after a holder's liveness record would expire a waiter (or a leader watch) tries
/// again.
pub(crate) const LIVENESS_MARGIN: Duration = Duration::from_millis(5);

/// A place in this locker's line of waiters for a key; leaving it removes the line when it
/// was the last place.
struct Line<'a> {
    inner: &'a Inner,
    key: &'a str,
    turns: Arc<tokio::sync::Mutex<()>>,
}

impl<'a> Line<'a> {
    fn join(inner: &'a Inner, key: &'a str) -> Self {
        let turns = match inner.lines.lock() {
            Ok(mut lines) => lines.entry(key.to_owned()).or_default().clone(),
            Err(_) => Arc::default(),
        };
        Line { inner, key, turns }
    }

    /// Waits for this place's turn (first come, first served).
    async fn turn(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.turns.lock().await
    }
}

impl Drop for Line<'_> {
    fn drop(&mut self) {
        if let Ok(mut lines) = self.inner.lines.lock() {
            // Clones are made under this lock: two references (the map's and this one) mean
            // nobody else is in line.
            if Arc::strong_count(&self.turns) == 2 {
                lines.remove(self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_handles_are_send_and_sync() {
        fn is<T: Send + Sync + 'static>() {}
        is::<Locker>();
        is::<LockGuard>();
        is::<Heartbeat>();
        is::<Error>();
    }
}
