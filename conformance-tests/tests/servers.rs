//! Each server kind starts, answers, pauses, restarts, is killed and stops, and leaves no process
//! behind; a Redis Cluster with replicas forms, fails over and restarts.

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

    {
        // A kill (SIGKILL) leaves nothing running, and the node starts again on its port.
        let node = server.node(0).expect("node 0");
        let killed = node.pids();
        node.kill().expect("kill");
        assert!(
            killed.iter().all(|p| !alive(*p)),
            "a killed server's processes are gone when kill returns: {killed:?}"
        );
        assert!(node.pids().is_empty(), "a killed node is not running");
        assert!(!answers(&server.endpoints()[0]), "a killed server answered");
        node.start().expect("start after a kill");
        assert!(answers(&server.endpoints()[0]), "same port after a kill");
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

/// One command to a Redis node, its reply as text (a bulk string's content, or the line).
fn redis_command(endpoint: &str, command: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(
        &([127, 0, 0, 1], tcp_port(endpoint)).into(),
        Duration::from_secs(1),
    ) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(format!("{command}\r\n").as_bytes()).is_err() {
        return String::new();
    }
    let mut reply = Vec::new();
    let mut buf = [0; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&reply);
        let Some((head, body)) = text.split_once("\r\n") else {
            continue;
        };
        match head.strip_prefix('$').and_then(|n| n.parse::<usize>().ok()) {
            Some(len) if body.len() < len => continue,
            Some(len) => return body[..len].to_owned(),
            None => return head.to_owned(),
        }
    }
    String::from_utf8_lossy(&reply).into_owned()
}

/// Waits up to `limit` for `check`.
fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while !check() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

#[test]
fn a_redis_cluster_with_replicas_forms_fails_over_and_restarts() {
    let server = servers::start_redis_cluster_with_replicas().unwrap_or_else(|e| panic!("{e}"));
    let endpoints = server.endpoints().to_vec();
    assert_eq!(endpoints.len(), 6, "{server:?}");
    // Nodes 0 to 2 serve the slots; node i + 3 replicates node i, with its link up.
    for i in 0..3 {
        let info = redis_command(&endpoints[i], "INFO replication");
        assert!(info.contains("role:master"), "node {i}: {info}");
        let info = redis_command(&endpoints[i + 3], "INFO replication");
        let master = format!("master_port:{}", tcp_port(&endpoints[i]));
        assert!(
            info.contains("role:slave")
                && info.contains(&master)
                && info.contains("master_link_status:up"),
            "node {}: {info}",
            i + 3
        );
    }
    // A killed master's replica takes over.
    server.node(0).expect("node 0").kill().expect("kill");
    assert!(
        eventually(Duration::from_secs(20), || {
            redis_command(&endpoints[3], "INFO replication").contains("role:master")
                && redis_command(&endpoints[3], "CLUSTER INFO").contains("cluster_state:ok")
        }),
        "node 3 was not promoted"
    );
    // The whole cluster restarts as it is now: the old master comes back as a replica.
    let control = server.control().expect("control");
    control.restart().expect("restart after a failover");
    let info = redis_command(&endpoints[0], "INFO replication");
    assert!(
        info.contains("role:slave") && info.contains("master_link_status:up"),
        "node 0 after the restart: {info}"
    );
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
