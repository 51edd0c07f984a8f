//! Redis Sentinel (issue 19): a locker on `redis+sentinel://` follows a failover. A master, its
//! replica and three sentinels run as local processes (`down-after-milliseconds 1000`); a
//! locker holds locks; the master is killed (SIGKILL); the sentinels promote the replica.
//! Measured, for each client library: how many of the held locks their jobs still hold after
//! the failover (their heartbeats pass and nobody else can take them), and how long until a
//! new lock can be acquired. The figures are printed (README, "Guarantees, and their limits").
//! And a graceful failover (`SENTINEL FAILOVER`), where the old master lives on as a replica:
//! the locker's connection, made again to the same address, answers reads but refuses writes
//! (`READONLY`), and must be replaced at once, though the reads succeed in between.

use std::time::{Duration, Instant};

use locker_conformance::servers;
use locker_core::{LockAttempt, LockGuard, Locker};
use locker_redis::{ClientLibrary, RedisConfig};

const LOCKS: usize = 5;
/// Longer than a failover here (down-after 1 s, then the election and the promotion).
const LIVENESS: Duration = Duration::from_secs(10);

fn locker(config: &RedisConfig) -> Locker {
    Locker::builder(config.clone())
        .report_every(Duration::from_millis(500))
        .liveness_ttl(LIVENESS)
        .lock_ttl(Duration::from_secs(60))
        .extend_every(Duration::from_secs(5))
        .recheck_every(Duration::from_millis(500))
        .reporter_start_timeout(Duration::from_secs(10))
        .build()
        .expect("locker")
}

async fn held_by_someone(locker: &Locker, key: &str) -> bool {
    matches!(locker.acquire(key).await, Ok(LockAttempt::Held(_)))
}

async fn failover(client: ClientLibrary) {
    let server = servers::start_redis_sentinel().unwrap_or_else(|e| panic!("{e}"));
    let config = RedisConfig::from_url(server.url())
        .expect("url")
        .with_client(client);
    let a = locker(&config);
    let mut guards: Vec<LockGuard> = Vec::new();
    for i in 0..LOCKS {
        match a.acquire(format!("job-{i}")).await.expect("acquire") {
            LockAttempt::Acquired(guard) => guards.push(guard),
            LockAttempt::Held(h) => panic!("held by {}", h.owner_hash),
        }
    }
    // Let the replica have the records.
    tokio::time::sleep(Duration::from_millis(500)).await;

    server
        .node(0)
        .expect("the master")
        .kill()
        .expect("kill the master");
    let killed = Instant::now();
    // A new lock, as soon as the store takes writes again.
    let recovered = loop {
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "{client:?}: no lock could be acquired within 60 s of the failover"
        );
        match tokio::time::timeout(Duration::from_secs(2), a.acquire("after-failover")).await {
            Ok(Ok(LockAttempt::Acquired(guard))) => {
                let took = killed.elapsed();
                let _released = guard.release().await;
                break took;
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    // The held locks: their jobs' heartbeats pass (the liveness TTL outlived the failover),
    // and another locker finds them held.
    let b = locker(&config);
    let mut kept = 0;
    for guard in &guards {
        let beat = guard.heartbeat().beat().await;
        if beat.is_ok() && held_by_someone(&b, guard.key()).await {
            kept += 1;
        } else {
            eprintln!("{client:?}: {} lost: {beat:?}", guard.key());
        }
    }
    eprintln!(
        "sentinel failover ({client:?}): a new lock after {:.1} s; {kept} of {LOCKS} held locks \
         kept",
        recovered.as_secs_f64()
    );
    assert_eq!(
        kept, LOCKS,
        "{client:?}: locks held before the failover were lost"
    );
    for guard in guards {
        let _released = guard.release().await;
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_rs_follows_a_sentinel_failover() {
    failover(ClientLibrary::Redis).await;
}

#[cfg(feature = "fred")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fred_follows_a_sentinel_failover() {
    failover(ClientLibrary::Fred).await;
}

/// The master as a sentinel names it now.
async fn master_port(sentinel_url: &str) -> u16 {
    let sentinel = sentinel_url
        .trim_start_matches("redis+sentinel://")
        .split(',')
        .next()
        .expect("a sentinel")
        .to_owned();
    let client = redis::Client::open(format!("redis://{sentinel}")).expect("sentinel client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("sentinel connection");
    let (_, port): (String, u16) = redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg("locker")
        .query_async(&mut conn)
        .await
        .expect("the master's address");
    port
}

async fn graceful_failover(client: ClientLibrary) {
    let server = servers::start_redis_sentinel().unwrap_or_else(|e| panic!("{e}"));
    let config = RedisConfig::from_url(server.url())
        .expect("url")
        .with_client(client);
    let a = locker(&config);
    let guard = match a.acquire("graceful").await.expect("acquire") {
        LockAttempt::Acquired(guard) => guard,
        LockAttempt::Held(h) => panic!("held by {}", h.owner_hash),
    };
    let before = master_port(server.url()).await;
    let sentinel = server
        .url()
        .trim_start_matches("redis+sentinel://")
        .split(',')
        .next()
        .expect("a sentinel")
        .to_owned();
    let mut conn = redis::Client::open(format!("redis://{sentinel}"))
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connection");
    // A sentinel picks a replica only after it has read the replica's INFO: right after start
    // it may not have yet and answers NOGOODSLAVE. Ask again until it accepts.
    let asked = Instant::now();
    loop {
        let reply: redis::RedisResult<String> = redis::cmd("SENTINEL")
            .arg("FAILOVER")
            .arg("locker")
            .query_async(&mut conn)
            .await;
        match reply {
            Ok(_) => break,
            Err(e) if e.to_string().contains("NOGOODSLAVE") => {
                assert!(
                    asked.elapsed() < Duration::from_secs(30),
                    "SENTINEL FAILOVER still refused after 30 s: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("SENTINEL FAILOVER: {e}"),
        }
    }
    let started = Instant::now();
    while master_port(server.url()).await == before {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no failover within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Writes and reads in turn: a read that succeeds must not keep the connection to the old
    // master (a replica now) alive.
    let extended = loop {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{client:?}: the lock could not be extended within 30 s of a graceful failover: the \
             connection stayed on the old master"
        );
        if guard.extend().await.is_ok() {
            break started.elapsed();
        }
        let _ = a.inspect("graceful").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "graceful sentinel failover ({client:?}): extended again {:.1} s after SENTINEL FAILOVER",
        extended.as_secs_f64()
    );
    let _released = guard.release().await;
    a.shutdown().await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_rs_leaves_an_old_master_that_refuses_writes() {
    graceful_failover(ClientLibrary::Redis).await;
}

#[cfg(feature = "fred")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fred_leaves_an_old_master_that_refuses_writes() {
    graceful_failover(ClientLibrary::Fred).await;
}
