//! The driver on the `redis` crate: a `ConnectionManager` (reconnecting) for a standalone
//! server, a cluster connection (following `MOVED`/`ASK`) for a cluster.

use std::fmt;

use async_trait::async_trait;
use locker_core::{Error, ErrorKind, Result};
use redis::aio::ConnectionManager;
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncCommands, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo, RedisError, Script,
    ServerErrorKind, TlsCertificates,
};

use crate::backend::Driver;
use crate::config::{RedisConfig, Topology};
use crate::scripts::ScriptName;

#[derive(Clone)]
enum Conn {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

pub(crate) struct RedisDriver {
    conn: Conn,
    scripts: Vec<Script>,
    label: String,
}

impl RedisDriver {
    pub(crate) async fn connect(config: &RedisConfig) -> Result<Self> {
        crate::tls::install_crypto_provider();
        let settings = {
            let mut s = RedisConnectionInfo::default().set_db(config.database);
            if let Some(user) = &config.username {
                s = s.set_username(user);
            }
            if let Some(password) = &config.password {
                s = s.set_password(password);
            }
            s
        };
        let certs = config.root_cert_pem.as_ref().map(|pem| TlsCertificates {
            client_tls: None,
            root_cert: Some(pem.clone()),
        });
        let connect = async {
            match &config.topology {
                Topology::Standalone { host, port } => {
                    let addr = if config.tls {
                        ConnectionAddr::TcpTls {
                            host: host.clone(),
                            port: *port,
                            insecure: false,
                            tls_params: None,
                        }
                    } else {
                        ConnectionAddr::Tcp(host.clone(), *port)
                    };
                    let info = addr
                        .into_connection_info()
                        .map_err(map_error)?
                        .set_redis_settings(settings);
                    let client = match certs {
                        Some(certs) => redis::Client::build_with_tls(info, certs),
                        None => redis::Client::open(info),
                    }
                    .map_err(map_error)?;
                    let manager_config = redis::aio::ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(config.connect_timeout))
                        .set_response_timeout(Some(config.command_timeout))
                        .set_number_of_retries(2);
                    ConnectionManager::new_with_config(client, manager_config)
                        .await
                        .map(Conn::Standalone)
                        .map_err(map_error)
                }
                Topology::Cluster { nodes } => {
                    let nodes: Vec<_> = nodes
                        .iter()
                        .map(|(host, port)| {
                            let addr = if config.tls {
                                ConnectionAddr::TcpTls {
                                    host: host.clone(),
                                    port: *port,
                                    insecure: false,
                                    tls_params: None,
                                }
                            } else {
                                ConnectionAddr::Tcp(host.clone(), *port)
                            };
                            addr.into_connection_info()
                        })
                        .collect::<std::result::Result<_, _>>()
                        .map_err(map_error)?;
                    let mut builder = ClusterClientBuilder::new(nodes)
                        .connection_timeout(config.connect_timeout)
                        .response_timeout(config.command_timeout)
                        .retries(3);
                    if let Some(user) = &config.username {
                        builder = builder.username(user);
                    }
                    if let Some(password) = &config.password {
                        builder = builder.password(password);
                    }
                    if config.tls {
                        builder = builder.tls(redis::TlsMode::Secure);
                    }
                    if let Some(certs) = certs {
                        builder = builder.certs(certs);
                    }
                    let client = builder.build().map_err(map_error)?;
                    client
                        .get_async_connection()
                        .await
                        .map(Conn::Cluster)
                        .map_err(map_error)
                }
            }
        };
        // Bound the whole connect, retries included.
        let conn = tokio::time::timeout(config.connect_timeout * 3, connect)
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "no answer from {config} within {:?}",
                        config.connect_timeout * 3
                    ),
                )
            })??;
        Ok(RedisDriver {
            conn,
            scripts: ScriptName::ALL
                .iter()
                .map(|s| Script::new(&s.source()))
                .collect(),
            label: config.redacted_url(),
        })
    }
}

#[async_trait]
impl Driver for RedisDriver {
    async fn eval(&self, script: ScriptName, keys: &[&str], args: &[&str]) -> Result<Vec<String>> {
        let mut invocation = self.scripts[script.index()].prepare_invoke();
        for key in keys {
            invocation.key(*key);
        }
        for arg in args {
            invocation.arg(*arg);
        }
        // `invoke_async` sends EVALSHA and, after NOSCRIPT (a restarted or failed-over server),
        // loads the script and sends it again.
        let result = match self.conn.clone() {
            Conn::Standalone(mut c) => invocation.invoke_async(&mut c).await,
            Conn::Cluster(mut c) => invocation.invoke_async(&mut c).await,
        };
        result.map_err(map_error)
    }

    async fn get(&self, key: &str) -> Result<Option<String>> {
        let result = match self.conn.clone() {
            Conn::Standalone(mut c) => c.get(key).await,
            Conn::Cluster(mut c) => c.get(key).await,
        };
        result.map_err(map_error)
    }

    async fn set_px(&self, key: &str, value: &str, ttl_ms: u64) -> Result<()> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(value).arg("PX").arg(ttl_ms);
        let result: redis::RedisResult<()> = match self.conn.clone() {
            Conn::Standalone(mut c) => cmd.query_async(&mut c).await,
            Conn::Cluster(mut c) => cmd.query_async(&mut c).await,
        };
        result.map_err(map_error)
    }

    async fn del(&self, key: &str) -> Result<()> {
        let result: redis::RedisResult<()> = match self.conn.clone() {
            Conn::Standalone(mut c) => c.del(key).await,
            Conn::Cluster(mut c) => c.del(key).await,
        };
        result.map_err(map_error)
    }
}

impl fmt::Debug for RedisDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisDriver")
            .field("server", &self.label)
            .finish()
    }
}

/// The one mapping of the `redis` crate's errors to the project's.
pub(crate) fn map_error(e: RedisError) -> Error {
    use redis::ErrorKind as K;
    let kind = match e.kind() {
        K::AuthenticationFailed | K::Server(ServerErrorKind::NoPerm) => ErrorKind::Auth,
        _ if e.is_timeout() => ErrorKind::Timeout,
        K::Io | K::ClusterConnectionNotFound => ErrorKind::Unavailable,
        _ if e.is_connection_dropped() || e.is_connection_refusal() => ErrorKind::Unavailable,
        K::Server(
            ServerErrorKind::TryAgain
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::Moved
            | ServerErrorKind::Ask
            | ServerErrorKind::MasterDown
            | ServerErrorKind::BusyLoading
            | ServerErrorKind::ReadOnly,
        ) => ErrorKind::Unavailable,
        K::InvalidClientConfig => ErrorKind::InvalidInput,
        // A stored value that is not text (or not what a script returns).
        K::Parse | K::UnexpectedReturnType => ErrorKind::Corrupt,
        _ => match e.code() {
            Some("WRONGPASS" | "NOAUTH") => ErrorKind::Auth,
            // Another client's long script; it ends.
            Some("BUSY") => ErrorKind::Unavailable,
            // Someone stored a non-string value under a lock key.
            Some("WRONGTYPE") => ErrorKind::Corrupt,
            _ => ErrorKind::Other,
        },
    };
    Error::new(kind, "redis").with_source(e)
}
