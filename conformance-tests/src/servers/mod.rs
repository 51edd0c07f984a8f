//! Real servers for backend tests: Redis, a 3-master Redis Cluster (with a replica for each
//! master for failover tests: [`start_redis_cluster_with_replicas`]), PostgreSQL, etcd and a
//! 3-member etcd cluster.
//!
//! Each comes from one of three providers, chosen by `LOCKER_TEST_PROVIDER`:
//! - `env`: an existing server named by an environment variable ([`ServerKind::env_var`]);
//!   the harness never pauses or restarts it: the fault cases get private servers from
//!   [`start_private`];
//! - `process` (the default when the kind's variable is unset and its binaries are installed):
//!   started privately from the Debian binaries (`redis-server`,
//!   `/usr/lib/postgresql/*/bin/postgres`, `etcd`) on free loopback ports in a temporary
//!   directory, waited for until ready, and stopped when dropped. A wrapper stops it too when
//!   the test process exits, so no server outlives its tests;
//! - `testcontainers` (with the crate feature of that name): started from container images on
//!   the host's network ([`containers`]); the default when the kind's local binaries are
//!   missing and a Docker engine answers.
//!
//! When no server can be had, [`start`] and [`shared`] fail with a message that says how to get
//! one.

use std::fmt;
use std::sync::{Arc, OnceLock};

mod etcd;
mod pki;
mod postgres;
pub(crate) mod process;
mod redis;

#[cfg(feature = "testcontainers")]
pub mod containers;

pub use pki::TestPki;

/// Pauses, resumes, stops and restarts a server the harness started.
///
/// Calls block until the server is in the new state (a start waits until it is ready); from
/// async code, call `start` and `restart` through `tokio::task::spawn_blocking`.
pub trait ServerControl: Send + Sync + fmt::Debug {
    /// Freezes the server (SIGSTOP, or `docker pause`): connections stay open, nothing answers.
    fn pause(&self) -> Result<(), ServerError>;
    /// Undoes [`pause`](Self::pause).
    fn resume(&self) -> Result<(), ServerError>;
    /// Stops the server, keeping its port and data directory.
    fn stop(&self) -> Result<(), ServerError>;
    /// Kills the server at once (SIGKILL to its processes, or `docker kill`): no shutdown, no
    /// last reply or write. Like [`stop`](Self::stop) it keeps the port and data directory, so
    /// [`start`](Self::start) brings it back.
    fn kill(&self) -> Result<(), ServerError>;
    /// Starts a stopped server again, on the same port with the same data, and waits until it
    /// is ready.
    fn start(&self) -> Result<(), ServerError>;
    /// Stops and starts.
    fn restart(&self) -> Result<(), ServerError> {
        self.stop()?;
        self.start()
    }
    /// The operating-system processes of the server, while it runs (empty for simulated or
    /// containerized servers).
    fn pids(&self) -> Vec<u32>;
}

/// Why a server could not be had or controlled.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The server's binary is not installed, and no environment variable names a server.
    #[error("{what} is not available: {how}")]
    NotAvailable {
        /// What is missing.
        what: String,
        /// How to get it.
        how: String,
    },
    /// Starting, probing or controlling the server failed.
    #[error("{0}")]
    Failed(String),
    /// An operating-system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl ServerError {
    pub(crate) fn failed(msg: impl Into<String>) -> Self {
        ServerError::Failed(msg.into())
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ServerError::Io {
            context: context.into(),
            source,
        }
    }
}

/// The kinds of servers the harness provides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServerKind {
    /// One Redis server.
    Redis,
    /// A Redis Cluster of 3 masters (no replicas; [`start_redis_cluster_with_replicas`] adds
    /// one to each).
    RedisCluster,
    /// One PostgreSQL server.
    Postgres,
    /// One etcd member.
    Etcd,
    /// An etcd cluster of 3 members.
    EtcdCluster,
}

impl ServerKind {
    /// Every kind.
    pub const ALL: [ServerKind; 5] = [
        ServerKind::Redis,
        ServerKind::RedisCluster,
        ServerKind::Postgres,
        ServerKind::Etcd,
        ServerKind::EtcdCluster,
    ];

    /// The environment variable that names an existing server of this kind: one URL, or for
    /// clusters and etcd a comma-separated list of endpoints.
    pub fn env_var(self) -> &'static str {
        match self {
            ServerKind::Redis => "LOCKER_TEST_REDIS_URL",
            ServerKind::RedisCluster => "LOCKER_TEST_REDIS_CLUSTER_URLS",
            ServerKind::Postgres => "LOCKER_TEST_POSTGRES_URL",
            ServerKind::Etcd => "LOCKER_TEST_ETCD_ENDPOINTS",
            ServerKind::EtcdCluster => "LOCKER_TEST_ETCD_CLUSTER_ENDPOINTS",
        }
    }

    /// How to get a server of this kind on Debian, for error messages.
    pub fn how_to_get(self) -> String {
        let package = match self {
            ServerKind::Redis | ServerKind::RedisCluster => "redis-server",
            ServerKind::Postgres => "postgresql",
            ServerKind::Etcd | ServerKind::EtcdCluster => "etcd-server",
        };
        format!(
            "install it with `apt-get install {package}` (or run `scripts/test`, which installs \
             every server), or run a Docker engine (with the `testcontainers` feature, the \
             harness then starts it in a container), or point {} at a running one",
            self.env_var()
        )
    }

    fn index(self) -> usize {
        match self {
            ServerKind::Redis => 0,
            ServerKind::RedisCluster => 1,
            ServerKind::Postgres => 2,
            ServerKind::Etcd => 3,
            ServerKind::EtcdCluster => 4,
        }
    }
}

impl fmt::Display for ServerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServerKind::Redis => "Redis",
            ServerKind::RedisCluster => "Redis Cluster",
            ServerKind::Postgres => "PostgreSQL",
            ServerKind::Etcd => "etcd",
            ServerKind::EtcdCluster => "etcd cluster",
        })
    }
}

/// Where a server came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Provider {
    /// Named by an environment variable.
    Env,
    /// Started from local binaries.
    Process,
    /// Started from container images.
    Testcontainers,
}

/// A server (or cluster) ready for tests. Dropping it stops what the harness started.
pub struct Server {
    kind: ServerKind,
    provider: Provider,
    endpoints: Vec<String>,
    nodes: Vec<Arc<dyn ServerControl>>,
    control: Option<Arc<dyn ServerControl>>,
    _keep_alive: Vec<Box<dyn std::any::Any + Send + Sync>>,
}

impl Server {
    /// What kind of server this is.
    pub fn kind(&self) -> ServerKind {
        self.kind
    }

    /// Where it came from.
    pub fn provider(&self) -> Provider {
        self.provider
    }

    /// The first endpoint: `redis://127.0.0.1:port`, `postgres://postgres@127.0.0.1:port/postgres`,
    /// `http://127.0.0.1:port` for etcd.
    pub fn url(&self) -> &str {
        self.endpoints
            .first()
            .map(String::as_str)
            .unwrap_or_default()
    }

    /// Every endpoint (one per node of a cluster).
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Controls the whole server (every node of a cluster at once), when the harness started it.
    pub fn control(&self) -> Option<Arc<dyn ServerControl>> {
        self.control.clone()
    }

    /// Controls one node of a cluster (or the one node of a single server).
    pub fn node(&self, i: usize) -> Option<Arc<dyn ServerControl>> {
        self.nodes.get(i).cloned()
    }

    /// The operating-system processes of the server, while it runs.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().flat_map(|n| n.pids()).collect()
    }
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("kind", &self.kind)
            .field("provider", &self.provider)
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Stop every node now rather than whenever the last handle to it goes.
        for node in &self.nodes {
            let _ = node.stop();
        }
    }
}

/// Extra readiness of a whole group (a Redis Cluster's slots all assigned and served).
pub(crate) type GroupReady = Box<dyn Fn() -> Result<(), ServerError> + Send + Sync>;

/// A node the harness starts in two steps, so that the members of a cluster, which wait for
/// each other, can all be started before any is waited for.
pub(crate) trait Member: ServerControl {
    /// Starts the node without waiting for it to be ready.
    fn spawn(&self) -> Result<(), ServerError>;
    /// Waits until the node answers, failing early if it died.
    fn wait_ready(&self, limit: std::time::Duration) -> Result<(), ServerError>;
}

/// Stops, pauses and starts several nodes as one.
struct Group<M> {
    nodes: Vec<Arc<M>>,
    ready: Option<GroupReady>,
}

impl<M: fmt::Debug> fmt::Debug for Group<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Group").field("nodes", &self.nodes).finish()
    }
}

impl<M: Member> Group<M> {
    /// Runs `op` on every node at once (a `docker pause` takes tens of milliseconds; one after
    /// the other, the first node of a cluster would stay frozen longer than the last).
    fn all_at_once(
        &self,
        op: impl Fn(&M) -> Result<(), ServerError> + Sync,
    ) -> Result<(), ServerError> {
        std::thread::scope(|s| {
            let op = &op;
            let handles: Vec<_> = self.nodes.iter().map(|n| s.spawn(move || op(n))).collect();
            handles
                .into_iter()
                .map(|h| match h.join() {
                    Ok(result) => result,
                    Err(panic) => std::panic::resume_unwind(panic),
                })
                .collect::<Result<Vec<()>, ServerError>>()
                .map(drop)
        })
    }
}

impl<M: Member> ServerControl for Group<M> {
    fn pause(&self) -> Result<(), ServerError> {
        self.all_at_once(|n| n.pause())
    }

    fn resume(&self) -> Result<(), ServerError> {
        self.all_at_once(|n| n.resume())
    }

    fn stop(&self) -> Result<(), ServerError> {
        self.nodes.iter().try_for_each(|n| n.stop())
    }

    fn kill(&self) -> Result<(), ServerError> {
        self.all_at_once(|n| n.kill())
    }

    fn start(&self) -> Result<(), ServerError> {
        // Members of a cluster wait for each other: start all, then wait for all.
        self.nodes.iter().try_for_each(|n| n.spawn())?;
        for n in &self.nodes {
            n.wait_ready(std::time::Duration::from_secs(60))?;
        }
        match &self.ready {
            Some(ready) => ready(),
            None => Ok(()),
        }
    }

    fn pids(&self) -> Vec<u32> {
        self.nodes.iter().flat_map(|n| n.pids()).collect()
    }
}

impl Server {
    /// A server made of `nodes`, started (all nodes, then the group's readiness) before it is
    /// returned.
    pub(crate) fn from_nodes<M: Member + 'static>(
        kind: ServerKind,
        provider: Provider,
        endpoints: Vec<String>,
        nodes: Vec<M>,
        ready: Option<GroupReady>,
        keep_alive: Vec<Box<dyn std::any::Any + Send + Sync>>,
    ) -> Result<Server, ServerError> {
        let nodes: Vec<Arc<M>> = nodes.into_iter().map(Arc::new).collect();
        let group = Arc::new(Group {
            nodes: nodes.clone(),
            ready,
        });
        let server = Server {
            kind,
            provider,
            endpoints,
            nodes: nodes
                .into_iter()
                .map(|n| n as Arc<dyn ServerControl>)
                .collect(),
            control: Some(group.clone()),
            _keep_alive: keep_alive,
        };
        // On failure `server` is dropped here, which stops whatever did start.
        group.start()?;
        Ok(server)
    }

    fn from_env(kind: ServerKind, value: &str) -> Server {
        Server {
            kind,
            provider: Provider::Env,
            endpoints: value
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
            nodes: Vec::new(),
            control: None,
            _keep_alive: Vec::new(),
        }
    }
}

/// Whether the local binaries for `kind` are installed (what the `process` provider needs).
pub fn local_binaries(kind: ServerKind) -> bool {
    match kind {
        ServerKind::Redis | ServerKind::RedisCluster => process::which("redis-server").is_some(),
        ServerKind::Postgres => postgres::installed(),
        ServerKind::Etcd | ServerKind::EtcdCluster => process::which("etcd").is_some(),
    }
}

/// Whether the `testcontainers` provider can run here: the crate feature is on and a Docker
/// engine answers.
pub fn containers_available() -> bool {
    #[cfg(feature = "testcontainers")]
    {
        containers::engine_answers()
    }
    #[cfg(not(feature = "testcontainers"))]
    {
        false
    }
}

/// The provider `LOCKER_TEST_PROVIDER` (`provider`) chooses for `kind`. Unset: `env` when the
/// kind's variable is set, else `process` when the local binaries are installed, else
/// `testcontainers` when a Docker engine answers (and the feature is on), else `process`, which
/// then fails saying how to get a server.
fn provider_for(
    kind: ServerKind,
    provider: Option<&str>,
    env_set: bool,
) -> Result<Provider, ServerError> {
    choose(
        provider,
        env_set,
        || local_binaries(kind),
        containers_available,
    )
}

/// [`provider_for`] with the facts as functions, asked only when needed (a Docker ping costs a
/// connection).
fn choose(
    provider: Option<&str>,
    env_set: bool,
    local: impl FnOnce() -> bool,
    engine: impl FnOnce() -> bool,
) -> Result<Provider, ServerError> {
    match provider.map(str::trim) {
        None | Some("") => Ok(if env_set {
            Provider::Env
        } else if !local() && engine() {
            Provider::Testcontainers
        } else {
            Provider::Process
        }),
        Some("env") => Ok(Provider::Env),
        Some("process") => Ok(Provider::Process),
        Some("testcontainers") => Ok(Provider::Testcontainers),
        Some(other) => Err(ServerError::failed(format!(
            "LOCKER_TEST_PROVIDER={other:?}: expected env, process or testcontainers"
        ))),
    }
}

/// Gets a server of `kind` from the provider `LOCKER_TEST_PROVIDER` selects. A server from the
/// `process` or `testcontainers` provider is private to the caller and stops when dropped.
pub fn start(kind: ServerKind) -> Result<Server, ServerError> {
    start_with(
        kind,
        std::env::var("LOCKER_TEST_PROVIDER").ok().as_deref(),
        std::env::var(kind.env_var()).ok().as_deref(),
    )
}

/// [`start`] with the two environment variables given: `LOCKER_TEST_PROVIDER` and the kind's
/// [`env_var`](ServerKind::env_var).
pub fn start_with(
    kind: ServerKind,
    provider: Option<&str>,
    env_value: Option<&str>,
) -> Result<Server, ServerError> {
    match provider_for(kind, provider, env_value.is_some())? {
        Provider::Env => match env_value {
            Some(value) if !value.trim().is_empty() => Ok(Server::from_env(kind, value)),
            _ => Err(ServerError::NotAvailable {
                what: format!("{kind} (LOCKER_TEST_PROVIDER=env)"),
                how: format!("set {}", kind.env_var()),
            }),
        },
        Provider::Process => start_process(kind),
        Provider::Testcontainers => start_container(kind),
    }
}

/// Starts a private server of `kind` that the harness controls (pause, restart): what the fault
/// cases use. It comes from the provider `LOCKER_TEST_PROVIDER` selects, except that `env` (a
/// server the harness cannot control) falls back to the default choice between `process` and
/// `testcontainers`, ignoring the kind's variable.
pub fn start_private(kind: ServerKind) -> Result<Server, ServerError> {
    let chosen = std::env::var("LOCKER_TEST_PROVIDER").ok();
    match provider_for(kind, chosen.as_deref(), false)? {
        Provider::Testcontainers => start_container(kind),
        Provider::Env => match provider_for(kind, None, false)? {
            Provider::Testcontainers => start_container(kind),
            _ => start_process(kind),
        },
        Provider::Process => start_process(kind),
    }
}

/// Starts a private Redis Cluster of 3 masters, each with one replica, that the harness
/// controls: for failover tests. Endpoints and [`Server::node`] indices 0 to 2 are the masters
/// as started, 3 to 5 their replicas (node `i + 3` replicates node `i`); a failover changes
/// who is master, so ask the nodes (`CLUSTER NODES`) after one. The cluster runs with
/// `cluster-node-timeout 2000`. It is returned once whole: every node reports
/// `cluster_state:ok`, every replica's link is up, and every node gives the same account of
/// the roles.
///
/// The provider is chosen as [`start_private`] chooses it (`env` falls back to the default
/// choice: no environment variable names such a cluster).
pub fn start_redis_cluster_with_replicas() -> Result<Server, ServerError> {
    let kind = ServerKind::RedisCluster;
    let chosen = std::env::var("LOCKER_TEST_PROVIDER").ok();
    let provider = match provider_for(kind, chosen.as_deref(), false)? {
        Provider::Env => provider_for(kind, None, false)?,
        other => other,
    };
    match provider {
        Provider::Testcontainers => {
            #[cfg(feature = "testcontainers")]
            {
                containers::redis_cluster(3, 1)
            }
            #[cfg(not(feature = "testcontainers"))]
            {
                start_container(kind)
            }
        }
        _ => redis::start_cluster_with_replicas(),
    }
}

/// Starts a private Redis master, its replica and three sentinels from the local
/// `redis-server` (as `redis-server sentinel.conf --sentinel`, what Debian's `redis-sentinel`
/// runs): node 0 is the master as started, node 1 its replica, nodes 2 to 4 the sentinels
/// (`down-after-milliseconds 1000`, `failover-timeout 3000`, quorum 2, service `locker`). The
/// URL is `redis+sentinel://` with the three sentinels and the service name. Local processes
/// only: it fails, saying how to get `redis-server`, when the binary is missing.
pub fn start_redis_sentinel() -> Result<Server, ServerError> {
    redis::start_sentinel()
}

/// Starts a private server of `kind` from local binaries, whatever the environment says.
pub fn start_process(kind: ServerKind) -> Result<Server, ServerError> {
    match kind {
        ServerKind::Redis => redis::start(),
        ServerKind::RedisCluster => redis::start_cluster(),
        ServerKind::Postgres => postgres::start(),
        ServerKind::Etcd => etcd::start(1),
        ServerKind::EtcdCluster => etcd::start(3),
    }
}

/// Starts a private Redis server from the local `redis-server` with extra arguments (for
/// example `--user alice on >secret ~* &* +@all`, or TLS files). With `tls`, the server listens
/// only on a TLS port (pass `--tls-cert-file`, `--tls-key-file` and `--tls-ca-cert-file` in
/// `extra`), and the endpoint is `rediss://127.0.0.1:port`.
pub fn start_redis_with(
    extra: impl IntoIterator<Item = impl Into<std::ffi::OsString>>,
    tls: bool,
) -> Result<Server, ServerError> {
    redis::start_custom(extra.into_iter().map(Into::into).collect(), tls)
}

/// Starts a private one-member etcd from the local `etcd` with extra flags (for example
/// `--cert-file`/`--key-file`, or `--auth-token`). With `tls`, clients talk HTTPS and the endpoint
/// is `https://127.0.0.1:port`.
pub fn start_etcd_with(
    extra: impl IntoIterator<Item = impl Into<String>>,
    tls: bool,
) -> Result<Server, ServerError> {
    etcd::start_custom(1, extra.into_iter().map(Into::into).collect(), tls)
}

#[cfg(feature = "testcontainers")]
fn start_container(kind: ServerKind) -> Result<Server, ServerError> {
    containers::start(kind)
}

#[cfg(not(feature = "testcontainers"))]
fn start_container(kind: ServerKind) -> Result<Server, ServerError> {
    Err(ServerError::NotAvailable {
        what: format!("{kind} from testcontainers"),
        how: "build locker-conformance with the `testcontainers` feature".into(),
    })
}

/// One server of `kind` shared by every test of the test binary: started on first use, stopped
/// when the test process exits. Tests share it safely by using distinct key prefixes.
///
/// A failure to start is remembered, so every test that needs the server fails with the same
/// message.
pub fn shared(kind: ServerKind) -> Result<&'static Server, ServerError> {
    static SERVERS: [OnceLock<Result<Server, String>>; 5] = [
        OnceLock::new(),
        OnceLock::new(),
        OnceLock::new(),
        OnceLock::new(),
        OnceLock::new(),
    ];
    SERVERS[kind.index()]
        .get_or_init(|| start(kind).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| ServerError::failed(e.clone()))
}

#[cfg(test)]
mod tests {
    use super::{choose, Provider};

    #[test]
    fn the_default_provider_follows_what_the_host_has() {
        let pick = |provider, env_set, local, engine| {
            choose(provider, env_set, || local, || engine).expect("valid")
        };
        // A variable naming a server wins.
        assert_eq!(pick(None, true, false, true), Provider::Env);
        // Local binaries come first; containers when they are missing and an engine answers.
        assert_eq!(pick(None, false, true, true), Provider::Process);
        assert_eq!(pick(None, false, false, true), Provider::Testcontainers);
        // Neither: process, which fails saying how to install the server.
        assert_eq!(pick(None, false, false, false), Provider::Process);
        // An explicit choice is obeyed, whatever the host has.
        assert_eq!(
            pick(Some("testcontainers"), true, true, false),
            Provider::Testcontainers
        );
        assert_eq!(
            pick(Some(" process "), true, false, true),
            Provider::Process
        );
        assert_eq!(pick(Some("env"), false, true, true), Provider::Env);
        assert!(choose(Some("podman"), false, || true, || true).is_err());
    }
}
