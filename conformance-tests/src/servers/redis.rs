//! Redis and a 3-master Redis Cluster from the local `redis-server`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::process::{free_port, tcp_exchange, temp_dir, which, ServerProcess};
use super::{Server, ServerError, ServerKind};

/// Redis Cluster nodes talk on `port + 10000`.
const BUS_OFFSET: u16 = 10_000;

fn binary(kind: ServerKind) -> Result<PathBuf, ServerError> {
    which("redis-server").ok_or_else(|| ServerError::NotAvailable {
        what: format!("{kind} (redis-server not found in PATH)"),
        how: kind.how_to_get(),
    })
}

fn node(
    port: u16,
    cluster: bool,
    kind: ServerKind,
) -> Result<(ServerProcess, tempfile::TempDir), ServerError> {
    custom_node(port, cluster, kind, Vec::new(), false)
}

fn custom_node(
    port: u16,
    cluster: bool,
    kind: ServerKind,
    extra: Vec<OsString>,
    tls: bool,
) -> Result<(ServerProcess, tempfile::TempDir), ServerError> {
    let program = binary(kind)?;
    let dir = temp_dir("redis")?;
    let mut args: Vec<OsString> = vec![
        "--port".into(),
        port.to_string().into(),
        "--bind".into(),
        "127.0.0.1".into(),
        "--protected-mode".into(),
        "no".into(),
        "--save".into(),
        "".into(),
        "--appendonly".into(),
        "no".into(),
        "--daemonize".into(),
        "no".into(),
        "--dir".into(),
        dir.path().into(),
    ];
    if cluster {
        args.extend(
            [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
            ]
            .map(OsString::from),
        );
    }
    if tls {
        // The TLS port replaces the plain one (a later directive wins).
        args.extend([
            "--port".into(),
            "0".into(),
            "--tls-port".into(),
            port.to_string().into(),
        ]);
    }
    args.extend(extra);
    let process = ServerProcess::new(
        format!("redis-server on 127.0.0.1:{port}"),
        &program,
        args,
        None,
        dir.path().join("server.log"),
        Signal::SIGTERM,
        move || {
            if tls {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            } else {
                // Any answer will do: with ACLs, PING may be refused (`-NOAUTH`).
                tcp_exchange(port, b"PING\r\n", |b| b.ends_with(b"\r\n"))
                    .is_some_and(|r| r.starts_with('+') || r.starts_with('-'))
            }
        },
    )
    .cleanup_on_exit(dir.path().to_owned());
    Ok((process, dir))
}

/// Starts one Redis server.
pub(super) fn start() -> Result<Server, ServerError> {
    let port = free_port(0)?;
    let (process, dir) = node(port, false, ServerKind::Redis)?;
    Server::from_processes(
        ServerKind::Redis,
        vec![format!("redis://127.0.0.1:{port}")],
        vec![process],
        None,
        vec![Box::new(dir)],
    )
}

/// Starts one Redis server with extra `redis-server` arguments (ACL users, TLS files...);
/// with `tls`, the server listens only on a TLS port and the endpoint is `rediss://`.
pub(super) fn start_custom(extra: Vec<OsString>, tls: bool) -> Result<Server, ServerError> {
    let port = free_port(0)?;
    let (process, dir) = custom_node(port, false, ServerKind::Redis, extra, tls)?;
    let scheme = if tls { "rediss" } else { "redis" };
    Server::from_processes(
        ServerKind::Redis,
        vec![format!("{scheme}://127.0.0.1:{port}")],
        vec![process],
        None,
        vec![Box::new(dir)],
    )
}

/// Starts a Redis Cluster of 3 masters owning all 16384 slots.
pub(super) fn start_cluster() -> Result<Server, ServerError> {
    let mut processes = Vec::new();
    let mut dirs: Vec<Box<dyn std::any::Any + Send + Sync>> = Vec::new();
    let mut endpoints = Vec::new();
    for _ in 0..3 {
        let port = free_port(BUS_OFFSET)?;
        let (process, dir) = node(port, true, ServerKind::RedisCluster)?;
        processes.push(process);
        dirs.push(Box::new(dir));
        endpoints.push(format!("redis://127.0.0.1:{port}"));
    }
    Server::from_processes(
        ServerKind::RedisCluster,
        endpoints,
        processes,
        Some(form_cluster),
        dirs,
    )
}

fn port_of(node: &ServerProcess) -> Option<String> {
    node.label().rsplit(':').next().map(str::to_owned)
}

/// Assigns the slots on first start (a restart keeps them in `nodes.conf`), then waits until
/// every node reports `cluster_state:ok`.
fn form_cluster(nodes: &[Arc<ServerProcess>]) -> Result<(), ServerError> {
    let ports: Vec<String> = nodes.iter().filter_map(|n| port_of(n)).collect();
    let info = |port: &str| {
        Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", port, "cluster", "info"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let assigned = info(&ports[0]).contains("cluster_slots_assigned:16384");
    if !assigned {
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(ports.iter().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .map_err(|e| {
                ServerError::io("run redis-cli --cluster create (package redis-tools)", e)
            })?;
        if !out.status.success() {
            return Err(ServerError::failed(format!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
    }
    let start = Instant::now();
    while !ports.iter().all(|p| info(p).contains("cluster_state:ok")) {
        if start.elapsed() > Duration::from_secs(60) {
            return Err(ServerError::failed(format!(
                "the Redis Cluster on ports {ports:?} did not reach cluster_state:ok within 60 s"
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}
