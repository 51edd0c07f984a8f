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

/// The kept connections of one pool.
pub(crate) struct Warm {
    pool: PgPool,
    idle: Mutex<Vec<(PoolConnection<Postgres>, Instant)>>,
    /// The most connections kept; 0 for a pool that is not the locker's own (the
    /// application's: its connections go back to it after each operation).
    keep: usize,
    /// One permit per kept connection, when connections are kept.
    permits: Option<Semaphore>,
}

/// A connection for one operation: [`keep`](Checkout::keep) it once the operation completed;
/// dropped otherwise, it goes back to sqlx's pool, which tests it.
pub(crate) struct Checkout<'a> {
    warm: &'a Warm,
    /// `None` once kept.
    conn: Option<PoolConnection<Postgres>>,
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
        }
    }

    /// For the application's pool: nothing kept.
    pub(crate) fn none(pool: PgPool) -> Warm {
        Warm {
            pool,
            idle: Mutex::new(Vec::new()),
            keep: 0,
            permits: None,
        }
    }

    /// The pool behind.
    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn idle(&self) -> MutexGuard<'_, Vec<(PoolConnection<Postgres>, Instant)>> {
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
        loop {
            let kept = self.idle().pop();
            let conn = match kept {
                Some((mut conn, used)) => {
                    // A broken one goes back to the pool, which closes it; the next is tried.
                    if used.elapsed() >= PING_WHEN_IDLE_FOR && conn.ping().await.is_err() {
                        continue;
                    }
                    conn
                }
                None => self.pool.acquire().await?,
            };
            return Ok(Checkout {
                warm: self,
                conn: Some(conn),
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
        let mut idle = self.warm.idle();
        if idle.len() < self.warm.keep {
            idle.push((conn, Instant::now()));
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
