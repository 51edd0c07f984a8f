//! Each server kind starts, answers, pauses, restarts and stops, and leaves no process behind.

use std::time::Duration;

use locker_conformance::servers::{self, Provider, ServerKind};

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

fn tcp_port(endpoint: &str) -> u16 {
    let after = endpoint.rsplit(':').next().expect("port");
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().expect("numeric port")
}

fn answers(endpoint: &str) -> bool {
    std::net::TcpStream::connect_timeout(
        &([127, 0, 0, 1], tcp_port(endpoint)).into(),
        Duration::from_secs(1),
    )
    .is_ok()
}

fn lifecycle(kind: ServerKind) {
    let server = servers::start_process(kind).unwrap_or_else(|e| panic!("{kind}: {e}"));
    assert_eq!(server.provider(), Provider::Process);
    let expected_nodes = match kind {
        ServerKind::RedisCluster | ServerKind::EtcdCluster => 3,
        _ => 1,
    };
    assert_eq!(server.endpoints().len(), expected_nodes, "{server:?}");
    assert!(server.endpoints().iter().all(|e| answers(e)), "{server:?}");
    let control = server
        .control()
        .expect("the harness controls what it started");

    control.pause().expect("pause");
    control.resume().expect("resume");
    let before = server.pids();
    control.restart().expect("restart");
    let after = server.pids();
    assert_eq!(after.len(), expected_nodes);
    assert_ne!(before, after, "a restart starts new processes");
    assert!(
        before.iter().all(|p| !alive(*p)),
        "old processes survived a restart"
    );
    assert!(
        server.endpoints().iter().all(|e| answers(e)),
        "same ports after restart"
    );

    if expected_nodes == 3 {
        // One member can stop and start on its own.
        let node = server.node(1).expect("node 1");
        node.stop().expect("stop one node");
        node.start().expect("start one node");
    }

    let pids = server.pids();
    assert!(pids.iter().all(|p| alive(*p)));
    drop(server);
    assert!(
        pids.iter().all(|p| !alive(*p)),
        "a server process outlived its handle: {pids:?}"
    );
}

#[test]
fn redis_starts_and_stops() {
    lifecycle(ServerKind::Redis);
}

#[test]
fn redis_cluster_starts_and_stops() {
    lifecycle(ServerKind::RedisCluster);
}

#[test]
fn postgres_starts_and_stops() {
    lifecycle(ServerKind::Postgres);
}

#[test]
fn etcd_starts_and_stops() {
    lifecycle(ServerKind::Etcd);
}

#[test]
fn etcd_cluster_starts_and_stops() {
    lifecycle(ServerKind::EtcdCluster);
}

#[test]
fn providers_are_chosen_by_environment() {
    // The env provider with nothing set says which variable to set.
    let e = servers::start_with(ServerKind::Redis, Some("env"), None).expect_err("nothing set");
    assert!(e.to_string().contains("set LOCKER_TEST_REDIS_URL"), "{e}");
    // A variable names an existing server, which the harness does not control.
    let s = servers::start_with(
        ServerKind::EtcdCluster,
        None,
        Some("http://a:1, http://b:2"),
    )
    .expect("from env");
    assert_eq!(s.provider(), Provider::Env);
    assert_eq!(s.endpoints(), ["http://a:1", "http://b:2"]);
    assert!(s.control().is_none());
    // A bad provider name is refused.
    let e = servers::start_with(ServerKind::Redis, Some("docker"), None).expect_err("bad name");
    assert!(
        e.to_string()
            .contains("expected env, process or testcontainers"),
        "{e}"
    );
}

#[test]
fn a_shared_server_is_started_once() {
    let a = servers::shared(ServerKind::Redis).expect("redis");
    let b = servers::shared(ServerKind::Redis).expect("redis");
    assert!(std::ptr::eq(a, b));
    assert!(answers(a.url()));
}
