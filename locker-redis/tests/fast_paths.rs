//! The scripts' fast paths (owner hashes compared by prefix, the token read by pattern, the
//! holder's process hash read by pattern) against records they do not expect: written by the
//! Node library, with unusual escaping, with fields in another order, corrupt. Each must give
//! the answer the full decode would give.
#![cfg(feature = "redis")]

mod common;

use std::time::Duration;

use locker_conformance::servers::{self, ServerKind};
use locker_core::{
    AcquireDecision, ErrorKind, ExtendOutcome, LockBackend, LockData, ProcessData, ReleaseOutcome,
};
use locker_redis::{RedisBackend, RedisConfig};

const TTL: Duration = Duration::from_secs(30);
const NODE_PROCESS: &str = "node-worker-3/4242.123456789012";

async fn backend(prefix: &str) -> RedisBackend {
    let server = servers::shared(ServerKind::Redis).unwrap_or_else(|e| panic!("{e}"));
    let config = RedisConfig::from_url(server.url())
        .expect("url")
        .into_builder()
        .key_prefix(prefix)
        .build()
        .expect("config");
    RedisBackend::connect(&config).await.expect("connect")
}

/// The server's clock, in µs.
async fn server_time(redis: &mut redis::aio::MultiplexedConnection) -> u64 {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(redis).await.expect("TIME");
    secs * 1_000_000 + micros
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
fn escaped_node_record(key: &str) -> String {
    let owner = node_owner(key).replace('-', "\\u002d");
    format!(
        r#"{{"ownerHash":"{owner}","processHash":"{NODE_PROCESS}","acquiredAt":"2026-01-13T10:00:00.000Z","extendedAt":"2026-01-13T10:01:00.000Z","fencingToken":41}}"#
    )
}

/// The same record, fields in another order, with a field after the token.
fn reordered_record(key: &str) -> String {
    format!(
        r#"{{"processHash":"{NODE_PROCESS}","acquiredAt":"2026-01-13T10:00:00.000Z","ownerHash":"{}","extendedAt":"2026-01-13T10:01:00.000Z","fencingToken":42,"shard":3}}"#,
        node_owner(key)
    )
}

fn heir(key: &str) -> LockData {
    let process = "rust-host/1.1".to_owned();
    let owner = locker_core::new_owner_hash(key, &process, None).expect("owner");
    LockData::new(owner, process, None)
}

#[tokio::test]
async fn a_node_record_is_released_and_extended_by_its_owner_only() {
    let b = backend("fast-node:").await;
    for (i, record) in [node_record, escaped_node_record, reordered_record]
        .iter()
        .enumerate()
    {
        let key = format!("job-{i}");
        let json = record(&key);
        b.raw_set(&b.lock_key(&key), &json, TTL).await.expect("set");
        // Someone else's release and extend leave it.
        let other = heir(&key);
        assert!(matches!(
            b.release(&key, &other.owner_hash).await.expect("release"),
            ReleaseOutcome::Held(h) if h.owner_hash == node_owner(&key)
        ));
        assert!(matches!(
            b.extend(&key, &other, TTL, &other.owner_hash).await.expect("extend"),
            ExtendOutcome::Held(h) if h.owner_hash == node_owner(&key)
        ));
        // Its owner's extend keeps the token it had (none for the Node library's record).
        let stored = LockData::from_json(&json).expect("a record");
        let mine = LockData {
            owner_hash: node_owner(&key),
            ..stored.extended_now()
        };
        match b
            .extend(&key, &mine, TTL, &node_owner(&key))
            .await
            .expect("extend")
        {
            ExtendOutcome::Extended(new) => {
                assert_eq!(new.fencing_token, stored.fencing_token, "{json}");
                assert_eq!(b.read(&key).await.expect("read"), Some(new));
            }
            other => panic!("{json}: {other:?}"),
        }
        assert_eq!(
            b.release(&key, &node_owner(&key)).await.expect("release"),
            ReleaseOutcome::Released,
            "{json}"
        );
        assert_eq!(b.read(&key).await.expect("read"), None);
    }
}

#[tokio::test]
async fn a_dead_node_holder_is_taken_over_and_a_live_one_is_not() {
    let b = backend("fast-liveness:").await;
    for (i, record) in [node_record, escaped_node_record, reordered_record]
        .iter()
        .enumerate()
    {
        let key = format!("job-{i}");
        let json = record(&key);
        b.raw_set(&b.lock_key(&key), &json, TTL).await.expect("set");
        b.ping(NODE_PROCESS, &ProcessData::now(), TTL)
            .await
            .expect("ping");
        let mine = heir(&key);
        match b.acquire_checked(&key, &mine, TTL).await.expect("acquire") {
            AcquireDecision::HeldByLive(h) => assert_eq!(h.owner_hash, node_owner(&key)),
            other => panic!("{json}: {other:?}"),
        }
        b.forget_process(NODE_PROCESS).await.expect("forget");
        match b.acquire_checked(&key, &mine, TTL).await.expect("acquire") {
            AcquireDecision::TookOver { stored, dead } => {
                assert_eq!(dead.owner_hash, node_owner(&key));
                assert_eq!(stored.owner_hash, mine.owner_hash);
                assert!(stored.fencing_token > dead.fencing_token);
                assert_eq!(b.read(&key).await.expect("read"), Some(stored));
            }
            other => panic!("{json}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn corrupt_values_that_look_like_the_callers_record_are_left_alone() {
    let b = backend("fast-corrupt:").await;
    let key = "job";
    let mine = heir(key);
    let prefix = format!("{{\"ownerHash\":{:?},", mine.owner_hash);
    for garbage in [
        // The caller's prefix, cut short.
        prefix.clone(),
        format!("{prefix}\"processHash\":"),
        // The caller's owner hash, not a whole record.
        format!("{{\"ownerHash\":{:?}}}", mine.owner_hash),
        // A holder whose process hash cannot be read.
        "{\"ownerHash\":\"x\",\"processHash\":7,".to_owned(),
    ] {
        b.raw_set(&b.lock_key(key), &garbage, TTL)
            .await
            .expect("set");
        let corrupt = |r: locker_core::Result<()>, what: &str| {
            let e = r.expect_err(&format!("{what} accepted {garbage:?}"));
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{what} on {garbage:?}: {e}");
        };
        corrupt(b.release(key, &mine.owner_hash).await.map(drop), "release");
        corrupt(
            b.extend(key, &mine, TTL, &mine.owner_hash).await.map(drop),
            "extend",
        );
        corrupt(
            b.acquire_checked(key, &mine, TTL).await.map(drop),
            "acquire_checked",
        );
        corrupt(
            b.take_over(key, &mine, TTL, &mine.owner_hash)
                .await
                .map(drop),
            "take_over",
        );
        assert_eq!(
            b.raw_get(&b.lock_key(key)).await.expect("get").as_deref(),
            Some(garbage.as_str()),
            "overwritten"
        );
    }
    // A plain acquire does not decode the holder's record on the server: the client's parse of
    // the answer finds it corrupt.
    let e = b.acquire(key, &mine, TTL).await.expect_err("corrupt");
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
}

/// On a cluster, the acquire script looks at the holder's liveness record only when the key
/// prefix has a hash tag (every key on one slot); otherwise it answers `Held` and the locker
/// reads the liveness record itself.
#[tokio::test]
async fn a_cluster_decides_in_one_call_when_the_prefix_has_a_hash_tag() {
    let server = servers::shared(ServerKind::RedisCluster).unwrap_or_else(|e| panic!("{e}"));
    for (prefix, checked) in [("fast{7}:", true), ("fast-untagged:", false)] {
        let config = RedisConfig::from_url(server.url())
            .expect("url")
            .into_builder()
            .key_prefix(prefix)
            .cluster(true)
            .build()
            .expect("config");
        let b = RedisBackend::connect(&config).await.expect("connect");
        assert_eq!(b.capabilities().checked_acquire, checked, "{prefix}");
        let key = "job";
        let json = node_record(key);
        b.raw_set(&b.lock_key(key), &json, TTL).await.expect("set");
        b.forget_process(NODE_PROCESS).await.expect("forget");
        match (b.acquire_checked(key, &heir(key), TTL).await, checked) {
            (Ok(AcquireDecision::TookOver { dead, .. }), true) => {
                assert_eq!(dead.owner_hash, node_owner(key))
            }
            (Ok(AcquireDecision::Held(holder)), false) => {
                assert_eq!(holder.owner_hash, node_owner(key))
            }
            other => panic!("{prefix}: {other:?}"),
        }
    }
}

/// Tokens stay above those of an earlier version of this library granting the same key during
/// a rolling upgrade: that version drew `max(its per-key counter + 1, server time in µs)`, so a
/// grant of it lands far above a per-slot counter that only counted up since it was made.
#[tokio::test]
async fn tokens_stay_above_those_an_earlier_version_granted_meanwhile() {
    let b = backend("fast-upgrade:").await;
    let mut redis = common::shared_connection().await;
    let key = "nightly";
    let first = heir(key);
    let stored = match b.acquire_checked(key, &first, TTL).await.expect("acquire") {
        AcquireDecision::Acquired(stored) => stored,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        b.release(key, &first.owner_hash).await.expect("release"),
        ReleaseOutcome::Released
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    // An earlier version's grant and release of the key: its token is the server's time.
    let old_token = server_time(&mut redis).await;
    let old = LockData {
        fencing_token: Some(old_token),
        ..heir(key)
    };
    b.raw_set(&b.lock_key(key), &old.to_json(), TTL)
        .await
        .expect("set");
    let _: () = redis::cmd("DEL")
        .arg(b.lock_key(key))
        .query_async(&mut redis)
        .await
        .expect("DEL");
    assert!(old_token > stored.fencing_token.expect("a token"));
    let next = match b
        .acquire_checked(key, &heir(key), TTL)
        .await
        .expect("acquire")
    {
        AcquireDecision::Acquired(stored) => stored,
        other => panic!("{other:?}"),
    };
    assert!(
        next.fencing_token > Some(old_token),
        "token {:?} after an earlier version's {old_token}",
        next.fencing_token
    );
}

/// The fencing counter, as acquires read and store it (alone, and in batches when they come
/// together): a counter ahead of the server's clock (a clock set back) is counted on, one above
/// it; a counter that is not a number counts as missing (the token is the server's time); the
/// counter is left at the last token drawn. A counter of another type fails the acquire, and
/// nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fencing_counter_is_counted_on_and_kept() {
    let prefix = "fast-counter:";
    let b = std::sync::Arc::new(backend(prefix).await);
    let mut redis = common::shared_connection().await;
    // One server: one counter for every key (see `keys`).
    let counter = format!("{prefix}fence");
    let conn = redis.clone();
    let acquire = |key: String| {
        let b = b.clone();
        async move {
            match b.acquire_checked(&key, &heir(&key), TTL).await {
                Ok(AcquireDecision::Acquired(stored)) => Ok(stored.fencing_token.expect("token")),
                Ok(other) => panic!("{key}: {other:?}"),
                Err(e) => Err(e),
            }
        }
    };
    let run = |cmd: &mut redis::Cmd| {
        let (cmd, mut redis) = (cmd.clone(), conn.clone());
        async move {
            cmd.query_async::<redis::Value>(&mut redis)
                .await
                .expect("command")
        }
    };
    let stored_counter = || {
        let (counter, mut redis) = (counter.clone(), conn.clone());
        async move {
            let v: String = redis::cmd("GET")
                .arg(&counter)
                .query_async(&mut redis)
                .await
                .expect("GET");
            v.parse::<u64>().expect("a number")
        }
    };

    // Ahead of the clock: alone, then 20 at once.
    let ahead = server_time(&mut redis).await + 1_000_000_000_000;
    run(redis::cmd("SET").arg(&counter).arg(ahead)).await;
    assert_eq!(
        acquire("ahead".to_owned()).await.expect("acquire"),
        ahead + 1
    );
    assert_eq!(stored_counter().await, ahead + 1);
    let tasks: Vec<_> = (0..20)
        .map(|i| tokio::spawn(acquire(format!("ahead-{i}"))))
        .collect();
    let mut tokens = Vec::new();
    for task in tasks {
        tokens.push(task.await.expect("task").expect("acquire"));
    }
    tokens.sort_unstable();
    assert_eq!(
        tokens,
        (ahead + 2..ahead + 22).collect::<Vec<_>>(),
        "one above the counter, each its own"
    );
    assert_eq!(stored_counter().await, ahead + 21);

    // Not a number: the server's time.
    run(redis::cmd("SET").arg(&counter).arg("not a number")).await;
    let before = server_time(&mut redis).await;
    let token = acquire("garbled".to_owned()).await.expect("acquire");
    let after = server_time(&mut redis).await;
    assert!(
        (before..=after).contains(&token),
        "{token} not within the server's clock {before}..={after}"
    );
    assert_eq!(stored_counter().await, token);

    // Another type: the acquire fails, and stores nothing.
    run(redis::cmd("DEL").arg(&counter)).await;
    run(redis::cmd("HSET").arg(&counter).arg("f").arg("1")).await;
    let e = acquire("typed".to_owned())
        .await
        .expect_err("a counter of another type");
    assert!(!e.message().is_empty(), "{e:?}");
    assert_eq!(b.read("typed").await.expect("read"), None, "stored nothing");
    run(redis::cmd("DEL").arg(&counter)).await;
    acquire("typed".to_owned()).await.expect("acquire");
}
