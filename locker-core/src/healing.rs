//! Connections that replace themselves when they keep failing.
//!
//! A client library may lose a connection for good and never say so: after a Redis Cluster
//! failover, a connection that carried many concurrent calls was seen timing out every command
//! for the rest of a run, while the reporter's own connection kept the process looking alive.
//! The locker does not trust a connection to heal itself. Both of its connections (the jobs'
//! one, and the reporter's on its own thread) go through a [`Healing`] backend, which counts
//! failures in a row and opens a new connection from the [`BackendFactory`] when they pile up.
//!
//! What counts as a failure: an error that says the store is unreachable or did not answer
//! ([`ErrorKind::Unavailable`], [`ErrorKind::Timeout`], unless the store itself gave it: see
//! [`Error::set_store_answered`]), and each
//! tick period ([`slow_call_after`](crate::LockerOptions::slow_call_after), from one ticker task
//! per connection side) that a call waits through while no call on the connection got an
//! answer (a wedged connection may never answer at all, and a caller may wait long; a busy one
//! that answers others is working). A call's first slow tick comes after one to two periods. Any answer from the store, even
//! an error such as a corrupt record, resets the count. After
//! [`reconnect_after_failures`](crate::LockerOptions::reconnect_after_failures) failures in a
//! row, one task (never more) connects again, on the runtime that made the connection, and
//! swaps the new connection in. Calls still waiting on the old one fail at their next slow tick
//! with a retryable [`ErrorKind::Unavailable`], and their callers retry as after any failure
//! (an acquire's possible write is undone as for any failed acquire). A failed reconnect is
//! reported as a [`BackgroundSource::Connection`] error and tried again with a backoff.
//! Nothing is retried here: this layer only chooses the connection.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::time::{timeout, Instant};

use crate::backend::{
    AcquireDecision, AcquireOutcome, BackendFactory, Capabilities, ExtendOutcome, LockBackend,
    ReleaseOutcome,
};
use crate::error::{Error, ErrorKind, Result};
use crate::events::{BackgroundSource, Events};
use crate::options::LockerOptions;
use crate::record::{LockData, ProcessData};

/// The first wait after a failed reconnect; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(8);

/// A backend that replaces its connection after repeated failures; see the module docs.
pub(crate) struct Healing {
    shared: Arc<Shared>,
}

struct Shared {
    factory: Arc<dyn BackendFactory>,
    /// "job" or "reporter", for the logs.
    side: &'static str,
    after: u32,
    connect_timeout: Duration,
    events: Events,
    /// The runtime that made the first connection: the new ones are made there too.
    runtime: Handle,
    current: RwLock<Arc<Generation>>,
    /// One reconnect at a time.
    reconnecting: AtomicBool,
    backoff: Mutex<Backoff>,
    replacements: AtomicU64,
    /// A tick every `slow_call_after`, from one task per connection side: what a waiting call looks
    /// at the connection on (a timer of its own per call cost the client more than a tenth of
    /// its time per lock cycle at 64 concurrent calls).
    ticks: watch::Receiver<u64>,
}

struct Backoff {
    not_before: Option<Instant>,
    next: Duration,
}

struct Generation {
    backend: Arc<dyn LockBackend>,
    /// Failures in a row on this connection.
    failures: AtomicU32,
    /// Answers received on this connection: a slow tick counts as a failure only when none
    /// came since the call's previous tick (a busy connection that answers others is working).
    answers: AtomicU64,
    /// Set when a newer connection took this one's place.
    replaced: AtomicBool,
}

impl Generation {
    fn new(backend: Arc<dyn LockBackend>) -> Arc<Self> {
        Arc::new(Generation {
            backend,
            failures: AtomicU32::new(0),
            answers: AtomicU64::new(0),
            replaced: AtomicBool::new(false),
        })
    }
}

impl std::fmt::Debug for Healing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Healing")
            .field("side", &self.shared.side)
            .field("backend", &self.shared.current().backend)
            .field(
                "replacements",
                &self.shared.replacements.load(Ordering::Relaxed),
            )
            .finish()
    }
}

impl Healing {
    /// Wraps `backend`, a connection just made by `factory`. Without a tokio runtime to
    /// reconnect on, or with healing turned off, `backend` is returned as it is.
    pub(crate) fn wrap(
        backend: Arc<dyn LockBackend>,
        factory: Arc<dyn BackendFactory>,
        side: &'static str,
        options: &LockerOptions,
        events: Events,
    ) -> Arc<dyn LockBackend> {
        let Ok(runtime) = Handle::try_current() else {
            return backend;
        };
        if options.reconnect_after_failures == 0 {
            return backend;
        }
        let (tick, ticks) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            factory,
            side,
            after: options.reconnect_after_failures,
            connect_timeout: options.reporter_start_timeout,
            events,
            runtime,
            current: RwLock::new(Generation::new(backend)),
            reconnecting: AtomicBool::new(false),
            backoff: Mutex::new(Backoff {
                not_before: None,
                next: FIRST_BACKOFF,
            }),
            replacements: AtomicU64::new(0),
            ticks,
        });
        // Ticks for as long as the connection side lives (the task holds no strong reference).
        let period = options.slow_call_after;
        let weak = Arc::downgrade(&shared);
        shared.runtime.spawn(async move {
            let mut every = tokio::time::interval_at(Instant::now() + period, period);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                if weak.strong_count() == 0 {
                    return;
                }
                tick.send_modify(|n| *n = n.wrapping_add(1));
            }
        });
        Arc::new(Healing { shared })
    }
}

impl Shared {
    fn current(&self) -> Arc<Generation> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Runs one call on `generation`'s connection, counting its failures and slow ticks.
    ///
    /// A slow tick: the call has waited through a whole tick period (from one tick of the
    /// connection side's ticker to the next, so at least `slow_call_after`, at most twice that) and
    /// no call on the connection got an answer in that period.
    async fn watch<T>(
        self: &Arc<Self>,
        generation: &Arc<Generation>,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        tokio::pin!(call);
        let mut ticks = self.ticks.clone();
        ticks.mark_unchanged();
        // Answers seen at the last tick; none before the first, which only starts a period.
        let mut answers_seen: Option<u64> = None;
        let mut ticking = true;
        loop {
            tokio::select! {
                biased;
                result = &mut call => {
                    match &result {
                        // The connection reaches a node that cannot serve it: replace it now.
                        Err(e) if e.is_wrong_node() => {
                            let after = self.after.saturating_sub(1);
                            generation.failures.fetch_max(after, Ordering::Relaxed);
                            self.failed(generation);
                        }
                        Err(e) if matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::Timeout)
                            && !e.store_answered() =>
                        {
                            self.failed(generation);
                        }
                        // The store answered, even if only to refuse.
                        _ => {
                            generation.answers.fetch_add(1, Ordering::Relaxed);
                            if generation.failures.load(Ordering::Relaxed) != 0 {
                                generation.failures.store(0, Ordering::Relaxed);
                            }
                        }
                    }
                    return result;
                }
                changed = ticks.changed(), if ticking => {
                    if changed.is_err() {
                        // The ticker is gone (its runtime shut down): the call's own bounds
                        // remain.
                        ticking = false;
                        continue;
                    }
                    if generation.replaced.load(Ordering::Acquire) {
                        return Err(Error::new(
                            ErrorKind::Unavailable,
                            format!(
                                "the {} connection was replaced while this call waited for \
                                 its answer",
                                self.side
                            ),
                        ));
                    }
                    let answers = generation.answers.load(Ordering::Relaxed);
                    if answers_seen == Some(answers) {
                        self.failed(generation);
                    }
                    answers_seen = Some(answers);
                }
            }
        }
    }

    fn failed(self: &Arc<Self>, generation: &Arc<Generation>) {
        let failures = generation.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < self.after || generation.replaced.load(Ordering::Acquire) {
            return;
        }
        if self.reconnecting.swap(true, Ordering::AcqRel) {
            return;
        }
        let in_backoff = match self.backoff.lock() {
            Ok(b) => b.not_before.is_some_and(|t| Instant::now() < t),
            Err(_) => false,
        };
        if in_backoff {
            self.reconnecting.store(false, Ordering::Release);
            return;
        }
        // Resets `reconnecting` however the task ends, even if the runtime is gone and the
        // task is dropped unpolled.
        let busy = Busy(self.clone());
        let old = generation.clone();
        self.runtime.spawn(async move {
            let shared = busy.0.clone();
            shared.reconnect(&old, failures).await;
            drop(busy);
        });
    }

    async fn reconnect(&self, old: &Arc<Generation>, failures: u32) {
        let connect = async {
            if self.side == "reporter" {
                self.factory.connect_reporter().await
            } else {
                self.factory.connect().await
            }
        };
        let result = match timeout(self.connect_timeout, connect).await {
            Ok(result) => result,
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!("connecting took longer than {:?}", self.connect_timeout),
            )),
        };
        match result {
            Ok(backend) => {
                {
                    let mut current = match self.current.write() {
                        Ok(c) => c,
                        Err(poisoned) => poisoned.into_inner(),
                    };
                    *current = Generation::new(backend);
                }
                old.replaced.store(true, Ordering::Release);
                if let Ok(mut b) = self.backoff.lock() {
                    b.not_before = None;
                    b.next = FIRST_BACKOFF;
                }
                let n = self.replacements.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::warn!(
                    side = self.side,
                    failures,
                    replacements = n,
                    "replaced a store connection that kept failing"
                );
            }
            Err(e) => {
                let wait = match self.backoff.lock() {
                    Ok(mut b) => {
                        let wait = b.next;
                        b.not_before = Some(Instant::now() + wait);
                        b.next = (b.next * 2).min(MAX_BACKOFF);
                        wait
                    }
                    Err(_) => FIRST_BACKOFF,
                };
                // The cause is the source, which the error's text ends with.
                let message = format!(
                    "the {} connection failed {failures} times in a row, and a new one could \
                     not be made (trying again in {wait:?} or later)",
                    self.side,
                );
                self.events.emit(
                    BackgroundSource::Connection,
                    Error::new(e.kind(), message).with_source(e),
                );
            }
        }
    }
}

struct Busy(Arc<Shared>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.reconnecting.store(false, Ordering::Release);
    }
}

/// Runs `$call` with `$b` bound to the current connection, through [`Shared::watch`].
macro_rules! healed {
    ($self:ident, |$b:ident| $call:expr) => {{
        let generation = $self.shared.current();
        let $b = &*generation.backend;
        $self.shared.watch(&generation, $call).await
    }};
}

#[async_trait]
impl LockBackend for Healing {
    fn capabilities(&self) -> Capabilities {
        self.shared.current().backend.capabilities()
    }

    async fn acquire(&self, key: &str, data: &LockData, ttl: Duration) -> Result<AcquireOutcome> {
        healed!(self, |b| b.acquire(key, data, ttl))
    }

    async fn acquire_checked(
        &self,
        key: &str,
        data: &LockData,
        ttl: Duration,
    ) -> Result<AcquireDecision> {
        healed!(self, |b| b.acquire_checked(key, data, ttl))
    }

    async fn extend(
        &self,
        key: &str,
        data: &LockData,
        ttl: Duration,
        owner_hash: &str,
    ) -> Result<ExtendOutcome> {
        healed!(self, |b| b.extend(key, data, ttl, owner_hash))
    }

    async fn release(&self, key: &str, owner_hash: &str) -> Result<ReleaseOutcome> {
        healed!(self, |b| b.release(key, owner_hash))
    }

    async fn take_over(
        &self,
        key: &str,
        data: &LockData,
        ttl: Duration,
        dead_owner_hash: &str,
    ) -> Result<AcquireOutcome> {
        healed!(self, |b| b.take_over(key, data, ttl, dead_owner_hash))
    }

    async fn ping(&self, process_hash: &str, data: &ProcessData, ttl: Duration) -> Result<()> {
        healed!(self, |b| b.ping(process_hash, data, ttl))
    }

    async fn read(&self, key: &str) -> Result<Option<LockData>> {
        healed!(self, |b| b.read(key))
    }

    async fn read_many(&self, keys: &[&str]) -> Result<Vec<Result<Option<LockData>>>> {
        healed!(self, |b| b.read_many(keys))
    }

    async fn read_process(&self, process_hash: &str) -> Result<Option<ProcessData>> {
        healed!(self, |b| b.read_process(process_hash))
    }

    async fn forget_process(&self, process_hash: &str) -> Result<()> {
        healed!(self, |b| b.forget_process(process_hash))
    }

    async fn watch_release(&self, key: &str) -> Result<Option<crate::ReleaseWatch>> {
        healed!(self, |b| b.watch_release(key))
    }

    async fn liveness_left(&self, process_hash: &str) -> Result<Option<Duration>> {
        healed!(self, |b| b.liveness_left(process_hash))
    }
}
