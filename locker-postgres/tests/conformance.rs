//! The shared conformance suite against a PostgreSQL started by the harness, fault cases
//! included.

use std::sync::Arc;
use std::time::Duration;

use locker_conformance::servers::{self, ServerKind};
use locker_conformance::{PrivateServer, RawAccess, ServerError, Setup};
use locker_core::BackendFactory;
use locker_postgres::{PostgresBackend, PostgresConfig};

fn config_for(url: &str) -> PostgresConfig {
    PostgresConfig::from_url(url)
        .expect("harness URL")
        .into_builder()
        .connect_timeout(Duration::from_secs(2))
        .command_timeout(Duration::from_secs(2))
        .max_connections(4)
        .build()
        .expect("config")
}

struct Raw(PostgresConfig);

#[async_trait::async_trait]
impl RawAccess for Raw {
    async fn put_lock_raw(&self, key: &str, raw: &str, ttl: Duration) -> locker_core::Result<()> {
        PostgresBackend::connect(&self.0)
            .await?
            .raw_put(key, raw, ttl)
            .await
    }

    async fn get_lock_raw(&self, key: &str) -> locker_core::Result<Option<String>> {
        PostgresBackend::connect(&self.0).await?.raw_get(key).await
    }
}

async fn setup() -> Setup {
    let server = servers::shared(ServerKind::Postgres).unwrap_or_else(|e| panic!("{e}"));
    let config = config_for(server.url());
    let unreachable = PostgresConfig::from_url("postgres://postgres@127.0.0.1:1/postgres")
        .expect("url")
        .into_builder()
        .connect_timeout(Duration::from_millis(500))
        .build()
        .expect("config");
    Setup::new("postgres", config.clone())
        .with_raw_access(Raw(config))
        .with_unreachable(unreachable)
        .with_private_server(|| async {
            let server =
                tokio::task::spawn_blocking(|| servers::start_private(ServerKind::Postgres))
                    .await
                    .map_err(|e| ServerError::Failed(e.to_string()))??;
            Ok(PrivateServer {
                factory: Arc::new(config_for(server.url())) as Arc<dyn BackendFactory>,
                control: server.control().expect("harness-started"),
                keep_alive: Box::new(server),
            })
        })
}

locker_conformance::conformance_suite!(postgres, setup());

#[test]
fn keys_longer_than_the_index_allows_are_typed_errors() {
    use locker_core::{ErrorKind, LockBackend, LockData, Locker};
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let server = servers::shared(ServerKind::Postgres).unwrap_or_else(|e| panic!("{e}"));
        let config = config_for(server.url());
        let backend = PostgresBackend::connect(&config).await.expect("connect");
        assert_eq!(
            backend.capabilities().max_key_len,
            Some(locker_postgres::MAX_KEY_LEN)
        );
        let key = "k".repeat(locker_postgres::MAX_KEY_LEN + 1);
        let data = LockData::new(format!("{key}@h/1.2.3"), "h/1.2".into(), None);
        let e = backend
            .acquire(&key, &data, Duration::from_secs(10))
            .await
            .expect_err("too long");
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
        let locker = Locker::builder(config).build().expect("locker");
        let e = locker.acquire(key.as_str()).await.expect_err("too long");
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
        locker.shutdown().await;
    });
}
