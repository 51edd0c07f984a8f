//! [`RedisBackend`]: the `LockBackend` over whichever client library the config names.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use locker_core::{
    AcquireDecision, AcquireOutcome, BackendFactory, Capabilities, Error, ExtendOutcome,
    LockBackend, LockData, ProcessData, ReleaseOutcome, Result,
};

use crate::batch::{Batcher, Op};
use crate::config::{ClientLibrary, RedisConfig, WaitForReplicas};
use crate::keys::key_slot;
use crate::scripts::{
    open_record, owner_prefix, parse_record, parse_reply, Item, Reply, ScriptName,
};

/// The few things the backend needs from a client library: one script call, `GET`,
/// `SET ... PX` and `DEL`. Each implementation maps its errors with the crate's one mapping.
#[async_trait]
pub(crate) trait Driver: Send + Sync + fmt::Debug + 'static {
    /// Runs a script by SHA (loading it after `NOSCRIPT`) and returns its array of values.
    async fn eval(&self, script: ScriptName, keys: &[&str], args: &[&str]) -> Result<Vec<Item>>;
    /// [`eval`](Self::eval), then `WAIT replicas timeout` on the connection that carried the
    /// script (pipelined, to the node that serves `keys[0]`): the script's reply and the number
    /// of replicas that acknowledged the connection's writes.
    async fn eval_and_wait(
        &self,
        script: ScriptName,
        keys: &[&str],
        args: &[&str],
        wait: WaitForReplicas,
    ) -> Result<(Vec<Item>, u64)>;
    async fn get(&self, key: &str) -> Result<Option<String>>;
    /// `MGET` of keys on one slot (any keys on a standalone server).
    async fn mget(&self, keys: &[&str]) -> Result<Vec<Option<String>>>;
    async fn set_px(&self, key: &str, value: &str, ttl_ms: u64) -> Result<()>;
    async fn del(&self, key: &str) -> Result<()>;
    /// `PTTL`: milliseconds left, -2 for no key, -1 for a key without expiry.
    async fn pttl(&self, key: &str) -> Result<i64>;
    /// Whether [`subscriber`](Self::subscriber) can open pub/sub connections (standalone
    /// servers only).
    fn can_subscribe(&self) -> bool;
    /// A new pub/sub connection to the server; `None` when unsupported.
    async fn subscriber(&self) -> Result<Option<Box<dyn crate::notify::Subscriber>>>;
    /// The largest `cluster-node-timeout` of the cluster's primaries; `None` for a standalone
    /// server, or when `CONFIG GET` is refused (managed services rename or deny it).
    async fn cluster_node_timeout(&self) -> Option<Duration>;
}

/// How long a Redis Cluster failover of a master may take, from its `cluster-node-timeout`:
/// the node timeout until the master is flagged failing, about as long again for the flag to
/// reach a majority and a replica to be elected and promoted, and a second for the clients to
/// find the new master. (Measured with a 2 s node timeout: 2.9 to 4.8 s; this gives 5 s.)
pub(crate) fn failover_time(node_timeout: Duration) -> Duration {
    node_timeout * 2 + Duration::from_secs(1)
}

/// The milliseconds of a `CONFIG GET cluster-node-timeout` reply: `[name, value]`.
pub(crate) fn node_timeout_from_reply(pair: &[String]) -> Option<Duration> {
    match pair {
        [name, value] if name == "cluster-node-timeout" => {
            value.parse().ok().map(Duration::from_millis)
        }
        _ => None,
    }
}

/// A connection to Redis or a Redis Cluster, storing locks as the Node library does.
///
/// Made by [`RedisConfig`], which is the [`BackendFactory`]: `Locker::builder(config)`.
pub struct RedisBackend {
    config: RedisConfig,
    driver: Arc<dyn Driver>,
    /// Groups concurrent script calls (not in durable mode, whose `WAIT` follows each call).
    batcher: Option<Arc<Batcher>>,
    failover_time: Option<Duration>,
    /// The liveness keys' common prefix, for the acquire script to look at a holder's
    /// liveness record; `None` on a cluster whose key prefix has no hash tag (a liveness key
    /// would then be on another slot than the lock).
    liveness_prefix: Option<String>,
    /// Release notifications, started at the first wait (standalone servers).
    notifier: std::sync::OnceLock<crate::notify::Notifier>,
}

impl RedisBackend {
    /// Connects with the configured client library.
    ///
    /// # Errors
    /// A retryable [`ErrorKind::Unavailable`](locker_core::ErrorKind::Unavailable) or
    /// [`ErrorKind::Timeout`](locker_core::ErrorKind::Timeout) when no server answers within the
    /// connect timeout; [`ErrorKind::Auth`](locker_core::ErrorKind::Auth) for refused
    /// credentials; a non-retryable
    /// [`ErrorKind::InvalidInput`](locker_core::ErrorKind::InvalidInput) for a server older
    /// than Redis 5.0 (the standalone server, or any primary of a cluster) or one that reports
    /// no readable `redis_version`, naming the version found and the minimum.
    pub async fn connect(config: &RedisConfig) -> Result<Self> {
        let driver: Arc<dyn Driver> = match config.client {
            #[cfg(feature = "redis")]
            ClientLibrary::Redis => {
                Arc::new(crate::driver_redis::RedisDriver::connect(config).await?)
            }
            #[cfg(feature = "fred")]
            ClientLibrary::Fred => Arc::new(crate::driver_fred::FredDriver::connect(config).await?),
        };
        let failover_time = if config.is_cluster() {
            driver.cluster_node_timeout().await.map(failover_time)
        } else {
            None
        };
        let liveness_prefix =
            (!config.is_cluster() || config.keys.prefix_tagged()).then(|| config.keys.process(""));
        let batcher = config
            .wait_for_replicas
            .is_none()
            .then(|| Batcher::new(driver.clone()));
        Ok(RedisBackend {
            config: config.clone(),
            driver,
            batcher,
            failover_time,
            liveness_prefix,
            notifier: std::sync::OnceLock::new(),
        })
    }

    /// The configuration this connection was made with.
    pub fn config(&self) -> &RedisConfig {
        &self.config
    }

    /// Reads a raw value (any key, prefixed by nothing): for tests and tools.
    #[doc(hidden)]
    pub async fn raw_get(&self, key: &str) -> Result<Option<String>> {
        self.driver.get(key).await
    }

    /// Writes a raw value with a TTL (any key, prefixed by nothing): for tests and tools.
    #[doc(hidden)]
    pub async fn raw_set(&self, key: &str, value: &str, ttl: Duration) -> Result<()> {
        self.driver.set_px(key, value, ttl_ms(ttl)?).await
    }

    /// The full key of the lock of `key` (with the prefix), as the Node library names it.
    pub fn lock_key(&self, key: &str) -> String {
        self.config.keys.lock(key)
    }

    /// The full key of the liveness record of a process.
    pub fn process_key(&self, process_hash: &str) -> String {
        self.config.keys.process(process_hash)
    }

    /// Runs a script on `lock_key` (grouped with concurrent calls of the same slot).
    async fn eval(
        &self,
        script: ScriptName,
        lock_key: String,
        counter: Option<String>,
        args: Vec<String>,
    ) -> Result<Vec<Item>> {
        let group = if self.config.is_cluster() {
            key_slot(lock_key.as_bytes())
        } else {
            0
        };
        let mut keys = Vec::with_capacity(2);
        keys.push(lock_key);
        keys.extend(counter);
        let op = Op { script, keys, args };
        match &self.batcher {
            Some(batcher) => batcher.run(group, op).await,
            None => crate::batch::call(&*self.driver, &op).await,
        }
    }

    /// Runs the acquire or take-over script: one call, `WAIT` after it in durable mode.
    async fn create(
        &self,
        key: &str,
        data: &LockData,
        ttl: Duration,
        how: Create<'_>,
    ) -> Result<AcquireDecision> {
        let ttl = ttl_ms(ttl)?.to_string();
        let record = open_record(data, ",\"fencingToken\":");
        let lock = self.config.keys.lock(key);
        let fence = self.config.keys.fence(&lock);
        let mut args = Vec::with_capacity(3);
        args.extend([record, ttl]);
        let script = match how {
            Create::Acquire => {
                args.push(String::new());
                ScriptName::Acquire
            }
            Create::Checked => {
                args.push(self.liveness_prefix.clone().unwrap_or_default());
                ScriptName::Acquire
            }
            Create::TakeOver(dead_owner) => {
                args.push(owner_prefix(dead_owner));
                ScriptName::TakeOver
            }
        };
        let stored = |token| LockData {
            fencing_token: Some(token),
            ..data.clone()
        };
        let decide = |reply| -> Result<AcquireDecision> {
            Ok(match parse_reply(key, reply)? {
                Reply::Acquired(token) => AcquireDecision::Acquired(stored(token)),
                Reply::TookOver(token, json) => AcquireDecision::TookOver {
                    stored: stored(token),
                    dead: parse_record(key, &json)?,
                },
                Reply::Live(json) => AcquireDecision::HeldByLive(parse_record(key, &json)?),
                Reply::Held(json) => AcquireDecision::Held(parse_record(key, &json)?),
                other => return Err(unexpected(key, &other)),
            })
        };
        let Some(wait) = self.config.wait_for_replicas else {
            let reply = self.eval(script, lock, Some(fence), args).await?;
            return decide(reply);
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (reply, acked) = self
            .driver
            .eval_and_wait(script, &[&lock, &fence], &args, wait)
            .await?;
        let outcome = decide(reply)?;
        let replayed = match &outcome {
            AcquireDecision::Acquired(_) | AcquireDecision::TookOver { .. }
                if acked >= u64::from(wait.replicas) =>
            {
                return Ok(outcome)
            }
            AcquireDecision::Acquired(_) | AcquireDecision::TookOver { .. } => false,
            // This owner's record, found by a resent acquire (the `redis` crate resends a
            // cluster pipeline after a lost connection; a `Locker` takes it as acquired). The
            // first send wrote it, on a connection that is gone: this `WAIT` did not count that
            // write, so nothing says it is durable.
            AcquireDecision::Held(holder) | AcquireDecision::HeldByLive(holder)
                if holder.owner_hash == data.owner_hash =>
            {
                true
            }
            // Nothing written.
            AcquireDecision::Held(_) | AcquireDecision::HeldByLive(_) => return Ok(outcome),
        };
        // Granted on the master, not known to be on any replica that a failover would promote:
        // not a lock to hand out. Undo it now (the caller may retry at once), if still ours; a
        // `Locker` also undoes a failed acquire in the background, which covers a failure here.
        let undone = match self.release(key, &data.owner_hash).await {
            Ok(_) => "it was released",
            Err(_) => "releasing it failed too (a `Locker` keeps trying in the background)",
        };
        if replayed {
            return Err(Error::unavailable(format!(
                "the lock was written on the master by an acquire sent again after a lost \
                 connection, and WAIT cannot vouch for the first write; {undone}; try again"
            ))
            .with_key(key));
        }
        Err(not_acknowledged(key, wait, acked, "lock", undone))
    }
}

/// The most keys one `MGET` of a standalone server carries.
const MGET_CHUNK: usize = 1000;

/// What a create script does about a held key.
#[derive(Debug, Clone, Copy)]
enum Create<'a> {
    /// Answers `Held`.
    Acquire,
    /// Looks at the holder's liveness record, and takes a dead holder's lock over.
    Checked,
    /// Replaces the lock of this owner.
    TakeOver(&'a str),
}

/// The answer of `acquire` or `take_over`, from a decision that did not look at liveness.
fn plain(decision: AcquireDecision) -> AcquireOutcome {
    match decision {
        AcquireDecision::Acquired(stored) | AcquireDecision::TookOver { stored, .. } => {
            AcquireOutcome::Acquired(stored)
        }
        AcquireDecision::Held(holder) | AcquireDecision::HeldByLive(holder) => {
            AcquireOutcome::Held(holder)
        }
    }
}

/// The retryable error of a durable write that too few replicas acknowledged in time.
fn not_acknowledged(key: &str, wait: WaitForReplicas, acked: u64, what: &str, then: &str) -> Error {
    Error::unavailable(format!(
        "the {what} was written on the master, but only {acked} of {} replicas acknowledged it \
         within {:?} (WAIT); {then}; try again",
        wait.replicas, wait.timeout
    ))
    // The master answered WAIT: the connection works (see `Error::store_answered`).
    .set_store_answered(true)
    .with_key(key)
}

fn unexpected(key: &str, reply: &Reply) -> Error {
    Error::new(
        locker_core::ErrorKind::Other,
        format!("unexpected script reply {reply:?}"),
    )
    .with_key(key)
}

/// A TTL in whole milliseconds (rounded up), refusing zero and absurd values.
pub(crate) fn ttl_ms(ttl: Duration) -> Result<u64> {
    if ttl.is_zero() {
        return Err(Error::invalid_input("TTL must be greater than zero"));
    }
    let ms = ttl.as_nanos().div_ceil(1_000_000);
    // Redis keeps expiry times as milliseconds since the epoch in a signed 64-bit integer;
    // a century is far past any lock and far below that.
    u64::try_from(ms)
        .ok()
        .filter(|ms| *ms <= 100 * 365 * 24 * 3600 * 1000)
        .ok_or_else(|| Error::invalid_input(format!("TTL of {ttl:?} is too long")))
}

#[async_trait]
impl LockBackend for RedisBackend {
    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::default();
        c.fencing = true;
        c.ttl_granularity = Duration::from_millis(1);
        c.shared_across_processes = true;
        c.atomic_take_over = true;
        c.failover_time = self.failover_time;
        c.checked_acquire = self.liveness_prefix.is_some();
        c.release_events = self.driver.can_subscribe();
        c
    }

    async fn acquire(&self, key: &str, data: &LockData, ttl: Duration) -> Result<AcquireOutcome> {
        self.create(key, data, ttl, Create::Acquire)
            .await
            .map(plain)
    }

    async fn acquire_checked(
        &self,
        key: &str,
        data: &LockData,
        ttl: Duration,
    ) -> Result<AcquireDecision> {
        match &self.liveness_prefix {
            Some(_) => self.create(key, data, ttl, Create::Checked).await,
            None => self.create(key, data, ttl, Create::Acquire).await,
        }
    }

    async fn extend(
        &self,
        key: &str,
        data: &LockData,
        ttl: Duration,
        owner_hash: &str,
    ) -> Result<ExtendOutcome> {
        let ttl = ttl_ms(ttl)?.to_string();
        let args = vec![open_record(data, ""), ttl, owner_prefix(owner_hash)];
        let lock = self.config.keys.lock(key);
        let (reply, acked) = match self.config.wait_for_replicas {
            None => (self.eval(ScriptName::Extend, lock, None, args).await?, None),
            Some(wait) => {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let (reply, acked) = self
                    .driver
                    .eval_and_wait(ScriptName::Extend, &[&lock], &args, wait)
                    .await?;
                (reply, Some((wait, acked)))
            }
        };
        match parse_reply(key, reply)? {
            Reply::Extended(token) => {
                if let Some((wait, acked)) = acked {
                    if acked < u64::from(wait.replicas) {
                        // Still this owner's on the master, extended; the heartbeat retries.
                        return Err(not_acknowledged(
                            key,
                            wait,
                            acked,
                            "extension",
                            "the lock stays held",
                        ));
                    }
                }
                Ok(ExtendOutcome::Extended(LockData {
                    fencing_token: token,
                    ..data.clone()
                }))
            }
            Reply::NoKey => Ok(ExtendOutcome::NoKey),
            Reply::Held(json) => Ok(ExtendOutcome::Held(parse_record(key, &json)?)),
            other => Err(unexpected(key, &other)),
        }
    }

    async fn release(&self, key: &str, owner_hash: &str) -> Result<ReleaseOutcome> {
        let args = vec![owner_prefix(owner_hash)];
        let lock = self.config.keys.lock(key);
        // The waiters' flag, deleted with the lock: the script publishes only if it was there.
        let waiters = self
            .config
            .release_events
            .then(|| self.config.keys.waiters(&lock));
        let reply = self.eval(ScriptName::Release, lock, waiters, args).await?;
        match parse_reply(key, reply)? {
            Reply::Released => Ok(ReleaseOutcome::Released),
            Reply::NoKey => Ok(ReleaseOutcome::NoKey),
            Reply::Held(json) => Ok(ReleaseOutcome::Held(parse_record(key, &json)?)),
            other => Err(unexpected(key, &other)),
        }
    }

    async fn take_over(
        &self,
        key: &str,
        data: &LockData,
        ttl: Duration,
        dead_owner_hash: &str,
    ) -> Result<AcquireOutcome> {
        self.create(key, data, ttl, Create::TakeOver(dead_owner_hash))
            .await
            .map(plain)
    }

    async fn ping(&self, process_hash: &str, data: &ProcessData, ttl: Duration) -> Result<()> {
        let ttl = ttl_ms(ttl)?;
        self.driver
            .set_px(
                &self.config.keys.process(process_hash),
                &data.to_json(),
                ttl,
            )
            .await
    }

    async fn read(&self, key: &str) -> Result<Option<LockData>> {
        match self.driver.get(&self.config.keys.lock(key)).await? {
            // The Node library treats an empty value as no lock.
            Some(json) if !json.is_empty() => parse_record(key, &json).map(Some),
            _ => Ok(None),
        }
    }

    async fn read_many(&self, keys: &[&str]) -> Result<Vec<Result<Option<LockData>>>> {
        // One `MGET` per slot on a cluster (at once), per thousand keys on a server.
        let mut groups: std::collections::BTreeMap<u16, Vec<usize>> = Default::default();
        let full: Vec<String> = keys.iter().map(|k| self.config.keys.lock(k)).collect();
        for (i, key) in full.iter().enumerate() {
            let group = if self.config.is_cluster() {
                key_slot(key.as_bytes())
            } else {
                u16::try_from(i / MGET_CHUNK).unwrap_or(u16::MAX)
            };
            groups.entry(group).or_default().push(i);
        }
        let calls = groups.values().map(|indices| {
            let group_keys: Vec<&str> = indices.iter().map(|&i| full[i].as_str()).collect();
            async move { self.driver.mget(&group_keys).await }
        });
        let answers = futures::future::try_join_all(calls).await?;
        let mut records: Vec<Result<Option<LockData>>> = keys.iter().map(|_| Ok(None)).collect();
        for (indices, values) in groups.values().zip(answers) {
            if values.len() != indices.len() {
                return Err(Error::new(
                    locker_core::ErrorKind::Other,
                    format!(
                        "MGET answered {} values for {} keys",
                        values.len(),
                        indices.len()
                    ),
                ));
            }
            for (&i, value) in indices.iter().zip(values) {
                records[i] = match value {
                    // The Node library treats an empty value as no lock.
                    Some(json) if !json.is_empty() => parse_record(keys[i], &json).map(Some),
                    _ => Ok(None),
                };
            }
        }
        Ok(records)
    }

    async fn read_process(&self, process_hash: &str) -> Result<Option<ProcessData>> {
        match self
            .driver
            .get(&self.config.keys.process(process_hash))
            .await?
        {
            Some(json) if !json.is_empty() => ProcessData::from_json(&json).map(Some),
            _ => Ok(None),
        }
    }

    async fn forget_process(&self, process_hash: &str) -> Result<()> {
        self.driver
            .del(&self.config.keys.process(process_hash))
            .await
    }

    async fn watch_release(&self, key: &str) -> Result<Option<locker_core::ReleaseWatch>> {
        if !self.driver.can_subscribe() {
            return Ok(None);
        }
        let notifier = self.notifier.get_or_init(|| {
            crate::notify::Notifier::start(
                self.driver.clone(),
                self.config.keys.clone(),
                self.config.command_timeout,
            )
        });
        notifier.watch(&self.config.keys.lock(key)).await
    }

    async fn liveness_left(&self, process_hash: &str) -> Result<Option<Duration>> {
        let ms = self
            .driver
            .pttl(&self.config.keys.process(process_hash))
            .await?;
        Ok(match ms {
            // No record.
            -2 => Some(Duration::ZERO),
            ms => u64::try_from(ms).ok().map(Duration::from_millis),
        })
    }
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("config", &self.config)
            .finish()
    }
}

#[async_trait]
impl BackendFactory for RedisConfig {
    async fn connect(&self) -> Result<Arc<dyn LockBackend>> {
        Ok(Arc::new(RedisBackend::connect(self).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_round_up_to_milliseconds() {
        assert_eq!(ttl_ms(Duration::from_micros(1)).expect("ok"), 1);
        assert_eq!(ttl_ms(Duration::from_micros(1500)).expect("ok"), 2);
        assert_eq!(ttl_ms(Duration::from_secs(2)).expect("ok"), 2000);
        assert!(ttl_ms(Duration::ZERO).is_err());
        assert!(ttl_ms(Duration::MAX).is_err());
    }

    #[test]
    fn the_failover_time_follows_the_node_timeout() {
        let pair = |n: &str, v: &str| vec![n.to_owned(), v.to_owned()];
        let timeout = node_timeout_from_reply(&pair("cluster-node-timeout", "15000"));
        assert_eq!(timeout, Some(Duration::from_secs(15)));
        assert_eq!(
            failover_time(Duration::from_secs(15)),
            Duration::from_secs(31)
        );
        assert_eq!(
            failover_time(Duration::from_secs(2)),
            Duration::from_secs(5)
        );
        assert_eq!(
            node_timeout_from_reply(&pair("cluster-node-timeout", "x")),
            None
        );
        assert_eq!(node_timeout_from_reply(&pair("maxmemory", "5")), None);
        assert_eq!(node_timeout_from_reply(&[]), None);
    }
}
