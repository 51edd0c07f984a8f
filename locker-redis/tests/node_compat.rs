//! Records laid out exactly as the Node library `@clickup/distributed-locker` writes them, both
//! ways: a Rust locker respects (and takes over) a Node process's lock, and what a Rust locker
//! writes is what a Node process reads and deletes.
#![cfg(feature = "redis")]

use std::time::Duration;

use locker_conformance::servers::{self, ServerKind};
use locker_core::{LockAttempt, Locker, OwnerStatus};
use locker_redis::RedisConfig;
use redis::AsyncCommands;

const NODE_PROCESS: &str = "node-worker-3/4242.123456789012";

/// What a Node process writes for a lock it holds: `JSON.stringify` of its LockData, fields in
/// the order its `createLockData` builds them.
fn node_lock_json(key: &str) -> String {
    format!(
        r#"{{"ownerHash":"{key}@{NODE_PROCESS}.7#nightly-run","processHash":"{NODE_PROCESS}","trace":"nightly-run","acquiredAt":"2026-01-13T10:00:00.000Z","extendedAt":"2026-01-13T10:01:00.000Z"}}"#
    )
}

/// What a Node process's reporter writes.
const NODE_ALIVE: &str = r#"{"aliveAt":"2026-01-13T10:01:02.345Z"}"#;

/// The Node library's create: refuse a non-empty value, else `SET ... PX`.
const NODE_TRY_CREATE: &str = r#"
local v = redis.call("GET", KEYS[1])
if v and v ~= "" then return {"SOMEONE_ELSE_HOLDS_LOCK", v} end
redis.call("SET", KEYS[1], ARGV[1], "PX", ARGV[2])
return {"SUCCESS", ARGV[1]}
"#;

/// The Node library's delete: compare the decoded `ownerHash`, then `DEL`.
const NODE_TRY_DELETE: &str = r#"
local v = redis.call("GET", KEYS[1])
if not v or v == "" then return {"NO_KEY"} end
if cjson.decode(v).ownerHash ~= ARGV[1] then return {"SOMEONE_ELSE_HOLDS_LOCK", v} end
redis.call("DEL", KEYS[1])
return {"SUCCESS"}
"#;

struct Fixture {
    redis: redis::aio::MultiplexedConnection,
    config: RedisConfig,
    prefix: String,
}

async fn fixture(prefix: &str) -> Fixture {
    let server = servers::shared(ServerKind::Redis).unwrap_or_else(|e| panic!("{e}"));
    let client = redis::Client::open(server.url()).expect("client");
    let redis = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let config = RedisConfig::from_url(server.url())
        .expect("url")
        .into_builder()
        .key_prefix(prefix)
        .build()
        .expect("config");
    Fixture {
        redis,
        config,
        prefix: prefix.to_owned(),
    }
}

fn locker(config: &RedisConfig) -> Locker {
    Locker::builder(config.clone())
        .report_every(Duration::from_millis(100))
        .liveness_ttl(Duration::from_secs(1))
        .build()
        .expect("locker")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_locker_respects_and_takes_over_a_node_lock() {
    let mut fx = fixture("compat-node-first:").await;
    let key = "nightly-report";
    let lock_key = format!("{}lock:{key}", fx.prefix);
    let proc_key = format!("{}proc:{NODE_PROCESS}", fx.prefix);
    let node_json = node_lock_json(key);
    let _: () = fx
        .redis
        .set_ex(&lock_key, &node_json, 300)
        .await
        .expect("set");
    let _: () = fx
        .redis
        .pset_ex(&proc_key, NODE_ALIVE, 10_000)
        .await
        .expect("set");

    let rust = locker(&fx.config);
    // The Node process is alive: its lock holds, and reads back field for field.
    let holder = match rust.acquire(key).await.expect("acquire") {
        LockAttempt::Held(h) => h,
        LockAttempt::Acquired(g) => panic!("took a live Node lock: {}", g.owner_hash()),
    };
    assert_eq!(holder.process_hash, NODE_PROCESS);
    assert_eq!(holder.trace.as_deref(), Some("nightly-run"));
    assert_eq!(
        holder.to_json(),
        node_json,
        "a Node record round-trips byte for byte"
    );
    match rust.owner_status(&holder.owner_hash).await.expect("status") {
        OwnerStatus::Running { key: k, .. } => assert_eq!(k, key),
        other => panic!("{other:?}"),
    }

    // The Node process dies: its liveness record goes, and the Rust locker takes over.
    let _: () = fx.redis.del(&proc_key).await.expect("del");
    let guard = match rust.acquire(key).await.expect("acquire") {
        LockAttempt::Acquired(g) => g,
        LockAttempt::Held(h) => panic!("a dead Node lock was not taken over: {}", h.owner_hash),
    };
    let stored: String = fx.redis.get(&lock_key).await.expect("get");
    assert!(stored.contains(guard.owner_hash()));
    drop(guard);
    rust.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_process_reads_and_respects_a_rust_lock() {
    let mut fx = fixture("compat-rust-first:").await;
    let key = "invoice-run";
    let lock_key = format!("{}lock:{key}", fx.prefix);
    let rust = locker(&fx.config);
    let guard = match rust
        .acquire(locker_core::LockRequest::new(key).trace("batch-9"))
        .await
        .expect("acquire")
    {
        LockAttempt::Acquired(g) => g,
        LockAttempt::Held(h) => panic!("held by {}", h.owner_hash),
    };

    // The record is what the Node library's `JSON.parse` expects.
    let stored: String = fx.redis.get(&lock_key).await.expect("get");
    let json: serde_json::Value = serde_json::from_str(&stored).expect("JSON");
    let fields: Vec<&str> = json
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    let mut sorted = fields.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        [
            "acquiredAt",
            "extendedAt",
            "fencingToken",
            "ownerHash",
            "processHash",
            "trace"
        ]
    );
    let process = json["processHash"].as_str().expect("processHash");
    assert_eq!(process, rust.process_hash());
    let owner = json["ownerHash"].as_str().expect("ownerHash");
    assert!(owner.starts_with(&format!("{key}@{process}.")), "{owner}");
    assert!(owner.ends_with("#batch-9"), "{owner}");
    for at in ["acquiredAt", "extendedAt"] {
        let t = json[at].as_str().expect("time");
        // JavaScript's Date.prototype.toJSON(): 2026-01-13T10:00:00.000Z
        assert_eq!(t.len(), 24, "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[19] == b'.', "{t}");
    }
    // The token is a safe JavaScript integer.
    let token = json["fencingToken"].as_u64().expect("integer token");
    assert!(token < (1 << 53), "{token}");

    // The liveness record a Node process looks up.
    let alive: String = fx
        .redis
        .get(format!("{}proc:{process}", fx.prefix))
        .await
        .expect("liveness record");
    let alive: serde_json::Value = serde_json::from_str(&alive).expect("JSON");
    assert!(alive["aliveAt"].as_str().expect("aliveAt").ends_with('Z'));

    // A Node process's create sees the lock held, and its delete with the Rust owner hash
    // (for example from `readOwnerHashStatus` tooling) works on the Rust record.
    let create = redis::Script::new(NODE_TRY_CREATE);
    let reply: Vec<String> = create
        .key(&lock_key)
        .arg(node_lock_json(key))
        .arg(300_000)
        .invoke_async(&mut fx.redis)
        .await
        .expect("node create");
    assert_eq!(reply[0], "SOMEONE_ELSE_HOLDS_LOCK");
    assert_eq!(reply[1], stored);
    let delete = redis::Script::new(NODE_TRY_DELETE);
    let reply: Vec<String> = delete
        .key(&lock_key)
        .arg(guard.owner_hash())
        .invoke_async(&mut fx.redis)
        .await
        .expect("node delete");
    assert_eq!(reply, ["SUCCESS"]);
    drop(guard);
    rust.shutdown().await;
}
