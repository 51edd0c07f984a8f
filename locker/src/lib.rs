#![doc = include_str!("../README.md")]
//! ## Cargo features
//!
#![doc = document_features::document_features!()]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::sync::Arc;

pub use locker_core::*;

/// The Redis and Redis Cluster backend (features `redis`, `fred`).
#[cfg(any(feature = "redis", feature = "fred"))]
pub use locker_redis as redis;

/// The PostgreSQL backend (feature `postgres`).
#[cfg(feature = "postgres")]
pub use locker_postgres as postgres;

/// The SQLite backend (feature `sqlite`).
#[cfg(feature = "sqlite")]
pub use locker_sqlite as sqlite;

/// The etcd backend (feature `etcd`).
#[cfg(feature = "etcd")]
pub use locker_etcd as etcd;

/// The URL schemes [`connect`] understands, whether or not their feature is compiled in.
pub const SCHEMES: &[&str] = &[
    "redis",
    "rediss",
    "redis+cluster",
    "rediss+cluster",
    "redis-cluster",
    "rediss-cluster",
    "redis+sentinel",
    "redis-sentinel",
    "postgres",
    "postgresql",
    "sqlite",
    "etcd",
    "etcds",
    "memory",
];

/// Picks the backend from the URL's scheme and returns its factory, to build a [`Locker`] on.
///
/// | scheme | backend | feature |
/// |---|---|---|
/// | `redis://`, `rediss://` (TLS), `redis+cluster://`, `rediss+cluster://` (also spelled `redis-cluster://`, `rediss-cluster://`), `redis+sentinel://` (also `redis-sentinel://`) | Redis, Redis Cluster, Redis with Sentinel | `redis` (default) or `fred` |
/// | `postgres://`, `postgresql://` | PostgreSQL | `postgres` |
/// | `sqlite:///abs/path.db`, `sqlite://relative/path.db`, `sqlite:path.db` | SQLite | `sqlite` (default) |
/// | `etcd://`, `etcds://` (TLS) | etcd | `etcd` |
/// | `memory://name` | in-process, shared by every `connect` with the same name | `memory` |
///
/// This function only reads the scheme: the rest of the URL is parsed by the backend's own
/// `from_url` (`redis::RedisConfig::from_url`, `postgres::PostgresConfig::from_url`,
/// `sqlite::SqliteConfig::from_url`, `etcd::EtcdConfig::from_url`), so a URL means the same
/// thing to both. The forms:
///
/// - `redis://[user[:password]@]host[:port][/db][?params]`;
///   `redis+cluster://[user[:password]@]host1:port1,host2:port2[?params]` (a cluster has no
///   database number); `redis+sentinel://[user[:password]@]sentinel1:26379,sentinel2:26379/service[/db][?params]`
///   (the hosts are the sentinels, the path the service name they watch the master by; the
///   credentials and database are the master's);
/// - `postgres://[user[:password]@]host[:port]/database[?params]`;
/// - `sqlite:` then the file's path (percent-decoded, up to the first `?`), then `?params`;
///   in-memory databases are refused (the locker's connections would each see their own);
/// - `etcd://[user:password@]host:port[,host:port...][?params]`;
/// - `memory://name`: everything after `memory://` is the name.
///
/// The user name and the password are percent-decoded. The user info runs to the **last** `@`
/// of the URL, so a password may hold a raw `/`, `?`, `#`, `:` or `@` (percent-encoding them
/// works too); a `@` after it, in a query value, must be written `%40`. A password never appears
/// in an error, in `Debug` or `Display`, or in logs.
///
/// # Query parameters
///
/// Every parameter's value is percent-decoded (as in a form, `+` is a space: write `%2B` for a
/// plus). A parameter that is not in this table is an [`ErrorKind::InvalidInput`] error naming
/// it; a parameter given twice counts with its last value. Durations are a number with a unit
/// (`1500ms`, `2s`, `1m`, `1m30s`, as [`humantime`](https://docs.rs/humantime) reads them) or a
/// bare number of seconds (`5`, `0.5`); zero is refused.
///
/// | scheme | parameter | value | default |
/// |---|---|---|---|
/// | Redis (all six) | `prefix` | prefix of every key (ioredis' `keyPrefix` in the Node library) | empty |
/// | | `client` | `redis` or `fred`: the client library (its feature must be compiled in) | `redis` when compiled in, else `fred` |
/// | | `connect_timeout` | duration of a connection attempt | `5s` |
/// | | `command_timeout` | duration of one command | `5s` |
/// | | `wait_replicas` | durable mode: after each acquire, take-over and extend, wait until this many replicas acknowledged it (`WAIT`), else a retryable error (see `redis::RedisConfigBuilder::wait_for_replicas`) | off |
/// | | `wait_timeout` | durable mode: how long to wait for them (shorter than `command_timeout`; needs `wait_replicas`) | `100ms` |
/// | | `release_events` | `true` or `false`: releases wake waiters through pub/sub (on a cluster, each `PUBLISH` crosses the cluster bus to every node) | `true` |
/// | `postgres`, `postgresql` | `schema` | schema of the tables (a plain identifier) | `public` |
/// | | `table_prefix` | prefix of the table names (a plain identifier) | `locker_` |
/// | | `migrate` | `true` or `false`: create or upgrade the tables on connect | `true` |
/// | | `max_connections` (or `pool_max_connections`) | connections in the pool | `8` |
/// | | `connect_timeout` | duration of getting a connection | `5s` |
/// | | `command_timeout` | duration of one statement | `5s` |
/// | | `release_events` | `true` or `false`: wake waiters with `LISTEN`/`NOTIFY` (`false` behind a transaction-mode pooler, which loses `LISTEN`; without it a probe finds that out) | `true` |
/// | | `prepared_statements` | `true` or `false`: statements prepared once per connection instead of sent with their values as literals (faster on the server; only on direct connections or behind a pooler that keeps prepared statements per client) | `false` |
/// | | `sslmode` (`ssl-mode`), `sslrootcert` (`ssl-root-cert`, `ssl-ca`), `sslcert` (`ssl-cert`), `sslkey` (`ssl-key`), `host`, `hostaddr`, `port`, `dbname`, `user`, `password`, `application_name`, `options`, `options[name]`, `statement-cache-capacity` | passed to sqlx, with their libpq meaning | sqlx's |
/// | `sqlite` | `table_prefix` | prefix of the table names (a plain identifier) | `locker_` |
/// | | `busy_timeout` | duration a statement waits for another process's write | `5s` |
/// | | `command_timeout` | duration of one statement, busy waiting included | `10s` |
/// | | `max_connections` | connections per pool | `4` |
/// | | `mode` | only `rwc` (files are always opened read-write-create) | `rwc` |
/// | `etcd`, `etcds` | `prefix` | prefix of every key (`{prefix}lock/{key}`, `{prefix}proc/{process}`) | empty |
/// | | `connect_timeout` | duration of connecting and authenticating | `5s` |
/// | | `command_timeout` | duration of one request | `5s` |
/// | `memory` | none | | |
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), locker::Error> {
/// let dir = std::env::temp_dir().join(format!("locker-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).expect("dir");
/// let url = format!("sqlite://{}/locks.db?busy_timeout=1m", dir.display());
/// let locker = locker::Locker::builder(locker::connect(&url)?).build()?;
/// let outcome = locker.acquire_and_run("report", |_beat| async { 42 }).await?;
/// assert_eq!(outcome, locker::RunOutcome::Ran(42));
/// locker.shutdown().await;
///
/// let e = locker::connect("redis://:hunter2@127.0.0.1?perfix=app:").err().expect("a typo");
/// assert_eq!(e.kind(), locker::ErrorKind::InvalidInput);
/// assert!(e.to_string().contains("\"perfix\""));
/// assert!(!e.to_string().contains("hunter2"));
/// # Ok(())
/// # }
/// ```
///
/// # Errors
/// [`ErrorKind::InvalidInput`] for a malformed URL, an unknown scheme or parameter, a bad
/// parameter value, or a scheme (or a Redis `client`) whose feature is not compiled in (the
/// message names the feature to enable).
pub fn connect(url: &str) -> Result<Arc<dyn BackendFactory>> {
    let scheme = url
        .split_once(':')
        .map(|(s, _)| s.to_ascii_lowercase())
        .ok_or_else(|| Error::invalid_input("a backend URL starts with a scheme, like redis://"))?;
    #[allow(unused_variables)]
    let not_compiled = |feature: &str| -> Result<Arc<dyn BackendFactory>> {
        Err(Error::invalid_input(format!(
            "{scheme}:// needs the `{feature}` feature of the `locker` crate, which this build \
             does not have"
        )))
    };
    match scheme.as_str() {
        "redis" | "rediss" | "redis+cluster" | "rediss+cluster" | "redis-cluster"
        | "rediss-cluster" | "redis+sentinel" | "redis-sentinel" => {
            #[cfg(any(feature = "redis", feature = "fred"))]
            {
                Ok(Arc::new(locker_redis::RedisConfig::from_url(url)?))
            }
            #[cfg(not(any(feature = "redis", feature = "fred")))]
            {
                not_compiled("redis")
            }
        }
        "postgres" | "postgresql" => {
            #[cfg(feature = "postgres")]
            {
                Ok(Arc::new(locker_postgres::PostgresConfig::from_url(url)?))
            }
            #[cfg(not(feature = "postgres"))]
            {
                not_compiled("postgres")
            }
        }
        "sqlite" => {
            #[cfg(feature = "sqlite")]
            {
                Ok(Arc::new(locker_sqlite::SqliteConfig::from_url(url)?))
            }
            #[cfg(not(feature = "sqlite"))]
            {
                not_compiled("sqlite")
            }
        }
        "etcd" | "etcds" => {
            #[cfg(feature = "etcd")]
            {
                Ok(Arc::new(locker_etcd::EtcdConfig::from_url(url)?))
            }
            #[cfg(not(feature = "etcd"))]
            {
                not_compiled("etcd")
            }
        }
        "memory" => {
            #[cfg(feature = "memory")]
            {
                Ok(Arc::new(memory_store(url)))
            }
            #[cfg(not(feature = "memory"))]
            {
                not_compiled("memory")
            }
        }
        other => Err(Error::invalid_input(format!(
            "unknown backend scheme {other:?}; expected one of {}",
            SCHEMES.join(", ")
        ))),
    }
}

/// `memory://name`: one store per name in this process.
#[cfg(feature = "memory")]
fn memory_store(url: &str) -> MemoryBackend {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static STORES: OnceLock<Mutex<HashMap<String, MemoryBackend>>> = OnceLock::new();
    let name = url.trim_start_matches("memory:").trim_start_matches("//");
    let mut stores = STORES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    stores.entry(name.to_owned()).or_default().clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `connect` and the backend's own `from_url` agree on `url`: both accept it (the config is
    /// returned), or both refuse it with the same `InvalidInput` message; neither the config's
    /// `Debug` nor the error holds `secret` (unless it is empty).
    #[allow(dead_code)]
    fn both<T: std::fmt::Debug>(
        url: &str,
        from_url: fn(&str) -> Result<T>,
        secret: &str,
    ) -> Result<T> {
        match (connect(url), from_url(url)) {
            (Ok(_), Ok(config)) => {
                assert!(
                    secret.is_empty() || !format!("{config:?}").contains(secret),
                    "{config:?}"
                );
                Ok(config)
            }
            (Err(a), Err(b)) => {
                assert_eq!(a.to_string(), b.to_string(), "{url}");
                assert_eq!(a.kind(), ErrorKind::InvalidInput, "{url}: {a}");
                assert!(secret.is_empty() || !a.to_string().contains(secret), "{a}");
                Err(a)
            }
            (a, b) => panic!(
                "{url}: connect said {:?}, from_url said {:?}",
                a.err(),
                b.err()
            ),
        }
    }

    /// The query parameters a duration is tested through, per backend.
    #[allow(dead_code)]
    const DURATIONS: [(&str, std::time::Duration); 4] = [
        ("1m", std::time::Duration::from_secs(60)),
        ("1500ms", std::time::Duration::from_millis(1500)),
        ("2s", std::time::Duration::from_secs(2)),
        ("3", std::time::Duration::from_secs(3)),
    ];

    /// Passwords with URL delimiters, percent-encoded and raw, each with the password it means.
    #[allow(dead_code)]
    const PASSWORDS: [&str; 3] = ["p%3F%40%23%2Fw", "p?@#/w", "p%3F@#%2Fw"];

    #[test]
    fn unknown_and_uncompiled_schemes_are_clear_errors() {
        let e = connect("mongodb://x").err().expect("unknown");
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.to_string().contains("expected one of"), "{e}");
        assert!(connect("no-scheme").is_err());
        #[cfg(not(feature = "etcd"))]
        {
            let e = connect("etcd://a:1").err().expect("not compiled");
            assert!(e.to_string().contains("`etcd` feature"), "{e}");
        }
        #[cfg(not(feature = "postgres"))]
        {
            let e = connect("postgres://a/b").err().expect("not compiled");
            assert!(e.to_string().contains("`postgres` feature"), "{e}");
        }
    }

    #[test]
    fn every_listed_scheme_is_dispatched() {
        for scheme in SCHEMES {
            if let Err(e) = connect(&format!("{scheme}://h:1")) {
                assert!(!e.to_string().contains("unknown backend scheme"), "{e}");
            }
        }
    }

    #[test]
    fn compiled_schemes_parse() {
        #[cfg(feature = "sqlite")]
        assert!(connect("sqlite:///tmp/x.db").is_ok());
        #[cfg(any(feature = "redis", feature = "fred"))]
        {
            assert!(connect("redis://127.0.0.1:6379/0?prefix=app:").is_ok());
            assert!(connect("redis://h:1?bogus=1").is_err());
        }
        #[cfg(feature = "postgres")]
        assert!(connect("postgres://u@h/db").is_ok());
        #[cfg(feature = "etcd")]
        assert!(connect("etcd://h:2379").is_ok());
        #[cfg(feature = "memory")]
        assert!(connect("memory://a").is_ok());
    }

    #[cfg(any(feature = "redis", feature = "fred"))]
    #[test]
    fn redis_urls_mean_the_same_to_connect_and_from_url() {
        use locker_redis::RedisConfig;
        let from_url = RedisConfig::from_url;
        for scheme in [
            "redis",
            "rediss",
            "redis+cluster",
            "rediss+cluster",
            "redis-cluster",
            "rediss-cluster",
        ] {
            assert!(SCHEMES.contains(&scheme));
            let c = both(
                &format!("{scheme}://h1:1,h2:2?prefix=app%3Ajobs%7Bx%7D"),
                from_url,
                "",
            )
            .expect(scheme);
            assert_eq!(c.key_prefix(), "app:jobs{x}");
            assert_eq!(c.is_tls(), scheme.starts_with("rediss"));
        }
        for password in PASSWORDS {
            let c = both(
                &format!("redis://u:{password}@h:7/3?prefix=k"),
                from_url,
                "p?@",
            )
            .expect(password);
            assert_eq!(c.nodes(), [("h".to_owned(), 7)]);
            assert_eq!(
                (c.username(), c.database(), c.key_prefix()),
                (Some("u"), 3, "k")
            );
            let e = both(
                &format!("redis://u:{password}@h:7/3?bogus=k"),
                from_url,
                "p?@",
            )
            .expect_err("unknown parameter");
            assert!(e.to_string().contains("\"bogus\""), "{e}");
        }
        for (value, expected) in DURATIONS {
            let c = both(
                &format!("redis://h?connect_timeout={value}&command_timeout={value}"),
                from_url,
                "",
            )
            .expect(value);
            assert_eq!(
                (c.connect_timeout(), c.command_timeout()),
                (expected, expected)
            );
        }
        #[cfg(not(feature = "fred"))]
        {
            let e = both("redis://h?client=fred", from_url, "").expect_err("no fred");
            assert!(e.to_string().contains("`fred` feature"), "{e}");
        }
        #[cfg(not(feature = "redis"))]
        {
            let e = both("redis://h?client=redis", from_url, "").expect_err("no redis");
            assert!(e.to_string().contains("`redis` feature"), "{e}");
        }
        #[cfg(feature = "fred")]
        assert_eq!(
            both("redis://h?client=fred", from_url, "")
                .expect("fred")
                .client(),
            locker_redis::ClientLibrary::Fred
        );
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn postgres_urls_mean_the_same_to_connect_and_from_url() {
        use locker_postgres::PostgresConfig;
        let from_url = PostgresConfig::from_url;
        for scheme in ["postgres", "postgresql"] {
            assert!(SCHEMES.contains(&scheme));
            let c = both(
                &format!("{scheme}://u@h/db?schema=my%5Fjobs&table_prefix=%6C_"),
                from_url,
                "",
            )
            .expect(scheme);
            assert_eq!((c.schema(), c.table_prefix()), ("my_jobs", "l_"));
        }
        for password in PASSWORDS {
            let c = both(
                &format!("postgres://u:{password}@h:7/db?schema=s&sslmode=require"),
                from_url,
                "p?@",
            )
            .expect(password);
            let o = c.connect_options();
            assert_eq!((o.get_host(), o.get_port(), c.schema()), ("h", 7, "s"));
            let e = both(
                &format!("postgres://u:{password}@h:7/db?bogus=k"),
                from_url,
                "p?@",
            )
            .expect_err("unknown parameter");
            assert!(e.to_string().contains("\"bogus\""), "{e}");
        }
        for (value, expected) in DURATIONS {
            let c = both(
                &format!("postgres://h/db?connect_timeout={value}&command_timeout={value}"),
                from_url,
                "",
            )
            .expect(value);
            assert_eq!(
                (c.connect_timeout(), c.command_timeout()),
                (expected, expected)
            );
        }
    }

    #[cfg(feature = "sqlite")]
    #[test]
    fn sqlite_urls_mean_the_same_to_connect_and_from_url() {
        use locker_sqlite::SqliteConfig;
        let from_url = SqliteConfig::from_url;
        for (url, path) in [
            ("sqlite:///abs/path.db", "/abs/path.db"),
            ("sqlite://relative/path.db", "relative/path.db"),
            ("sqlite:path.db", "path.db"),
            ("sqlite:a%3Fb.db?table_prefix=%6C_", "a?b.db"),
        ] {
            let c = both(url, from_url, "").expect(url);
            assert_eq!(c.path(), std::path::Path::new(path));
        }
        let c = both("sqlite:x.db?table_prefix=%6C_", from_url, "").expect("url");
        assert_eq!(c.table_prefix(), "l_");
        for (value, expected) in DURATIONS {
            let c = both(
                &format!("sqlite:x.db?busy_timeout={value}&command_timeout={value}"),
                from_url,
                "",
            )
            .expect(value);
            assert_eq!(
                (c.busy_timeout(), c.command_timeout()),
                (expected, expected)
            );
        }
        let e = both("sqlite:x.db?bogus=1", from_url, "").expect_err("unknown parameter");
        assert!(e.to_string().contains("\"bogus\""), "{e}");
    }

    #[cfg(feature = "etcd")]
    #[test]
    fn etcd_urls_mean_the_same_to_connect_and_from_url() {
        use locker_etcd::EtcdConfig;
        let from_url = EtcdConfig::from_url;
        for scheme in ["etcd", "etcds"] {
            assert!(SCHEMES.contains(&scheme));
            let c = both(
                &format!("{scheme}://a:1,b:2?prefix=app%2Fjobs"),
                from_url,
                "",
            )
            .expect(scheme);
            assert_eq!(c.prefix(), "app/jobs");
            assert_eq!(c.endpoints().len(), 2);
        }
        for password in PASSWORDS {
            let c = both(
                &format!("etcd://u:{password}@a:1,b:2?prefix=k"),
                from_url,
                "p?@",
            )
            .expect(password);
            assert_eq!((c.username(), c.prefix()), (Some("u"), "k"));
            let e = both(&format!("etcd://u:{password}@a:1?bogus=k"), from_url, "p?@")
                .expect_err("unknown parameter");
            assert!(e.to_string().contains("\"bogus\""), "{e}");
        }
        for (value, expected) in DURATIONS {
            let c = both(
                &format!("etcd://a:1?connect_timeout={value}&command_timeout={value}"),
                from_url,
                "",
            )
            .expect(value);
            assert_eq!(
                (c.connect_timeout(), c.command_timeout()),
                (expected, expected)
            );
        }
    }
}

/// The workspace README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct WorkspaceReadmeDoctests;
