//! Waiting for a lock: how long and how to pace the retries ([`Wait`]), and how a backend wakes
//! waiters when a lock is released ([`ReleaseWatch`], made by a [`WatchHub`]).
//!
//! A wake-up is only a hint: a woken waiter runs the normal acquire again, so a lost or
//! spurious notification costs latency, never safety.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

/// How long [`Locker::acquire_wait`](crate::Locker::acquire_wait) and
/// [`Locker::mutex`](crate::Locker::mutex) wait for a lock someone else holds, and how they
/// pace their retries.
///
/// By default a waiter is woken by the store when the lock is released (on backends with
/// [`Capabilities::release_events`](crate::Capabilities::release_events)), tries again when the
/// holder's liveness record would expire (a dead holder's lock is then taken over), and else
/// polls with a jittered exponential backoff from 10 ms up to the locker's
/// [`recheck_every`](crate::LockerOptions::recheck_every). [`Wait::backoff`] replaces that
/// pacing (the Node library's `mutex` took such a delay function).
///
/// ```
/// # extern crate locker_core as locker;
/// use std::time::Duration;
/// use locker::Wait;
///
/// let short = Wait::up_to(Duration::from_secs(10));
/// let patient = Wait::forever().backoff(|attempt| Duration::from_millis(100 * u64::from(attempt + 1)));
/// assert_eq!(short.limit(), Some(Duration::from_secs(10)));
/// assert_eq!(patient.limit(), None);
/// ```
#[derive(Clone)]
pub struct Wait {
    limit: Option<Duration>,
    backoff: Option<Arc<dyn Fn(u32) -> Duration + Send + Sync>>,
}

impl Wait {
    /// Waits at most `limit` for the holder (zero: one try, no wait).
    pub fn up_to(limit: Duration) -> Wait {
        Wait {
            limit: Some(limit),
            backoff: None,
        }
    }

    /// Waits until the lock is acquired, an error occurs, or the future is dropped.
    pub fn forever() -> Wait {
        Wait {
            limit: None,
            backoff: None,
        }
    }

    /// Paces the retries with `delay(attempt)` (attempt 0 is the pause after the first try)
    /// instead of the default backoff. Wake-ups by the store still end a pause early, and the
    /// pause never runs past the wait's limit. A zero delay is taken as 1 ms.
    pub fn backoff(mut self, delay: impl Fn(u32) -> Duration + Send + Sync + 'static) -> Wait {
        self.backoff = Some(Arc::new(delay));
        self
    }

    /// The longest wait, `None` for [`Wait::forever`].
    pub fn limit(&self) -> Option<Duration> {
        self.limit
    }

    /// The pause after try `attempt`: the custom backoff, or the default one.
    pub(crate) fn pause(&self, attempt: u32, cap: Duration, events: bool) -> Duration {
        match &self.backoff {
            Some(delay) => delay(attempt).max(Duration::from_millis(1)),
            None => default_backoff(attempt, cap, events),
        }
    }

    pub(crate) fn has_custom_backoff(&self) -> bool {
        self.backoff.is_some()
    }
}

impl fmt::Debug for Wait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wait")
            .field("limit", &self.limit)
            .field("custom_backoff", &self.backoff.is_some())
            .finish()
    }
}

/// The first pause of a polling waiter.
const FIRST_PAUSE: Duration = Duration::from_millis(10);

/// The default pause after try `attempt`, between half and all of `10 ms × 2^attempt` capped
/// at `cap` (jittered, so that waiters that started together do not retry together). With
/// release events the poll is only a fallback (for a lost notification, or a lock released by
/// a process that publishes nothing): the cap at once.
pub(crate) fn default_backoff(attempt: u32, cap: Duration, events: bool) -> Duration {
    let cap = cap.max(FIRST_PAUSE);
    let full = if events {
        cap
    } else {
        FIRST_PAUSE
            .checked_mul(1u32 << attempt.min(20))
            .unwrap_or(cap)
            .min(cap)
    };
    full / 2 + full.mul_f64(jitter() / 2.0)
}

/// A number in `[0, 1)`, different at every call (not cryptographic).
fn jitter() -> f64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static SEED: std::sync::OnceLock<RandomState> = std::sync::OnceLock::new();
    let mut h = SEED.get_or_init(RandomState::new).build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// A subscription to wake-ups about one lock key, from
/// [`LockBackend::watch_release`](crate::LockBackend::watch_release).
///
/// Dropping it ends the subscription.
pub struct ReleaseWatch {
    rx: watch::Receiver<u64>,
    registration: Option<Registration>,
}

impl ReleaseWatch {
    /// A watch fed by a [`watch::Sender`]: every change of its value is a wake-up; the sender's
    /// drop ends the watch. For backends that do not use a [`WatchHub`].
    pub fn from_receiver(mut rx: watch::Receiver<u64>) -> ReleaseWatch {
        rx.mark_unchanged();
        ReleaseWatch {
            rx,
            registration: None,
        }
    }

    /// Waits for the next wake-up: `true` when one came (the lock may be free now), `false`
    /// when the watch ended (the backend's subscription is gone; the waiter then polls).
    ///
    /// # Cancel safety
    /// Cancel-safe: a wake-up that arrives while no call waits is kept for the next call.
    pub async fn released(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }
}

impl fmt::Debug for ReleaseWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReleaseWatch")
            .field("key", &self.registration.as_ref().map(|r| r.key.as_str()))
            .finish()
    }
}

struct Registration {
    hub: WatchHub,
    key: String,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let idle = {
            let mut keys = self.hub.keys();
            match keys.get_mut(&self.key) {
                Some(slot) => {
                    slot.watchers = slot.watchers.saturating_sub(1);
                    let idle = slot.watchers == 0;
                    if idle {
                        keys.remove(&self.key);
                        self.hub.inner.watched.store(keys.len(), Ordering::Release);
                    }
                    idle
                }
                None => false,
            }
        };
        if idle {
            if let Some(on_idle) = &self.hub.inner.on_idle {
                on_idle(&self.key);
            }
        }
    }
}

/// Wake-ups by key, shared by the waiters of one backend: a backend registers a
/// [`ReleaseWatch`] per waiter with [`watch`](WatchHub::watch), subscribes to the store for a
/// key when its first watcher comes, and calls [`notify`](WatchHub::notify) when the store
/// says the key was released. When the last watcher of a key goes, the hub calls the
/// `on_idle` function given to [`WatchHub::with_on_idle`] (to unsubscribe).
///
/// ```
/// # extern crate locker_core as locker;
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use locker::WatchHub;
///
/// let hub = WatchHub::new();
/// let (mut watch, first) = hub.watch("job");
/// assert!(first);
/// hub.notify("job");
/// assert!(watch.released().await);
/// # }
/// ```
#[derive(Clone, Default)]
pub struct WatchHub {
    inner: Arc<HubInner>,
}

/// What a hub calls when the last watcher of a key goes.
type OnIdle = Box<dyn Fn(&str) + Send + Sync>;

#[derive(Default)]
struct HubInner {
    keys: Mutex<HashMap<String, Slot>>,
    /// How many keys have watchers: a release with none (the common case) wakes nobody
    /// without taking the lock.
    watched: AtomicUsize,
    on_idle: Option<OnIdle>,
}

struct Slot {
    tx: watch::Sender<u64>,
    watchers: usize,
}

impl WatchHub {
    /// A hub with no watchers.
    pub fn new() -> WatchHub {
        WatchHub::default()
    }

    /// A hub that calls `on_idle(key)` when the last watcher of `key` is dropped.
    pub fn with_on_idle(on_idle: impl Fn(&str) + Send + Sync + 'static) -> WatchHub {
        WatchHub {
            inner: Arc::new(HubInner {
                keys: Mutex::default(),
                watched: AtomicUsize::new(0),
                on_idle: Some(Box::new(on_idle)),
            }),
        }
    }

    /// A new watcher of `key`, woken by every later [`notify`](Self::notify) of it; `true`
    /// when it is the key's only watcher (the backend should subscribe to the store).
    pub fn watch(&self, key: &str) -> (ReleaseWatch, bool) {
        let mut keys = self.keys();
        let (rx, first) = match keys.get_mut(key) {
            Some(slot) => {
                slot.watchers += 1;
                (slot.tx.subscribe(), false)
            }
            None => {
                let (tx, rx) = watch::channel(0);
                keys.insert(key.to_owned(), Slot { tx, watchers: 1 });
                self.inner.watched.store(keys.len(), Ordering::Release);
                (rx, true)
            }
        };
        let watch = ReleaseWatch {
            rx,
            registration: Some(Registration {
                hub: self.clone(),
                key: key.to_owned(),
            }),
        };
        (watch, first)
    }

    /// Wakes the watchers of `key` (nothing when it has none).
    pub fn notify(&self, key: &str) {
        // A watcher registered before this release's notify saw the count it set (both under
        // the map's lock, then this load): the release happened after its subscription.
        if self.inner.watched.load(Ordering::Acquire) == 0 {
            return;
        }
        if let Some(slot) = self.keys().get(key) {
            slot.tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Wakes every watcher: after the backend's subscription broke and was made again, a
    /// release may have gone unseen meanwhile.
    pub fn notify_all(&self) {
        for slot in self.keys().values() {
            slot.tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// The keys that have watchers now (to subscribe again after a reconnect).
    pub fn watched_keys(&self) -> Vec<String> {
        self.keys().keys().cloned().collect()
    }

    /// Whether `key` has watchers now.
    pub fn is_watched(&self, key: &str) -> bool {
        self.keys().contains_key(key)
    }

    fn keys(&self) -> MutexGuard<'_, HashMap<String, Slot>> {
        // Every update is one insert, remove or counter change: a poisoned map is consistent.
        self.inner
            .keys
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl fmt::Debug for WatchHub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WatchHub")
            .field("keys", &self.keys().len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn default_backoff_grows_with_jitter_up_to_the_cap() {
        let cap = Duration::from_secs(5);
        for attempt in 0..40 {
            let full = (FIRST_PAUSE * (1u32 << attempt.min(20))).min(cap);
            let p = default_backoff(attempt, cap, false);
            assert!(p >= full / 2 && p <= full, "attempt {attempt}: {p:?}");
        }
        let p = default_backoff(0, cap, true);
        assert!(p >= cap / 2 && p <= cap, "{p:?}");
        let samples: std::collections::HashSet<_> =
            (0..20).map(|_| default_backoff(3, cap, false)).collect();
        assert!(samples.len() > 1, "no jitter");
    }

    #[tokio::test]
    async fn hub_counts_watchers_and_calls_on_idle_after_the_last() {
        let idle = Arc::new(AtomicUsize::new(0));
        let hub = WatchHub::with_on_idle({
            let idle = idle.clone();
            move |key| {
                assert_eq!(key, "k");
                idle.fetch_add(1, Ordering::SeqCst);
            }
        });
        let (mut a, first_a) = hub.watch("k");
        let (mut b, first_b) = hub.watch("k");
        assert!(first_a && !first_b);
        hub.notify("other");
        hub.notify("k");
        assert!(a.released().await);
        assert!(b.released().await);
        drop(a);
        assert_eq!(idle.load(Ordering::SeqCst), 0);
        assert_eq!(hub.watched_keys(), vec!["k".to_owned()]);
        drop(b);
        assert_eq!(idle.load(Ordering::SeqCst), 1);
        assert!(hub.watched_keys().is_empty());
    }

    #[tokio::test]
    async fn a_watch_ends_when_its_sender_goes() {
        let (tx, rx) = watch::channel(0);
        let mut w = ReleaseWatch::from_receiver(rx);
        tx.send_modify(|n| *n += 1);
        assert!(w.released().await);
        drop(tx);
        assert!(!w.released().await);
    }
}
