//! Wedged connections (issue 16, point 1): a TCP proxy in front of a private PostgreSQL server stops
//! forwarding on every connection the locker has, which stay open. The locker must replace both
//! of its connections (jobs' and reporter's) before its liveness lapses; with healing off, the
//! same wedge costs it its lock (so the check can fail). See `locker_conformance::wedge`.

use std::sync::Arc;

use locker_conformance::servers::ServerKind;
use locker_conformance::wedge;
use locker_core::BackendFactory;
use locker_postgres::PostgresConfig;

fn factory(url: &str) -> Arc<dyn BackendFactory> {
    Arc::new(PostgresConfig::from_url(url).expect("config"))
}

#[test]
fn connections_heal_after_a_wedge() {
    wedge::check(ServerKind::Postgres, true, factory);
}

#[test]
fn wedge_costs_locks_without_healing() {
    wedge::check(ServerKind::Postgres, false, factory);
}
