//! Helpers of the Redis tests: a test cluster's nodes' ports, a node reached directly, a
//! server of a test's own, a server's command counts, and a plain connection to the shared
//! server.
#![allow(dead_code, unreachable_pub)]

use locker_conformance::servers::Server;

/// The ports of a test cluster's nodes, in the order of `Server::node`.
pub fn ports(server: &Server) -> Vec<u16> {
    server
        .endpoints()
        .iter()
        .map(|e| {
            e.rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .expect("port")
        })
        .collect()
}

/// One node of the test cluster, reached directly (not through the cluster client).
pub struct Node {
    pub port: u16,
    pub conn: redis::Connection,
}
impl Node {
    pub fn open(port: u16) -> Node {
        let conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .and_then(|c| c.get_connection())
            .expect("connect to a node");
        Node { port, conn }
    }

    pub fn cluster<T: redis::FromRedisValue>(&mut self, args: &[&str]) -> T {
        let mut cmd = redis::cmd("CLUSTER");
        for a in args {
            cmd.arg(*a);
        }
        cmd.query(&mut self.conn)
            .unwrap_or_else(|e| panic!("127.0.0.1:{}: CLUSTER {args:?}: {e}", self.port))
    }

    pub fn id(&mut self) -> String {
        self.cluster(&["MYID"])
    }

    /// Whether this node serves `slot`, by its own view.
    pub fn owns(&mut self, slot: u16) -> bool {
        let nodes: String = self.cluster(&["NODES"]);
        let line = nodes
            .lines()
            .find(|l| l.contains("myself"))
            .expect("myself");
        line.split_whitespace().skip(8).any(|range| {
            let mut bounds = range.split('-').map(|b| b.parse::<u16>());
            match (bounds.next(), bounds.next()) {
                (Some(Ok(lo)), Some(Ok(hi))) => (lo..=hi).contains(&slot),
                (Some(Ok(only)), None) => only == slot,
                _ => false, // a migration marker such as [5-<-id]
            }
        })
    }
}

/// One line of `CLUSTER NODES`: a node as some node of the cluster sees it.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub id: String,
    pub port: u16,
    pub master: bool,
    /// The id of the master it replicates, for a replica.
    pub replicates: Option<String>,
    /// Flagged `fail` (agreed by a majority of masters; not `fail?`, one node's suspicion).
    pub failed: bool,
    /// The slot ranges it serves (migration markers left out).
    pub slots: Vec<(u16, u16)>,
}

impl NodeInfo {
    pub fn serves(&self, slot: u16) -> bool {
        self.slots
            .iter()
            .any(|(lo, hi)| (*lo..=*hi).contains(&slot))
    }
}

/// Parses a `CLUSTER NODES` reply.
pub fn parse_nodes(text: &str) -> Vec<NodeInfo> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let port = f[1].split('@').next()?.rsplit(':').next()?.parse().ok()?;
            let flags: Vec<&str> = f[2].split(',').collect();
            let slots = f[8..]
                .iter()
                .filter_map(|range| {
                    let mut bounds = range.split('-').map(|b| b.parse::<u16>());
                    match (bounds.next(), bounds.next()) {
                        (Some(Ok(lo)), Some(Ok(hi))) => Some((lo, hi)),
                        (Some(Ok(only)), None) => Some((only, only)),
                        _ => None,
                    }
                })
                .collect();
            Some(NodeInfo {
                id: f[0].to_owned(),
                port,
                master: flags.contains(&"master"),
                replicates: (f[3] != "-").then(|| f[3].to_owned()),
                failed: flags.contains(&"fail"),
                slots,
            })
        })
        .collect()
}

impl Node {
    /// A node reached with connect, read and write timeouts, for polling a cluster in trouble.
    pub fn open_with_timeout(port: u16, timeout: std::time::Duration) -> redis::RedisResult<Node> {
        let conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))?
            .get_connection_with_timeout(timeout)?;
        conn.set_read_timeout(Some(timeout))?;
        conn.set_write_timeout(Some(timeout))?;
        Ok(Node { port, conn })
    }

    /// This node's account of the cluster (`CLUSTER NODES`).
    pub fn try_view(&mut self) -> redis::RedisResult<Vec<NodeInfo>> {
        let text: String = redis::cmd("CLUSTER").arg("NODES").query(&mut self.conn)?;
        Ok(parse_nodes(&text))
    }

    /// `CLUSTER INFO`'s `cluster_state` (`ok` or `fail`).
    pub fn try_state(&mut self) -> redis::RedisResult<String> {
        let text: String = redis::cmd("CLUSTER").arg("INFO").query(&mut self.conn)?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix("cluster_state:"))
            .unwrap_or_default()
            .trim()
            .to_owned())
    }

    /// `INFO <section>`.
    pub fn try_info(&mut self, section: &str) -> redis::RedisResult<String> {
        redis::cmd("INFO").arg(section).query(&mut self.conn)
    }

    /// The slot of a (full, prefixed) Redis key.
    pub fn keyslot(&mut self, key: &str) -> u16 {
        self.cluster(&["KEYSLOT", key])
    }
}

/// The calls of `command` a server has answered (scripts' calls included), from
/// `INFO commandstats`.
pub async fn command_calls(redis: &mut redis::aio::MultiplexedConnection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(redis)
        .await
        .expect("info");
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A Redis server of the test's own (so that its command counts are the test's alone), a
/// configuration for it with `client` and `prefix`, and a plain connection to it.
pub async fn private_redis(
    client: locker_redis::ClientLibrary,
    prefix: &str,
) -> (
    Server,
    locker_redis::RedisConfig,
    redis::aio::MultiplexedConnection,
) {
    use locker_conformance::servers::{self, ServerKind};
    let server = tokio::task::spawn_blocking(|| servers::start_private(ServerKind::Redis))
        .await
        .expect("task")
        .unwrap_or_else(|e| panic!("{e}"));
    let config = locker_redis::RedisConfig::from_url(server.url())
        .expect("url")
        .into_builder()
        .client(client)
        .key_prefix(prefix)
        .build()
        .expect("config");
    let redis = redis::Client::open(server.url())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    (server, config, redis)
}

/// A plain connection to the shared Redis server, to look at and set keys directly.
pub async fn shared_connection() -> redis::aio::MultiplexedConnection {
    let server =
        locker_conformance::servers::shared(locker_conformance::servers::ServerKind::Redis)
            .unwrap_or_else(|e| panic!("{e}"));
    redis::Client::open(server.url())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}
