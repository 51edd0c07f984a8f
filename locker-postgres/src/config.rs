//! [`PostgresConfig`]: a `postgres://` URL or a builder.

use std::fmt;
use std::time::Duration;

use locker_core::url_params::{duration, encode_raw_userinfo};
use locker_core::{Error, Result};
use locker_sql::Tables;
use percent_encoding::percent_decode_str;
use sqlx::postgres::{PgConnectOptions, PgPool, PgSslMode};
use sqlx::ConnectOptions;
use url::Url;

/// Connections in the main pool by default. Lock calls are short; a handful is plenty. Lock
/// operations use up to one fewer at once, kept between operations; the last one is left for
/// the release notifier's probe (with 1, operations take it from the pool each time).
///
/// Value: **8**.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 8;

/// How long getting a connection may take before a retryable error.
///
/// Value: **5 s**.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one statement may take before a retryable error (enforced by the client, so that
/// nothing is set on the session, which a transaction-mode pooler would not keep).
///
/// Value: **5 s**.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the PostgreSQL store is; a [`BackendFactory`](locker_core::BackendFactory).
///
/// From `postgres://user:password@host:port/database?sslmode=require&...` (see
/// [`from_url`](PostgresConfig::from_url)): the libpq-style parameters sqlx understands
/// (`sslmode`, `sslrootcert`, ...), plus this crate's own: `max_connections`, `connect_timeout`
/// and `command_timeout` (`1500ms`, `2s`, `1m`, or bare seconds), `schema` (default `public`),
/// `table_prefix` (default `locker_`), `migrate` (`false` for teams that run the SQL of the
/// README themselves), `release_events` and `prepared_statements` (see
/// [`PostgresConfigBuilder::prepared_statements`]).
///
/// The password never appears in `Debug`, `Display`, logs or errors.
///
/// ```
/// use locker_postgres::PostgresConfig;
///
/// let config = PostgresConfig::from_url(
///     "postgres://locker:s3cret@db.internal/app?sslmode=require&max_connections=4&schema=jobs",
/// )?;
/// assert!(!format!("{config:?}").contains("s3cret"));
/// # Ok::<(), locker_core::Error>(())
/// ```
#[derive(Clone)]
pub struct PostgresConfig {
    pub(crate) options: PgConnectOptions,
    pub(crate) tables: Tables,
    pub(crate) migrate: bool,
    pub(crate) max_connections: u32,
    pub(crate) connect_timeout: Duration,
    pub(crate) command_timeout: Duration,
    pub(crate) release_events: bool,
    pub(crate) prepared_statements: bool,
    /// The application's pool, for the jobs' connection (see [`PostgresConfigBuilder::pool`]).
    pub(crate) pool: Option<PgPool>,
}

/// The libpq-style parameters sqlx's `PgConnectOptions` reads (sqlx-postgres 0.8,
/// `options/parse.rs`), passed on to it; `options[name]` is passed on too. Any other parameter
/// is refused: sqlx would only log that it ignores it.
const SQLX_PARAMETERS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

impl PostgresConfig {
    /// Parses a `postgres://` (or `postgresql://`) URL: the parser `locker::connect` uses,
    /// whose documentation has the table of every scheme's parameters.
    ///
    /// The `url` crate reads the URL. The user name and the password are percent-decoded; the
    /// user info runs to the last `@` of the URL, so a password may hold a raw `/`, `?`, `#` or
    /// `@` (a `@` in a query value must then be written `%40`). Parameter values are
    /// percent-decoded (`+` is a space). This crate's parameters: `schema`, `table_prefix`,
    /// `migrate`, `max_connections` (or `pool_max_connections`), `connect_timeout`,
    /// `command_timeout`, `release_events`, `prepared_statements`; sqlx's, passed on:
    /// `sslmode` (`ssl-mode`), `sslrootcert` (`ssl-root-cert`, `ssl-ca`), `sslcert`
    /// (`ssl-cert`), `sslkey` (`ssl-key`), `host`, `hostaddr`, `port`, `dbname`, `user`,
    /// `password`, `application_name`, `options`, `options[name]`, `statement-cache-capacity`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use locker_postgres::PostgresConfig;
    ///
    /// let config = PostgresConfig::from_url(
    ///     "postgres://bob:p?ss@db/app?schema=my%5Fjobs&command_timeout=1500ms&sslmode=require",
    /// )?;
    /// assert_eq!(config.schema(), "my_jobs");
    /// assert_eq!(config.command_timeout(), Duration::from_millis(1500));
    /// assert_eq!(config.redacted_url(), "postgres://bob@db:5432/app?sslmode=require");
    /// # Ok::<(), locker_core::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](locker_core::ErrorKind::InvalidInput) naming the problem (an
    /// unknown parameter by its name), never the password.
    pub fn from_url(url: &str) -> Result<Self> {
        let bad = |why: String| Error::invalid_input(format!("bad PostgreSQL URL: {why}"));
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected postgres://...".into()))?;
        // Errors quote only what follows the last '@', never the password.
        let (userinfo, after) = match rest.rfind('@') {
            Some(i) => (Some(&rest[..i]), &rest[i + 1..]),
            None => (None, rest),
        };
        let userinfo =
            userinfo.map_or_else(String::new, |u| format!("{}@", encode_raw_userinfo(u)));
        let mut parsed =
            Url::parse(&format!("{scheme}://{userinfo}{after}")).map_err(|e| bad(e.to_string()))?;
        if !matches!(parsed.scheme(), "postgres" | "postgresql") {
            return Err(bad("expected postgres:// or postgresql://".into()));
        }
        if parsed.fragment().is_some() {
            return Err(bad("a URL fragment (#...) means nothing here".into()));
        }
        for part in [parsed.username(), parsed.password().unwrap_or_default()] {
            if percent_decode_str(part).decode_utf8().is_err() {
                return Err(bad(
                    "user name or password is not UTF-8 after percent-decoding".into(),
                ));
            }
        }
        let mut builder = PostgresConfig::builder();
        let mut passthrough = Vec::new();
        let pairs: Vec<(String, String)> = parsed.query_pairs().into_owned().collect();
        for (name, value) in pairs {
            let duration = || duration(&name, &value).map_err(bad);
            builder =
                match name.as_str() {
                    "max_connections" | "pool_max_connections" => builder.max_connections(
                        value
                            .parse()
                            .map_err(|_| bad(format!("{name} {value:?} is not a number")))?,
                    ),
                    "connect_timeout" => builder.connect_timeout(duration()?),
                    "command_timeout" => builder.command_timeout(duration()?),
                    "schema" => builder.schema(value),
                    "table_prefix" => builder.table_prefix(value),
                    "migrate" => builder.migrate(
                        value
                            .parse()
                            .map_err(|_| bad(format!("migrate {value:?} is not true or false")))?,
                    ),
                    "release_events" => builder.release_events(value.parse().map_err(|_| {
                        bad(format!("release_events {value:?} is not true or false"))
                    })?),
                    "prepared_statements" => {
                        builder.prepared_statements(value.parse().map_err(|_| {
                            bad(format!(
                                "prepared_statements {value:?} is not true or false"
                            ))
                        })?)
                    }
                    sqlx if SQLX_PARAMETERS.contains(&sqlx)
                        || (sqlx.starts_with("options[") && sqlx.ends_with(']')) =>
                    {
                        passthrough.push((name, value));
                        builder
                    }
                    other => {
                        return Err(bad(format!(
                            "unknown parameter {other:?} (this crate's: schema, table_prefix, \
                         migrate, max_connections, connect_timeout, command_timeout, \
                         release_events, prepared_statements; sqlx's: {}, \
                         options[name]; see the table of `locker::connect`)",
                            SQLX_PARAMETERS.join(", ")
                        )))
                    }
                };
        }
        if passthrough.is_empty() {
            parsed.set_query(None);
        } else {
            parsed.query_pairs_mut().clear().extend_pairs(&passthrough);
        }
        // sqlx's own message may quote the URL: never pass it on.
        let options = PgConnectOptions::from_url(&parsed).map_err(|_| {
            bad(
                "sqlx could not read it (the host, the port, the database, or the value of \
                 sslmode, port, hostaddr or statement-cache-capacity)"
                    .into(),
            )
        })?;
        builder.options = Some(options);
        builder.build()
    }

    /// The connection options for sqlx (host, port, user, database, TLS).
    pub fn connect_options(&self) -> &PgConnectOptions {
        &self.options
    }

    /// The schema of the tables.
    pub fn schema(&self) -> &str {
        self.tables
            .schema
            .as_deref()
            .map_or("public", |s| s.trim_matches('"'))
    }

    /// The prefix of the table names.
    pub fn table_prefix(&self) -> &str {
        &self.tables.prefix
    }

    /// Whether connecting creates or upgrades the tables.
    pub fn migrate(&self) -> bool {
        self.migrate
    }

    /// See [`DEFAULT_MAX_CONNECTIONS`].
    pub fn max_connections(&self) -> u32 {
        self.max_connections
    }

    /// See [`DEFAULT_CONNECT_TIMEOUT`].
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// See [`DEFAULT_COMMAND_TIMEOUT`].
    pub fn command_timeout(&self) -> Duration {
        self.command_timeout
    }

    /// See [`PostgresConfigBuilder::prepared_statements`].
    pub fn prepared_statements(&self) -> bool {
        self.prepared_statements
    }

    /// A builder (defaults: localhost:5432, schema `public`, prefix `locker_`, migrations on).
    pub fn builder() -> PostgresConfigBuilder {
        PostgresConfigBuilder::default()
    }

    /// A builder holding this configuration.
    pub fn into_builder(self) -> PostgresConfigBuilder {
        PostgresConfigBuilder {
            options: Some(self.options),
            schema: self
                .tables
                .schema
                .as_deref()
                .map(|s| s.trim_matches('"').to_owned()),
            table_prefix: self.tables.prefix.clone(),
            migrate: self.migrate,
            max_connections: self.max_connections,
            connect_timeout: self.connect_timeout,
            command_timeout: self.command_timeout,
            release_events: self.release_events,
            prepared_statements: self.prepared_statements,
            pool: self.pool,
        }
    }

    /// The application's pool the jobs' connection uses, if one was given.
    pub fn pool(&self) -> Option<&PgPool> {
        self.pool.as_ref()
    }

    /// This configuration without the application's pool: what the liveness reporter's
    /// connection is made from.
    pub(crate) fn for_reporter(&self) -> PostgresConfig {
        PostgresConfig {
            pool: None,
            // It writes one row every report interval, and retries releases.
            max_connections: self.max_connections.min(2),
            ..self.clone()
        }
    }

    /// The URL with the password left out.
    pub fn redacted_url(&self) -> String {
        let o = &self.options;
        format!(
            "postgres://{}@{}:{}/{}?sslmode={}",
            o.get_username(),
            o.get_host(),
            o.get_port(),
            o.get_database().unwrap_or(""),
            ssl_mode_name(o.get_ssl_mode())
        )
    }
}

fn ssl_mode_name(mode: PgSslMode) -> &'static str {
    match mode {
        PgSslMode::Disable => "disable",
        PgSslMode::Allow => "allow",
        PgSslMode::Prefer => "prefer",
        PgSslMode::Require => "require",
        PgSslMode::VerifyCa => "verify-ca",
        PgSslMode::VerifyFull => "verify-full",
    }
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &self.redacted_url())
            .field("locks_table", &self.tables.locks)
            .field("migrate", &self.migrate)
            .field("max_connections", &self.max_connections)
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .field("prepared_statements", &self.prepared_statements)
            .field("application_pool", &self.pool.is_some())
            .finish()
    }
}

impl fmt::Display for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted_url())
    }
}

/// Builds a [`PostgresConfig`].
#[derive(Clone)]
#[must_use]
pub struct PostgresConfigBuilder {
    options: Option<PgConnectOptions>,
    schema: Option<String>,
    table_prefix: String,
    migrate: bool,
    max_connections: u32,
    connect_timeout: Duration,
    command_timeout: Duration,
    release_events: bool,
    prepared_statements: bool,
    pool: Option<PgPool>,
}

impl Default for PostgresConfigBuilder {
    fn default() -> Self {
        PostgresConfigBuilder {
            options: None,
            schema: None,
            table_prefix: "locker_".to_owned(),
            migrate: true,
            release_events: true,
            prepared_statements: false,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            pool: None,
        }
    }
}

impl PostgresConfigBuilder {
    /// Connection options made with sqlx (host, port, user, password, database, TLS).
    pub fn connect_options(mut self, options: PgConnectOptions) -> Self {
        self.options = Some(options);
        self
    }

    /// The application's own pool, for the jobs: their locks are acquired, extended and
    /// released through it (its TLS, credentials, timeouts and size; the locker's statements
    /// carry their values as literals, so its statement cache is not used unless
    /// [`prepared_statements`](Self::prepared_statements)), and the migrations run on it.
    ///
    /// What the locker opens on its own, from the pool's connect options (with the
    /// application name `distributed-locker` and no statement cache): the liveness reporter's
    /// connection (a pool of up to 2, on the reporter's thread and runtime, so that neither a
    /// starved application runtime nor a pool busy with the application's queries can delay
    /// a liveness write), and, when a waiter waits, the `LISTEN` connection. This also sets
    /// [`connect_options`](Self::connect_options) and
    /// [`max_connections`](Self::max_connections) from the pool.
    ///
    /// The reporter's connections are made from a copy of the pool's connect options taken
    /// here: an `after_connect` hook of the pool (a `SET ROLE`, a `search_path`) does not run
    /// on them, and credentials the application rotates later with
    /// `PgPool::set_connect_options` (short-lived tokens) do not reach them. With rotating
    /// credentials, build the configuration again when they change, or give the locker a
    /// role whose password does not expire.
    ///
    /// A pool's connections belong to the Tokio runtime that opened them (sqlx's rule): use
    /// the locker on the runtime the pool lives on. A locker used from a second runtime may
    /// open connections there, and a statement on one of them fails with "A Tokio 1.x context
    /// was found, but it is being shutdown" once that runtime ends; such a locker needs a
    /// pool of its own runtime.
    ///
    /// ```no_run
    /// # async fn app() -> Result<(), Box<dyn std::error::Error>> {
    /// let pool = sqlx::PgPool::connect("postgres://app@db/app").await?;
    /// let config = locker_postgres::PostgresConfig::builder()
    ///     .pool(pool.clone())
    ///     .schema("jobs")
    ///     .build()?;
    /// let locker = locker_core::Locker::builder(config).build()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn pool(mut self, pool: PgPool) -> Self {
        self.options = Some((*pool.connect_options()).clone());
        self.max_connections = pool.options().get_max_connections().max(1);
        self.pool = Some(pool);
        self
    }

    /// The schema of the tables (created by the migrations when missing); `public` by default.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }

    /// The prefix of the table names; `locker_` by default.
    pub fn table_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.table_prefix = prefix.into();
        self
    }

    /// Whether connecting creates or upgrades the tables (`true` by default).
    pub fn migrate(mut self, migrate: bool) -> Self {
        self.migrate = migrate;
        self
    }

    /// Whether waiters are woken by `LISTEN`/`NOTIFY` (`true` by default; URL parameter
    /// `release_events`). Behind a transaction-mode pooler (PgBouncer's `pool_mode =
    /// transaction`) a `LISTEN` is lost with its transaction: the backend finds that out by
    /// itself (a probe notification that never arrives) and polls, but `false` saves the probe
    /// and its wait.
    pub fn release_events(mut self, on: bool) -> Self {
        self.release_events = on;
        self
    }

    /// Whether statements are named prepared statements kept on each connection (`false` by
    /// default; URL parameter `prepared_statements`).
    ///
    /// By default every statement is one `Query` message with its values written in as typed
    /// literals: one round trip, nothing kept on the connection, so the locker works behind any
    /// pooler. With `true`, each connection prepares each statement once and then sends only
    /// its values: still one round trip, and the server neither parses nor plans the
    /// statement again (measured with `pgbench`: about 1.4x the acquire + release cycles a
    /// server can run). Use it only on direct connections, or behind a pooler that keeps
    /// prepared statements per client (PgBouncer 1.21 or newer with `max_prepared_statements`
    /// above 0): a transaction-mode pooler that does not would hand a statement to a server
    /// connection that lacks it (an error) or that has another client's statement of the same
    /// name. The locker's own connections then keep up to 32 statements (sqlx's
    /// `statement-cache-capacity` is not used); on an application pool
    /// ([`pool`](Self::pool)), its statement cache must be on (sqlx's default), or each call
    /// would prepare a statement that is never closed: the locker then refuses to connect.
    pub fn prepared_statements(mut self, on: bool) -> Self {
        self.prepared_statements = on;
        self
    }

    /// See [`DEFAULT_MAX_CONNECTIONS`].
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n;
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

    /// Checks and builds.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](locker_core::ErrorKind::InvalidInput) for a schema or prefix
    /// that is not a plain identifier, zero connections, or zero timeouts.
    pub fn build(self) -> Result<PostgresConfig> {
        if self.max_connections == 0 {
            return Err(Error::invalid_input("max_connections must be at least 1"));
        }
        if self.connect_timeout.is_zero() || self.command_timeout.is_zero() {
            return Err(Error::invalid_input("timeouts must be greater than zero"));
        }
        let schema = self.schema.as_deref().unwrap_or("public");
        Ok(PostgresConfig {
            options: self.options.unwrap_or_default(),
            tables: Tables::new(Some(schema), &self.table_prefix)?,
            migrate: self.migrate,
            max_connections: self.max_connections,
            connect_timeout: self.connect_timeout,
            command_timeout: self.command_timeout,
            release_events: self.release_events,
            prepared_statements: self.prepared_statements,
            pool: self.pool,
        })
    }
}

impl fmt::Debug for PostgresConfigBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfigBuilder")
            .field("schema", &self.schema)
            .field("table_prefix", &self.table_prefix)
            .field("migrate", &self.migrate)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use locker_core::ErrorKind;

    #[test]
    fn urls_parse_with_our_parameters() {
        let c = PostgresConfig::from_url(
            "postgres://bob:hunter2@db:6543/app?sslmode=require&max_connections=3&command_timeout=250ms&schema=jobs&table_prefix=l_&migrate=false",
        )
        .expect("url");
        assert_eq!(c.max_connections, 3);
        assert_eq!(c.command_timeout, Duration::from_millis(250));
        assert!(!c.migrate);
        assert!(!c.prepared_statements(), "off by default");
        assert_eq!(c.tables.locks, "\"jobs\".\"l_locks\"");
        let prepared =
            PostgresConfig::from_url("postgres://db/app?prepared_statements=true").expect("url");
        assert!(prepared.prepared_statements());
        assert!(format!("{prepared:?}").contains("prepared_statements: true"));
        assert!(prepared
            .into_builder()
            .build()
            .expect("again")
            .prepared_statements());
        assert_eq!(
            c.redacted_url(),
            "postgres://bob@db:6543/app?sslmode=require"
        );
        for text in [format!("{c:?}"), c.to_string()] {
            assert!(!text.contains("hunter2"), "{text}");
        }
    }

    fn password_of(c: &PostgresConfig) -> Option<String> {
        let url = c.options.to_url_lossy();
        url.password().map(|p| {
            percent_decode_str(p)
                .decode_utf8()
                .expect("UTF-8")
                .into_owned()
        })
    }

    #[test]
    fn passwords_with_delimiters_raw_or_encoded() {
        for url in [
            "postgres://u:p%3F%40%23%2F%3Aw@h:7/db?schema=s",
            "postgres://u:p?@#/:w@h:7/db?schema=s",
            "postgresql://u:p%3F@#/:w@h:7/db?schema=s",
        ] {
            let c = PostgresConfig::from_url(url).expect(url);
            assert_eq!(password_of(&c).as_deref(), Some("p?@#/:w"), "{url}");
            let o = c.connect_options();
            assert_eq!(
                (
                    o.get_username(),
                    o.get_host(),
                    o.get_port(),
                    o.get_database()
                ),
                ("u", "h", 7, Some("db"))
            );
            assert_eq!(c.schema(), "s");
            for text in [format!("{c:?}"), c.to_string()] {
                assert!(!text.contains("p?@") && !text.contains("%3F"), "{text}");
            }
        }
        let c = PostgresConfig::from_url("postgres://%C3%A9l%C3%A8ve:x%25y@h/db").expect("utf8");
        assert_eq!(c.connect_options().get_username(), "élève");
        assert_eq!(password_of(&c).as_deref(), Some("x%y"));
        let e = PostgresConfig::from_url("postgres://u:%FF@h/db").expect_err("not UTF-8");
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
    }

    #[test]
    fn our_parameters_are_decoded_and_sqlx_ones_passed_on() {
        let c = PostgresConfig::from_url(
            "postgres://u@h/db?schema=my%5Fjobs&table_prefix=%6C_&connect_timeout=1m&command_timeout=1500ms\
             &pool_max_connections=2&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem\
             &application_name=locker+worker&options[statement_timeout]=5s&statement-cache-capacity=10",
        )
        .expect("url");
        assert_eq!(c.schema(), "my_jobs");
        assert_eq!(c.table_prefix(), "l_");
        assert_eq!(c.tables.locks, "\"my_jobs\".\"l_locks\"");
        assert_eq!(c.connect_timeout(), Duration::from_secs(60));
        assert_eq!(c.command_timeout(), Duration::from_millis(1500));
        assert_eq!(c.max_connections(), 2);
        assert!(c.migrate());
        let o = c.connect_options();
        assert!(matches!(o.get_ssl_mode(), PgSslMode::VerifyFull));
        assert_eq!(o.get_application_name(), Some("locker worker"));
        assert_eq!(o.get_options(), Some("-c statement_timeout=5s"));
        let c = PostgresConfig::from_url("postgres://u@h/db?connect_timeout=2&command_timeout=2s")
            .expect("url");
        assert_eq!(c.connect_timeout(), Duration::from_secs(2));
        assert_eq!(c.command_timeout(), Duration::from_secs(2));
        let c = PostgresConfig::from_url("postgres://h/db").expect("url");
        assert_eq!(c.schema(), "public");
        assert_eq!(c.table_prefix(), "locker_");
    }

    #[test]
    fn unknown_parameters_are_named() {
        for (url, named) in [
            ("postgres://u:hunter2@h/db?bogus=1", "\"bogus\""),
            (
                "postgres://u:hunter2@h/db?target_session_attrs=any",
                "\"target_session_attrs\"",
            ),
            ("postgres://u:hunter2@h/db?Schema=x", "\"Schema\""),
            ("postgres://u:hunter2@h/db#frag", "fragment"),
            ("postgres://u:hunter2@h/db?sslmode=sometimes", "sslmode"),
            (
                "postgres://u:hunter2@h/db?connect_timeout=0",
                "connect_timeout",
            ),
        ] {
            let e = PostgresConfig::from_url(url).expect_err(url);
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{url}");
            assert!(e.to_string().contains(named), "{e}");
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn bad_urls_are_typed_errors_without_the_password() {
        for bad in [
            "mysql://bob:hunter2@db/app",
            "postgres://bob:hunter2@db/app?max_connections=many",
            "postgres://bob:hunter2@db/app?schema=bad-name",
            "postgres://bob:hunter2@db/app?max_connections=0",
            "postgres://bob:hunter2@db/app?command_timeout=-1",
            "postgres://bob:hunter2@db/app?prepared_statements=yes",
        ] {
            let e = PostgresConfig::from_url(bad).expect_err(bad);
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}: {e}");
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
    }
}
