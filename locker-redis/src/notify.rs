//! Release notifications: the release script publishes an empty message on a channel named as
//! the lock key; a waiter subscribes to it.
//!
//! One pub/sub connection per backend, opened at the first wait and kept by a task: it
//! subscribes to a channel when the key gets its first waiter and unsubscribes when the last
//! one goes, wakes the key's waiters on each message, and after a broken connection opens a
//! new one (at most one attempt per [`RECONNECT_AFTER`]), subscribes again to every watched key
//! and wakes every waiter (a release may have been missed meanwhile). A server that refuses
//! `SUBSCRIBE` (an ACL user without channel rights) turns notifications off for the backend:
//! waiters poll. A notification is only a hint: the waiter acquires again.
//!
//! The waiters' flag: a release publishes only when the lock's waiters' flag (see `keys`) is
//! there, and deletes it. The task sets the flag of a key (with a TTL of [`FLAG_TTL`]) when it
//! subscribes, before the first waiter makes its first try (so a release after that try
//! publishes), again on each message of the key before it wakes the waiters (the release
//! deleted it), every [`FLAG_REFRESH`] for every watched key, and after a reconnection. A flag
//! that cannot be set costs only latency: the waiter's poll, at `recheck_every`, finds the
//! release. Processes of earlier versions of this library set no flag, so a release by this
//! version does not wake their waiters, which then find the lock by polling (their releases
//! still publish at every release).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use locker_core::{Error, ErrorKind, ReleaseWatch, Result, WatchHub};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::backend::Driver;
use crate::keys::KeyLayout;

/// A pub/sub connection.
#[async_trait]
pub(crate) trait Subscriber: Send {
    /// Subscribes to `channel`, returning once the server confirmed it.
    async fn subscribe(&mut self, channel: &str) -> Result<()>;
    /// Unsubscribes from `channel`.
    async fn unsubscribe(&mut self, channel: &str) -> Result<()>;
    /// The channel of the next message; `None` when the connection is gone. Cancel-safe.
    async fn next_message(&mut self) -> Option<String>;
}

/// What a subscription came to: `Ok(true)` subscribed, `Ok(false)` notifications are off.
type Ack = oneshot::Sender<Result<bool>>;

enum Command {
    /// Subscribe to the channel of a key's first watcher.
    Subscribe(String, Ack),
    /// Answered once every command before it is done: a later watcher of a key waits this way
    /// for the first one's subscription.
    Sync(Ack),
    Unsubscribe(String),
}

/// The waiters of one backend, and the task that feeds them.
pub(crate) struct Notifier {
    hub: WatchHub,
    commands: mpsc::UnboundedSender<Command>,
    /// Dropped with the notifier: ends the task.
    _stop: oneshot::Sender<()>,
    timeout: Duration,
}

impl Notifier {
    /// Starts the task on the current runtime.
    pub(crate) fn start(driver: Arc<dyn Driver>, keys: KeyLayout, timeout: Duration) -> Notifier {
        let (commands, rx) = mpsc::unbounded_channel();
        let hub = WatchHub::with_on_idle({
            let commands = commands.clone();
            move |channel| {
                let _ = commands.send(Command::Unsubscribe(channel.to_owned()));
            }
        });
        let (stop, stopped) = oneshot::channel();
        let flags = Flags {
            driver: driver.clone(),
            keys,
            timeout,
        };
        tokio::spawn(run(driver, flags, hub.clone(), rx, stopped, timeout));
        Notifier {
            hub,
            commands,
            _stop: stop,
            timeout,
        }
    }

    /// A watch of `channel` (a lock key), subscribed when this returns; `None` when the server
    /// refuses subscriptions.
    pub(crate) async fn watch(&self, channel: &str) -> Result<Option<ReleaseWatch>> {
        let (watch, first) = self.hub.watch(channel);
        let (ack, acked) = oneshot::channel();
        let command = if first {
            Command::Subscribe(channel.to_owned(), ack)
        } else {
            Command::Sync(ack)
        };
        let gone = || Error::unavailable("the release notifications task is gone");
        self.commands.send(command).map_err(|_| gone())?;
        match tokio::time::timeout(self.timeout, acked).await {
            Ok(Ok(Ok(true))) => Ok(Some(watch)),
            Ok(Ok(Ok(false))) => Ok(None),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(gone()),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!("SUBSCRIBE was not confirmed within {:?}", self.timeout),
            )),
        }
    }
}

/// The shortest time between two attempts to open a pub/sub connection.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// How long a waiters' flag lives unless set again.
const FLAG_TTL: Duration = Duration::from_secs(30);

/// How often the flags of every watched key are set again.
const FLAG_REFRESH: Duration = Duration::from_secs(10);

/// Sets waiters' flags through the backend's connection.
struct Flags {
    driver: Arc<dyn Driver>,
    keys: KeyLayout,
    timeout: Duration,
}

impl Flags {
    /// Sets the flag of the lock `channel` names; a failure is logged (waiters then poll).
    async fn set(&self, channel: &str) {
        let flag = self.keys.waiters(channel);
        let ttl = u64::try_from(FLAG_TTL.as_millis()).unwrap_or(u64::MAX);
        if let Err(e) = bounded(self.timeout, self.driver.set_px(&flag, "1", ttl)).await {
            tracing::debug!(error = %e, flag, "cannot set a waiters' flag: releases may not wake this key's waiters, which poll");
        }
    }

    async fn set_all(&self, hub: &WatchHub) {
        for channel in hub.watched_keys() {
            self.set(&channel).await;
        }
    }
}

async fn run(
    driver: Arc<dyn Driver>,
    flags: Flags,
    hub: WatchHub,
    mut commands: mpsc::UnboundedReceiver<Command>,
    mut stopped: oneshot::Receiver<()>,
    timeout: Duration,
) {
    let mut conn: Option<Box<dyn Subscriber>> = None;
    let mut next_attempt = Instant::now();
    let mut refresh = tokio::time::interval_at(Instant::now() + FLAG_REFRESH, FLAG_REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Set for good when the server refuses subscriptions.
    let mut off = false;
    loop {
        if conn.is_none() && !off && Instant::now() >= next_attempt {
            next_attempt = Instant::now() + RECONNECT_AFTER;
            match connect(&*driver, &hub, timeout).await {
                Ok(sub) => {
                    conn = Some(sub);
                    // Subscribed again to every watched key: flag them (their flags may have
                    // expired meanwhile) and wake them all, in case a release was missed while
                    // the connection was down.
                    flags.set_all(&hub).await;
                    hub.notify_all();
                }
                Err(e) if e.kind() == ErrorKind::Auth => {
                    refuse(&e);
                    off = true;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot open a pub/sub connection for release notifications");
                }
            }
        }
        let Some(sub) = conn.as_mut() else {
            // No connection: answer subscriptions at once (their waiters poll) until the next
            // attempt.
            tokio::select! {
                _ = &mut stopped => return,
                _ = tokio::time::sleep_until(next_attempt), if !off => {}
                command = commands.recv() => match command {
                    None => return,
                    Some(Command::Subscribe(_, ack) | Command::Sync(ack)) => {
                        let _ = ack.send(if off {
                            Ok(false)
                        } else {
                            Err(Error::unavailable(
                                "no pub/sub connection for release notifications",
                            ))
                        });
                    }
                    Some(Command::Unsubscribe(_)) => {}
                },
            }
            continue;
        };
        tokio::select! {
            _ = &mut stopped => return,
            command = commands.recv() => match command {
                None => return,
                Some(Command::Subscribe(channel, ack)) => {
                    match bounded(timeout, sub.subscribe(&channel)).await {
                        Ok(()) => {
                            // Before the waiter's first try: a release after it publishes.
                            flags.set(&channel).await;
                            let _ = ack.send(Ok(true));
                        }
                        Err(e) if e.kind() == ErrorKind::Auth => {
                            refuse(&e);
                            off = true;
                            conn = None;
                            let _ = ack.send(Ok(false));
                        }
                        Err(e) => {
                            conn = None;
                            let _ = ack.send(Err(e));
                        }
                    }
                }
                Some(Command::Sync(ack)) => {
                    let _ = ack.send(Ok(true));
                }
                Some(Command::Unsubscribe(channel)) => {
                    // A new waiter may have come since the last one left.
                    if !hub.is_watched(&channel)
                        && bounded(timeout, sub.unsubscribe(&channel)).await.is_err()
                    {
                        conn = None;
                    }
                }
            },
            message = sub.next_message() => match message {
                Some(channel) => {
                    // The release deleted the flag: set again before the waiters try again,
                    // so that the next release wakes those that lose.
                    if hub.is_watched(&channel) {
                        flags.set(&channel).await;
                    }
                    hub.notify(&channel);
                }
                None => conn = None,
            },
            _ = refresh.tick() => flags.set_all(&hub).await,
        }
    }
}

fn refuse(e: &Error) {
    tracing::warn!(
        error = %e,
        "the Redis server refuses SUBSCRIBE (an ACL user without channel rights?): waiters \
         poll; grant the user the lock keys' channels (`&{{prefix}}*`) or set release_events=false"
    );
}

/// A new connection, subscribed to every watched key.
async fn connect(
    driver: &dyn Driver,
    hub: &WatchHub,
    timeout: Duration,
) -> Result<Box<dyn Subscriber>> {
    let mut sub = bounded(timeout, driver.subscriber())
        .await?
        .ok_or_else(|| Error::unavailable("this connection cannot subscribe"))?;
    for channel in hub.watched_keys() {
        bounded(timeout, sub.subscribe(&channel)).await?;
    }
    Ok(sub)
}

async fn bounded<T>(
    timeout: Duration,
    call: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or_else(|_| {
            Err(Error::new(
                ErrorKind::Timeout,
                format!("no answer within {timeout:?}"),
            ))
        })
}
