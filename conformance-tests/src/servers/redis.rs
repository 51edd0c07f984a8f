//! Redis and a 3-master Redis Cluster from the local `redis-server`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::process::{free_port, tcp_exchange, temp_dir, which, ServerProcess};
use super::{Provider, Server, ServerError, ServerKind};

/// Redis Cluster nodes talk on `port + 10000`.
pub(super) const BUS_OFFSET: u16 = 10_000;

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
    let mut args: Vec<OsString> = server_args(port, &dir.path().to_string_lossy(), cluster)
        .into_iter()
        .map(OsString::from)
        .collect();
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
                answers(port)
            }
        },
    )
    .cleanup_on_exit(dir.path().to_owned());
    Ok((process, dir))
}

/// The `redis-server` flags of a test server on loopback `port` with its files in `dir`, with
/// no persistence (a restart forgets the data, as the fault cases expect), as a node of a
/// cluster or not.
pub(super) fn server_args(port: u16, dir: &str, cluster: bool) -> Vec<String> {
    let mut args: Vec<String> = [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--protected-mode",
        "no",
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--dir",
        dir,
    ]
    .map(str::to_owned)
    .into();
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
            .map(str::to_owned),
        );
    }
    args
}

/// Starts one Redis server.
pub(super) fn start() -> Result<Server, ServerError> {
    let port = free_port(0)?;
    let (process, dir) = node(port, false, ServerKind::Redis)?;
    Server::from_nodes(
        ServerKind::Redis,
        Provider::Process,
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
    Server::from_nodes(
        ServerKind::Redis,
        Provider::Process,
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
    let mut ports = Vec::new();
    for _ in 0..3 {
        let port = free_port(BUS_OFFSET)?;
        ports.push(port);
        let (process, dir) = node(port, true, ServerKind::RedisCluster)?;
        processes.push(process);
        dirs.push(Box::new(dir));
        endpoints.push(format!("redis://127.0.0.1:{port}"));
    }
    Server::from_nodes(
        ServerKind::RedisCluster,
        Provider::Process,
        endpoints,
        processes,
        Some(Box::new(move || form_cluster(&ports))),
        dirs,
    )
}

/// Sends one command to the Redis server on a loopback port and returns its reply (RESP text),
/// or `None` when nothing whole came back within a second. For commands whose reply is a simple
/// string, an error, an integer or a bulk string: an array reply would be cut after its first
/// line.
pub(super) fn command(port: u16, args: &[&str]) -> Option<String> {
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    tcp_exchange(port, request.as_bytes(), reply_complete)
}

/// Whether `b` holds a whole RESP reply of one of the kinds cluster formation gets: a simple
/// string, an error, an integer or a bulk string.
fn reply_complete(b: &[u8]) -> bool {
    let Some(end) = b.windows(2).position(|w| w == b"\r\n") else {
        return false;
    };
    if b.first() != Some(&b'$') {
        return true;
    }
    match std::str::from_utf8(&b[1..end])
        .ok()
        .and_then(|n| n.parse::<i64>().ok())
    {
        Some(n) if n >= 0 => b.len() >= end + 2 + n as usize + 2,
        _ => true,
    }
}

/// Whether a Redis server answers on `port`. Any answer will do: with ACLs, PING may be
/// refused (`-NOAUTH`).
pub(super) fn answers(port: u16) -> bool {
    tcp_exchange(port, b"PING\r\n", |b| b.ends_with(b"\r\n"))
        .is_some_and(|r| r.starts_with('+') || r.starts_with('-'))
}

/// Makes 3 (or more) cluster-enabled Redis servers on loopback `ports` one cluster, and waits
/// until every node reports `cluster_state:ok`. On first start each node takes an equal share of
/// the 16384 slots and its own config epoch, then the first meets the others (what
/// `redis-cli --cluster create` does); a restart keeps all that in each node's `nodes.conf`.
/// Every step is decided from what the nodes report, so a pass that fails half-way (a node slow
/// to answer) is simply repeated, until 60 s have passed.
pub(super) fn form_cluster(ports: &[u16]) -> Result<(), ServerError> {
    let start = Instant::now();
    let mut last = String::new();
    loop {
        match cluster_step(ports) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = format!(" (last: {e})"),
        }
        if start.elapsed() > Duration::from_secs(60) {
            return Err(ServerError::failed(format!(
                "the Redis Cluster on ports {ports:?} did not reach cluster_state:ok within \
                 60 s{last}"
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One pass of [`form_cluster`]: `Ok(true)` once every node reports `cluster_state:ok`.
fn cluster_step(ports: &[u16]) -> Result<bool, String> {
    let infos = ports
        .iter()
        .map(|&p| {
            command(p, &["CLUSTER", "INFO"])
                .filter(|r| r.contains("cluster_state:"))
                .ok_or_else(|| format!("127.0.0.1:{p} did not answer CLUSTER INFO"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if infos.iter().all(|i| i.contains("cluster_state:ok")) {
        return Ok(true);
    }
    let field = |info: &str, name: &str| {
        info.lines().find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(':')?
                .trim()
                .parse::<u64>()
                .ok()
        })
    };
    let expect_ok = |port: u16, args: &[&str]| match command(port, args) {
        Some(r) if r.starts_with("+OK") => Ok(()),
        other => Err(format!(
            "127.0.0.1:{port}: CLUSTER {} answered {other:?}",
            args.get(1).copied().unwrap_or_default()
        )),
    };
    let n = ports.len();
    for (i, (&port, info)) in ports.iter().zip(&infos).enumerate() {
        // Only a node that has met no other is still unconfigured.
        if field(info, "cluster_known_nodes") != Some(1) {
            continue;
        }
        if field(info, "cluster_slots_assigned") == Some(0) {
            // ADDSLOTS, not ADDSLOTSRANGE, which needs Redis 7.
            let slots: Vec<String> = (16384 * i / n..16384 * (i + 1) / n)
                .map(|s| s.to_string())
                .collect();
            let mut args = vec!["CLUSTER", "ADDSLOTS"];
            args.extend(slots.iter().map(String::as_str));
            expect_ok(port, &args)?;
        }
        if field(info, "cluster_my_epoch") == Some(0) {
            expect_ok(port, &["CLUSTER", "SET-CONFIG-EPOCH", &(i + 1).to_string()])?;
        }
    }
    let (Some(&first), Some(first_info)) = (ports.first(), infos.first()) else {
        return Err("a Redis Cluster needs nodes".into());
    };
    if field(first_info, "cluster_known_nodes").is_some_and(|k| k < n as u64) {
        // MEET of a node already known is harmless.
        for &port in &ports[1..] {
            expect_ok(first, &["CLUSTER", "MEET", "127.0.0.1", &port.to_string()])?;
        }
    }
    Ok(false)
}
