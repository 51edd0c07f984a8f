//! [`Election`]: exactly one leader of a key, and everyone can see who it is.
//!
//! Leadership is the lock on the election's key: campaigning is waiting for the lock,
//! resigning is releasing it, and a leader whose process dies is replaced within about a
//! liveness TTL by the next campaigner, as any lock holder is. So an election works on every
//! backend with no backend code, and a leader that loses its leadership (taken over after a
//! freeze) stops through the same seppuku path as a job: its heartbeat fails.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use crate::backend::ReleaseOutcome;
use crate::error::{Error, Result};
use crate::hash::validate_key;
use crate::heartbeat::Heartbeat;
use crate::locker::{LockGuard, LockRequest, Locker, LIVENESS_MARGIN};
use crate::record::LockData;
use crate::wait::{ReleaseWatch, Wait};

/// A leader election on one key. Made by [`Locker::election`].
///
/// # Examples
/// ```
/// # extern crate locker_core as locker;
/// use std::time::Duration;
/// use locker::{Locker, LockRequest, MemoryBackend, Wait};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), locker::Error> {
/// let store = MemoryBackend::new();
/// let (a, b) = (Locker::builder(store.clone()).build()?, Locker::builder(store).build()?);
///
/// // The trace is what a leader advertises (here, where it serves).
/// let election = a.election(LockRequest::new("scheduler").trace("10.0.0.7:8080"))?;
/// let leadership = election.campaign(Wait::up_to(Duration::from_secs(5))).await?;
///
/// let observer = b.election("scheduler")?;
/// let leader = observer.leader().await?.expect("a leader");
/// assert_eq!(leader.trace.as_deref(), Some("10.0.0.7:8080"));
/// assert_eq!(leader.fencing_token, leadership.term());
///
/// let mut watch = observer.observe();
/// assert_eq!(watch.changed().await?.map(|l| l.owner_hash), Some(leadership.owner_hash().to_owned()));
/// leadership.resign().await?;
/// assert_eq!(watch.changed().await?, None);
/// # a.shutdown().await;
/// # b.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Election {
    locker: Locker,
    request: LockRequest,
}

impl Locker {
    /// A leader election on `request`'s key. Its trace, if any, is what this process
    /// advertises while it leads (an address, a name): observers read it from the leader's
    /// record.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) for an invalid key.
    pub fn election(&self, request: impl Into<LockRequest>) -> Result<Election> {
        let request = request.into();
        validate_key(request.key())?;
        Ok(Election {
            locker: self.clone(),
            request,
        })
    }
}

impl Election {
    /// The election's key.
    pub fn key(&self) -> &str {
        self.request.key()
    }

    /// Becomes the leader, waiting as `wait` says while another process leads: woken when
    /// the leader resigns (on backends with release events), when it would be found dead,
    /// and otherwise by a poll, as [`Locker::acquire_wait`] is. `Wait::up_to(Duration::ZERO)`
    /// makes one try.
    ///
    /// # Errors
    /// [`ErrorKind::MutexTimeout`](crate::ErrorKind::MutexTimeout), with [`Error::holder`]
    /// naming the leader, when the limit passes; every error of [`Locker::acquire_wait`]. A
    /// store error ends the campaign, as it ends any wait: to stay a candidate through store
    /// outages, campaign again after a [retryable](Error::is_retryable) one.
    ///
    /// # Cancel safety
    /// As [`Locker::acquire_wait`].
    pub async fn campaign(&self, wait: Wait) -> Result<Leadership> {
        let guard = self.locker.acquire_wait(self.request.clone(), wait).await?;
        Ok(Leadership { guard })
    }

    /// Campaigns, runs `job` as the leader, and resigns when the job ends (as
    /// [`Locker::mutex`] does). The job must beat its [`Heartbeat`] and stop when a beat
    /// fails: that is how a leader that lost its leadership stops.
    ///
    /// # Errors
    /// Every error of [`campaign`](Self::campaign).
    ///
    /// # Cancel safety
    /// As [`Locker::mutex`]: dropping the future while it campaigns is handled as for
    /// [`campaign`](Self::campaign); once the job runs, it drops the job and resigns in the
    /// background.
    pub async fn lead<F, Fut, T>(&self, wait: Wait, job: F) -> Result<T>
    where
        F: FnOnce(Heartbeat) -> Fut,
        Fut: Future<Output = T>,
    {
        let leadership = self.campaign(wait).await?;
        Ok(leadership.guard.run(job).await)
    }

    /// The current leader's record, `None` when nobody leads (or the leader's process is
    /// dead and not replaced yet). Stale as soon as it returns.
    ///
    /// # Errors
    /// Backend errors.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads, so a dropped call changes nothing.
    pub async fn leader(&self) -> Result<Option<LockData>> {
        self.locker.inspect(self.key()).await
    }

    /// A watch of who leads: [`LeaderWatch::changed`] answers the current leader first, then
    /// each change ([`LeaderWatch::into_stream`] makes it a `Stream`).
    pub fn observe(&self) -> LeaderWatch {
        LeaderWatch {
            locker: self.locker.clone(),
            key: self.key().to_owned(),
            last: None,
            store: None,
            can_watch: true,
            quiet: 0,
        }
    }
}

impl fmt::Debug for Election {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Election")
            .field("key", &self.request.key())
            .finish()
    }
}

/// This process's leadership: the election's lock. Dropping it resigns in the background;
/// [`resign`](Self::resign) resigns now.
#[must_use = "dropping the leadership resigns"]
#[derive(Debug)]
pub struct Leadership {
    guard: LockGuard,
}

impl Leadership {
    /// The leadership term: the lock's fencing token, strictly greater than every earlier
    /// term of this election, on backends with fencing (`None` on the others). Pass it to
    /// the systems the leader writes to, so that they refuse a deposed leader.
    pub fn term(&self) -> Option<u64> {
        self.guard.fencing_token()
    }

    /// A heartbeat to hand to the leader's work: it fails once the leadership is lost.
    pub fn heartbeat(&self) -> Heartbeat {
        self.guard.heartbeat()
    }

    /// Resolves with the error that ended the leadership (see [`Heartbeat::lost`]).
    ///
    /// # Cancel safety
    /// Cancel safe, as [`Heartbeat::lost`]: the future only watches; drop it, or call `lost`
    /// again, at any time.
    pub fn lost(&self) -> impl Future<Output = Error> + Send + 'static {
        self.guard.heartbeat().lost()
    }

    /// The election's key.
    pub fn key(&self) -> &str {
        self.guard.key()
    }

    /// This leadership's owner hash.
    pub fn owner_hash(&self) -> &str {
        self.guard.owner_hash()
    }

    /// The stored record, as last written by this leader.
    pub fn lock_data(&self) -> LockData {
        self.guard.lock_data()
    }

    /// Steps down: releases the lock, so that the next campaigner leads at once.
    ///
    /// # Errors
    /// As [`LockGuard::release`].
    ///
    /// # Cancel safety
    /// As [`LockGuard::release`]: the leadership ends once the future is polled or dropped
    /// (its heartbeat fails from then on). A future dropped before the release is done may or
    /// may not have deleted the lock; the release then goes on in the background, as for a
    /// dropped `Leadership`, and deletes the lock only if it is still ours.
    pub async fn resign(self) -> Result<ReleaseOutcome> {
        self.guard.release().await
    }

    /// The lock guard behind the leadership.
    pub fn into_guard(self) -> LockGuard {
        self.guard
    }
}

/// Who leads an election, as it changes. Made by [`Election::observe`].
pub struct LeaderWatch {
    locker: Locker,
    key: String,
    /// The owner hash last answered (`Some(None)`: "nobody"); `None` before the first answer.
    last: Option<Option<String>>,
    store: Option<ReleaseWatch>,
    can_watch: bool,
    /// Reads in a row that found no change while nobody leads, for the backoff.
    quiet: u32,
}

/// The first re-read after nobody was found leading: campaigners usually take over within
/// a few milliseconds of a resignation.
const FIRST_RECHECK: Duration = Duration::from_millis(10);

impl LeaderWatch {
    /// The current leader on the first call; then waits until the leader differs from the
    /// one last answered (another owner, or nobody) and answers it.
    ///
    /// A change is seen when the store says a lock was released (on backends with release
    /// events), when the leader's liveness record would expire (where the backend can tell,
    /// see [`LockBackend::liveness_left`](crate::LockBackend::liveness_left)), and otherwise by
    /// a read every [`recheck_every`](crate::LockerBuilder::recheck_every) (sooner after a
    /// leader is gone, when a successor is due). Leaders that come and go between two reads are not seen;
    /// their terms (fencing tokens) tell that some were missed.
    ///
    /// # Errors
    /// Backend errors; the watch can be used again after one.
    ///
    /// # Cancel safety
    /// Cancel safe: a dropped call answers nothing, and the next call compares with the
    /// last leader answered.
    pub async fn changed(&mut self) -> Result<Option<LockData>> {
        let inner = self.locker.inner.clone();
        let mut local = inner.local_releases.watch(&self.key).0;
        loop {
            let current = self.locker.inspect(&self.key).await?;
            let owner = current.as_ref().map(|l| l.owner_hash.clone());
            if self.last.as_ref() != Some(&owner) {
                self.last = Some(owner);
                self.quiet = 0;
                return Ok(current);
            }
            if self.store.is_none() && self.can_watch {
                let backend = inner.backend().await?;
                match backend.watch_release(&self.key).await? {
                    Some(watch) => {
                        self.store = Some(watch);
                        // A release between the read and the subscription would go unseen.
                        continue;
                    }
                    None => self.can_watch = false,
                }
            }
            let every = inner.options.recheck_every;
            let pause = match &current {
                // Read again when the leader would be found dead, if it stops reporting.
                Some(leader) => match inner
                    .backend()
                    .await?
                    .liveness_left(&leader.process_hash)
                    .await
                {
                    Ok(Some(left)) => every.min(left + LIVENESS_MARGIN),
                    _ => every,
                },
                // Nobody leads: a successor is likely soon.
                None => (FIRST_RECHECK * 2u32.saturating_pow(self.quiet.min(16))).min(every),
            };
            self.quiet = self.quiet.saturating_add(1);
            let store = &mut self.store;
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                alive = async {
                    match store.as_mut() {
                        Some(watch) => watch.released().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if alive {
                        self.quiet = 0;
                    } else {
                        self.store = None;
                    }
                }
                _ = local.released() => self.quiet = 0,
            }
        }
    }
}

impl LeaderWatch {
    /// The watch as a [`Stream`](futures::Stream) of [`changed`](Self::changed)'s answers:
    /// the current leader, then each change; it never ends by itself.
    pub fn into_stream(self) -> impl futures::Stream<Item = Result<Option<LockData>>> + Send {
        futures::stream::unfold(self, |mut watch| async move {
            let next = watch.changed().await;
            Some((next, watch))
        })
    }
}

impl fmt::Debug for LeaderWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaderWatch")
            .field("key", &self.key)
            .field("last", &self.last)
            .finish()
    }
}
