//! Round trips on the wire, seen by a proxy between the backend and the server that reads the
//! client's messages: each `Query` (simple protocol) and each `Sync` (extended protocol: sqlx's
//! unnamed statement is a `Parse`/`Describe`/`Sync`, then a `Bind`/`Execute`/`Sync`; its
//! connection test is a `Sync` alone) is one round trip. Every lock operation is one `Query`,
//! the one round trip its caller waits for. sqlx then tests the connection as it goes back to
//! the pool (a `Sync`, from a task of its own, after the answer); before use, a connection is
//! tested only when it sat idle.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use locker_conformance::servers::{self, ServerKind};
use locker_core::{
    AcquireDecision, ExtendOutcome, LockBackend, LockData, ProcessData, ReleaseOutcome,
};
use locker_postgres::{PostgresBackend, PostgresConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TTL: Duration = Duration::from_secs(30);

/// The messages the clients sent through the proxy that matter here, with the number of the
/// connection that sent each: `Q`uery, `S`ync, `P`arse, `B`ind.
#[derive(Default)]
struct Wire(Mutex<Vec<(usize, u8)>>);

impl Wire {
    /// Every connection's.
    fn sent(&self) -> String {
        self.0
            .lock()
            .expect("wire")
            .iter()
            .map(|&(_, m)| m as char)
            .collect()
    }

    fn len(&self) -> usize {
        self.0.lock().expect("wire").len()
    }

    /// What the connection that sent the first `kind` message from `from` on sent from there.
    fn sent_on_the_connection_of(&self, from: usize, kind: char) -> String {
        let wire = self.0.lock().expect("wire");
        let Some(&(conn, _)) = wire[from..].iter().find(|&&(_, m)| m as char == kind) else {
            return String::new();
        };
        wire[from..]
            .iter()
            .filter(|&&(c, _)| c == conn)
            .map(|&(_, m)| m as char)
            .collect()
    }
}

/// A proxy to `server` on a free loopback port; its address.
async fn proxy(server: String, wire: Arc<Wire>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        let mut connections = 0usize;
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            connections += 1;
            let conn = connections;
            let upstream = TcpStream::connect(&server).await.expect("server");
            let wire = wire.clone();
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = upstream.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                });
                let mut buf = Vec::new();
                let mut started = false;
                let mut chunk = [0u8; 16384];
                loop {
                    let n = match cr.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    // Whole messages: the startup message has no type byte, every later one has.
                    loop {
                        let head = if started { 5 } else { 4 };
                        if buf.len() < head {
                            break;
                        }
                        let at = head - 4;
                        let len = u32::from_be_bytes(buf[at..at + 4].try_into().expect("4 bytes"));
                        let total = at + len as usize;
                        if buf.len() < total {
                            break;
                        }
                        if started && matches!(buf[0], b'Q' | b'S' | b'P' | b'B') {
                            wire.0.lock().expect("wire").push((conn, buf[0]));
                        }
                        started = true;
                        buf.drain(..total);
                    }
                    if sw.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Runs `op`; its output, and the `kind` messages it sent (a message reaches the proxy before
/// its answer can come back).
async fn sends<T>(wire: &Wire, kind: char, op: impl std::future::Future<Output = T>) -> (usize, T) {
    let before = wire.sent().matches(kind).count();
    let out = op.await;
    (wire.sent().matches(kind).count() - before, out)
}

/// A backend through a proxy, and the proxy's record.
async fn through_proxy(parameters: &str) -> (PostgresBackend, Arc<Wire>) {
    let server = servers::shared(ServerKind::Postgres).unwrap_or_else(|e| panic!("{e}"));
    let direct = PostgresConfig::from_url(server.url()).expect("url");
    let upstream = format!(
        "{}:{}",
        direct.connect_options().get_host(),
        direct.connect_options().get_port()
    );
    let wire = Arc::new(Wire::default());
    let addr = proxy(upstream, wire.clone()).await;
    let config = PostgresConfig::from_url(&format!(
        "postgres://{}@{addr}/{}?sslmode=disable&table_prefix=round_trips_{parameters}",
        direct.connect_options().get_username(),
        direct
            .connect_options()
            .get_database()
            .unwrap_or("postgres"),
    ))
    .expect("url");
    let b = PostgresBackend::connect(&config).await.expect("connect");
    (b, wire)
}

/// Every lock operation once, each sending one `kind` message (`Query`, or a prepared
/// statement's `Bind`), the last two after an idle second; how many operations.
async fn every_operation(b: &PostgresBackend, wire: &Wire, kind: char) -> usize {
    let (me, other) = ("round-trips/me", "round-trips/other");
    let mine = |key: &str| LockData::new(format!("{key}@{me}"), me.into(), None);
    let theirs =
        |key: &str, process: &str| LockData::new(format!("{key}@{process}"), process.into(), None);
    let key = format!("round-trips/{}", locker_core::new_process_hash());
    let dead_key = format!("{key}/dead");
    let data = mine(&key);

    let (sent, r) = sends(wire, kind, b.ping(me, &ProcessData::now(), TTL)).await;
    r.expect("ping");
    assert_eq!(sent, 1, "liveness write");
    let (sent, r) = sends(wire, kind, b.ping(other, &ProcessData::now(), TTL)).await;
    r.expect("ping");
    assert_eq!(sent, 1, "liveness write");

    let (sent, r) = sends(wire, kind, b.acquire_checked(&key, &data, TTL)).await;
    assert!(matches!(r.expect("acquire"), AcquireDecision::Acquired(_)));
    assert_eq!(sent, 1, "acquire of a free key");

    let (sent, r) = sends(
        wire,
        kind,
        b.acquire_checked(&key, &theirs(&key, other), TTL),
    )
    .await;
    assert!(matches!(r.expect("try"), AcquireDecision::HeldByLive(_)));
    assert_eq!(sent, 1, "try on a key held by a live process");

    let (sent, r) = sends(wire, kind, b.extend(&key, &data, TTL, &data.owner_hash)).await;
    assert!(matches!(r.expect("extend"), ExtendOutcome::Extended(_)));
    assert_eq!(sent, 1, "extend");

    let (sent, r) = sends(wire, kind, b.read(&key)).await;
    assert!(r.expect("read").is_some());
    assert_eq!(sent, 1, "read");

    let (sent, r) = sends(wire, kind, b.read_many(&[key.as_str(), dead_key.as_str()])).await;
    assert_eq!(r.expect("read_many").len(), 2);
    assert_eq!(sent, 1, "read of many keys");

    let (sent, r) = sends(wire, kind, b.release(&key, &data.owner_hash)).await;
    assert!(matches!(r.expect("release"), ReleaseOutcome::Released));
    assert_eq!(sent, 1, "release");

    // A holder whose process wrote no liveness record: replaced in the same call.
    let dead = theirs(&dead_key, "round-trips/dead");
    let (sent, r) = sends(wire, kind, b.acquire_checked(&dead_key, &dead, TTL)).await;
    assert!(matches!(r.expect("dead's"), AcquireDecision::Acquired(_)));
    assert_eq!(sent, 1, "acquire of a free key");
    let (sent, r) = sends(
        wire,
        kind,
        b.acquire_checked(&dead_key, &mine(&dead_key), TTL),
    )
    .await;
    assert!(matches!(
        r.expect("take over"),
        AcquireDecision::TookOver { .. }
    ));
    assert_eq!(sent, 1, "takeover of a dead holder's lock");

    // A connection that sat idle for over a second is tested before use.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (sent, r) = sends(wire, kind, b.read(&key)).await;
    assert!(r.expect("read").is_none());
    assert_eq!(sent, 1, "a read on a connection idle for over a second");
    let (sent, r) = sends(wire, kind, b.read(&key)).await;
    assert!(r.expect("read").is_none());
    assert_eq!(sent, 1, "the next read");
    12
}

/// The exchange `sent` of one connection, cut at each `kind` message of `ops` operations (the
/// last two after an idle second): before each, `between` (what the operation before sent
/// after its `kind`: a prepared statement's `Sync`, sqlx's test of the connection as it went
/// back to the pool), with `after_idle` (a test) before the read after the idle second.
fn check_exchange(sent: &str, kind: char, ops: usize, between: &str, after_idle: &str) {
    let gaps: Vec<&str> = sent.split(kind).collect();
    assert_eq!(gaps.len(), ops + 1, "{sent}");
    assert_eq!(gaps[0], "", "{sent}");
    for (i, gap) in gaps[1..ops].iter().enumerate() {
        let want = if i + 1 == ops - 2 {
            format!("{between}{after_idle}")
        } else {
            between.to_owned()
        };
        assert_eq!(*gap, want, "before operation {}: {sent}", i + 2);
    }
}

/// The locker's own pool: a connection whose operation completed is kept for the next, and
/// not tested (sqlx would test it as it goes back to its pool, and as it hands it out again);
/// one kept for over a second is.
#[tokio::test]
async fn every_lock_operation_is_one_round_trip() {
    let (b, wire) = through_proxy("&max_connections=2").await;
    // A first operation takes a connection from sqlx's pool (tested there) and keeps it.
    every_operation(&b, &wire, 'Q').await;
    let start = wire.len();
    let ops = every_operation(&b, &wire, 'Q').await;
    let sent = wire.sent_on_the_connection_of(start, 'Q');
    // One `Query` each, on the kept connection, and nothing else but the test after the idle
    // second. No `Parse`: no named statement is ever prepared, nothing for a transaction-mode
    // pooler to lose.
    check_exchange(&sent, 'Q', ops, "", "S");
    assert_eq!(
        wire.len() - start,
        sent.len(),
        "one connection: {}",
        wire.sent()
    );
}

/// With `prepared_statements`, each statement is prepared once per connection (a `Parse`),
/// then each operation is a `Bind`, `Execute` and `Sync`: one round trip, with no `Parse`.
#[tokio::test]
async fn with_prepared_statements_too() {
    let (b, wire) = through_proxy("&max_connections=2&prepared_statements=true").await;
    let warm = wire.len();
    every_operation(&b, &wire, 'B').await;
    assert!(
        wire.sent()[warm..].contains('P'),
        "prepared once: {}",
        wire.sent()
    );
    let start = wire.len();
    let ops = every_operation(&b, &wire, 'B').await;
    // One `Bind` each, and its `Sync`.
    check_exchange(
        &wire.sent_on_the_connection_of(start, 'B'),
        'B',
        ops,
        "S",
        "S",
    );
}

/// Through sqlx's pool alone (a pool of one connection keeps none out of it, so that the
/// notifier's probe always finds it; the application's pool works the same way): sqlx tests
/// the connection as it hands it out and as it takes it back.
#[tokio::test]
async fn through_sqlxs_pool_a_test_before_and_after() {
    let (b, wire) = through_proxy("&max_connections=1").await;
    every_operation(&b, &wire, 'Q').await;
    let start = wire.len();
    let ops = every_operation(&b, &wire, 'Q').await;
    let sent = wire.sent_on_the_connection_of(start, 'Q');
    // From the first `Query` on: the test after each, and the test before the next, idle or
    // not.
    let from_first = &sent[sent.find('Q').unwrap_or(0)..];
    check_exchange(from_first, 'Q', ops, "SS", "");
}

/// An operation that fails on a kept connection sends all the kept ones back to sqlx's pool,
/// which tests them before they are used again: when the server dropped every connection at
/// once, one operation fails, not one per kept connection.
#[tokio::test]
async fn a_failure_sends_every_kept_connection_back_to_be_tested() {
    let server = tokio::task::spawn_blocking(|| servers::start_private(ServerKind::Postgres))
        .await
        .expect("join")
        .unwrap_or_else(|e| panic!("{e}"));
    let config = PostgresConfig::from_url(server.url())
        .expect("url")
        .into_builder()
        .max_connections(4)
        .build()
        .expect("config");
    let b = Arc::new(PostgresBackend::connect(&config).await.expect("connect"));
    let key = format!("round-trips/{}", locker_core::new_process_hash());
    let options: sqlx::postgres::PgConnectOptions = server.url().parse().expect("url");
    let mut admin = sqlx::ConnectOptions::connect(&options.application_name("admin"))
        .await
        .expect("admin connection");
    let locker_connections = "SELECT count(*) FROM pg_stat_activity \
         WHERE application_name = 'distributed-locker'";
    // Three connections at work at once, then kept: concurrent reads until the server has
    // seen three (on a busy machine, a round may be served by fewer).
    for round in 0.. {
        let reads: Vec<_> = (0..6)
            .map(|_| {
                let (b, key) = (b.clone(), key.clone());
                tokio::spawn(async move { b.read(&key).await })
            })
            .collect();
        for read in reads {
            read.await.expect("join").expect("read");
        }
        let open: i64 = sqlx::query_scalar(locker_connections)
            .fetch_one(&mut admin)
            .await
            .expect("count");
        if open >= 3 {
            break;
        }
        assert!(
            round < 200,
            "{open} connections after {round} rounds of 6 reads"
        );
    }
    // Every connection of the locker is dropped by the server.
    let ended: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'distributed-locker') AS t",
    )
    .fetch_one(&mut admin)
    .await
    .expect("terminate");
    assert!(ended >= 3, "connections ended: {ended}");
    let mut failed = Vec::new();
    for i in 0..6 {
        if let Err(e) = b.read(&key).await {
            assert!(e.is_retryable(), "{e}");
            failed.push(i);
        }
    }
    assert!(failed.len() <= 1, "reads that failed: {failed:?}");
}

/// Values are written into the statements (or bound, with `prepared_statements`): quotes,
/// backslashes, placeholders, comments and other scripts in keys and records come back as they
/// went in, and a NUL is a typed error.
#[tokio::test]
async fn values_with_quotes_and_backslashes_come_back_whole() {
    for prepared in [false, true] {
        odd_values_come_back(prepared).await;
    }
}

async fn odd_values_come_back(prepared: bool) {
    let server = servers::shared(ServerKind::Postgres).unwrap_or_else(|e| panic!("{e}"));
    let config = PostgresConfig::from_url(server.url())
        .expect("url")
        .into_builder()
        .table_prefix("round_trips_")
        .prepared_statements(prepared)
        .build()
        .expect("config");
    let b = PostgresBackend::connect(&config).await.expect("connect");
    let odd = "it's a \\ 'key' with \\' and '' and $1 and $$ and E'x' ; DROP TABLE t; -- ünï 鍵 \u{1F512}";
    let key = format!("{odd} {}", locker_core::new_process_hash());
    let data = LockData::new(
        format!("{key}@{odd}"),
        format!("{odd}/1"),
        Some(format!("trace {odd} \\n \"quoted\"")),
    );
    let stored = match b.acquire_checked(&key, &data, TTL).await.expect("acquire") {
        AcquireDecision::Acquired(stored) => stored,
        other => panic!("{other:?}"),
    };
    assert_eq!(stored.owner_hash, data.owner_hash);
    assert_eq!(stored.trace, data.trace);
    // The holder's record, as another owner's calls answer it (without prepared statements,
    // inside the function's composite answer, where quotes and backslashes are doubled).
    let other = LockData::new(format!("{key}@other {odd}"), format!("{odd}/2"), None);
    let holder = |outcome: &dyn std::fmt::Debug, found: &LockData| {
        assert_eq!(found.owner_hash, data.owner_hash, "{outcome:?}");
        assert_eq!(found.process_hash, data.process_hash, "{outcome:?}");
        assert_eq!(found.trace, data.trace, "{outcome:?}");
        assert_eq!(found.fencing_token, stored.fencing_token, "{outcome:?}");
    };
    match b.acquire(&key, &other, TTL).await.expect("acquire") {
        locker_core::AcquireOutcome::Held(found) => holder(&"acquire", &found),
        other => panic!("{other:?}"),
    }
    match b
        .extend(&key, &other, TTL, &other.owner_hash)
        .await
        .expect("extend")
    {
        locker_core::ExtendOutcome::Held(found) => holder(&"extend", &found),
        other => panic!("{other:?}"),
    }
    match b.release(&key, &other.owner_hash).await.expect("release") {
        ReleaseOutcome::Held(found) => holder(&"release", &found),
        other => panic!("{other:?}"),
    }
    match b
        .extend(&key, &data, TTL, &data.owner_hash)
        .await
        .expect("extend")
    {
        locker_core::ExtendOutcome::Extended(mine) => {
            assert_eq!(mine.trace, data.trace);
            assert_eq!(mine.fencing_token, stored.fencing_token);
        }
        other => panic!("{other:?}"),
    }
    let read = b.read(&key).await.expect("read").expect("a lock");
    assert_eq!(read.owner_hash, data.owner_hash);
    assert_eq!(read.process_hash, data.process_hash);
    assert_eq!(read.trace, data.trace);
    let many = b.read_many(&[key.as_str(), odd]).await.expect("read_many");
    assert_eq!(many.len(), 2);
    assert!(many[0].as_ref().expect("first").is_some());
    assert!(many[1].as_ref().expect("second").is_none());
    assert!(matches!(
        b.release(&key, &data.owner_hash).await.expect("release"),
        ReleaseOutcome::Released
    ));
    let e = b
        .read(&format!("{key}\0"))
        .await
        .expect_err("a NUL is refused");
    assert_eq!(e.kind(), locker_core::ErrorKind::InvalidInput);
}

/// An application pool without a statement cache would leave every prepared statement open on
/// the server: with `prepared_statements`, connecting refuses it.
#[tokio::test]
async fn prepared_statements_need_the_pools_statement_cache() {
    let server = servers::shared(ServerKind::Postgres).unwrap_or_else(|e| panic!("{e}"));
    let options: sqlx::postgres::PgConnectOptions = server.url().parse().expect("url");
    let no_cache =
        sqlx::postgres::PgPoolOptions::new().connect_lazy_with(options.statement_cache_capacity(0));
    let config = |prepared: bool| {
        PostgresConfig::builder()
            .pool(no_cache.clone())
            .table_prefix("round_trips_")
            .prepared_statements(prepared)
            .build()
            .expect("config")
    };
    let e = PostgresBackend::connect(&config(true))
        .await
        .expect_err("refused");
    assert_eq!(e.kind(), locker_core::ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("statement cache"), "{e}");
    PostgresBackend::connect(&config(false))
        .await
        .expect("without prepared statements, any pool");
}
