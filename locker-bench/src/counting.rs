//! A backend decorator that counts the calls a locker makes, for the background-cost and
//! round-trip figures. It counts trait method calls: a backend that makes several store calls
//! inside one method (the default `take_over`, etcd's leases) is counted once per method call.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use locker::{
    AcquireDecision, AcquireOutcome, BackendFactory, Capabilities, ExtendOutcome, LockBackend,
    LockData, ProcessData, ReleaseOutcome, Result,
};

/// The backend methods called, one counter each.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    pub(crate) acquire: AtomicU64,
    pub(crate) acquire_checked: AtomicU64,
    pub(crate) extend: AtomicU64,
    pub(crate) release: AtomicU64,
    pub(crate) take_over: AtomicU64,
    pub(crate) read: AtomicU64,
    pub(crate) read_many: AtomicU64,
    pub(crate) read_process: AtomicU64,
    pub(crate) forget_process: AtomicU64,
    pub(crate) ping: AtomicU64,
    pub(crate) watch_release: AtomicU64,
    pub(crate) liveness_left: AtomicU64,
}

/// The counters at one instant; `after - before` is what happened in between.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub(crate) acquire: u64,
    pub(crate) acquire_checked: u64,
    pub(crate) extend: u64,
    pub(crate) release: u64,
    pub(crate) take_over: u64,
    pub(crate) read: u64,
    pub(crate) read_many: u64,
    pub(crate) read_process: u64,
    pub(crate) forget_process: u64,
    pub(crate) ping: u64,
    pub(crate) watch_release: u64,
    pub(crate) liveness_left: u64,
}

impl std::ops::Sub for Snapshot {
    type Output = Snapshot;
    fn sub(self, o: Snapshot) -> Snapshot {
        Snapshot {
            acquire: self.acquire - o.acquire,
            acquire_checked: self.acquire_checked - o.acquire_checked,
            extend: self.extend - o.extend,
            release: self.release - o.release,
            take_over: self.take_over - o.take_over,
            read: self.read - o.read,
            read_many: self.read_many - o.read_many,
            read_process: self.read_process - o.read_process,
            forget_process: self.forget_process - o.forget_process,
            ping: self.ping - o.ping,
            watch_release: self.watch_release - o.watch_release,
            liveness_left: self.liveness_left - o.liveness_left,
        }
    }
}

impl Snapshot {
    /// The calls other than the liveness reporter's pings, `(method, calls)`, in call order of
    /// a decision.
    pub(crate) fn decision_calls(&self) -> Vec<(&'static str, u64)> {
        [
            ("acquire", self.acquire),
            ("acquire_checked", self.acquire_checked),
            ("read_process", self.read_process),
            ("take_over", self.take_over),
            ("extend", self.extend),
            ("release", self.release),
            ("read", self.read),
            ("read_many", self.read_many),
            ("forget_process", self.forget_process),
        ]
        .into_iter()
        .filter(|&(_, n)| n > 0)
        .collect()
    }

    /// What waiting costs the store: tries (acquire and its follow-ups), liveness lookups
    /// and subscriptions; not the reporter's pings.
    pub(crate) fn waiting_calls(&self) -> u64 {
        self.other() + self.liveness_left + self.watch_release + self.read
    }

    /// Calls that are neither pings, reads nor extends.
    pub(crate) fn other(&self) -> u64 {
        self.acquire
            + self.acquire_checked
            + self.release
            + self.take_over
            + self.read_process
            + self.forget_process
    }
}

impl Counts {
    pub(crate) fn snapshot(&self) -> Snapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Snapshot {
            acquire: g(&self.acquire),
            acquire_checked: g(&self.acquire_checked),
            extend: g(&self.extend),
            release: g(&self.release),
            take_over: g(&self.take_over),
            read: g(&self.read),
            read_many: g(&self.read_many),
            read_process: g(&self.read_process),
            forget_process: g(&self.forget_process),
            ping: g(&self.ping),
            watch_release: g(&self.watch_release),
            liveness_left: g(&self.liveness_left),
        }
    }
}

pub(crate) struct CountingFactory {
    pub(crate) inner: Arc<dyn BackendFactory>,
    pub(crate) counts: Arc<Counts>,
    /// `read_many` as one `read` per key (the rechecks before issue 17: one call per lock).
    pub(crate) split_reads: bool,
}

#[async_trait]
impl BackendFactory for CountingFactory {
    async fn connect(&self) -> Result<Arc<dyn LockBackend>> {
        Ok(Arc::new(Counting {
            inner: self.inner.connect().await?,
            counts: self.counts.clone(),
            split_reads: self.split_reads,
        }))
    }

    async fn connect_reporter(&self) -> Result<Arc<dyn LockBackend>> {
        Ok(Arc::new(Counting {
            inner: self.inner.connect_reporter().await?,
            counts: self.counts.clone(),
            split_reads: self.split_reads,
        }))
    }
}

#[derive(Debug)]
struct Counting {
    inner: Arc<dyn LockBackend>,
    counts: Arc<Counts>,
    split_reads: bool,
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
    async fn acquire_checked(
        &self,
        key: &str,
        data: &LockData,
        ttl: Duration,
    ) -> Result<AcquireDecision> {
        bump(&self.counts.acquire_checked);
        self.inner.acquire_checked(key, data, ttl).await
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
        bump(&self.counts.take_over);
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
    async fn read_many(&self, keys: &[&str]) -> Result<Vec<Result<Option<LockData>>>> {
        if self.split_reads {
            return locker::read_each(self, keys).await;
        }
        bump(&self.counts.read_many);
        self.inner.read_many(keys).await
    }
    async fn read_process(&self, process_hash: &str) -> Result<Option<ProcessData>> {
        bump(&self.counts.read_process);
        self.inner.read_process(process_hash).await
    }
    async fn forget_process(&self, process_hash: &str) -> Result<()> {
        bump(&self.counts.forget_process);
        self.inner.forget_process(process_hash).await
    }
    async fn watch_release(&self, key: &str) -> Result<Option<locker::ReleaseWatch>> {
        bump(&self.counts.watch_release);
        self.inner.watch_release(key).await
    }
    async fn liveness_left(&self, process_hash: &str) -> Result<Option<Duration>> {
        bump(&self.counts.liveness_left);
        self.inner.liveness_left(process_hash).await
    }
}
