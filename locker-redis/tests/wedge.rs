//! Wedged connections (issue 16, point 1): a TCP proxy in front of a private Redis stops
//! forwarding on every connection the locker has, which stay open. The locker must replace both
//! of its connections (jobs' and reporter's) before its liveness lapses, with either client;
//! with healing off, the same wedge costs it its lock (so the check can fail). See
//! `locker_conformance::wedge`.

use std::sync::Arc;

use locker_conformance::servers::ServerKind;
use locker_conformance::wedge;
use locker_core::BackendFactory;
use locker_redis::RedisConfig;

/// A factory for `url` with the client named by `client` (`redis` or `fred`).
fn factory(client: &'static str) -> impl Fn(&str) -> Arc<dyn BackendFactory> {
    move |url| {
        let sep = if url.contains('?') { '&' } else { '?' };
        let url = format!("{url}{sep}client={client}");
        Arc::new(RedisConfig::from_url(&url).expect("config"))
    }
}

#[cfg(feature = "redis")]
#[test]
fn redis_rs_connections_heal_after_a_wedge() {
    wedge::check(ServerKind::Redis, true, factory("redis"));
}

#[cfg(feature = "redis")]
#[test]
fn redis_rs_wedge_costs_locks_without_healing() {
    wedge::check(ServerKind::Redis, false, factory("redis"));
}

#[cfg(feature = "fred")]
#[test]
fn fred_connections_heal_after_a_wedge() {
    wedge::check(ServerKind::Redis, true, factory("fred"));
}

#[cfg(feature = "fred")]
#[test]
fn fred_wedge_costs_locks_without_healing() {
    wedge::check(ServerKind::Redis, false, factory("fred"));
}
