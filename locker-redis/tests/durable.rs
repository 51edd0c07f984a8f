//! The durable mode (`RedisConfigBuilder::wait_for_replicas`), on a real primary and replica,
//! with both clients: a durable acquire or extend returns once the replica has the record; with
//! the replica frozen, acquire, take-over and extend fail with a retryable error after about the
//! wait timeout, and no lock is left behind by the failed acquire or take-over; without the
//! option no `WAIT` reaches the server. On a Redis Cluster whose masters each have a replica,
//! `WAIT` goes to the master of the key's slot: a frozen replica fails the writes of its own
//! master's keys only.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{ports, Node};
use locker_conformance::servers::{self, Server, ServerControl};
use locker_core::{
    AcquireOutcome, ErrorKind, ExtendOutcome, LockAttempt, LockBackend, LockData, Locker,
    ReleaseOutcome,
};
use locker_redis::{ClientLibrary, RedisBackend, RedisConfig};
use redis::aio::MultiplexedConnection;

/// The wait timeout of the frozen-replica case: long enough for a replica on loopback on a
/// busy machine, short enough that a frozen one is noticed quickly.
const WAIT: Duration = Duration::from_millis(500);

/// The wait timeout where the replica answers: only success is checked, so room for a loaded
/// machine (2 cores shared by the servers, the tests and the build).
const WAIT_LONG: Duration = Duration::from_secs(2);

/// A primary and its replica, each started by the harness, the replica in sync.
struct Pair {
    primary: Server,
    replica: Server,
}

fn port(server: &Server) -> u16 {
    server
        .url()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port")
}

async fn conn(port: u16) -> MultiplexedConnection {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

async fn info(conn: &mut MultiplexedConnection, section: &str) -> String {
    redis::cmd("INFO")
        .arg(section)
        .query_async(conn)
        .await
        .expect("INFO")
}

impl Pair {
    async fn start() -> Pair {
        let primary = tokio::task::spawn_blocking(|| {
            // Full syncs start at once rather than after the default 5 s of diskless delay.
            servers::start_redis_with(["--repl-diskless-sync-delay", "0"], false)
        })
        .await
        .expect("task")
        .unwrap_or_else(|e| panic!("primary: {e}"));
        let primary_port = port(&primary).to_string();
        let replica = tokio::task::spawn_blocking(move || {
            servers::start_redis_with(["--replicaof", "127.0.0.1", primary_port.as_str()], false)
        })
        .await
        .expect("task")
        .unwrap_or_else(|e| panic!("replica: {e}"));
        let pair = Pair { primary, replica };
        pair.wait_in_sync().await;
        pair
    }

    /// Waits until the replica acknowledges the primary's writes.
    async fn wait_in_sync(&self) {
        let mut p = self.primary_conn().await;
        let start = Instant::now();
        while !acknowledged(&mut p, "probe").await {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the replica acknowledged nothing within 30 s:\n{}",
                info(&mut p, "replication").await
            );
        }
    }

    async fn primary_conn(&self) -> MultiplexedConnection {
        conn(port(&self.primary)).await
    }

    async fn replica_conn(&self) -> MultiplexedConnection {
        conn(port(&self.replica)).await
    }

    /// A configuration of the primary, durable with this wait timeout, or not.
    fn config(&self, client: ClientLibrary, wait: Option<Duration>) -> RedisConfig {
        let builder = RedisConfig::builder()
            .node("127.0.0.1", port(&self.primary))
            .client(client)
            .key_prefix("durable:");
        match wait {
            Some(timeout) => builder.wait_for_replicas(1, timeout),
            None => builder,
        }
        .build()
        .expect("config")
    }

    /// Freezes the replica (SIGSTOP) until the returned value is dropped.
    async fn freeze_replica(&self) -> Frozen {
        let control = self.replica.control().expect("replica control");
        let c = control.clone();
        tokio::task::spawn_blocking(move || c.pause())
            .await
            .expect("task")
            .expect("pause");
        Frozen(control)
    }
}

/// A frozen replica, thawed when dropped (also when an assertion fails).
struct Frozen(Arc<dyn ServerControl>);

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = self.0.resume();
    }
}

/// Whether a write of `key` on this connection is acknowledged by a replica within 200 ms (the
/// test connection's own response timeout is 500 ms).
///
/// A replica listed `state=online` right after a diskless full sync acknowledges nothing until
/// it has sent its first `REPLCONF ACK`, up to a second later (the master streams nothing to it
/// before that): readiness is a write that a `WAIT` sees acknowledged.
async fn acknowledged(conn: &mut MultiplexedConnection, key: &str) -> bool {
    let () = redis::cmd("SET")
        .arg(key)
        .arg("1")
        .query_async(conn)
        .await
        .expect("SET");
    let acked: u64 = redis::cmd("WAIT")
        .arg(1)
        .arg(200)
        .query_async(conn)
        .await
        .expect("WAIT");
    acked >= 1
}

async fn get(conn: &mut MultiplexedConnection, key: &str) -> Option<String> {
    redis::cmd("GET")
        .arg(key)
        .query_async(conn)
        .await
        .expect("GET")
}

/// Calls of `WAIT` the primary has served since its start (0 when none), readiness probes
/// included.
async fn wait_calls(conn: &mut MultiplexedConnection) -> u64 {
    let stats = info(conn, "commandstats").await;
    stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_wait:"))
        .and_then(|rest| rest.split(',').find_map(|f| f.strip_prefix("calls=")))
        .map_or(0, |n| n.parse().expect("calls"))
}

/// Runs every script once, so that none is sent twice (`NOSCRIPT`, then whole) afterwards.
async fn warm_up(locker: &Locker, backend: &RedisBackend) {
    let LockAttempt::Acquired(guard) = locker.acquire("warm").await.expect("acquire") else {
        panic!("warm held")
    };
    guard.extend().await.expect("extend");
    assert_eq!(
        guard.release().await.expect("release"),
        ReleaseOutcome::Released
    );
    let ttl = Duration::from_secs(60);
    let warm = backend
        .take_over("warm", &data("warm"), ttl, "nobody")
        .await;
    assert!(matches!(warm, Ok(AcquireOutcome::Acquired(_))), "{warm:?}");
    assert_eq!(
        backend.release("warm", "warm").await.expect("release"),
        ReleaseOutcome::Released
    );
}

fn data(owner: &str) -> LockData {
    LockData::new(owner.to_owned(), "test-process".to_owned(), None)
}

async fn durable_writes_are_on_the_replica_when_they_return(client: ClientLibrary) {
    let pair = Pair::start().await;
    let locker = Locker::builder(pair.config(client, Some(WAIT_LONG)))
        .build()
        .expect("locker");
    let backend = RedisBackend::connect(&pair.config(client, Some(WAIT_LONG)))
        .await
        .expect("connect");
    let (mut primary, mut replica) = (pair.primary_conn().await, pair.replica_conn().await);
    let key = "replicated";
    let lock_key = backend.lock_key(key);
    warm_up(&locker, &backend).await;
    let base = wait_calls(&mut primary).await;

    let LockAttempt::Acquired(guard) = locker.acquire(key).await.expect("acquire") else {
        panic!("{key} held")
    };
    // No wait on our side: the acquire returned after the replica acknowledged.
    let on_replica = get(&mut replica, &lock_key).await.expect("on the replica");
    assert!(on_replica.contains(guard.owner_hash()), "{on_replica}");
    let before = get(&mut primary, &lock_key).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    guard.extend().await.expect("extend");
    let extended = get(&mut primary, &lock_key).await;
    assert_ne!(extended, before, "the extension rewrote the record");
    assert_eq!(get(&mut replica, &lock_key).await, extended);
    // One WAIT after the acquire, one after the extension; the release waits for nothing.
    assert_eq!(wait_calls(&mut primary).await - base, 2);
    assert_eq!(
        guard.release().await.expect("release"),
        ReleaseOutcome::Released
    );
    assert_eq!(wait_calls(&mut primary).await - base, 2);

    // The backend alone: acquire and take-over of a dead owner's lock.
    let taken = "taken-over";
    let dead = data("dead-owner");
    assert!(matches!(
        backend.acquire(taken, &dead, Duration::from_secs(60)).await,
        Ok(AcquireOutcome::Acquired(_))
    ));
    let ours = data("new-owner");
    match backend
        .take_over(taken, &ours, Duration::from_secs(60), "dead-owner")
        .await
        .expect("take over")
    {
        AcquireOutcome::Acquired(stored) => assert_eq!(stored.owner_hash, "new-owner"),
        AcquireOutcome::Held(h) => panic!("held by {}", h.owner_hash),
    }
    let on_replica = get(&mut replica, &backend.lock_key(taken)).await;
    assert!(on_replica.expect("on the replica").contains("new-owner"));
    assert_eq!(wait_calls(&mut primary).await - base, 4);

    // The same acquire sent again (as the `redis` crate resends a cluster pipeline after a lost
    // connection) finds its own record and writes nothing its `WAIT` could count: refused, and
    // undone, where a plain backend would answer `Held` by this owner.
    let e = backend
        .acquire(taken, &ours, Duration::from_secs(60))
        .await
        .expect_err("a resent acquire is not known durable");
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.to_string().contains("sent again"), "{e}");
    assert_eq!(backend.read(taken).await.expect("read"), None);
    locker.shutdown().await;
}

async fn a_frozen_replica_fails_durable_writes_and_leaves_no_lock(client: ClientLibrary) {
    let pair = Pair::start().await;
    let config = pair.config(client, Some(WAIT));
    let locker = Locker::builder(config.clone()).build().expect("locker");
    let backend = RedisBackend::connect(&config).await.expect("connect");
    let mut primary = pair.primary_conn().await;
    let ttl = Duration::from_secs(60);

    // Held before the freeze: a lock to extend, and a dead owner's lock to take over.
    let LockAttempt::Acquired(guard) = locker.acquire("kept").await.expect("acquire") else {
        panic!("kept held")
    };
    let dead = data("dead-owner");
    assert!(matches!(
        backend.acquire("taken-over", &dead, ttl).await,
        Ok(AcquireOutcome::Acquired(_))
    ));
    assert!(matches!(
        backend.acquire("kept-raw", &data("raw-owner"), ttl).await,
        Ok(AcquireOutcome::Acquired(_))
    ));

    let frozen = pair.freeze_replica().await;
    let not_acknowledged = |what: &str, e: &locker_core::Error, elapsed: Duration| {
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{what}: {e}");
        assert!(e.is_retryable(), "{what}: {e}");
        assert!(
            e.to_string().contains("only 0 of 1 replicas acknowledged"),
            "{what}: {e}"
        );
        assert!(
            elapsed >= WAIT && elapsed < WAIT + Duration::from_secs(2),
            "{what}: failed after {elapsed:?}, the wait timeout is {WAIT:?}"
        );
    };

    // Through a locker: the error, and the key free as soon as it is returned.
    let start = Instant::now();
    let e = locker.acquire("refused").await.expect_err("not durable");
    not_acknowledged("locker acquire", &e, start.elapsed());
    assert!(e.to_string().contains("it was released"), "{e}");
    let lock_key = backend.lock_key("refused");
    assert_eq!(get(&mut primary, &lock_key).await, None);

    // The backend alone: nothing but the backend undoes its write.
    let start = Instant::now();
    let e = backend
        .acquire("refused-raw", &data("raw-owner"), ttl)
        .await
        .expect_err("not durable");
    not_acknowledged("backend acquire", &e, start.elapsed());
    assert_eq!(
        get(&mut primary, &backend.lock_key("refused-raw")).await,
        None
    );

    let start = Instant::now();
    let e = backend
        .take_over("taken-over", &data("new-owner"), ttl, "dead-owner")
        .await
        .expect_err("not durable");
    not_acknowledged("take-over", &e, start.elapsed());
    assert_eq!(
        get(&mut primary, &backend.lock_key("taken-over")).await,
        None
    );

    // An extension stays written on the master and the lock stays ours. The backend says so
    // with the error; a locker's beat reports it in the background and retries.
    let start = Instant::now();
    let e = backend
        .extend("kept-raw", &data("raw-owner"), ttl, "raw-owner")
        .await
        .expect_err("not durable");
    not_acknowledged("backend extend", &e, start.elapsed());
    assert!(e.to_string().contains("the lock stays held"), "{e}");
    let kept = get(&mut primary, &backend.lock_key("kept-raw")).await;
    assert!(kept.expect("kept-raw").contains("raw-owner"));
    let mut errors = locker.subscribe_errors();
    let start = Instant::now();
    guard
        .extend()
        .await
        .expect("a retryable failure leaves the lock held");
    let reported = errors.try_recv().expect("the failed extension, reported");
    not_acknowledged("locker extend", &reported.error, start.elapsed());
    let kept = get(&mut primary, &backend.lock_key("kept")).await;
    assert!(kept.expect("kept").contains(guard.owner_hash()));

    // Outcomes that write nothing are not errors, frozen replica or not.
    match backend
        .extend("refused", &data("raw-owner"), ttl, "raw-owner")
        .await
        .expect("no key")
    {
        ExtendOutcome::NoKey => {}
        other => panic!("{other:?}"),
    }

    // Thawed: the same calls succeed again.
    drop(frozen);
    pair.wait_in_sync().await;
    guard.extend().await.expect("extend after the thaw");
    match locker
        .acquire("refused")
        .await
        .expect("acquire after the thaw")
    {
        LockAttempt::Acquired(g) => {
            assert_eq!(
                g.release().await.expect("release"),
                ReleaseOutcome::Released
            )
        }
        LockAttempt::Held(h) => panic!("still held by {}", h.owner_hash),
    }
    assert_eq!(
        guard.release().await.expect("release"),
        ReleaseOutcome::Released
    );
    locker.shutdown().await;
}

async fn without_the_option_no_wait_is_sent(client: ClientLibrary) {
    let pair = Pair::start().await;
    let locker = Locker::builder(pair.config(client, None))
        .build()
        .expect("locker");
    let mut primary = pair.primary_conn().await;
    // Only the harness's readiness probe (`acknowledged`) has sent a `WAIT` so far.
    let base = wait_calls(&mut primary).await;
    let LockAttempt::Acquired(guard) = locker.acquire("plain").await.expect("acquire") else {
        panic!("plain held")
    };
    guard.extend().await.expect("extend");
    assert_eq!(
        guard.release().await.expect("release"),
        ReleaseOutcome::Released
    );
    let stats = info(&mut primary, "commandstats").await;
    assert!(stats.contains("cmdstat_evalsha:"), "{stats}");
    assert_eq!(wait_calls(&mut primary).await - base, 0, "{stats}");

    // And with a frozen replica, nothing waits for it.
    let _frozen = pair.freeze_replica().await;
    let start = Instant::now();
    let LockAttempt::Acquired(guard) = locker.acquire("plain-frozen").await.expect("acquire")
    else {
        panic!("plain-frozen held")
    };
    guard.extend().await.expect("extend");
    assert!(start.elapsed() < WAIT, "took {:?}", start.elapsed());
    assert_eq!(
        guard.release().await.expect("release"),
        ReleaseOutcome::Released
    );
    assert_eq!(wait_calls(&mut primary).await - base, 0);
    locker.shutdown().await;
}

/// A cluster of 3 masters with a replica each, every replica acknowledging its master's
/// writes, and a durable backend on it. Nodes 0 to 2 are the masters, node i + 3 replicates
/// node i.
async fn durable_cluster(client: ClientLibrary) -> (Server, Vec<u16>, RedisBackend) {
    let cluster = tokio::task::spawn_blocking(servers::start_redis_cluster_with_replicas)
        .await
        .expect("task")
        .unwrap_or_else(|e| panic!("{e}"));
    let masters = ports(&cluster)[..3].to_vec();
    // Each master's replica acknowledges writes (see `acknowledged`): a key of its own slots.
    for &master in &masters {
        let mut node = Node::open(master);
        let key = (0..)
            .map(|i| format!("probe{{{i}}}"))
            .find(|k| {
                let slot = node.keyslot(k);
                node.owns(slot)
            })
            .expect("a key of this master");
        let mut c = conn(master).await;
        let start = Instant::now();
        while !acknowledged(&mut c, &key).await {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "127.0.0.1:{master}: its replica acknowledged nothing within 30 s"
            );
        }
    }
    let mut builder = RedisConfig::builder();
    for port in &masters {
        builder = builder.node("127.0.0.1", *port);
    }
    let config = builder
        .cluster(true)
        .client(client)
        .key_prefix("durable:")
        .wait_for_replicas(1, WAIT)
        .build()
        .expect("config");
    let backend = RedisBackend::connect(&config).await.expect("connect");
    (cluster, masters, backend)
}

/// Freezes node `i` of a cluster until the returned value is dropped.
async fn freeze_node(cluster: &Server, i: usize) -> Frozen {
    let control = cluster.node(i).expect("node control");
    let c = control.clone();
    tokio::task::spawn_blocking(move || c.pause())
        .await
        .expect("task")
        .expect("pause");
    Frozen(control)
}

async fn on_a_cluster_wait_goes_to_the_key_s_master(client: ClientLibrary) {
    let (cluster, masters, backend) = durable_cluster(client).await;
    let ttl = Duration::from_secs(60);

    // Two keys on two masters: `frozen` on the master whose replica is frozen below.
    let mut nodes: Vec<Node> = masters.iter().map(|p| Node::open(*p)).collect();
    let mut master_of = |key: &str| {
        let slot: u16 = nodes[0].cluster(&["KEYSLOT", &backend.lock_key(key)]);
        (0..nodes.len())
            .find(|&i| nodes[i].owns(slot))
            .expect("a master serving the slot")
    };
    let frozen_key = "k0";
    let frozen_master = master_of(frozen_key);
    let other_key = (1..)
        .map(|i| format!("k{i}"))
        .find(|k| master_of(k) != frozen_master)
        .expect("a key on another master");
    // Every script loaded on both masters, so that what is timed below is one pipeline.
    for key in [frozen_key, other_key.as_str()] {
        let warm = backend.take_over(key, &data("warm"), ttl, "nobody").await;
        assert!(matches!(warm, Ok(AcquireOutcome::Acquired(_))), "{warm:?}");
        assert_eq!(
            backend.release(key, "warm").await.expect("release"),
            ReleaseOutcome::Released
        );
    }

    let frozen = freeze_node(&cluster, frozen_master + 3).await;
    let start = Instant::now();
    match backend.acquire(&other_key, &data("other"), ttl).await {
        Ok(AcquireOutcome::Acquired(_)) => {}
        other => panic!("{other_key} on another master: {other:?}"),
    }
    assert!(
        start.elapsed() < WAIT,
        "{other_key} waited {:?}: its WAIT went to the master of the frozen replica",
        start.elapsed()
    );
    let start = Instant::now();
    let e = backend
        .acquire(frozen_key, &data("frozen"), ttl)
        .await
        .expect_err("its master's replica is frozen");
    let elapsed = start.elapsed();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.to_string().contains("only 0 of 1"), "{e}");
    assert!(
        elapsed >= WAIT,
        "failed after {elapsed:?}, before the wait timeout"
    );
    assert_eq!(backend.read(frozen_key).await.expect("read"), None);
    drop(frozen);

    // Thawed: the key's master has its replica again.
    let start = Instant::now();
    loop {
        match backend.acquire(frozen_key, &data("frozen"), ttl).await {
            Ok(AcquireOutcome::Acquired(_)) => break,
            Err(e) if e.is_retryable() && start.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("after the thaw: {other:?}"),
        }
    }
}

/// A slot moved to another master after the client loaded its slot map: the script is
/// answered `MOVED` by the old master, where its `WAIT` went too. The write must then be waited
/// for on the new master, or fail: never "acknowledged" by the old master's `WAIT` (which counts
/// nothing of it). The new master's replica is frozen, so any success would be a false one.
async fn a_moved_slot_is_never_acknowledged_by_the_old_master(client: ClientLibrary) {
    let (cluster, masters, backend) = durable_cluster(client).await;
    let ttl = Duration::from_secs(60);
    let mut nodes: Vec<Node> = masters.iter().map(|p| Node::open(*p)).collect();
    // A key never written (its slot holds no key, so it can move without migrating keys).
    let (key, slot, from) = (0..)
        .map(|i| format!("moved{i}"))
        .find_map(|key| {
            let slot = nodes[0].keyslot(&backend.lock_key(&key));
            let from = (0..3).find(|&i| nodes[i].owns(slot))?;
            let empty: u64 = nodes[from].cluster(&["COUNTKEYSINSLOT", &slot.to_string()]);
            (empty == 0).then_some((key, slot, from))
        })
        .expect("a key in an empty slot");
    let to = (from + 1) % 3;
    // The acquire script loaded on every master, the new one included: otherwise the moved
    // script would answer `NOSCRIPT` there, and the fallback would send it again with its own
    // `WAIT`, hiding what this case is about.
    for master in 0..3 {
        let key = (0..)
            .map(|i| format!("warm{i}"))
            .find(|k| {
                let slot = nodes[0].keyslot(&backend.lock_key(k));
                nodes[master].owns(slot)
            })
            .expect("a key of this master");
        let warm = backend.acquire(&key, &data("warm"), ttl).await;
        assert!(matches!(warm, Ok(AcquireOutcome::Acquired(_))), "{warm:?}");
        assert_eq!(
            backend.release(&key, "warm").await.expect("release"),
            ReleaseOutcome::Released
        );
    }
    let target_id = nodes[to].id();
    // The target first, then the others (what `redis-cli --cluster reshard` ends with).
    for i in [to, from, (from + 2) % 3] {
        let () = nodes[i].cluster(&["SETSLOT", &slot.to_string(), "NODE", &target_id]);
    }
    let start = Instant::now();
    while !(nodes[to].owns(slot) && (0..3).all(|i| i == to || !nodes[i].owns(slot))) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "slot {slot} did not move"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let frozen = freeze_node(&cluster, to + 3).await;
    for attempt in 0..2 {
        match backend.acquire(&key, &data("moved"), ttl).await {
            Err(e) => {
                eprintln!("attempt {attempt}: {e}");
                assert!(e.is_retryable(), "attempt {attempt}: {e}")
            }
            Ok(outcome) => panic!(
                "attempt {attempt}: {outcome:?}, with the new master's replica frozen: the \
                 WAIT answered for another connection's writes"
            ),
        }
    }
    let mut target = conn(masters[to]).await;
    assert_eq!(get(&mut target, &backend.lock_key(&key)).await, None);
    drop(frozen);

    let start = Instant::now();
    loop {
        match backend.acquire(&key, &data("moved"), ttl).await {
            Ok(AcquireOutcome::Acquired(_)) => break,
            Err(e) if e.is_retryable() && start.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("after the thaw: {other:?}"),
        }
    }
    let stored = get(&mut target, &backend.lock_key(&key)).await;
    assert!(stored.expect("on the new master").contains("moved"));
}

macro_rules! for_client {
    ($client:expr, $feature:literal, $($name:ident => $case:ident),* $(,)?) => {
        $(
            #[cfg(feature = $feature)]
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                $case($client).await;
            }
        )*
    };
}

for_client!(
    ClientLibrary::Redis,
    "redis",
    redis_rs_durable_writes_are_on_the_replica_when_they_return =>
        durable_writes_are_on_the_replica_when_they_return,
    redis_rs_a_frozen_replica_fails_durable_writes_and_leaves_no_lock =>
        a_frozen_replica_fails_durable_writes_and_leaves_no_lock,
    redis_rs_without_the_option_no_wait_is_sent => without_the_option_no_wait_is_sent,
    redis_rs_on_a_cluster_wait_goes_to_the_key_s_master =>
        on_a_cluster_wait_goes_to_the_key_s_master,
    redis_rs_a_moved_slot_is_never_acknowledged_by_the_old_master =>
        a_moved_slot_is_never_acknowledged_by_the_old_master,
);

for_client!(
    ClientLibrary::Fred,
    "fred",
    fred_durable_writes_are_on_the_replica_when_they_return =>
        durable_writes_are_on_the_replica_when_they_return,
    fred_a_frozen_replica_fails_durable_writes_and_leaves_no_lock =>
        a_frozen_replica_fails_durable_writes_and_leaves_no_lock,
    fred_without_the_option_no_wait_is_sent => without_the_option_no_wait_is_sent,
    fred_on_a_cluster_wait_goes_to_the_key_s_master =>
        on_a_cluster_wait_goes_to_the_key_s_master,
    fred_a_moved_slot_is_never_acknowledged_by_the_old_master =>
        a_moved_slot_is_never_acknowledged_by_the_old_master,
);
