//! [`EtcdConfig`]: endpoints and credentials, from an `etcd://` URL or a builder.

use std::fmt;
use std::time::Duration;

use locker_core::url_params::{duration, encode_raw_userinfo};
use locker_core::{Error, Result};
use percent_encoding::percent_decode_str;
use url::Url;

/// How long connecting (and authenticating) may take.
///
/// Value: **5 s**.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one request may take before a retryable error.
///
/// Value: **5 s**.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the etcd cluster is; a [`BackendFactory`](locker_core::BackendFactory).
///
/// URLs: `etcd://[user:password@]host:port[,host:port...]`, `etcds://...` for TLS, with
/// optional `?prefix=...&connect_timeout=...&command_timeout=...` (see
/// [`from_url`](EtcdConfig::from_url)). Keys are `{prefix}lock/{key}` and
/// `{prefix}proc/{processHash}`.
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
    /// The application's client, for the jobs (see [`EtcdConfigBuilder::client`]).
    pub(crate) client: Option<etcd_client::Client>,
    /// The application's connect options, for the connections the locker opens (see
    /// [`EtcdConfigBuilder::connect_options`]).
    pub(crate) connect_options: Option<etcd_client::ConnectOptions>,
}

impl EtcdConfig {
    /// Parses an `etcd://` or `etcds://` URL (`http://` and `https://` too): the parser
    /// `locker::connect` uses, whose documentation has the table of every scheme's parameters.
    ///
    /// The `url` crate reads the scheme, the user info and the query; the host list is not a
    /// URL host, so it is cut out first and each `host:port` read by the `url` crate on its own.
    /// The user name and the password are percent-decoded; the user info runs to the last `@`
    /// of the URL, so a password may hold a raw `/`, `?`, `#` or `@` (a `@` in a query value
    /// must then be written `%40`). Parameters, percent-decoded (`+` is a space): `prefix`,
    /// `connect_timeout` and `command_timeout` (`1500ms`, `2s`, `1m`, or bare seconds).
    ///
    /// ```
    /// use std::time::Duration;
    /// use locker_etcd::EtcdConfig;
    ///
    /// let config = EtcdConfig::from_url("etcds://[::1]:2379?prefix=app%2F&command_timeout=1m")?;
    /// assert_eq!(config.endpoints(), ["https://[::1]:2379"]);
    /// assert_eq!(config.prefix(), "app/");
    /// assert_eq!(config.command_timeout(), Duration::from_secs(60));
    /// # Ok::<(), locker_core::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](locker_core::ErrorKind::InvalidInput) naming the problem (an
    /// unknown parameter by its name), never quoting the password.
    pub fn from_url(url: &str) -> Result<Self> {
        let bad = |why: String| Error::invalid_input(format!("bad etcd URL: {why}"));
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected etcd://host:port".into()))?;
        // Errors quote only what follows the last '@', never the password.
        let (userinfo, after) = match rest.rfind('@') {
            Some(i) => (Some(&rest[..i]), &rest[i + 1..]),
            None => (None, rest),
        };
        let (hosts, tail) = after.split_at(after.find(['/', '?', '#']).unwrap_or(after.len()));
        let encoded = userinfo.map_or_else(String::new, |u| format!("{}@", encode_raw_userinfo(u)));
        // `host` stands in for the host list, read below.
        let parsed = Url::parse(&format!("{scheme}://{encoded}host{tail}"))
            .map_err(|e| bad(e.to_string()))?;
        let tls = match parsed.scheme() {
            "etcd" | "http" => false,
            "etcds" | "https" => true,
            other => {
                return Err(bad(format!(
                    "unknown scheme {other:?} (expected etcd or etcds)"
                )))
            }
        };
        if !matches!(parsed.path(), "" | "/") {
            return Err(bad(format!(
                "an etcd URL has no path ({:?})",
                parsed.path()
            )));
        }
        if parsed.fragment().is_some() {
            return Err(bad("a URL fragment (#...) means nothing here".into()));
        }
        let mut builder = EtcdConfig::builder().tls(tls);
        // A host is not quoted: with the '@' forgotten, it would be `user:password`.
        for (i, host) in hosts.split(',').filter(|h| !h.is_empty()).enumerate() {
            let (name, port) =
                parse_host(host).map_err(|why| bad(format!("host #{}: {why}", i + 1)))?;
            builder = builder.endpoint(name, port);
        }
        if let Some(userinfo) = userinfo {
            let decode = |s: &str| {
                percent_decode_str(s)
                    .decode_utf8()
                    .map(|c| c.into_owned())
                    .map_err(|_| bad("user or password is not UTF-8 after percent-decoding".into()))
            };
            // The `url` crate drops an empty password; `user:@` still means one.
            if !userinfo.contains(':') {
                return Err(bad("a user needs a password (user:password@)".into()));
            }
            let password = parsed.password().unwrap_or_default();
            builder = builder.user(decode(parsed.username())?, decode(password)?);
        }
        for (name, value) in parsed.query_pairs() {
            let duration = || duration(&name, &value).map_err(bad);
            builder = match &*name {
                "prefix" => builder.prefix(value.as_ref()),
                "connect_timeout" => builder.connect_timeout(duration()?),
                "command_timeout" => builder.command_timeout(duration()?),
                other => {
                    return Err(bad(format!(
                        "unknown parameter {other:?} (expected prefix, connect_timeout or \
                         command_timeout; see the table of `locker::connect`)"
                    )))
                }
            };
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
                client: None,
                connect_options: None,
            },
        }
    }

    /// This configuration without the application's client: what the liveness reporter's
    /// connection is made from.
    pub(crate) fn for_reporter(&self) -> EtcdConfig {
        EtcdConfig {
            client: None,
            ..self.clone()
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

    /// The etcd user name, if any.
    pub fn username(&self) -> Option<&str> {
        self.user.as_ref().map(|(name, _)| name.as_str())
    }

    /// See [`DEFAULT_CONNECT_TIMEOUT`].
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// See [`DEFAULT_COMMAND_TIMEOUT`].
    pub fn command_timeout(&self) -> Duration {
        self.command_timeout
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

/// One `host:port` of the authority, read by the `url` crate; an IPv6 address keeps its
/// brackets, as an endpoint needs them.
fn parse_host(host: &str) -> std::result::Result<(String, u16), String> {
    let url = Url::parse(&format!("etcd://{host}")).map_err(|e| e.to_string())?;
    let name = url.host_str().unwrap_or_default();
    if name.is_empty() {
        return Err("the host is empty".to_owned());
    }
    let port = url
        .port()
        .ok_or_else(|| "the host has no port".to_owned())?;
    Ok((name.to_owned(), port))
}

impl fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("url", &self.redacted_url())
            .field("prefix", &self.prefix)
            .field("custom_ca", &self.ca_pem.is_some())
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .field("application_client", &self.client.is_some())
            .field(
                "application_connect_options",
                &self.connect_options.is_some(),
            )
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

    /// The application's own client, for the jobs: their locks are acquired, extended and
    /// released on its channel (its TLS, credentials and balancing). The liveness reporter
    /// connects on its own, on its thread and runtime, to the endpoints of this builder, with
    /// [`connect_options`](Self::connect_options) when given: an `etcd_client::Client` does
    /// not say how it was made, so give the endpoints (and the options) it was made with.
    ///
    /// ```no_run
    /// # async fn app() -> Result<(), Box<dyn std::error::Error>> {
    /// use etcd_client::{Client, ConnectOptions};
    ///
    /// let options = ConnectOptions::new().with_user("app", "s3cret");
    /// let client = Client::connect(["http://10.0.0.1:2379"], Some(options.clone())).await?;
    /// let config = locker_etcd::EtcdConfig::builder()
    ///     .endpoint("10.0.0.1", 2379)
    ///     .client(client)
    ///     .connect_options(options)
    ///     .prefix("app/")
    ///     .build()?;
    /// let locker = locker_core::Locker::builder(config).build()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn client(mut self, client: etcd_client::Client) -> Self {
        self.config.client = Some(client);
        self
    }

    /// The application's connect options (TLS, credentials, keep-alives), for every connection
    /// the locker opens, in place of those this builder would make from
    /// [`tls`](Self::tls), [`ca_certificate_pem`](Self::ca_certificate_pem),
    /// [`user`](Self::user) and the timeouts.
    pub fn connect_options(mut self, options: etcd_client::ConnectOptions) -> Self {
        self.config.connect_options = Some(options);
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
    fn passwords_with_delimiters_raw_or_encoded() {
        for url in [
            "etcd://u:p%3F%40%23%2F%3Aw@a:1,b:2/?prefix=k",
            "etcd://u:p?@#/:w@a:1,b:2/?prefix=k",
            "etcd://u:p%3F@#/:w@a:1,b:2?prefix=k",
        ] {
            let c = EtcdConfig::from_url(url).expect(url);
            assert_eq!(c.user, Some(("u".into(), "p?@#/:w".into())), "{url}");
            assert_eq!(c.username(), Some("u"));
            assert_eq!(c.endpoints(), ["http://a:1", "http://b:2"]);
            assert_eq!(c.prefix(), "k");
            for text in [format!("{c:?}"), c.to_string()] {
                assert!(!text.contains("p?@") && !text.contains("%3F"), "{text}");
            }
        }
        let c = EtcdConfig::from_url("etcd://%C3%A9l%C3%A8ve:x%25y@a:1").expect("utf8");
        assert_eq!(c.user, Some(("élève".into(), "x%y".into())));
    }

    #[test]
    fn parameters_are_decoded_and_unknown_ones_named() {
        let c = EtcdConfig::from_url(
            "etcd://a:1?prefix=app%2Fjobs+x%2F&connect_timeout=1500ms&command_timeout=2s",
        )
        .expect("url");
        assert_eq!(c.prefix(), "app/jobs x/");
        assert_eq!(c.connect_timeout(), Duration::from_millis(1500));
        assert_eq!(c.command_timeout(), Duration::from_secs(2));
        let c = EtcdConfig::from_url("etcd://a:1?connect_timeout=1m").expect("url");
        assert_eq!(c.connect_timeout(), Duration::from_secs(60));
        for (url, named) in [
            ("etcd://u:hunter2@a:1?bogus=1", "\"bogus\""),
            ("etcd://u:hunter2@a:1?Prefix=x", "\"Prefix\""),
            ("etcd://u:hunter2@a:1?command_timeout=0", "command_timeout"),
            ("etcd://u:hunter2@a:1/v3", "path"),
            ("etcd://u:hunter2@a:1#x", "fragment"),
            ("etcd://u:hunter2@[::1]", "port"),
        ] {
            let e = EtcdConfig::from_url(url).expect_err(url);
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{url}");
            assert!(e.to_string().contains(named), "{e}");
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
    }

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
