//! The shared conformance suite against one etcd member and a 3-member cluster started by the
//! harness, fault cases included.

use std::sync::Arc;
use std::time::Duration;

use locker_conformance::servers::{self, Server, ServerKind};
use locker_conformance::{PrivateServer, RawAccess, ServerError, Setup};
use locker_core::BackendFactory;
use locker_etcd::{EtcdBackend, EtcdConfig};

fn config_for(server: &Server) -> EtcdConfig {
    let mut builder = EtcdConfig::builder()
        .connect_timeout(Duration::from_secs(2))
        .command_timeout(Duration::from_secs(3));
    for endpoint in server.endpoints() {
        let (host, port) = endpoint
            .trim_start_matches("http://")
            .rsplit_once(':')
            .expect("host:port");
        builder = builder.endpoint(host, port.parse().expect("port"));
    }
    builder.build().expect("config")
}

struct Raw(EtcdConfig);

#[async_trait::async_trait]
impl RawAccess for Raw {
    async fn put_lock_raw(&self, key: &str, raw: &str, ttl: Duration) -> locker_core::Result<()> {
        EtcdBackend::connect(&self.0)
            .await?
            .raw_put(key, raw, ttl)
            .await
    }

    async fn get_lock_raw(&self, key: &str) -> locker_core::Result<Option<String>> {
        EtcdBackend::connect(&self.0).await?.raw_get(key).await
    }
}

async fn setup(kind: ServerKind) -> Setup {
    let server = servers::shared(kind).unwrap_or_else(|e| panic!("{kind}: {e}"));
    let config = config_for(server);
    let unreachable = EtcdConfig::from_url("etcd://127.0.0.1:1")
        .expect("url")
        .into_builder()
        .connect_timeout(Duration::from_millis(500))
        .build()
        .expect("config");
    Setup::new(kind.to_string(), config.clone())
        .with_raw_access(Raw(config))
        .with_unreachable(unreachable)
        .with_private_server(move || async move {
            let server = tokio::task::spawn_blocking(move || servers::start_private(kind))
                .await
                .map_err(|e| ServerError::Failed(e.to_string()))??;
            Ok(PrivateServer {
                factory: Arc::new(config_for(&server)) as Arc<dyn BackendFactory>,
                control: server.control().expect("harness-started"),
                keep_alive: Box::new(server),
            })
        })
}

locker_conformance::conformance_suite!(etcd, setup(ServerKind::Etcd));
locker_conformance::conformance_suite!(etcd_cluster, setup(ServerKind::EtcdCluster));
