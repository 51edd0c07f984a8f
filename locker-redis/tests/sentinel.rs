//! Redis Sentinel (issue 19): a locker on `redis+sentinel://` follows a failover. A master, its
//! replica and three sentinels run as local processes (`down-after-milliseconds 1000`); a
//! locker holds locks; the master is killed (SIGKILL); the sentinels promote the replica.
//! Measured, for each client library: how many of the held locks their jobs still hold after
//! the failover (their heartbeats pass and nobody else can take them), and how long until a
//! new lock can be acquired. The figures are printed (README, "Guarantees, and their limits").

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
