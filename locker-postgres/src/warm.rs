//! Connections kept out of sqlx's pool between operations, so that an operation costs only its
//! own round trip.
//!
//! sqlx tests every connection that goes back to its pool (a `Sync` and its answer, from a task
//! it spawns), whatever happened on it, because a future dropped in the middle of a statement
//! leaves the connection with an answer half read. Here a connection whose operation completed
//! is put back in a list of our own instead, untested: its answer was read whole. One whose
//! operation failed or was cancelled goes back to sqlx's pool, which tests it (and closes it
//! if it is broken), with all the kept ones. A kept connection that sat idle for
//! [`PING_WHEN_IDLE_FOR`] is tested before use, as the pool tests its own.
//!
//! Kept connections still go back to sqlx's pool from time to time, so that its limits apply:
//! one unused for [`RETURN_WHEN_IDLE_FOR`] (found at the next operation), so that its
//! `idle_timeout` closes connections a quiet process does not need; one kept for
//! [`RETURN_WHEN_KEPT_FOR`], so that its `max_lifetime` replaces old ones.
//!
//! The list keeps at most one connection fewer than the pool may open, so that the pool's other
//! users (the release notifier's probe) always find one there, and a semaphore with one permit
//! per kept connection queues the operations in arrival order: under load every operation
//! runs on a kept connection, and sqlx's pool (which tests a connection as it hands it out and
//! as it takes it back) is the way only for the first ones, after a failure, and for a pool of
//! one connection.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgPool};
use sqlx::{Connection, Postgres};
use tokio::sync::{Semaphore, SemaphorePermit};

/// A kept connection that sat idle this long is tested (one round trip) before a statement is
/// sent on it; one used more recently is not: a connection that answered a moment ago is as
/// likely to answer as one just tested, and one that dies in between fails its statement with
/// a retryable error either way (and sends every kept connection back to be tested).
const PING_WHEN_IDLE_FOR: Duration = Duration::from_secs(1);

/// A kept connection unused this long goes back to sqlx's pool at the next operation.
const RETURN_WHEN_IDLE_FOR: Duration = Duration::from_secs(60);

/// A connection kept this long goes back to sqlx's pool as it is taken for an operation.
const RETURN_WHEN_KEPT_FOR: Duration = Duration::from_secs(600);

/// A kept connection: when it was last used, and since when it is kept.
struct Kept {
    conn: PoolConnection<Postgres>,
    used: Instant,
    since: Instant,
}

/// The kept connections of one pool.
pub(crate) struct Warm {
    pool: PgPool,
    /// The least recently used first.
    idle: Mutex<Vec<Kept>>,
    /// The most connections kept; 0 for a pool that is not the locker's own (the
    /// application's: its connections go back to it after each operation).
    keep: usize,
    /// One permit per kept connection, when connections are kept.
    permits: Option<Semaphore>,
    /// [`RETURN_WHEN_IDLE_FOR`] and [`RETURN_WHEN_KEPT_FOR`] (shorter in tests).
    return_when_idle_for: Duration,
    return_when_kept_for: Duration,
}

/// A connection for one operation: [`keep`](Checkout::keep) it once the operation completed;
/// dropped otherwise, it goes back to sqlx's pool, which tests it.
pub(crate) struct Checkout<'a> {
    warm: &'a Warm,
    /// `None` once kept.
    conn: Option<PoolConnection<Postgres>>,
    /// Since when it is kept; `None` for one from the pool.
    since: Option<Instant>,
    _permit: Option<SemaphorePermit<'a>>,
}

impl Warm {
    /// For the locker's own pool of `max_connections`.
    pub(crate) fn own(pool: PgPool, max_connections: u32) -> Warm {
        let keep = (max_connections as usize).saturating_sub(1);
        Warm {
            pool,
            idle: Mutex::new(Vec::with_capacity(keep)),
            keep,
            permits: (keep > 0).then(|| Semaphore::new(keep)),
            return_when_idle_for: RETURN_WHEN_IDLE_FOR,
            return_when_kept_for: RETURN_WHEN_KEPT_FOR,
        }
    }

    /// For the application's pool: nothing kept.
    pub(crate) fn none(pool: PgPool) -> Warm {
        Warm {
            pool,
            idle: Mutex::new(Vec::new()),
            keep: 0,
            permits: None,
            return_when_idle_for: RETURN_WHEN_IDLE_FOR,
            return_when_kept_for: RETURN_WHEN_KEPT_FOR,
        }
    }

    /// The pool behind.
    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn idle(&self) -> MutexGuard<'_, Vec<Kept>> {
        match self.idle.lock() {
            Ok(idle) => idle,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// A connection: the last one kept (tested first if it sat idle), else one of the pool's.
    pub(crate) async fn checkout(&self) -> Result<Checkout<'_>, sqlx::Error> {
        let permit = match &self.permits {
            Some(permits) => Some(
                permits
                    .acquire()
                    .await
                    .map_err(|_| sqlx::Error::PoolClosed)?,
            ),
            None => None,
        };
        // Those unused for long go back to the pool (outside the lock).
        let unused: Vec<Kept> = {
            let mut idle = self.idle();
            let n = idle
                .iter()
                .take_while(|k| k.used.elapsed() >= self.return_when_idle_for)
                .count();
            idle.drain(..n).collect()
        };
        drop(unused);
        loop {
            let kept = self.idle().pop();
            let (conn, since) = match kept {
                Some(Kept { conn, since, .. }) if since.elapsed() >= self.return_when_kept_for => {
                    drop(conn);
                    continue;
                }
                Some(Kept {
                    mut conn,
                    used,
                    since,
                }) => {
                    // A broken one goes back to the pool, which closes it; the next is tried.
                    if used.elapsed() >= PING_WHEN_IDLE_FOR && conn.ping().await.is_err() {
                        continue;
                    }
                    (conn, Some(since))
                }
                None => (self.pool.acquire().await?, None),
            };
            return Ok(Checkout {
                warm: self,
                conn: Some(conn),
                since,
                _permit: permit,
            });
        }
    }
}

impl Checkout<'_> {
    /// The connection.
    pub(crate) fn conn(&mut self) -> &mut PgConnection {
        // Present until `keep` takes it.
        self.conn.as_deref_mut().unwrap_or_else(|| unreachable!())
    }

    /// The operation completed: the connection is kept for the next (or goes back to the pool
    /// when enough are kept).
    pub(crate) fn keep(mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        let now = Instant::now();
        let mut idle = self.warm.idle();
        if idle.len() < self.warm.keep {
            idle.push(Kept {
                conn,
                used: now,
                since: self.since.unwrap_or(now),
            });
            return;
        }
        drop(idle);
        drop(conn);
    }
}

/// An operation that failed or was cancelled: its connection goes back to sqlx's pool, which
/// tests it, and so do all the kept ones. The failure may be the server's (a restart breaks
/// every connection at once): each of them would otherwise fail one more operation before it
/// is found out.
impl Drop for Checkout<'_> {
    fn drop(&mut self) {
        if self.conn.take().is_some() {
            let kept = std::mem::take(&mut *self.warm.idle());
            drop(kept);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use locker_conformance::servers::{self, ServerKind};

    async fn warm(idle_for: Duration, kept_for: Duration) -> Warm {
        let server = servers::shared(ServerKind::Postgres).unwrap_or_else(|e| panic!("{e}"));
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(3)
            .connect(server.url())
            .await
            .expect("pool");
        Warm {
            return_when_idle_for: idle_for,
            return_when_kept_for: kept_for,
            ..Warm::own(pool, 3)
        }
    }

    fn kept(w: &Warm) -> usize {
        w.idle().len()
    }

    #[tokio::test]
    async fn completed_operations_keep_their_connection_and_failed_ones_return_all() {
        let w = warm(RETURN_WHEN_IDLE_FOR, RETURN_WHEN_KEPT_FOR).await;
        let (a, b) = (
            w.checkout().await.expect("a"),
            w.checkout().await.expect("b"),
        );
        a.keep();
        b.keep();
        assert_eq!(kept(&w), 2);
        w.checkout().await.expect("c").keep();
        assert_eq!(kept(&w), 2, "the same connection again");
        // Dropped without `keep`: an operation that failed or was cancelled.
        drop(w.checkout().await.expect("d"));
        assert_eq!(kept(&w), 0);
    }

    #[tokio::test]
    async fn connections_unused_or_kept_for_long_go_back_to_the_pool() {
        let w = warm(Duration::from_millis(300), RETURN_WHEN_KEPT_FOR).await;
        let (a, b) = (
            w.checkout().await.expect("a"),
            w.checkout().await.expect("b"),
        );
        a.keep();
        tokio::time::sleep(Duration::from_millis(400)).await;
        b.keep();
        // `a` was unused for longer than the limit: back to the pool; `b` is taken.
        let c = w.checkout().await.expect("c");
        assert_eq!(kept(&w), 0);
        c.keep();
        assert_eq!(kept(&w), 1);

        let w = warm(RETURN_WHEN_IDLE_FOR, Duration::from_millis(300)).await;
        w.checkout().await.expect("a").keep();
        tokio::time::sleep(Duration::from_millis(400)).await;
        // Kept for longer than the limit: back to the pool, and a connection of the pool is
        // taken (and kept from now on).
        let c = w.checkout().await.expect("c");
        assert!(c.since.is_none(), "a connection of the pool");
        c.keep();
        assert_eq!(kept(&w), 1);
    }
}
