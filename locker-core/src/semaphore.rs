//! [`Semaphore`]: at most `permits` holders of a key at once, each permit a lock of its own.
//!
//! A semaphore of `N` permits on key `K` is `N` ordinary locks, on the slot keys `K#permit0`
//! … `K#permit{N-1}`. A permit is one of them, so it has every property of a lock, on every
//! backend, with no backend code: the liveness takeover of a dead holder's permit, seppuku,
//! a fencing token (per slot), release events for waiters. Each slot record also carries
//! `"permits": N`, so that callers that disagree on `N` find out (see [`Locker::semaphore`]).

use std::fmt;
use std::future::Future;
use std::sync::atomic::Ordering;

use crate::error::{Error, Result};
use crate::hash::validate_key;
use crate::heartbeat::Heartbeat;
use crate::locker::{LockAttempt, LockGuard, LockRequest, Locker, Target};
use crate::record::LockData;
use crate::wait::Wait;

/// The record field that holds a semaphore's permit count.
pub(crate) const PERMITS_FIELD: &str = "permits";

/// The largest permit count of one semaphore: a try on a full semaphore costs one store call
/// per permit, so large counts belong in a different design (a counter, not slots).
pub const MAX_PERMITS: u32 = 1024;

/// The slot key of permit `slot` of the semaphore on `key`.
pub fn permit_key(key: &str, slot: u32) -> String {
    format!("{key}#permit{slot}")
}

/// What [`Semaphore::try_acquire`] got.
#[derive(Debug)]
#[must_use]
pub enum PermitAttempt {
    /// A permit is ours until the guard is released or dropped; its key is the permit's slot
    /// key.
    Acquired(LockGuard),
    /// Every permit was held by a live process when it was tried: their records, one per
    /// permit. The slots are tried one after the other, so under churn a permit may have been
    /// freed meanwhile (even while others were taken): a waiter
    /// ([`Semaphore::acquire_wait`]) tries again when one is released.
    Full(Vec<LockData>),
}

/// A counting semaphore: at most [`permits`](Self::permits) holders at once across every
/// process that uses the same key and count. Made by [`Locker::semaphore`].
///
/// Each permit is a [`LockGuard`] with everything a lock has: a [`Heartbeat`] that fails
/// once the permit is lost, takeover of a dead holder's permit within about a liveness TTL,
/// and a fencing token (strictly increasing per permit slot: pass the guard's
/// [`key`](LockGuard::key) along with it to the fenced resource).
///
/// # Examples
/// ```
/// # extern crate locker_core as locker;
/// use std::time::Duration;
/// use locker::{Locker, MemoryBackend, PermitAttempt, Wait};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), locker::Error> {
/// let locker = Locker::builder(MemoryBackend::new()).build()?;
/// let downloads = locker.semaphore("downloads", 2)?;
///
/// let first = downloads.acquire_wait(Wait::up_to(Duration::from_secs(5))).await?;
/// let second = downloads.acquire_wait(Wait::up_to(Duration::from_secs(5))).await?;
/// assert!(matches!(downloads.try_acquire().await?, PermitAttempt::Full(holders) if holders.len() == 2));
///
/// first.release().await?;
/// let third = downloads.acquire_wait(Wait::up_to(Duration::from_secs(5))).await?;
/// # third.release().await?;
/// # second.release().await?;
/// # locker.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Semaphore {
    locker: Locker,
    permits: Permits,
}

/// A semaphore's keys and count, as a waiter tries them.
#[derive(Debug, Clone)]
pub(crate) struct Permits {
    pub(crate) key: String,
    pub(crate) permits: u32,
    pub(crate) trace: Option<String>,
    pub(crate) slot_keys: Vec<String>,
    /// Its waiters' line in a locker, apart from the line of a lock on the same key (a lock
    /// key would have to start with `\0semaphore\0` to share it).
    pub(crate) line_key: String,
}

impl Locker {
    /// A counting semaphore on `key` with `permits` permits (see [`Semaphore`]).
    ///
    /// Every caller of one key must use the same count. Each permit's record says which count
    /// its holder used, and a caller that finds a permit held with another count gets an
    /// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) error naming both, rather
    /// than a permit. Until the two meet, at most the larger count hold permits at once. To
    /// change a count, move to a new key (during the move, both keys' permits may be held).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) for zero permits, more than
    /// [`MAX_PERMITS`], or a key (with its `#permit{N}` suffix) that is not a valid key.
    pub fn semaphore(&self, request: impl Into<LockRequest>, permits: u32) -> Result<Semaphore> {
        let request = request.into();
        if permits == 0 || permits > MAX_PERMITS {
            return Err(Error::invalid_input(format!(
                "a semaphore needs 1 to {MAX_PERMITS} permits, not {permits}"
            )));
        }
        let key = request.key().to_owned();
        validate_key(&key)?;
        let slot_keys: Vec<String> = (0..permits).map(|slot| permit_key(&key, slot)).collect();
        for slot_key in &slot_keys {
            validate_key(slot_key)?;
        }
        Ok(Semaphore {
            locker: self.clone(),
            permits: Permits {
                line_key: format!("\0semaphore\0{key}"),
                key,
                permits,
                trace: request.trace,
                slot_keys,
            },
        })
    }
}

impl Permits {
    /// Tries every permit once, from a slot that differs per process and per call (so that
    /// callers spread over the slots): the first one free is taken.
    pub(crate) async fn try_once(
        &self,
        locker: &Locker,
    ) -> Result<std::result::Result<LockGuard, Vec<LockData>>> {
        let inner = &locker.inner;
        let spread = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let start = mix(fnv(locker.process_hash()).wrapping_add(spread)) % u64::from(self.permits);
        let mut holders = Vec::with_capacity(self.slot_keys.len());
        // A slot that fails with a retryable error (a busy row, a dropped connection) does not
        // stop the scan: another slot may be free. A permit the failed call may have stored is
        // released in the background, as for any acquire that returns no guard.
        let mut failed = None;
        for i in 0..u64::from(self.permits) {
            let slot = ((start + i) % u64::from(self.permits)) as usize;
            let request = LockRequest::permit(
                self.slot_keys[slot].clone(),
                self.trace.clone(),
                self.permits,
            );
            match locker.acquire(request).await {
                Ok(LockAttempt::Acquired(guard)) => return Ok(Ok(guard)),
                Ok(LockAttempt::Held(holder)) => {
                    self.check_count(&holder)?;
                    holders.push(holder);
                }
                Err(e) if e.is_retryable() => failed = failed.or(Some(e)),
                Err(e) => return Err(e),
            }
        }
        // Not every slot answered: the semaphore is not known to be full.
        match failed {
            Some(e) => Err(e),
            None => Ok(Err(holders)),
        }
    }

    /// Fails when `holder` took its permit with another count than ours.
    fn check_count(&self, holder: &LockData) -> Result<()> {
        let Some(theirs) = holder.extra.get(PERMITS_FIELD) else {
            return Ok(());
        };
        if theirs.as_u64() == Some(u64::from(self.permits)) {
            return Ok(());
        }
        Err(Error::invalid_input(format!(
            "the semaphore {:?} is used with {theirs} permits by {} and with {} here: every \
             caller of a key must use the same count (move to a new key to change it)",
            self.key, holder.owner_hash, self.permits
        ))
        .with_key(self.key.clone())
        .with_holder(holder.clone()))
    }
}

impl Semaphore {
    /// The semaphore's key (its permits are on [`permit_keys`](Self::permit_keys)).
    pub fn key(&self) -> &str {
        &self.permits.key
    }

    /// How many holders it allows at once.
    pub fn permits(&self) -> u32 {
        self.permits.permits
    }

    /// The lock keys of its permits, one per slot.
    pub fn permit_keys(&self) -> &[String] {
        &self.permits.slot_keys
    }

    /// Takes a free permit if there is one, without waiting: one store call per permit tried
    /// (each one round trip on backends that decide an acquire in one).
    ///
    /// # Errors
    /// Every error of [`Locker::acquire`] (a retryable one only when no slot was free and
    /// not every slot answered), and
    /// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) when a holder used another
    /// permit count.
    ///
    /// # Cancel safety
    /// As [`Locker::acquire`]: a permit stored by a call in flight when the future is dropped
    /// is released in the background.
    pub async fn try_acquire(&self) -> Result<PermitAttempt> {
        Ok(match self.permits.try_once(&self.locker).await? {
            Ok(guard) => PermitAttempt::Acquired(guard),
            Err(holders) => PermitAttempt::Full(holders),
        })
    }

    /// Takes a permit, waiting while all are held, as `wait` says: woken when any permit is
    /// released (on backends with release events), when a holder would be found dead, and
    /// otherwise by a poll, as [`Locker::acquire_wait`] is.
    ///
    /// # Errors
    /// [`ErrorKind::MutexTimeout`](crate::ErrorKind::MutexTimeout), with
    /// [`Error::holder`] naming one holder, when the limit passes; the errors of
    /// [`try_acquire`](Self::try_acquire) at the first try that meets them.
    ///
    /// # Cancel safety
    /// As [`Locker::acquire_wait`]: cancel-safe while it waits; a permit stored by a call in
    /// flight is released in the background.
    pub async fn acquire_wait(&self, wait: Wait) -> Result<LockGuard> {
        self.locker
            .wait_for(Target::Permits(self.permits.clone()), wait)
            .await
    }

    /// Runs `job` with a permit, waiting for one as `wait` says, and releases the permit when
    /// the job ends, as [`Locker::mutex`] does for a lock.
    ///
    /// # Errors
    /// Every error of [`acquire_wait`](Self::acquire_wait).
    ///
    /// # Cancel safety
    /// Dropping the future while it waits leaves nothing behind; once the job runs, it drops
    /// the job and releases the permit in the background.
    pub async fn run<F, Fut, T>(&self, wait: Wait, job: F) -> Result<T>
    where
        F: FnOnce(Heartbeat) -> Fut,
        Fut: Future<Output = T>,
    {
        let guard = self.acquire_wait(wait).await?;
        Ok(guard.run(job).await)
    }

    /// The records of the permits held by live processes now, in slot order: one read of
    /// every permit ([`LockBackend::read_many`](crate::LockBackend::read_many)), then one read
    /// per holding process's liveness record. Stale as soon as it returns: for dashboards.
    ///
    /// # Errors
    /// Backend errors, and a permit's record that is corrupt.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads, so a dropped call changes nothing.
    pub async fn holders(&self) -> Result<Vec<LockData>> {
        let backend = self.locker.inner.backend().await?;
        let keys: Vec<&str> = self.permits.slot_keys.iter().map(String::as_str).collect();
        let mut alive: Vec<(String, bool)> = Vec::new();
        let mut holders = Vec::new();
        for record in backend.read_many(&keys).await? {
            let Some(holder) = record? else { continue };
            let known = alive.iter().find(|(p, _)| *p == holder.process_hash);
            let live = match known {
                Some(&(_, live)) => live,
                None => {
                    let live = backend.read_process(&holder.process_hash).await?.is_some();
                    alive.push((holder.process_hash.clone(), live));
                    live
                }
            };
            if live {
                holders.push(holder);
            }
        }
        Ok(holders)
    }
}

impl fmt::Debug for Semaphore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Semaphore")
            .field("key", &self.permits.key)
            .field("permits", &self.permits.permits)
            .finish()
    }
}

/// splitmix64's finalizer: every bit of the result depends on every bit of `x`, so that
/// consecutive counters (which the locker also draws for its locks) give unrelated slots.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// FNV-1a of a string: spreads processes over the first slot they try.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
