//! The `acquire` function's one-call decision (migration 3) against records it does not
//! expect: written by another implementation, with unusual escaping, with fields in another
//! order, corrupt. Each must give the answer the full decode would give, and a corrupt record
//! is never replaced. And a database whose owners have not applied migration 3 still works,
//! through the statements of the versions before.

use std::time::Duration;

use locker_conformance::servers::{self, ServerKind};
use locker_core::{
    AcquireDecision, AcquireOutcome, ErrorKind, ExtendOutcome, LockAttempt, LockBackend, LockData,
    Locker, ProcessData, ReleaseOutcome,
};
use locker_postgres::migrations::MIGRATIONS;
use locker_postgres::{PostgresBackend, PostgresConfig};
use locker_sql::Tables;

const TTL: Duration = Duration::from_secs(30);
const NODE_PROCESS: &str = "node-worker-3/4242.123456789012";

fn config(prefix: &str, migrate: bool) -> PostgresConfig {
    let server = servers::shared(ServerKind::Postgres).unwrap_or_else(|e| panic!("{e}"));
    PostgresConfig::from_url(server.url())
        .expect("url")
        .into_builder()
        .table_prefix(prefix)
        .migrate(migrate)
        .max_connections(2)
        .build()
        .expect("config")
}

fn node_owner(key: &str) -> String {
    format!("{key}@{NODE_PROCESS}.7#nightly-run")
}

/// A record as the Node library writes it (no fencing token).
fn node_record(key: &str) -> String {
    format!(
        r#"{{"ownerHash":"{}","processHash":"{NODE_PROCESS}","trace":"nightly-run","acquiredAt":"2026-01-13T10:00:00.000Z","extendedAt":"2026-01-13T10:01:00.000Z"}}"#,
        node_owner(key)
    )
}

/// The same record with every `-` of its owner hash written as `\u002d`: the same JSON value.
fn escaped_record(key: &str) -> String {
    let owner = node_owner(key).replace('-', "\\u002d");
    format!(
        r#"{{"ownerHash":"{owner}","processHash":"{NODE_PROCESS}","acquiredAt":"2026-01-13T10:00:00.000Z","extendedAt":"2026-01-13T10:01:00.000Z"}}"#
    )
}

/// The same record, fields in another order, with a field of its own.
fn reordered_record(key: &str) -> String {
    format!(
        r#"{{"processHash":"{NODE_PROCESS}","acquiredAt":"2026-01-13T10:00:00.000Z","ownerHash":"{}","extendedAt":"2026-01-13T10:01:00.000Z","shard":3}}"#,
        node_owner(key)
    )
}

fn heir(key: &str) -> LockData {
    let process = "rust-host/1.1".to_owned();
    let owner = locker_core::new_owner_hash(key, &process, None).expect("owner");
    LockData::new(owner, process, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_holder_is_taken_over_in_one_call_and_a_live_one_is_not() {
    let prefix = format!("fast_live_{}_", std::process::id());
    let b = PostgresBackend::connect(&config(&prefix, true))
        .await
        .expect("connect");
    assert!(b.capabilities().checked_acquire);
    for (i, record) in [node_record, escaped_record, reordered_record]
        .iter()
        .enumerate()
    {
        let key = format!("job-{i}");
        let json = record(&key);
        b.raw_put(&key, &json, TTL).await.expect("put");
        let before = b.read(&key).await.expect("read").expect("a lock");
        assert_eq!(before.owner_hash, node_owner(&key), "{json}");
        b.ping(NODE_PROCESS, &ProcessData::now(), TTL)
            .await
            .expect("ping");
        let mine = heir(&key);
        match b.acquire_checked(&key, &mine, TTL).await.expect("acquire") {
            AcquireDecision::HeldByLive(h) => assert_eq!(h, before, "{json}"),
            other => panic!("{json}: {other:?}"),
        }
        b.forget_process(NODE_PROCESS).await.expect("forget");
        match b.acquire_checked(&key, &mine, TTL).await.expect("acquire") {
            AcquireDecision::TookOver { stored, dead } => {
                assert_eq!(dead, before, "{json}");
                assert_eq!(stored.owner_hash, mine.owner_hash);
                assert!(stored.fencing_token > dead.fencing_token);
                assert_eq!(b.read(&key).await.expect("read"), Some(stored));
            }
            other => panic!("{json}: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_records_are_never_replaced() {
    let prefix = format!("fast_corrupt_{}_", std::process::id());
    let b = PostgresBackend::connect(&config(&prefix, true))
        .await
        .expect("connect");
    let key = "job";
    let mine = heir(key);
    for garbage in [
        "not a record".to_owned(),
        // Names a process (that has no liveness row), but is cut short.
        r#"{"ownerHash":"x","processHash":"gone","acquiredAt":"#.to_owned(),
        // Whole, but its process hash is not a string.
        r#"{"ownerHash":"x","processHash":7,"acquiredAt":"2026-01-13T10:00:00.000Z"}"#.to_owned(),
        // A JSON value that is not an object.
        "[1,2]".to_owned(),
    ] {
        b.raw_put(key, &garbage, TTL).await.expect("put");
        let e = b
            .acquire_checked(key, &mine, TTL)
            .await
            .expect_err(&format!("acquire_checked accepted {garbage:?}"));
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{garbage:?}: {e}");
        assert_eq!(
            b.raw_get(key).await.expect("get").as_deref(),
            Some(garbage.as_str()),
            "replaced"
        );
    }
}

/// Migrations 1 and 2 only, applied by the database's owners (`migrate=false`): the backend
/// says it cannot decide in one call, and every operation works through the statements.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_migration_3_the_statements_still_work() {
    let server = servers::shared(ServerKind::Postgres).unwrap_or_else(|e| panic!("{e}"));
    let prefix = format!("fast_old_{}_", std::process::id());
    let tables = Tables::new(Some("public"), &prefix).expect("tables");
    let admin = sqlx::PgPool::connect(server.url()).await.expect("admin");
    for (version, sql) in &MIGRATIONS[..2] {
        assert!(*version <= 2);
        sqlx::raw_sql(&tables.render(sql))
            .execute(&admin)
            .await
            .expect("an older schema");
    }
    let config = config(&prefix, false);
    let b = PostgresBackend::connect(&config).await.expect("connect");
    assert!(!b.capabilities().checked_acquire);

    let key = "old-schema";
    let first = heir(key);
    let stored = match b.acquire(key, &first, TTL).await.expect("acquire") {
        AcquireOutcome::Acquired(stored) => stored,
        other => panic!("{other:?}"),
    };
    let second = LockData::new(
        locker_core::new_owner_hash(key, "other/2.2", None).expect("owner"),
        "other/2.2".to_owned(),
        None,
    );
    assert_eq!(
        b.acquire_checked(key, &second, TTL).await.expect("acquire"),
        AcquireDecision::Held(stored.clone())
    );
    assert!(matches!(
        b.extend(key, &first, TTL, &first.owner_hash)
            .await
            .expect("extend"),
        ExtendOutcome::Extended(_)
    ));
    assert!(matches!(
        b.take_over(key, &second, TTL, &first.owner_hash).await.expect("take over"),
        AcquireOutcome::Acquired(new) if new.fencing_token > stored.fencing_token
    ));
    assert!(matches!(
        b.release(key, &first.owner_hash).await.expect("release"),
        ReleaseOutcome::Held(_)
    ));
    assert_eq!(
        b.release(key, &second.owner_hash).await.expect("release"),
        ReleaseOutcome::Released
    );

    // A locker on it takes over a dead holder's lock, in three calls.
    b.raw_put(key, &node_record(key), TTL).await.expect("put");
    let locker = Locker::builder(config).build().expect("locker");
    match locker.acquire(key).await.expect("acquire") {
        LockAttempt::Acquired(guard) => assert_eq!(
            guard.release().await.expect("release"),
            ReleaseOutcome::Released
        ),
        LockAttempt::Held(h) => panic!("a dead holder kept its lock: {}", h.owner_hash),
    }
    locker.shutdown().await;
}
