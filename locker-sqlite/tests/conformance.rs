//! The shared conformance suite against a SQLite file in a temporary directory.

use std::sync::OnceLock;
use std::time::Duration;

use locker_conformance::{RawAccess, Setup};
use locker_sqlite::{SqliteBackend, SqliteConfig};

fn database() -> &'static std::path::Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("temporary directory"))
        .path()
}

struct Raw(SqliteConfig);

#[async_trait::async_trait]
impl RawAccess for Raw {
    async fn put_lock_raw(&self, key: &str, raw: &str, ttl: Duration) -> locker_core::Result<()> {
        SqliteBackend::connect(&self.0)
            .await?
            .raw_put(key, raw, ttl)
            .await
    }

    async fn get_lock_raw(&self, key: &str) -> locker_core::Result<Option<String>> {
        SqliteBackend::connect(&self.0).await?.raw_get(key).await
    }
}

async fn setup() -> Setup {
    let config = SqliteConfig::builder(database().join("locks.db"))
        .build()
        .expect("config");
    // A file in a directory that does not exist cannot be opened: the store is "unreachable".
    let unreachable = SqliteConfig::builder("/nonexistent-locker-test-dir/locks.db")
        .busy_timeout(Duration::from_millis(200))
        .command_timeout(Duration::from_secs(1))
        .build()
        .expect("config");
    Setup::new("sqlite", config.clone())
        .with_raw_access(Raw(config))
        .with_unreachable(unreachable)
}

locker_conformance::conformance_suite!(sqlite, setup());
