//! The driver on the `fred` crate.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fred::prelude::{
    Client, ClientLike, ClusterInterface, Config, Error as FredError, ErrorKind as FredKind,
    EventInterface, Expiration, KeysInterface, LuaInterface, PubsubInterface, ReconnectPolicy,
    Server, ServerConfig,
};
use fred::rustls::pki_types::pem::PemObject;
use fred::rustls::pki_types::CertificateDer;
use fred::rustls::{ClientConfig, RootCertStore};
use fred::types::config::{Options, TlsConfig, TlsConnector, TlsHostMapping};
use fred::types::{ClusterHash, CustomCommand, Value};
use locker_core::{is_definite_io_error, Error, ErrorKind, Result};

use crate::backend::Driver;
use crate::config::{RedisConfig, Topology, WaitForReplicas};
use crate::scripts::{Item, ScriptName};
use crate::version;

pub(crate) struct FredDriver {
    client: Client,
    /// How long a new pub/sub connection may take; `None` without release events.
    pubsub_connect_timeout: Option<Duration>,
    /// Sources and SHA1s of the scripts, by `ScriptName::index`.
    scripts: Vec<(String, String)>,
    label: String,
}

fn tls_config(config: &RedisConfig) -> Result<TlsConfig> {
    let Some(pem) = &config.root_cert_pem else {
        // The system's roots, as fred loads them.
        let connector = TlsConnector::default_rustls()
            .map_err(|e| Error::invalid_input(format!("TLS configuration: {e}")))?;
        return Ok(TlsConfig {
            connector,
            hostnames: TlsHostMapping::None,
        });
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert =
            cert.map_err(|e| Error::invalid_input(format!("bad root certificate PEM: {e:?}")))?;
        roots
            .add(cert)
            .map_err(|e| Error::invalid_input(format!("bad root certificate: {e}")))?;
    }
    let provider = Arc::new(fred::rustls::crypto::ring::default_provider());
    let client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::invalid_input(format!("TLS configuration: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConfig {
        connector: TlsConnector::from(client),
        hostnames: TlsHostMapping::None,
    })
}

impl FredDriver {
    pub(crate) async fn connect(config: &RedisConfig) -> Result<Self> {
        let server = match &config.topology {
            Topology::Standalone { host, port } => ServerConfig::Centralized {
                server: Server::new(host.as_str(), *port),
            },
            Topology::Cluster { nodes } => ServerConfig::Clustered {
                hosts: nodes
                    .iter()
                    .map(|(h, p)| Server::new(h.as_str(), *p))
                    .collect(),
                policy: Default::default(),
            },
            // fred asks the sentinels for the master, and again after a failover.
            Topology::Sentinel { sentinels, service } => ServerConfig::Sentinel {
                hosts: sentinels
                    .iter()
                    .map(|(h, p)| Server::new(h.as_str(), *p))
                    .collect(),
                service_name: service.clone(),
            },
        };
        let database = u8::try_from(config.database)
            .map_err(|_| Error::invalid_input("fred supports databases 0 to 255"))?;
        let tls = if config.tls {
            Some(tls_config(config)?)
        } else {
            None
        };
        let fred_config = match &config.fred_config {
            Some(theirs) => theirs.clone(),
            None => Config {
                server,
                username: config.username.clone(),
                password: config.password.clone(),
                database: (database != 0).then_some(database),
                tls,
                fail_fast: true,
                ..Config::default()
            },
        };
        let (connect_timeout, command_timeout) = (config.connect_timeout, config.command_timeout);
        // The application's builder (its performance, connection and reconnection settings),
        // or fred's defaults; the timeouts that bound lock calls are this configuration's.
        let mut builder = config.fred_builder.clone().unwrap_or_default();
        builder
            .set_config(fred_config)
            .with_connection_config(|c| {
                c.connection_timeout = connect_timeout;
                c.internal_command_timeout = command_timeout;
                // Room to follow MOVED/ASK redirections (each counts as an attempt). A script
                // replayed after a reconnect is harmless: the locker recognises its own lock.
                c.max_command_attempts = c.max_command_attempts.max(3);
            })
            .with_performance_config(|p| p.default_command_timeout = command_timeout);
        if builder.get_policy().is_none() {
            builder.set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2));
        }
        let client = builder.build().map_err(map_error)?;
        // `init` fails fast (with the first connection error) when no server answers.
        let started = match tokio::time::timeout(connect_timeout * 3, client.init()).await {
            Ok(Ok(_task)) => Ok(()),
            Ok(Err(e)) => Err(map_error(e)),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!("no answer from {config} within {:?}", connect_timeout * 3),
            )),
        };
        // Refuse a server too old for the scripts now, rather than at the first acquire.
        let started = match started {
            Ok(()) => check_versions(&client, config).await,
            Err(e) => Err(e),
        };
        if let Err(e) = started {
            // Otherwise fred's connection task would go on reconnecting with nobody to use it.
            let _ = tokio::time::timeout(Duration::from_secs(1), client.quit()).await;
            return Err(e);
        }
        Ok(FredDriver {
            client,
            pubsub_connect_timeout: config.release_events.then_some(connect_timeout),
            scripts: ScriptName::ALL
                .iter()
                .map(|s| {
                    let source = s.source(config.release_events);
                    let sha = fred::util::sha1_hash(&source);
                    (source, sha)
                })
                .collect(),
            label: config.redacted_url(),
        })
    }
}

/// Refuses a server older than [`version::MIN_VERSION`]: the server of a standalone
/// configuration, every primary of a cluster (as the cluster state fred synced at `init`
/// lists them).
async fn check_versions(client: &Client, config: &RedisConfig) -> Result<()> {
    if !client.is_clustered() {
        return check_version(client, &config.redacted_url()).await;
    }
    let primaries = client
        .cached_cluster_state()
        .map(|state| state.unique_primary_nodes())
        .unwrap_or_default();
    if primaries.is_empty() {
        return Err(Error::unavailable("the cluster reports no primary"));
    }
    for primary in primaries {
        let label = primary.to_string();
        check_version(&client.with_cluster_node(primary), &label).await?;
    }
    Ok(())
}

/// Reads one server's `INFO server` and checks its `redis_version`.
async fn check_version<C: ClientLike>(client: &C, server: &str) -> Result<()> {
    let info = CustomCommand::new_static("INFO", ClusterHash::Random, false);
    let reply: std::result::Result<Value, FredError> = client.custom(info, vec!["server"]).await;
    match reply {
        Ok(value) => {
            let text = value
                .into_string()
                .ok_or_else(|| version::unreadable_info(server))?;
            version::check_info(server, &text).map(drop)
        }
        // ACLs (hence Redis 6.0 or newer) deny this user INFO: nothing more to learn.
        Err(e) if e.details().starts_with("NOPERM") => version::info_denied(server),
        Err(e) => Err(version::info_failed(server, map_error(e))),
    }
}

#[async_trait]
impl Driver for FredDriver {
    async fn eval(&self, script: ScriptName, keys: &[&str], args: &[&str]) -> Result<Vec<Item>> {
        let (source, sha) = &self.scripts[script.index()];
        // Copied once, into fred's own values, for each attempt (not kept for a resend: a
        // `NOSCRIPT` is rare, and its resend copies them again).
        let first: std::result::Result<Vec<Item>, FredError> = self
            .client
            .evalsha(sha.as_str(), keys.to_vec(), args.to_vec())
            .await;
        let reply = match first {
            Err(e) if e.details().starts_with("NOSCRIPT") => {
                // A restarted or newly promoted server forgot the script. EVAL, routed by the
                // key to the node that answered, runs it and caches it there (loading it on
                // every primary fails when one of them does not answer, e.g. in a failover).
                self.client
                    .eval(source.as_str(), keys.to_vec(), args.to_vec())
                    .await
                    .map_err(map_error)?
            }
            other => other.map_err(map_error)?,
        };
        Ok(reply)
    }

    async fn eval_and_wait(
        &self,
        script: ScriptName,
        keys: &[&str],
        args: &[&str],
        wait: WaitForReplicas,
    ) -> Result<(Vec<Item>, u64)> {
        let (source, sha) = &self.scripts[script.index()];
        let keys: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        // `WAIT` counts the writes of the connection it is sent on, so it must follow the script
        // on the script's connection. fred routes each command of a pipeline on its own: `WAIT`
        // goes to the slot of the lock's key, so to the same node's connection, in order. But
        // fred would resend the script alone to another node after a redirection, or either
        // command alone after a reconnection (when the other was answered): a `WAIT` that
        // answers for another connection's writes could say "acknowledged" for nothing. Each
        // such resend is another write attempt, so one attempt each (fred does not inherit the
        // client's number of attempts when one is set) makes them fail instead, retryably
        // (after a `MOVED`, fred has refreshed its slot map first); the caller retries both.
        let slot = keys
            .first()
            .map_or(0, |k| fred::util::redis_keyslot(k.as_bytes()));
        let once = Options {
            max_attempts: Some(1),
            ..Options::default()
        };
        // fred's pipelines have no script methods: both are custom commands, routed by slot.
        let run = |name: &'static str, body: &str| {
            let mut script_args = vec![body.to_owned(), keys.len().to_string()];
            script_args.extend(keys.iter().cloned());
            script_args.extend(args.iter().cloned());
            let pipeline = self.client.pipeline().with_options(&once);
            async move {
                let script_cmd = CustomCommand::new_static(name, ClusterHash::Custom(slot), false);
                let queued: std::result::Result<(), FredError> =
                    pipeline.custom(script_cmd, script_args).await;
                queued.map_err(map_error)?;
                let wait_cmd = CustomCommand::new_static("WAIT", ClusterHash::Custom(slot), false);
                let queued: std::result::Result<(), FredError> = pipeline
                    .custom(
                        wait_cmd,
                        vec![wait.replicas.to_string(), wait.timeout_ms().to_string()],
                    )
                    .await;
                queued.map_err(map_error)?;
                let mut replies = pipeline.try_all::<Value>().await.into_iter();
                match (replies.next(), replies.next()) {
                    (Some(script), Some(wait)) => Ok((script, wait)),
                    // fred ends a pipeline with one error when a command of it could not be
                    // written again (after a redirection, the attempt it is not allowed).
                    (Some(Err(e)), None) => Err(map_error(e)),
                    other => Err(Error::new(
                        ErrorKind::Other,
                        format!("a pipeline of 2 commands answered {other:?}"),
                    )),
                }
            }
        };
        let (script_reply, wait_reply) = match run("EVALSHA", sha).await? {
            // As in `eval`: the node forgot the script; its `WAIT` answered for nothing.
            (Err(e), _) if e.details().starts_with("NOSCRIPT") => run("EVAL", source).await?,
            other => other,
        };
        let reply: Vec<Item> = script_reply.and_then(|v| v.convert()).map_err(map_error)?;
        let acked: u64 = wait_reply.and_then(|v| v.convert()).map_err(map_error)?;
        Ok((reply, acked))
    }

    async fn cluster_node_timeout(&self) -> Option<Duration> {
        if !self.client.is_clustered() {
            return None;
        }
        let primaries = self
            .client
            .cached_cluster_state()
            .map(|state| state.unique_primary_nodes())
            .unwrap_or_default();
        let mut longest = None;
        for primary in primaries {
            let config = CustomCommand::new_static("CONFIG", ClusterHash::Random, false);
            let reply: std::result::Result<Vec<String>, FredError> = self
                .client
                .with_cluster_node(primary)
                .custom(config, vec!["GET", "cluster-node-timeout"])
                .await;
            let timeout = reply
                .ok()
                .and_then(|pair| crate::backend::node_timeout_from_reply(&pair));
            longest = longest.max(timeout);
        }
        longest
    }

    async fn get(&self, key: &str) -> Result<Option<String>> {
        self.client.get(key).await.map_err(map_error)
    }

    async fn mget(&self, keys: &[&str]) -> Result<Vec<Option<String>>> {
        let keys: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
        self.client.mget(keys).await.map_err(map_error)
    }

    async fn set_px(&self, key: &str, value: &str, ttl_ms: u64) -> Result<()> {
        let ttl = i64::try_from(ttl_ms).map_err(|_| Error::invalid_input("TTL too long"))?;
        let _: Option<String> = self
            .client
            .set(key, value, Some(Expiration::PX(ttl)), None, false)
            .await
            .map_err(map_error)?;
        Ok(())
    }

    async fn del(&self, key: &str) -> Result<()> {
        let _: i64 = self.client.del(key).await.map_err(map_error)?;
        Ok(())
    }

    async fn pttl(&self, key: &str) -> Result<i64> {
        self.client.pttl(key).await.map_err(map_error)
    }

    fn can_subscribe(&self) -> bool {
        self.pubsub_connect_timeout.is_some()
    }

    async fn subscriber(&self) -> Result<Option<Box<dyn crate::notify::Subscriber>>> {
        let Some(connect_timeout) = self.pubsub_connect_timeout else {
            return Ok(None);
        };
        // A client of its own (same configuration): a connection that subscribed takes no
        // other commands.
        let client = self.client.clone_new();
        let messages = client.message_rx();
        let started = tokio::time::timeout(connect_timeout, client.init()).await;
        let subscriber = FredSubscriber {
            // After `init`, whose own connection counts as a reconnection.
            reconnects: client.reconnect_rx(),
            client,
            messages,
        };
        match started {
            Ok(Ok(_task)) => Ok(Some(Box::new(subscriber))),
            Ok(Err(e)) => Err(map_error(e)),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!("no pub/sub connection within {connect_timeout:?}"),
            )),
        }
    }
}

/// A pub/sub connection of `fred`: a client of its own. A reconnection (fred makes them by
/// itself) drops its subscriptions, so it ends this connection as far as the notifier is
/// concerned, which then subscribes again.
struct FredSubscriber {
    client: Client,
    messages: tokio::sync::broadcast::Receiver<fred::types::Message>,
    reconnects: tokio::sync::broadcast::Receiver<Server>,
}

#[async_trait]
impl crate::notify::Subscriber for FredSubscriber {
    async fn subscribe(&mut self, channel: &str) -> Result<()> {
        self.client.subscribe(channel).await.map_err(map_error)
    }

    async fn unsubscribe(&mut self, channel: &str) -> Result<()> {
        self.client.unsubscribe(channel).await.map_err(map_error)
    }

    async fn next_message(&mut self) -> Option<String> {
        tokio::select! {
            message = self.messages.recv() => match message {
                Ok(message) => Some(message.channel.to_string()),
                // Lagged (messages were lost) or closed: subscribe again and wake everyone.
                Err(_) => None,
            },
            _ = self.reconnects.recv() => None,
        }
    }
}

impl Drop for FredSubscriber {
    fn drop(&mut self) {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let client = self.client.clone();
            runtime.spawn(async move {
                let _ = client.quit().await;
            });
        }
    }
}

impl Drop for FredDriver {
    fn drop(&mut self) {
        // fred's connection task holds its own handle, so it must be told to close.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let client = self.client.clone();
            runtime.spawn(async move {
                let _ = client.quit().await;
            });
        }
    }
}

impl fmt::Debug for FredDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FredDriver")
            .field("server", &self.label)
            .finish()
    }
}

/// A script's answer value: integers and strings as they come (a text of invalid UTF-8 is an
/// error, as for any reply read as a string).
impl fred::types::FromValue for Item {
    fn from_value(value: Value) -> std::result::Result<Self, FredError> {
        match value {
            Value::Integer(i) => Ok(Item::Int(i)),
            Value::String(text) => Ok(Item::Text(text.to_string())),
            Value::Bytes(bytes) => String::from_utf8(bytes.to_vec())
                .map(Item::Text)
                .map_err(|_| FredError::new(FredKind::Parse, "a script answered invalid UTF-8")),
            Value::Null => Ok(Item::Nil),
            other => Err(FredError::new(
                FredKind::Parse,
                format!("a script answered {other:?}"),
            )),
        }
    }
}

/// The one mapping of `fred`'s errors to the project's.
pub(crate) fn map_error(e: FredError) -> Error {
    let details = e.details();
    let starts = |prefixes: &[&str]| prefixes.iter().any(|p| details.starts_with(p));
    let kind = if starts(&["WRONGTYPE"]) {
        // Someone stored a non-string value under a lock key.
        ErrorKind::Corrupt
    } else if starts(&["WRONGPASS", "NOAUTH", "NOPERM"]) {
        ErrorKind::Auth
    } else if starts(&[
        "TRYAGAIN",
        "CLUSTERDOWN",
        "LOADING",
        "MASTERDOWN",
        "READONLY",
        "BUSY",
        "MOVED",
        "ASK",
        // Only if the EVAL fallback met another failover: the next call reloads it.
        "NOSCRIPT",
    ]) || details.contains("Too many failed write attempts")
        || details.contains("Max attempts")
        || details.contains("Failed to send command")
        // A new cluster connection made while the cluster reports itself down (the
        // CLUSTERDOWN window of a failover): it passes.
        || details.contains("Invalid or missing cluster state")
    {
        ErrorKind::Unavailable
    } else {
        match e.kind() {
            FredKind::Auth => ErrorKind::Auth,
            FredKind::Timeout => ErrorKind::Timeout,
            FredKind::IO
            | FredKind::Canceled
            | FredKind::Routing
            | FredKind::Cluster
            | FredKind::Backpressure => ErrorKind::Unavailable,
            FredKind::Config | FredKind::Url | FredKind::InvalidArgument => ErrorKind::InvalidInput,
            FredKind::Parse => ErrorKind::Corrupt,
            _ => ErrorKind::Other,
        }
    };
    // An answer at start (see `Error::is_definite`): fred keeps only the text of the OS error.
    let definite = e.kind() == &FredKind::IO
        && is_definite_io_error(&std::io::Error::other(details.to_owned()));
    // A server's error reply came over a working connection (see `Error::store_answered`).
    let answered = starts(&[
        "TRYAGAIN",
        "CLUSTERDOWN",
        "LOADING",
        "MASTERDOWN",
        "READONLY",
        "BUSY",
        "MOVED",
        "ASK",
        "NOSCRIPT",
        "WRONGTYPE",
    ]);
    // A replica's answer to a write (an old master after a failover): connect again at once.
    let wrong_node = starts(&["READONLY", "MASTERDOWN"]);
    let mapped = Error::new(kind, "redis (fred)")
        .set_store_answered(answered)
        .set_wrong_node(wrong_node)
        .with_source(e);
    if definite {
        mapped.set_definite(true)
    } else {
        mapped
    }
}
