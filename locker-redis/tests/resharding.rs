//! Redis Cluster resharding under load. The slots of held locks (and of their holder's liveness
//! record) move from master to master, key by key, while the holder beats and another locker
//! keeps trying to take the same keys. Clients meet `ASK` and `MOVED` redirections, and
//! `TRYAGAIN` for scripts whose keys are split between two nodes mid-migration.
//!
//! What must hold: no lock is lost or doubly held (the other locker only ever sees the holder),
//! every error on the way is retryable, and once the slots have settled everything works as
//! before (the holder's beats, release, a new acquire).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

mod common;

use common::{ports, Node};
use locker_conformance::servers::{self, Server, ServerKind};
use locker_core::{ErrorKind, LockAttempt, LockGuard, Locker, ReleaseOutcome};
use locker_redis::{ClientLibrary, RedisBackend, RedisConfig};

const KEYS: [&str; 6] = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"];

fn config(server: &Server, client: ClientLibrary) -> RedisConfig {
    let mut builder = RedisConfig::builder();
    for port in ports(server) {
        builder = builder.node("127.0.0.1", port);
    }
    builder
        .cluster(true)
        .client(client)
        .connect_timeout(Duration::from_secs(1))
        .command_timeout(Duration::from_secs(2))
        .build()
        .expect("config")
}

fn locker(config: &RedisConfig) -> Locker {
    Locker::builder(config.clone())
        .report_every(Duration::from_millis(250))
        .liveness_ttl(Duration::from_secs(2))
        .recheck_every(Duration::from_millis(250))
        .lock_ttl(Duration::from_secs(10))
        // Extensions (a script on the lock's slot) happen during the moves too.
        .extend_every(Duration::from_secs(1))
        .build()
        .expect("locker")
}

/// Moves `slot` from `src` to `dst` the way `redis-cli --cluster reshard` does, one key at a
/// time with a pause between steps, so clients meet the half-migrated state; then tells every
/// node. Returns how many keys moved.
fn migrate(slot: u16, src: usize, dst: usize, nodes: &mut [Node], pause: Duration) -> usize {
    let (src_id, dst_id) = (nodes[src].id(), nodes[dst].id());
    let dst_port = nodes[dst].port.to_string();
    let s = slot.to_string();
    nodes[dst].cluster::<()>(&["SETSLOT", &s, "IMPORTING", &src_id]);
    nodes[src].cluster::<()>(&["SETSLOT", &s, "MIGRATING", &dst_id]);
    std::thread::sleep(pause);
    let mut moved = 0;
    loop {
        let keys: Vec<String> = nodes[src].cluster(&["GETKEYSINSLOT", &s, "1"]);
        let Some(key) = keys.first() else { break };
        let reply: redis::Value = redis::cmd("MIGRATE")
            .arg("127.0.0.1")
            .arg(&dst_port)
            .arg(key)
            .arg(0)
            .arg(5000)
            .query(&mut nodes[src].conn)
            .expect("MIGRATE");
        assert!(
            matches!(reply, redis::Value::Okay | redis::Value::SimpleString(_)),
            "MIGRATE {key}: {reply:?}"
        );
        moved += 1;
        std::thread::sleep(pause);
    }
    // The destination first, as redis-cli does, then the others.
    let mut order: Vec<usize> = vec![dst, src];
    order.extend((0..nodes.len()).filter(|i| *i != src && *i != dst));
    for i in order {
        nodes[i].cluster::<()>(&["SETSLOT", &s, "NODE", &dst_id]);
    }
    moved
}

#[derive(Default)]
struct Tally {
    beats: AtomicUsize,
    beat_errors: AtomicUsize,
    attempts: AtomicUsize,
    attempt_errors: AtomicUsize,
}

async fn locks_survive_resharding(client: ClientLibrary) {
    let server = tokio::task::spawn_blocking(|| servers::start_private(ServerKind::RedisCluster))
        .await
        .expect("task")
        .unwrap_or_else(|e| panic!("{e}"));
    let config = config(&server, client);
    let (holder, other) = (locker(&config), locker(&config));
    // What the holder's beats and reporter met on the way, shown when the test fails.
    let mut errors = holder.subscribe_errors();
    tokio::spawn(async move {
        while let Ok(e) = errors.recv().await {
            eprintln!("background error during resharding: {e:?}");
        }
    });

    let mut guards: Vec<LockGuard> = Vec::new();
    for key in KEYS {
        match holder.acquire(key).await.expect("acquire") {
            LockAttempt::Acquired(g) => guards.push(g),
            LockAttempt::Held(h) => panic!("{key} held by {}", h.owner_hash),
        }
    }
    let owners: Vec<(String, String)> = guards
        .iter()
        .map(|g| (g.key().to_owned(), g.owner_hash().to_owned()))
        .collect();

    // The slots to move: every lock's (its fencing counter shares it) and the holder's
    // liveness record's.
    let backend = RedisBackend::connect(&config).await.expect("connect");
    let mut node = Node::open(ports(&server)[0]);
    let mut slots = BTreeSet::new();
    for key in KEYS {
        slots.insert(node.cluster::<u16>(&["KEYSLOT", &backend.lock_key(key)]));
    }
    slots.insert(node.cluster::<u16>(&["KEYSLOT", &backend.process_key(holder.process_hash())]));
    drop(node);

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let beater = {
        let (stop, tally) = (stop.clone(), tally.clone());
        let beats: Vec<_> = guards.iter().map(|g| g.heartbeat()).collect();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                for hb in &beats {
                    match hb.beat().await {
                        Ok(()) => tally.beats.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            assert_ne!(e.kind(), ErrorKind::LockLost, "lost in resharding: {e}");
                            assert!(e.is_retryable(), "non-retryable beat error: {e}");
                            tally.beat_errors.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let contender = {
        let (stop, tally, owners) = (stop.clone(), tally.clone(), owners.clone());
        let other = other.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                for (key, owner) in &owners {
                    tally.attempts.fetch_add(1, Ordering::Relaxed);
                    match other.acquire(key.as_str()).await {
                        Ok(LockAttempt::Held(h)) => assert_eq!(&h.owner_hash, owner, "{key}"),
                        Ok(LockAttempt::Acquired(g)) => {
                            panic!("{key} acquired by a second owner {}", g.owner_hash())
                        }
                        Err(e) => {
                            assert!(e.is_retryable(), "non-retryable acquire error: {e}");
                            tally.attempt_errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // Two rounds: every slot moves to the next master, then on again.
    let server_ports = ports(&server);
    let moves = tokio::task::spawn_blocking(move || {
        let mut nodes: Vec<Node> = server_ports.iter().map(|&p| Node::open(p)).collect();
        let (mut slot_moves, mut key_moves) = (0, 0);
        for _ in 0..2 {
            for &slot in &slots {
                let src = (0..nodes.len())
                    .find(|&i| nodes[i].owns(slot))
                    .expect("an owner");
                let dst = (src + 1) % nodes.len();
                key_moves += migrate(slot, src, dst, &mut nodes, Duration::from_millis(150));
                slot_moves += 1;
            }
        }
        (slot_moves, key_moves)
    })
    .await
    .expect("resharding");

    // Let the clients settle on the new layout, then stop the load.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    beater
        .await
        .expect("beats: no lock lost, only retryable errors");
    contender
        .await
        .expect("contender: never a second owner, only retryable errors");

    // After the moves, everything works as before.
    for g in &guards {
        g.heartbeat().beat().await.expect("a beat after resharding");
        g.extend().await.expect("an extension after resharding");
    }
    for g in guards {
        let key = g.key().to_owned();
        let released = g.release().await.expect("release after resharding");
        assert_eq!(released, ReleaseOutcome::Released, "{key}");
        match other.acquire(key.as_str()).await.expect("acquire") {
            LockAttempt::Acquired(_) => {}
            LockAttempt::Held(h) => panic!("{key} still held by {} after release", h.owner_hash),
        }
    }
    let (slot_moves, key_moves) = moves;
    let t = &tally;
    let line = format!(
        "resharding via {client:?}: {slot_moves} slot moves ({key_moves} keys migrated one by one); \
         {} beats ok, {} retryable beat errors; {} acquire attempts by the other locker, all \
         answered with the holder, {} retryable errors\n",
        t.beats.load(Ordering::Relaxed),
        t.beat_errors.load(Ordering::Relaxed),
        t.attempts.load(Ordering::Relaxed),
        t.attempt_errors.load(Ordering::Relaxed),
    );
    // Past the test harness's capture, so the figures show in every run.
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
    assert!(key_moves >= KEYS.len() * 2, "the locks' keys did move");
    holder.shutdown().await;
    other.shutdown().await;
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_survive_resharding_with_redis_rs() {
    locks_survive_resharding(ClientLibrary::Redis).await;
}

/// Known to fail with fred 10.1: its first `ASK` redirection during a slot migration ends in
/// "Max attempts reached" (whatever `max_command_attempts` and `max_redirections` say), and the
/// client then times out every request for seconds, so the holder's liveness record lapses and
/// its beats report the locks lost (seppuku: the job stops; the lock is never doubly held by
/// the holder's own account). Run it with `--ignored` to see it. Use the `redis` crate's client
/// on clusters that reshard (README, "Guarantees, and their limits").
#[cfg(feature = "fred")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fred 10.1 stalls on ASK redirections during slot migration (README: limits)"]
async fn locks_survive_resharding_with_fred() {
    locks_survive_resharding(ClientLibrary::Fred).await;
}
