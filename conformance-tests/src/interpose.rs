//! [`Interposed`]: a decorator around any backend factory that lets a case delay genuine
//! replies, block the job's thread after a reply, and cut this process's liveness writes, so
//! that the safety cases run on every backend, with the real store's answers.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use locker_core::{
    AcquireOutcome, BackendFactory, Capabilities, Error, ExtendOutcome, LockBackend, LockData,
    ProcessData, ReleaseOutcome, Result,
};

type Hook = Box<dyn FnOnce() + Send>;

/// What a case controls; shared by every connection the [`Interposed`] factory opens.
#[derive(Default)]
pub struct Interposer {
    cut_pings: AtomicBool,
    pings_ok: AtomicU64,
    after_read: Mutex<Option<Hook>>,
    after_acquire: Mutex<Option<Hook>>,
    acquire_delay_nanos: AtomicU64,
    delayed_landed: AtomicU64,
}

impl Interposer {
    /// While `true`, liveness writes (pings) fail with a retryable `Unavailable` error without
    /// reaching the store: the reporter is cut off, the record expires.
    pub fn cut_pings(&self, cut: bool) {
        self.cut_pings.store(cut, Ordering::SeqCst);
    }

    /// Liveness writes that reached the store and succeeded so far.
    pub fn pings_ok(&self) -> u64 {
        self.pings_ok.load(Ordering::SeqCst)
    }

    /// Blocks the calling thread until one more liveness write has succeeded, at most `limit`.
    ///
    /// # Panics
    /// When none succeeds within `limit`.
    pub fn wait_for_a_ping(&self, limit: Duration) {
        let before = self.pings_ok();
        let start = Instant::now();
        while self.pings_ok() == before {
            assert!(
                start.elapsed() < limit,
                "no liveness write succeeded within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Runs `hook` on the calling thread right after the next read of a lock record has got
    /// its genuine reply, before the reply is handed back: a hook that blocks is a job
    /// runtime that is frozen (or starved) between the store's answer and its use.
    pub fn after_next_read(&self, hook: impl FnOnce() + Send + 'static) {
        *lock(&self.after_read) = Some(Box::new(hook));
    }

    /// As [`after_next_read`](Self::after_next_read), for the next acquire or take-over.
    pub fn after_next_acquire(&self, hook: impl FnOnce() + Send + 'static) {
        *lock(&self.after_acquire) = Some(Box::new(hook));
    }

    /// The next acquire (or take-over) reaches the store only `delay` after it is called, even
    /// if its caller has given up meanwhile: a command already sent, which the store carries
    /// out after the client stopped waiting (a pipelined command, a statement still running).
    pub fn delay_next_acquire(&self, delay: Duration) {
        let nanos = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
        self.acquire_delay_nanos.store(nanos, Ordering::SeqCst);
    }

    /// Delayed acquires that reached the store and stored our record.
    pub fn delayed_acquires_landed(&self) -> u64 {
        self.delayed_landed.load(Ordering::SeqCst)
    }

    fn take_acquire_delay(&self) -> Option<Duration> {
        match self.acquire_delay_nanos.swap(0, Ordering::SeqCst) {
            0 => None,
            n => Some(Duration::from_nanos(n)),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

fn run_hook(slot: &Mutex<Option<Hook>>) {
    let hook = lock(slot).take();
    if let Some(hook) = hook {
        hook();
    }
}

/// A [`BackendFactory`] whose connections pass every call to the wrapped backend, under the
/// control of an [`Interposer`].
///
/// ```
/// use locker_conformance::interpose::Interposed;
/// use locker_core::MemoryBackend;
///
/// let (factory, control) = Interposed::new(MemoryBackend::new());
/// control.cut_pings(true); // this locker's liveness writes now fail
/// # let _ = factory;
/// ```
pub struct Interposed {
    inner: Arc<dyn BackendFactory>,
    control: Arc<Interposer>,
}

impl Interposed {
    /// Wraps `factory`; returns the factory to build a locker with and its control.
    pub fn new(factory: impl BackendFactory) -> (Self, Arc<Interposer>) {
        let control = Arc::new(Interposer::default());
        (
            Interposed {
                inner: Arc::new(factory),
                control: control.clone(),
            },
            control,
        )
    }
}

#[async_trait]
impl BackendFactory for Interposed {
    async fn connect(&self) -> Result<Arc<dyn LockBackend>> {
        Ok(Arc::new(InterposedBackend {
            inner: self.inner.connect().await?,
            control: self.control.clone(),
        }))
    }

    async fn connect_reporter(&self) -> Result<Arc<dyn LockBackend>> {
        Ok(Arc::new(InterposedBackend {
            inner: self.inner.connect_reporter().await?,
            control: self.control.clone(),
        }))
    }
}

struct InterposedBackend {
    inner: Arc<dyn LockBackend>,
    control: Arc<Interposer>,
}

impl fmt::Debug for InterposedBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InterposedBackend")
            .field("inner", &self.inner)
            .finish()
    }
}

impl InterposedBackend {
    /// Runs an acquire-like call, delayed and detached if asked, then the acquire hook.
    async fn acquire_like<F>(&self, call: F) -> Result<AcquireOutcome>
    where
        F: FnOnce(
            Arc<dyn LockBackend>,
        ) -> futures::future::BoxFuture<'static, Result<AcquireOutcome>>,
    {
        let outcome = match self.control.take_acquire_delay() {
            None => call(self.inner.clone()).await,
            Some(delay) => {
                let call = call(self.inner.clone());
                let control = self.control.clone();
                // Detached: dropping the caller's future does not stop it.
                let task = tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let outcome = call.await;
                    if let Ok(AcquireOutcome::Acquired(_)) = &outcome {
                        control.delayed_landed.fetch_add(1, Ordering::SeqCst);
                    }
                    outcome
                });
                match task.await {
                    Ok(outcome) => outcome,
                    Err(e) => {
                        Err(Error::unavailable("the delayed acquire task failed").with_source(e))
                    }
                }
            }
        };
        run_hook(&self.control.after_acquire);
        outcome
    }
}

#[async_trait]
impl LockBackend for InterposedBackend {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn acquire(&self, key: &str, data: &LockData, ttl: Duration) -> Result<AcquireOutcome> {
        let (key, data) = (key.to_owned(), data.clone());
        self.acquire_like(move |b| Box::pin(async move { b.acquire(&key, &data, ttl).await }))
            .await
    }

    async fn extend(
        &self,
        key: &str,
        data: &LockData,
        ttl: Duration,
        owner_hash: &str,
    ) -> Result<ExtendOutcome> {
        self.inner.extend(key, data, ttl, owner_hash).await
    }

    async fn release(&self, key: &str, owner_hash: &str) -> Result<ReleaseOutcome> {
        self.inner.release(key, owner_hash).await
    }

    async fn take_over(
        &self,
        key: &str,
        data: &LockData,
        ttl: Duration,
        dead_owner_hash: &str,
    ) -> Result<AcquireOutcome> {
        let (key, data, dead) = (key.to_owned(), data.clone(), dead_owner_hash.to_owned());
        self.acquire_like(move |b| {
            Box::pin(async move { b.take_over(&key, &data, ttl, &dead).await })
        })
        .await
    }

    async fn ping(&self, process_hash: &str, data: &ProcessData, ttl: Duration) -> Result<()> {
        if self.control.cut_pings.load(Ordering::SeqCst) {
            return Err(Error::unavailable("liveness writes are cut by the test"));
        }
        self.inner.ping(process_hash, data, ttl).await?;
        self.control.pings_ok.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn read(&self, key: &str) -> Result<Option<LockData>> {
        let reply = self.inner.read(key).await;
        run_hook(&self.control.after_read);
        reply
    }

    async fn read_process(&self, process_hash: &str) -> Result<Option<ProcessData>> {
        self.inner.read_process(process_hash).await
    }

    async fn forget_process(&self, process_hash: &str) -> Result<()> {
        self.inner.forget_process(process_hash).await
    }

    async fn watch_release(&self, key: &str) -> Result<Option<locker_core::ReleaseWatch>> {
        self.inner.watch_release(key).await
    }

    async fn liveness_left(&self, process_hash: &str) -> Result<Option<Duration>> {
        self.inner.liveness_left(process_hash).await
    }
}
