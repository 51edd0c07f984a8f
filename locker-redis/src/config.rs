//! [`RedisConfig`]: where the store is and how to talk to it, from a URL or a builder.

use std::fmt;
use std::time::Duration;

use locker_core::url_params::{duration, encode_raw_userinfo};
use locker_core::{Error, Result};
use percent_encoding::percent_decode_str;
use url::{Host, Url};

use crate::keys::KeyLayout;

/// The node label of a configuration made from an application's `ClusterClient`, whose nodes
/// are not known.
#[cfg(feature = "redis")]
const APPLICATION_CLUSTER_CLIENT: &str = "application-cluster-client";

/// How long connecting may take before it fails with a retryable error.
///
/// Value: **5 s**.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one command may take. A lock call that hangs longer than this is failed (and
/// retried by the locker) rather than left to hold up a heartbeat.
///
/// Value: **5 s**.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a durable write waits for its replicas when the URL gives `wait_replicas` but no
/// `wait_timeout`. A replica on the same network acknowledges within a millisecond or two; a
/// `WAIT` blocks its whole connection (every lock call multiplexed on it) while it waits, so a
/// replica that is gone should cost each write little, and the lock call is retried anyway.
///
/// Value: **100 ms**.
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_millis(100);

/// The opt-in durable mode: after each write that grants or keeps a lock (acquire, take-over,
/// extend), wait until `replicas` replicas have acknowledged it, for at most `timeout`
/// (`WAIT replicas timeout`). See [`RedisConfigBuilder::wait_for_replicas`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct WaitForReplicas {
    /// How many replicas must acknowledge (at least 1).
    pub replicas: u32,
    /// How long to wait for them (more than zero, less than the command timeout).
    pub timeout: Duration,
}

impl WaitForReplicas {
    /// The `WAIT` timeout in whole milliseconds, rounded up (`WAIT n 0` would block forever).
    pub(crate) fn timeout_ms(&self) -> u64 {
        u64::try_from(self.timeout.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
    }
}

/// Which Rust Redis client the backend drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum ClientLibrary {
    /// The `redis` crate (feature `redis`, the default).
    #[cfg(feature = "redis")]
    #[default]
    Redis,
    /// The `fred` crate (feature `fred`).
    #[cfg(feature = "fred")]
    #[cfg_attr(not(feature = "redis"), default)]
    Fred,
}

/// A standalone server or the seed nodes of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Topology {
    Standalone {
        host: String,
        port: u16,
    },
    Cluster {
        nodes: Vec<(String, u16)>,
    },
    /// A master found through Redis Sentinel: the sentinels, and the service name they watch.
    Sentinel {
        sentinels: Vec<(String, u16)>,
        service: String,
    },
}

/// Everything needed to connect to Redis; a [`BackendFactory`](locker_core::BackendFactory).
///
/// From a URL (see [`from_url`](RedisConfig::from_url)):
/// - `redis://[user[:password]@]host[:port][/db][?prefix=...]`, `rediss://...` for TLS;
/// - `redis+cluster://[user[:password]@]host1:port,host2:port`, `rediss+cluster://...` for TLS
///   (`redis-cluster://` and `rediss-cluster://` are the same),
///   or a builder with several [`node`](RedisConfigBuilder::node)s.
///
/// The password never appears in `Debug`, logs or errors.
///
/// ```
/// use std::time::Duration;
/// use locker_redis::RedisConfig;
///
/// let config = RedisConfig::from_url("redis://locker:s3cret@127.0.0.1:6379/2")?
///     .into_builder()
///     .key_prefix("billing:")
///     .command_timeout(Duration::from_secs(2))
///     .build()?;
/// assert!(!format!("{config:?}").contains("s3cret"));
/// # Ok::<(), locker_core::Error>(())
/// ```
#[derive(Clone)]
pub struct RedisConfig {
    pub(crate) topology: Topology,
    pub(crate) tls: bool,
    pub(crate) root_cert_pem: Option<Vec<u8>>,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
    pub(crate) database: i64,
    pub(crate) keys: KeyLayout,
    pub(crate) connect_timeout: Duration,
    pub(crate) command_timeout: Duration,
    pub(crate) client: ClientLibrary,
    pub(crate) wait_for_replicas: Option<WaitForReplicas>,
    pub(crate) release_events: bool,
    /// The application's own `redis` client (see [`RedisConfigBuilder::redis_client`]).
    #[cfg(feature = "redis")]
    pub(crate) redis_client: Option<redis::Client>,
    /// The application's own `fred` configuration (see [`RedisConfigBuilder::fred_config`]).
    #[cfg(feature = "fred")]
    pub(crate) fred_config: Option<fred::types::config::Config>,
    /// The application's own Redis Cluster client (see
    /// [`RedisConfigBuilder::redis_cluster_client`]).
    #[cfg(feature = "redis")]
    pub(crate) redis_cluster_client: Option<redis::cluster::ClusterClient>,
    /// The application's connection manager settings (see
    /// [`RedisConfigBuilder::connection_manager_config`]).
    #[cfg(feature = "redis")]
    pub(crate) manager_config: Option<redis::aio::ConnectionManagerConfig>,
    /// The application's `fred` builder (see [`RedisConfigBuilder::fred_builder`]).
    #[cfg(feature = "fred")]
    pub(crate) fred_builder: Option<fred::types::Builder>,
}

impl RedisConfig {
    /// Parses a `redis://`, `rediss://`, `redis+cluster://` or `rediss+cluster://` URL
    /// (`redis-cluster://` and `rediss-cluster://` too), with its query parameters: `prefix`,
    /// `client` (`redis` or `fred`), `connect_timeout`, `command_timeout`, and the durable mode's
    /// `wait_replicas` and `wait_timeout` (see
    /// [`wait_for_replicas`](RedisConfigBuilder::wait_for_replicas)). This is the parser
    /// `locker::connect` uses; its documentation has the table of every scheme's parameters.
    ///
    /// The user name and the password are percent-decoded, and so are the parameters' values
    /// (where `+` is a space: write `%2B` for a plus). The user info runs to the last `@`, so a
    /// password may hold a raw `/`, `?`, `#` or `@`; a `@` in a query value must be written `%40`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use locker_redis::RedisConfig;
    ///
    /// let config = RedisConfig::from_url(
    ///     "redis://:p%40ss@10.0.0.1:6380/2?prefix=billing%3A&command_timeout=1500ms",
    /// )?;
    /// assert_eq!(config.nodes(), [("10.0.0.1".to_owned(), 6380)]);
    /// assert_eq!(config.database(), 2);
    /// assert_eq!(config.key_prefix(), "billing:");
    /// assert_eq!(config.command_timeout(), Duration::from_millis(1500));
    /// # Ok::<(), locker_core::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](locker_core::ErrorKind::InvalidInput), naming what is wrong
    /// (an unknown parameter by its name, a `client` whose feature is not compiled in by the
    /// feature), never the password.
    pub fn from_url(url: &str) -> Result<Self> {
        parse_url(url)?.build()
    }

    /// A builder with the defaults (`127.0.0.1:6379`, no TLS, database 0, empty prefix).
    pub fn builder() -> RedisConfigBuilder {
        RedisConfigBuilder::default()
    }

    /// A builder holding this configuration, to change part of it.
    pub fn into_builder(self) -> RedisConfigBuilder {
        RedisConfigBuilder {
            nodes: self.nodes(),
            cluster: matches!(self.topology, Topology::Cluster { .. }),
            sentinel_service: match &self.topology {
                Topology::Sentinel { service, .. } => Some(service.clone()),
                _ => None,
            },
            tls: self.tls,
            root_cert_pem: self.root_cert_pem,
            username: self.username,
            password: self.password,
            database: self.database,
            key_prefix: self.keys.prefix().to_owned(),
            connect_timeout: self.connect_timeout,
            command_timeout: self.command_timeout,
            client: self.client,
            wait_replicas: self.wait_for_replicas.map(|w| w.replicas),
            wait_timeout: self.wait_for_replicas.map(|w| w.timeout),
            release_events: self.release_events,
            #[cfg(feature = "redis")]
            redis_client: self.redis_client,
            #[cfg(feature = "fred")]
            fred_config: self.fred_config,
            #[cfg(feature = "redis")]
            redis_cluster_client: self.redis_cluster_client,
            #[cfg(feature = "redis")]
            manager_config: self.manager_config,
            #[cfg(feature = "fred")]
            fred_builder: self.fred_builder,
        }
    }

    /// The same configuration on another client library.
    pub fn with_client(mut self, client: ClientLibrary) -> Self {
        self.client = client;
        self
    }

    /// The client library in use.
    pub fn client(&self) -> ClientLibrary {
        self.client
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.topology, Topology::Cluster { .. })
    }

    /// The key prefix (ioredis' `keyPrefix` in the Node library).
    pub fn key_prefix(&self) -> &str {
        self.keys.prefix()
    }

    /// The server, or the cluster's seed nodes, as `(host, port)`.
    pub fn nodes(&self) -> Vec<(String, u16)> {
        match &self.topology {
            Topology::Standalone { host, port } => vec![(host.clone(), *port)],
            Topology::Cluster { nodes } => nodes.clone(),
            Topology::Sentinel { sentinels, .. } => sentinels.clone(),
        }
    }

    /// Whether connections use TLS.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The ACL user name, if any.
    pub fn username(&self) -> Option<&str> {
        self.username.as_deref()
    }

    /// The database number (0 on a cluster).
    pub fn database(&self) -> i64 {
        self.database
    }

    /// See [`DEFAULT_CONNECT_TIMEOUT`].
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// See [`DEFAULT_COMMAND_TIMEOUT`].
    pub fn command_timeout(&self) -> Duration {
        self.command_timeout
    }

    /// The durable mode, when on: see [`RedisConfigBuilder::wait_for_replicas`].
    pub fn wait_for_replicas(&self) -> Option<WaitForReplicas> {
        self.wait_for_replicas
    }

    /// Whether releases wake waiters through pub/sub; see
    /// [`RedisConfigBuilder::release_events`].
    pub fn release_events(&self) -> bool {
        self.release_events
    }

    /// The Sentinel service name (the master's name the sentinels watch), when the server is
    /// found through Redis Sentinel; [`nodes`](Self::nodes) are then the sentinels.
    pub fn sentinel_service(&self) -> Option<&str> {
        match &self.topology {
            Topology::Sentinel { service, .. } => Some(service),
            _ => None,
        }
    }

    /// The URL of this configuration with the password replaced by `***`.
    pub fn redacted_url(&self) -> String {
        let scheme = match (&self.topology, self.tls) {
            (Topology::Standalone { .. }, false) => "redis",
            (Topology::Standalone { .. }, true) => "rediss",
            (Topology::Cluster { .. }, false) => "redis+cluster",
            (Topology::Cluster { .. }, true) => "rediss+cluster",
            (Topology::Sentinel { .. }, _) => "redis+sentinel",
        };
        let auth = match (&self.username, &self.password) {
            (Some(u), Some(_)) => format!("{u}:***@"),
            (None, Some(_)) => ":***@".to_owned(),
            (Some(u), None) => format!("{u}@"),
            (None, None) => String::new(),
        };
        let hosts = match &self.topology {
            Topology::Standalone { host, port } => format!("{host}:{port}/{}", self.database),
            Topology::Cluster { nodes } => nodes
                .iter()
                .map(|(h, p)| format!("{h}:{p}"))
                .collect::<Vec<_>>()
                .join(","),
            Topology::Sentinel { sentinels, service } => format!(
                "{}/{service}/{}",
                sentinels
                    .iter()
                    .map(|(h, p)| format!("{h}:{p}"))
                    .collect::<Vec<_>>()
                    .join(","),
                self.database
            ),
        };
        format!("{scheme}://{auth}{hosts}")
    }
}

/// Parses a Redis URL into a builder: the one parser behind [`RedisConfig::from_url`] and
/// `locker::connect`.
///
/// The `url` crate reads the scheme, the user info, the path and the query. A host list
/// (`h1:p1,h2:p2`) is not a URL host, so the authority is cut out first and each host is read by
/// the `url` crate on its own. The user info runs to the last `@` of the URL: a password may hold
/// a raw `/`, `?`, `#` or `@` (a `@` in a query value must then be written `%40`), and errors quote
/// only what follows that `@`, never the password.
fn parse_url(url: &str) -> Result<RedisConfigBuilder> {
    let bad = |why: &str| Error::invalid_input(format!("bad Redis URL: {why}"));
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| bad("expected scheme://..."))?;
    let (userinfo, after) = match rest.rfind('@') {
        Some(i) => (Some(&rest[..i]), &rest[i + 1..]),
        None => (None, rest),
    };
    let (hosts, tail) = after.split_at(after.find(['/', '?', '#']).unwrap_or(after.len()));
    let userinfo = userinfo.map_or_else(String::new, |u| format!("{}@", encode_raw_userinfo(u)));
    // `host` stands in for the host list, read below.
    let parsed =
        Url::parse(&format!("{scheme}://{userinfo}host{tail}")).map_err(|e| bad(&e.to_string()))?;
    let (cluster, tls, sentinel) = match parsed.scheme() {
        "redis" => (false, false, false),
        "rediss" => (false, true, false),
        "redis+cluster" | "redis-cluster" => (true, false, false),
        "rediss+cluster" | "rediss-cluster" => (true, true, false),
        "redis+sentinel" | "redis-sentinel" => (false, false, true),
        "rediss+sentinel" | "rediss-sentinel" => {
            return Err(bad(
                "TLS through Redis Sentinel (rediss+sentinel) is not supported yet; use \
                 redis+sentinel, or give an application's client",
            ))
        }
        other => {
            return Err(bad(&format!(
                "unknown scheme {other:?} (expected redis, rediss, redis+cluster, \
                 rediss+cluster or redis+sentinel)"
            )))
        }
    };
    let decode = |s: &str| -> Result<String> {
        percent_decode_str(s)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| bad("user name or password is not UTF-8 after percent-decoding"))
    };
    let username = Some(parsed.username())
        .filter(|u| !u.is_empty())
        .map(decode)
        .transpose()?;
    let password = parsed.password().map(decode).transpose()?;
    let mut nodes = Vec::new();
    // A host is not quoted: with the '@' forgotten, it would be `user:password`.
    for (i, host) in hosts.split(',').filter(|h| !h.is_empty()).enumerate() {
        nodes.push(parse_host(host).map_err(|why| bad(&format!("host #{}: {why}", i + 1)))?);
    }
    if nodes.is_empty() {
        return Err(bad("no host"));
    }
    let mut path = parsed.path().trim_start_matches('/');
    let mut sentinel_service = None;
    if sentinel {
        // `/service` or `/service/db`.
        let (service, db) = path.split_once('/').unwrap_or((path, ""));
        if service.is_empty() {
            return Err(bad("redis+sentinel needs the service name as the path: \
                 redis+sentinel://host:26379,host:26379/mymaster[/db]"));
        }
        sentinel_service = Some(decode(service)?);
        path = db;
    }
    let database = if path.is_empty() {
        0
    } else {
        path.parse::<i64>()
            .ok()
            .filter(|db| *db >= 0)
            .ok_or_else(|| bad(&format!("database {path:?} is not a number")))?
    };
    if parsed.fragment().is_some() {
        return Err(bad("a URL fragment (#...) means nothing here"));
    }
    let mut builder = RedisConfigBuilder {
        nodes,
        cluster,
        sentinel_service,
        tls,
        username,
        password,
        database,
        ..RedisConfigBuilder::default()
    };
    for (name, value) in parsed.query_pairs() {
        let duration = || duration(&name, &value).map_err(|why| bad(&why));
        builder = match &*name {
            "prefix" => builder.key_prefix(value.as_ref()),
            "client" => builder.client(client_named(&value).map_err(|why| bad(&why))?),
            "connect_timeout" => builder.connect_timeout(duration()?),
            "command_timeout" => builder.command_timeout(duration()?),
            "wait_replicas" => {
                let n = value
                    .parse::<u32>()
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| {
                        bad(&format!(
                            "wait_replicas {value:?} is not a number of replicas (1 or more)"
                        ))
                    })?;
                builder.wait_replicas = Some(n);
                builder
            }
            "wait_timeout" => {
                builder.wait_timeout = Some(duration()?);
                builder
            }
            "release_events" => builder.release_events(
                value
                    .parse()
                    .map_err(|_| bad(&format!("release_events {value:?} is not true or false")))?,
            ),
            other => {
                return Err(bad(&format!(
                    "unknown parameter {other:?} (expected prefix, client, connect_timeout, \
                     command_timeout, wait_replicas, wait_timeout or release_events; see the \
                     table of \
                     `locker::connect`)"
                )))
            }
        };
    }
    if builder.wait_timeout.is_some() && builder.wait_replicas.is_none() {
        return Err(bad(
            "wait_timeout needs wait_replicas (how many replicas to wait for)",
        ));
    }
    if builder.wait_replicas.is_some() && builder.wait_timeout.is_none() {
        builder.wait_timeout = Some(DEFAULT_WAIT_TIMEOUT);
    }
    Ok(builder)
}

/// `client=redis` or `client=fred`, when that client is compiled in.
fn client_named(name: &str) -> std::result::Result<ClientLibrary, String> {
    match name {
        #[cfg(feature = "redis")]
        "redis" => Ok(ClientLibrary::Redis),
        #[cfg(feature = "fred")]
        "fred" => Ok(ClientLibrary::Fred),
        // Reached only for a client whose feature is off.
        #[allow(unreachable_patterns)]
        "redis" | "fred" => Err(format!(
            "client={name} needs the `{name}` feature (of locker-redis, or of the `locker` \
             crate), which this build does not have"
        )),
        other => Err(format!("client {other:?} is neither redis nor fred")),
    }
}

/// One host of the authority, read by the `url` crate: `name`, `name:port`, `[v6]:port`.
fn parse_host(host: &str) -> std::result::Result<(String, u16), String> {
    if !host.starts_with('[') && host.matches(':').count() > 1 {
        return Err("an IPv6 address must be in brackets: [addr]:port".to_owned());
    }
    let url = Url::parse(&format!("redis://{host}")).map_err(|e| e.to_string())?;
    let name = match url.host() {
        Some(Host::Domain(name)) => name.to_owned(),
        Some(Host::Ipv4(addr)) => addr.to_string(),
        Some(Host::Ipv6(addr)) => addr.to_string(),
        None => String::new(),
    };
    if name.is_empty() {
        return Err("the host is empty".to_owned());
    }
    Ok((name, url.port().unwrap_or(6379)))
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.redacted_url())
            .field("key_prefix", &self.keys.prefix())
            .field("custom_root_cert", &self.root_cert_pem.is_some())
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .field("client", &self.client)
            .field("wait_for_replicas", &self.wait_for_replicas)
            .field("release_events", &self.release_events)
            .finish()
    }
}

impl fmt::Display for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted_url())
    }
}

/// Builds a [`RedisConfig`].
#[derive(Clone)]
#[must_use]
pub struct RedisConfigBuilder {
    nodes: Vec<(String, u16)>,
    cluster: bool,
    sentinel_service: Option<String>,
    tls: bool,
    root_cert_pem: Option<Vec<u8>>,
    username: Option<String>,
    password: Option<String>,
    database: i64,
    key_prefix: String,
    connect_timeout: Duration,
    command_timeout: Duration,
    client: ClientLibrary,
    wait_replicas: Option<u32>,
    wait_timeout: Option<Duration>,
    release_events: bool,
    #[cfg(feature = "redis")]
    redis_client: Option<redis::Client>,
    #[cfg(feature = "fred")]
    fred_config: Option<fred::types::config::Config>,
    #[cfg(feature = "redis")]
    redis_cluster_client: Option<redis::cluster::ClusterClient>,
    #[cfg(feature = "redis")]
    manager_config: Option<redis::aio::ConnectionManagerConfig>,
    #[cfg(feature = "fred")]
    fred_builder: Option<fred::types::Builder>,
}

impl Default for RedisConfigBuilder {
    fn default() -> Self {
        RedisConfigBuilder {
            nodes: Vec::new(),
            cluster: false,
            sentinel_service: None,
            tls: false,
            root_cert_pem: None,
            username: None,
            password: None,
            database: 0,
            key_prefix: String::new(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            client: ClientLibrary::default(),
            wait_replicas: None,
            wait_timeout: None,
            release_events: true,
            #[cfg(feature = "redis")]
            redis_client: None,
            #[cfg(feature = "fred")]
            fred_config: None,
            #[cfg(feature = "redis")]
            redis_cluster_client: None,
            #[cfg(feature = "redis")]
            manager_config: None,
            #[cfg(feature = "fred")]
            fred_builder: None,
        }
    }
}

impl RedisConfigBuilder {
    /// Whether releases wake waiters through pub/sub (`true` by default; URL parameter
    /// `release_events`). The release script then `PUBLISH`es on a channel named as the lock
    /// key when someone waits for the lock (a flag the waiters' backends set), and a backend
    /// with waiters keeps one pub/sub connection (to one node of a cluster). On a Redis Cluster every `PUBLISH` is sent to every node over the cluster bus:
    /// with many nodes and many releases per second, `false` saves that traffic, and waiters
    /// poll instead.
    pub fn release_events(mut self, on: bool) -> Self {
        self.release_events = on;
        self
    }

    /// The application's own `redis` client (a standalone server, or a replica set's master):
    /// its address, TLS (certificates included), credentials and database. The locker opens
    /// its connections from it, as the application's own do: one for the jobs (a
    /// `ConnectionManager`, with this configuration's timeouts), one for the liveness reporter
    /// on its thread and runtime, and, when a waiter waits, one for pub/sub. A `redis::Client`
    /// holds no connection, so nothing of the application's traffic is shared. This also sets
    /// the node, TLS, user, password and database of this builder from the client, and the
    /// client library to [`ClientLibrary::Redis`].
    ///
    /// ```
    /// let client = redis::Client::open("redis://:s3cret@10.0.0.5:6380/2")?;
    /// let config = locker_redis::RedisConfig::builder()
    ///     .redis_client(client)
    ///     .key_prefix("app:")
    ///     .build()?;
    /// assert_eq!(config.nodes(), [("10.0.0.5".to_owned(), 6380)]);
    /// assert_eq!(config.database(), 2);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[cfg(feature = "redis")]
    pub fn redis_client(mut self, client: redis::Client) -> Self {
        let info = client.get_connection_info();
        match info.addr() {
            redis::ConnectionAddr::Tcp(host, port) => {
                self.nodes = vec![(host.clone(), *port)];
                self.tls = false;
            }
            redis::ConnectionAddr::TcpTls { host, port, .. } => {
                self.nodes = vec![(host.clone(), *port)];
                self.tls = true;
            }
            // A Unix socket: the client connects; the node is only a label.
            _ => self.nodes = vec![("unix-socket".to_owned(), 0)],
        }
        self.cluster = false;
        self.sentinel_service = None;
        self.username = info.redis_settings().username().map(str::to_owned);
        self.password = info.redis_settings().password().map(str::to_owned);
        self.database = info.redis_settings().db();
        self.client = ClientLibrary::Redis;
        self.redis_client = Some(client);
        self
    }

    /// The application's own `fred` configuration: its servers (one, a cluster's seeds, or
    /// sentinels and a service name), TLS, credentials and database. The locker makes its own
    /// `fred` clients from it (for the jobs, for the liveness reporter on its thread and
    /// runtime, and for pub/sub), with this builder's timeouts, so nothing of the application's
    /// traffic is shared. This also sets the nodes, cluster or sentinel mode, TLS, user,
    /// password and database of this builder from it, and the client library to
    /// [`ClientLibrary::Fred`].
    ///
    /// ```
    /// use fred::types::config::Config;
    ///
    /// let fred = Config::from_url("redis-cluster://:s3cret@10.0.0.1:7000?node=10.0.0.2:7000")?;
    /// let config = locker_redis::RedisConfig::builder()
    ///     .fred_config(fred)
    ///     .key_prefix("app{locks}:")
    ///     .build()?;
    /// assert!(config.is_cluster());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[cfg(feature = "fred")]
    pub fn fred_config(mut self, config: fred::types::config::Config) -> Self {
        use fred::types::config::ServerConfig;
        let hosts = |servers: &[fred::types::config::Server]| {
            servers
                .iter()
                .map(|s| (s.host.to_string(), s.port))
                .collect::<Vec<_>>()
        };
        self.cluster = false;
        self.sentinel_service = None;
        match &config.server {
            ServerConfig::Centralized { server } => {
                self.nodes = vec![(server.host.to_string(), server.port)];
            }
            ServerConfig::Clustered { hosts: seeds, .. } => {
                self.nodes = hosts(seeds);
                self.cluster = true;
            }
            ServerConfig::Sentinel {
                hosts: sentinels,
                service_name,
            } => {
                self.nodes = hosts(sentinels);
                self.sentinel_service = Some(service_name.clone());
            }
            #[allow(unreachable_patterns)]
            _ => self.nodes = vec![("unix-socket".to_owned(), 0)],
        }
        self.tls = config.tls.is_some();
        self.username = config.username.clone();
        self.password = config.password.clone();
        self.database = config.database.map_or(0, i64::from);
        self.client = ClientLibrary::Fred;
        self.fred_config = Some(config);
        self
    }

    /// The application's own `fred` builder: its configuration (as
    /// [`fred_config`](Self::fred_config)), and its performance, connection and reconnection
    /// settings, which the locker's own `fred` clients (jobs, liveness reporter, pub/sub) are
    /// then built with. The locker still sets, over them, what bounds its calls: the
    /// connection timeout and the command timeouts of this builder (see
    /// [`command_timeout`](Self::command_timeout)), and at least 3 attempts per command (to
    /// follow a cluster's redirections). Without a reconnection policy in the application's
    /// builder, the locker's is used (exponential, 100 ms to 2 s, without end).
    ///
    /// ```
    /// use fred::prelude::*;
    ///
    /// let mut fred = Builder::from_config(Config::from_url("redis://10.0.0.5:6379")?);
    /// fred.with_performance_config(|p| p.max_feed_count = 100)
    ///     .set_policy(ReconnectPolicy::new_constant(0, 500));
    /// let config = locker_redis::RedisConfig::builder()
    ///     .fred_builder(fred)
    ///     .key_prefix("app:")
    ///     .build()?;
    /// assert_eq!(config.nodes(), [("10.0.0.5".to_owned(), 6379)]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// A builder without a configuration makes [`build`](Self::build) fail with
    /// [`ErrorKind::InvalidInput`](locker_core::ErrorKind::InvalidInput).
    #[cfg(feature = "fred")]
    pub fn fred_builder(mut self, builder: fred::types::Builder) -> Self {
        if let Some(config) = builder.get_config() {
            self = self.fred_config(config.clone());
        } else {
            self.client = ClientLibrary::Fred;
        }
        self.fred_builder = Some(builder);
        self
    }

    /// The application's own Redis Cluster client (`redis::cluster::ClusterClient`): its seed
    /// nodes, TLS, credentials, retries and routing. The locker opens its cluster connections
    /// from it: one for the jobs and one for the liveness reporter on its thread and runtime (a
    /// `ClusterClient` holds no connection, so nothing of the application's traffic is
    /// shared). This also sets the cluster mode and the client library
    /// ([`ClientLibrary::Redis`]) of this builder.
    ///
    /// A `ClusterClient` does not tell its nodes, so the locker cannot open pub/sub connections
    /// of its own: release events are off (see [`release_events`](Self::release_events)), and
    /// waiters poll. For release events, give the nodes and credentials to this builder (or a
    /// URL) instead. Lock keys must still share a slot where a caller needs them to (see the
    /// crate's notes on hash tags).
    ///
    /// ```
    /// let cluster = redis::cluster::ClusterClient::builder(["redis://10.0.0.1:7000"])
    ///     .retries(5)
    ///     .build()?;
    /// let config = locker_redis::RedisConfig::builder()
    ///     .redis_cluster_client(cluster)
    ///     .key_prefix("app{locks}:")
    ///     .build()?;
    /// assert!(config.is_cluster());
    /// assert!(!config.release_events());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[cfg(feature = "redis")]
    pub fn redis_cluster_client(mut self, client: redis::cluster::ClusterClient) -> Self {
        self.nodes = vec![(APPLICATION_CLUSTER_CLIENT.to_owned(), 0)];
        self.cluster = true;
        self.sentinel_service = None;
        self.tls = false;
        self.client = ClientLibrary::Redis;
        self.redis_cluster_client = Some(client);
        self
    }

    /// The application's connection manager settings (`redis::aio::ConnectionManagerConfig`:
    /// reconnection retries and backoff, pipeline buffer, concurrency limit, ...), for the
    /// locker's `ConnectionManager`s of a standalone server or a Sentinel-found master (the
    /// jobs' and the liveness reporter's). The locker still sets, over them, its connection
    /// and response timeouts ([`connect_timeout`](Self::connect_timeout),
    /// [`command_timeout`](Self::command_timeout)), which bound every lock call. Without it,
    /// the locker uses 2 retries and the defaults of `redis`.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let settings = redis::aio::ConnectionManagerConfig::new()
    ///     .set_number_of_retries(5)
    ///     .set_max_delay(Duration::from_secs(1));
    /// let config = locker_redis::RedisConfig::builder()
    ///     .node("10.0.0.5", 6379)
    ///     .connection_manager_config(settings)
    ///     .build()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[cfg(feature = "redis")]
    pub fn connection_manager_config(
        mut self,
        settings: redis::aio::ConnectionManagerConfig,
    ) -> Self {
        self.manager_config = Some(settings);
        self
    }

    /// Adds a server (`host:port`); several nodes make a cluster's seed list.
    pub fn node(mut self, host: impl Into<String>, port: u16) -> Self {
        self.nodes.push((host.into(), port));
        self
    }

    /// An error unless this builder still connects where `derived` (made from the application's
    /// client or configuration alone) does.
    #[cfg(any(feature = "redis", feature = "fred"))]
    fn check_same_target(&self, derived: RedisConfigBuilder) -> Result<()> {
        let same = self.nodes == derived.nodes
            && self.cluster == derived.cluster
            && self.sentinel_service == derived.sentinel_service
            && self.tls == derived.tls
            && self.database == derived.database;
        if same {
            Ok(())
        } else {
            Err(Error::invalid_input(
                "a node, cluster or sentinel mode, TLS or database was set after the \
                 application's client or configuration, which says where to connect: set them \
                 on the client or configuration instead",
            ))
        }
    }

    /// Finds the master through Redis Sentinel: the nodes of this builder are the sentinels,
    /// and `service` the name they watch the master by (`sentinel monitor <service> ...`).
    /// URL form: `redis+sentinel://[user:password@]host:26379,host:26379/service[/db]` (the
    /// credentials and the database are the master's; the sentinels are asked without).
    ///
    /// At connect, the backend asks the sentinels for the master (redis-rs), or lets `fred`
    /// follow them. With the `redis` crate, a failover is followed by reconnecting: the
    /// connection to the old master fails (refused while it is down, `READONLY` once it is
    /// back as a replica), and after
    /// [`reconnect_after_failures`](locker_core::LockerOptions::reconnect_after_failures)
    /// failures the locker connects again, which asks the sentinels again.
    pub fn sentinel(mut self, service: impl Into<String>) -> Self {
        self.sentinel_service = Some(service.into());
        self
    }

    /// Talks Redis Cluster (also implied by more than one node).
    pub fn cluster(mut self, cluster: bool) -> Self {
        self.cluster = cluster;
        self
    }

    /// Connects with TLS.
    pub fn tls(mut self, tls: bool) -> Self {
        self.tls = tls;
        self
    }

    /// Trusts this root certificate (PEM) instead of the system's, for TLS.
    pub fn root_certificate_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.root_cert_pem = Some(pem.into());
        self
    }

    /// ACL user name.
    pub fn username(mut self, username: impl Into<String>) -> Self {
        self.username = Some(username.into());
        self
    }

    /// Password (of the ACL user, or of `requirepass`).
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(password.into());
        self
    }

    /// Database number (standalone only).
    pub fn database(mut self, database: i64) -> Self {
        self.database = database;
        self
    }

    /// Prefix of every key, as ioredis' `keyPrefix` in the Node library (empty by default).
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// See [`DEFAULT_CONNECT_TIMEOUT`].
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// See [`DEFAULT_COMMAND_TIMEOUT`].
    pub fn command_timeout(mut self, d: Duration) -> Self {
        self.command_timeout = d;
        self
    }

    /// The client library to drive.
    pub fn client(mut self, client: ClientLibrary) -> Self {
        self.client = client;
        self
    }

    /// The durable mode (off by default): after each write that grants or keeps a lock
    /// (acquire, take-over, extend), wait until at least `replicas` replicas of the master that
    /// took it have acknowledged it, for at most `timeout`, with Redis' `WAIT replicas timeout`.
    /// URL form: `wait_replicas=1&wait_timeout=100ms` (the timeout defaults to
    /// [`DEFAULT_WAIT_TIMEOUT`]).
    ///
    /// **What it protects against.** Redis replicates asynchronously: a master answers a write
    /// before any replica has it. When that master fails and a replica is promoted (Redis
    /// Cluster, Sentinel), or when a paused master wakes up, acknowledges writes it had queued,
    /// then turns into a replica of the master elected meanwhile and discards them, a lock that
    /// was granted or extended is silently lost: another process may then take it while this
    /// one believes it holds it. With this mode, a granted or extended lock is on `replicas`
    /// replicas before the call returns, so a failover to one of them keeps it. (It is not a
    /// guarantee against everything: the promoted replica may be one that did not acknowledge,
    /// and a replica without persistence that restarts forgets it; see Redis' documentation of
    /// `WAIT`.) Operators can also refuse writes on a master that lost its replicas with
    /// `min-replicas-to-write` and `min-replicas-max-lag`, which bounds the same loss on the
    /// server side for every client.
    ///
    /// **When fewer replicas acknowledge within `timeout`:**
    /// - acquire and take-over: the lock was written on the master but is not known to be
    ///   durable. The backend releases it (if it is still this owner's, one more round trip,
    ///   not waited for) and fails with a retryable
    ///   [`ErrorKind::Unavailable`](locker_core::ErrorKind::Unavailable) error ("... of N
    ///   replicas acknowledged ..."). A `Locker` also undoes a failed acquire in the background
    ///   (its release-if-ours), so the key is free again, and trying again is safe. After a
    ///   failed take-over the dead owner's lock is gone too: its process was dead.
    /// - extend: a retryable `Unavailable` error; the lock stays this owner's on the master,
    ///   with the extension, and the heartbeat retries. Until an extension is acknowledged, the
    ///   locker counts the lock's time from the last one that was, which is the one a promoted
    ///   replica has.
    /// - outcomes that write nothing (held by another owner, no key) are returned as they are.
    ///
    /// Releases and liveness pings are not waited for: a lost release only leaves a lock to
    /// expire (or be taken over), and a liveness record is rewritten every report interval.
    ///
    /// **Cost.** `WAIT` is sent in the same pipeline as the script, on the same connection
    /// (Redis counts the writes of the connection `WAIT` is sent on), to the master that serves
    /// the key's slot: one round trip from the client, plus the master's round trip to its
    /// replicas. While a `WAIT` waits, the server answers nothing else on that connection, which
    /// carries every lock call of a `Locker`: with replicas that do not answer, each durable
    /// write costs up to `timeout` and the writes queue behind each other. `locker-bench`
    /// measures the cost with one replica on the same machine (BENCHMARKS.md): acquire +
    /// release cycles keep about 0.8 of the plain rate with one task, about 0.5 with 64.
    ///
    /// **Clients.** With the `redis` crate the pipeline goes to one node and is resent whole
    /// after a redirection or a reconnection (a resent acquire that finds its own record wrote
    /// nothing on the new connection, so it counts as not acknowledged). With `fred`, the two
    /// commands are sent once each (`max_attempts` 1), because fred would resend one of them
    /// alone, and a `WAIT` alone on another connection would count nothing; a redirection or a
    /// dropped connection is then a retryable error.
    ///
    /// `build` refuses `replicas` = 0, a zero `timeout`, and a `timeout` that is not shorter
    /// than the command timeout (the command would time out first), with
    /// [`ErrorKind::InvalidInput`](locker_core::ErrorKind::InvalidInput). A standalone server
    /// without replicas fails every durable write, after `timeout`: replicas are the point.
    pub fn wait_for_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.wait_replicas = Some(replicas);
        self.wait_timeout = Some(timeout);
        self
    }

    /// Turns the durable mode off (the default).
    pub fn no_wait_for_replicas(mut self) -> Self {
        self.wait_replicas = None;
        self.wait_timeout = None;
        self
    }

    /// Checks and builds.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](locker_core::ErrorKind::InvalidInput) for no node, a
    /// database number on a cluster, zero timeouts, a key prefix with a broken hash tag, or a
    /// durable mode (see [`wait_for_replicas`](Self::wait_for_replicas)) with no replica, a zero
    /// wait timeout or one not shorter than the command timeout.
    pub fn build(mut self) -> Result<RedisConfig> {
        // An application's client or configuration says where and how to connect: a node,
        // mode, TLS or database set on this builder after it would not be used, so it is an
        // error.
        #[cfg(feature = "fred")]
        if let Some(fred) = &self.fred_config {
            self.check_same_target(RedisConfigBuilder::default().fred_config(fred.clone()))?;
        }
        #[cfg(feature = "redis")]
        if let Some(redis) = &self.redis_client {
            self.check_same_target(RedisConfigBuilder::default().redis_client(redis.clone()))?;
        }
        #[cfg(feature = "redis")]
        if let Some(cluster) = &self.redis_cluster_client {
            self.check_same_target(
                RedisConfigBuilder::default().redis_cluster_client(cluster.clone()),
            )?;
            if self.client != ClientLibrary::Redis || self.redis_client.is_some() {
                return Err(Error::invalid_input(
                    "an application's redis ClusterClient is driven by the redis crate, alone: \
                     no other client or client library",
                ));
            }
            // Its nodes are unknown: nobody to subscribe to (see `redis_cluster_client`).
            self.release_events = false;
        }
        #[cfg(feature = "fred")]
        if let Some(builder) = &self.fred_builder {
            if builder.get_config().is_none() {
                return Err(Error::invalid_input(
                    "the application's fred builder has no configuration (where to connect)",
                ));
            }
        }
        if self.nodes.is_empty() {
            self.nodes.push(("127.0.0.1".to_owned(), 6379));
        }
        let cluster = self.sentinel_service.is_none() && (self.cluster || self.nodes.len() > 1);
        #[cfg(feature = "fred")]
        if self.fred_config.is_some() && self.client != ClientLibrary::Fred {
            return Err(Error::invalid_input(
                "an application's fred configuration needs the fred client library",
            ));
        }
        #[cfg(feature = "fred")]
        let fred_sentinel_tls = self.fred_config.is_some();
        #[cfg(not(feature = "fred"))]
        let fred_sentinel_tls = false;
        if self.sentinel_service.is_some() && (self.cluster || (self.tls && !fred_sentinel_tls)) {
            return Err(Error::invalid_input(
                "Redis Sentinel is for a master and its replicas, without TLS here: not a \
                 cluster, and no TLS (not supported yet)",
            ));
        }
        #[cfg(feature = "redis")]
        if self.redis_client.is_some()
            && (cluster || self.sentinel_service.is_some() || self.client != ClientLibrary::Redis)
        {
            return Err(Error::invalid_input(
                "an application's redis::Client is one standalone server driven by the redis \
                 crate: no other node, no cluster, no other client library",
            ));
        }
        if cluster && self.database != 0 {
            return Err(Error::invalid_input("Redis Cluster has only database 0"));
        }
        if self.connect_timeout.is_zero() || self.command_timeout.is_zero() {
            return Err(Error::invalid_input("timeouts must be greater than zero"));
        }
        let wait_for_replicas = match (self.wait_replicas, self.wait_timeout) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(Error::invalid_input(
                    "a wait timeout needs a number of replicas to wait for",
                ))
            }
            (Some(replicas), timeout) => {
                let timeout = timeout.unwrap_or(DEFAULT_WAIT_TIMEOUT);
                if replicas == 0 {
                    return Err(Error::invalid_input(
                        "wait for replicas: the number of replicas must be 1 or more",
                    ));
                }
                if timeout.is_zero() {
                    return Err(Error::invalid_input(
                        "wait for replicas: the timeout must be greater than zero",
                    ));
                }
                if timeout >= self.command_timeout {
                    return Err(Error::invalid_input(format!(
                        "wait for replicas: the timeout ({timeout:?}) must be shorter than the \
                         command timeout ({:?}), which would end the call first",
                        self.command_timeout
                    )));
                }
                Some(WaitForReplicas { replicas, timeout })
            }
        };
        let topology = if let Some(service) = self.sentinel_service {
            Topology::Sentinel {
                sentinels: self.nodes,
                service,
            }
        } else if cluster {
            Topology::Cluster { nodes: self.nodes }
        } else {
            let (host, port) = self.nodes.swap_remove(0);
            Topology::Standalone { host, port }
        };
        let one_server = !matches!(topology, Topology::Cluster { .. });
        Ok(RedisConfig {
            topology,
            tls: self.tls,
            root_cert_pem: self.root_cert_pem,
            username: self.username,
            password: self.password,
            database: self.database,
            keys: KeyLayout::new(&self.key_prefix)?.on_one_server(one_server),
            connect_timeout: self.connect_timeout,
            command_timeout: self.command_timeout,
            client: self.client,
            wait_for_replicas,
            release_events: self.release_events,
            #[cfg(feature = "redis")]
            redis_client: self.redis_client,
            #[cfg(feature = "fred")]
            fred_config: self.fred_config,
            #[cfg(feature = "redis")]
            redis_cluster_client: self.redis_cluster_client,
            #[cfg(feature = "redis")]
            manager_config: self.manager_config,
            #[cfg(feature = "fred")]
            fred_builder: self.fred_builder,
        })
    }
}

impl fmt::Debug for RedisConfigBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfigBuilder")
            .field("nodes", &self.nodes)
            .field("cluster", &self.cluster)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("database", &self.database)
            .field("key_prefix", &self.key_prefix)
            .field("wait_replicas", &self.wait_replicas)
            .field("wait_timeout", &self.wait_timeout)
            .field("release_events", &self.release_events)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use locker_core::ErrorKind;

    #[test]
    fn urls_parse() {
        let c = RedisConfig::from_url("redis://127.0.0.1:7000/3").expect("url");
        assert_eq!(
            c.topology,
            Topology::Standalone {
                host: "127.0.0.1".into(),
                port: 7000
            }
        );
        assert_eq!(c.database, 3);
        assert!(!c.tls);

        let c = RedisConfig::from_url("rediss://alice:p%40ss%3Aw0rd@example.com").expect("url");
        assert!(c.tls);
        assert_eq!(c.username.as_deref(), Some("alice"));
        assert_eq!(c.password.as_deref(), Some("p@ss:w0rd"));
        assert_eq!(c.database, 0);

        let c =
            RedisConfig::from_url("redis+cluster://:pw@10.0.0.1:7000,10.0.0.2:7001/").expect("url");
        assert_eq!(
            c.topology,
            Topology::Cluster {
                nodes: vec![("10.0.0.1".into(), 7000), ("10.0.0.2".into(), 7001)]
            }
        );
        assert_eq!(c.username, None);
        assert_eq!(c.password.as_deref(), Some("pw"));

        let c = RedisConfig::from_url("redis://[::1]:6380").expect("url");
        assert_eq!(
            c.topology,
            Topology::Standalone {
                host: "::1".into(),
                port: 6380
            }
        );
    }

    #[test]
    fn sentinel_urls_parse() {
        let c = RedisConfig::from_url(
            "redis+sentinel://:s3cret@10.0.0.1:26379,10.0.0.2:26380/mymaster/2?prefix=app:",
        )
        .expect("url");
        assert_eq!(c.sentinel_service(), Some("mymaster"));
        assert_eq!(
            c.nodes(),
            [
                ("10.0.0.1".to_owned(), 26379),
                ("10.0.0.2".to_owned(), 26380)
            ]
        );
        assert_eq!(c.database(), 2);
        assert!(!c.is_cluster());
        assert_eq!(c.key_prefix(), "app:");
        assert_eq!(
            c.redacted_url(),
            "redis+sentinel://:***@10.0.0.1:26379,10.0.0.2:26380/mymaster/2"
        );
        let c = RedisConfig::from_url("redis-sentinel://h:26379/m").expect("url");
        assert_eq!((c.sentinel_service(), c.database()), (Some("m"), 0));
        for bad in [
            "redis+sentinel://h:26379",
            "redis+sentinel://h:26379/",
            "rediss+sentinel://h:26379/m",
            "redis+sentinel://h:26379/m/x",
        ] {
            let e = RedisConfig::from_url(bad).expect_err(bad);
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}");
        }
        let e = RedisConfig::builder()
            .node("h", 26379)
            .sentinel("m")
            .cluster(true)
            .build()
            .expect_err("a sentinel cluster");
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
    }

    #[test]
    fn bad_urls_are_typed_errors_without_the_password() {
        for bad in [
            "http://host",
            "redis://",
            "redis://host:notaport",
            "redis://host/db",
            "redis+cluster://a:1,b:2/1",
            "no scheme",
            "redis://user:hunter2@host:99999",
            "redis://::1",
            "redis://[::1]x",
        ] {
            let e = RedisConfig::from_url(bad).expect_err(bad);
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}");
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
        // Passwords with URL delimiters are the password's, and never shown.
        for (url, password) in [
            ("redis://u:s3cr/et@host", "s3cr/et"),
            ("redis://u:p?w@h", "p?w"),
            ("redis://u:12/3@h/4", "12/3"),
            ("redis://u:a@b@h", "a@b"),
        ] {
            let c = RedisConfig::from_url(url).expect(url);
            assert_eq!(c.password.as_deref(), Some(password));
        }
        for bad in ["redis://u:s3cr/et@host:x", "redis://u:p?w@h/notadb"] {
            let e = RedisConfig::from_url(bad).expect_err(bad);
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}");
            assert!(
                !e.to_string().contains("s3cr") && !e.to_string().contains("p?w"),
                "{e}"
            );
        }
    }

    #[test]
    fn query_parameters_are_read_and_decoded() {
        let c = RedisConfig::from_url(
            "redis://h:1/2?prefix=app%3Ajobs%2F+x&connect_timeout=1m&command_timeout=1500ms",
        )
        .expect("url");
        assert_eq!(c.key_prefix(), "app:jobs/ x");
        assert_eq!(c.connect_timeout(), Duration::from_secs(60));
        assert_eq!(c.command_timeout(), Duration::from_millis(1500));
        assert_eq!(c.database(), 2);
        for (value, expected) in [
            ("2s", Duration::from_secs(2)),
            ("1m", Duration::from_secs(60)),
            ("1500ms", Duration::from_millis(1500)),
            ("3", Duration::from_secs(3)),
            ("0.5", Duration::from_millis(500)),
            ("1m%2030s", Duration::from_secs(90)),
        ] {
            let c =
                RedisConfig::from_url(&format!("redis://h?command_timeout={value}")).expect(value);
            assert_eq!(c.command_timeout(), expected, "{value}");
        }
        for value in ["0s", "0", "soon", "-1s", "", "1e3"] {
            let e = RedisConfig::from_url(&format!("redis://h?connect_timeout={value}"))
                .expect_err(value);
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{value}");
            assert!(e.to_string().contains("connect_timeout"), "{e}");
        }
    }

    #[test]
    fn the_client_parameter_names_a_compiled_client() {
        #[cfg(feature = "redis")]
        assert_eq!(
            RedisConfig::from_url("redis://h?client=redis")
                .expect("redis")
                .client(),
            ClientLibrary::Redis
        );
        #[cfg(feature = "fred")]
        assert_eq!(
            RedisConfig::from_url("redis://h?client=fred")
                .expect("fred")
                .client(),
            ClientLibrary::Fred
        );
        #[cfg(not(feature = "fred"))]
        {
            let e = RedisConfig::from_url("redis://h?client=fred").expect_err("not compiled");
            assert_eq!(e.kind(), ErrorKind::InvalidInput);
            assert!(e.to_string().contains("`fred` feature"), "{e}");
        }
        #[cfg(not(feature = "redis"))]
        {
            let e = RedisConfig::from_url("redis://h?client=redis").expect_err("not compiled");
            assert_eq!(e.kind(), ErrorKind::InvalidInput);
            assert!(e.to_string().contains("`redis` feature"), "{e}");
        }
        let e = RedisConfig::from_url("redis://h?client=jedis").expect_err("unknown");
        assert!(e.to_string().contains("jedis"), "{e}");
    }

    #[test]
    fn unknown_parameters_and_fragments_are_named() {
        for (url, named) in [
            ("redis://h?bogus=1", "\"bogus\""),
            ("redis://u:hunter2@h?prefix=a&Prefix=b", "\"Prefix\""),
            ("redis://h?db=1", "\"db\""),
            ("redis://u:hunter2@h#top", "fragment"),
        ] {
            let e = RedisConfig::from_url(url).expect_err(url);
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{url}");
            assert!(e.to_string().contains(named), "{e}");
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn every_scheme_spelling_parses() {
        for (scheme, cluster, tls) in [
            ("redis", false, false),
            ("rediss", false, true),
            ("REDIS", false, false),
            ("redis+cluster", true, false),
            ("rediss+cluster", true, true),
            ("redis-cluster", true, false),
            ("rediss-cluster", true, true),
        ] {
            let c = RedisConfig::from_url(&format!("{scheme}://a:1,b:2?prefix=p%7Bx%7D"))
                .expect(scheme);
            assert_eq!(c.is_tls(), tls, "{scheme}");
            assert!(c.is_cluster(), "{scheme}");
            assert_eq!(c.key_prefix(), "p{x}");
            let c = RedisConfig::from_url(&format!("{scheme}://a")).expect(scheme);
            assert_eq!(c.is_cluster(), cluster, "{scheme}");
            assert_eq!(c.nodes(), [("a".to_owned(), 6379)]);
        }
    }

    #[test]
    fn passwords_with_delimiters_raw_or_encoded() {
        let secret = "p?@#/:w";
        for url in [
            "redis://u:p%3F%40%23%2F%3Aw@h:7/1?prefix=k",
            "redis://u:p?@#/:w@h:7/1?prefix=k",
            "redis://u:p%3F@#/:w@h:7/1?prefix=k",
        ] {
            let c = RedisConfig::from_url(url).expect(url);
            assert_eq!(c.password.as_deref(), Some(secret), "{url}");
            assert_eq!(c.username(), Some("u"));
            assert_eq!(c.nodes(), [("h".to_owned(), 7)]);
            assert_eq!(c.database(), 1);
            assert_eq!(c.key_prefix(), "k");
            for text in [format!("{c:?}"), c.to_string()] {
                assert!(!text.contains("p?@") && !text.contains("%3F"), "{text}");
            }
        }
        let c = RedisConfig::from_url("redis://%C3%A9l%C3%A8ve:x%25y@h").expect("utf8");
        assert_eq!(c.username(), Some("élève"));
        assert_eq!(c.password.as_deref(), Some("x%y"));
        let e = RedisConfig::from_url("redis://u:%FF@h").expect_err("not UTF-8");
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
    }

    #[test]
    fn the_password_never_shows() {
        let c = RedisConfig::from_url("redis://bob:hunter2@h:1").expect("url");
        for text in [
            format!("{c:?}"),
            c.to_string(),
            c.redacted_url(),
            format!("{:?}", c.clone().into_builder()),
        ] {
            assert!(!text.contains("hunter2"), "{text}");
            assert!(text.contains("bob"), "{text}");
        }
    }

    #[test]
    fn the_durable_mode_is_off_by_default_and_read_from_the_url() {
        let c = RedisConfig::from_url("redis://h").expect("url");
        assert_eq!(c.wait_for_replicas(), None);
        let c = RedisConfig::from_url("redis://h?wait_replicas=2&wait_timeout=250ms").expect("url");
        assert_eq!(
            c.wait_for_replicas(),
            Some(WaitForReplicas {
                replicas: 2,
                timeout: Duration::from_millis(250)
            })
        );
        let c = RedisConfig::from_url("redis+cluster://a:1,b:2?wait_replicas=1").expect("url");
        assert_eq!(
            c.wait_for_replicas().map(|w| w.timeout),
            Some(DEFAULT_WAIT_TIMEOUT)
        );
        // It survives a trip through the builder, and can be turned off there.
        let again = c.clone().into_builder().build().expect("build");
        assert_eq!(again.wait_for_replicas(), c.wait_for_replicas());
        let off = c
            .into_builder()
            .no_wait_for_replicas()
            .build()
            .expect("build");
        assert_eq!(off.wait_for_replicas(), None);
        assert!(format!("{again:?}").contains("wait_for_replicas: Some"));
    }

    #[test]
    fn a_bad_durable_mode_is_a_typed_error() {
        for (url, named) in [
            ("redis://u:hunter2@h?wait_replicas=0", "wait_replicas"),
            ("redis://u:hunter2@h?wait_replicas=-1", "wait_replicas"),
            ("redis://u:hunter2@h?wait_replicas=one", "wait_replicas"),
            ("redis://u:hunter2@h?wait_replicas=", "wait_replicas"),
            ("redis://u:hunter2@h?wait_timeout=100ms", "wait_replicas"),
            (
                "redis://u:hunter2@h?wait_replicas=1&wait_timeout=0",
                "wait_timeout",
            ),
            (
                "redis://u:hunter2@h?wait_replicas=1&wait_timeout=soon",
                "wait_timeout",
            ),
            (
                "redis://u:hunter2@h?wait_replicas=1&wait_timeout=5s",
                "shorter than the command timeout",
            ),
            (
                "redis://u:hunter2@h?wait_replicas=1&wait_timeout=2s&command_timeout=1s",
                "shorter than the command timeout",
            ),
        ] {
            let e = RedisConfig::from_url(url).expect_err(url);
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{url}");
            assert!(e.to_string().contains(named), "{url}: {e}");
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
        for builder in [
            RedisConfig::builder().wait_for_replicas(0, Duration::from_millis(100)),
            RedisConfig::builder().wait_for_replicas(1, Duration::ZERO),
            RedisConfig::builder().wait_for_replicas(1, DEFAULT_COMMAND_TIMEOUT),
        ] {
            let e = builder.clone().build().expect_err("refused");
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{builder:?}");
        }
        let ok = RedisConfig::builder()
            .wait_for_replicas(1, Duration::from_micros(1))
            .build()
            .expect("a microsecond is a millisecond for WAIT");
        assert_eq!(ok.wait_for_replicas().map(|w| w.timeout_ms()), Some(1));
    }

    #[test]
    fn the_builder_round_trips() {
        let c = RedisConfig::builder()
            .node("a", 1)
            .node("b", 2)
            .key_prefix("p:")
            .build()
            .expect("build");
        assert!(c.is_cluster());
        assert_eq!(c.redacted_url(), "redis+cluster://a:1,b:2");
        let again = c.clone().into_builder().build().expect("build");
        assert_eq!(again.redacted_url(), c.redacted_url());
        assert_eq!(again.key_prefix(), "p:");
        assert!(RedisConfig::builder().key_prefix("x{").build().is_err());
    }
}
