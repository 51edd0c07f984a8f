//! The version check at connect: a server older than Redis 5.0 is refused with a typed,
//! non-retryable error naming both versions, with both client libraries, standalone and cluster.
//!
//! No old Redis is installed here, so the servers are fakes: a small RESP server on 127.0.0.1
//! that answers the commands the clients send at connect (`HELLO`, `AUTH`, `PING`, `CLIENT`,
//! `SELECT`, `INFO`, `CLUSTER SLOTS`, ...) as a Redis of the given version would. The real
//! server (7.0 here) is the conformance suite's: it connects and passes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use locker_core::{Error, ErrorKind};
use locker_redis::{ClientLibrary, RedisBackend, RedisConfig};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

fn clients() -> Vec<ClientLibrary> {
    vec![
        #[cfg(feature = "redis")]
        ClientLibrary::Redis,
        #[cfg(feature = "fred")]
        ClientLibrary::Fred,
    ]
}

/// What a fake node answers to `INFO`.
#[derive(Clone, Debug)]
enum Info {
    /// `redis_version:{0}`.
    Version(&'static str),
    /// An `INFO` with no `redis_version` line.
    NoVersion,
    /// `NOPERM`: the user's ACL denies `INFO`.
    NoPerm,
}

/// One fake node: its `INFO` answer, and for a cluster node the slot map (`start`, `end`, port)
/// it reports.
struct Node {
    info: Info,
    slots: Option<Vec<(u16, u16, u16)>>,
    /// Every command received, for the curious (`--nocapture` prints them).
    seen: Mutex<Vec<String>>,
}

/// Reads one command: a RESP array of bulk strings, or an inline command.
async fn read_command(r: &mut BufReader<TcpStream>) -> Option<Vec<String>> {
    let mut line = String::new();
    if r.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let line = line.trim_end();
    let Some(count) = line.strip_prefix('*') else {
        return Some(line.split_whitespace().map(str::to_owned).collect());
    };
    let mut args = Vec::new();
    for _ in 0..count.parse::<usize>().ok()? {
        let mut header = String::new();
        r.read_line(&mut header).await.ok()?;
        let len: usize = header.trim_end().strip_prefix('$')?.parse().ok()?;
        let mut data = vec![0; len + 2];
        r.read_exact(&mut data).await.ok()?;
        data.truncate(len);
        args.push(String::from_utf8_lossy(&data).into_owned());
    }
    Some(args)
}

fn bulk(s: &str) -> String {
    format!("${}\r\n{s}\r\n", s.len())
}

/// The answer of a Redis of `node.info`'s version (before 6.0: no `HELLO`, no ACL, no
/// `CLIENT SETINFO`, no `CLIENT ID`).
fn answer(node: &Node, args: &[String]) -> String {
    let name = args
        .first()
        .map(|s| s.to_ascii_uppercase())
        .unwrap_or_default();
    let sub = args
        .get(1)
        .map(|s| s.to_ascii_uppercase())
        .unwrap_or_default();
    match (name.as_str(), sub.as_str()) {
        ("PING", _) => "+PONG\r\n".into(),
        ("SELECT" | "READONLY" | "QUIT", _) | ("CLIENT", "SETNAME") => "+OK\r\n".into(),
        ("CLIENT", "GETNAME") => "$-1\r\n".into(),
        ("CLIENT", "ID") if !matches!(node.info, Info::Version(v) if v.starts_with("4.")) => {
            ":7\r\n".into()
        }
        ("CLIENT", _) => {
            "-ERR Syntax error, try CLIENT (LIST | KILL | GETNAME | SETNAME | PAUSE | REPLY)\r\n"
                .into()
        }
        ("AUTH", _) => "-ERR Client sent AUTH, but no password is set\r\n".into(),
        ("INFO", _) => {
            let mode = if node.slots.is_some() {
                "cluster"
            } else {
                "standalone"
            };
            match &node.info {
                Info::Version(v) => bulk(&format!(
                    "# Server\r\nredis_version:{v}\r\nredis_git_sha1:00000000\r\nredis_mode:{mode}\r\n"
                )),
                Info::NoVersion => bulk(&format!("# Server\r\nredis_mode:{mode}\r\n")),
                Info::NoPerm => "-NOPERM this user has no permissions to run the 'info' command\r\n"
                    .into(),
            }
        }
        ("CLUSTER", "INFO") if node.slots.is_some() => {
            bulk("cluster_state:ok\r\ncluster_slots_assigned:16384\r\ncluster_known_nodes:2\r\n")
        }
        ("CLUSTER", "SLOTS") => match &node.slots {
            Some(slots) => {
                let mut out = format!("*{}\r\n", slots.len());
                for (start, end, port) in slots {
                    let id = format!("{port:040}");
                    out += &format!(
                        "*3\r\n:{start}\r\n:{end}\r\n*3\r\n{}:{port}\r\n{}",
                        bulk("127.0.0.1"),
                        bulk(&id)
                    );
                }
                out
            }
            None => "-ERR This instance has cluster support disabled\r\n".into(),
        },
        _ => format!(
            "-ERR unknown command '{}'\r\n",
            args.first().map_or("", |s| s)
        ),
    }
}

/// Serves `node` on `listener` until the test ends.
fn serve(listener: TcpListener, node: Arc<Node>) {
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let node = node.clone();
            tokio::spawn(async move {
                let mut r = BufReader::new(stream);
                while let Some(args) = read_command(&mut r).await {
                    node.seen.lock().expect("lock").push(args.join(" "));
                    let reply = answer(&node, &args);
                    if r.get_mut().write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
}

async fn listener() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = l.local_addr().expect("addr").port();
    (l, port)
}

/// A standalone fake answering `info`; its port.
async fn standalone(info: Info) -> (u16, Arc<Node>) {
    let (l, port) = listener().await;
    let node = Arc::new(Node {
        info,
        slots: None,
        seen: Mutex::default(),
    });
    serve(l, node.clone());
    (port, node)
}

/// A two-primary fake cluster (slots split in half); the nodes' ports.
async fn cluster(first: Info, second: Info) -> Vec<(u16, Arc<Node>)> {
    let (l1, p1) = listener().await;
    let (l2, p2) = listener().await;
    let slots = vec![(0, 8191, p1), (8192, 16383, p2)];
    let mut nodes = Vec::new();
    for (l, port, info) in [(l1, p1, first), (l2, p2, second)] {
        let node = Arc::new(Node {
            info,
            slots: Some(slots.clone()),
            seen: Mutex::default(),
        });
        serve(l, node.clone());
        nodes.push((port, node));
    }
    nodes
}

fn config(ports: &[u16], cluster: bool, client: ClientLibrary) -> RedisConfig {
    let mut b = RedisConfig::builder();
    for port in ports {
        b = b.node("127.0.0.1", *port);
    }
    b.cluster(cluster)
        .client(client)
        .connect_timeout(Duration::from_secs(1))
        .command_timeout(Duration::from_secs(1))
        .build()
        .expect("config")
}

async fn connect(config: &RedisConfig) -> Result<RedisBackend, Error> {
    // Bounded here too, so that a hang shows as a failure with a message.
    tokio::time::timeout(Duration::from_secs(10), RedisBackend::connect(config))
        .await
        .expect("connect answers within 10 s")
}

fn assert_too_old(e: &Error, found: &str, context: &str) {
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{context}: {e}");
    assert!(!e.is_retryable(), "{context}: {e}");
    for part in [found, "5.0.0"] {
        assert!(
            e.message().contains(part),
            "{context}: {part} missing in {e}"
        );
    }
}

fn print_seen(label: &str, node: &Node) {
    eprintln!("{label}: {:?}", node.seen.lock().expect("lock"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_redis_4_is_refused() {
    for client in clients() {
        let (port, node) = standalone(Info::Version("4.0.9")).await;
        let e = connect(&config(&[port], false, client))
            .await
            .expect_err("Redis 4.0 refused");
        assert_too_old(&e, "4.0.9", &format!("{client:?}"));
        assert!(e.message().contains(&port.to_string()), "{e}");
        print_seen(&format!("{client:?} standalone"), &node);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_redis_5_0_0_is_accepted() {
    for client in clients() {
        let (port, _node) = standalone(Info::Version("5.0.0")).await;
        connect(&config(&[port], false, client))
            .await
            .unwrap_or_else(|e| panic!("{client:?}: Redis 5.0.0 accepted: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_one_old_primary_is_refused() {
    for client in clients() {
        // Only the new node is given: the old one is found through the slot map.
        let nodes = cluster(Info::Version("7.0.15"), Info::Version("4.0.9")).await;
        let e = connect(&config(&[nodes[0].0], true, client))
            .await
            .expect_err("a cluster with a Redis 4.0 primary refused");
        assert_too_old(&e, "4.0.9", &format!("{client:?}"));
        assert!(
            e.message().contains(&nodes[1].0.to_string()),
            "{client:?}: the old primary is named: {e}"
        );
        for (port, node) in &nodes {
            print_seen(&format!("{client:?} cluster node {port}"), node);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_of_new_primaries_is_accepted() {
    for client in clients() {
        let nodes = cluster(Info::Version("5.0.14"), Info::Version("255.255.255")).await;
        connect(&config(&[nodes[0].0], true, client))
            .await
            .unwrap_or_else(|e| panic!("{client:?}: cluster accepted: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_readable_version_is_refused_and_an_acl_denied_info_is_accepted() {
    for client in clients() {
        let (port, _node) = standalone(Info::NoVersion).await;
        let e = connect(&config(&[port], false, client))
            .await
            .expect_err("no redis_version refused");
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{client:?}: {e}");
        assert!(!e.is_retryable());
        assert!(e.message().contains("no redis_version"), "{e}");

        // NOPERM exists only since Redis 6.0 (ACLs), so the server is new enough.
        let (port, _node) = standalone(Info::NoPerm).await;
        connect(&config(&[port], false, client))
            .await
            .unwrap_or_else(|e| panic!("{client:?}: INFO denied by ACL accepted: {e}"));
        let nodes = cluster(Info::NoPerm, Info::Version("4.0.9")).await;
        let e = connect(&config(&[nodes[0].0], true, client))
            .await
            .expect_err("the old primary still refused");
        assert_too_old(&e, "4.0.9", &format!("{client:?} cluster"));
    }
}
