//! Wedged connections (issue 16, point 1): a TCP proxy in front of a private Redis stops
//! forwarding on every connection the locker has, which stay open. The locker must replace both
//! of its connections (jobs' and reporter's) before its liveness lapses, with either client;
//! with healing off, the same wedge costs it its lock (so the check can fail).

use std::sync::Arc;

use locker_conformance::servers::{self, Server, ServerKind};
use locker_conformance::wedge::{self, Proxy};
use locker_core::BackendFactory;
use locker_redis::{ClientLibrary, RedisConfig};

fn config(port: u16, client: ClientLibrary) -> Arc<dyn BackendFactory> {
    Arc::new(
        RedisConfig::builder()
            .node("127.0.0.1", port)
            .client(client)
            .build()
            .expect("config"),
    )
}

fn setup(
    client: ClientLibrary,
) -> (
    Server,
    Proxy,
    Arc<dyn BackendFactory>,
    Arc<dyn BackendFactory>,
) {
    let server = servers::start_private(ServerKind::Redis).unwrap_or_else(|e| panic!("{e}"));
    let port: u16 = server.endpoints()[0]
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    let proxy = Proxy::start(("127.0.0.1", port)).expect("proxy");
    let through = config(proxy.addr().port(), client);
    let direct = config(port, client);
    (server, proxy, through, direct)
}

async fn heals(client: ClientLibrary) {
    let (_server, proxy, through, direct) = tokio::task::spawn_blocking(move || setup(client))
        .await
        .expect("setup");
    wedge::connections_heal(&proxy, through, direct)
        .await
        .unwrap_or_else(|e| panic!("{client:?}: {e}"));
}

async fn control(client: ClientLibrary) {
    let (_server, proxy, through, direct) = tokio::task::spawn_blocking(move || setup(client))
        .await
        .expect("setup");
    wedge::wedge_costs_locks_without_healing(&proxy, through, direct)
        .await
        .unwrap_or_else(|e| panic!("{client:?}: {e}"));
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_rs_connections_heal_after_a_wedge() {
    heals(ClientLibrary::Redis).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_rs_wedge_costs_locks_without_healing() {
    control(ClientLibrary::Redis).await;
}

#[cfg(feature = "fred")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fred_connections_heal_after_a_wedge() {
    heals(ClientLibrary::Fred).await;
}

#[cfg(feature = "fred")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fred_wedge_costs_locks_without_healing() {
    control(ClientLibrary::Fred).await;
}
