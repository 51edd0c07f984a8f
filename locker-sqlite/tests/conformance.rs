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
    // No "unreachable server" (the cases that need one say they skipped): a file has no server
    // to come back, and a path that cannot be opened is a mistake, a non-retryable
    // InvalidInput, which tests/errors.rs checks.
    Setup::new("sqlite", config.clone()).with_raw_access(Raw(config))
}

locker_conformance::conformance_suite!(sqlite, setup());
