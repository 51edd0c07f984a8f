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
                // A replica's first sync starts at once, not after the default 5 s wait for
                // other replicas to share a diskless transfer.
                "--repl-diskless-sync-delay",
                "0",
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
    start_cluster_of(3, 0)
}

/// Starts a Redis Cluster of 3 masters owning all 16384 slots, each with one replica: nodes
/// 0 to 2 are the masters, node `i + 3` replicates node `i`.
pub(super) fn start_cluster_with_replicas() -> Result<Server, ServerError> {
    start_cluster_of(3, 1)
}

fn start_cluster_of(masters: usize, replicas_each: usize) -> Result<Server, ServerError> {
    let mut processes = Vec::new();
    let mut dirs: Vec<Box<dyn std::any::Any + Send + Sync>> = Vec::new();
    let mut endpoints = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..masters * (1 + replicas_each) {
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
        Some(Box::new(move || form_cluster(&ports, masters))),
        dirs,
    )
}

/// The service name the sentinels of [`start_sentinel`] watch.
pub(super) const SENTINEL_SERVICE: &str = "locker";

/// Starts a Redis master (node 0), its replica (node 1) and three sentinels (nodes 2 to 4)
/// that watch them as [`SENTINEL_SERVICE`], with `down-after-milliseconds 1000`,
/// `failover-timeout 3000` and a quorum of 2. The endpoint is
/// `redis+sentinel://127.0.0.1:s1,127.0.0.1:s2,127.0.0.1:s3/locker`. It is returned once the
/// replica's link is up and every sentinel sees the master, the replica and the two other
/// sentinels.
pub(super) fn start_sentinel() -> Result<Server, ServerError> {
    let kind = ServerKind::Redis;
    let program = binary(kind)?;
    let master = free_port(0)?;
    let replica = free_port(0)?;
    let fast_sync = || vec![OsString::from("--repl-diskless-sync-delay"), "0".into()];
    let (master_process, master_dir) = custom_node(master, false, kind, fast_sync(), false)?;
    let mut replica_args = fast_sync();
    replica_args.extend([
        OsString::from("--replicaof"),
        "127.0.0.1".into(),
        master.to_string().into(),
    ]);
    let (replica_process, replica_dir) = custom_node(replica, false, kind, replica_args, false)?;
    let mut processes = vec![master_process, replica_process];
    let mut dirs: Vec<Box<dyn std::any::Any + Send + Sync>> =
        vec![Box::new(master_dir), Box::new(replica_dir)];
    let mut sentinels = Vec::new();
    for _ in 0..3 {
        let port = free_port(0)?;
        let dir = temp_dir("sentinel")?;
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {dir}\n\
                 sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {master} 2\n\
                 sentinel down-after-milliseconds {SENTINEL_SERVICE} 1000\n\
                 sentinel failover-timeout {SENTINEL_SERVICE} 3000\n\
                 sentinel parallel-syncs {SENTINEL_SERVICE} 1\n",
                dir = dir.path().display(),
            ),
        )
        .map_err(|e| ServerError::io("write sentinel.conf", e))?;
        let process = ServerProcess::new(
            format!("redis sentinel on 127.0.0.1:{port}"),
            &program,
            vec![conf.into_os_string(), "--sentinel".into()],
            None,
            dir.path().join("server.log"),
            Signal::SIGTERM,
            move || answers(port),
        )
        .cleanup_on_exit(dir.path().to_owned());
        processes.push(process);
        dirs.push(Box::new(dir));
        sentinels.push(port);
    }
    let endpoint = format!(
        "redis+sentinel://{}/{SENTINEL_SERVICE}",
        sentinels
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    Server::from_nodes(
        kind,
        Provider::Process,
        vec![endpoint],
        processes,
        Some(Box::new(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if sentinel_ready(replica, &sentinels) {
                    return Ok(());
                }
                if Instant::now() > deadline {
                    return Err(ServerError::failed(
                        "the sentinels did not see the master, its replica and each other \
                         within 30 s",
                    ));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })),
        dirs,
    )
}

fn sentinel_ready(replica: u16, sentinels: &[u16]) -> bool {
    let linked = command(replica, &["INFO", "replication"])
        .is_some_and(|info| info.contains("master_link_status:up"));
    linked
        && sentinels.iter().all(|&port| {
            command(port, &["INFO", "sentinel"]).is_some_and(|info| {
                info.contains("status=ok")
                    && info.contains("slaves=1")
                    && info.contains("sentinels=3")
            })
        })
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

/// Makes cluster-enabled Redis servers on loopback `ports` one cluster whose first `masters`
/// nodes share the 16384 slots and whose others replicate them in turn (node `masters + j`
/// replicates node `j % masters`), and waits until it is whole: every node reports
/// `cluster_state:ok` and, with replicas, every node knows every other, all give the same
/// account of who is master and who replicates whom, nobody is flagged failing, and every
/// replica's link to its master is up.
///
/// On first start each master takes an equal share of the slots and each node its own config
/// epoch, then the first node meets the others, and each replica, once it knows its master, is
/// told to replicate it (what `redis-cli --cluster create --cluster-replicas` does); a restart
/// keeps all that in each node's `nodes.conf` (after a failover, whoever is master now stays
/// so). Every step is decided from what the nodes report, so a pass that fails half-way (a node
/// slow to answer) is simply repeated, until 60 s have passed.
pub(super) fn form_cluster(ports: &[u16], masters: usize) -> Result<(), ServerError> {
    let start = Instant::now();
    let mut last = String::new();
    loop {
        match cluster_step(ports, masters) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = format!(" (last: {e})"),
        }
        if start.elapsed() > Duration::from_secs(60) {
            return Err(ServerError::failed(format!(
                "the Redis Cluster on ports {ports:?} ({masters} masters) was not whole within \
                 60 s{last}"
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One pass of [`form_cluster`]: `Ok(true)` once the cluster is whole.
fn cluster_step(ports: &[u16], masters: usize) -> Result<bool, String> {
    let infos = ports
        .iter()
        .map(|&p| {
            command(p, &["CLUSTER", "INFO"])
                .filter(|r| r.contains("cluster_state:"))
                .ok_or_else(|| format!("127.0.0.1:{p} did not answer CLUSTER INFO"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let n = ports.len();
    let masters = masters.clamp(1, n.max(1));
    // Slot-less masters (replicas-to-be) report `ok` as soon as the masters cover the slots.
    if infos.iter().all(|i| i.contains("cluster_state:ok"))
        && (masters >= n || replicas_ready(ports, masters)?)
    {
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
    for (i, (&port, info)) in ports.iter().zip(&infos).enumerate() {
        // Only a node that has met no other is still unconfigured.
        if field(info, "cluster_known_nodes") != Some(1) {
            continue;
        }
        if i < masters && field(info, "cluster_slots_assigned") == Some(0) {
            // ADDSLOTS, not ADDSLOTSRANGE, which needs Redis 7.
            let slots: Vec<String> = (16384 * i / masters..16384 * (i + 1) / masters)
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
    // A replica-to-be that knows every node and is still a master without slots (a first
    // start) is told whom to replicate.
    for (j, (&port, info)) in ports.iter().zip(&infos).enumerate().skip(masters) {
        if field(info, "cluster_known_nodes") != Some(n as u64) {
            continue;
        }
        let view = cluster_nodes(port)?;
        let me = view
            .iter()
            .find(|l| l.myself)
            .ok_or_else(|| format!("127.0.0.1:{port}: no `myself` in CLUSTER NODES"))?;
        if me.master && !me.has_slots {
            let master_port = ports[j % masters];
            let master = view
                .iter()
                .find(|l| l.port == master_port && !l.troubled)
                .ok_or_else(|| format!("127.0.0.1:{port} does not know 127.0.0.1:{master_port}"))?;
            expect_ok(port, &["CLUSTER", "REPLICATE", &master.id])?;
        }
    }
    Ok(false)
}

/// One line of `CLUSTER NODES`, as far as cluster formation needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NodeLine {
    id: String,
    port: u16,
    myself: bool,
    master: bool,
    /// The id of the master this node replicates, for a replica.
    replicates: Option<String>,
    /// Flagged failing (`fail`, `fail?`), or not yet met (`handshake`, `noaddr`).
    troubled: bool,
    has_slots: bool,
}

/// The node on `port`'s account of the cluster (`CLUSTER NODES`).
fn cluster_nodes(port: u16) -> Result<Vec<NodeLine>, String> {
    let reply = command(port, &["CLUSTER", "NODES"])
        .filter(|r| r.starts_with('$'))
        .ok_or_else(|| format!("127.0.0.1:{port} did not answer CLUSTER NODES"))?;
    Ok(reply
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                return None;
            }
            // `ip:port@cport` (Redis 7 may add `,hostname`).
            let port = fields[1]
                .split('@')
                .next()?
                .rsplit(':')
                .next()?
                .parse()
                .ok()?;
            let flags: Vec<&str> = fields[2].split(',').collect();
            Some(NodeLine {
                id: fields[0].to_owned(),
                port,
                myself: flags.contains(&"myself"),
                master: flags.contains(&"master"),
                replicates: (fields[3] != "-").then(|| fields[3].to_owned()),
                troubled: flags
                    .iter()
                    .any(|f| matches!(*f, "fail" | "fail?" | "handshake" | "noaddr")),
                has_slots: fields.len() > 8,
            })
        })
        .collect())
}

/// Whether a cluster whose every node reports `cluster_state:ok` has its replicas in place:
/// every node's account names all nodes, flags none, and agrees with the others on roles;
/// `masters` masters serve slots, each with its share of replicas; and every replica's link to
/// its master is up.
fn replicas_ready(ports: &[u16], masters: usize) -> Result<bool, String> {
    let mut first: Option<Vec<(String, bool, Option<String>)>> = None;
    for &port in ports {
        let view = cluster_nodes(port)?;
        if view.len() != ports.len() || view.iter().any(|l| l.troubled) {
            return Ok(false);
        }
        let mut roles: Vec<(String, bool, Option<String>)> = view
            .iter()
            .map(|l| (l.id.clone(), l.master, l.replicates.clone()))
            .collect();
        roles.sort();
        match &first {
            None => {
                let serving: Vec<&NodeLine> =
                    view.iter().filter(|l| l.master && l.has_slots).collect();
                let each = (ports.len() - masters) / masters;
                let whole = serving.len() == masters
                    && serving.iter().all(|m| {
                        view.iter()
                            .filter(|l| l.replicates.as_deref() == Some(m.id.as_str()))
                            .count()
                            == each
                    });
                if !whole {
                    return Ok(false);
                }
                first = Some(roles);
            }
            Some(f) if *f != roles => return Ok(false),
            Some(_) => {}
        }
    }
    for &port in ports {
        let info = command(port, &["INFO", "replication"])
            .ok_or_else(|| format!("127.0.0.1:{port} did not answer INFO replication"))?;
        if info.contains("role:slave") && !info.contains("master_link_status:up") {
            return Ok(false);
        }
    }
    Ok(true)
}
