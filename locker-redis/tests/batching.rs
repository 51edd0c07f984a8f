//! Concurrent script calls of one connection go together (one `EVALSHA` for many operations),
//! each operation keeping its own atomic outcome: on both clients, standalone and on a cluster.

mod common;
use common::{command_calls, private_redis};

use std::sync::Arc;
use std::time::Duration;

use locker_conformance::servers::Server;
use locker_core::{
    new_owner_hash, AcquireDecision, ErrorKind, LockBackend, LockData, ProcessData, ReleaseOutcome,
};
use locker_redis::{ClientLibrary, RedisBackend};
use redis::AsyncCommands;

const TTL: Duration = Duration::from_secs(30);

fn record(key: &str, n: usize) -> LockData {
    let process = format!("batch-host/{n}.{n}");
    let owner = new_owner_hash(key, &process, None).expect("owner");
    LockData::new(owner, process, None)
}

/// The number of `EVALSHA` calls the server has answered.
async fn evalsha_calls(redis: &mut redis::aio::MultiplexedConnection) -> u64 {
    command_calls(redis, "evalsha").await
}

/// A backend on a server of its own, with `prefix`, and a plain connection to the server.
async fn private_backend(
    client: ClientLibrary,
    prefix: &str,
) -> (Server, Arc<RedisBackend>, redis::aio::MultiplexedConnection) {
    let (server, config, redis) = private_redis(client, prefix).await;
    let b = Arc::new(RedisBackend::connect(&config).await.expect("connect"));
    (server, b, redis)
}

async fn concurrent_operations_share_calls_and_keep_their_outcomes(client: ClientLibrary) {
    // A hash tag: every key on one slot, so every lock shares one fencing counter.
    let (_server, b, mut redis) = private_backend(client, "batch{one}:").await;
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

/// In a batch, on Redis 7.0 or newer, an acquire is one `SET … NX GET`: no `GET` of the lock
/// key first. Free keys, held keys and a key holding an empty value (free, in the Node
/// library's terms) each get their right answer, and the tokens of one call stay distinct.
async fn batched_acquires_store_and_read_in_one_command(client: ClientLibrary) {
    let (_server, b, mut redis) = private_backend(client, "setget{one}:").await;
    let version: String = redis::cmd("INFO")
        .arg("server")
        .query_async::<String>(&mut redis)
        .await
        .expect("info")
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:").map(str::to_owned))
        .expect("redis_version");
    let major: u32 = version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .expect("major");
    assert!(
        major >= 7,
        "this test needs Redis 7.0 or newer (found {version}): `scripts/test` installs one"
    );
    let holder = record("held", 99);
    match b.acquire("held", &holder, TTL).await.expect("acquire") {
        locker_core::AcquireOutcome::Acquired(_) => {}
        other => panic!("{other:?}"),
    }
    let _: () = redis.set(b.lock_key("empty"), "").await.expect("set empty");

    let before = command_calls(&mut redis, "get").await;
    let acquires = 60;
    let mut tasks = Vec::new();
    for n in 0..acquires {
        let b = b.clone();
        let key = match n {
            0 => "held".to_owned(),
            1 => "empty".to_owned(),
            n => format!("free-{n}"),
        };
        tasks.push(tokio::spawn(async move {
            let mine = record(&key, n);
            let outcome = b.acquire(&key, &mine, TTL).await.expect("acquire");
            (key, outcome)
        }));
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.expect("task"));
    }
    let gets = command_calls(&mut redis, "get").await - before;
    // Alone, an acquire reads the key and then the counter; in a batch, only the counter,
    // once per call. Reading every key first would be at least 60.
    assert!(
        gets < acquires as u64 / 2,
        "{acquires} concurrent acquires made {gets} GETs: batched acquires read their keys first"
    );
    let mut tokens = std::collections::BTreeSet::new();
    for (key, outcome) in outcomes {
        match (key.as_str(), outcome) {
            ("held", locker_core::AcquireOutcome::Held(h)) => {
                assert_eq!(h.owner_hash, holder.owner_hash)
            }
            (_, locker_core::AcquireOutcome::Acquired(stored)) if key != "held" => {
                assert!(tokens.insert(stored.fencing_token.expect("token")));
                assert_eq!(
                    b.read(&key).await.expect("read").map(|r| r.owner_hash),
                    Some(stored.owner_hash)
                );
            }
            (key, other) => panic!("{key}: {other:?}"),
        }
    }
    assert_eq!(
        tokens.len(),
        acquires - 1,
        "every free key has its own token"
    );
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_acquires_store_and_read_in_one_command_redis_rs() {
    batched_acquires_store_and_read_in_one_command(ClientLibrary::Redis).await;
}

#[cfg(feature = "fred")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_acquires_store_and_read_in_one_command_fred() {
    batched_acquires_store_and_read_in_one_command(ClientLibrary::Fred).await;
}

/// Every kind of operation, concurrently, so that the batches mix them (each letter of the
/// batch script, with keys and arguments of different counts per operation): each keeps its
/// own answer, and they share calls.
async fn every_kind_of_operation_keeps_its_answer_in_a_batch(client: ClientLibrary) {
    use locker_core::{AcquireOutcome, ExtendOutcome};
    let (_server, b, mut redis) = private_backend(client, "mixed{one}:").await;
    let n = 40;
    // Held by `holder(i)`, whose process is alive.
    let holder = |i: usize| record(&format!("held-{i}"), 1000 + i);
    let mut held = Vec::new();
    for i in 0..n {
        let mine = holder(i);
        b.ping(&mine.process_hash, &ProcessData::now(), TTL)
            .await
            .expect("ping");
        match b
            .acquire(&format!("held-{i}"), &mine, TTL)
            .await
            .expect("acquire")
        {
            AcquireOutcome::Acquired(stored) => held.push(stored),
            other => panic!("{other:?}"),
        }
    }
    let before = evalsha_calls(&mut redis).await;
    let mut tasks: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    for (i, stored) in held.iter().cloned().enumerate() {
        let key = format!("held-{i}");
        let stranger = record(&key, 2000 + i);
        let (b1, b2, b3, b4, b5) = (b.clone(), b.clone(), b.clone(), b.clone(), b.clone());
        let (k1, k2, k3, k4, k5) = (key.clone(), key.clone(), key.clone(), key.clone(), key);
        let (s1, s2, s3) = (stranger.clone(), stranger.clone(), stranger);
        let owner = stored.owner_hash.clone();
        let token = stored.fencing_token;
        // The owner extends: the token stays.
        let extended = stored.clone();
        tasks.push(tokio::spawn(async move {
            match b1
                .extend(&k1, &extended, TTL, &owner)
                .await
                .expect("extend")
            {
                ExtendOutcome::Extended(data) => assert_eq!(data.fencing_token, token),
                other => panic!("{other:?}"),
            }
        }));
        // A stranger extends, releases, acquires (plain and checked) and takes over from a
        // dead owner who is not the holder: each finds the holder's record.
        let holder_hash = stored.owner_hash.clone();
        tasks.push(tokio::spawn(async move {
            let h = &holder_hash;
            match b2
                .extend(&k2, &s1, TTL, &s1.owner_hash)
                .await
                .expect("extend")
            {
                ExtendOutcome::Held(r) => assert_eq!(&r.owner_hash, h),
                other => panic!("{other:?}"),
            }
        }));
        let holder_hash = stored.owner_hash.clone();
        tasks.push(tokio::spawn(async move {
            match b3.release(&k3, &s2.owner_hash).await.expect("release") {
                ReleaseOutcome::Held(r) => assert_eq!(&r.owner_hash, &holder_hash),
                other => panic!("{other:?}"),
            }
        }));
        let holder_hash = stored.owner_hash.clone();
        tasks.push(tokio::spawn(async move {
            match b4.acquire(&k4, &s3, TTL).await.expect("acquire") {
                AcquireOutcome::Held(r) => assert_eq!(&r.owner_hash, &holder_hash),
                other => panic!("{other:?}"),
            }
            match b4.acquire_checked(&k4, &s3, TTL).await.expect("acquire") {
                AcquireDecision::HeldByLive(r) => assert_eq!(&r.owner_hash, &holder_hash),
                other => panic!("{other:?}"),
            }
        }));
        let holder_hash = stored.owner_hash.clone();
        tasks.push(tokio::spawn(async move {
            let heir = record(&k5, 3000 + i);
            match b5
                .take_over(&k5, &heir, TTL, "someone-else@nowhere/1.1.1")
                .await
                .expect("take over")
            {
                AcquireOutcome::Held(r) => assert_eq!(&r.owner_hash, &holder_hash),
                other => panic!("{other:?}"),
            }
        }));
        // On keys nobody holds: an extend and a release find nothing; a take-over of a dead
        // owner's lock that is gone stores the heir's.
        let b6 = b.clone();
        tasks.push(tokio::spawn(async move {
            let key = format!("free-{i}");
            let mine = record(&key, 4000 + i);
            assert_eq!(
                b6.extend(&key, &mine, TTL, &mine.owner_hash)
                    .await
                    .expect("extend"),
                ExtendOutcome::NoKey
            );
            assert_eq!(
                b6.release(&key, &mine.owner_hash).await.expect("release"),
                ReleaseOutcome::NoKey
            );
            match b6
                .take_over(&key, &mine, TTL, "dead@nowhere/1.1.1")
                .await
                .expect("take over")
            {
                AcquireOutcome::Acquired(stored) => {
                    assert_eq!(stored.owner_hash, mine.owner_hash);
                    assert!(stored.fencing_token.is_some());
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(
                b6.release(&key, &mine.owner_hash).await.expect("release"),
                ReleaseOutcome::Released
            );
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let calls = evalsha_calls(&mut redis).await - before;
    let operations = (n * 10) as u64;
    assert!(
        calls < operations / 2,
        "{operations} concurrent operations took {calls} script calls: not grouped"
    );
    // Every holder's lock is still its own, extended by its owner only.
    for (i, stored) in held.iter().enumerate() {
        let now = b.read(&format!("held-{i}")).await.expect("read");
        assert_eq!(now.map(|r| r.owner_hash), Some(stored.owner_hash.clone()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_operation_in_a_batch_redis_rs() {
    every_kind_of_operation_keeps_its_answer_in_a_batch(ClientLibrary::Redis).await;
}

#[cfg(feature = "fred")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_operation_in_a_batch_fred() {
    every_kind_of_operation_keeps_its_answer_in_a_batch(ClientLibrary::Fred).await;
}
