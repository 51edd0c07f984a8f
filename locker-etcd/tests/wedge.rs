//! Wedged connections (issue 16, point 1): a TCP proxy in front of a private Etcd server stops
//! forwarding on every connection the locker has, which stay open. The locker must replace both
//! of its connections (jobs' and reporter's) before its liveness lapses; with healing off, the
//! same wedge costs it its lock (so the check can fail).

use std::sync::Arc;

use locker_conformance::servers::{self, Server, ServerKind};
use locker_conformance::wedge::{self, Proxy};
use locker_core::BackendFactory;
use locker_etcd::EtcdConfig;

type Setup = (
    Server,
    Proxy,
    Arc<dyn BackendFactory>,
    Arc<dyn BackendFactory>,
);

fn setup() -> Setup {
    let server = servers::start_private(ServerKind::Etcd).unwrap_or_else(|e| panic!("{e}"));
    let (proxy, through) = Proxy::for_url(server.url()).expect("proxy");
    let through = Arc::new(EtcdConfig::from_url(&through).expect("config"));
    let direct = Arc::new(EtcdConfig::from_url(server.url()).expect("config"));
    (server, proxy, through, direct)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_heal_after_a_wedge() {
    let (_server, proxy, through, direct) =
        tokio::task::spawn_blocking(setup).await.expect("setup");
    wedge::connections_heal(&proxy, through, direct)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wedge_costs_locks_without_healing() {
    let (_server, proxy, through, direct) =
        tokio::task::spawn_blocking(setup).await.expect("setup");
    wedge::wedge_costs_locks_without_healing(&proxy, through, direct)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}
