//! Release notifications: a release runs `pg_notify(CHANNEL, key)` in its statement (sent at
//! commit, so only for a release that happened); a waiter's backend `LISTEN`s on one connection
//! of its own (a one-connection pool beside the lock pool), opened at the first wait, and wakes
//! the waiters of the key named.
//!
//! Behind a transaction-mode pooler a `LISTEN` is lost with its transaction: after `LISTEN`,
//! the task sends a probe notification through the pool and waits for it; when it does not
//! come, notifications are off for this backend (waiters poll) and a warning says why. After a
//! broken connection the listener connects again and wakes every waiter (a release may have
//! been missed meanwhile). A notification is only a hint: the waiter acquires again.

use std::time::Duration;

use locker_core::{Error, ReleaseWatch, Result, WatchHub};
use sqlx::postgres::{PgListener, PgPool};
use tokio::sync::{oneshot, watch};

/// The one channel of every locks table; the payload is the key. (Waiters of another table's
/// key of the same name are woken for nothing, and acquire again.)
pub(crate) const CHANNEL: &str = "distributed_locker_released";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Starting,
    Listening,
    /// Not now (the connection failed; the task tries again).
    Down,
    /// Never: notifications do not arrive (a transaction-mode pooler).
    Off,
}

pub(crate) struct Notifier {
    hub: WatchHub,
    state: watch::Receiver<State>,
    _stop: oneshot::Sender<()>,
    wait_for_start: Duration,
}

impl Notifier {
    /// Starts the listener task on the current runtime.
    /// `pool` sends the probe; `listener_pool` (one connection) holds the `LISTEN`.
    pub(crate) fn start(pool: PgPool, listener_pool: PgPool, timeout: Duration) -> Notifier {
        let hub = WatchHub::new();
        let (state_tx, state) = watch::channel(State::Starting);
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(run(
            pool,
            listener_pool,
            hub.clone(),
            state_tx,
            stopped,
            timeout,
        ));
        Notifier {
            hub,
            state,
            _stop: stop,
            wait_for_start: timeout * 2,
        }
    }

    /// A watch of `key`, once the listener listens; `None` when notifications never arrive
    /// (the waiter polls), an error while the listener cannot connect (the waiter polls and
    /// asks again later).
    pub(crate) async fn watch(&self, key: &str) -> Result<Option<ReleaseWatch>> {
        let mut state = self.state.clone();
        let started = tokio::time::timeout(
            self.wait_for_start,
            state.wait_for(|s| *s != State::Starting),
        )
        .await;
        match started.as_ref().map(|s| s.as_deref().copied()) {
            Ok(Ok(State::Listening)) => Ok(Some(self.hub.watch(key).0)),
            Ok(Ok(State::Off)) => Ok(None),
            _ => Err(Error::unavailable(
                "the listener for release notifications is not connected; polling",
            )),
        }
    }
}

/// How long the task waits before connecting again after a failure.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

async fn run(
    pool: PgPool,
    listener_pool: PgPool,
    hub: WatchHub,
    state: watch::Sender<State>,
    mut stopped: oneshot::Receiver<()>,
    timeout: Duration,
) {
    loop {
        match listen(&pool, &listener_pool, &hub, timeout).await {
            Ok(Some(mut listener)) => {
                state.send_replace(State::Listening);
                hub.notify_all();
                loop {
                    tokio::select! {
                        _ = &mut stopped => return,
                        message = listener.try_recv() => match message {
                            Ok(Some(n)) => hub.notify(n.payload()),
                            // The connection broke; the next call makes a new one, LISTENs
                            // again. A release may have been missed meanwhile.
                            Ok(None) => hub.notify_all(),
                            Err(e) => {
                                tracing::debug!(error = %e, "the release listener's connection failed");
                                break;
                            }
                        },
                    }
                }
                state.send_replace(State::Down);
            }
            Ok(None) => {
                tracing::warn!(
                    "PostgreSQL notifications do not arrive (a transaction-mode pooler?): \
                     waiters poll; set release_events=false to skip this probe"
                );
                state.send_replace(State::Off);
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot listen for release notifications");
                state.send_replace(State::Down);
            }
        }
        tokio::select! {
            _ = &mut stopped => return,
            _ = tokio::time::sleep(RECONNECT_AFTER) => {}
        }
    }
}

/// A listener on [`CHANNEL`] whose probe notification arrived; `None` when the probe did not
/// arrive in time.
async fn listen(
    pool: &PgPool,
    listener_pool: &PgPool,
    hub: &WatchHub,
    timeout: Duration,
) -> std::result::Result<Option<PgListener>, sqlx::Error> {
    let bounded = |e: tokio::time::error::Elapsed| sqlx::Error::Io(std::io::Error::other(e));
    let mut listener = tokio::time::timeout(timeout, PgListener::connect_with(listener_pool))
        .await
        .map_err(bounded)??;
    tokio::time::timeout(timeout, listener.listen(CHANNEL))
        .await
        .map_err(bounded)??;
    let probe = format!("probe {}", locker_core::new_process_hash());
    tokio::time::timeout(
        timeout,
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(&probe)
            .persistent(false)
            .execute(pool),
    )
    .await
    .map_err(bounded)??;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, listener.try_recv()).await {
            Err(_) => return Ok(None),
            Ok(Ok(Some(n))) if n.payload() == probe => return Ok(Some(listener)),
            Ok(Ok(Some(n))) => hub.notify(n.payload()),
            Ok(Ok(None)) => {
                return Err(sqlx::Error::Io(std::io::Error::other(
                    "the connection broke after LISTEN",
                )))
            }
            Ok(Err(e)) => return Err(e),
        }
    }
}
