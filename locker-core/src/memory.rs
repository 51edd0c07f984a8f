//! [`MemoryBackend`]: an in-process store, always compiled, and the model for custom backends.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::backend::{
    AcquireOutcome, BackendFactory, Capabilities, ExtendOutcome, LockBackend, ReleaseOutcome,
};
use crate::error::{Error, Result};
use crate::record::{LockData, ProcessData};
use crate::wait::{ReleaseWatch, WatchHub};

/// An in-process lock store with TTLs and fencing tokens.
///
/// Clones share one store, and the backend is its own [`BackendFactory`] (each `connect`
/// returns another handle to the same store), so several [`Locker`](crate::Locker)s in one
/// process can contend on it: this is what the unit tests and examples use.
///
/// It is written the way a real backend should be, and is the model for custom ones:
/// records are kept as the JSON a server would store and parsed on every read (so a corrupt
/// value gives [`ErrorKind::Corrupt`](crate::ErrorKind::Corrupt)), each compare-and-set runs
/// under one lock (the equivalent of a server-side script or a transaction), expiry is decided
/// by the store's clock, and fencing counters outlive the locks they number.
///
/// For tests it can also pretend to be unreachable ([`set_unavailable`](Self::set_unavailable))
/// or slow ([`set_latency`](Self::set_latency)), hold a raw value ([`put_raw`](Self::put_raw)) and count calls ([`calls`](Self::calls)).
#[derive(Clone, Default)]
pub struct MemoryBackend {
    inner: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    unavailable: AtomicBool,
    latency_nanos: AtomicU64,
    calls: Calls,
    /// Wakes waiters of a released key (in-process: every handle shares it).
    hub: WatchHub,
    /// While `true`, releases wake nobody (a lost notification, for tests).
    mute: AtomicBool,
}

#[derive(Default)]
struct State {
    locks: HashMap<String, Entry>,
    processes: HashMap<String, Entry>,
    /// The last fencing token given per key; never reset, so tokens only grow.
    fencing: HashMap<String, u64>,
}

struct Entry {
    json: String,
    expires: Instant,
}

#[derive(Default)]
struct Calls {
    acquire: AtomicU64,
    extend: AtomicU64,
    release: AtomicU64,
    take_over: AtomicU64,
    ping: AtomicU64,
    read: AtomicU64,
    read_many: AtomicU64,
    read_process: AtomicU64,
    forget_process: AtomicU64,
    watch_release: AtomicU64,
    liveness_left: AtomicU64,
}

/// How many times each [`MemoryBackend`] operation was called, over all handles.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CallCounts {
    /// [`LockBackend::acquire`] calls.
    pub acquire: u64,
    /// [`LockBackend::extend`] calls.
    pub extend: u64,
    /// [`LockBackend::release`] calls.
    pub release: u64,
    /// [`LockBackend::take_over`] calls.
    pub take_over: u64,
    /// [`LockBackend::ping`] calls.
    pub ping: u64,
    /// [`LockBackend::read`] calls.
    pub read: u64,
    /// [`LockBackend::read_many`] calls (one per call, whatever the number of keys).
    pub read_many: u64,
    /// [`LockBackend::read_process`] calls.
    pub read_process: u64,
    /// [`LockBackend::forget_process`] calls.
    pub forget_process: u64,
    /// [`LockBackend::watch_release`] calls.
    pub watch_release: u64,
    /// [`LockBackend::liveness_left`] calls.
    pub liveness_left: u64,
}

impl CallCounts {
    /// Calls that touch lock records (everything but liveness pings and process reads).
    pub fn lock_calls(&self) -> u64 {
        self.acquire + self.extend + self.release + self.take_over + self.read + self.read_many
    }
}

impl MemoryBackend {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// While `true`, every call fails with a retryable
    /// [`ErrorKind::Unavailable`](crate::ErrorKind::Unavailable) error, as a backend whose server
    /// is down would.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.inner.unavailable.store(unavailable, Ordering::SeqCst);
    }

    /// Delays every answer by `latency`, after the operation took effect: a slow network, or
    /// (when the caller gives up first) an answer lost after the write landed.
    pub fn set_latency(&self, latency: Duration) {
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.inner.latency_nanos.store(nanos, Ordering::SeqCst);
    }

    async fn respond<T>(&self, result: Result<T>) -> Result<T> {
        let nanos = self.inner.latency_nanos.load(Ordering::SeqCst);
        if nanos > 0 {
            tokio::time::sleep(Duration::from_nanos(nanos)).await;
        }
        result
    }

    /// While `true`, releases wake no waiter, as when a notification is lost or the lock was
    /// released by a process that publishes nothing: waiters must find the lock free by
    /// polling.
    pub fn set_notifications_lost(&self, lost: bool) {
        self.inner.mute.store(lost, Ordering::SeqCst);
    }

    /// Stores a raw value under a lock key, as a foreign writer could (for corruption tests).
    pub fn put_raw(&self, key: &str, raw: &str, ttl: Duration) {
        let mut state = self.state();
        state.locks.insert(
            key.to_owned(),
            Entry {
                json: raw.to_owned(),
                expires: expiry_or_far(ttl),
            },
        );
    }

    /// The raw value stored under a lock key, if a live one is there.
    pub fn get_raw(&self, key: &str) -> Option<String> {
        let mut state = self.state();
        live(&mut state.locks, key, Instant::now()).map(str::to_owned)
    }

    /// Forgets every lock and liveness record, as a restarted server without persistence
    /// would. Fencing counters are kept, as a store that fences must keep them.
    pub fn clear(&self) {
        let mut state = self.state();
        state.locks.clear();
        state.processes.clear();
    }

    /// Stores a raw value as a process's liveness record (for corruption tests).
    pub fn put_raw_process(&self, process_hash: &str, raw: &str, ttl: Duration) {
        let mut state = self.state();
        state.processes.insert(
            process_hash.to_owned(),
            Entry {
                json: raw.to_owned(),
                expires: expiry_or_far(ttl),
            },
        );
    }

    /// How many times each operation was called so far.
    pub fn calls(&self) -> CallCounts {
        let c = &self.inner.calls;
        let get = |a: &AtomicU64| a.load(Ordering::SeqCst);
        CallCounts {
            acquire: get(&c.acquire),
            extend: get(&c.extend),
            release: get(&c.release),
            take_over: get(&c.take_over),
            ping: get(&c.ping),
            read: get(&c.read),
            read_many: get(&c.read_many),
            read_process: get(&c.read_process),
            forget_process: get(&c.forget_process),
            watch_release: get(&c.watch_release),
            liveness_left: get(&c.liveness_left),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-written map entry (every update is
        // a single insert or remove), so a poisoned lock is safe to keep using.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn enter(&self, counter: fn(&Calls) -> &AtomicU64) -> Result<MutexGuard<'_, State>> {
        counter(&self.inner.calls).fetch_add(1, Ordering::SeqCst);
        if self.inner.unavailable.load(Ordering::SeqCst) {
            return Err(Error::unavailable("memory backend set unavailable"));
        }
        Ok(self.state())
    }
}

impl State {
    /// The live lock under `key`, parsed; expired entries are dropped on the way.
    fn lock(&mut self, key: &str, now: Instant) -> Result<Option<LockData>> {
        match live(&mut self.locks, key, now) {
            Some(json) => LockData::from_json(json)
                .map(Some)
                .map_err(|e| e.with_key(key)),
            None => Ok(None),
        }
    }

    fn store_new(&mut self, key: &str, data: &LockData, expires: Instant) -> LockData {
        let token = self.fencing.entry(key.to_owned()).or_insert(0);
        *token += 1;
        let stored = LockData {
            fencing_token: Some(*token),
            ..data.clone()
        };
        self.locks.insert(
            key.to_owned(),
            Entry {
                json: stored.to_json(),
                expires,
            },
        );
        stored
    }
}

fn live<'a>(map: &'a mut HashMap<String, Entry>, key: &str, now: Instant) -> Option<&'a str> {
    if map.get(key).is_some_and(|e| e.expires <= now) {
        map.remove(key);
    }
    map.get(key).map(|e| e.json.as_str())
}

/// When a record written now with `ttl` expires; zero and overflowing TTLs are refused.
fn expiry(now: Instant, ttl: Duration) -> Result<Instant> {
    if ttl.is_zero() {
        return Err(Error::invalid_input("TTL must be greater than zero"));
    }
    now.checked_add(ttl)
        .ok_or_else(|| Error::invalid_input(format!("TTL of {ttl:?} is too long")))
}

/// Like [`expiry`], for test hooks that cannot fail: a year for what does not fit.
fn expiry_or_far(ttl: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(ttl)
        .or_else(|| now.checked_add(Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(now)
}

/// The operations themselves, each atomic under the store's lock.
impl MemoryBackend {
    fn acquire_now(&self, key: &str, data: &LockData, ttl: Duration) -> Result<AcquireOutcome> {
        let mut state = self.enter(|c| &c.acquire)?;
        let now = Instant::now();
        let expires = expiry(now, ttl)?;
        if let Some(holder) = state.lock(key, now)? {
            return Ok(AcquireOutcome::Held(holder));
        }
        Ok(AcquireOutcome::Acquired(
            state.store_new(key, data, expires),
        ))
    }

    fn extend_now(
        &self,
        key: &str,
        data: &LockData,
        ttl: Duration,
        owner_hash: &str,
    ) -> Result<ExtendOutcome> {
        let mut state = self.enter(|c| &c.extend)?;
        let now = Instant::now();
        let expires = expiry(now, ttl)?;
        let Some(current) = state.lock(key, now)? else {
            return Ok(ExtendOutcome::NoKey);
        };
        if current.owner_hash != owner_hash {
            return Ok(ExtendOutcome::Held(current));
        }
        let stored = LockData {
            fencing_token: current.fencing_token,
            ..data.clone()
        };
        state.locks.insert(
            key.to_owned(),
            Entry {
                json: stored.to_json(),
                expires,
            },
        );
        Ok(ExtendOutcome::Extended(stored))
    }

    fn release_now(&self, key: &str, owner_hash: &str) -> Result<ReleaseOutcome> {
        let mut state = self.enter(|c| &c.release)?;
        let Some(current) = state.lock(key, Instant::now())? else {
            return Ok(ReleaseOutcome::NoKey);
        };
        if current.owner_hash != owner_hash {
            return Ok(ReleaseOutcome::Held(current));
        }
        state.locks.remove(key);
        drop(state);
        if !self.inner.mute.load(Ordering::SeqCst) {
            self.inner.hub.notify(key);
        }
        Ok(ReleaseOutcome::Released)
    }

    fn take_over_now(
        &self,
        key: &str,
        data: &LockData,
        ttl: Duration,
        dead_owner_hash: &str,
    ) -> Result<AcquireOutcome> {
        let mut state = self.enter(|c| &c.take_over)?;
        let now = Instant::now();
        let expires = expiry(now, ttl)?;
        if let Some(current) = state.lock(key, now)? {
            if current.owner_hash != dead_owner_hash {
                return Ok(AcquireOutcome::Held(current));
            }
        }
        Ok(AcquireOutcome::Acquired(
            state.store_new(key, data, expires),
        ))
    }

    fn ping_now(&self, process_hash: &str, data: &ProcessData, ttl: Duration) -> Result<()> {
        let mut state = self.enter(|c| &c.ping)?;
        let expires = expiry(Instant::now(), ttl)?;
        state.processes.insert(
            process_hash.to_owned(),
            Entry {
                json: data.to_json(),
                expires,
            },
        );
        Ok(())
    }

    fn read_now(&self, key: &str) -> Result<Option<LockData>> {
        let mut state = self.enter(|c| &c.read)?;
        state.lock(key, Instant::now())
    }

    fn read_many_now(&self, keys: &[&str]) -> Result<Vec<Result<Option<LockData>>>> {
        let mut state = self.enter(|c| &c.read_many)?;
        let now = Instant::now();
        Ok(keys.iter().map(|key| state.lock(key, now)).collect())
    }

    fn read_process_now(&self, process_hash: &str) -> Result<Option<ProcessData>> {
        let mut state = self.enter(|c| &c.read_process)?;
        match live(&mut state.processes, process_hash, Instant::now()) {
            Some(json) => ProcessData::from_json(json).map(Some),
            None => Ok(None),
        }
    }

    fn liveness_left_now(&self, process_hash: &str) -> Result<Option<Duration>> {
        let mut state = self.enter(|c| &c.liveness_left)?;
        let now = Instant::now();
        live(&mut state.processes, process_hash, now);
        Ok(Some(
            state
                .processes
                .get(process_hash)
                .map_or(Duration::ZERO, |e| e.expires.saturating_duration_since(now)),
        ))
    }

    fn forget_process_now(&self, process_hash: &str) -> Result<()> {
        let mut state = self.enter(|c| &c.forget_process)?;
        state.processes.remove(process_hash);
        Ok(())
    }
}

#[async_trait]
impl LockBackend for MemoryBackend {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            fencing: true,
            shared_across_processes: false,
            atomic_take_over: true,
            release_events: true,
            ..Capabilities::default()
        }
    }

    async fn acquire(&self, key: &str, data: &LockData, ttl: Duration) -> Result<AcquireOutcome> {
        self.respond(self.acquire_now(key, data, ttl)).await
    }

    async fn extend(
        &self,
        key: &str,
        data: &LockData,
        ttl: Duration,
        owner_hash: &str,
    ) -> Result<ExtendOutcome> {
        self.respond(self.extend_now(key, data, ttl, owner_hash))
            .await
    }

    async fn release(&self, key: &str, owner_hash: &str) -> Result<ReleaseOutcome> {
        self.respond(self.release_now(key, owner_hash)).await
    }

    async fn take_over(
        &self,
        key: &str,
        data: &LockData,
        ttl: Duration,
        dead_owner_hash: &str,
    ) -> Result<AcquireOutcome> {
        self.respond(self.take_over_now(key, data, ttl, dead_owner_hash))
            .await
    }

    async fn ping(&self, process_hash: &str, data: &ProcessData, ttl: Duration) -> Result<()> {
        self.respond(self.ping_now(process_hash, data, ttl)).await
    }

    async fn read(&self, key: &str) -> Result<Option<LockData>> {
        self.respond(self.read_now(key)).await
    }

    async fn read_many(&self, keys: &[&str]) -> Result<Vec<Result<Option<LockData>>>> {
        self.respond(self.read_many_now(keys)).await
    }

    async fn read_process(&self, process_hash: &str) -> Result<Option<ProcessData>> {
        self.respond(self.read_process_now(process_hash)).await
    }

    async fn forget_process(&self, process_hash: &str) -> Result<()> {
        self.respond(self.forget_process_now(process_hash)).await
    }

    async fn watch_release(&self, key: &str) -> Result<Option<ReleaseWatch>> {
        let watch = self
            .enter(|c| &c.watch_release)
            .map(|_| self.inner.hub.watch(key).0);
        self.respond(watch.map(Some)).await
    }

    async fn liveness_left(&self, process_hash: &str) -> Result<Option<Duration>> {
        self.respond(self.liveness_left_now(process_hash)).await
    }
}

#[async_trait]
impl BackendFactory for MemoryBackend {
    async fn connect(&self) -> Result<Arc<dyn LockBackend>> {
        Ok(Arc::new(self.clone()))
    }
}

impl fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state();
        f.debug_struct("MemoryBackend")
            .field("locks", &state.locks.len())
            .field("processes", &state.processes.len())
            .field(
                "unavailable",
                &self.inner.unavailable.load(Ordering::SeqCst),
            )
            .finish()
    }
}
