//! A backend decorator that counts the calls a locker makes, for the background-cost figures.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use locker::{
    AcquireOutcome, BackendFactory, Capabilities, ExtendOutcome, LockBackend, LockData,
    ProcessData, ReleaseOutcome, Result,
};

#[derive(Debug, Default)]
pub(crate) struct Counts {
    pub(crate) acquire: AtomicU64,
    pub(crate) extend: AtomicU64,
    pub(crate) release: AtomicU64,
    pub(crate) read: AtomicU64,
    pub(crate) ping: AtomicU64,
    pub(crate) other: AtomicU64,
}

impl Counts {
    pub(crate) fn snapshot(&self) -> [u64; 6] {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            g(&self.acquire),
            g(&self.extend),
            g(&self.release),
            g(&self.read),
            g(&self.ping),
            g(&self.other),
        ]
    }
}

pub(crate) struct CountingFactory {
    pub(crate) inner: Arc<dyn BackendFactory>,
    pub(crate) counts: Arc<Counts>,
}

#[async_trait]
impl BackendFactory for CountingFactory {
    async fn connect(&self) -> Result<Arc<dyn LockBackend>> {
        Ok(Arc::new(Counting {
            inner: self.inner.connect().await?,
            counts: self.counts.clone(),
        }))
    }
}

#[derive(Debug)]
struct Counting {
    inner: Arc<dyn LockBackend>,
    counts: Arc<Counts>,
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

#[async_trait]
impl LockBackend for Counting {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn acquire(&self, key: &str, data: &LockData, ttl: Duration) -> Result<AcquireOutcome> {
        bump(&self.counts.acquire);
        self.inner.acquire(key, data, ttl).await
    }
    async fn extend(
        &self,
        key: &str,
        data: &LockData,
        ttl: Duration,
        owner_hash: &str,
    ) -> Result<ExtendOutcome> {
        bump(&self.counts.extend);
        self.inner.extend(key, data, ttl, owner_hash).await
    }
    async fn release(&self, key: &str, owner_hash: &str) -> Result<ReleaseOutcome> {
        bump(&self.counts.release);
        self.inner.release(key, owner_hash).await
    }
    async fn take_over(
        &self,
        key: &str,
        data: &LockData,
        ttl: Duration,
        dead_owner_hash: &str,
    ) -> Result<AcquireOutcome> {
        bump(&self.counts.other);
        self.inner.take_over(key, data, ttl, dead_owner_hash).await
    }
    async fn ping(&self, process_hash: &str, data: &ProcessData, ttl: Duration) -> Result<()> {
        bump(&self.counts.ping);
        self.inner.ping(process_hash, data, ttl).await
    }
    async fn read(&self, key: &str) -> Result<Option<LockData>> {
        bump(&self.counts.read);
        self.inner.read(key).await
    }
    async fn read_process(&self, process_hash: &str) -> Result<Option<ProcessData>> {
        bump(&self.counts.other);
        self.inner.read_process(process_hash).await
    }
    async fn forget_process(&self, process_hash: &str) -> Result<()> {
        bump(&self.counts.other);
        self.inner.forget_process(process_hash).await
    }
}
