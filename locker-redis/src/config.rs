//! [`RedisConfig`]: where the store is and how to talk to it, from a URL or a builder.

use std::fmt;
use std::time::Duration;

use locker_core::{Error, Result};
use percent_encoding::percent_decode_str;

use crate::keys::KeyLayout;

/// How long connecting may take before it fails with a retryable error.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one command may take. A lock call that hangs longer than this is failed (and
/// retried by the locker) rather than left to hold up a heartbeat.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

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
    Standalone { host: String, port: u16 },
    Cluster { nodes: Vec<(String, u16)> },
}

/// Everything needed to connect to Redis; a [`BackendFactory`](locker_core::BackendFactory).
///
/// From a URL:
/// - `redis://[user[:password]@]host[:port][/db]`, `rediss://...` for TLS;
/// - `redis+cluster://[user[:password]@]host1:port,host2:port`, `rediss+cluster://...` for TLS,
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
}

impl RedisConfig {
    /// Parses a `redis://`, `rediss://`, `redis+cluster://` or `rediss+cluster://` URL.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](locker_core::ErrorKind::InvalidInput), naming what is wrong
    /// (never the password).
    pub fn from_url(url: &str) -> Result<Self> {
        Self::parse_url(url)?.build()
    }

    /// A builder with the defaults (`127.0.0.1:6379`, no TLS, database 0, empty prefix).
    pub fn builder() -> RedisConfigBuilder {
        RedisConfigBuilder::default()
    }

    /// A builder holding this configuration, to change part of it.
    pub fn into_builder(self) -> RedisConfigBuilder {
        let nodes = match &self.topology {
            Topology::Standalone { host, port } => vec![(host.clone(), *port)],
            Topology::Cluster { nodes } => nodes.clone(),
        };
        RedisConfigBuilder {
            nodes,
            cluster: matches!(self.topology, Topology::Cluster { .. }),
            tls: self.tls,
            root_cert_pem: self.root_cert_pem,
            username: self.username,
            password: self.password,
            database: self.database,
            key_prefix: self.keys.prefix().to_owned(),
            connect_timeout: self.connect_timeout,
            command_timeout: self.command_timeout,
            client: self.client,
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

    /// The URL of this configuration with the password replaced by `***`.
    pub fn redacted_url(&self) -> String {
        let scheme = match (self.is_cluster(), self.tls) {
            (false, false) => "redis",
            (false, true) => "rediss",
            (true, false) => "redis+cluster",
            (true, true) => "rediss+cluster",
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
        };
        format!("{scheme}://{auth}{hosts}")
    }

    fn parse_url(url: &str) -> Result<RedisConfigBuilder> {
        let bad = |why: &str| Error::invalid_input(format!("bad Redis URL: {why}"));
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected scheme://..."))?;
        let (cluster, tls) = match scheme.to_ascii_lowercase().as_str() {
            "redis" => (false, false),
            "rediss" => (false, true),
            "redis+cluster" | "redis-cluster" => (true, false),
            "rediss+cluster" | "rediss-cluster" => (true, true),
            other => {
                return Err(bad(&format!(
                    "unknown scheme {other:?} (expected redis, rediss, redis+cluster or rediss+cluster)"
                )))
            }
        };
        // The user info ends at the last '@': a password may hold '/', '?', '#' or '@'. Errors
        // below quote only what comes after it.
        let (userinfo, rest) = match rest.rfind('@') {
            Some(i) => (Some(&rest[..i]), &rest[i + 1..]),
            None => (None, rest),
        };
        let rest = rest.split(['?', '#']).next().unwrap_or_default();
        let (hosts, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let decode = |s: &str| -> Result<String> {
            percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| bad("user name or password is not UTF-8 after percent-decoding"))
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(info) => {
                let (user, pass) = match info.split_once(':') {
                    Some((u, p)) => (u, Some(p)),
                    None => (info, None),
                };
                let user = (!user.is_empty()).then(|| decode(user)).transpose()?;
                let pass = pass.map(decode).transpose()?;
                (user, pass)
            }
        };
        let mut nodes = Vec::new();
        for host in hosts.split(',').filter(|h| !h.is_empty()) {
            nodes.push(parse_host(host).map_err(|why| bad(&why))?);
        }
        if nodes.is_empty() {
            return Err(bad("no host"));
        }
        let database = if path.is_empty() {
            0
        } else {
            path.parse::<i64>()
                .ok()
                .filter(|db| *db >= 0)
                .ok_or_else(|| bad(&format!("database {path:?} is not a number")))?
        };
        Ok(RedisConfigBuilder {
            nodes,
            cluster,
            tls,
            username,
            password,
            database,
            ..RedisConfigBuilder::default()
        })
    }
}

fn parse_host(host: &str) -> std::result::Result<(String, u16), String> {
    let (name, port) = if let Some(v6) = host.strip_prefix('[') {
        let (addr, rest) = v6
            .split_once(']')
            .ok_or_else(|| "an IPv6 host lacks its closing bracket".to_owned())?;
        let port = match rest {
            "" => None,
            _ => Some(
                rest.strip_prefix(':')
                    .ok_or_else(|| "unexpected text after an IPv6 address".to_owned())?,
            ),
        };
        let addr = percent_decode_str(addr)
            .decode_utf8()
            .map_err(|_| "an IPv6 host is not UTF-8".to_owned())?;
        (addr.into_owned(), port)
    } else if host.matches(':').count() > 1 {
        return Err("an IPv6 address must be in brackets: [addr]:port".to_owned());
    } else {
        match host.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p)),
            None => (host.to_owned(), None),
        }
    };
    if name.is_empty() {
        return Err("a host is empty".to_owned());
    }
    let port = match port {
        None | Some("") => 6379,
        Some(p) => p
            .parse()
            .map_err(|_| "a port is not a number from 0 to 65535".to_owned())?,
    };
    Ok((name, port))
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
    tls: bool,
    root_cert_pem: Option<Vec<u8>>,
    username: Option<String>,
    password: Option<String>,
    database: i64,
    key_prefix: String,
    connect_timeout: Duration,
    command_timeout: Duration,
    client: ClientLibrary,
}

impl Default for RedisConfigBuilder {
    fn default() -> Self {
        RedisConfigBuilder {
            nodes: Vec::new(),
            cluster: false,
            tls: false,
            root_cert_pem: None,
            username: None,
            password: None,
            database: 0,
            key_prefix: String::new(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            client: ClientLibrary::default(),
        }
    }
}

impl RedisConfigBuilder {
    /// Adds a server (`host:port`); several nodes make a cluster's seed list.
    pub fn node(mut self, host: impl Into<String>, port: u16) -> Self {
        self.nodes.push((host.into(), port));
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

    /// Checks and builds.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](locker_core::ErrorKind::InvalidInput) for no node, a
    /// database number on a cluster, zero timeouts, or a key prefix with a broken hash tag.
    pub fn build(mut self) -> Result<RedisConfig> {
        if self.nodes.is_empty() {
            self.nodes.push(("127.0.0.1".to_owned(), 6379));
        }
        let cluster = self.cluster || self.nodes.len() > 1;
        if cluster && self.database != 0 {
            return Err(Error::invalid_input("Redis Cluster has only database 0"));
        }
        if self.connect_timeout.is_zero() || self.command_timeout.is_zero() {
            return Err(Error::invalid_input("timeouts must be greater than zero"));
        }
        let topology = if cluster {
            Topology::Cluster { nodes: self.nodes }
        } else {
            let (host, port) = self.nodes.swap_remove(0);
            Topology::Standalone { host, port }
        };
        Ok(RedisConfig {
            topology,
            tls: self.tls,
            root_cert_pem: self.root_cert_pem,
            username: self.username,
            password: self.password,
            database: self.database,
            keys: KeyLayout::new(&self.key_prefix)?,
            connect_timeout: self.connect_timeout,
            command_timeout: self.command_timeout,
            client: self.client,
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
