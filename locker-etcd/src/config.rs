//! [`EtcdConfig`]: endpoints and credentials, from an `etcd://` URL or a builder.

use std::fmt;
use std::time::Duration;

use locker_core::{Error, Result};
use percent_encoding::percent_decode_str;

/// How long connecting (and authenticating) may take.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one request may take before a retryable error.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the etcd cluster is; a [`BackendFactory`](locker_core::BackendFactory).
///
/// URLs: `etcd://[user:password@]host:port[,host:port...]`, `etcds://...` for TLS, with an
/// optional `?prefix=...`. Keys are `{prefix}lock/{key}` and `{prefix}proc/{processHash}`.
///
/// ```
/// use locker_etcd::EtcdConfig;
///
/// let config = EtcdConfig::from_url("etcd://locker:s3cret@10.0.0.1:2379,10.0.0.2:2379?prefix=app/")?;
/// assert_eq!(config.endpoints(), ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]);
/// assert!(!format!("{config:?}").contains("s3cret"));
/// # Ok::<(), locker_core::Error>(())
/// ```
#[derive(Clone)]
pub struct EtcdConfig {
    pub(crate) endpoints: Vec<String>,
    pub(crate) tls: bool,
    pub(crate) ca_pem: Option<Vec<u8>>,
    pub(crate) user: Option<(String, String)>,
    pub(crate) prefix: String,
    pub(crate) connect_timeout: Duration,
    pub(crate) command_timeout: Duration,
}

impl EtcdConfig {
    /// Parses an `etcd://` or `etcds://` URL.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](locker_core::ErrorKind::InvalidInput), never quoting the
    /// password.
    pub fn from_url(url: &str) -> Result<Self> {
        let bad = |why: String| Error::invalid_input(format!("bad etcd URL: {why}"));
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected etcd://host:port".into()))?;
        let tls = match scheme {
            "etcd" | "http" => false,
            "etcds" | "https" => true,
            other => {
                return Err(bad(format!(
                    "unknown scheme {other:?} (expected etcd or etcds)"
                )))
            }
        };
        let (userinfo, rest) = match rest.rfind('@') {
            Some(i) => (Some(&rest[..i]), &rest[i + 1..]),
            None => (None, rest),
        };
        let (hosts, query) = match rest.split_once('?') {
            Some((h, q)) => (h, q),
            None => (rest, ""),
        };
        let hosts = hosts.trim_end_matches('/');
        let mut builder = EtcdConfig::builder().tls(tls);
        for host in hosts.split(',').filter(|h| !h.is_empty()) {
            let (name, port) = host
                .rsplit_once(':')
                .ok_or_else(|| bad("a host has no port".into()))?;
            let port: u16 = port
                .parse()
                .map_err(|_| bad("a port is not a number from 0 to 65535".into()))?;
            if name.is_empty() || name.contains('/') {
                return Err(bad("a host is empty or has a path".into()));
            }
            builder = builder.endpoint(name, port);
        }
        if let Some(info) = userinfo {
            let decode = |s: &str| {
                percent_decode_str(s)
                    .decode_utf8()
                    .map(|c| c.into_owned())
                    .map_err(|_| bad("user or password is not UTF-8".into()))
            };
            let (user, password) = info
                .split_once(':')
                .ok_or_else(|| bad("a user needs a password (user:password@)".into()))?;
            builder = builder.user(decode(user)?, decode(password)?);
        }
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("prefix", value)) => {
                    builder = builder.prefix(
                        percent_decode_str(value)
                            .decode_utf8()
                            .map_err(|_| bad("prefix is not UTF-8".into()))?,
                    )
                }
                _ => return Err(bad(format!("unknown parameter {pair:?}"))),
            }
        }
        builder.build()
    }

    /// A builder (no endpoint yet, no TLS, empty prefix).
    pub fn builder() -> EtcdConfigBuilder {
        EtcdConfigBuilder {
            config: EtcdConfig {
                endpoints: Vec::new(),
                tls: false,
                ca_pem: None,
                user: None,
                prefix: String::new(),
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
                command_timeout: DEFAULT_COMMAND_TIMEOUT,
            },
        }
    }

    /// A builder holding this configuration.
    pub fn into_builder(self) -> EtcdConfigBuilder {
        EtcdConfigBuilder { config: self }
    }

    /// The endpoints, as `http://host:port` (or `https://`).
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The URL with the password left out.
    pub fn redacted_url(&self) -> String {
        let scheme = if self.tls { "etcds" } else { "etcd" };
        let user = match &self.user {
            Some((name, _)) => format!("{name}:***@"),
            None => String::new(),
        };
        let hosts: Vec<&str> = self
            .endpoints
            .iter()
            .map(|e| e.split_once("://").map_or(e.as_str(), |(_, h)| h))
            .collect();
        format!("{scheme}://{user}{}", hosts.join(","))
    }
}

impl fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("url", &self.redacted_url())
            .field("prefix", &self.prefix)
            .field("custom_ca", &self.ca_pem.is_some())
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .finish()
    }
}

impl fmt::Display for EtcdConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted_url())
    }
}

/// Builds an [`EtcdConfig`].
#[derive(Clone)]
#[must_use]
pub struct EtcdConfigBuilder {
    config: EtcdConfig,
}

impl EtcdConfigBuilder {
    /// Adds a member to talk to.
    pub fn endpoint(mut self, host: impl AsRef<str>, port: u16) -> Self {
        let scheme = if self.config.tls { "https" } else { "http" };
        self.config
            .endpoints
            .push(format!("{scheme}://{}:{port}", host.as_ref()));
        self
    }

    /// Talks TLS (set before adding endpoints, or they keep their scheme).
    pub fn tls(mut self, tls: bool) -> Self {
        self.config.tls = tls;
        let scheme = if tls { "https" } else { "http" };
        for e in &mut self.config.endpoints {
            if let Some((_, host)) = e.split_once("://") {
                *e = format!("{scheme}://{host}");
            }
        }
        self
    }

    /// Trusts this CA certificate (PEM) for TLS.
    pub fn ca_certificate_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.config.ca_pem = Some(pem.into());
        self
    }

    /// Authenticates as this etcd user.
    pub fn user(mut self, name: impl Into<String>, password: impl Into<String>) -> Self {
        self.config.user = Some((name.into(), password.into()));
        self
    }

    /// Prefix of every key (empty by default).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.config.prefix = prefix.into();
        self
    }

    /// See [`DEFAULT_CONNECT_TIMEOUT`].
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.config.connect_timeout = d;
        self
    }

    /// See [`DEFAULT_COMMAND_TIMEOUT`].
    pub fn command_timeout(mut self, d: Duration) -> Self {
        self.config.command_timeout = d;
        self
    }

    /// Checks and builds.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](locker_core::ErrorKind::InvalidInput) with no endpoint or
    /// with zero timeouts.
    pub fn build(self) -> Result<EtcdConfig> {
        if self.config.endpoints.is_empty() {
            return Err(Error::invalid_input(
                "an etcd configuration needs an endpoint",
            ));
        }
        if self.config.connect_timeout.is_zero() || self.config.command_timeout.is_zero() {
            return Err(Error::invalid_input("timeouts must be greater than zero"));
        }
        Ok(self.config)
    }
}

impl fmt::Debug for EtcdConfigBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.config.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use locker_core::ErrorKind;

    #[test]
    fn urls_parse() {
        let c = EtcdConfig::from_url("etcds://u:p%40ss@a:1,b:2?prefix=x%2F").expect("url");
        assert_eq!(c.endpoints(), ["https://a:1", "https://b:2"]);
        assert_eq!(c.user, Some(("u".into(), "p@ss".into())));
        assert_eq!(c.prefix(), "x/");
        assert_eq!(c.redacted_url(), "etcds://u:***@a:1,b:2");
        for bad in [
            "etcd://",
            "redis://a:1",
            "etcd://a",
            "etcd://a:x",
            "etcd://u@a:1",
            "etcd://a:1?what=1",
            "etcd://u:hunter2@a:x",
        ] {
            let e = EtcdConfig::from_url(bad).expect_err(bad);
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}");
            assert!(!e.to_string().contains("hunter2"));
        }
    }
}
