//! The shared conformance suite, with both client libraries, against a standalone Redis and a
//! 3-master Redis Cluster started by the harness: four runs, fault cases included.

use std::sync::Arc;
use std::time::Duration;

use locker_conformance::servers::{self, Server, ServerKind};
use locker_conformance::{PrivateServer, RawAccess, ServerError, Setup};
use locker_core::BackendFactory;
use locker_redis::{ClientLibrary, RedisBackend, RedisConfig};

fn config_for(server: &Server, client: ClientLibrary) -> RedisConfig {
    let mut builder = RedisConfig::builder();
    for endpoint in server.endpoints() {
        // The harness gives `redis://127.0.0.1:port`.
        let (host, port) = endpoint
            .trim_start_matches("redis://")
            .rsplit_once(':')
            .expect("host:port");
        builder = builder.node(host, port.parse().expect("port"));
    }
    builder
        .cluster(server.kind() == ServerKind::RedisCluster)
        .client(client)
        .connect_timeout(Duration::from_secs(1))
        .command_timeout(Duration::from_secs(2))
        .build()
        .expect("config")
}

struct Raw(RedisConfig);

#[async_trait::async_trait]
impl RawAccess for Raw {
    async fn put_lock_raw(&self, key: &str, raw: &str, ttl: Duration) -> locker_core::Result<()> {
        let backend = RedisBackend::connect(&self.0).await?;
        backend.raw_set(&backend.lock_key(key), raw, ttl).await
    }

    async fn get_lock_raw(&self, key: &str) -> locker_core::Result<Option<String>> {
        let backend = RedisBackend::connect(&self.0).await?;
        backend.raw_get(&backend.lock_key(key)).await
    }
}

async fn setup(kind: ServerKind, client: ClientLibrary) -> Setup {
    let server = servers::shared(kind).unwrap_or_else(|e| panic!("{kind}: {e}"));
    let config = config_for(server, client);
    let unreachable = match kind {
        ServerKind::RedisCluster => "redis+cluster://127.0.0.1:1",
        _ => "redis://127.0.0.1:1",
    };
    let unreachable = RedisConfig::from_url(unreachable)
        .expect("url")
        .into_builder()
        .client(client)
        .connect_timeout(Duration::from_millis(500))
        .build()
        .expect("config");
    Setup::new(format!("{kind} via {client:?}"), config.clone())
        .with_raw_access(Raw(config))
        .with_unreachable(unreachable)
        .with_private_server(move || async move {
            let server = tokio::task::spawn_blocking(move || servers::start_private(kind))
                .await
                .map_err(|e| ServerError::Failed(e.to_string()))??;
            let config = config_for(&server, client);
            Ok(PrivateServer {
                factory: Arc::new(config) as Arc<dyn BackendFactory>,
                control: server.control().expect("harness-started"),
                keep_alive: Box::new(server),
            })
        })
}

locker_conformance::conformance_suite!(
    redis_standalone,
    setup(ServerKind::Redis, ClientLibrary::Redis)
);
locker_conformance::conformance_suite!(
    redis_cluster,
    setup(ServerKind::RedisCluster, ClientLibrary::Redis)
);
#[cfg(feature = "fred")]
locker_conformance::conformance_suite!(
    fred_standalone,
    setup(ServerKind::Redis, ClientLibrary::Fred)
);
#[cfg(feature = "fred")]
locker_conformance::conformance_suite!(
    fred_cluster,
    setup(ServerKind::RedisCluster, ClientLibrary::Fred)
);

#[test]
fn capabilities_are_declared() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let server = servers::shared(ServerKind::Redis).expect("redis");
        let backend = config_for(server, ClientLibrary::default())
            .connect()
            .await
            .expect("connect");
        let c = backend.capabilities();
        assert!(c.fencing && c.atomic_take_over && c.shared_across_processes);
        assert_eq!(c.ttl_granularity, Duration::from_millis(1));
    });
}
