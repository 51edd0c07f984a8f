//! [`Heartbeat`]: what a job calls to keep its lock and to learn, at once, that it lost it.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::watch;

use crate::backend::ExtendOutcome;
use crate::clock::nanos;
use crate::error::{Error, ErrorKind, Result};
use crate::events::BackgroundSource;
use crate::locker::Inner;
use crate::record::LockData;

/// Why a lock is lost; once set it never changes.
#[derive(Debug, Clone)]
pub(crate) enum Loss {
    /// Someone else's record is stored under the key.
    TakenOver(LockData),
    /// No record is stored under the key.
    NoKey,
    /// The lock TTL passed since the last successful extension.
    Expired,
    /// This process's liveness record may have expired while the lock was held.
    LivenessLapsed,
    /// The lock was released (by its guard, or by `shutdown`).
    Released,
    /// The locker was abandoned: the lock is left to expire as after a crash.
    Abandoned,
}

/// The state of one held lock, shared by its guard and every clone of its heartbeat.
pub(crate) struct LockState {
    pub(crate) locker: Arc<Inner>,
    pub(crate) id: u64,
    pub(crate) key: String,
    pub(crate) owner_hash: String,
    pub(crate) fencing_token: Option<u64>,
    pub(crate) data: Mutex<LockData>,
    /// When the acquire call was sent (clock nanos).
    pub(crate) acquired_at: u64,
    /// The lock lives at least until then (send time of the last successful write + TTL).
    pub(crate) valid_until: AtomicU64,
    pub(crate) next_recheck: AtomicU64,
    pub(crate) next_extend: AtomicU64,
    pub(crate) released: AtomicBool,
    /// The guard was handed to the caller: only then is a loss the application's to hear of
    /// (a late acquire reply, given up before it became a guard, is not).
    pub(crate) handed_out: AtomicBool,
    loss: OnceLock<Loss>,
    /// Turns `true` when the lock is lost, to wake [`Heartbeat::lost`] and [`Heartbeat::sleep`];
    /// made by the first of them (most locks never wait on it, and a sender with no receivers
    /// still costs its release a wake-up of every waiter list).
    lost_signal: Mutex<Option<watch::Sender<bool>>>,
}

impl LockState {
    pub(crate) fn new(
        locker: Arc<Inner>,
        id: u64,
        key: String,
        data: LockData,
        sent_at: u64,
    ) -> Self {
        let o = &locker.options;
        LockState {
            id,
            key,
            owner_hash: data.owner_hash.clone(),
            fencing_token: data.fencing_token,
            acquired_at: sent_at,
            valid_until: AtomicU64::new(sent_at.saturating_add(nanos(o.lock_ttl))),
            next_recheck: AtomicU64::new(sent_at.saturating_add(nanos(o.recheck_every))),
            next_extend: AtomicU64::new(sent_at.saturating_add(nanos(o.extend_every))),
            released: AtomicBool::new(false),
            handed_out: AtomicBool::new(false),
            data: Mutex::new(data),
            loss: OnceLock::new(),
            lost_signal: Mutex::new(None),
            locker,
        }
    }

    pub(crate) fn lock_data(&self) -> LockData {
        match self.data.lock() {
            Ok(d) => d.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Marks the lock lost (the first reason wins) and returns the error for it.
    pub(crate) fn lose(&self, loss: Loss) -> Error {
        self.mark_lost(loss);
        self.loss_error()
            .unwrap_or_else(|| Error::new(ErrorKind::LockLost, "lock lost"))
    }

    /// Marks the lock lost (the first reason wins), without making the error (a release needs
    /// none).
    pub(crate) fn mark_lost(&self, loss: Loss) {
        if self.loss.set(loss.clone()).is_ok() {
            // The loss is set before the signal is looked at, and a new signal reads the loss
            // under the same mutex: one of the two sees the other.
            if let Some(signal) = &*lock_ignoring_poison(&self.lost_signal) {
                signal.send_replace(true);
            }
            if !self.handed_out.load(Ordering::Acquire) {
                return;
            }
            crate::metrics::lost(&loss);
            match &loss {
                Loss::Released | Loss::Abandoned => return,
                Loss::TakenOver(holder) => tracing::warn!(
                    key = %self.key, owner_hash = %self.owner_hash, new_owner = %holder.owner_hash,
                    "lock taken over by someone else; the job must stop"
                ),
                other => tracing::warn!(
                    key = %self.key, owner_hash = %self.owner_hash, reason = ?other,
                    "lock lost; the job must stop"
                ),
            }
            if let Some(e) = self.loss_error() {
                self.locker
                    .events
                    .emit(BackgroundSource::LockLost, e.with_key(self.key.clone()));
            }
        }
    }

    /// The error of a lost lock, `None` while it is held.
    fn loss_error(&self) -> Option<Error> {
        let loss = self.loss.get()?;
        let me = &self.owner_hash;
        let e = match loss {
            Loss::TakenOver(holder) => Error::new(
                ErrorKind::LockLost,
                format!(
                    "{me}: someone else ({}) took over this lock, acquired at {}; stop the job",
                    holder.owner_hash,
                    holder.acquired_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                ),
            )
            .with_holder(holder.clone()),
            Loss::NoKey => Error::new(
                ErrorKind::LockLost,
                format!("{me}: the lock is gone from the store (expired or deleted); stop the job"),
            ),
            Loss::Expired => Error::new(
                ErrorKind::LockLost,
                format!("{me}: the lock was not extended within its TTL and may have expired; stop the job"),
            ),
            Loss::LivenessLapsed => Error::new(
                ErrorKind::LockLost,
                format!(
                    "{me}: this process's liveness record may have expired, so another process may \
                     have taken the lock over; stop the job"
                ),
            ),
            Loss::Released => Error::new(ErrorKind::LockLost, format!("{me}: the lock was released")),
            Loss::Abandoned => Error::new(
                ErrorKind::LockLost,
                format!("{me}: the locker was abandoned; the lock is left to expire"),
            ),
        };
        Some(e.with_key(self.key.clone()))
    }

    /// Whether the lock may still be held at `now`, as far as the local checks tell (the
    /// drain aside): not lost, not expired, no liveness lapse since the acquire.
    pub(crate) fn still_held(&self, now: u64) -> bool {
        self.loss.get().is_none() && self.deadline_passed(now).is_none()
    }

    /// Which local deadline has passed at `now`, if any: the lock TTL since the last successful
    /// write, or this process's liveness since the acquire.
    fn deadline_passed(&self, now: u64) -> Option<Loss> {
        if now >= self.valid_until.load(Ordering::Acquire) {
            return Some(Loss::Expired);
        }
        self.locker
            .liveness()
            .is_some_and(|l| l.lapsed_since(self.acquired_at, now))
            .then_some(Loss::LivenessLapsed)
    }

    /// The checks that need no I/O: draining, an earlier loss, expiry of the lock or of the
    /// liveness record, as of `now`.
    ///
    /// This is the one place where the lock's validity is decided. Every result that came from
    /// I/O passes through it again at the moment it is returned (see [`bounded`](Self::bounded)
    /// and [`Locker::acquire`](crate::Locker::acquire)): a reply that says "ours" is only as
    /// fresh as the moment it is handed back, and the process may have been frozen, or its
    /// runtime starved, for longer than the liveness TTL between the store's answer and now.
    pub(crate) fn check_local(&self, now: u64) -> Result<()> {
        self.locker.check_draining()?;
        if let Some(e) = self.loss_error() {
            return Err(e);
        }
        match self.deadline_passed(now) {
            Some(loss) => Err(self.lose(loss)),
            None => Ok(()),
        }
    }

    async fn beat(&self) -> Result<()> {
        let now = self.locker.clock.now();
        self.check_local(now)?;
        let o = &self.locker.options;
        let due_extend = self.next_extend.load(Ordering::Acquire);
        if now >= due_extend {
            let next = now.saturating_add(nanos(o.extend_every));
            // Claiming the slot before the I/O is what coalesces concurrent beats into one call.
            if self
                .next_extend
                .compare_exchange(due_extend, next, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                // An extension is also a recheck: keep concurrent beats from rechecking now.
                self.next_recheck
                    .fetch_max(now.saturating_add(nanos(o.recheck_every)), Ordering::AcqRel);
                let mut rearm = Rearm::new(&self.next_extend, now);
                let res = self.extend_now(now).await;
                rearm.disarm();
                return res;
            }
            return Ok(());
        }
        let due_recheck = self.next_recheck.load(Ordering::Acquire);
        if now >= due_recheck {
            let next = now.saturating_add(nanos(o.recheck_every));
            if self
                .next_recheck
                .compare_exchange(due_recheck, next, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                let mut rearm = Rearm::new(&self.next_recheck, now);
                let res = self.recheck().await;
                rearm.disarm();
                return res;
            }
        }
        Ok(())
    }

    /// Extends the lock now. Used by the heartbeat when due, and by [`LockGuard::extend`].
    ///
    /// [`LockGuard::extend`]: crate::LockGuard::extend
    pub(crate) async fn extend_now(&self, sent_at: u64) -> Result<()> {
        let o = &self.locker.options;
        let data = self.lock_data().extended_now();
        let outcome = self
            .bounded(async {
                let backend = self.locker.backend().await?;
                backend
                    .extend(&self.key, &data, o.lock_ttl, &self.owner_hash)
                    .await
            })
            .await;
        match outcome {
            Ok(ExtendOutcome::Extended(stored)) => {
                if let Ok(mut d) = self.data.lock() {
                    *d = stored;
                }
                self.valid_until
                    .fetch_max(sent_at.saturating_add(nanos(o.lock_ttl)), Ordering::AcqRel);
                self.next_recheck.fetch_max(
                    sent_at.saturating_add(nanos(o.recheck_every)),
                    Ordering::AcqRel,
                );
                tracing::debug!(key = %self.key, owner_hash = %self.owner_hash, "extended lock");
                // A loss found meanwhile by another beat still wins.
                self.check_local(self.locker.clock.now())
            }
            Ok(ExtendOutcome::NoKey) => Err(self.lose(Loss::NoKey)),
            Ok(ExtendOutcome::Held(holder)) => Err(self.lose(Loss::TakenOver(holder))),
            Err(e) => self.io_failed(e, &self.next_extend),
        }
    }

    /// Reads the lock, and in the same call every other lock of this locker whose recheck is
    /// due within half an interval (claiming their rechecks): after one interval, all the
    /// locks of a process are rechecked together, one call per interval instead of one per
    /// lock. Others' results only ever find losses (a read that says "still ours" extends
    /// nothing), which their own next beat reports.
    async fn recheck(&self) -> Result<()> {
        let now = self.locker.clock.now();
        let others = self.claim_other_rechecks(now);
        let mut unclaim = Unclaim {
            states: &others,
            now,
            armed: true,
        };
        let keys: Vec<&str> = std::iter::once(self.key.as_str())
            .chain(others.iter().map(|s| s.key.as_str()))
            .collect();
        let read = self
            .bounded(async {
                let backend = self.locker.backend().await?;
                if keys.len() == 1 {
                    return Ok(vec![backend.read(&self.key).await]);
                }
                let found = backend.read_many(&keys).await?;
                if found.len() != keys.len() {
                    return Err(Error::new(
                        ErrorKind::Other,
                        format!(
                            "the backend's read_many answered {} records for {} keys",
                            found.len(),
                            keys.len()
                        ),
                    ));
                }
                Ok(found)
            })
            .await;
        // Whatever happened, the others keep their claimed rechecks (a failed call is retried
        // at the next interval, as for this lock), unless this future is dropped first.
        unclaim.armed = false;
        let found = match read {
            Ok(found) => found,
            Err(e) => return self.io_failed(e, &self.next_recheck),
        };
        let mut found = found.into_iter();
        let mine = found.next();
        for (state, result) in others.iter().zip(found) {
            match result {
                Ok(current) => {
                    if let Some(loss) = state.loss_in(current) {
                        state.mark_lost(loss);
                    }
                }
                // Its own record's error (corrupt): its own beat reads it again, and fails.
                Err(_) => state.next_recheck.store(now, Ordering::Release),
            }
        }
        match mine {
            Some(Ok(current)) => match self.loss_in(current) {
                Some(loss) => Err(self.lose(loss)),
                None => Ok(()),
            },
            Some(Err(e)) => self.io_failed(e, &self.next_recheck),
            None => Ok(()),
        }
    }

    /// What a read of the lock says about it: lost if gone or someone else's.
    fn loss_in(&self, current: Option<LockData>) -> Option<Loss> {
        match current {
            None => Some(Loss::NoKey),
            Some(current) if current.owner_hash != self.owner_hash => {
                Some(Loss::TakenOver(current))
            }
            Some(_) => None,
        }
    }

    /// Claims the rechecks of the locker's other locks that are due by half an interval from
    /// `now`, moving them to `now` + an interval.
    fn claim_other_rechecks(&self, now: u64) -> Vec<Arc<LockState>> {
        let every = nanos(self.locker.options.recheck_every);
        let (horizon, next) = (now.saturating_add(every / 2), now.saturating_add(every));
        let mut claimed = Vec::new();
        self.locker.for_each_held(|state| {
            if state.id == self.id
                || state.released.load(Ordering::Acquire)
                || state.loss.get().is_some()
            {
                return;
            }
            let due = state.next_recheck.load(Ordering::Acquire);
            if due <= horizon
                && state
                    .next_recheck
                    .compare_exchange(due, next, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                claimed.push(state);
            }
        });
        claimed
    }

    /// Runs a backend call, but no longer than the lock is certainly ours: past that, the
    /// local checks decide (a hung store must not keep [`Heartbeat::lost`] from firing).
    ///
    /// Whatever the call returns, the local checks run again once it has returned, against
    /// the clock read *then*: a reply that was ready before a freeze, or that won the race
    /// against the timer after the runtime was starved, must not make a beat say "yours".
    /// Every beat's I/O goes through here.
    async fn bounded<T>(&self, io: impl Future<Output = Result<T>>) -> Result<T> {
        let clock = self.locker.clock;
        let mut deadline = self.valid_until.load(Ordering::Acquire);
        if let Some(reporter) = self.locker.liveness() {
            deadline = deadline.min(reporter.fresh_until());
        }
        let left = Duration::from_nanos(deadline.saturating_sub(clock.now()).max(1_000_000));
        let result = match tokio::time::timeout(left, io).await {
            Ok(result) => result,
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!("the store did not answer within {left:?}"),
            )),
        };
        self.check_local(clock.now())?;
        result
    }

    /// A retryable failure is reported in the background and retried at the next recheck
    /// interval: the lock is still ours until its TTL or our liveness says otherwise, which the
    /// local checks catch. Anything else goes to the job.
    fn io_failed(&self, e: Error, retry_slot: &AtomicU64) -> Result<()> {
        let e = e.with_key(self.key.clone());
        if e.is_retryable() {
            let now = self.locker.clock.now();
            let retry = now.saturating_add(nanos(self.locker.options.recheck_every));
            retry_slot.fetch_min(retry, Ordering::AcqRel);
            self.locker.events.emit(BackgroundSource::Heartbeat, e);
            Ok(())
        } else {
            Err(e)
        }
    }

    /// The nearest moment at which a beat has something to do.
    fn next_due(&self) -> u64 {
        let mut due = self
            .next_recheck
            .load(Ordering::Acquire)
            .min(self.next_extend.load(Ordering::Acquire))
            .min(self.valid_until.load(Ordering::Acquire));
        if let Some(reporter) = self.locker.liveness() {
            due = due.min(reporter.fresh_until());
        }
        due
    }
}

/// What cuts a heartbeat's sleep short: the lock's loss and the locker's drain.
struct WakeSignals {
    lost: watch::Receiver<bool>,
    drain: watch::Receiver<bool>,
}

impl WakeSignals {
    /// Sleeps for `d`, or less if the lock is lost or the locker drains meanwhile.
    async fn sleep(&mut self, d: Duration) {
        let lost = &mut self.lost;
        let drain = &mut self.drain;
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            // An error means the sender is gone, which the `Arc`s held here rule out.
            _ = lost.wait_for(|lost| *lost) => {}
            _ = drain.wait_for(|drain| *drain) => {}
        }
    }
}

impl LockState {
    fn wake_signals(&self) -> WakeSignals {
        WakeSignals {
            lost: lock_ignoring_poison(&self.lost_signal)
                .get_or_insert_with(|| watch::channel(self.loss.get().is_some()).0)
                .subscribe(),
            drain: self.locker.drain_signal(),
        }
    }
}

fn lock_ignoring_poison<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Puts the rechecks claimed for a batched read back to "due now" if the read is dropped before
/// it answers.
struct Unclaim<'a> {
    states: &'a [Arc<LockState>],
    now: u64,
    armed: bool,
}

impl Drop for Unclaim<'_> {
    fn drop(&mut self) {
        if self.armed {
            for s in self.states {
                s.next_recheck.fetch_min(self.now, Ordering::AcqRel);
            }
        }
    }
}

/// Puts a claimed deadline back to "due now" if the beat that claimed it is cancelled before
/// its I/O completes, so that a dropped future never silences the heartbeat.
struct Rearm<'a> {
    slot: &'a AtomicU64,
    now: u64,
    armed: bool,
}

impl<'a> Rearm<'a> {
    fn new(slot: &'a AtomicU64, now: u64) -> Self {
        Rearm {
            slot,
            now,
            armed: true,
        }
    }

    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for Rearm<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.slot.fetch_min(self.now, Ordering::AcqRel);
        }
    }
}

/// Handed to a job that holds a lock: call [`beat`](Heartbeat::beat) often, and stop the job
/// when it fails.
///
/// Cheap to clone; all clones share the lock's state. A beat does no I/O and no allocation
/// unless something is due:
/// - every `recheck_every` it reads the lock and fails if someone else holds it now
///   (seppuku), naming the new holder;
/// - every `extend_every` it extends the lock;
/// - it fails at once, with no I/O, when the locker is draining, when the lock may have expired
///   (no successful extension within `lock_ttl`), or when this process's liveness record may
///   have expired (the last successful report is older than `liveness_ttl`), since from that
///   moment another process may take the lock.
///
/// Once a beat has failed with [`ErrorKind::LockLost`], every later beat fails the same way.
///
/// # Examples
/// ```
/// # extern crate locker_core as locker;
/// # use locker::{Locker, MemoryBackend, RunOutcome};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), locker::Error> {
/// let locker = Locker::builder(MemoryBackend::new()).build()?;
/// let outcome = locker
///     .acquire_and_run("nightly-report", |heartbeat| async move {
///         for _chunk in 0..3 {
///             heartbeat.beat().await?; // stops the job if the lock was taken over
///             // ... work on one chunk ...
///         }
///         Ok::<_, locker::Error>(3)
///     })
///     .await?;
/// assert!(matches!(outcome, RunOutcome::Ran(Ok(3))));
/// # locker.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Heartbeat {
    pub(crate) state: Arc<LockState>,
}

impl Heartbeat {
    /// Keeps the lock: checks it, and rechecks or extends it when due.
    ///
    /// # Errors
    /// [`ErrorKind::LockLost`] (the job must stop), [`ErrorKind::Draining`], or a non-retryable
    /// backend error from a recheck or extension. Retryable backend errors do not fail the
    /// beat: they are retried at the next recheck and sent to
    /// [`Locker::subscribe_errors`](crate::Locker::subscribe_errors).
    ///
    /// # Cancel safety
    /// Cancel safe: a beat dropped during its I/O leaves the check due for the next beat.
    pub async fn beat(&self) -> Result<()> {
        self.state.beat().await
    }

    /// Sleeps for `d` while beating (at least every `recheck_every`), and fails as soon as a
    /// beat fails.
    ///
    /// A loss found by another clone of this heartbeat, or a [`drain`](crate::Locker::drain),
    /// wakes it at once.
    ///
    /// # Cancel safety
    /// Cancel safe, as [`beat`](Self::beat).
    pub async fn sleep(&self, d: Duration) -> Result<()> {
        let clock = self.state.locker.clock;
        let end = clock.now().saturating_add(nanos(d));
        let mut wake = self.state.wake_signals();
        loop {
            self.beat().await?;
            let now = clock.now();
            if now >= end {
                return Ok(());
            }
            let next = end.min(self.state.next_due()).max(now + 1_000_000);
            wake.sleep(Duration::from_nanos(next.min(end) - now)).await;
        }
    }

    /// Completes when the lock is lost (or the locker drains), with the reason; until then it
    /// beats by itself whenever a recheck or extension is due. A loss found by another clone
    /// of this heartbeat, or a [`drain`](crate::Locker::drain) or
    /// [`shutdown`](crate::Locker::shutdown), completes it at once.
    ///
    /// For jobs that cannot call [`beat`](Self::beat) between steps: run the work in
    /// `tokio::select!` against this future.
    ///
    /// ```
    /// # extern crate locker_core as locker;
    /// # use locker::{Locker, MemoryBackend, RunOutcome};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), locker::Error> {
    /// # let locker = Locker::builder(MemoryBackend::new()).build()?;
    /// locker
    ///     .acquire_and_run("sync-accounts", |heartbeat| async move {
    ///         tokio::select! {
    ///             lost = heartbeat.lost() => Err(lost),
    ///             done = async { /* a long call that cannot beat */ Ok(()) } => done,
    ///         }
    ///     })
    ///     .await?;
    /// # locker.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Cancel safety
    /// Cancel safe: the future only watches (its beats are the heartbeat's own, which any later
    /// beat resumes); drop it, or call `lost` again, at any time.
    pub fn lost(&self) -> impl Future<Output = Error> + Send + 'static {
        let hb = self.clone();
        async move {
            let mut wake = hb.state.wake_signals();
            loop {
                if let Err(e) = hb.beat().await {
                    return e;
                }
                let clock = hb.state.locker.clock;
                let now = clock.now();
                let next = hb.state.next_due().max(now + 1_000_000);
                wake.sleep(Duration::from_nanos(next - now)).await;
            }
        }
    }

    /// The lock key.
    pub fn key(&self) -> &str {
        &self.state.key
    }

    /// This job's owner hash, `{key}@{processHash}.{seq}[#trace]`.
    pub fn owner_hash(&self) -> &str {
        &self.state.owner_hash
    }

    /// The fencing token of this acquisition, when the backend assigns them: pass it to the
    /// resource the job writes to, so that it can refuse writes from a stale holder.
    pub fn fencing_token(&self) -> Option<u64> {
        self.state.fencing_token
    }

    /// The lock record as last written by this job.
    pub fn lock_data(&self) -> LockData {
        self.state.lock_data()
    }
}

impl fmt::Debug for Heartbeat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Heartbeat")
            .field("key", &self.state.key)
            .field("owner_hash", &self.state.owner_hash)
            .field("lost", &self.state.loss.get().is_some())
            .finish()
    }
}
