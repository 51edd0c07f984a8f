//! Concurrent script calls of one connection go together (one `EVALSHA` for many operations),
//! each operation keeping its own atomic outcome: on both clients, standalone and on a cluster.

use std::sync::Arc;
use std::time::Duration;

use locker_conformance::servers::{self, ServerKind};
use locker_core::{
    new_owner_hash, AcquireDecision, ErrorKind, LockBackend, LockData, ProcessData, ReleaseOutcome,
};
use locker_redis::{ClientLibrary, RedisBackend, RedisConfig};
use redis::AsyncCommands;

const TTL: Duration = Duration::from_secs(30);

fn record(key: &str, n: usize) -> LockData {
    let process = format!("batch-host/{n}.{n}");
    let owner = new_owner_hash(key, &process, None).expect("owner");
    LockData::new(owner, process, None)
}

/// The number of `EVALSHA` calls the server has answered.
async fn evalsha_calls(redis: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(redis)
        .await
        .expect("info");
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

async fn concurrent_operations_share_calls_and_keep_their_outcomes(client: ClientLibrary) {
    // A server of its own: the call count is this test's alone.
    let server = tokio::task::spawn_blocking(|| servers::start_private(ServerKind::Redis))
        .await
        .expect("task")
        .unwrap_or_else(|e| panic!("{e}"));
    let config = RedisConfig::from_url(server.url())
        .expect("url")
        .into_builder()
        .client(client)
        // A hash tag: every key on one slot, so every lock shares one fencing counter.
        .key_prefix("batch{one}:")
        .build()
        .expect("config");
    let b = Arc::new(RedisBackend::connect(&config).await.expect("connect"));
    let mut redis = redis::Client::open(server.url())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    // A lock key of another type: the script fails on it, and must fail only its own caller.
    let _: () = redis
        .hset(b.lock_key("wrong-type"), "f", "v")
        .await
        .expect("hset");

    let (keys, contenders) = (50, 4);
    let before = evalsha_calls(&mut redis).await;
    let mut tasks = Vec::new();
    for k in 0..keys {
        for c in 0..contenders {
            let (b, key) = (b.clone(), format!("key-{k}"));
            tasks.push(tokio::spawn(async move {
                let mine = record(&key, c);
                b.ping(&mine.process_hash, &ProcessData::now(), TTL)
                    .await
                    .expect("ping");
                let decision = b.acquire_checked(&key, &mine, TTL).await.expect("acquire");
                (key, mine, decision)
            }));
        }
    }
    let wrong = {
        let b = b.clone();
        tokio::spawn(async move {
            b.acquire_checked("wrong-type", &record("wrong-type", 0), TTL)
                .await
        })
    };
    let mut winners = std::collections::HashMap::new();
    for t in tasks {
        let (key, mine, decision) = t.await.expect("task");
        match decision {
            AcquireDecision::Acquired(stored) => {
                assert_eq!(stored.owner_hash, mine.owner_hash);
                assert!(
                    winners.insert(key.clone(), stored).is_none(),
                    "two winners for {key}"
                );
            }
            AcquireDecision::HeldByLive(holder) => assert_ne!(holder.owner_hash, mine.owner_hash),
            other => panic!("{key}: {other:?}"),
        }
    }
    assert_eq!(winners.len(), keys, "every key has its one winner");
    // One counter (one slot), read and stored once per call of a batch: every token is new,
    // and a later acquire draws above them all.
    let tokens: std::collections::BTreeSet<u64> = winners
        .values()
        .map(|stored| stored.fencing_token.expect("a token"))
        .collect();
    assert_eq!(tokens.len(), keys, "a token was drawn twice: {tokens:?}");
    let e = wrong
        .await
        .expect("task")
        .expect_err("a hash is not a lock");
    assert_ne!(e.kind(), ErrorKind::InvalidInput, "{e}");

    // Every winner's record is stored, and its release (concurrent too) deletes it.
    let releases: Vec<_> = winners
        .iter()
        .map(|(key, stored)| {
            let (b, key, owner) = (b.clone(), key.clone(), stored.owner_hash.clone());
            tokio::spawn(async move { b.release(&key, &owner).await })
        })
        .collect();
    for r in releases {
        assert_eq!(
            r.await.expect("task").expect("release"),
            ReleaseOutcome::Released
        );
    }
    for key in winners.keys() {
        assert_eq!(b.read(key).await.expect("read"), None);
    }
    let later = record("later", 0);
    match b
        .acquire_checked("later", &later, TTL)
        .await
        .expect("acquire")
    {
        AcquireDecision::Acquired(stored) => assert!(
            stored.fencing_token > tokens.last().copied(),
            "{:?} after {tokens:?}",
            stored.fencing_token
        ),
        other => panic!("{other:?}"),
    }
    let calls = evalsha_calls(&mut redis).await - before;
    let operations = (keys * contenders + 1 + keys) as u64;
    assert!(
        calls < operations / 2,
        "{operations} concurrent operations took {calls} script calls: not grouped"
    );
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_operations_share_calls_redis_rs() {
    concurrent_operations_share_calls_and_keep_their_outcomes(ClientLibrary::Redis).await;
}

#[cfg(feature = "fred")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_operations_share_calls_fred() {
    concurrent_operations_share_calls_and_keep_their_outcomes(ClientLibrary::Fred).await;
}
