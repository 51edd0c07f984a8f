#![doc = include_str!("../README.md")]
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
/// | `redis://`, `rediss://`, `redis+cluster://`, `rediss+cluster://` | Redis (add `?client=fred` for fred) | `redis` (default) or `fred` |
/// | `postgres://`, `postgresql://` | PostgreSQL | `postgres` |
/// | `sqlite://path`, `sqlite:path` | SQLite | `sqlite` (default) |
/// | `etcd://`, `etcds://` | etcd | `etcd` |
/// | `memory://name` | in-process, shared by every `connect` with the same name | `memory` |
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), locker::Error> {
/// let dir = std::env::temp_dir().join(format!("locker-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).expect("dir");
/// let url = format!("sqlite://{}/locks.db", dir.display());
/// let locker = locker::Locker::builder(locker::connect(&url)?).build()?;
/// let outcome = locker.acquire_and_run("report", |_beat| async { 42 }).await?;
/// assert_eq!(outcome, locker::RunOutcome::Ran(42));
/// locker.shutdown().await;
/// # Ok(())
/// # }
/// ```
///
/// # Errors
/// [`ErrorKind::InvalidInput`] for a malformed URL, an unknown scheme, or a scheme whose feature
/// is not compiled in (the message names the feature to enable).
pub fn connect(url: &str) -> Result<Arc<dyn BackendFactory>> {
    let scheme = url
        .split_once(':')
        .map(|(s, _)| s.to_ascii_lowercase())
        .ok_or_else(|| Error::invalid_input("a backend URL starts with a scheme, like redis://"))?;
    let not_compiled = |feature: &str| {
        Err(Error::invalid_input(format!(
            "{scheme}:// needs the `{feature}` feature of the `locker` crate, which this build \
             does not have"
        )))
    };
    match scheme.as_str() {
        "redis" | "rediss" | "redis+cluster" | "rediss+cluster" | "redis-cluster"
        | "rediss-cluster" => redis_factory(url, not_compiled),
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

#[allow(unused_variables)]
fn redis_factory(
    url: &str,
    not_compiled: impl Fn(&str) -> Result<Arc<dyn BackendFactory>>,
) -> Result<Arc<dyn BackendFactory>> {
    #[cfg(any(feature = "redis", feature = "fred"))]
    {
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut config = locker_redis::RedisConfig::from_url(base)?.into_builder();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            config = match pair.split_once('=').unwrap_or((pair, "")) {
                ("prefix", prefix) => config.key_prefix(prefix),
                ("client", "redis") => {
                    #[cfg(feature = "redis")]
                    {
                        config.client(locker_redis::ClientLibrary::Redis)
                    }
                    #[cfg(not(feature = "redis"))]
                    {
                        return not_compiled("redis");
                    }
                }
                ("client", "fred") => {
                    #[cfg(feature = "fred")]
                    {
                        config.client(locker_redis::ClientLibrary::Fred)
                    }
                    #[cfg(not(feature = "fred"))]
                    {
                        return not_compiled("fred");
                    }
                }
                (name, _) => {
                    return Err(Error::invalid_input(format!(
                        "unknown Redis URL parameter {name:?} (expected prefix or client)"
                    )))
                }
            };
        }
        Ok(Arc::new(config.build()?))
    }
    #[cfg(not(any(feature = "redis", feature = "fred")))]
    {
        not_compiled("redis")
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
}

/// The workspace README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct WorkspaceReadmeDoctests;
