//! A master that forgot the lock scripts (restarted, or newly promoted in a failover) while
//! another master does not answer: every script call (acquire, extend, release) still works,
//! on both clients, because the script is sent again to the node that answered `NOSCRIPT`.
//!
//! Before: the `redis` crate's fallback loaded the script on every node of the cluster, and
//! fred's did the same (`SCRIPT LOAD` to every primary); with one node paused, the load failed
//! and the lock call with it (in a failover: background releases gave up, keys stayed locked).

mod common;

use std::time::Duration;

use common::{ports, Node};
use locker_conformance::servers::{self, ServerKind};
use locker_core::{LockAttempt, Locker, ReleaseOutcome};
use locker_redis::{ClientLibrary, RedisBackend, RedisConfig};

async fn scripts_are_sent_again_to_the_node_that_forgot_them(client: ClientLibrary) {
    let server = tokio::task::spawn_blocking(|| servers::start_private(ServerKind::RedisCluster))
        .await
        .expect("task")
        .unwrap_or_else(|e| panic!("{e}"));
    let ports = ports(&server);
    let mut builder = RedisConfig::builder();
    for port in &ports {
        builder = builder.node("127.0.0.1", *port);
    }
    let config = builder
        .cluster(true)
        .client(client)
        .connect_timeout(Duration::from_secs(1))
        // Short: the paused node must not be waited for longer than the cluster's node timeout
        // (2 s), after which every node would refuse with CLUSTERDOWN.
        .command_timeout(Duration::from_millis(700))
        .build()
        .expect("config");
    let locker = Locker::builder(config.clone())
        .liveness_ttl(Duration::from_secs(5))
        .report_every(Duration::from_millis(250))
        .build()
        .expect("locker");
    let key = "noscript";
    let LockAttempt::Acquired(guard) = locker.acquire(key).await.expect("acquire") else {
        panic!("{key} held")
    };

    // The node that serves the lock, and one that serves neither the lock nor this process's
    // liveness record: that one is paused.
    let backend = RedisBackend::connect(&config).await.expect("connect");
    let mut nodes: Vec<Node> = ports.iter().map(|p| Node::open(*p)).collect();
    let lock_slot: u16 = nodes[0].cluster(&["KEYSLOT", &backend.lock_key(key)]);
    let process_slot: u16 =
        nodes[0].cluster(&["KEYSLOT", &backend.process_key(locker.process_hash())]);
    let idle = (0..nodes.len())
        .find(|&i| !nodes[i].owns(lock_slot) && !nodes[i].owns(process_slot))
        .expect("a node serving neither slot");
    for node in &mut nodes {
        let () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query(&mut node.conn)
            .expect("SCRIPT FLUSH");
    }
    let paused = server.node(idle).expect("node control");
    tokio::task::spawn_blocking({
        let paused = paused.clone();
        move || paused.pause()
    })
    .await
    .expect("task")
    .expect("pause");

    let extended = guard.extend().await;
    let released = guard.release().await;
    let again = locker.acquire(key).await;

    tokio::task::spawn_blocking(move || paused.resume())
        .await
        .expect("task")
        .expect("resume");
    extended.expect("extend (EVALSHA, NOSCRIPT, then EVAL on the lock's node)");
    assert_eq!(released.expect("release"), ReleaseOutcome::Released);
    match again.expect("acquire again") {
        LockAttempt::Acquired(g) => drop(g.release().await),
        LockAttempt::Held(h) => panic!("held by {}", h.owner_hash),
    }
    locker.shutdown().await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_rs_scripts_are_sent_again_to_the_node_that_forgot_them() {
    scripts_are_sent_again_to_the_node_that_forgot_them(ClientLibrary::Redis).await;
}

#[cfg(feature = "fred")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fred_scripts_are_sent_again_to_the_node_that_forgot_them() {
    scripts_are_sent_again_to_the_node_that_forgot_them(ClientLibrary::Fred).await;
}
