//! Release notifications (`LISTEN`/`NOTIFY`): a waiter whose listener connection was killed
//! is still woken by a later release; with `release_events=false` waiters poll.

use std::time::Duration;

use locker_conformance::cases::acquired;
use locker_conformance::servers::{self, ServerKind};
use locker_core::{LockBackend, Locker, Wait};
use locker_postgres::{PostgresBackend, PostgresConfig};

/// A test that waits this long has failed.
const PATIENCE: Duration = Duration::from_secs(20);

fn config(release_events: bool) -> PostgresConfig {
    let server = servers::shared(ServerKind::Postgres).unwrap_or_else(|e| panic!("{e}"));
    PostgresConfig::from_url(server.url())
        .expect("url")
        .into_builder()
        .max_connections(4)
        .release_events(release_events)
        .build()
        .expect("config")
}

fn locker(config: &PostgresConfig) -> Locker {
    Locker::builder(config.clone())
        .recheck_every(Duration::from_millis(500))
        .build()
        .expect("locker")
}

fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("notify/{name}-{nanos}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_listener_connection_is_made_again() {
    let config = config(true);
    let (a, b) = (locker(&config), locker(&config));
    let key = unique("killed");
    let guard = acquired(&a, &key).await;
    let waiter = tokio::spawn({
        let (b, key) = (b.clone(), key.clone());
        async move {
            b.acquire_wait(
                key.as_str(),
                Wait::forever().backoff(|_| Duration::from_secs(3600)),
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let server = servers::shared(ServerKind::Postgres).unwrap_or_else(|e| panic!("{e}"));
    let pool = sqlx::PgPool::connect(server.url()).await.expect("connect");
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid))::int8 FROM pg_stat_activity \
         WHERE query LIKE 'LISTEN %distributed_locker_released%'",
    )
    .fetch_one(&pool)
    .await
    .expect("terminate");
    assert!(killed >= 1, "no listener connection to kill");
    // The listener connects again and LISTENs again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!waiter.is_finished(), "acquired a held lock");
    let _ = guard.release().await.expect("release");
    let got = tokio::time::timeout(PATIENCE, waiter)
        .await
        .expect("woken after the listener came back")
        .expect("task")
        .expect("acquire_wait");
    let _ = got.release().await.expect("release");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_release_events_waiters_poll() {
    let config = config(false);
    let backend = PostgresBackend::connect(&config).await.expect("connect");
    assert!(!backend.capabilities().release_events);
    assert!(backend.watch_release("k").await.expect("watch").is_none());
    let (a, b) = (locker(&config), locker(&config));
    let key = unique("polling");
    let guard = acquired(&a, &key).await;
    let waiter = tokio::spawn({
        let (b, key) = (b.clone(), key.clone());
        async move { b.acquire_wait(key.as_str(), Wait::forever()).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = guard.release().await.expect("release");
    let got = tokio::time::timeout(PATIENCE, waiter)
        .await
        .expect("found by polling")
        .expect("task")
        .expect("acquire_wait");
    let _ = got.release().await.expect("release");
    a.shutdown().await;
    b.shutdown().await;
}
