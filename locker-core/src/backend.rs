//! The contract between the [`Locker`](crate::Locker) and a store: [`LockBackend`], its typed
//! outcomes, its [`Capabilities`], and the [`BackendFactory`] that opens connections.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::Result;
use crate::record::{LockData, ProcessData};

/// What [`LockBackend::acquire`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum AcquireOutcome {
    /// The key was free; this is the record now stored (with its fencing token, if any).
    Acquired(LockData),
    /// Someone holds the key; this is their record.
    Held(LockData),
}

/// What [`LockBackend::acquire_checked`] decided, in one call.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum AcquireDecision {
    /// The key was free; this is the record now stored.
    Acquired(LockData),
    /// The key was held by a process with no liveness record; its lock was replaced by
    /// `stored`. `dead` is the replaced record.
    TookOver {
        /// The record now stored (with its fencing token, if any).
        stored: LockData,
        /// The dead holder's record.
        dead: LockData,
    },
    /// Someone holds the key, and their process's liveness record is there.
    HeldByLive(LockData),
    /// Someone holds the key; whether their process is alive was not looked at.
    Held(LockData),
}

/// An acquire's outcome as a decision that did not look at the holder's liveness: `Held`,
/// never `HeldByLive` or `TookOver`.
impl From<AcquireOutcome> for AcquireDecision {
    fn from(outcome: AcquireOutcome) -> Self {
        match outcome {
            AcquireOutcome::Acquired(stored) => AcquireDecision::Acquired(stored),
            AcquireOutcome::Held(holder) => AcquireDecision::Held(holder),
        }
    }
}

/// What [`LockBackend::extend`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum ExtendOutcome {
    /// The caller still owned the key; this is the record now stored.
    Extended(LockData),
    /// There is no lock under the key any more (it expired or was released).
    NoKey,
    /// Someone else owns the key now; this is their record.
    Held(LockData),
}

/// What [`LockBackend::release`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum ReleaseOutcome {
    /// The caller owned the key, and the lock is gone now.
    Released,
    /// There was no lock under the key.
    NoKey,
    /// Someone else owns the key; nothing was deleted. This is their record.
    Held(LockData),
}

/// What a backend supports, read by the locker and by the shared conformance suite to choose
/// its cases.
///
/// The struct is `#[non_exhaustive]`: start from [`Capabilities::default`] and set fields.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Acquire assigns [`LockData::fencing_token`], strictly greater than every token given for
    /// that key before (across releases and expiries).
    pub fencing: bool,
    /// The smallest TTL step the store honours; TTLs are rounded up to it (1 ms for Redis,
    /// 1 s for etcd leases).
    pub ttl_granularity: Duration,
    /// Locks are visible to other OS processes (false for the in-memory backend).
    pub shared_across_processes: bool,
    /// [`LockBackend::take_over`] is one atomic call rather than the default release + acquire.
    pub atomic_take_over: bool,
    /// The longest key, in bytes, the store accepts, when it is smaller than
    /// [`MAX_KEY_LEN`](crate::MAX_KEY_LEN).
    pub max_key_len: Option<usize>,
    /// How long the store may take to fail over a node, when it can tell (Redis Cluster:
    /// estimated from `cluster-node-timeout`). A process whose liveness record lives on a failed
    /// node cannot refresh it meanwhile: a liveness TTL shorter than this loses every lock of
    /// such a process. The locker warns, or refuses to start with
    /// [`LockerOptions::refuse_liveness_shorter_than_failover`](crate::LockerOptions).
    pub failover_time: Option<Duration>,
    /// [`LockBackend::acquire_checked`] looks at the holder's liveness record and takes over a
    /// dead holder's lock in the same call, so that every acquire decision is one round trip.
    pub checked_acquire: bool,
    /// [`LockBackend::watch_release`] wakes waiters when a lock is released (and, where the
    /// store can tell, when its holder's liveness record lapses), so that they need not poll.
    pub release_events: bool,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            fencing: false,
            ttl_granularity: Duration::from_millis(1),
            shared_across_processes: true,
            atomic_take_over: false,
            max_key_len: None,
            failover_time: None,
            checked_acquire: false,
            release_events: false,
        }
    }
}

/// A store for lock and liveness records.
///
/// Every method is one round trip to the store where the store allows it, and each
/// compare-and-set method (`acquire`, `extend`, `release`, `take_over`) must be atomic: two
/// concurrent callers never both succeed. TTLs are decided by the store's clock, never by the
/// caller's. Records are the JSON of [`LockData`] and [`ProcessData`]; a stored value that is
/// not one is an [`ErrorKind::Corrupt`](crate::ErrorKind::Corrupt) error, never a panic.
/// Errors that a retry may cure (connection loss, timeouts, failovers) are
/// [retryable](crate::Error::is_retryable).
///
/// [`MemoryBackend`](crate::MemoryBackend) is the model implementation; the
/// `locker-conformance` crate checks any implementation against the same suite.
#[async_trait]
pub trait LockBackend: Send + Sync + fmt::Debug + 'static {
    /// What this backend supports.
    fn capabilities(&self) -> Capabilities;

    /// Stores `data` under `key` for `ttl`, only if no lock is stored there.
    ///
    /// With fencing, the stored record gets a token strictly greater than any given for `key`
    /// before, and the returned [`AcquireOutcome::Acquired`] carries it.
    async fn acquire(&self, key: &str, data: &LockData, ttl: Duration) -> Result<AcquireOutcome>;

    /// [`acquire`](LockBackend::acquire), and when the key is held, decides in the same call
    /// whether the holder's process is alive (its liveness record is there) and, if it is not,
    /// replaces its lock as [`take_over`](LockBackend::take_over) would: the decision a
    /// [`Locker`](crate::Locker) makes in up to three calls, made atomically in one.
    ///
    /// The default is `acquire` alone, answering [`AcquireDecision::Held`] for a held key (the
    /// locker then reads the holder's liveness record and takes over itself). Backends that
    /// override it say so with [`Capabilities::checked_acquire`]. A liveness record that is not
    /// a valid record counts as alive (the lock is not taken over).
    async fn acquire_checked(
        &self,
        key: &str,
        data: &LockData,
        ttl: Duration,
    ) -> Result<AcquireDecision> {
        self.acquire(key, data, ttl)
            .await
            .map(AcquireDecision::from)
    }

    /// Rewrites the lock under `key` with `data` and re-arms its TTL, only if the stored
    /// `ownerHash` equals `owner_hash`. The stored fencing token is kept.
    async fn extend(
        &self,
        key: &str,
        data: &LockData,
        ttl: Duration,
        owner_hash: &str,
    ) -> Result<ExtendOutcome>;

    /// Deletes the lock under `key`, only if the stored `ownerHash` equals `owner_hash`.
    async fn release(&self, key: &str, owner_hash: &str) -> Result<ReleaseOutcome>;

    /// Replaces the lock of a dead owner: if the stored `ownerHash` equals `dead_owner_hash`, or
    /// no lock is stored, stores `data` as [`acquire`](LockBackend::acquire) would.
    ///
    /// The default is [`release`](LockBackend::release) then `acquire`: two round trips, and
    /// correct because each step is atomic. Backends that can do it in one call should, and say
    /// so with [`Capabilities::atomic_take_over`].
    async fn take_over(
        &self,
        key: &str,
        data: &LockData,
        ttl: Duration,
        dead_owner_hash: &str,
    ) -> Result<AcquireOutcome> {
        match self.release(key, dead_owner_hash).await? {
            ReleaseOutcome::Held(holder) => Ok(AcquireOutcome::Held(holder)),
            ReleaseOutcome::Released | ReleaseOutcome::NoKey => self.acquire(key, data, ttl).await,
        }
    }

    /// Writes this process's liveness record for `ttl` (one write, unconditional).
    async fn ping(&self, process_hash: &str, data: &ProcessData, ttl: Duration) -> Result<()>;

    /// Reads the lock under `key`, `None` when there is none.
    async fn read(&self, key: &str) -> Result<Option<LockData>>;

    /// Reads the locks under `keys`, in order: what [`read`](LockBackend::read) answers for each,
    /// in as few round trips as the store allows (one per connection, or per Redis Cluster
    /// slot). A [`Locker`](crate::Locker) rechecks all the locks it holds that are due with one
    /// call.
    ///
    /// The outer error is the call's (the store did not answer); an inner one is a key's own
    /// (its record is corrupt). The default reads the keys one after the other.
    async fn read_many(&self, keys: &[&str]) -> Result<Vec<Result<Option<LockData>>>> {
        read_each(self, keys).await
    }

    /// Reads a process's liveness record, `None` when the process is not known to be alive.
    async fn read_process(&self, process_hash: &str) -> Result<Option<ProcessData>>;

    /// Deletes a process's liveness record, so that its locks can be taken over at once.
    async fn forget_process(&self, process_hash: &str) -> Result<()>;

    /// Subscribes to wake-ups about `key`: the returned watch fires after the lock under `key`
    /// was released (by any process that publishes its releases), and may fire for other
    /// reasons (a wake-up is a hint: the waiter then tries to acquire again). It must be
    /// subscribed when this returns, so that a release after the return is not missed.
    ///
    /// `None` (the default) means the backend cannot notify: waiters poll. Backends that
    /// notify say so with [`Capabilities::release_events`]; a [`WatchHub`](crate::WatchHub)
    /// does the bookkeeping of watchers per key.
    async fn watch_release(&self, key: &str) -> Result<Option<crate::ReleaseWatch>> {
        let _ = key;
        Ok(None)
    }

    /// How long a process's liveness record has left: `Some(Duration::ZERO)` when there is
    /// none, `None` (the default) when the backend cannot tell. A waiter uses it to try again
    /// when a holder that stopped reporting would be found dead, rather than at a blind
    /// interval.
    async fn liveness_left(&self, process_hash: &str) -> Result<Option<Duration>> {
        let _ = process_hash;
        Ok(None)
    }
}

/// [`LockBackend::read_many`] as one [`read`](LockBackend::read) per key, in order: the
/// trait's default, for wrappers that want it too. A corrupt record is that key's own error;
/// any other error ends the call.
///
/// # Cancel safety
/// Cancel safe if the backend's `read` is: it only reads, so a dropped call changes nothing.
pub async fn read_each<B: LockBackend + ?Sized>(
    backend: &B,
    keys: &[&str],
) -> Result<Vec<Result<Option<LockData>>>> {
    let mut records = Vec::with_capacity(keys.len());
    for key in keys {
        records.push(match backend.read(key).await {
            Err(e) if e.kind() == crate::ErrorKind::Corrupt => Err(e),
            other => Ok(other?),
        });
    }
    Ok(records)
}

/// Opens backend connections.
///
/// The locker opens two: one for jobs on the caller's runtime, and one for the liveness
/// reporter on its own thread and runtime, so that a starved caller runtime cannot stop liveness
/// reports. `connect` is therefore called on different tokio runtimes, and a connection must not
/// depend on the runtime that made another one.
#[async_trait]
pub trait BackendFactory: Send + Sync + 'static {
    /// Opens a new connection (or a new handle to a shared in-process store): the one of the
    /// jobs, on the caller's runtime.
    async fn connect(&self) -> Result<Arc<dyn LockBackend>>;

    /// Opens the liveness reporter's connection, on the reporter's own thread and runtime.
    ///
    /// The default is [`connect`](Self::connect). A factory whose `connect` hands out an
    /// application's own client or pool (bound to the application's runtime, and busy with its
    /// queries) opens a new one here, from the same configuration: the reporter must not wait
    /// on a runtime or a pool that the jobs can starve.
    async fn connect_reporter(&self) -> Result<Arc<dyn LockBackend>> {
        self.connect().await
    }
}

/// A [`BackendFactory`] made of an async closure; see [`factory_fn`].
pub struct FnFactory<F>(F);

/// Makes a [`BackendFactory`] from a closure that returns a future of a backend.
///
/// ```
/// # extern crate locker_core as locker;
/// use std::sync::Arc;
/// use locker::{factory_fn, LockBackend, MemoryBackend};
///
/// let store = MemoryBackend::new();
/// let factory = factory_fn(move || {
///     let store = store.clone();
///     async move { Ok(Arc::new(store) as Arc<dyn LockBackend>) }
/// });
/// # let _ = factory;
/// ```
pub fn factory_fn<F, Fut>(f: F) -> FnFactory<F>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Arc<dyn LockBackend>>> + Send + 'static,
{
    FnFactory(f)
}

#[async_trait]
impl<F, Fut> BackendFactory for FnFactory<F>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Arc<dyn LockBackend>>> + Send + 'static,
{
    async fn connect(&self) -> Result<Arc<dyn LockBackend>> {
        (self.0)().await
    }
}

#[async_trait]
impl<T: BackendFactory + ?Sized> BackendFactory for Arc<T> {
    async fn connect(&self) -> Result<Arc<dyn LockBackend>> {
        (**self).connect().await
    }

    async fn connect_reporter(&self) -> Result<Arc<dyn LockBackend>> {
        (**self).connect_reporter().await
    }
}
