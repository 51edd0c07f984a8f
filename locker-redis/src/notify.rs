//! Release notifications: on a standalone server, the release script publishes an empty
//! message on a channel named as the lock key; a waiter subscribes to it.
//!
//! One pub/sub connection per backend, opened at the first wait and kept by a task: it
//! subscribes to a channel when the key gets its first waiter and unsubscribes when the last
//! one goes, wakes the key's waiters on each message, and after a broken connection opens a
//! new one, subscribes to every watched key again and wakes every waiter (a release may have
//! been missed meanwhile). A notification is only a hint: the waiter acquires again.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use locker_core::{Error, ReleaseWatch, Result, WatchHub};
use tokio::sync::{mpsc, oneshot};

use crate::backend::Driver;

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

enum Command {
    Subscribe(String, oneshot::Sender<Result<()>>),
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
    pub(crate) fn start(driver: Arc<dyn Driver>, timeout: Duration) -> Notifier {
        let (commands, rx) = mpsc::unbounded_channel();
        let hub = WatchHub::with_on_idle({
            let commands = commands.clone();
            move |channel| {
                let _ = commands.send(Command::Unsubscribe(channel.to_owned()));
            }
        });
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(run(driver, hub.clone(), rx, stopped, timeout));
        Notifier {
            hub,
            commands,
            _stop: stop,
            timeout,
        }
    }

    /// A watch of `channel` (a lock key), subscribed when this returns.
    pub(crate) async fn watch(&self, channel: &str) -> Result<ReleaseWatch> {
        let (watch, first) = self.hub.watch(channel);
        if first {
            let (ack, acked) = oneshot::channel();
            self.commands
                .send(Command::Subscribe(channel.to_owned(), ack))
                .map_err(|_| Error::unavailable("the release notifications task is gone"))?;
            match tokio::time::timeout(self.timeout, acked).await {
                Ok(Ok(result)) => result?,
                Ok(Err(_)) => {
                    return Err(Error::unavailable("the release notifications task is gone"))
                }
                Err(_) => {
                    return Err(Error::new(
                        locker_core::ErrorKind::Timeout,
                        format!("SUBSCRIBE was not confirmed within {:?}", self.timeout),
                    ))
                }
            }
        }
        Ok(watch)
    }
}

/// How long the task waits before opening a new connection after a failure.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

async fn run(
    driver: Arc<dyn Driver>,
    hub: WatchHub,
    mut commands: mpsc::UnboundedReceiver<Command>,
    mut stopped: oneshot::Receiver<()>,
    timeout: Duration,
) {
    let mut conn: Option<Box<dyn Subscriber>> = None;
    loop {
        if conn.is_none() {
            conn = connect(&*driver, &hub, timeout).await;
            if conn.is_some() {
                // Subscribed again to every watched key: wake them all, in case a release
                // was missed while the connection was down.
                hub.notify_all();
            }
        }
        let Some(sub) = conn.as_mut() else {
            // No connection: refuse new subscriptions (their waiters poll) until the next try.
            tokio::select! {
                _ = &mut stopped => return,
                _ = tokio::time::sleep(RECONNECT_AFTER) => {}
                command = commands.recv() => match command {
                    None => return,
                    Some(Command::Subscribe(_, ack)) => {
                        let _ = ack.send(Err(Error::unavailable(
                            "no pub/sub connection for release notifications",
                        )));
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
                    let result = bounded(timeout, sub.subscribe(&channel)).await;
                    if result.is_err() {
                        conn = None;
                    }
                    let _ = ack.send(result);
                }
                Some(Command::Unsubscribe(channel)) => {
                    // A new waiter may have come since the last one left.
                    if !hub.watched_keys().contains(&channel)
                        && bounded(timeout, sub.unsubscribe(&channel)).await.is_err()
                    {
                        conn = None;
                    }
                }
            },
            message = sub.next_message() => match message {
                Some(channel) => hub.notify(&channel),
                None => conn = None,
            },
        }
    }
}

/// A new connection, subscribed to every watched key; `None` on failure.
async fn connect(
    driver: &dyn Driver,
    hub: &WatchHub,
    timeout: Duration,
) -> Option<Box<dyn Subscriber>> {
    let mut sub = match bounded(timeout, driver.subscriber()).await {
        Ok(Some(sub)) => sub,
        Ok(None) => return None,
        Err(e) => {
            tracing::debug!(error = %e, "cannot open a pub/sub connection for release notifications");
            return None;
        }
    };
    for channel in hub.watched_keys() {
        if bounded(timeout, sub.subscribe(&channel)).await.is_err() {
            return None;
        }
    }
    Some(sub)
}

async fn bounded<T>(
    timeout: Duration,
    call: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or_else(|_| {
            Err(Error::new(
                locker_core::ErrorKind::Timeout,
                format!("no answer within {timeout:?}"),
            ))
        })
}
