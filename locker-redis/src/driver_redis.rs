//! The driver on the `redis` crate: a `ConnectionManager` (reconnecting) for a standalone
//! server, a cluster connection (following `MOVED`/`ASK`) for a cluster.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use locker_core::{find_io_error, is_definite_io_error, Error, ErrorKind, Result};
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncCommands, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo, RedisError, Script,
    ServerErrorKind, TlsCertificates, Value,
};

use crate::backend::Driver;
use crate::config::{RedisConfig, Topology, WaitForReplicas};
use crate::notify::Subscriber;
use crate::scripts::{Item, ScriptName};
use crate::version;

#[derive(Clone)]
enum Conn {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

pub(crate) struct RedisDriver {
    conn: Conn,
    /// Opens pub/sub connections: a client per node (one for a standalone server), tried in
    /// turn; `None` without release events.
    pubsub: Option<PubSubClients>,
    /// Sources and SHA1s of the scripts, by `ScriptName::index`.
    scripts: Vec<(String, String)>,
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
                    let client = match &config.redis_client {
                        Some(client) => client.clone(),
                        None => node_client(config, host, *port, settings.clone())?,
                    };
                    let mut manager =
                        ConnectionManager::new_with_config(client, manager_config(config))
                            .await
                            .map_err(map_error)?;
                    check_standalone_version(&mut manager, &config.redacted_url()).await?;
                    Ok((Conn::Standalone(manager), None))
                }
                Topology::Sentinel { sentinels, service } => {
                    let client = master_from_sentinels(config, sentinels, service).await?;
                    let mut manager =
                        ConnectionManager::new_with_config(client.clone(), manager_config(config))
                            .await
                            .map_err(map_error)?;
                    check_standalone_version(&mut manager, &config.redacted_url()).await?;
                    Ok((Conn::Standalone(manager), Some(client)))
                }
                Topology::Cluster { nodes } => {
                    // The application's client, or one from this configuration.
                    let client = match &config.redis_cluster_client {
                        Some(client) => client.clone(),
                        None => cluster_client(config, nodes, certs)?,
                    };
                    let mut conn = client.get_async_connection().await.map_err(map_error)?;
                    check_cluster_versions(&mut conn).await?;
                    Ok((Conn::Cluster(conn), None))
                }
            }
        };
        // Bound the whole connect, retries included.
        let (conn, master) = tokio::time::timeout(config.connect_timeout * 3, connect)
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
        // Pub/sub: the application's client, the master the sentinels named, or each node.
        let pubsub = if config.release_events {
            let clients = match master.as_ref().or(config.redis_client.as_ref()) {
                Some(client) => vec![client.clone()],
                None => config
                    .nodes()
                    .iter()
                    .map(|(host, port)| node_client(config, host, *port, settings.clone()))
                    .collect::<Result<Vec<_>>>()?,
            };
            Some(PubSubClients {
                clients,
                next: std::sync::atomic::AtomicUsize::new(0),
                connect_timeout: config.connect_timeout,
            })
        } else {
            None
        };
        Ok(RedisDriver {
            conn,
            pubsub,
            scripts: ScriptName::ALL
                .iter()
                .map(|s| {
                    let source = s.source(config.release_events);
                    let sha = Script::new(&source).get_hash().to_owned();
                    (source, sha)
                })
                .collect(),
            label: config.redacted_url(),
        })
    }
}

/// A cluster client from this configuration's seed nodes, credentials and TLS.
fn cluster_client(
    config: &RedisConfig,
    nodes: &[(String, u16)],
    certs: Option<TlsCertificates>,
) -> Result<redis::cluster::ClusterClient> {
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
    builder.build().map_err(map_error)
}

/// The master the sentinels name now, as a client (with the master's credentials and
/// database); the sentinels themselves are asked without credentials.
async fn master_from_sentinels(
    config: &RedisConfig,
    sentinels: &[(String, u16)],
    service: &str,
) -> Result<redis::Client> {
    let addrs = sentinels
        .iter()
        .map(|(host, port)| ConnectionAddr::Tcp(host.clone(), *port));
    let mut builder = redis::sentinel::SentinelClientBuilder::new(
        addrs,
        service,
        redis::sentinel::SentinelServerType::Master,
    )
    .map_err(map_error)?
    .set_client_to_redis_db(config.database);
    if let Some(user) = &config.username {
        builder = builder.set_client_to_redis_username(user);
    }
    if let Some(password) = &config.password {
        builder = builder.set_client_to_redis_password(password);
    }
    let mut sentinel = builder.build().map_err(map_error)?;
    sentinel.async_get_client().await.map_err(|e| {
        let mapped = map_error(e);
        Error::new(
            ErrorKind::Unavailable,
            format!(
                "no master for service {service:?} from the sentinels {}",
                sentinels
                    .iter()
                    .map(|(h, p)| format!("{h}:{p}"))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        )
        .with_source(mapped)
    })
}

/// The connection manager's settings: the application's (or 2 retries), with this
/// configuration's timeouts over them.
fn manager_config(config: &RedisConfig) -> redis::aio::ConnectionManagerConfig {
    config
        .manager_config
        .clone()
        .unwrap_or_else(|| redis::aio::ConnectionManagerConfig::new().set_number_of_retries(2))
        .set_connection_timeout(Some(config.connect_timeout))
        .set_response_timeout(Some(config.command_timeout))
}

/// `INFO server`, the reply the version check reads.
fn info_server() -> redis::Cmd {
    let mut cmd = redis::cmd("INFO");
    cmd.arg("server");
    cmd
}

/// Checks one server's `INFO server` reply (or the error it answered instead).
fn check_info_reply(server: &str, reply: std::result::Result<Value, RedisError>) -> Result<()> {
    match reply {
        Ok(Value::ServerError(e)) => check_info_reply(server, Err(e.into())),
        Ok(value) => {
            let text: String =
                redis::from_redis_value(value).map_err(|_| version::unreadable_info(server))?;
            version::check_info(server, &text).map(drop)
        }
        // ACLs (hence Redis 6.0 or newer) deny this user INFO: nothing more to learn.
        Err(e) if e.code() == Some("NOPERM") => version::info_denied(server),
        Err(e) => Err(version::info_failed(server, map_error(e))),
    }
}

/// Refuses a standalone server older than [`version::MIN_VERSION`].
async fn check_standalone_version(conn: &mut ConnectionManager, server: &str) -> Result<()> {
    let reply = info_server().query_async::<Value>(conn).await;
    check_info_reply(server, reply)
}

/// Refuses a cluster any of whose primaries is older than [`version::MIN_VERSION`]: the
/// cluster connection sends `INFO` to every primary it knows and answers a map from each
/// primary's address to its reply.
async fn check_cluster_versions(conn: &mut ClusterConnection) -> Result<()> {
    // The raw reply: `query_async` would turn one primary's error into an error of the whole.
    let reply = conn
        .req_packed_command(&info_server())
        .await
        .map_err(map_error)?;
    let Value::Map(replies) = reply else {
        return check_info_reply("the cluster", Ok(reply));
    };
    if replies.is_empty() {
        return Err(Error::unavailable("the cluster reports no primary"));
    }
    for (node, reply) in replies {
        let node: String = redis::from_redis_value(node).unwrap_or_else(|_| "a node".into());
        check_info_reply(&node, Ok(reply))?;
    }
    Ok(())
}

#[async_trait]
impl Driver for RedisDriver {
    async fn eval(&self, script: ScriptName, keys: &[&str], args: &[&str]) -> Result<Vec<Item>> {
        let (source, sha) = &self.scripts[script.index()];
        // Sized once: growing the command's buffers argument by argument was several
        // reallocations per call.
        let bytes = keys.iter().chain(args).map(|a| a.len()).sum::<usize>();
        let command = |name: &str, body: &str| {
            let mut cmd = redis::Cmd::with_capacity(
                3 + keys.len() + args.len(),
                name.len() + body.len() + 20 + bytes,
            );
            cmd.arg(name).arg(body).arg(keys.len()).arg(keys).arg(args);
            cmd
        };
        match self.query(&command("EVALSHA", sha)).await {
            // A restarted or newly promoted server forgot the script. EVAL, routed by the key
            // to the node that answered, runs it and caches it there. (The `redis` crate's
            // own fallback loads it on every node of a cluster, and fails when one of them does
            // not answer, e.g. during a failover.)
            Err(e)
                if matches!(
                    e.kind(),
                    redis::ErrorKind::Server(ServerErrorKind::NoScript)
                ) =>
            {
                self.query(&command("EVAL", source)).await
            }
            other => other,
        }
        .map_err(map_error)
    }

    async fn eval_and_wait(
        &self,
        script: ScriptName,
        keys: &[&str],
        args: &[&str],
        wait: WaitForReplicas,
    ) -> Result<(Vec<Item>, u64)> {
        let (source, sha) = &self.scripts[script.index()];
        // One pipeline, so one connection: `WAIT` counts the writes of the connection it is
        // sent on. The cluster connection routes a pipeline by its first key (the lock's), to
        // that slot's master (`WAIT` alone would go to every primary), and retries it whole
        // after a redirection or a reconnection; the connection manager sends it on one
        // connection or fails it.
        let pipeline = |name: &str, body: &str| {
            let mut pipe = redis::pipe();
            pipe.cmd(name).arg(body).arg(keys.len()).arg(keys).arg(args);
            pipe.cmd("WAIT").arg(wait.replicas).arg(wait.timeout_ms());
            pipe
        };
        let replies = self.query_pipeline(&pipeline("EVALSHA", sha)).await?;
        let replies = match replies {
            // As in `eval`: the node forgot the script; its `WAIT` answered for nothing.
            [Value::ServerError(e), _] if matches!(e.kind(), Some(ServerErrorKind::NoScript)) => {
                self.query_pipeline(&pipeline("EVAL", source)).await?
            }
            other => other,
        };
        let [script_reply, wait_reply] = replies;
        let from_value = |value: Value| -> Result<Value> {
            match value {
                Value::ServerError(e) => Err(map_error(e.into())),
                value => Ok(value),
            }
        };
        let reply: Vec<Item> =
            redis::from_redis_value(from_value(script_reply)?).map_err(|e| map_error(e.into()))?;
        let acked: u64 =
            redis::from_redis_value(from_value(wait_reply)?).map_err(|e| map_error(e.into()))?;
        Ok((reply, acked))
    }

    async fn cluster_node_timeout(&self) -> Option<Duration> {
        let Conn::Cluster(mut conn) = self.conn.clone() else {
            return None;
        };
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("GET").arg("cluster-node-timeout");
        // The raw reply: one node's, or a map from each node to its own.
        let reply = conn.req_packed_command(&cmd).await.ok()?;
        let replies = match reply {
            Value::Map(replies) => replies.into_iter().map(|(_, r)| r).collect(),
            other => vec![other],
        };
        replies
            .into_iter()
            .filter_map(|r| redis::from_redis_value::<Vec<String>>(r).ok())
            .filter_map(|pair| crate::backend::node_timeout_from_reply(&pair))
            .max()
    }

    async fn get(&self, key: &str) -> Result<Option<String>> {
        let result = match self.conn.clone() {
            Conn::Standalone(mut c) => c.get(key).await,
            Conn::Cluster(mut c) => c.get(key).await,
        };
        result.map_err(map_error)
    }

    async fn mget(&self, keys: &[&str]) -> Result<Vec<Option<String>>> {
        let mut cmd = redis::cmd("MGET");
        cmd.arg(keys);
        self.query(&cmd).await.map_err(map_error)
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

    async fn pttl(&self, key: &str) -> Result<i64> {
        let mut cmd = redis::cmd("PTTL");
        cmd.arg(key);
        self.query(&cmd).await.map_err(map_error)
    }

    fn can_subscribe(&self) -> bool {
        self.pubsub.is_some()
    }

    async fn subscriber(&self) -> Result<Option<Box<dyn Subscriber>>> {
        let Some(pubsub) = &self.pubsub else {
            return Ok(None);
        };
        // A cluster's nodes in turn, from the one after the last tried: classic pub/sub
        // messages reach every node, so any one will do, and a failed one is skipped.
        let n = pubsub.clients.len();
        let first = pubsub
            .next
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut last_error = None;
        for i in 0..n {
            let client = &pubsub.clients[(first + i) % n];
            let timeout = pubsub.connect_timeout;
            match tokio::time::timeout(timeout, client.get_async_pubsub()).await {
                Ok(Ok(conn)) => {
                    let (sink, stream) = conn.split();
                    return Ok(Some(Box::new(RedisSubscriber { sink, stream })));
                }
                Ok(Err(e)) => last_error = Some(map_error(e)),
                Err(_) => {
                    last_error = Some(Error::new(
                        ErrorKind::Timeout,
                        format!("no pub/sub connection within {timeout:?}"),
                    ))
                }
            }
        }
        Err(last_error.unwrap_or_else(|| Error::unavailable("no node to subscribe on")))
    }
}

/// The clients that open pub/sub connections, one per node.
struct PubSubClients {
    clients: Vec<redis::Client>,
    next: std::sync::atomic::AtomicUsize,
    connect_timeout: Duration,
}

/// A client of one node, with the configuration's credentials and TLS.
fn node_client(
    config: &RedisConfig,
    host: &str,
    port: u16,
    settings: RedisConnectionInfo,
) -> Result<redis::Client> {
    let addr = if config.tls {
        ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: false,
            tls_params: None,
        }
    } else {
        ConnectionAddr::Tcp(host.to_owned(), port)
    };
    let info = addr
        .into_connection_info()
        .map_err(map_error)?
        .set_redis_settings(settings);
    match &config.root_cert_pem {
        Some(pem) => redis::Client::build_with_tls(
            info,
            TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.clone()),
            },
        ),
        None => redis::Client::open(info),
    }
    .map_err(map_error)
}

/// A pub/sub connection of the `redis` crate.
struct RedisSubscriber {
    sink: redis::aio::PubSubSink,
    stream: redis::aio::PubSubStream,
}

#[async_trait]
impl Subscriber for RedisSubscriber {
    async fn subscribe(&mut self, channel: &str) -> Result<()> {
        self.sink.subscribe(channel).await.map_err(map_error)
    }

    async fn unsubscribe(&mut self, channel: &str) -> Result<()> {
        self.sink.unsubscribe(channel).await.map_err(map_error)
    }

    async fn next_message(&mut self) -> Option<String> {
        use futures::StreamExt;
        self.stream
            .next()
            .await
            .map(|message| message.get_channel_name().to_owned())
    }
}

impl RedisDriver {
    /// The two replies of a two-command pipeline, each a value or the server's error.
    async fn query_pipeline(&self, pipe: &redis::Pipeline) -> Result<[Value; 2]> {
        let replies = match self.conn.clone() {
            Conn::Standalone(mut c) => c.req_packed_commands(pipe, 0, 2).await,
            Conn::Cluster(mut c) => c.req_packed_commands(pipe, 0, 2).await,
        }
        .map_err(map_error)?;
        <[Value; 2]>::try_from(replies).map_err(|replies| {
            Error::new(
                ErrorKind::Other,
                format!(
                    "a pipeline of 2 commands answered {} replies",
                    replies.len()
                ),
            )
        })
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        match self.conn.clone() {
            Conn::Standalone(mut c) => cmd.query_async(&mut c).await,
            Conn::Cluster(mut c) => cmd.query_async(&mut c).await,
        }
    }
}

/// A script's answer value: integers and strings as they come (a text of invalid UTF-8 is an
/// error, as for any reply read as a string).
impl redis::FromRedisValue for Item {
    fn from_redis_value(v: Value) -> std::result::Result<Self, redis::ParsingError> {
        match v {
            Value::Int(i) => Ok(Item::Int(i)),
            Value::BulkString(bytes) => Ok(Item::Text(String::from_utf8(bytes)?)),
            Value::SimpleString(text) => Ok(Item::Text(text)),
            Value::Nil => Ok(Item::Nil),
            other => Err(format!("a script answered {other:?}").into()),
        }
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
            | ServerErrorKind::ReadOnly
            // Only if the EVAL fallback met another failover: the next call reloads it.
            | ServerErrorKind::NoScript,
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
    // An answer at start (see `Error::is_definite`): no server listens there, or the name
    // does not resolve.
    let definite = e.is_connection_refusal() || find_io_error(&e).is_some_and(is_definite_io_error);
    // A server's error reply came over a working connection (see `Error::store_answered`).
    // `READONLY` and `MASTERDOWN`: this connection points at a replica (an old master, after a
    // Sentinel failover, whose reads still succeed) and must be made again at once (see
    // `locker_core`'s healing): the next connect asks the sentinels for the master.
    let wrong_node = matches!(
        e.kind(),
        K::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
    );
    let answered = matches!(e.kind(), K::Server(_)) || e.code().is_some();
    let mapped = Error::new(kind, "redis")
        .set_store_answered(answered)
        .set_wrong_node(wrong_node)
        .with_source(e);
    if definite {
        mapped.set_definite(true)
    } else {
        mapped
    }
}
