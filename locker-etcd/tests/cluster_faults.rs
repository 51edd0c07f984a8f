//! A 3-member etcd cluster loses a member while locks are held: the locks stay held (their
//! holders keep beating, others see them held) and new acquires still work. The case with all
//! members paused for less than the liveness TTL is the conformance suite's
//! `fault_server_paused_shorter_than_the_liveness_ttl`, run on the cluster in `conformance.rs`.

use std::time::Duration;

use locker_conformance::servers::{self, ServerKind};
use locker_core::{LockAttempt, Locker};
use locker_etcd::EtcdConfig;

fn locker(config: &EtcdConfig) -> Locker {
    Locker::builder(config.clone())
        .report_every(Duration::from_millis(500))
        .liveness_ttl(Duration::from_secs(3))
        .recheck_every(Duration::from_millis(200))
        .reporter_start_timeout(Duration::from_secs(10))
        .build()
        .expect("locker")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_survive_the_loss_of_one_member() {
    let server = tokio::task::spawn_blocking(|| servers::start_private(ServerKind::EtcdCluster))
        .await
        .expect("task")
        .unwrap_or_else(|e| panic!("{e}"));
    let mut builder = EtcdConfig::builder()
        .connect_timeout(Duration::from_secs(2))
        .command_timeout(Duration::from_secs(3));
    for endpoint in server.endpoints() {
        let (host, port) = endpoint
            .trim_start_matches("http://")
            .rsplit_once(':')
            .expect("host:port");
        builder = builder.endpoint(host, port.parse().expect("port"));
    }
    let config = builder.build().expect("config");
    let (holder, other) = (locker(&config), locker(&config));

    let mut guards = Vec::new();
    for key in ["a", "b", "c"] {
        match holder.acquire(key).await.expect("acquire") {
            LockAttempt::Acquired(g) => guards.push(g),
            LockAttempt::Held(h) => panic!("{key} held by {}", h.owner_hash),
        }
    }

    // One member dies (whichever it is, even the leader).
    let member = server.node(1).expect("member 1");
    let stop = member.clone();
    tokio::task::spawn_blocking(move || stop.stop())
        .await
        .expect("task")
        .expect("stop member");

    // Longer than a liveness TTL: the holder's reporter must keep writing through the others.
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < until {
        for g in &guards {
            g.heartbeat()
                .beat()
                .await
                .expect("a lock was lost with one member down");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for (key, g) in ["a", "b", "c"].iter().zip(&guards) {
        match other.acquire(*key).await.expect("acquire") {
            LockAttempt::Held(h) => assert_eq!(h.owner_hash, g.owner_hash()),
            LockAttempt::Acquired(_) => panic!("{key} was free with its holder alive"),
        }
    }
    let fresh = match other.acquire("d").await.expect("acquire") {
        LockAttempt::Acquired(g) => g,
        LockAttempt::Held(h) => panic!("fresh key held by {}", h.owner_hash),
    };
    assert!(fresh.fencing_token() > guards[2].fencing_token());

    // The member comes back; everything goes on.
    tokio::task::spawn_blocking(move || member.start())
        .await
        .expect("task")
        .expect("restart member");
    for g in &guards {
        g.heartbeat().beat().await.expect("beat after recovery");
    }
    drop(fresh);
    drop(guards);
    holder.shutdown().await;
    other.shutdown().await;
}
