//! [`Locker`]: acquire, run, release, inspect, drain and shut down.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::sync::{broadcast, OnceCell};

use crate::backend::{AcquireOutcome, BackendFactory, LockBackend, ReleaseOutcome};
use crate::clock::Clock;
use crate::error::{Error, ErrorKind, Result};
use crate::events::{BackgroundError, BackgroundSource, Events};
use crate::hash::{new_owner_hash, new_process_hash, parse_owner_hash, validate_key};
use crate::heartbeat::{Heartbeat, LockState, Loss};
use crate::options::{LockerBuilder, LockerOptions};
use crate::record::LockData;
use crate::reporter::{release_with_retry, Liveness, Reporter};

/// What to lock: a key, and optionally a trace kept in the record and in the owner hash.
///
/// `&str` and `String` convert into it, so `locker.acquire("job")` works; add a trace with
/// [`LockRequest::trace`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockRequest {
    key: String,
    trace: Option<String>,
}

impl LockRequest {
    /// A request for `key`, without trace.
    pub fn new(key: impl Into<String>) -> Self {
        LockRequest {
            key: key.into(),
            trace: None,
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
    drain_reason: RwLock<Option<String>>,
    phase: RwLock<Phase>,
    held: Mutex<HashMap<u64, Weak<LockState>>>,
    next_id: AtomicU64,
    shutdown_done: OnceCell<()>,
}

impl Inner {
    pub(crate) async fn backend(&self) -> Result<Arc<dyn LockBackend>> {
        self.backend
            .get_or_try_init(|| self.factory.connect())
            .await
            .cloned()
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
            format!("the process is draining: {reason}"),
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

    fn set_phase(&self, phase: Phase) -> Phase {
        match self.phase.write() {
            Ok(mut p) => std::mem::replace(&mut *p, phase),
            Err(poisoned) => std::mem::replace(&mut *poisoned.into_inner(), phase),
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
        reporter
            .liveness
            .wait_fresh(self.options.reporter_start_timeout)
            .await
    }

    fn unregister(&self, id: u64) {
        if let Ok(mut held) = self.held.lock() {
            held.remove(&id);
        }
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

/// Runs jobs under cluster-wide locks; see the [crate docs](crate) for the design.
///
/// Cheap to clone: clones share one reporter thread, one process hash and one connection.
/// Build it with [`Locker::builder`].
///
/// # Examples
/// ```
/// use std::time::Duration;
/// use locker_core::{LockAttempt, Locker, MemoryBackend};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), locker_core::Error> {
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
    inner: Arc<Inner>,
}

impl Locker {
    /// Starts building a locker over the backends that `factory` connects to.
    pub fn builder(factory: impl BackendFactory) -> LockerBuilder {
        LockerBuilder::new(Arc::new(factory))
    }

    pub(crate) fn from_parts(factory: Arc<dyn BackendFactory>, options: LockerOptions) -> Self {
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
                drain_reason: RwLock::new(None),
                phase: RwLock::new(Phase::Running),
                held: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
                shutdown_done: OnceCell::new(),
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

    /// Subscribes to recoverable background errors: failed liveness writes, retried releases,
    /// retried rechecks and extensions. They are also logged with `tracing`.
    pub fn subscribe_errors(&self) -> broadcast::Receiver<BackgroundError> {
        self.inner.events.subscribe()
    }

    /// Tries once to acquire the lock. Low-level: prefer [`acquire_and_run`](Self::acquire_and_run).
    ///
    /// Starts the liveness reporter on first use and waits (up to `reporter_start_timeout`) for
    /// its first successful write. When a lock is held by a process that has no liveness record,
    /// it is taken over: the dead owner's lock is replaced only if it is still theirs. Costs one
    /// backend call when the key is free, two when it is held by a live process, three when
    /// taken over (four if the backend has no atomic `take_over`).
    ///
    /// A second acquire of a key this locker already holds returns [`LockAttempt::Held`].
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for an empty or oversized key or trace, [`ErrorKind::Draining`]
    /// or [`ErrorKind::Shutdown`] once the locker stops taking work, [`ErrorKind::Timeout`] when
    /// the reporter cannot write, and backend errors.
    ///
    /// # Cancel safety
    /// If the future is dropped while an acquire is in flight, the lock may have been stored
    /// with no guard to hold it: it is released in the background (only if it is ours), as for
    /// a dropped [`LockGuard`].
    pub async fn acquire(&self, request: impl Into<LockRequest>) -> Result<LockAttempt> {
        let request = request.into();
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
        let data = LockData::new(owner_hash, inner.process_hash.to_string(), request.trace);

        // No acquire is sent while this process's own liveness record may be missing.
        inner.ensure_alive().await?;
        let sent_at = inner.clock.now();
        // If this future is dropped while a write is in flight, the lock may be stored with no
        // guard to release it: release it (if ours) in the background.
        let pending = PendingAcquire::new(inner, &key, &data.owner_hash, sent_at);
        let outcome = backend.acquire(&key, &data, ttl).await?;
        let holder = match ours_if_replayed(outcome, &data.owner_hash) {
            AcquireOutcome::Acquired(stored) => {
                pending.disarm();
                tracing::info!(key = %key, owner_hash = %stored.owner_hash, fencing_token = ?stored.fencing_token, "acquired lock");
                return self.guard(key, stored, sent_at).await;
            }
            AcquireOutcome::Held(holder) => holder,
        };
        pending.disarm();
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
                tracing::warn!(key = %key, owner_hash = %stored.owner_hash, dead_owner = %holder.owner_hash, fencing_token = ?stored.fencing_token, "took over the lock of a dead process");
                self.guard(key, stored, sent_at).await
            }
            AcquireOutcome::Held(holder) => Ok(LockAttempt::Held(holder)),
        }
    }

    /// Registers a stored lock; if the locker stopped meanwhile, releases it at once instead.
    async fn guard(&self, key: String, stored: LockData, sent_at: u64) -> Result<LockAttempt> {
        let inner = &self.inner;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(LockState::new(inner.clone(), id, key, stored, sent_at));
        if let Ok(mut held) = inner.held.lock() {
            held.insert(id, Arc::downgrade(&state));
        }
        let guard = LockGuard { state };
        // `shutdown` sets the phase before it collects the held locks, so a lock registered
        // after that collection is seen here.
        if let Err(e) = inner.check_running() {
            if e.kind() == ErrorKind::Shutdown {
                let _ = guard.release().await;
                if let Some(reporter) = inner.reporter.get() {
                    reporter.stop(true, false).await;
                }
                return Err(e);
            }
        }
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

    /// Runs `job` under the lock, waiting for it: tries to acquire, and while someone else holds
    /// it, retries every `recheck_delay` until `timeout` has passed (at least one try is made).
    ///
    /// # Errors
    /// [`ErrorKind::MutexTimeout`], with [`Error::holder`] naming who holds the lock, when the
    /// timeout passes; and every error of [`acquire`](Self::acquire).
    pub async fn mutex<F, Fut, T>(
        &self,
        request: impl Into<LockRequest>,
        timeout: Duration,
        recheck_delay: Duration,
        job: F,
    ) -> Result<T>
    where
        F: FnOnce(Heartbeat) -> Fut,
        Fut: Future<Output = T>,
    {
        let request = request.into();
        let started = Instant::now();
        loop {
            match self.acquire(request.clone()).await? {
                LockAttempt::Acquired(guard) => return Ok(guard.run(job).await),
                LockAttempt::Held(holder) => {
                    if started.elapsed() >= timeout {
                        return Err(Error::new(
                            ErrorKind::MutexTimeout,
                            format!(
                                "{} still holds the lock after waiting {timeout:?}",
                                holder.owner_hash
                            ),
                        )
                        .with_key(request.key)
                        .with_holder(holder));
                    }
                    // Never overrun the timeout by a whole delay, nor spin on a zero delay.
                    let left = timeout.saturating_sub(started.elapsed());
                    tokio::time::sleep(recheck_delay.min(left).max(Duration::from_millis(1))).await;
                }
            }
        }
    }

    /// The record of the lock under `key` if a live process holds it; `None` when it may be
    /// free. Probabilistic, as any read of a lock: the answer may be stale when it arrives.
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
        if let Ok(mut r) = self.inner.drain_reason.write() {
            *r = Some(reason);
        }
        self.inner.draining.store(true, Ordering::Release);
    }

    /// Whether [`drain`](Self::drain) was called.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }

    /// Stops cleanly: drains, releases every lock this locker still holds, stops the reporter
    /// thread and deletes this process's liveness record, so others can take over at once.
    /// Afterwards every call fails with [`ErrorKind::Shutdown`]. Idempotent; failures are sent
    /// to [`subscribe_errors`](Self::subscribe_errors).
    ///
    /// Jobs still running get up to `recheck_every` to notice the drain at their next beat
    /// and end; the locks of those that do not are then released under them (their next beat
    /// fails). Each release and the final deletion are bounded by `liveness_ttl`, so an
    /// unreachable store cannot hang the shutdown. Concurrent calls all wait for the one
    /// shutdown to finish.
    pub async fn shutdown(&self) {
        let inner = self.inner.clone();
        self.inner
            .shutdown_done
            .get_or_init(|| async move {
                if inner.set_phase(Phase::ShutDown) != Phase::Running {
                    return;
                }
                if !inner.draining.load(Ordering::Acquire) {
                    Locker {
                        inner: inner.clone(),
                    }
                    .drain("the locker is shutting down");
                }
                let grace = Instant::now() + inner.options.recheck_every;
                while inner.held.lock().map(|h| !h.is_empty()).unwrap_or(false)
                    && Instant::now() < grace
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let held: Vec<Arc<LockState>> = match inner.held.lock() {
                    Ok(mut held) => held.drain().filter_map(|(_, w)| w.upgrade()).collect(),
                    Err(_) => Vec::new(),
                };
                let limit = inner.options.liveness_ttl;
                for state in held {
                    if state.released.swap(true, Ordering::AcqRel) {
                        continue;
                    }
                    state.lose(Loss::Released);
                    let release = async {
                        inner
                            .backend()
                            .await?
                            .release(&state.key, &state.owner_hash)
                            .await
                    };
                    match tokio::time::timeout(limit, release).await {
                        Ok(Ok(outcome)) => {
                            tracing::info!(key = %state.key, ?outcome, "released lock at shutdown")
                        }
                        Ok(Err(e)) => inner
                            .events
                            .emit(BackgroundSource::Release, e.with_key(state.key.clone())),
                        Err(_) => inner.events.emit(
                            BackgroundSource::Release,
                            Error::new(ErrorKind::Timeout, "release at shutdown timed out")
                                .with_key(state.key.clone()),
                        ),
                    }
                }
                if let Some(reporter) = inner.reporter.get() {
                    reporter.stop(true, false).await;
                }
                tracing::info!(process_hash = %inner.process_hash, "locker shut down");
            })
            .await;
    }

    /// Stops the reporter thread as if the process had crashed: no lock is released and the
    /// liveness record is left to expire, so other processes take the locks over after
    /// `liveness_ttl`. For tests of takeover, and for a process that must stop touching the
    /// store at once. Afterwards every call fails with [`ErrorKind::Shutdown`].
    pub async fn abandon(&self) {
        let inner = &self.inner;
        if inner.set_phase(Phase::Abandoned) != Phase::Running {
            return;
        }
        if let Ok(mut held) = inner.held.lock() {
            for state in held.drain().filter_map(|(_, w)| w.upgrade()) {
                state.released.store(true, Ordering::Release);
                state.lose(Loss::Abandoned);
            }
        }
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
        inner.unregister(state.id);
        state.lose(Loss::Released);
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
        .await;
        handoff.armed = false;
        drop(self);
        result
    }

    /// Runs a job with this guard's heartbeat and releases afterwards; a panic is resumed once
    /// the release was attempted.
    async fn run<F, Fut, T>(self, job: F) -> T
    where
        F: FnOnce(Heartbeat) -> Fut,
        Fut: Future<Output = T>,
    {
        let result = AssertUnwindSafe(job(self.heartbeat())).catch_unwind().await;
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
        inner.unregister(state.id);
        state.lose(Loss::Released);
        let mut handoff = ReleaseHandoff {
            state: &state,
            armed: true,
        };
        let result = match inner.backend().await {
            Ok(backend) => backend.release(&state.key, &state.owner_hash).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(outcome) => {
                handoff.armed = false;
                tracing::info!(key = %state.key, owner_hash = %state.owner_hash, ?outcome, "released lock");
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

/// Hands a release (only if `owner_hash` still owns `key`) to the reporter thread.
fn release_key_in_background(inner: &Inner, key: &str, owner_hash: &str, deadline: u64) {
    if inner.phase() != Phase::Running {
        return;
    }
    let sent = inner
        .reporter
        .get()
        .is_some_and(|r| r.release_in_background(key.to_owned(), owner_hash.to_owned(), deadline));
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
            release_key_in_background(self.inner, self.key, self.owner_hash, self.deadline);
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let state = &self.state;
        if state.released.swap(true, Ordering::AcqRel) {
            return;
        }
        state.locker.unregister(state.id);
        state.lose(Loss::Released);
        tracing::debug!(key = %state.key, "lock guard dropped; releasing in the background");
        release_in_background(state);
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
