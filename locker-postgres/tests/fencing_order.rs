//! Fencing tokens follow the order in which a key is granted, even when a session stalls in
//! the middle of its acquire statement (issue 14, hole 6).
//!
//! Session A's acquire is stalled inside its statement by a trigger (installed on this test's
//! own tables only) that sleeps before A's row is written, after the statement has computed
//! its values. Meanwhile session B acquires and releases the same key. Whichever of the two
//! is granted the key later must hold the greater token, or a fenced resource that saw the
//! earlier holder's token would refuse the legitimate later holder.

use std::time::{Duration, Instant};

use locker_conformance::servers::{self, ServerKind};
use locker_core::{AcquireOutcome, LockBackend, LockData, ReleaseOutcome};
use locker_postgres::migrations::MIGRATIONS;
use locker_postgres::{PostgresBackend, PostgresConfig};
use locker_sql::Tables;
use sqlx::Row;

/// How long A's statement sleeps before its row is written.
const STALL: Duration = Duration::from_secs(2);

fn config(url: &str, prefix: &str) -> PostgresConfig {
    PostgresConfig::from_url(url)
        .expect("harness URL")
        .into_builder()
        .table_prefix(prefix)
        .connect_timeout(Duration::from_secs(5))
        // Longer than the stall, so that a statement waiting behind A is not cut off.
        .command_timeout(STALL * 5)
        .max_connections(2)
        .build()
        .expect("config")
}

/// One grant: who, the token it was given, and when its acquire call returned.
#[derive(Debug)]
struct Grant {
    who: &'static str,
    token: u64,
    returned: Instant,
}

/// Acquires `key` for `owner`, retrying while someone else holds it, and releases it at once.
async fn grant_and_release(
    backend: &PostgresBackend,
    who: &'static str,
    key: &str,
    owner: &str,
) -> Grant {
    let data = LockData::new(owner.to_owned(), format!("host/{who}.1"), None);
    let deadline = Instant::now() + STALL * 10;
    let token = loop {
        match backend
            .acquire(key, &data, Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("{who}'s acquire: {e}"))
        {
            AcquireOutcome::Acquired(lock) => {
                break lock.fencing_token.expect("PostgreSQL gives fencing tokens")
            }
            AcquireOutcome::Held(_) => {
                assert!(Instant::now() < deadline, "{who} never got the key");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let returned = Instant::now();
    let released = backend
        .release(key, owner)
        .await
        .unwrap_or_else(|e| panic!("{who}'s release: {e}"));
    assert!(
        matches!(released, ReleaseOutcome::Released),
        "{who}'s release: {released:?}"
    );
    Grant {
        who,
        token,
        returned,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_grant_gets_a_greater_token_than_the_grant_it_follows() {
    let server = servers::shared(ServerKind::Postgres).unwrap_or_else(|e| panic!("{e}"));
    let prefix = format!("fencing_order_{}_", std::process::id());
    let config = config(server.url(), &prefix);
    // Two sessions (pools), each with its own connections; connecting creates the tables.
    let a = PostgresBackend::connect(&config).await.expect("connect A");
    let b = PostgresBackend::connect(&config).await.expect("connect B");

    let key = "fencing-order";
    let owner_a = format!("{key}@host/A.1.1");
    let owner_b = format!("{key}@host/B.1.1");

    // The stall: a trigger on this test's locks table that sleeps whenever a row of A's is
    // about to be written, that is, after A's statement computed the row (and its token) but
    // before the row is in the table.
    let admin = sqlx::PgPool::connect(server.url()).await.expect("admin");
    let install = format!(
        "CREATE FUNCTION \"{prefix}stall\"() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.owner_hash = '{owner_a}' THEN
                 PERFORM pg_sleep({stall});
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER \"{prefix}stall\" BEFORE INSERT OR UPDATE ON \"public\".\"{prefix}locks\"
             FOR EACH ROW EXECUTE FUNCTION \"{prefix}stall\"();",
        stall = STALL.as_secs_f64(),
    );
    sqlx::raw_sql(&install)
        .execute(&admin)
        .await
        .expect("install the stall trigger");

    let started = Instant::now();
    let session_a = {
        let owner_a = owner_a.clone();
        tokio::spawn(async move { grant_and_release(&a, "A", key, &owner_a).await })
    };
    // Let A's statement reach the trigger, then B takes and releases the key.
    tokio::time::sleep(STALL / 4).await;
    let session_b = grant_and_release(&b, "B", key, &owner_b).await;
    let session_a = session_a.await.expect("session A");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= STALL,
        "A's statement was not stalled (everything took {elapsed:?}); the trigger did not fire"
    );

    let (earlier, later) = if session_a.returned < session_b.returned {
        (session_a, session_b)
    } else {
        (session_b, session_a)
    };
    eprintln!("granted: {earlier:?}, then {later:?}");
    assert!(
        later.token > earlier.token,
        "{} was granted the key after {} but got the smaller fencing token ({} after {}); \
         a fenced resource that saw {}'s token would refuse {}",
        later.who,
        earlier.who,
        later.token,
        earlier.token,
        earlier.who,
        later.who,
    );

    sqlx::raw_sql(&format!(
        "DROP TRIGGER \"{prefix}stall\" ON \"public\".\"{prefix}locks\";
         DROP FUNCTION \"{prefix}stall\"();"
    ))
    .execute(&admin)
    .await
    .expect("drop the stall trigger");
}

/// A database made by version 1 (tokens from the sequence, which someone set to hand out
/// values through a per-session cache) is upgraded on connect, and every token given after the
/// upgrade is greater than every token given before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_database_keeps_tokens_above_the_old_ones() {
    let server = servers::shared(ServerKind::Postgres).unwrap_or_else(|e| panic!("{e}"));
    let prefix = format!("fencing_upgrade_{}_", std::process::id());
    let tables = Tables::new(Some("public"), &prefix).expect("tables");
    let admin = sqlx::PgPool::connect(server.url()).await.expect("admin");

    // Version 1, as an older release left it, with tokens up to 1000 given by the old
    // statement and one of them still stored, expired, under the key.
    let (version, step_1) = MIGRATIONS[0];
    assert_eq!(version, 1);
    let old = format!(
        "{step_1}
        CREATE TABLE {{migrations}} (
            version    integer     PRIMARY KEY,
            applied_at timestamptz NOT NULL DEFAULT now()
        );
        INSERT INTO {{migrations}} (version) VALUES (1);
        ALTER SEQUENCE {{fencing}} CACHE 20 CYCLE;
        SELECT setval('{{fencing}}', 999);
        INSERT INTO {{locks}} (key, owner_hash, record, fencing_token, expires_at)
            VALUES ('upgraded', 'gone', '{{}}', nextval('{{fencing}}'), now() - interval '1 second');"
    );
    sqlx::raw_sql(&tables.render(&old))
        .execute(&admin)
        .await
        .expect("a version 1 database");

    let backend = PostgresBackend::connect(&config(server.url(), &prefix))
        .await
        .expect("connect and upgrade");
    let versions: Vec<i32> =
        sqlx::query(&tables.render("SELECT version FROM {migrations} ORDER BY version"))
            .fetch_all(&admin)
            .await
            .expect("migrations")
            .iter()
            .map(|row| row.get("version"))
            .collect();
    let expected: Vec<i32> = MIGRATIONS.iter().map(|(v, _)| *v).collect();
    assert_eq!(versions, expected, "every step applied once");
    let sequence = sqlx::query(
        "SELECT cache_size, cycle FROM pg_sequences WHERE schemaname = 'public' \
         AND sequencename = $1",
    )
    .bind(format!("{prefix}fencing"))
    .fetch_one(&admin)
    .await
    .expect("the sequence");
    assert_eq!(sequence.get::<i64, _>("cache_size"), 1);
    assert!(!sequence.get::<bool, _>("cycle"));

    for key in ["upgraded", "new-after-upgrade"] {
        let owner = format!("{key}@host/U.1.1");
        let data = LockData::new(owner.clone(), "host/U.1".into(), None);
        let token = match backend
            .acquire(key, &data, Duration::from_secs(60))
            .await
            .expect("acquire")
        {
            AcquireOutcome::Acquired(lock) => lock.fencing_token.expect("token"),
            other => panic!("{key}: {other:?}"),
        };
        assert!(
            token > 1000,
            "{key}: token {token} after the old sequence gave 1000"
        );
        assert_eq!(
            backend.release(key, &owner).await.expect("release"),
            ReleaseOutcome::Released
        );
    }
}
