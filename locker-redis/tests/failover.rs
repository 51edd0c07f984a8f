//! Redis Cluster failover (issue 16) on a real 6-node cluster: 3 masters, each with a replica,
//! `cluster-node-timeout 2000`. As in the issue, four lockers hold 25 locks each, one task per
//! lock beating every 150 ms and writing to a fenced resource after each successful beat, and a
//! contender locker keeps trying to take all 100 keys, one task per key (100 calls at once on its
//! job connection). Then one master (chosen to serve a third of every holder's locks and the
//! liveness record of at least one holder) is killed (SIGKILL), or paused past the node timeout
//! (SIGSTOP until its replica is promoted, 5 s at least, then SIGCONT: it comes back as a
//! replica), and its replica is promoted. Each `Locker` stands for a process: its own process
//! hash and liveness record, its own reporter thread, its own connections.
//!
//! This load wedges a connection for good without the locker's healing: with
//! `reconnect_after_failures(0)`, the redis-rs kill case left the contender's job connection
//! timing out every call (5 s) to the end of the run in 6 of 12 runs (5 of 6 when the four
//! cases ran together), which (a) catches: the contender's fresh acquires never succeed.
//!
//! What must hold, with both clients:
//! - (a) no connection stays wedged: after the promotion, every locker acquires a fresh key on
//!   every master (the promoted one included) within [`FRESH_BOUND`], and every lock still held
//!   at the end had a successful beat in its last second;
//! - (b) never two owners: no successful beat of a key returned after another owner's acquire
//!   of it (with a higher token) had returned, the rule of the chaos checker in `locker-bench`;
//!   fenced writes of an older holder after a newer holder's acquire are counted as the checker
//!   counts them (refused, or accepted before the newer holder's first write), and shown, not
//!   asserted: the resource is in this process, so it cannot accept one after that write;
//! - (c) fencing tokens of a key rise from holder to holder: the fenced resource never refuses
//!   the current holder;
//! - (d) at the end no key is locked by a live locker without a guard: every running guard
//!   releases its own lock (`Released`), then the contender acquires every key within the
//!   liveness TTL;
//! - (e) the CLUSTERDOWN window (between the failure flag and the promotion, when every master
//!   refuses) is felt and survived: every error any call or background task met, in it or
//!   around it, is retryable, and no lock whose key lives on a healthy master is lost (which a
//!   liveness record on the failed master that outlived the failover also shows).
//!
//! The run prints its figures on stderr (`failover ...` lines).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{ports, Node, NodeInfo};
use locker_conformance::servers::{self, Server, ServerControl};
use locker_core::ReleaseOutcome;
use locker_core::{BackgroundError, Error, ErrorKind, LockAttempt, LockGuard, Locker};
use locker_redis::{ClientLibrary, RedisBackend, RedisConfig};

/// Holders (each a `Locker`: a process) and the locks each holds: the setup, 100 keys.
const HOLDERS: usize = 4;
const LOCKS_EACH: usize = 25;
/// Longer than the failover time the backend reports for this cluster (2 x 2 s + 1 s).
const LIVENESS: Duration = Duration::from_secs(8);
const REPORT: Duration = Duration::from_secs(1);
const RECHECK: Duration = Duration::from_millis(500);
/// Short, so that extensions (a script) run through the failover too.
const EXTEND: Duration = Duration::from_secs(2);
const LOCK_TTL: Duration = Duration::from_secs(30);
const BEAT_EVERY: Duration = Duration::from_millis(150);
/// How long after the promotion every locker must have acquired a fresh key on every master.
const FRESH_BOUND: Duration = Duration::from_secs(20);
/// How long a paused master stays paused at least (2.5 node timeouts).
const PAUSE: Duration = Duration::from_secs(5);
/// How long the load goes on after the promotion: more than a liveness TTL, so a liveness
/// record that lapsed in the failover would have cost its locks by then.
const AFTER: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SIGKILL (`docker kill`).
    Kill,
    /// SIGSTOP (`docker pause`) past the node timeout, then SIGCONT.
    Pause,
}

/// An acquire that returned a lock.
#[derive(Debug, Clone)]
struct Acq {
    /// Who asked: `holder`, `contender`, `fresh` or `final`.
    by: &'static str,
    key: String,
    owner: String,
    token: u64,
    end: Instant,
}

/// A beat that returned `Ok`.
#[derive(Debug, Clone)]
struct Beat {
    key: String,
    owner: String,
    token: u64,
    end: Instant,
}

/// A write to the fenced resource.
#[derive(Debug, Clone)]
struct Write {
    key: String,
    token: u64,
    at: Instant,
    accepted: bool,
}

/// A beat or an acquire: when it ran, and whether it returned an error.
#[derive(Debug, Clone)]
struct Call {
    start: Instant,
    end: Instant,
    failed: bool,
}

/// An error some call returned, or a background task reported.
#[derive(Debug, Clone)]
struct Failure {
    what: String,
    at: Instant,
    kind: ErrorKind,
    retryable: bool,
    text: String,
}

#[derive(Debug, Clone)]
struct Lost {
    key: String,
    owner: String,
    at: Instant,
    text: String,
}

/// Everything the run saw, and the fenced resource (the highest token written per key).
#[derive(Default)]
struct Log {
    acqs: Vec<Acq>,
    beats: Vec<Beat>,
    writes: Vec<Write>,
    failures: Vec<Failure>,
    lost: Vec<Lost>,
    held_answers: usize,
    calls: Vec<Call>,
    fence: HashMap<String, u64>,
}

#[derive(Default)]
struct Recorder(Mutex<Log>);

impl Recorder {
    fn with<T>(&self, f: impl FnOnce(&mut Log) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn failure(&self, what: impl Into<String>, e: &Error) {
        let failure = Failure {
            what: what.into(),
            at: Instant::now(),
            kind: e.kind(),
            retryable: e.is_retryable(),
            text: e.to_string(),
        };
        self.with(|l| l.failures.push(failure));
    }

    /// The fenced write: accepted with a token at least as high as any the key has seen.
    fn write(&self, key: &str, token: u64) {
        self.with(|l| {
            let max = l.fence.entry(key.to_owned()).or_insert(0);
            let accepted = token >= *max;
            if accepted {
                *max = token;
            }
            l.writes.push(Write {
                key: key.to_owned(),
                token,
                at: Instant::now(),
                accepted,
            });
        });
    }
}

fn config(server: &Server, client: ClientLibrary) -> RedisConfig {
    let mut builder = RedisConfig::builder();
    for port in ports(server) {
        builder = builder.node("127.0.0.1", port);
    }
    builder
        .cluster(true)
        .client(client)
        .build()
        .expect("config")
}

fn locker(config: &RedisConfig) -> Locker {
    Locker::builder(config.clone())
        .liveness_ttl(LIVENESS)
        .report_every(REPORT)
        .recheck_every(RECHECK)
        .extend_every(EXTEND)
        .lock_ttl(LOCK_TTL)
        .reporter_start_timeout(Duration::from_secs(30))
        // The backend reports a 5 s failover time: an 8 s liveness TTL must be accepted.
        .refuse_liveness_shorter_than_failover(true)
        .build()
        .expect("locker")
}

/// Beats one lock until told to stop (handing the guard back) or until the lock is lost.
async fn beat_loop(
    guard: LockGuard,
    rec: Arc<Recorder>,
    stop: Arc<AtomicBool>,
) -> Option<LockGuard> {
    let hb = guard.heartbeat();
    let key = guard.key().to_owned();
    let owner = guard.owner_hash().to_owned();
    let token = guard
        .fencing_token()
        .expect("Redis hands out fencing tokens");
    while !stop.load(Ordering::Relaxed) {
        let start = Instant::now();
        let result = hb.beat().await;
        let end = Instant::now();
        let failed = result.is_err();
        rec.with(|l| l.calls.push(Call { start, end, failed }));
        match result {
            Ok(()) => {
                rec.with(|l| {
                    l.beats.push(Beat {
                        key: key.clone(),
                        owner: owner.clone(),
                        token,
                        end,
                    })
                });
                rec.write(&key, token);
            }
            Err(e) if e.kind() == ErrorKind::LockLost => {
                rec.with(|l| {
                    l.lost.push(Lost {
                        key: key.clone(),
                        owner: owner.clone(),
                        at: end,
                        text: e.to_string(),
                    })
                });
                return None;
            }
            Err(e) => rec.failure(format!("beat {key}"), &e),
        }
        tokio::time::sleep(BEAT_EVERY).await;
    }
    Some(guard)
}

/// One acquire, recorded; `Some(guard)` when it got the lock.
async fn acquire(
    locker: &Locker,
    key: &str,
    what: &'static str,
    rec: &Recorder,
) -> Option<LockGuard> {
    let start = Instant::now();
    let result = locker.acquire(key).await;
    let end = Instant::now();
    let failed = result.is_err();
    rec.with(|l| l.calls.push(Call { start, end, failed }));
    match result {
        Ok(LockAttempt::Acquired(g)) => {
            let acq = Acq {
                by: what,
                key: key.to_owned(),
                owner: g.owner_hash().to_owned(),
                token: g.fencing_token().expect("Redis hands out fencing tokens"),
                end,
            };
            rec.with(|l| l.acqs.push(acq));
            Some(g)
        }
        Ok(LockAttempt::Held(_)) => {
            rec.with(|l| l.held_answers += 1);
            None
        }
        Err(e) => {
            rec.failure(format!("{what} acquire {key}"), &e);
            None
        }
    }
}

/// Collects a locker's background errors.
fn collect_background(locker: &Locker, name: String, rec: Arc<Recorder>) {
    let mut rx = locker.subscribe_errors();
    tokio::spawn(async move {
        loop {
            match rx.recv().await {
                Ok(BackgroundError { source, error, .. }) => {
                    rec.failure(format!("{name} background {source:?}"), &error)
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    eprintln!("failover: {name}: {n} background errors missed");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
    });
}

/// The cluster's slots as node `port` sees them at the start.
struct Layout {
    masters: Vec<NodeInfo>,
    all: Vec<NodeInfo>,
}

impl Layout {
    fn read(port: u16) -> Layout {
        let mut node = Node::open_with_timeout(port, Duration::from_secs(2)).expect("node");
        let all = node.try_view().expect("CLUSTER NODES");
        let masters = all
            .iter()
            .filter(|n| n.master && !n.slots.is_empty())
            .cloned()
            .collect::<Vec<_>>();
        assert_eq!(masters.len(), 3, "3 masters serving slots: {all:?}");
        Layout { masters, all }
    }

    /// The index (in `masters`) of the master serving `slot`.
    fn shard(&self, slot: u16) -> usize {
        self.masters
            .iter()
            .position(|m| m.serves(slot))
            .unwrap_or_else(|| panic!("no master serves slot {slot}"))
    }
}

/// What the fault and the cluster did, as seen from a healthy master.
#[derive(Debug)]
struct Timeline {
    fault: Instant,
    /// The victim first flagged `fail`.
    flagged: Option<Instant>,
    /// The healthy master's `cluster_state:fail` (slots not served), first and last seen.
    down_from: Option<Instant>,
    down_to: Option<Instant>,
    /// The victim's replica seen as a master.
    promoted: Instant,
    resumed: Option<Instant>,
    /// The paused master back, as a replica of the promoted one with its link up.
    rejoined: Option<Instant>,
}

/// Kills or pauses the victim, and watches a healthy master until the victim's replica is
/// promoted and the cluster is `ok` again.
fn strike(
    victim: &Arc<dyn ServerControl>,
    fault: Fault,
    watch_port: u16,
    victim_id: &str,
    replica_id: &str,
) -> Timeline {
    let mut watch = Node::open_with_timeout(watch_port, Duration::from_secs(1)).expect("watch");
    let fault_at = Instant::now();
    match fault {
        Fault::Kill => victim.kill().expect("kill the master"),
        Fault::Pause => victim.pause().expect("pause the master"),
    }
    let (mut flagged, mut down_from, mut down_to, mut promoted) = (None, None, None, None);
    loop {
        let now = Instant::now();
        assert!(
            now - fault_at < Duration::from_secs(30),
            "no promotion and recovery within 30 s (flagged: {:?}, promoted: {:?})",
            flagged.map(|t: Instant| t - fault_at),
            promoted.map(|t: Instant| t - fault_at)
        );
        if let Ok(state) = watch.try_state() {
            if state != "ok" {
                down_from.get_or_insert(now);
                down_to = Some(now);
            } else if promoted.is_some() {
                break;
            }
        }
        if let Ok(view) = watch.try_view() {
            if view.iter().any(|n| n.id == victim_id && n.failed) {
                flagged.get_or_insert(now);
            }
            if view.iter().any(|n| n.id == replica_id && n.master) {
                promoted.get_or_insert(now);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Timeline {
        fault: fault_at,
        flagged,
        down_from,
        down_to,
        promoted: promoted.expect("promoted"),
        resumed: None,
        rejoined: None,
    }
}

/// For a pause: resumes the victim once it has been paused [`PAUSE`] and its replica is
/// promoted, and waits until it is a replica with its link up.
fn wake(victim: &Arc<dyn ServerControl>, victim_port: u16, t: &mut Timeline) {
    let due = t.fault + PAUSE;
    let now = Instant::now();
    if due > now {
        std::thread::sleep(due - now);
    }
    victim.resume().expect("resume the master");
    let resumed = Instant::now();
    t.resumed = Some(resumed);
    loop {
        let info = Node::open_with_timeout(victim_port, Duration::from_secs(1))
            .and_then(|mut n| n.try_info("replication"))
            .unwrap_or_default();
        if info.contains("role:slave") && info.contains("master_link_status:up") {
            t.rejoined = Some(Instant::now());
            return;
        }
        assert!(
            resumed.elapsed() < Duration::from_secs(20),
            "the woken master did not come back as a replica within 20 s: {info}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Fresh keys, one per master, for locker `who`.
fn fresh_keys(who: usize, backend: &RedisBackend, node: &mut Node, layout: &Layout) -> Vec<String> {
    let mut keys: Vec<Option<String>> = vec![None; layout.masters.len()];
    for n in 0.. {
        let key = format!("fresh-{who}-{n}");
        let shard = layout.shard(node.keyslot(&backend.lock_key(&key)));
        if keys[shard].is_none() {
            keys[shard] = Some(key);
        }
        if keys.iter().all(Option::is_some) {
            break;
        }
    }
    keys.into_iter().flatten().collect()
}

/// Acquires `key` (retrying errors and `Held`) and releases it; how long after `since` it got it,
/// or `None` if not within [`FRESH_BOUND`] and 10 s more.
async fn fresh_acquire(
    locker: Locker,
    key: String,
    since: Instant,
    rec: Arc<Recorder>,
) -> Option<Duration> {
    loop {
        if let Some(g) = acquire(&locker, &key, "fresh", &rec).await {
            let took = since.elapsed();
            if let Err(e) = g.release().await {
                rec.failure(format!("fresh release {key}"), &e);
            }
            return Some(took);
        }
        if since.elapsed() > FRESH_BOUND + Duration::from_secs(10) {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// One case, bounded: a hang anywhere fails it instead of the whole test run.
async fn failover(client: ClientLibrary, fault: Fault) {
    tokio::time::timeout(Duration::from_secs(180), case(client, fault))
        .await
        .unwrap_or_else(|_| panic!("{client:?}/{fault:?}: the case did not end within 180 s"));
}

async fn case(client: ClientLibrary, fault: Fault) {
    let name = format!("{client:?}/{fault:?}");
    let began = Instant::now();
    let server = tokio::task::spawn_blocking(servers::start_redis_cluster_with_replicas)
        .await
        .expect("task")
        .unwrap_or_else(|e| panic!("{e}"));
    let started_in = began.elapsed();
    let config = config(&server, client);
    let rec = Arc::new(Recorder::default());

    let holders: Vec<Locker> = (0..HOLDERS).map(|_| locker(&config)).collect();
    let contender = locker(&config);
    for (i, l) in holders.iter().enumerate() {
        collect_background(l, format!("holder {i}"), rec.clone());
    }
    collect_background(&contender, "contender".into(), rec.clone());
    for l in holders.iter().chain([&contender]) {
        l.ready().await.expect("the locker starts");
    }

    // Where things live: each holder's liveness record, and its locks spread over the masters.
    let backend = RedisBackend::connect(&config).await.expect("connect");
    let first_port = ports(&server)[0];
    let layout = tokio::task::spawn_blocking(move || Layout::read(first_port))
        .await
        .expect("task");
    let mut node = Node::open(first_port);
    let liveness_shard: Vec<usize> = holders
        .iter()
        .map(|l| layout.shard(node.keyslot(&backend.process_key(l.process_hash()))))
        .collect();
    // The victim serves the most holders' liveness records (ties: the first such master).
    let victim = (0..layout.masters.len())
        .max_by_key(|m| {
            (
                liveness_shard.iter().filter(|s| *s == m).count(),
                usize::MAX - m,
            )
        })
        .expect("a master");
    // Per holder: a third of its locks on each master, the odd ones on the victim.
    let mut keys: Vec<Vec<String>> = Vec::new();
    for h in 0..HOLDERS {
        let shards = layout.masters.len();
        let mut quota: Vec<usize> = (0..shards)
            .map(|m| LOCKS_EACH / shards + if m == victim { LOCKS_EACH % shards } else { 0 })
            .collect();
        let mut mine = Vec::new();
        for n in 0.. {
            let key = format!("lock-{h}-{n}");
            let shard = layout.shard(node.keyslot(&backend.lock_key(&key)));
            if quota[shard] > 0 {
                quota[shard] -= 1;
                mine.push(key);
            }
            if mine.len() == LOCKS_EACH {
                break;
            }
        }
        keys.push(mine);
    }
    let all_keys: Vec<String> = keys.iter().flatten().cloned().collect();
    let key_shard: HashMap<String, usize> = all_keys
        .iter()
        .map(|k| (k.clone(), layout.shard(node.keyslot(&backend.lock_key(k)))))
        .collect();
    let fresh: Vec<Vec<String>> = (0..=HOLDERS)
        .map(|who| fresh_keys(who, &backend, &mut node, &layout))
        .collect();
    drop(node);
    let victim_info = layout.masters[victim].clone();
    let replica = layout
        .all
        .iter()
        .find(|n| n.replicates.as_deref() == Some(victim_info.id.as_str()))
        .cloned()
        .expect("the victim's replica");
    let watch_port = layout.masters[(victim + 1) % layout.masters.len()].port;
    let victim_index = ports(&server)
        .iter()
        .position(|p| *p == victim_info.port)
        .expect("the victim is one of the server's nodes");
    let victim_control = server.node(victim_index).expect("node control");

    // The holders take their locks and beat them.
    let stop = Arc::new(AtomicBool::new(false));
    let mut beaters = Vec::new();
    for (h, l) in holders.iter().enumerate() {
        for key in &keys[h] {
            let g = acquire(l, key, "holder", &rec)
                .await
                .unwrap_or_else(|| panic!("holder {h} could not take {key}"));
            beaters.push(tokio::spawn(beat_loop(g, rec.clone(), stop.clone())));
        }
    }
    // The contender tries every key, over and over; what it gets, it holds and beats.
    // One task per key, so that 100 calls at once share its job connection (the load under
    // which the issue saw a connection stay wedged for good).
    let contenders: Vec<_> = all_keys
        .iter()
        .map(|key| {
            let (contender, rec, stop, key) =
                (contender.clone(), rec.clone(), stop.clone(), key.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(g) = acquire(&contender, &key, "contender", &rec).await {
                        return beat_loop(g, rec, stop).await;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                None
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The fault.
    let mut timeline = tokio::task::spawn_blocking({
        let (victim_control, victim_id, replica_id) = (
            victim_control.clone(),
            victim_info.id.clone(),
            replica.id.clone(),
        );
        move || strike(&victim_control, fault, watch_port, &victim_id, &replica_id)
    })
    .await
    .expect("the failover");
    // Every locker acquires fresh keys, one per master, from the promotion on...
    let mut fresh_tasks = Vec::new();
    for (who, l) in holders.iter().chain([&contender]).enumerate() {
        for key in &fresh[who] {
            fresh_tasks.push((
                who,
                key.clone(),
                tokio::spawn(fresh_acquire(
                    l.clone(),
                    key.clone(),
                    timeline.promoted,
                    rec.clone(),
                )),
            ));
        }
    }
    // ... while a paused master wakes up and comes back as a replica.
    if fault == Fault::Pause {
        let victim_port = victim_info.port;
        timeline = tokio::task::spawn_blocking({
            let victim_control = victim_control.clone();
            move || {
                wake(&victim_control, victim_port, &mut timeline);
                timeline
            }
        })
        .await
        .expect("wake");
    }
    let mut fresh_times: Vec<(usize, String, Option<Duration>)> = Vec::new();
    for (who, key, task) in fresh_tasks {
        fresh_times.push((who, key, task.await.expect("fresh acquire task")));
    }
    let until = timeline.promoted + AFTER;
    let now = Instant::now();
    if until > now {
        tokio::time::sleep(until - now).await;
    }

    // Stop the load; the guards still held come back.
    stop.store(true, Ordering::Relaxed);
    let stopped = Instant::now();
    let mut guards: Vec<LockGuard> = Vec::new();
    for b in beaters {
        guards.extend(b.await.expect("beat task"));
    }
    for c in contenders {
        guards.extend(c.await.expect("contender task"));
    }
    let rec_snapshot = rec.with(|l| (l.beats.clone(), l.lost.clone()));
    // (a) Every lock still held had a successful beat in its last second of the load.
    let mut stale_guards = Vec::new();
    for g in &guards {
        let last = rec_snapshot
            .0
            .iter()
            .filter(|b| b.owner == g.owner_hash())
            .map(|b| b.end)
            .max();
        if last.map_or(true, |t| {
            stopped.saturating_duration_since(t) > Duration::from_secs(1)
        }) {
            stale_guards.push(format!(
                "{}: last successful beat {:?} before the stop",
                g.key(),
                last.map(|t| stopped.saturating_duration_since(t))
            ));
        }
    }
    // (d) Every running guard releases its own lock...
    let held_at_end = guards.len();
    let mut bad_releases = Vec::new();
    for g in guards {
        let key = g.key().to_owned();
        match g.release().await {
            Ok(ReleaseOutcome::Released) => {}
            other => bad_releases.push(format!("{key}: {other:?}")),
        }
    }
    // ... then the contender gets every key within the liveness TTL (a lost lock's key is free
    // at once, or once its holder's liveness lapsed), all keys at once.
    let end_check = Instant::now();
    let finals: Vec<_> = all_keys
        .iter()
        .map(|key| {
            let (contender, rec, key) = (contender.clone(), rec.clone(), key.clone());
            tokio::spawn(async move {
                loop {
                    if let Some(g) = acquire(&contender, &key, "final", &rec).await {
                        if let Err(e) = g.release().await {
                            rec.failure(format!("final release {key}"), &e);
                        }
                        return Ok(end_check.elapsed());
                    }
                    if end_check.elapsed() > LIVENESS + Duration::from_secs(2) {
                        return Err(key);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        })
        .collect();
    let mut stuck = Vec::new();
    let mut slowest_free = Duration::ZERO;
    for f in finals {
        match f.await.expect("final acquire task") {
            Ok(took) => slowest_free = slowest_free.max(took),
            Err(key) => stuck.push(key),
        }
    }
    for l in holders.iter().chain([&contender]) {
        l.shutdown().await;
    }
    drop(server);

    // The verdicts.
    let log = rec.with(std::mem::take);
    let t = &timeline;
    let since_fault = |i: Instant| ms(i.saturating_duration_since(t.fault));
    let at = |i: Option<Instant>| i.map_or("-".to_owned(), |i| format!("{} ms", since_fault(i)));
    let mut report = String::new();
    let _ = writeln!(
        report,
        "failover {name}: cluster of 6 started in {} ms; victim 127.0.0.1:{} serves the liveness \
         records of {} of {HOLDERS} holders and {} of {} locks; fault at 0 ms, flagged fail at \
         {}, cluster_state:fail seen from {} to {}, replica promoted at {} ms, resumed at {}, \
         back as a replica at {}",
        ms(started_in),
        victim_info.port,
        liveness_shard.iter().filter(|s| **s == victim).count(),
        key_shard.values().filter(|s| **s == victim).count(),
        all_keys.len(),
        at(t.flagged),
        at(t.down_from),
        at(t.down_to),
        since_fault(t.promoted),
        at(t.resumed),
        at(t.rejoined),
    );

    // (a)
    let late_fresh: Vec<String> = fresh_times
        .iter()
        .filter(|(_, _, took)| took.map_or(true, |d| d > FRESH_BOUND))
        .map(|(who, key, took)| {
            let who = if *who == HOLDERS {
                "contender".to_owned()
            } else {
                format!("holder {who}")
            };
            format!("{who} {key}: {took:?}")
        })
        .collect();
    let slowest_fresh = fresh_times
        .iter()
        .filter_map(|(_, _, d)| *d)
        .max()
        .unwrap_or_default();
    let _ = writeln!(
        report,
        "  (a) fresh acquires after the promotion: {} of {}, slowest {} ms after it; locks held \
         at the end without a beat in their last second: {}",
        fresh_times.iter().filter(|f| f.2.is_some()).count(),
        fresh_times.len(),
        ms(slowest_fresh),
        stale_guards.len()
    );

    // (b) A successful beat that returned after another owner's acquire (higher token) had.
    let mut overlaps = Vec::new();
    for b in &log.beats {
        if let Some(q) = log
            .acqs
            .iter()
            .find(|q| q.key == b.key && q.owner != b.owner && q.token > b.token && q.end <= b.end)
        {
            overlaps.push(format!(
                "{} token {} beat Ok {} ms after {} (token {}) acquired it",
                b.key,
                b.token,
                ms(b.end - q.end),
                q.owner,
                q.token
            ));
        }
    }
    // Fenced writes, counted as the chaos checker counts them.
    let (mut accepted, mut stale_refused, mut stale_before_newer, mut stale_accepted) =
        (0, 0, 0, 0);
    let mut fresh_refused = Vec::new();
    for w in &log.writes {
        let stale = log
            .acqs
            .iter()
            .any(|q| q.key == w.key && q.token > w.token && q.end < w.at);
        let newer_first_write = log
            .writes
            .iter()
            .filter(|o| o.accepted && o.key == w.key && o.token > w.token)
            .map(|o| o.at)
            .min();
        match (w.accepted, stale) {
            (true, false) => accepted += 1,
            (true, true) if newer_first_write.map_or(true, |n| w.at < n) => stale_before_newer += 1,
            (true, true) => stale_accepted += 1,
            (false, true) => stale_refused += 1,
            (false, false) => fresh_refused.push(format!("{} token {}", w.key, w.token)),
        }
    }
    let _ = writeln!(
        report,
        "  (b) {} successful beats, {} acquires ({} by the contender during the load), {} \
         held answers; beats Ok after another owner's acquire: {}; fenced writes accepted {}, \
         stale refused {}, stale accepted before the newer holder's first write {}, after it {}",
        log.beats.len(),
        log.acqs.len(),
        log.acqs.iter().filter(|q| q.by == "contender").count(),
        log.held_answers,
        overlaps.len(),
        accepted,
        stale_refused,
        stale_before_newer,
        stale_accepted
    );

    // (c) Tokens per key, in the order the acquires returned.
    let mut per_key: BTreeMap<&str, Vec<&Acq>> = BTreeMap::new();
    for q in &log.acqs {
        per_key.entry(q.key.as_str()).or_default().push(q);
    }
    let mut token_drops = Vec::new();
    for (key, mut qs) in per_key {
        qs.sort_by_key(|q| q.end);
        for pair in qs.windows(2) {
            if pair[1].token <= pair[0].token {
                token_drops.push(format!("{key}: {} then {}", pair[0].token, pair[1].token));
            }
        }
    }
    let _ = writeln!(
        report,
        "  (c) token drops between holders: {}; current holders' writes refused: {}",
        token_drops.len(),
        fresh_refused.len()
    );

    // (d)
    let _ = writeln!(
        report,
        "  (d) guards running at the end: {held_at_end}, releases not `Released`: {}; keys not \
         free for the contender within {} ms: {} (slowest {} ms)",
        bad_releases.len(),
        ms(LIVENESS + Duration::from_secs(2)),
        stuck.len(),
        ms(slowest_free)
    );

    // (e)
    let not_retryable: Vec<String> = log
        .failures
        .iter()
        .filter(|f| !f.retryable)
        .map(|f| {
            format!(
                "{} at {} ms: {:?}: {}",
                f.what,
                since_fault(f.at),
                f.kind,
                f.text
            )
        })
        .collect();
    // The fault is felt as errors or as calls that wait (on a paused master).
    let felt = log
        .calls
        .iter()
        .filter(|c| {
            c.start <= t.promoted
                && c.end >= t.fault
                && (c.failed || c.end - c.start > Duration::from_secs(1))
        })
        .count();
    let slowest_call = log
        .calls
        .iter()
        .map(|c| c.end - c.start)
        .max()
        .unwrap_or_default();
    // Calls in flight at some moment of the CLUSTERDOWN window.
    let (down_from, down_to) = (
        t.down_from.unwrap_or(t.promoted),
        t.down_to.unwrap_or(t.promoted),
    );
    let in_down: Vec<&Call> = log
        .calls
        .iter()
        .filter(|c| c.start <= down_to && c.end >= down_from)
        .collect();
    let in_down_failed = in_down.iter().filter(|c| c.failed).count();
    let clusterdown = log
        .failures
        .iter()
        .filter(|f| f.text.contains("CLUSTERDOWN"))
        .count();
    let lost_healthy: Vec<String> = log
        .lost
        .iter()
        .filter(|l| key_shard.get(&l.key) != Some(&victim))
        .map(|l| {
            format!(
                "{} ({}) at {} ms: {}",
                l.key,
                l.owner,
                since_fault(l.at),
                l.text
            )
        })
        .collect();
    let lost_victim = log
        .lost
        .iter()
        .filter(|l| key_shard.get(&l.key) == Some(&victim))
        .count();
    let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
    for f in &log.failures {
        *by_kind.entry(format!("{:?}", f.kind)).or_default() += 1;
    }
    let _ = writeln!(
        report,
        "  (e) {} calls (beats and acquires), {felt} of them failed or waited over 1 s between \
         the fault and the promotion (slowest call {} ms), {} in flight during the CLUSTERDOWN \
         window ({in_down_failed} failed); {} errors ({by_kind:?}), {clusterdown} naming \
         CLUSTERDOWN, {} not retryable; locks lost: {} on healthy masters, {lost_victim} on the \
         failed one",
        log.calls.len(),
        ms(slowest_call),
        in_down.len(),
        log.failures.len(),
        not_retryable.len(),
        lost_healthy.len(),
    );
    // The errors met, grouped by where and what (numbers left out: holders merge).
    let mut texts: BTreeMap<String, usize> = BTreeMap::new();
    for f in &log.failures {
        let what: String = f
            .what
            .split(' ')
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
            .chars()
            .filter(|c| !c.is_ascii_digit())
            .collect();
        let text: String = f.text.chars().filter(|c| !c.is_ascii_digit()).collect();
        *texts.entry(format!("{what}: {text}")).or_default() += 1;
    }
    for (text, n) in &texts {
        let _ = writeln!(report, "      {n} x {text}");
    }
    let _ = writeln!(report, "  run time {} ms", ms(began.elapsed()));
    // Past the test harness's capture, so the figures show in every run.
    let _ = std::io::Write::write_all(&mut std::io::stderr(), report.as_bytes());

    let show = |v: &[String]| v.iter().take(10).cloned().collect::<Vec<_>>().join("\n  ");
    assert!(
        t.down_from.is_some(),
        "{name}: the healthy master never reported cluster_state:fail: the CLUSTERDOWN window \
         was not reached"
    );
    assert!(
        felt > 0,
        "{name}: no call failed or waited between the fault and the promotion: the fault was \
         not felt"
    );
    assert!(
        !in_down.is_empty(),
        "{name}: no call was in flight during the CLUSTERDOWN window"
    );
    assert!(
        late_fresh.is_empty(),
        "{name}: (a) fresh acquires not done within {FRESH_BOUND:?} of the promotion (a wedged \
         connection?):\n  {}",
        show(&late_fresh)
    );
    assert!(
        stale_guards.is_empty(),
        "{name}: (a) locks held at the end whose beats had stopped succeeding:\n  {}",
        show(&stale_guards)
    );
    assert!(
        overlaps.is_empty(),
        "{name}: (b) beats Ok while another owner held the key:\n  {}",
        show(&overlaps)
    );
    assert!(
        token_drops.is_empty() && fresh_refused.is_empty(),
        "{name}: (c) fencing tokens did not rise:\n  {}\n  refused: {}",
        show(&token_drops),
        show(&fresh_refused)
    );
    assert!(
        bad_releases.is_empty() && stuck.is_empty(),
        "{name}: (d) keys locked without a guard:\n  releases: {}\n  stuck: {}",
        show(&bad_releases),
        show(&stuck)
    );
    assert!(
        not_retryable.is_empty(),
        "{name}: (e) errors that are not retryable:\n  {}",
        show(&not_retryable)
    );
    assert!(
        lost_healthy.is_empty(),
        "{name}: (e) locks on healthy masters lost:\n  {}",
        show(&lost_healthy)
    );
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_rs_survives_a_killed_master() {
    failover(ClientLibrary::Redis, Fault::Kill).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_rs_survives_a_master_paused_past_the_node_timeout() {
    failover(ClientLibrary::Redis, Fault::Pause).await;
}

#[cfg(feature = "fred")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fred_survives_a_killed_master() {
    failover(ClientLibrary::Fred, Fault::Kill).await;
}

#[cfg(feature = "fred")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fred_survives_a_master_paused_past_the_node_timeout() {
    failover(ClientLibrary::Fred, Fault::Pause).await;
}
