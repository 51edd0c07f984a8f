//! The liveness reporter: one OS thread per locker, with its own single-threaded runtime and its
//! own backend connection, writing this process's liveness record every `report_every`.
//!
//! Because nothing else runs on that thread, a job that blocks or starves the caller's runtime
//! cannot delay the reports, which is what lets the lock TTL be long while a dead process is
//! still detected within one liveness TTL.
//!
//! The thread also performs the releases of dropped [`LockGuard`](crate::LockGuard)s, since a
//! `Drop` cannot await and may run outside any runtime.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::{sleep, timeout, MissedTickBehavior};

use crate::backend::{BackendFactory, LockBackend, ReleaseOutcome};
use crate::clock::{nanos, Clock};
use crate::error::{Error, ErrorKind, Result};
use crate::events::{BackgroundSource, Events};
use crate::healing::Healing;
use crate::options::LockerOptions;
use crate::record::ProcessData;

/// One atomic word: what [`Published`] is built on, so that the same code runs on std atomics
/// and, in the `loom` model below, on loom's.
pub(crate) trait Word {
    fn load(&self, order: Ordering) -> u64;
    fn store(&self, value: u64, order: Ordering);
    fn fetch_max(&self, value: u64, order: Ordering) -> u64;
}

impl Word for AtomicU64 {
    fn load(&self, order: Ordering) -> u64 {
        AtomicU64::load(self, order)
    }
    fn store(&self, value: u64, order: Ordering) {
        AtomicU64::store(self, value, order)
    }
    fn fetch_max(&self, value: u64, order: Ordering) -> u64 {
        AtomicU64::fetch_max(self, value, order)
    }
}

/// The pair of moments the reporter publishes to every beat, written by the reporter thread
/// alone and read by any thread.
///
/// Readers must never see a fresh `last_ok_start` with a stale `lapse_end`: that would let a
/// beat pass right after a lapse. So the writer raises `lapse_end` *before* it publishes the
/// new `last_ok_start` (a release store), and readers load `last_ok_start` (acquire) *before*
/// `lapse_end`: a reader that sees the new `last_ok_start` also sees the lapse that came with
/// it; one that sees the old one judges freshness by the old one, which is stale exactly when
/// the lapse matters. The `loom` model in this file checks every interleaving.
#[derive(Debug, Default)]
pub(crate) struct Published<W> {
    /// When the last successful write was sent (clock nanos; 0 = never). The record lives at
    /// least `ttl` from then, because the store starts its TTL when it receives the write.
    last_ok_start: W,
    /// The latest moment up to which the record may have been missing although the process
    /// lived (no write sent within a TTL of the previous one reached the store in time);
    /// 0 = never. A lock held at any moment before it may have been taken over.
    lapse_end: W,
}

impl<W: Word> Published<W> {
    /// Whether the liveness record is certainly still stored at `now`.
    pub(crate) fn is_fresh(&self, now: u64, ttl: u64) -> bool {
        let last = self.last_ok_start.load(Ordering::Acquire);
        last != 0 && now.saturating_sub(last) < ttl
    }

    /// Whether any write has succeeded yet.
    pub(crate) fn has_reported(&self) -> bool {
        self.last_ok_start.load(Ordering::Acquire) != 0
    }

    /// Whether the record may have been missing at some moment after `since` (up to `now`).
    pub(crate) fn lapsed_since(&self, since: u64, now: u64, ttl: u64) -> bool {
        // `last_ok_start` first (inside `is_fresh`), then `lapse_end`: see the type's docs.
        !self.is_fresh(now, ttl) || self.lapse_end.load(Ordering::Acquire) > since
    }

    /// When the record may expire if no further report succeeds.
    pub(crate) fn fresh_until(&self, ttl: u64) -> u64 {
        self.last_ok_start
            .load(Ordering::Acquire)
            .saturating_add(ttl)
    }

    /// A write sent at `started` was acknowledged at `finished`. Called by one thread only.
    /// Returns whether the record may have been missing before this write (a lapse).
    pub(crate) fn record_success(&self, started: u64, finished: u64, ttl: u64) -> bool {
        let prev = self.last_ok_start.load(Ordering::Acquire);
        // The previous record expired at `prev + ttl` at the earliest, and this write reached the
        // store at `finished` at the latest: if the first is not after the second, the record
        // may have been missing in between, and anyone could have taken our locks then.
        let lapsed = prev != 0 && finished >= prev.saturating_add(ttl);
        if lapsed {
            // Published before the fresh `last_ok_start` below (see the type's docs).
            self.lapse_end.fetch_max(finished, Ordering::AcqRel);
        }
        if started > prev {
            self.last_ok_start.store(started, Ordering::Release);
        }
        lapsed
    }
}

/// What the heartbeats and the acquire path know about this process's liveness record.
#[derive(Debug)]
pub(crate) struct Liveness {
    clock: Clock,
    ttl: u64,
    published: Published<AtomicU64>,
    /// Bumped on every result of a start attempt or a report, to wake [`Liveness::wait_fresh`].
    reports: watch::Sender<u64>,
    last_error: Mutex<Option<String>>,
    /// Until the first write succeeds: the error of the latest attempt to connect or write,
    /// when it was definite ([`Error::is_definite`]), which ends every start wait at once.
    start_failure: Mutex<Option<Error>>,
}

impl Liveness {
    fn new(clock: Clock, ttl: Duration) -> Self {
        Liveness {
            clock,
            ttl: nanos(ttl),
            published: Published::default(),
            reports: watch::channel(0).0,
            last_error: Mutex::new(None),
            start_failure: Mutex::new(None),
        }
    }

    /// Whether the liveness record is certainly still stored at `now`.
    pub(crate) fn is_fresh(&self, now: u64) -> bool {
        self.published.is_fresh(now, self.ttl)
    }

    /// Whether the record may have been missing at some moment after `since` (up to `now`).
    pub(crate) fn lapsed_since(&self, since: u64, now: u64) -> bool {
        self.published.lapsed_since(since, now, self.ttl)
    }

    /// When the record may expire if no further report succeeds.
    pub(crate) fn fresh_until(&self) -> u64 {
        self.published.fresh_until(self.ttl)
    }

    /// A write sent at `started` was acknowledged at `finished`.
    fn record_success(&self, started: u64, finished: u64) {
        let lapsed = self.published.record_success(started, finished, self.ttl);
        crate::metrics::liveness_written(
            Duration::from_nanos(finished.saturating_sub(started)),
            lapsed,
        );
        if let Ok(mut failure) = self.start_failure.lock() {
            *failure = None;
        }
        self.reports.send_modify(|n| *n += 1);
    }

    /// Records a failed connect or write (or any other reporter failure) for the messages of
    /// [`wait_fresh`](Self::wait_fresh); before the first success, a definite one ends the
    /// start waits, and any other one (no answer) lets them wait again.
    fn record_error(&self, e: &Error) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(e.to_string());
        }
        if !self.published.has_reported() {
            if let Ok(mut failure) = self.start_failure.lock() {
                *failure = e.is_definite().then(|| e.clone());
            }
            self.reports.send_modify(|n| *n += 1);
        }
    }

    fn start_failure(&self) -> Option<Error> {
        self.start_failure.lock().ok().and_then(|f| f.clone())
    }

    /// Waits until the record is fresh, at most `limit`.
    ///
    /// Before the first successful write, a definite failure of the reporter's latest attempt
    /// (see [`Error::is_definite`]) is returned at once: a refused connection or a file that
    /// cannot be opened is known in milliseconds, and waiting `limit` would only hide it.
    pub(crate) async fn wait_fresh(&self, limit: Duration) -> Result<()> {
        // The common case, without a subscription or a timer.
        if self.is_fresh(self.clock.now()) {
            return Ok(());
        }
        let mut reports = self.reports.subscribe();
        let waited = timeout(limit, async {
            loop {
                if self.is_fresh(self.clock.now()) {
                    return Ok(());
                }
                if let Some(e) = self.start_failure() {
                    return Err(e);
                }
                if reports.changed().await.is_err() {
                    // The sender lives in `self`; this cannot happen, but never spin.
                    std::future::pending::<()>().await;
                }
            }
        })
        .await;
        match waited {
            Ok(result) => result,
            Err(_) => {
                let last = self
                    .last_error
                    .lock()
                    .ok()
                    .and_then(|e| e.clone())
                    .unwrap_or_else(|| "none: the store has not answered yet".to_owned());
                Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "the liveness reporter did not write this process's record within \
                         {limit:?} (last reporter error: {last})"
                    ),
                ))
            }
        }
    }
}

/// What a background release undoes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReleaseKind {
    /// A lock that was held (its write is known to have landed): one release, retried on
    /// retryable errors.
    Held,
    /// An acquire or take-over whose future was dropped while the call was in flight: its write
    /// may land later than the release (another connection, a statement still running on the
    /// server), or twice (a client library that replays a command after a reconnect), so
    /// releases are repeated, backing off from 10 ms to 1/16 of the lock TTL (about 20 calls
    /// over a default 5 min TTL), until the deadline: the lock TTL from the send time. Given up
    /// when the reporter stops: the liveness record is deleted then (or expires, after
    /// `abandon`), so a record that lands later can be taken over at once.
    InFlightAcquire,
}

enum Command {
    /// Release a lock whose guard was dropped (or whose acquire was cancelled), retrying
    /// retryable errors until `deadline`.
    Release {
        key: String,
        owner_hash: String,
        deadline: u64,
        kind: ReleaseKind,
    },
    /// Stop the thread; `forget` deletes the liveness record on the way out, `abandon` drops
    /// pending releases as a crash would.
    Stop {
        forget: bool,
        abandon: bool,
        ack: Option<oneshot::Sender<()>>,
    },
}

/// The handle to the reporter thread.
pub(crate) struct Reporter {
    pub(crate) liveness: Arc<Liveness>,
    commands: mpsc::UnboundedSender<Command>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Reporter {
    /// Starts the thread. It connects, then writes the first report at once.
    pub(crate) fn spawn(
        factory: Arc<dyn BackendFactory>,
        options: &LockerOptions,
        clock: Clock,
        process_hash: Arc<str>,
        events: Events,
    ) -> Result<Self> {
        let liveness = Arc::new(Liveness::new(clock, options.liveness_ttl));
        let (tx, rx) = mpsc::unbounded_channel();
        let task = Task {
            factory,
            liveness: liveness.clone(),
            process_hash,
            report_every: options.report_every,
            liveness_ttl: options.liveness_ttl,
            refuse_short_liveness: options.refuse_liveness_shorter_than_failover,
            retry_every: options.recheck_every.min(options.report_every),
            lock_ttl: options.lock_ttl,
            start_timeout: options.reporter_start_timeout,
            options: options.clone(),
            clock,
            events,
        };
        let thread = std::thread::Builder::new()
            .name("locker-reporter".to_owned())
            .spawn(move || {
                // Built here, so that nothing of it is ever dropped on the caller's runtime.
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => {
                        runtime.block_on(task.run(rx));
                        // Never wait on blocking work a driver left behind (a DNS lookup).
                        runtime.shutdown_background();
                    }
                    Err(e) => task.fail(
                        Error::new(ErrorKind::Other, "cannot build the reporter runtime")
                            .with_source(e),
                    ),
                }
            })
            .map_err(|e| {
                Error::new(ErrorKind::Other, "cannot start the reporter thread").with_source(e)
            })?;
        Ok(Reporter {
            liveness,
            commands: tx,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Hands a release to the reporter thread. Returns `false` when the thread is gone.
    pub(crate) fn release_in_background(
        &self,
        key: String,
        owner_hash: String,
        deadline: u64,
        kind: ReleaseKind,
    ) -> bool {
        self.commands
            .send(Command::Release {
                key,
                owner_hash,
                deadline,
                kind,
            })
            .is_ok()
    }

    /// Stops the thread and waits for it to finish (its pending releases included, unless
    /// `abandon`).
    pub(crate) async fn stop(&self, forget: bool, abandon: bool) {
        let (ack, done) = oneshot::channel();
        let sent = self
            .commands
            .send(Command::Stop {
                forget,
                abandon,
                ack: Some(ack),
            })
            .is_ok();
        if sent {
            let _ = done.await;
        }
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread {
            // The thread has acknowledged and only has to leave its runtime; joining means no
            // reporter thread outlives `shutdown`. Off the caller's runtime, which it must not
            // block.
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }

    /// Asks the thread to stop without waiting (used from `Drop`).
    pub(crate) fn stop_detached(&self, forget: bool) {
        let _ = self.commands.send(Command::Stop {
            forget,
            abandon: false,
            ack: None,
        });
    }
}

struct Task {
    factory: Arc<dyn BackendFactory>,
    liveness: Arc<Liveness>,
    process_hash: Arc<str>,
    report_every: Duration,
    liveness_ttl: Duration,
    refuse_short_liveness: bool,
    retry_every: Duration,
    lock_ttl: Duration,
    start_timeout: Duration,
    /// For the connection's healing (see [`Healing`]).
    options: LockerOptions,
    clock: Clock,
    events: Events,
}

impl Task {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<Command>) {
        let mut pending = Vec::new();
        let backend = loop {
            let attempt = timeout(self.start_timeout, self.factory.connect_reporter());
            tokio::select! {
                res = attempt => match res {
                    Ok(Ok(backend)) => match self.check_failover_time(&*backend) {
                        Ok(()) => break backend,
                        Err(e) => self.fail(e),
                    },
                    Ok(Err(e)) => self.fail(e),
                    Err(_) => self.fail(Error::new(
                        ErrorKind::Timeout,
                        format!("reporter connect took longer than {:?}", self.start_timeout),
                    )),
                },
                cmd = rx.recv() => match cmd {
                    Some(Command::Release { key, owner_hash, deadline, kind }) => {
                        pending.push((key, owner_hash, deadline, kind));
                        continue;
                    }
                    Some(Command::Stop { ack, .. }) => {
                        if let Some(ack) = ack { let _ = ack.send(()); }
                        return;
                    }
                    None => return,
                },
            }
            // Retry the connection at the report pace, still answering commands.
            tokio::select! {
                _ = sleep(self.report_every) => {}
                cmd = rx.recv() => match cmd {
                    Some(Command::Release { key, owner_hash, deadline, kind }) => {
                        pending.push((key, owner_hash, deadline, kind));
                    }
                    Some(Command::Stop { ack, .. }) => {
                        if let Some(ack) = ack { let _ = ack.send(()); }
                        return;
                    }
                    None => return,
                },
            }
        };

        let backend = Healing::wrap(
            backend,
            self.factory.clone(),
            "reporter",
            &self.options,
            self.events.clone(),
        );
        let mut releases = JoinSet::new();
        let mut undos = JoinSet::new();
        for (key, owner_hash, deadline, kind) in pending {
            let set = if kind == ReleaseKind::Held {
                &mut releases
            } else {
                &mut undos
            };
            set.spawn(self.release(backend.clone(), key, owner_hash, deadline, kind));
        }
        let mut ticker = tokio::time::interval(self.report_every);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Commands first: a stop must not wait behind liveness writes that a hung store makes
        // last their whole timeout (nor lose a coin toss against the next tick), and a write
        // in flight is dropped for it.
        let (forget, abandon, ack) = loop {
            tokio::select! {
                biased;
                cmd = rx.recv() => {
                    if let Some(stop) = self.handle(cmd, &backend, &mut releases, &mut undos) {
                        break stop;
                    }
                }
                _ = ticker.tick() => {
                    let report = self.report(&*backend);
                    tokio::pin!(report);
                    let stop = loop {
                        tokio::select! {
                            biased;
                            cmd = rx.recv() => {
                                if let Some(stop) =
                                    self.handle(cmd, &backend, &mut releases, &mut undos)
                                {
                                    break Some(stop);
                                }
                            }
                            () = &mut report => break None,
                        }
                    };
                    if let Some(stop) = stop {
                        break stop;
                    }
                }
                Some(_) = releases.join_next(), if !releases.is_empty() => {}
                Some(_) = undos.join_next(), if !undos.is_empty() => {}
            }
        };
        // See `ReleaseKind::InFlightAcquire`: deleting (or abandoning) the liveness record
        // makes whatever lands later free to take.
        undos.abort_all();
        if abandon {
            releases.abort_all();
        } else {
            // Pending releases retry until their locks would have expired anyway; give them a
            // bounded time so that shutdown never hangs on an unreachable store.
            let _ = timeout(self.liveness_ttl, async {
                while releases.join_next().await.is_some() {}
            })
            .await;
            releases.abort_all();
        }
        if forget {
            match timeout(
                self.liveness_ttl,
                backend.forget_process(&self.process_hash),
            )
            .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => self.fail(e),
                Err(_) => self.fail(Error::new(ErrorKind::Timeout, "forget_process timed out")),
            }
        }
        if let Some(ack) = ack {
            let _ = ack.send(());
        }
    }

    /// Runs one command; a stop (or the end of the channel) is returned as what to do.
    fn handle(
        &self,
        cmd: Option<Command>,
        backend: &Arc<dyn LockBackend>,
        releases: &mut JoinSet<()>,
        undos: &mut JoinSet<()>,
    ) -> Option<(bool, bool, Option<oneshot::Sender<()>>)> {
        match cmd {
            Some(Command::Release {
                key,
                owner_hash,
                deadline,
                kind,
            }) => {
                let set = if kind == ReleaseKind::Held {
                    releases
                } else {
                    undos
                };
                set.spawn(self.release(backend.clone(), key, owner_hash, deadline, kind));
                None
            }
            Some(Command::Stop {
                forget,
                abandon,
                ack,
            }) => Some((forget, abandon, ack)),
            None => Some((true, false, None)),
        }
    }

    async fn report(&self, backend: &dyn LockBackend) {
        let started = self.clock.now();
        let data = ProcessData::now();
        // A write that takes longer than the TTL is useless: the record would be stale on arrival.
        match timeout(
            self.liveness_ttl,
            backend.ping(&self.process_hash, &data, self.liveness_ttl),
        )
        .await
        {
            Ok(Ok(())) => self.liveness.record_success(started, self.clock.now()),
            Ok(Err(e)) => self.fail(e),
            Err(_) => self.fail(Error::new(
                ErrorKind::Timeout,
                format!("liveness write took longer than {:?}", self.liveness_ttl),
            )),
        }
    }

    /// A liveness TTL the store's failover would outlast: every lock of this process would be
    /// lost when the node holding its liveness record fails. A warning, or an error by option.
    fn check_failover_time(&self, backend: &dyn LockBackend) -> Result<()> {
        let Some(failover) = backend.capabilities().failover_time else {
            return Ok(());
        };
        if self.liveness_ttl > failover {
            return Ok(());
        }
        let message = format!(
            "liveness_ttl ({:?}) does not outlive a failover of the store (about {failover:?}): \
             when the node holding this process's liveness record fails, every lock of this \
             process is taken over; use a liveness TTL above {failover:?}, or a shorter node \
             timeout on the store",
            self.liveness_ttl
        );
        if self.refuse_short_liveness {
            return Err(Error::invalid_input(message));
        }
        tracing::warn!("{message}");
        Ok(())
    }

    fn fail(&self, e: Error) {
        self.liveness.record_error(&e);
        self.events.emit(BackgroundSource::Reporter, e);
    }

    fn release(
        &self,
        backend: Arc<dyn LockBackend>,
        key: String,
        owner_hash: String,
        deadline: u64,
        kind: ReleaseKind,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let clock = self.clock;
        let events = self.events.clone();
        let retry_every = self.retry_every;
        let undo_max_backoff = (self.lock_ttl / 16).max(retry_every);
        async move {
            let mut backoff = UNDO_FIRST_RETRY.min(retry_every);
            let max_backoff = undo_max_backoff;
            loop {
                let result = release_with_retry(
                    &*backend,
                    &key,
                    &owner_hash,
                    deadline,
                    clock,
                    retry_every,
                    &events,
                )
                .await;
                let again = match result {
                    Ok(_) => kind == ReleaseKind::InFlightAcquire,
                    Err(e) => {
                        let retryable = e.is_retryable();
                        events.emit(BackgroundSource::Release, e.with_key(key.clone()));
                        retryable && kind == ReleaseKind::InFlightAcquire
                    }
                };
                let left = deadline.saturating_sub(clock.now());
                if !again || left == 0 {
                    return;
                }
                sleep(backoff.min(Duration::from_nanos(left))).await;
                backoff = (backoff * 2).min(max_backoff);
            }
        }
    }
}

/// The first pause between two undos of an in-flight acquire (doubling up to the retry interval).
const UNDO_FIRST_RETRY: Duration = Duration::from_millis(10);

/// Releases a lock, retrying retryable errors (each one reported to `events`) until `deadline`,
/// after which the lock expires by itself.
pub(crate) async fn release_with_retry(
    backend: &dyn LockBackend,
    key: &str,
    owner_hash: &str,
    deadline: u64,
    clock: Clock,
    retry_every: Duration,
    events: &Events,
) -> Result<ReleaseOutcome> {
    loop {
        match backend.release(key, owner_hash).await {
            Ok(outcome) => {
                crate::locker::log_release(key, owner_hash, &outcome);
                return Ok(outcome);
            }
            Err(e) if e.is_retryable() && clock.now() < deadline => {
                events.emit(BackgroundSource::Release, e.with_key(key));
                let left = Duration::from_nanos(deadline.saturating_sub(clock.now()));
                sleep(retry_every.min(left)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    impl Word for loom::sync::atomic::AtomicU64 {
        fn load(&self, order: Ordering) -> u64 {
            loom::sync::atomic::AtomicU64::load(self, order)
        }
        fn store(&self, value: u64, order: Ordering) {
            loom::sync::atomic::AtomicU64::store(self, value, order)
        }
        fn fetch_max(&self, value: u64, order: Ordering) -> u64 {
            loom::sync::atomic::AtomicU64::fetch_max(self, value, order)
        }
    }

    fn liveness() -> Liveness {
        Liveness::new(Clock::new(), Duration::from_millis(10))
    }

    #[test]
    fn regular_reports_are_no_lapse() {
        let l = liveness();
        l.record_success(MS, 2 * MS);
        l.record_success(5 * MS, 6 * MS);
        l.record_success(9 * MS, 10 * MS);
        assert!(!l.lapsed_since(MS, 12 * MS));
    }

    #[test]
    fn a_write_that_lands_after_the_record_expired_is_a_lapse() {
        let l = liveness();
        l.record_success(MS, 2 * MS);
        // Sent before the old record expired (at 11 ms), acknowledged after it.
        l.record_success(10 * MS, 12 * MS);
        assert!(l.is_fresh(13 * MS));
        assert!(
            l.lapsed_since(5 * MS, 13 * MS),
            "a lock held since 5 ms may be gone"
        );
        assert!(
            !l.lapsed_since(12 * MS, 13 * MS),
            "a lock taken after the gap is fine"
        );
    }

    /// Every interleaving of a report that ends a lapse with a beat on another thread: the
    /// beat never sees the fresh record without the lapse. (With the old order, fresh record
    /// first and lapse second, loom finds the interleaving where the beat passes.)
    #[test]
    fn loom_a_beat_never_sees_a_fresh_record_without_its_lapse() {
        loom::model(|| {
            let ttl = 10;
            let published =
                loom::sync::Arc::new(Published::<loom::sync::atomic::AtomicU64>::default());
            // A report sent at 1, acknowledged at 2; a lock acquired at 3.
            published.record_success(1, 2, ttl);
            let reporter = {
                let published = published.clone();
                loom::thread::spawn(move || {
                    // Sent at 9, acknowledged at 12: after the first record expired (at 11).
                    published.record_success(9, 12, ttl);
                })
            };
            // A beat at 13 on another thread, whatever it sees of the second report, must
            // report the lapse.
            let beat = {
                let published = published.clone();
                loom::thread::spawn(move || published.lapsed_since(3, 13, ttl))
            };
            assert!(
                beat.join().expect("beat thread"),
                "a beat passed right after a lapse"
            );
            reporter.join().expect("reporter thread");
            assert!(published.lapsed_since(3, 13, ttl));
        });
    }

    #[test]
    fn no_report_for_a_whole_ttl_is_a_lapse() {
        let l = liveness();
        l.record_success(MS, 2 * MS);
        assert!(l.lapsed_since(2 * MS, 11 * MS));
        assert!(!l.lapsed_since(2 * MS, 10 * MS));
    }
}
