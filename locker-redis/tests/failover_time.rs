//! A liveness TTL that a Redis Cluster failover would outlast: the backend reads the cluster's
//! `cluster-node-timeout` at connect, and the locker warns, or refuses to start by option.

use std::time::Duration;

use locker_conformance::servers::{self, Server, ServerKind};
use locker_core::{ErrorKind, Locker};
use locker_redis::{ClientLibrary, RedisBackend, RedisConfig};

/// The cluster (kept running while its handle lives) and a configuration for it.
fn cluster_config(client: ClientLibrary) -> (Server, RedisConfig) {
    let server = servers::start(ServerKind::RedisCluster).unwrap_or_else(|e| panic!("{e}"));
    let mut builder = RedisConfig::builder();
    for endpoint in server.endpoints() {
        let port = endpoint
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port");
        builder = builder.node("127.0.0.1", port);
    }
    let config = builder
        .cluster(true)
        .client(client)
        .build()
        .expect("config");
    (server, config)
}

async fn the_failover_time_decides_whether_a_liveness_ttl_may_start(client: ClientLibrary) {
    let (_server, config) = tokio::task::spawn_blocking(move || cluster_config(client))
        .await
        .expect("task");
    // The test cluster runs with `cluster-node-timeout 2000`: 2 x 2 s + 1 s.
    let backend = RedisBackend::connect(&config).await.expect("connect");
    use locker_core::LockBackend;
    assert_eq!(
        backend.capabilities().failover_time,
        Some(Duration::from_secs(5))
    );

    let locker = |liveness: u64| {
        Locker::builder(config.clone())
            .liveness_ttl(Duration::from_secs(liveness))
            .report_every(Duration::from_millis(500))
            .refuse_liveness_shorter_than_failover(true)
            .build()
            .expect("locker")
    };
    let short = locker(2);
    let e = short
        .ready()
        .await
        .expect_err("a 2 s liveness TTL cannot outlive a 5 s failover");
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(!e.is_retryable());
    assert!(e.to_string().contains("failover"), "{e}");
    short.abandon().await;

    let long = locker(6);
    long.ready().await.expect("a 6 s liveness TTL outlives it");
    long.shutdown().await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_rs_reads_the_failover_time() {
    the_failover_time_decides_whether_a_liveness_ttl_may_start(ClientLibrary::Redis).await;
}

#[cfg(feature = "fred")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fred_reads_the_failover_time() {
    the_failover_time_decides_whether_a_liveness_ttl_may_start(ClientLibrary::Fred).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_server_has_no_failover_time() {
    let server = tokio::task::spawn_blocking(|| servers::start(ServerKind::Redis))
        .await
        .expect("task")
        .unwrap_or_else(|e| panic!("{e}"));
    let config = RedisConfig::from_url(server.url()).expect("config");
    let _server = server;
    let backend = RedisBackend::connect(&config).await.expect("connect");
    use locker_core::LockBackend;
    assert_eq!(backend.capabilities().failover_time, None);
}
