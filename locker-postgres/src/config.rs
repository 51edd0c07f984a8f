//! [`PostgresConfig`]: a `postgres://` URL or a builder.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use locker_core::{Error, Result};
use locker_sql::{parse_duration, Tables};
use sqlx::postgres::{PgConnectOptions, PgSslMode};

/// Connections in the main pool by default. Lock calls are short; a handful is plenty.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 8;

/// How long getting a connection may take before a retryable error.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one statement may take before a retryable error (enforced by the client, so that
/// nothing is set on the session, which a transaction-mode pooler would not keep).
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the PostgreSQL store is; a [`BackendFactory`](locker_core::BackendFactory).
///
/// From `postgres://user:password@host:port/database?sslmode=require&...`: every libpq-style
/// parameter sqlx understands (`sslmode`, `sslrootcert`, ...), plus this crate's own:
/// `max_connections`, `connect_timeout` and `command_timeout` (seconds, or with an `ms`/`s`
/// suffix), `schema` (default `public`), `table_prefix` (default `locker_`) and `migrate`
/// (`false` for teams that run the SQL of the README themselves).
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
}

impl PostgresConfig {
    /// Parses a `postgres://` (or `postgresql://`) URL.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](locker_core::ErrorKind::InvalidInput) naming the problem, never
    /// the password.
    pub fn from_url(url: &str) -> Result<Self> {
        let bad = |why: String| Error::invalid_input(format!("bad PostgreSQL URL: {why}"));
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, q),
            None => (url, ""),
        };
        let mut builder = PostgresConfig::builder();
        let mut passthrough = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            match name {
                "max_connections" | "pool_max_connections" => {
                    builder =
                        builder.max_connections(value.parse().map_err(|_| {
                            bad(format!("max_connections {value:?} is not a number"))
                        })?)
                }
                "connect_timeout" => {
                    builder = builder.connect_timeout(parse_duration(value).map_err(bad)?)
                }
                "command_timeout" => {
                    builder = builder.command_timeout(parse_duration(value).map_err(bad)?)
                }
                "schema" => builder = builder.schema(value),
                "table_prefix" => builder = builder.table_prefix(value),
                "migrate" => {
                    builder = builder.migrate(
                        value
                            .parse()
                            .map_err(|_| bad(format!("migrate {value:?} is not true or false")))?,
                    )
                }
                _ => passthrough.push(pair),
            }
        }
        let sqlx_url = if passthrough.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", passthrough.join("&"))
        };
        if !(base.starts_with("postgres://") || base.starts_with("postgresql://")) {
            return Err(bad("expected postgres:// or postgresql://".into()));
        }
        // sqlx's own message may quote the URL: never pass it on.
        let options = PgConnectOptions::from_str(&sqlx_url).map_err(|_| {
            bad("sqlx could not parse the URL (host, port, database, sslmode)".into())
        })?;
        builder.options = Some(options);
        builder.build()
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
}

impl Default for PostgresConfigBuilder {
    fn default() -> Self {
        PostgresConfigBuilder {
            options: None,
            schema: None,
            table_prefix: "locker_".to_owned(),
            migrate: true,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
        }
    }
}

impl PostgresConfigBuilder {
    /// Connection options made with sqlx (host, port, user, password, database, TLS).
    pub fn connect_options(mut self, options: PgConnectOptions) -> Self {
        self.options = Some(options);
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
        assert_eq!(c.tables.locks, "\"jobs\".\"l_locks\"");
        assert_eq!(
            c.redacted_url(),
            "postgres://bob@db:6543/app?sslmode=require"
        );
        for text in [format!("{c:?}"), c.to_string()] {
            assert!(!text.contains("hunter2"), "{text}");
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
        ] {
            let e = PostgresConfig::from_url(bad).expect_err(bad);
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}: {e}");
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
    }
}
