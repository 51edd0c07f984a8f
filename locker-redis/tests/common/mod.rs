//! Helpers of the Redis Cluster tests: the nodes' ports, and a node reached directly.
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
