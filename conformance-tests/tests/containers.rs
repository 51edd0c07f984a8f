//! The testcontainers provider: each server kind starts in containers on the host's network,
//! answers, stops answering while paused, comes back on the same ports after a restart and after
//! a kill, and leaves no container once dropped.
//!
//! These tests need a Docker engine, so they are `#[ignore]`d in a plain `cargo test`;
//! `scripts/test` starts one and runs them with `--ignored`. Without an engine they fail, saying
//! how to get one.

#![cfg(feature = "testcontainers")]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use locker_conformance::servers::{self, containers, Provider, Server, ServerKind};

const NEEDS_ENGINE: &str =
    "needs a Docker engine (DOCKER_HOST); scripts/test starts one and runs these with --ignored";

fn port(endpoint: &str) -> u16 {
    let after = endpoint.rsplit(':').next().expect("port");
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().expect("numeric port")
}

/// Whether the server at `endpoint` answers its own protocol's probe within a second: Redis a
/// PING, PostgreSQL a startup message (with an authentication request), etcd `GET /health`.
fn answers(kind: ServerKind, endpoint: &str) -> bool {
    let request: Vec<u8> = match kind {
        ServerKind::Redis | ServerKind::RedisCluster => b"PING\r\n".to_vec(),
        ServerKind::Postgres => {
            let mut body = 196_608_u32.to_be_bytes().to_vec();
            body.extend(b"user\0postgres\0database\0postgres\0\0");
            let mut m = u32::try_from(body.len() + 4)
                .expect("small")
                .to_be_bytes()
                .to_vec();
            m.extend(body);
            m
        }
        ServerKind::Etcd | ServerKind::EtcdCluster => {
            b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".to_vec()
        }
    };
    let Ok(mut s) = TcpStream::connect_timeout(
        &([127, 0, 0, 1], port(endpoint)).into(),
        Duration::from_secs(1),
    ) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(&request).is_err() {
        return false;
    }
    let mut reply = Vec::new();
    let mut buf = [0; 512];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n]);
        if kind != ServerKind::Etcd && kind != ServerKind::EtcdCluster {
            break;
        }
    }
    let reply = String::from_utf8_lossy(&reply);
    match kind {
        ServerKind::Redis | ServerKind::RedisCluster => reply.starts_with("+PONG"),
        ServerKind::Postgres => reply.starts_with('R'),
        ServerKind::Etcd | ServerKind::EtcdCluster => reply.contains("\"health\":\"true\""),
    }
}

/// The names of this process's containers of `kind` (other tests, running at the same time,
/// start other kinds).
fn our_containers(kind: ServerKind) -> Vec<String> {
    let prefix = format!(
        "locker-test-{}-{}-",
        kind.to_string().to_lowercase().replace(' ', "-"),
        std::process::id()
    );
    let out = Command::new("docker")
        .env("DOCKER_HOST", containers::docker_host())
        .args([
            "ps",
            "-a",
            "--format",
            "{{.Names}}",
            "--filter",
            &format!("label={}={}", containers::LABEL, std::process::id()),
        ])
        .output()
        .expect("run docker ps");
    assert!(out.status.success(), "docker ps: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|name| name.trim_start_matches('/').starts_with(&prefix))
        .map(str::to_owned)
        .collect()
}

fn start(kind: ServerKind) -> Server {
    assert!(
        servers::containers_available(),
        "no Docker engine answers at DOCKER_HOST={:?}: {NEEDS_ENGINE}",
        std::env::var("DOCKER_HOST").ok()
    );
    servers::start_with(kind, Some("testcontainers"), None)
        .unwrap_or_else(|e| panic!("{kind}: {e}"))
}

/// Whether every node answers within 10 s (an etcd cluster may hold an election first).
fn all_answer_soon(server: &Server) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if server.endpoints().iter().all(|e| answers(server.kind(), e)) {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn lifecycle(kind: ServerKind) {
    let server = start(kind);
    assert_eq!(server.provider(), Provider::Testcontainers);
    let nodes = match kind {
        ServerKind::RedisCluster | ServerKind::EtcdCluster => 3,
        _ => 1,
    };
    assert_eq!(server.endpoints().len(), nodes, "{server:?}");
    let names = our_containers(kind);
    assert_eq!(names.len(), nodes, "{names:?}");
    assert!(
        server.endpoints().iter().all(|e| answers(kind, e)),
        "{server:?}"
    );
    let control = server
        .control()
        .expect("the harness controls its containers");

    control.pause().expect("pause");
    assert!(
        server.endpoints().iter().all(|e| !answers(kind, e)),
        "a paused server answered: {server:?}"
    );
    control.resume().expect("resume");
    assert!(all_answer_soon(&server), "resumed");

    control.stop().expect("stop");
    assert!(
        server.endpoints().iter().all(|e| !answers(kind, e)),
        "a stopped server answered"
    );
    control.start().expect("start");
    assert!(all_answer_soon(&server), "same ports after a restart");
    if nodes == 3 {
        // One member can stop and start on its own.
        let node = server.node(1).expect("node 1");
        node.stop().expect("stop one node");
        node.start().expect("start one node");
        assert!(all_answer_soon(&server), "after one node's restart");
    }
    {
        // A killed node (`docker kill`) starts again on its port.
        let node = server.node(0).expect("node 0");
        node.kill().expect("kill");
        assert!(
            !answers(kind, &server.endpoints()[0]),
            "a killed server answered"
        );
        node.start().expect("start after a kill");
        assert!(all_answer_soon(&server), "after a kill and a start");
    }

    drop(control);
    drop(server);
    let after = our_containers(kind);
    assert!(
        after.is_empty(),
        "dropping the server removes its containers: {names:?} -> {after:?}"
    );
}

#[test]
#[ignore = "needs a Docker engine; scripts/test runs it"]
fn redis_in_a_container() {
    lifecycle(ServerKind::Redis);
}

#[test]
#[ignore = "needs a Docker engine; scripts/test runs it"]
fn redis_cluster_in_containers() {
    lifecycle(ServerKind::RedisCluster);
}

#[test]
#[ignore = "needs a Docker engine; scripts/test runs it"]
fn postgres_in_a_container() {
    lifecycle(ServerKind::Postgres);
}

#[test]
#[ignore = "needs a Docker engine; scripts/test runs it"]
fn etcd_in_a_container() {
    lifecycle(ServerKind::Etcd);
}

#[test]
#[ignore = "needs a Docker engine; scripts/test runs it"]
fn etcd_cluster_in_containers() {
    lifecycle(ServerKind::EtcdCluster);
}

/// A container whose handle is never dropped (a `shared` server) is removed when the test
/// process exits: run a child test process that starts one and exits, then look for it.
#[test]
#[ignore = "needs a Docker engine; scripts/test runs it"]
fn containers_are_removed_when_the_test_process_exits() {
    if std::env::var_os("LOCKER_TEST_LEAK_CHILD").is_some() {
        let server = start(ServerKind::Redis);
        println!("leaked-pid={}", std::process::id());
        std::mem::forget(server);
        return;
    }
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "containers_are_removed_when_the_test_process_exits",
            "--ignored",
            "--nocapture",
        ])
        .env("LOCKER_TEST_LEAK_CHILD", "1")
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child: {out:?}");
    let pid = stdout
        .lines()
        .find_map(|l| l.strip_prefix("leaked-pid="))
        .unwrap_or_else(|| panic!("child printed no pid: {stdout}"));
    let filter = format!("label={}={}", containers::LABEL, pid.trim());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ps = Command::new("docker")
            .env("DOCKER_HOST", containers::docker_host())
            .args(["ps", "-aq", "--filter", &filter])
            .output()
            .expect("docker ps");
        if String::from_utf8_lossy(&ps.stdout).trim().is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the child's container outlived it by 30 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn images_are_configurable() {
    // The defaults are the official images; a variable chooses another.
    assert_eq!(containers::DEFAULT_REDIS_IMAGE, "redis:7.4");
    assert!(containers::DEFAULT_POSTGRES_IMAGE.starts_with("postgres:"));
    assert!(containers::DEFAULT_ETCD_IMAGE.starts_with("quay.io/coreos/etcd:"));
    for kind in ServerKind::ALL {
        let var = containers::image_var(kind);
        assert!(var.starts_with("LOCKER_TEST_") && var.ends_with("_IMAGE"));
        match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => assert_eq!(containers::image(kind), v),
            _ => assert!(!containers::image(kind).is_empty()),
        }
    }
}
