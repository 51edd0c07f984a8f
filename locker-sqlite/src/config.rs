//! [`SqliteConfig`]: a database file, from a `sqlite://` URL or a builder.

use sqlx::SqlitePool;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use locker_core::url_params::duration;
use locker_core::{Error, Result};
use locker_sql::Tables;
use percent_encoding::percent_decode_str;
use url::form_urlencoded;

/// How long a statement waits for another process's write to finish (SQLite's busy timeout).
///
/// Value: **5 s**.
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one statement may take in all, busy waiting included.
///
/// Value: **10 s**.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections per pool. SQLite writes one at a time anyway; a few readers are enough.
///
/// Value: **4**.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 4;

/// A SQLite database file shared by the processes of one machine; a
/// [`BackendFactory`](locker_core::BackendFactory).
///
/// URLs: `sqlite:///absolute/path.db`, `sqlite://relative/path.db` or `sqlite:path.db`, with
/// optional `?table_prefix=...&busy_timeout=5s` (see [`from_url`](SqliteConfig::from_url)).
/// In-memory databases are refused: the locker's two connections would see two different
/// databases.
///
/// ```
/// use locker_sqlite::SqliteConfig;
///
/// let config = SqliteConfig::from_url("sqlite:///var/lib/myapp/locks.db?busy_timeout=2s")?;
/// assert_eq!(config.path().to_str(), Some("/var/lib/myapp/locks.db"));
/// # Ok::<(), locker_core::Error>(())
/// ```
#[derive(Clone)]
pub struct SqliteConfig {
    pub(crate) path: PathBuf,
    pub(crate) tables: Tables,
    pub(crate) busy_timeout: Duration,
    pub(crate) command_timeout: Duration,
    pub(crate) max_connections: u32,
    /// The application's pool, for the jobs' connection (see [`SqliteConfig::from_pool`]).
    pub(crate) pool: Option<SqlitePool>,
}

impl SqliteConfig {
    /// Parses a `sqlite:` URL: the parser `locker::connect` uses, whose documentation has the
    /// table of every scheme's parameters.
    ///
    /// The path is everything between `sqlite://` (or `sqlite:`) and the first `?`,
    /// percent-decoded (write a `?` or a `%` in a file name as `%3F` or `%25`). The parameters,
    /// whose values are percent-decoded by the `url` crate's form decoding: `table_prefix`,
    /// `busy_timeout`, `command_timeout` (durations such as `1500ms`, `2s`, `1m`, or bare
    /// seconds), `max_connections`, and `mode=rwc` (accepted for sqlx's URLs: files are always
    /// opened read-write-create).
    ///
    /// ```
    /// use std::time::Duration;
    /// use locker_sqlite::SqliteConfig;
    ///
    /// let config = SqliteConfig::from_url("sqlite:jobs%3F.db?table_prefix=app_&busy_timeout=1m")?;
    /// assert_eq!(config.path().to_str(), Some("jobs?.db"));
    /// assert_eq!(config.table_prefix(), "app_");
    /// assert_eq!(config.busy_timeout(), Duration::from_secs(60));
    /// # Ok::<(), locker_core::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](locker_core::ErrorKind::InvalidInput) naming the problem (an
    /// unknown parameter by its name).
    pub fn from_url(url: &str) -> Result<Self> {
        let bad = |why: String| Error::invalid_input(format!("bad SQLite URL {url:?}: {why}"));
        // A path is not a URL host, so the `url` crate reads only the query here.
        let rest = ["sqlite://", "sqlite:"]
            .iter()
            .find_map(|scheme| {
                url.get(..scheme.len())
                    .filter(|s| s.eq_ignore_ascii_case(scheme))
                    .map(|_| &url[scheme.len()..])
            })
            .ok_or_else(|| bad("expected sqlite://path".into()))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let path = percent_decode_str(path)
            .decode_utf8()
            .map_err(|_| bad("the path is not UTF-8 after percent-decoding".into()))?;
        if path.is_empty() || path.starts_with(":memory:") {
            return Err(bad(
                "an in-memory database cannot be shared by the locker's connections".into(),
            ));
        }
        let mut builder = SqliteConfig::builder(path.as_ref());
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            let duration = || duration(&name, &value).map_err(bad);
            builder = match &*name {
                "table_prefix" => builder.table_prefix(value.as_ref()),
                "busy_timeout" => builder.busy_timeout(duration()?),
                "command_timeout" => builder.command_timeout(duration()?),
                "max_connections" => builder.max_connections(
                    value
                        .parse()
                        .map_err(|_| bad(format!("max_connections {value:?} is not a number")))?,
                ),
                "mode" if value == "rwc" => builder,
                "mode" => {
                    return Err(bad(format!(
                        "mode {value:?}: the locker always opens its file read-write-create (rwc)"
                    )))
                }
                other => {
                    return Err(bad(format!(
                        "unknown parameter {other:?} (expected table_prefix, busy_timeout, \
                         command_timeout, max_connections or mode; see the table of \
                         `locker::connect`)"
                    )))
                }
            };
        }
        builder.build()
    }

    /// A builder for the database at `path` (created when missing).
    pub fn builder(path: impl AsRef<Path>) -> SqliteConfigBuilder {
        SqliteConfigBuilder {
            path: path.as_ref().to_owned(),
            table_prefix: "locker_".to_owned(),
            busy_timeout: DEFAULT_BUSY_TIMEOUT,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            pool: None,
        }
    }

    /// A builder for the database of the application's own pool, whose connections the jobs'
    /// locks then use (the tables are created through it too).
    ///
    /// The liveness reporter opens a pool of its own on the same file (WAL, `synchronous =
    /// NORMAL`, the busy timeout of this configuration), on its thread and runtime, so that a
    /// blocked application runtime or a pool busy with the application's queries cannot delay
    /// a liveness write. WAL mode, once set by that pool, is the file's for every connection.
    /// The reporter's pool is made from the file name only, not from the pool's hooks. An
    /// in-memory pool is refused by `build` (the reporter would open another database).
    ///
    /// ```no_run
    /// # async fn app() -> Result<(), Box<dyn std::error::Error>> {
    /// let pool = sqlx::SqlitePool::connect("sqlite:///var/lib/app/app.db").await?;
    /// let config = locker_sqlite::SqliteConfig::from_pool(pool.clone()).build()?;
    /// let locker = locker_core::Locker::builder(config).build()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_pool(pool: SqlitePool) -> SqliteConfigBuilder {
        let path = pool.connect_options().get_filename().to_owned();
        SqliteConfigBuilder {
            max_connections: pool.options().get_max_connections().max(1),
            pool: Some(pool),
            ..SqliteConfig::builder(path)
        }
    }

    /// The application's pool the jobs' connection uses, if one was given.
    pub fn pool(&self) -> Option<&SqlitePool> {
        self.pool.as_ref()
    }

    /// This configuration without the application's pool: what the liveness reporter's
    /// connection is made from.
    pub(crate) fn for_reporter(&self) -> SqliteConfig {
        SqliteConfig {
            pool: None,
            max_connections: self.max_connections.min(2),
            ..self.clone()
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The prefix of the table names.
    pub fn table_prefix(&self) -> &str {
        &self.tables.prefix
    }

    /// See [`DEFAULT_BUSY_TIMEOUT`].
    pub fn busy_timeout(&self) -> Duration {
        self.busy_timeout
    }

    /// See [`DEFAULT_COMMAND_TIMEOUT`].
    pub fn command_timeout(&self) -> Duration {
        self.command_timeout
    }

    /// See [`DEFAULT_MAX_CONNECTIONS`].
    pub fn max_connections(&self) -> u32 {
        self.max_connections
    }
}

impl fmt::Debug for SqliteConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteConfig")
            .field("path", &self.path)
            .field("locks_table", &self.tables.locks)
            .field("busy_timeout", &self.busy_timeout)
            .field("command_timeout", &self.command_timeout)
            .field("max_connections", &self.max_connections)
            .field("application_pool", &self.pool.is_some())
            .finish()
    }
}

/// Builds a [`SqliteConfig`].
#[derive(Debug, Clone)]
#[must_use]
pub struct SqliteConfigBuilder {
    path: PathBuf,
    table_prefix: String,
    busy_timeout: Duration,
    command_timeout: Duration,
    max_connections: u32,
    pool: Option<SqlitePool>,
}

impl SqliteConfigBuilder {
    /// The prefix of the table names; `locker_` by default.
    pub fn table_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.table_prefix = prefix.into();
        self
    }

    /// See [`DEFAULT_BUSY_TIMEOUT`].
    pub fn busy_timeout(mut self, d: Duration) -> Self {
        self.busy_timeout = d;
        self
    }

    /// See [`DEFAULT_COMMAND_TIMEOUT`].
    pub fn command_timeout(mut self, d: Duration) -> Self {
        self.command_timeout = d;
        self
    }

    /// See [`DEFAULT_MAX_CONNECTIONS`].
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n;
        self
    }

    /// Checks and builds.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](locker_core::ErrorKind::InvalidInput) for a prefix that is not
    /// a plain identifier, zero connections or zero timeouts.
    pub fn build(self) -> Result<SqliteConfig> {
        if self.max_connections == 0 {
            return Err(Error::invalid_input("max_connections must be at least 1"));
        }
        if self.busy_timeout.is_zero() || self.command_timeout.is_zero() {
            return Err(Error::invalid_input("timeouts must be greater than zero"));
        }
        // An application's in-memory database: the reporter's own pool would open another
        // database (a file of that name), and liveness records would not be where the locks
        // are.
        let name = self.path.to_string_lossy();
        if self.pool.is_some()
            && (name.is_empty() || name == ":memory:" || name.starts_with("file:sqlx-in-memory"))
        {
            return Err(Error::invalid_input(
                "the application's SQLite pool is an in-memory database: the locker needs a \
                 file, shared by its connections and its liveness reporter's",
            ));
        }
        Ok(SqliteConfig {
            path: self.path,
            tables: Tables::new(None, &self.table_prefix)?,
            busy_timeout: self.busy_timeout,
            command_timeout: self.command_timeout,
            max_connections: self.max_connections,
            pool: self.pool,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use locker_core::ErrorKind;

    #[test]
    fn every_form_of_path_parses() {
        for (url, path) in [
            ("sqlite:///abs/path.db", "/abs/path.db"),
            ("sqlite://relative/path.db", "relative/path.db"),
            ("sqlite:path.db", "path.db"),
            ("SQLite:path.db", "path.db"),
            (
                "sqlite:///tmp/a%20b%3Fc%25.db?table_prefix=x_",
                "/tmp/a b?c%.db",
            ),
            ("sqlite:///tmp/caf%C3%A9.db", "/tmp/café.db"),
        ] {
            let c = SqliteConfig::from_url(url).expect(url);
            assert_eq!(c.path(), Path::new(path), "{url}");
        }
        let e = SqliteConfig::from_url("sqlite:///tmp/%FF.db").expect_err("not UTF-8");
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
    }

    #[test]
    fn parameters_are_decoded_and_unknown_ones_named() {
        let c = SqliteConfig::from_url(
            "sqlite:x.db?table_prefix=%61pp_&busy_timeout=1m&command_timeout=1500ms&max_connections=2&mode=rwc",
        )
        .expect("url");
        assert_eq!(c.table_prefix(), "app_");
        assert_eq!(c.tables.locks, "\"app_locks\"");
        assert_eq!(c.busy_timeout(), Duration::from_secs(60));
        assert_eq!(c.command_timeout(), Duration::from_millis(1500));
        assert_eq!(c.max_connections(), 2);
        let c = SqliteConfig::from_url("sqlite:x.db?busy_timeout=2s").expect("url");
        assert_eq!(c.busy_timeout(), Duration::from_secs(2));
        for (url, named) in [
            ("sqlite:x.db?what=1", "\"what\""),
            ("sqlite:x.db?mode=ro", "rwc"),
            ("sqlite:x.db?busy_timeout=0", "busy_timeout"),
            ("sqlite:x.db?command_timeout=soon", "command_timeout"),
        ] {
            let e = SqliteConfig::from_url(url).expect_err(url);
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{url}");
            assert!(e.to_string().contains(named), "{e}");
        }
    }

    #[test]
    fn urls_parse() {
        let c = SqliteConfig::from_url("sqlite:///tmp/x.db?table_prefix=t_&busy_timeout=250ms")
            .expect("url");
        assert_eq!(c.path(), Path::new("/tmp/x.db"));
        assert_eq!(c.busy_timeout, Duration::from_millis(250));
        assert_eq!(c.tables.locks, "\"t_locks\"");
        let c = SqliteConfig::from_url("sqlite:relative.db").expect("url");
        assert_eq!(c.path(), Path::new("relative.db"));
        for bad in [
            "sqlite::memory:",
            "sqlite://",
            "postgres://x",
            "sqlite://x.db?busy_timeout=soon",
            "sqlite://x.db?table_prefix=a-b",
            "sqlite://x.db?what=1",
        ] {
            let e = SqliteConfig::from_url(bad).expect_err(bad);
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}");
        }
    }
}
