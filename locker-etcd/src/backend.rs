//! [`EtcdBackend`]: each record on a lease of its own TTL (rounded up to whole seconds), each
//! compare-and-set one transaction, fencing tokens from revisions.
//!
//! - acquire: one transaction "if the key does not exist, put it on the lease, else read it", on
//!   a lease kept from a lock this connection released, renewed (one keep-alive) at the same
//!   time; only when there is none, a new lease is granted first. A lease that was not used
//!   (the key is held) is kept for the next acquire: a try on a held key grants nothing;
//! - extend, of a lock this connection acquired: "if the key's creation revision is still the
//!   one this connection made, put the new record on the same lease", and the lease's renewal,
//!   at the same time (one round trip);
//! - release, of a lock this connection acquired: "if the key's creation revision is still
//!   ours, delete it, else read it" (one round trip); the lease, now without a key, is kept for
//!   the next acquire;
//! - extend and release of a lock acquired elsewhere (another connection, an earlier process):
//!   read, then "if the modification revision is unchanged, write" (and release revokes the
//!   lease);
//! - take-over: "if the dead owner's record is unchanged, delete it", then acquire, so that the
//!   new lock has a new creation revision;
//! - the fencing token is the key's creation revision, which only grows;
//! - a renewal is one message on the lease's keep-alive stream, kept open between renewals
//!   (for the spare leases and as many more), instead of a stream opened for each;
//! - a lock of `SLACK_FROM` (10 s) or more gets a lease one second longer than its TTL (rounded up
//!   to whole seconds), so that an acquire on a lease granted or renewed less than a second
//!   ago needs no renewal: the lease surely outlives the lock's whole TTL from the acquire.
//!   With many acquires a second, that is one renewal per lease per second instead of one per
//!   acquire. The price: such a lock, if its holder never releases it, stays up to two seconds
//!   past its TTL (one for the rounding, one for the slack), where shorter locks stay up to
//!   one.
//!
//! Liveness: the first write of a process grants a lease and puts the record on it; later
//! writes renew that lease (one keep-alive) and put the new record on it (two requests, the
//! fewest that both re-arm the TTL and store the record the caller gave). A lease that expired
//! while the process was cut off is replaced by a new one, never reused.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetResponse, KeyValue,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse,
    WatchFilterType, WatchOptions,
};
use locker_core::{
    is_definite_io_error, suspend_aware_now, validate_key, AcquireOutcome, BackendFactory,
    Capabilities, Error, ErrorKind, ExtendOutcome, LockBackend, LockData, ProcessData,
    ReleaseOutcome, Result,
};

use crate::config::EtcdConfig;
use crate::error::map_error;

/// A connection to an etcd cluster; made by [`EtcdConfig`], which is the [`BackendFactory`].
pub struct EtcdBackend {
    config: EtcdConfig,
    client: Client,
    /// The lease of each liveness record this connection keeps, with its TTL in seconds.
    process_leases: Mutex<HashMap<String, ProcessLease>>,
    /// The leases of the locks this connection acquired, and spare leases.
    lock_leases: Mutex<LockLeases>,
    /// An open keep-alive stream per lease renewed lately (up to [`MAX_KEPT_STREAMS`]), so
    /// that a renewal is one message on it instead of a new stream each time.
    streams: Mutex<HashMap<i64, KeptStream>>,
}

/// A lease's keep-alive stream, kept open between renewals. `etcd-client` binds a stream to
/// one lease, so each kept lease has its own.
struct KeptStream {
    keeper: LeaseKeeper,
    answers: LeaseKeepAliveStream,
}

impl KeptStream {
    /// Renews the lease once on the open stream: the TTL etcd gives it (0: it has expired),
    /// or `None` when the stream is broken. A renewal that is cancelled or fails leaves an
    /// answer unread or the stream closed, so the caller keeps the stream only after a whole
    /// request and answer.
    async fn renew(&mut self) -> Option<i64> {
        self.keeper.keep_alive().await.ok()?;
        let answer = self.answers.message().await.ok()??;
        Some(answer.ttl())
    }
}

/// Keep-alive streams kept open per connection (the spare leases and as many more); a lease
/// past that is renewed on a stream opened for the one renewal.
const MAX_KEPT_STREAMS: usize = 2 * MAX_SPARE_LEASES;

/// A lock lease, and a lower bound of its expiry: the time its last grant or renewal was
/// sent, plus its TTL, on the locker's clock of deadlines (which counts a suspend, as the
/// store's TTL does: see [`suspend_aware_now`]).
#[derive(Debug, Clone, Copy)]
struct Lease {
    id: i64,
    secs: i64,
    alive_until: Duration,
}

/// A lock this connection acquired: its incarnation (the key's creation revision) and lease.
#[derive(Debug, Clone)]
struct HeldLease {
    owner_hash: String,
    create_revision: i64,
    lease: Lease,
}

/// The lock leases of a connection. A released lock's lease has no key any more: it is kept
/// (up to [`MAX_SPARE_LEASES`]) for the next acquire, which renews it instead of granting a new
/// one (a grant is a write through the cluster's log; a renewal is answered by the leader).
#[derive(Debug, Default)]
struct LockLeases {
    /// By full lock key.
    held: HashMap<String, HeldLease>,
    spares: Vec<Lease>,
}

/// Spare leases kept per connection; more are revoked.
const MAX_SPARE_LEASES: usize = 64;

/// Held-lease entries past which expired ones are pruned (locks lost without a release).
const PRUNE_HELD_AT: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct ProcessLease {
    id: i64,
    ttl: i64,
}

/// How often a waiter asks again about a holder's lease in the lease's last second.
const ETCD_LAST_SECOND_STEP: Duration = Duration::from_millis(100);

/// Locks of this TTL or more get a second of slack on their lease (see the module's docs):
/// at most a tenth of their TTL.
pub(crate) const SLACK_FROM: Duration = Duration::from_secs(10);

/// The TTL of a lock's lease: its TTL in whole seconds, rounded up, and one more from
/// [`SLACK_FROM`].
fn lock_lease_secs(ttl: Duration) -> Result<i64> {
    let secs = ttl_secs(ttl)?;
    Ok(if ttl >= SLACK_FROM { secs + 1 } else { secs })
}

/// A TTL in whole seconds, rounded up (etcd's lease granularity).
fn ttl_secs(ttl: Duration) -> Result<i64> {
    if ttl.is_zero() {
        return Err(Error::invalid_input("TTL must be greater than zero"));
    }
    let secs = ttl.as_nanos().div_ceil(1_000_000_000);
    i64::try_from(secs)
        .ok()
        .filter(|s| *s <= 100 * 365 * 24 * 3600)
        .ok_or_else(|| Error::invalid_input(format!("TTL of {ttl:?} is too long")))
}

fn lock_from_kv(key: &str, kv: &KeyValue) -> Result<LockData> {
    let text = std::str::from_utf8(kv.value())
        .map_err(|_| Error::corrupt("the stored value is not UTF-8").with_key(key))?;
    let mut data = LockData::from_json(text).map_err(|e| e.with_key(key))?;
    data.fencing_token = u64::try_from(kv.create_revision()).ok();
    Ok(data)
}

fn first_kv(resp: &GetResponse) -> Option<&KeyValue> {
    resp.kvs().first()
}

/// The record as stored: the token is the key's creation revision, not part of the value.
fn stored(data: &LockData) -> String {
    LockData {
        fencing_token: None,
        ..data.clone()
    }
    .to_json()
}

impl EtcdBackend {
    /// Connects (authenticating when a user is set) and checks that the cluster answers, so
    /// that an unreachable cluster fails here, within the timeouts.
    pub async fn connect(config: &EtcdConfig) -> Result<Self> {
        let options = match &config.connect_options {
            Some(options) => options.clone(),
            None => {
                let mut options = ConnectOptions::new()
                    .with_connect_timeout(config.connect_timeout)
                    .with_timeout(config.command_timeout);
                if let Some((user, password)) = &config.user {
                    options = options.with_user(user.clone(), password.clone());
                }
                if config.tls {
                    let mut tls = TlsOptions::new();
                    if let Some(pem) = &config.ca_pem {
                        tls = tls.ca_certificate(Certificate::from_pem(pem));
                    }
                    options = options.with_tls(tls);
                }
                options
            }
        };
        // The client retries a member that refuses, since another may answer; when every
        // one refuses, that is the answer, and it comes in milliseconds.
        if config.client.is_none() {
            if let Some(e) = every_endpoint_refuses(&config.endpoints, config.connect_timeout).await
            {
                return Err(e);
            }
        }
        let connect = async {
            let mut client = match &config.client {
                Some(client) => client.clone(),
                None => Client::connect(&config.endpoints, Some(options))
                    .await
                    .map_err(map_error)?,
            };
            // The probe may be routed to a member that is down: like any request that was never
            // sent, it is tried again until a live member answers (bounded by the timeout below).
            let mut tries: u64 = 0;
            loop {
                tries += 1;
                match client.get(format!("{}probe", config.prefix), None).await {
                    Ok(_) => break,
                    Err(e) if never_sent(&e) => {
                        tokio::time::sleep(Duration::from_millis(5 * tries.min(10))).await;
                    }
                    Err(e) => return Err(map_error(e)),
                }
            }
            Ok::<_, Error>(client)
        };
        let client = tokio::time::timeout(config.connect_timeout * 2, connect)
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "no answer from {config} within {:?}",
                        config.connect_timeout * 2
                    ),
                )
            })??;
        Ok(EtcdBackend {
            config: config.clone(),
            client,
            process_leases: Mutex::new(HashMap::new()),
            lock_leases: Mutex::new(LockLeases::default()),
            streams: Mutex::new(HashMap::new()),
        })
    }

    fn lock_key(&self, key: &str) -> String {
        format!("{}lock/{key}", self.config.prefix)
    }

    fn process_key(&self, process_hash: &str) -> String {
        format!("{}proc/{process_hash}", self.config.prefix)
    }

    /// Runs one request, within the command timeout. A request that could not even connect
    /// (the member it was routed to is down) was never sent, so it is tried again until a live
    /// member takes it; the timeout bounds the whole.
    async fn call<T, F, Fut>(&self, request: F) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let attempts = async {
            let mut tries = 0;
            loop {
                tries += 1;
                match request(self.client.clone()).await {
                    // The balancer may pick the dead member again (it looks idle): keep trying,
                    // within the command timeout, until a live one takes the request.
                    Err(e) if never_sent(&e) => {
                        tokio::time::sleep(Duration::from_millis(5 * tries.min(10))).await;
                    }
                    other => return other.map_err(map_error),
                }
            }
        };
        match tokio::time::timeout(self.config.command_timeout, attempts).await {
            Ok(result) => result,
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "etcd did not answer within {:?}",
                    self.config.command_timeout
                ),
            )),
        }
    }

    async fn get(&self, full_key: &str) -> Result<Option<KeyValue>> {
        let resp = self
            .call(|mut c| {
                let key = full_key.to_owned();
                async move { c.get(key, None).await }
            })
            .await?;
        Ok(first_kv(&resp).cloned())
    }

    /// Revokes a lease, ignoring failures: an unrevoked lease only lives out its TTL.
    async fn revoke(&self, lease: i64) {
        self.take_stream(lease);
        if lease != 0 {
            let _ = self
                .call(|mut c| async move { c.lease_revoke(lease).await })
                .await;
        }
    }

    /// Renews a lease once, in one round trip; `false` when it has expired (etcd answers with
    /// a TTL of 0, or with a "lease not found" error, depending on the version and on how long
    /// ago it expired).
    ///
    /// The renewal goes on the lease's kept keep-alive stream when there is one. Otherwise a
    /// stream is opened, which sends the first renewal and waits for its answer (an answer with
    /// a TTL of 0 is the client's "lease not found" error), and is kept for the next renewal.
    /// A kept stream that fails is dropped, and the renewal is made on a new one; one that does
    /// not answer within the command timeout is dropped, and the renewal fails (`Timeout`).
    async fn renew(&self, lease: i64) -> Result<bool> {
        if let Some(mut kept) = self.take_stream(lease) {
            let answer = tokio::time::timeout(self.config.command_timeout, kept.renew()).await;
            match answer {
                Ok(Some(ttl)) if ttl > 0 => {
                    self.keep_stream(lease, kept);
                    return Ok(true);
                }
                Ok(Some(_)) => return Ok(false),
                // Broken (the member it reached went away, say): a new stream below.
                Ok(None) => {}
                // No answer within the whole budget of a call: the stream is dropped, and the
                // call fails as any request without an answer.
                Err(_) => {
                    return Err(Error::new(
                        ErrorKind::Timeout,
                        format!(
                            "etcd did not answer a lease renewal within {:?}",
                            self.config.command_timeout
                        ),
                    ))
                }
            }
        }
        let opened = self
            .call(|mut c| async move {
                match c.lease_keep_alive(lease).await {
                    Ok((keeper, answers)) => Ok(Some(KeptStream { keeper, answers })),
                    Err(e) if lease_not_found(&e) => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .await?;
        match opened {
            Some(kept) => {
                self.keep_stream(lease, kept);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn streams(&self) -> std::sync::MutexGuard<'_, HashMap<i64, KeptStream>> {
        self.streams
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The lease's kept stream, for one renewal: whoever renews holds it alone meanwhile.
    fn take_stream(&self, lease: i64) -> Option<KeptStream> {
        self.streams().remove(&lease)
    }

    /// Keeps a stream after a whole renewal on it. When enough are kept, streams of leases that
    /// are neither spare nor held any more go first (locks lost without a release); if none,
    /// this one is closed.
    fn keep_stream(&self, lease: i64, kept: KeptStream) {
        if self.streams().len() >= MAX_KEPT_STREAMS {
            // Never both locks at once: the lease list is read first, then the streams pruned.
            let in_use: std::collections::HashSet<i64> = {
                let leases = self.leases();
                let held = leases.held.values().map(|h| h.lease.id);
                leases.spares.iter().map(|l| l.id).chain(held).collect()
            };
            self.streams().retain(|id, _| in_use.contains(id));
        }
        let mut streams = self.streams();
        if streams.len() < MAX_KEPT_STREAMS {
            streams.insert(lease, kept);
        }
    }

    async fn grant(&self, secs: i64) -> Result<i64> {
        Ok(self
            .call(|mut c| async move { c.lease_grant(secs, None).await })
            .await?
            .id())
    }

    async fn txn(&self, txn: Txn) -> Result<etcd_client::TxnResponse> {
        self.call(|mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await
    }

    async fn put_on_lease(&self, full_key: &str, value: String, lease: i64) -> Result<()> {
        self.call(|mut c| {
            let (key, value) = (full_key.to_owned(), value.clone());
            async move {
                c.put(key, value, Some(PutOptions::new().with_lease(lease)))
                    .await
            }
        })
        .await?;
        Ok(())
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, LockLeases> {
        self.lock_leases
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A spare lease of `secs` that should still be alive, if one is kept.
    fn take_spare(&self, secs: i64) -> Option<Lease> {
        let soon = suspend_aware_now() + Duration::from_secs(1);
        let mut leases = self.leases();
        // Spares that expire within a second are not worth a renewal: they go.
        leases.spares.retain(|l| l.alive_until > soon);
        let at = leases.spares.iter().rposition(|l| l.secs == secs)?;
        Some(leases.spares.swap_remove(at))
    }

    /// Keeps a lease that has no key for the next acquire (or revokes it if enough are kept).
    fn keep_spare(&self, lease: Lease) {
        let mut leases = self.leases();
        if leases.spares.len() < MAX_SPARE_LEASES {
            leases.spares.push(lease);
        } else {
            drop(leases);
            self.revoke_later(lease.id);
        }
    }

    fn remember_held(&self, full: &str, held: HeldLease) {
        let mut leases = self.leases();
        if leases.held.len() >= PRUNE_HELD_AT {
            let now = suspend_aware_now();
            leases.held.retain(|_, h| h.lease.alive_until > now);
        }
        leases.held.insert(full.to_owned(), held);
    }

    /// The lease of the lock under `full` if this connection acquired it for `owner_hash`.
    fn held_by(&self, full: &str, owner_hash: &str) -> Option<HeldLease> {
        self.leases()
            .held
            .get(full)
            .filter(|h| h.owner_hash == owner_hash)
            .cloned()
    }

    /// Forgets the lock under `full` if it is still the incarnation `held` (another task of
    /// this connection may have acquired the key again meanwhile).
    fn forget_held(&self, full: &str, held: &HeldLease) {
        let mut leases = self.leases();
        if leases
            .held
            .get(full)
            .is_some_and(|h| h.create_revision == held.create_revision)
        {
            leases.held.remove(full);
        }
    }

    /// Revokes a lease in the background (the caller does not wait for it).
    fn revoke_later(&self, lease: i64) {
        self.take_stream(lease);
        let mut client = self.client.clone();
        let limit = self.config.command_timeout;
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = tokio::time::timeout(limit, client.lease_revoke(lease)).await;
            });
        }
    }

    async fn create(&self, key: &str, data: &LockData, ttl: Duration) -> Result<AcquireOutcome> {
        let full = self.lock_key(key);
        let secs = lock_lease_secs(ttl)?;
        let attempt = |lease: i64| {
            Txn::new()
                .when([Compare::create_revision(full.as_str(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    full.as_str(),
                    stored(data),
                    Some(PutOptions::new().with_lease(lease)),
                )])
                .or_else([TxnOp::get(full.as_str(), None)])
        };
        // A kept lease, renewed while the transaction runs: one round trip. One granted or
        // renewed lately enough to outlive this lock's whole TTL from now (a lease with slack,
        // within its first second) is not renewed: the transaction alone.
        while let Some(spare) = self.take_spare(secs) {
            let sent = suspend_aware_now();
            let (renewed, answer) = if spare.alive_until >= sent + ttl {
                (Ok(Some(spare)), self.txn(attempt(spare.id)).await)
            } else {
                let (renewed, answer) =
                    tokio::join!(self.renew(spare.id), self.txn(attempt(spare.id)));
                let renewed = renewed.map(|alive| {
                    alive.then_some(Lease {
                        alive_until: sent + Duration::from_secs(secs.unsigned_abs()),
                        ..spare
                    })
                });
                (renewed, answer)
            };
            match (renewed, answer) {
                // Held: the lease was not used; kept if it was renewed.
                (renewed, Ok(resp)) if !resp.succeeded() => {
                    if let Ok(Some(lease)) = renewed {
                        self.keep_spare(lease);
                    }
                    return self.held_answer(key, &resp);
                }
                (Ok(Some(lease)), Ok(resp)) => return self.created(key, &full, data, lease, &resp),
                // The lease had expired, and the put was refused: the next spare, or a grant.
                (_, Err(e)) if lease_gone(&e) => continue,
                // Put, on a lease that expired right after: the key went with it.
                (Ok(None), Ok(_)) => {
                    return Err(Error::unavailable(
                        "the lock's lease expired during the acquire; try again",
                    ))
                }
                // Put but not surely renewed (the key might not live its whole TTL), or not
                // known to be put: revoking the lease deletes the key, if it is there.
                (Err(e), Ok(_)) | (_, Err(e)) => {
                    self.revoke(spare.id).await;
                    return Err(e);
                }
            }
        }
        let sent = suspend_aware_now();
        let id = self.grant(secs).await?;
        let lease = Lease {
            id,
            secs,
            alive_until: sent + Duration::from_secs(secs.unsigned_abs()),
        };
        match self.txn(attempt(id)).await {
            Ok(resp) => self.created(key, &full, data, lease, &resp),
            Err(e) => {
                self.revoke(id).await;
                Err(e)
            }
        }
    }

    /// The answer of an acquire's transaction on `lease`: the lock stored on it (remembered
    /// for this connection's extend and release), or the holder (the lease is kept).
    fn created(
        &self,
        key: &str,
        full: &str,
        data: &LockData,
        lease: Lease,
        resp: &etcd_client::TxnResponse,
    ) -> Result<AcquireOutcome> {
        if resp.succeeded() {
            let revision = resp.header().map(|h| h.revision()).unwrap_or_default();
            self.remember_held(
                full,
                HeldLease {
                    owner_hash: data.owner_hash.clone(),
                    create_revision: revision,
                    lease,
                },
            );
            let mut stored = data.clone();
            stored.fencing_token = u64::try_from(revision).ok();
            return Ok(AcquireOutcome::Acquired(stored));
        }
        self.keep_spare(lease);
        self.held_answer(key, resp)
    }

    /// Extends a lock this connection acquired: "if its creation revision is still ours, put
    /// the record on its lease", and the lease's renewal, at once. `None` when the answer is
    /// not clear-cut (the caller then reads and decides).
    async fn extend_held(
        &self,
        key: &str,
        full: &str,
        data: &LockData,
        held: HeldLease,
    ) -> Result<Option<ExtendOutcome>> {
        let txn = Txn::new()
            .when([Compare::create_revision(
                full,
                CompareOp::Equal,
                held.create_revision,
            )])
            .and_then([TxnOp::put(
                full,
                stored(data),
                Some(PutOptions::new().with_lease(held.lease.id)),
            )])
            .or_else([TxnOp::get(full, None)]);
        let sent = suspend_aware_now();
        let (renewed, answer) = tokio::join!(self.renew(held.lease.id), self.txn(txn));
        let resp = match answer {
            Ok(resp) => resp,
            // The lease expired: the lock went with it; whether someone holds it now is read.
            Err(e) if lease_gone(&e) => {
                self.forget_held(full, &held);
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        if !resp.succeeded() {
            self.forget_held(full, &held);
            return Ok(match held_kv(resp.op_responses()) {
                None => Some(ExtendOutcome::NoKey),
                Some(kv) => {
                    let current = lock_from_kv(key, &kv)?;
                    (current.owner_hash != held.owner_hash).then_some(ExtendOutcome::Held(current))
                }
            });
        }
        match renewed? {
            true => {
                let lease = Lease {
                    alive_until: sent + Duration::from_secs(held.lease.secs.unsigned_abs()),
                    ..held.lease
                };
                if let Some(entry) = self
                    .leases()
                    .held
                    .get_mut(full)
                    .filter(|h| h.create_revision == held.create_revision)
                {
                    entry.lease = lease;
                }
                let mut stored = data.clone();
                stored.fencing_token = u64::try_from(held.create_revision).ok();
                Ok(Some(ExtendOutcome::Extended(stored)))
            }
            // Rewritten on a lease that then expired: the key is gone with it.
            false => {
                self.forget_held(full, &held);
                Ok(Some(ExtendOutcome::NoKey))
            }
        }
    }

    /// Releases a lock this connection acquired: "if its creation revision is still ours,
    /// delete it, else read it". The lease, without a key now, is kept for the next acquire.
    /// `None` when the answer is not clear-cut.
    async fn release_held(
        &self,
        key: &str,
        full: &str,
        held: HeldLease,
    ) -> Result<Option<ReleaseOutcome>> {
        let txn = Txn::new()
            .when([Compare::create_revision(
                full,
                CompareOp::Equal,
                held.create_revision,
            )])
            .and_then([TxnOp::delete(full, None)])
            .or_else([TxnOp::get(full, None)]);
        let resp = self.txn(txn).await?;
        self.forget_held(full, &held);
        if resp.succeeded() {
            self.keep_spare(held.lease);
            return Ok(Some(ReleaseOutcome::Released));
        }
        // Not ours any more: its lease has no key, or is gone; it is not kept.
        self.revoke_later(held.lease.id);
        Ok(match held_kv(resp.op_responses()) {
            None => Some(ReleaseOutcome::NoKey),
            Some(kv) => {
                let current = lock_from_kv(key, &kv)?;
                (current.owner_hash != held.owner_hash).then_some(ReleaseOutcome::Held(current))
            }
        })
    }

    fn held_answer(&self, key: &str, resp: &etcd_client::TxnResponse) -> Result<AcquireOutcome> {
        match held_kv(resp.op_responses()) {
            Some(kv) => Ok(AcquireOutcome::Held(lock_from_kv(key, &kv)?)),
            // Deleted between the two branches' evaluation: the caller tries again.
            None => Err(Error::unavailable(
                "the lock changed during the acquire; try again",
            )),
        }
    }
}

/// A request that failed before reaching any server (connection refused or reset while
/// connecting): safe to send again.
/// A definite error (see [`Error::is_definite`]) when no endpoint can be reached at all: each
/// one refuses a TCP connection, does not resolve, or is unreachable. `None` as soon as one
/// accepts, or does not answer within `limit` (then the client's own timeouts apply).
async fn every_endpoint_refuses(endpoints: &[String], limit: Duration) -> Option<Error> {
    let mut failures = Vec::with_capacity(endpoints.len());
    for endpoint in endpoints {
        let without_scheme = endpoint
            .split_once("://")
            .map_or(&**endpoint, |(_, rest)| rest);
        let address = without_scheme.split('/').next().unwrap_or(without_scheme);
        if endpoint.starts_with("unix") || address.is_empty() {
            return None;
        }
        match tokio::time::timeout(limit, tokio::net::TcpStream::connect(address)).await {
            Ok(Err(io)) if is_definite_io_error(&io) => failures.push((address, io)),
            _ => return None,
        }
    }
    let all_refused = failures
        .iter()
        .all(|(_, io)| io.kind() == std::io::ErrorKind::ConnectionRefused);
    let addresses = failures
        .iter()
        .map(|(a, _)| *a)
        .collect::<Vec<_>>()
        .join(", ");
    let (_, first) = failures.into_iter().next()?;
    let message = if all_refused {
        format!("etcd: connection refused by {addresses}")
    } else {
        format!("etcd: cannot connect to {addresses}")
    };
    Some(
        Error::unavailable(message)
            .with_source(first)
            .set_definite(true),
    )
}

fn never_sent(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(status) => {
            status.code() == tonic::Code::Unavailable && status.message().contains("connect")
        }
        _ => false,
    }
}

/// Operations per transaction of `read_many` (etcd's default `--max-txn-ops` is 128).
const TXN_OPS: usize = 128;

fn held_kv(ops: Vec<TxnOpResponse>) -> Option<KeyValue> {
    ops.into_iter().find_map(|op| match op {
        TxnOpResponse::Get(get) => first_kv(&get).cloned(),
        _ => None,
    })
}

#[async_trait]
impl LockBackend for EtcdBackend {
    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::default();
        c.fencing = true;
        c.ttl_granularity = Duration::from_secs(1);
        c.shared_across_processes = true;
        c.atomic_take_over = false;
        c.release_events = true;
        c
    }

    async fn acquire(&self, key: &str, data: &LockData, ttl: Duration) -> Result<AcquireOutcome> {
        validate_key(key)?;
        self.create(key, data, ttl).await
    }

    async fn extend(
        &self,
        key: &str,
        data: &LockData,
        ttl: Duration,
        owner_hash: &str,
    ) -> Result<ExtendOutcome> {
        validate_key(key)?;
        let secs = lock_lease_secs(ttl)?;
        let full = self.lock_key(key);
        if let Some(held) = self
            .held_by(&full, owner_hash)
            .filter(|h| h.lease.secs == secs)
        {
            if let Some(outcome) = self.extend_held(key, &full, data, held).await? {
                return Ok(outcome);
            }
        }
        for _ in 0..5 {
            let Some(kv) = self.get(&full).await? else {
                return Ok(ExtendOutcome::NoKey);
            };
            let current = lock_from_kv(key, &kv)?;
            if current.owner_hash != owner_hash {
                return Ok(ExtendOutcome::Held(current));
            }
            // The lease carries the TTL: renew it, then rewrite the record on it.
            if !self.renew(kv.lease()).await? {
                return Ok(ExtendOutcome::NoKey);
            }
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    full.as_str(),
                    CompareOp::Equal,
                    kv.mod_revision(),
                )])
                .and_then([TxnOp::put(
                    full.as_str(),
                    stored(data),
                    Some(PutOptions::new().with_lease(kv.lease())),
                )]);
            if self.txn(txn).await?.succeeded() {
                let mut stored = data.clone();
                stored.fencing_token = current.fencing_token;
                return Ok(ExtendOutcome::Extended(stored));
            }
        }
        Err(Error::unavailable(
            "the lock kept changing during the extension; try again",
        ))
    }

    async fn release(&self, key: &str, owner_hash: &str) -> Result<ReleaseOutcome> {
        validate_key(key)?;
        let full = self.lock_key(key);
        if let Some(held) = self.held_by(&full, owner_hash) {
            if let Some(outcome) = self.release_held(key, &full, held).await? {
                return Ok(outcome);
            }
        }
        for _ in 0..5 {
            let Some(kv) = self.get(&full).await? else {
                return Ok(ReleaseOutcome::NoKey);
            };
            let current = lock_from_kv(key, &kv)?;
            if current.owner_hash != owner_hash {
                return Ok(ReleaseOutcome::Held(current));
            }
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    full.as_str(),
                    CompareOp::Equal,
                    kv.mod_revision(),
                )])
                .and_then([TxnOp::delete(full.as_str(), None)]);
            if self.txn(txn).await?.succeeded() {
                self.revoke(kv.lease()).await;
                return Ok(ReleaseOutcome::Released);
            }
        }
        Err(Error::unavailable(
            "the lock kept changing during the release; try again",
        ))
    }

    async fn take_over(
        &self,
        key: &str,
        data: &LockData,
        ttl: Duration,
        dead_owner_hash: &str,
    ) -> Result<AcquireOutcome> {
        validate_key(key)?;
        let full = self.lock_key(key);
        if let Some(kv) = self.get(&full).await? {
            let current = lock_from_kv(key, &kv)?;
            if current.owner_hash != dead_owner_hash {
                return Ok(AcquireOutcome::Held(current));
            }
            // Delete the dead owner's record only if it is unchanged; a new record gets a new
            // creation revision, hence a greater fencing token.
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    full.as_str(),
                    CompareOp::Equal,
                    kv.mod_revision(),
                )])
                .and_then([TxnOp::delete(full.as_str(), None)]);
            if self.txn(txn).await?.succeeded() {
                self.revoke(kv.lease()).await;
            }
        }
        self.create(key, data, ttl).await
    }

    async fn ping(&self, process_hash: &str, data: &ProcessData, ttl: Duration) -> Result<()> {
        let secs = ttl_secs(ttl)?;
        let full = self.process_key(process_hash);
        let known = self
            .process_leases
            .lock()
            .ok()
            .and_then(|m| m.get(process_hash).copied());
        if let Some(lease) = known.filter(|l| l.ttl == secs) {
            if self.renew(lease.id).await? {
                self.put_on_lease(&full, data.to_json(), lease.id).await?;
                return Ok(());
            }
            // The lease expired (the process was cut off for a whole TTL): never reuse it.
            tracing::warn!(process_hash, "liveness lease expired; granting a new one");
        }
        let id = self.grant(secs).await?;
        let put = self.put_on_lease(&full, data.to_json(), id).await;
        if let Err(e) = put {
            self.revoke(id).await;
            return Err(e);
        }
        let previous =
            self.process_leases.lock().ok().and_then(|mut m| {
                m.insert(process_hash.to_owned(), ProcessLease { id, ttl: secs })
            });
        if let Some(old) = previous {
            self.revoke(old.id).await;
        }
        Ok(())
    }

    async fn read(&self, key: &str) -> Result<Option<LockData>> {
        validate_key(key)?;
        match self.get(&self.lock_key(key)).await? {
            Some(kv) => lock_from_kv(key, &kv).map(Some),
            None => Ok(None),
        }
    }

    async fn read_many(&self, keys: &[&str]) -> Result<Vec<Result<Option<LockData>>>> {
        let mut records: Vec<Result<Option<LockData>>> = Vec::with_capacity(keys.len());
        for key in keys {
            records.push(validate_key(key).map(|()| None));
        }
        let wanted: Vec<usize> = (0..keys.len()).filter(|&i| records[i].is_ok()).collect();
        // One transaction of reads per chunk (etcd takes 128 operations per transaction by
        // default), all at once.
        let calls = wanted.chunks(TXN_OPS).map(|chunk| {
            let gets: Vec<TxnOp> = chunk
                .iter()
                .map(|&i| TxnOp::get(self.lock_key(keys[i]), None))
                .collect();
            self.txn(Txn::new().and_then(gets))
        });
        let answers = futures::future::try_join_all(calls).await?;
        for (chunk, answer) in wanted.chunks(TXN_OPS).zip(answers) {
            let ops = answer.op_responses();
            if ops.len() != chunk.len() {
                return Err(Error::new(
                    locker_core::ErrorKind::Other,
                    format!("etcd answered {} reads for {}", ops.len(), chunk.len()),
                ));
            }
            for (&i, op) in chunk.iter().zip(ops) {
                if let TxnOpResponse::Get(get) = op {
                    if let Some(kv) = first_kv(&get) {
                        records[i] = lock_from_kv(keys[i], kv).map(Some);
                    }
                }
            }
        }
        Ok(records)
    }

    async fn read_process(&self, process_hash: &str) -> Result<Option<ProcessData>> {
        match self.get(&self.process_key(process_hash)).await? {
            Some(kv) => {
                let text = std::str::from_utf8(kv.value())
                    .map_err(|_| Error::corrupt("liveness record is not UTF-8"))?;
                ProcessData::from_json(text).map(Some)
            }
            None => Ok(None),
        }
    }

    /// A watch of the lock key's deletions (a release, a takeover's delete, the expiry of the
    /// lock's lease), on a watch stream of its own, kept by a task until the watch is dropped.
    async fn watch_release(&self, key: &str) -> Result<Option<locker_core::ReleaseWatch>> {
        validate_key(key)?;
        let full = self.lock_key(key);
        let options = WatchOptions::new().with_filters([WatchFilterType::NoPut]);
        let (watcher, mut stream) = self
            .call(|mut c| {
                let (full, options) = (full.clone(), options.clone());
                async move { c.watch(full, Some(options)).await }
            })
            .await?;
        let (tx, rx) = tokio::sync::watch::channel(0u64);
        tokio::spawn(async move {
            // Owned by the task: dropping it would cancel the watch.
            let _watcher = watcher;
            loop {
                tokio::select! {
                    () = tx.closed() => return,
                    message = stream.message() => match message {
                        Ok(Some(response)) => {
                            if response.canceled() {
                                return;
                            }
                            if response
                                .events()
                                .iter()
                                .any(|e| e.event_type() == EventType::Delete)
                            {
                                tx.send_modify(|n| *n = n.wrapping_add(1));
                            }
                        }
                        // The stream ended or broke: the watch ends, and the waiter polls (and
                        // watches again at its next round).
                        Ok(None) | Err(_) => return,
                    },
                }
            }
        });
        Ok(Some(locker_core::ReleaseWatch::from_receiver(rx)))
    }

    async fn liveness_left(&self, process_hash: &str) -> Result<Option<Duration>> {
        let Some(kv) = self.get(&self.process_key(process_hash)).await? else {
            return Ok(Some(Duration::ZERO));
        };
        let lease = kv.lease();
        if lease == 0 {
            return Ok(None);
        }
        let left = self
            .call(|mut c| async move { c.lease_time_to_live(lease, None).await })
            .await?
            .ttl();
        // etcd answers whole seconds, rounded down ("the lease will expire in under TTL + 1
        // seconds"), and -1 when the lease is gone. A waiter wakes at the TTL (early by under
        // a second), and in its last second asks again every 100 ms, so that a dead holder is
        // found within 100 ms of its lease's expiry, not a second later.
        Ok(Some(match u64::try_from(left) {
            Ok(0) => ETCD_LAST_SECOND_STEP,
            Ok(secs) => Duration::from_secs(secs),
            Err(_) => Duration::ZERO,
        }))
    }

    async fn forget_process(&self, process_hash: &str) -> Result<()> {
        let full = self.process_key(process_hash);
        if let Ok(mut map) = self.process_leases.lock() {
            map.remove(process_hash);
        }
        if let Some(kv) = self.get(&full).await? {
            // Revoking the lease deletes the record and stops its renewals from doing anything.
            self.revoke(kv.lease()).await;
            self.call(|mut c| {
                let key = full.clone();
                async move { c.delete(key, None).await }
            })
            .await?;
        }
        Ok(())
    }
}

impl EtcdBackend {
    /// Stores any text under the lock key of `key` on a lease of `ttl` (for corruption tests).
    #[doc(hidden)]
    pub async fn raw_put(&self, key: &str, raw: &str, ttl: Duration) -> Result<()> {
        let lease = self.grant(ttl_secs(ttl)?).await?;
        self.put_on_lease(&self.lock_key(key), raw.to_owned(), lease)
            .await
    }

    /// The raw value under the lock key of `key`.
    #[doc(hidden)]
    pub async fn raw_get(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .get(&self.lock_key(key))
            .await?
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }
}

impl fmt::Debug for EtcdBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdBackend")
            .field("config", &self.config)
            .finish()
    }
}

#[async_trait]
impl BackendFactory for EtcdConfig {
    async fn connect(&self) -> Result<Arc<dyn LockBackend>> {
        Ok(Arc::new(EtcdBackend::connect(self).await?))
    }

    /// Never the application's client: one of the reporter's own.
    async fn connect_reporter(&self) -> Result<Arc<dyn LockBackend>> {
        Ok(Arc::new(EtcdBackend::connect(&self.for_reporter()).await?))
    }
}

/// The error etcd gives when a keep-alive names a lease that expired: without this, a process
/// whose liveness lease lapsed once (cut off for a whole TTL) would never write its liveness
/// record again.
fn lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::LeaseKeepAliveError(msg) => msg.contains("lease not found"),
        etcd_client::Error::GRpcStatus(status) => status.message().contains("lease not found"),
        _ => false,
    }
}

/// [`lease_not_found`], of an etcd error mapped to this crate's.
fn lease_gone(e: &Error) -> bool {
    std::error::Error::source(e)
        .and_then(|source| source.downcast_ref::<etcd_client::Error>())
        .is_some_and(lease_not_found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_expired_lease_is_recognised() {
        assert!(lease_not_found(&etcd_client::Error::LeaseKeepAliveError(
            "lease not found".into()
        )));
        assert!(!lease_not_found(&etcd_client::Error::LeaseKeepAliveError(
            "other".into()
        )));
    }

    #[test]
    fn ttls_round_up_to_seconds() {
        assert_eq!(ttl_secs(Duration::from_millis(1)).expect("ok"), 1);
        assert_eq!(ttl_secs(Duration::from_millis(2001)).expect("ok"), 3);
        assert_eq!(ttl_secs(Duration::from_secs(300)).expect("ok"), 300);
        assert_eq!(
            lock_lease_secs(Duration::from_millis(9_999)).expect("ok"),
            10
        );
        assert_eq!(lock_lease_secs(Duration::from_secs(10)).expect("ok"), 11);
        assert_eq!(lock_lease_secs(Duration::from_secs(300)).expect("ok"), 301);
        assert!(ttl_secs(Duration::ZERO).is_err());
        assert!(ttl_secs(Duration::MAX).is_err());
    }
}
