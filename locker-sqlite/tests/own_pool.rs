//! A locker on the application's own pool (issue 19): the jobs' locks go through it, and the
//! liveness reporter has a pool of its own, so that liveness writes go on while the
//! application holds every connection of its pool.

use std::time::Duration;

use locker_conformance::{run_case, Setup, Verdict};
use locker_core::{LockAttempt, LockBackend, Locker};
use locker_sqlite::{SqliteBackend, SqliteConfig};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::SqlitePool;

const LIVENESS: Duration = Duration::from_millis(600);

async fn app_pool(path: &std::path::Path) -> SqlitePool {
    SqlitePoolOptions::new()
        .max_connections(2)
        .connect_with(
            SqliteConnectOptions::new()
                .filename(path)
                .create_if_missing(true),
        )
        .await
        .expect("the application's pool")
}

#[test]
fn a_locker_on_the_applications_pool() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("app.db");
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(liveness_goes_on_while_the_application_holds_its_pool(&path));
    for case in [
        "locker_acquire_release_and_owner_status",
        "locker_blocked_runtime_keeps_its_lock",
    ] {
        let verdict = run_case("sqlite_app_pool", case, async {
            let config = SqliteConfig::from_pool(app_pool(&path).await)
                .build()
                .expect("config");
            Setup::new("sqlite-app-pool", config)
        });
        assert_eq!(verdict, Verdict::Passed, "{case}");
    }
}

#[tokio::test]
async fn an_in_memory_pool_is_refused() {
    let pool = SqlitePool::connect("sqlite::memory:").await.expect("pool");
    let e = SqliteConfig::from_pool(pool).build().expect_err("refused");
    assert_eq!(e.kind(), locker_core::ErrorKind::InvalidInput, "{e}");
}

async fn liveness_goes_on_while_the_application_holds_its_pool(path: &std::path::Path) {
    let pool = app_pool(path).await;
    let locker = Locker::builder(
        SqliteConfig::from_pool(pool.clone())
            .build()
            .expect("config"),
    )
    .report_every(Duration::from_millis(100))
    .liveness_ttl(LIVENESS)
    .build()
    .expect("locker");
    locker.ready().await.expect("ready");
    let guard = match locker.acquire("own-pool").await.expect("acquire") {
        LockAttempt::Acquired(guard) => guard,
        LockAttempt::Held(h) => panic!("held by {}", h.owner_hash),
    };
    // The application takes every connection of its pool, for three liveness TTLs.
    let first = pool.acquire().await.expect("connection");
    let second = pool.acquire().await.expect("connection");
    tokio::time::sleep(LIVENESS * 3).await;
    let reader = SqliteBackend::connect(&SqliteConfig::builder(path).build().expect("config"))
        .await
        .expect("reader");
    let alive = reader
        .read_process(locker.process_hash())
        .await
        .expect("read")
        .expect("the liveness record lapsed: the reporter waited for the application's pool");
    let age = chrono::Utc::now() - alive.alive_at;
    assert!(
        age < chrono::Duration::from_std(LIVENESS).expect("duration"),
        "the last liveness write is {age} old"
    );
    drop((first, second));
    guard
        .heartbeat()
        .beat()
        .await
        .expect("the lock is still held");
    let _released = guard.release().await.expect("release");
    locker.shutdown().await;
}
