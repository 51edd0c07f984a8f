//! A locker on the application's own pool (issue 19): its jobs' locks go through the pool, and
//! the liveness reporter has a connection of its own, so that a blocked application runtime
//! does not stop liveness writes.

use std::sync::Arc;
use std::time::Duration;

use locker_conformance::servers::{self, ServerKind};
use locker_conformance::{run_case, Setup, Verdict};
use locker_core::{BackendFactory, LockAttempt, LockBackend, Locker};
use locker_postgres::PostgresConfig;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

/// The application's pool, named so that its connections can be told from the locker's.
async fn app_pool() -> PgPool {
    let server = servers::shared(ServerKind::Postgres).unwrap_or_else(|e| panic!("{e}"));
    let options: PgConnectOptions = server.url().parse().expect("url");
    PgPoolOptions::new()
        .max_connections(3)
        .connect_with(options.application_name("the-application"))
        .await
        .expect("the application's pool")
}

fn config(pool: PgPool) -> PostgresConfig {
    PostgresConfig::builder()
        .pool(pool)
        .table_prefix("app_pool_")
        .build()
        .expect("config")
}

/// Connects with an application pool made on the runtime that connects. A pool's connections
/// belong to the runtime that opened them, and `locker_blocked_runtime_keeps_its_lock` runs one
/// locker on a runtime of its own that ends while the case's runtime still works: on one shared
/// pool, the case's locker could be handed a connection of the ending runtime (seen once in CI:
/// "A Tokio 1.x context was found, but it is being shutdown"). See `PostgresConfigBuilder::pool`.
struct AppPoolPerRuntime;

#[async_trait::async_trait]
impl BackendFactory for AppPoolPerRuntime {
    async fn connect(&self) -> locker_core::Result<Arc<dyn LockBackend>> {
        config(app_pool().await).connect().await
    }

    async fn connect_reporter(&self) -> locker_core::Result<Arc<dyn LockBackend>> {
        config(app_pool().await).connect_reporter().await
    }
}

/// One test, so that no other locker of this binary's server is counted in the first part.
#[test]
fn a_locker_on_the_applications_pool() {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(jobs_use_the_pool_and_the_reporter_its_own_connection());
    for case in [
        "locker_acquire_release_and_owner_status",
        "locker_seppuku_after_a_takeover",
        // The reporter keeps writing while the jobs' runtime is blocked.
        "locker_blocked_runtime_keeps_its_lock",
    ] {
        let verdict = run_case("postgres_app_pool", case, async {
            Setup::new("postgres-app-pool", AppPoolPerRuntime)
        });
        assert_eq!(verdict, Verdict::Passed, "{case}");
    }
}

async fn jobs_use_the_pool_and_the_reporter_its_own_connection() {
    let pool = app_pool().await;
    let locker = Locker::builder(config(pool.clone()))
        .report_every(Duration::from_millis(200))
        .build()
        .expect("locker");
    locker.ready().await.expect("ready");
    let guard = match locker.acquire("own-pool").await.expect("acquire") {
        LockAttempt::Acquired(guard) => guard,
        LockAttempt::Held(h) => panic!("held by {}", h.owner_hash),
    };
    // Everything below is read from a connection apart: a query on the application's pool
    // could run on the connection that ran the acquire, and replace its last statement.
    let server = servers::shared(ServerKind::Postgres).unwrap_or_else(|e| panic!("{e}"));
    let options: PgConnectOptions = server.url().parse().expect("url");
    let checker = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options.application_name("the-checker"))
        .await
        .expect("the checker's pool");
    // Who wrote what: the lock row's transaction came from one of the application's
    // connections, and the liveness row's from the locker's own.
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT application_name FROM pg_stat_activity WHERE datname = current_database() \
         AND application_name IN ('the-application', 'distributed-locker') \
         ORDER BY application_name",
    )
    .fetch_all(&checker)
    .await
    .expect("pg_stat_activity");
    assert!(
        names.iter().any(|n| n == "distributed-locker"),
        "the reporter has no connection of its own: {names:?}"
    );
    // The acquire ran on a connection of the application's pool: the last statement of one of
    // them.
    let app_queries: Vec<String> = sqlx::query_scalar(
        "SELECT query FROM pg_stat_activity WHERE application_name = 'the-application' \
         AND datname = current_database()",
    )
    .fetch_all(&checker)
    .await
    .expect("pg_stat_activity");
    assert!(
        app_queries.iter().any(|q| q.contains("app_pool_acquire")),
        "the jobs did not use the application's pool: its connections last ran {app_queries:?}"
    );
    let in_app_pool: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'distributed-locker' \
         AND datname = current_database()",
    )
    .fetch_one(&checker)
    .await
    .expect("count");
    assert!(
        in_app_pool <= 2,
        "the locker opened {in_app_pool} connections of its own (the reporter's pool has 2)"
    );
    let _released = guard.release().await.expect("release");
    locker.shutdown().await;
}
