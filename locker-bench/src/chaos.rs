//! `locker-bench chaos`: worker processes contend for a few keys; each critical section writes to
//! a fenced resource; a controller kills workers (SIGKILL), freezes them past the liveness TTL
//! (SIGSTOP, then SIGCONT), and pauses and restarts the backend server. A checker then verifies
//! the log and prints figures: fencing violations, overlaps, seppukus, takeovers.
//!
//! The fenced resource is a SQLite file of its own: it accepts a write only with a token at least
//! as high as any it has seen for that key.

use std::collections::{BTreeMap, HashMap};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use locker::{LockAttempt, Locker};
use locker_conformance::servers::{self, Server, ServerControl, ServerKind};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Worker timings: a takeover needs the liveness TTL to pass.
const LIVENESS: Duration = Duration::from_secs(2);
const REPORT: Duration = Duration::from_millis(300);
const RECHECK: Duration = Duration::from_millis(100);

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default()
}

fn log(dir: &Path, line: &str) {
    // One short line per write(2) with O_APPEND: lines of concurrent writers never interleave.
    if let Ok(mut f) = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("events"))
    {
        let _ = f.write_all(format!("{} {} {line}\n", now_ms(), std::process::id()).as_bytes());
    }
}

fn worker_locker(url: &str) -> Locker {
    Locker::builder(locker::connect(url).expect("url"))
        .liveness_ttl(LIVENESS)
        .report_every(REPORT)
        .recheck_every(RECHECK)
        .reporter_start_timeout(Duration::from_secs(30))
        .build()
        .expect("locker")
}

async fn resource(dir: &Path) -> sqlx::SqlitePool {
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(dir.join("resource.db"))
        .create_if_missing(true)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(30));
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(2)
        .connect_with(options)
        .await
        .expect("resource database");
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS fence (key TEXT PRIMARY KEY, max_token INTEGER NOT NULL)",
    )
    .execute(&pool)
    .await
    .expect("resource table");
    pool
}

/// The fenced write: accepted only with a token at least as high as any seen for the key.
async fn fenced_write(pool: &sqlx::SqlitePool, key: &str, token: u64) -> bool {
    let token = i64::try_from(token).unwrap_or(i64::MAX);
    sqlx::query(
        "INSERT INTO fence (key, max_token) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE
         SET max_token = excluded.max_token WHERE excluded.max_token >= fence.max_token",
    )
    .bind(key)
    .bind(token)
    .execute(pool)
    .await
    .map(|r| r.rows_affected() == 1)
    .unwrap_or(false)
}

/// One worker process: forever, pick a key, and if it gets the lock, do a fenced job.
pub(crate) async fn worker(url: &str, dir: &Path, keys: usize) {
    let locker = worker_locker(url);
    let pool = resource(dir).await;
    let mut n: u64 = u64::from(std::process::id());
    loop {
        n = n
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let key = format!("chaos-{}", (n >> 33) as usize % keys);
        let attempt = locker.acquire(key.as_str()).await;
        let guard = match attempt {
            Ok(LockAttempt::Acquired(g)) => g,
            Ok(LockAttempt::Held(_)) | Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let token = guard.fencing_token().unwrap_or(0);
        let hb = guard.heartbeat();
        log(dir, &format!("start {key} {token} {}", guard.owner_hash()));
        // Register the token with the resource at once: from here on it refuses older holders.
        let ok = fenced_write(&pool, &key, token).await;
        log(
            dir,
            &format!("write-{} {key} {token}", if ok { "ok" } else { "refused" }),
        );
        let mut lost = false;
        for _ in 0..4 {
            // Work without beating, then write: a worker frozen here wakes up and writes with
            // its old token before its next beat, the case only fencing can stop.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let ok = fenced_write(&pool, &key, token).await;
            log(
                dir,
                &format!("write-{} {key} {token}", if ok { "ok" } else { "refused" }),
            );
            if let Err(e) = hb.beat().await {
                if e.kind() == locker::ErrorKind::LockLost {
                    log(dir, &format!("seppuku {key} {token}"));
                }
                lost = true;
                break;
            }
            log(dir, &format!("beat {key} {token}"));
        }
        if !lost {
            log(dir, &format!("end {key} {token}"));
        }
        let _ = guard.release().await;
    }
}

struct Workers {
    exe: PathBuf,
    url: String,
    dir: PathBuf,
    keys: usize,
    children: Vec<Child>,
}

impl Workers {
    fn spawn(&mut self) {
        let child = Command::new(&self.exe)
            .args(["chaos-worker", "--url", &self.url, "--dir"])
            .arg(&self.dir)
            .args(["--keys", &self.keys.to_string()])
            .spawn()
            .expect("worker process");
        self.children.push(child);
    }
}

/// The arguments of a run.
pub(crate) struct Run {
    pub(crate) backend: String,
    pub(crate) duration: Duration,
    pub(crate) workers: usize,
    pub(crate) keys: usize,
    pub(crate) volatile: bool,
}

pub(crate) async fn run(args: Run) -> bool {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (url, server): (String, Option<Server>) = match args.backend.as_str() {
        "sqlite" => (format!("sqlite://{}/locks.db", dir.path().display()), None),
        "redis" | "fred" => {
            // With an append-only file synced on every write, as a lock store should run: a
            // restart keeps the locks. (`--volatile` runs without, to show what data loss does.)
            let durable: &[&str] = if args.volatile {
                &[]
            } else {
                &["--appendonly", "yes", "--appendfsync", "always"]
            };
            let s = servers::start_redis_with(durable, false).expect("redis-server");
            let url = if args.backend == "fred" {
                format!("{}?client=fred", s.url())
            } else {
                s.url().to_owned()
            };
            (url, Some(s))
        }
        "postgres" => {
            let s = servers::start_process(ServerKind::Postgres).expect("postgres");
            (s.url().to_owned(), Some(s))
        }
        "etcd" => {
            let s = servers::start_process(ServerKind::Etcd).expect("etcd");
            (
                format!("etcd://{}", s.url().trim_start_matches("http://")),
                Some(s),
            )
        }
        other => panic!("unknown backend {other}"),
    };
    let control: Option<Arc<dyn ServerControl>> = server.as_ref().and_then(|s| s.control());
    let _ = resource(dir.path()).await;
    let mut workers = Workers {
        exe: std::env::current_exe().expect("own path"),
        url: url.clone(),
        dir: dir.path().to_owned(),
        keys: args.keys,
        children: Vec::new(),
    };
    for _ in 0..args.workers {
        workers.spawn();
    }
    println!(
        "chaos on {} ({url}): {} workers, {} keys, {:?}, liveness TTL {LIVENESS:?}",
        args.backend, args.workers, args.keys, args.duration
    );
    let started = Instant::now();
    let mut n: u64 = now_ms() as u64;
    let mut rand = |m: usize| {
        n = n
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (n >> 33) as usize % m
    };
    // Let everyone connect before the faults start.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Every kind of fault, in turn, on random workers.
    let actions: &[usize] = if control.is_some() {
        &[0, 1, 3, 0, 1, 4]
    } else {
        &[0, 1]
    };
    let mut step = 0;
    while started.elapsed() < args.duration {
        let action = actions[step % actions.len()];
        step += 1;
        let i = rand(workers.children.len());
        let pid = workers.children[i].id();
        match action {
            0 => {
                let mut victim = workers.children.remove(i);
                let _ = victim.kill();
                let _ = victim.wait();
                log(dir.path(), &format!("kill {pid}"));
                workers.spawn();
            }
            1 => {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGSTOP);
                log(dir.path(), &format!("freeze {pid}"));
                tokio::time::sleep(LIVENESS + LIVENESS / 2).await;
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGCONT);
                log(dir.path(), &format!("thaw {pid}"));
            }
            3 => {
                if let Some(c) = &control {
                    log(dir.path(), "pause server");
                    let _ = c.pause();
                    tokio::time::sleep(LIVENESS / 4).await;
                    let _ = c.resume();
                    log(dir.path(), "resume server");
                }
            }
            _ => {
                if let Some(c) = control.clone() {
                    log(dir.path(), "restart server");
                    let _ = tokio::task::spawn_blocking(move || c.restart()).await;
                    log(dir.path(), "restarted server");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500 + rand(1000) as u64)).await;
    }
    // Let the last takeovers happen, then stop everyone.
    tokio::time::sleep(LIVENESS * 2).await;
    for mut c in workers.children.drain(..) {
        let _ = c.kill();
        let _ = c.wait();
    }
    // A Redis without persistence forgets its locks on a restart.
    let loses_data = args.volatile && matches!(args.backend.as_str(), "redis" | "fred");
    let ok = check(dir.path(), loses_data);
    drop(server);
    ok
}

#[derive(Debug)]
struct Event {
    at: u128,
    pid: u32,
    kind: String,
    key: String,
    token: u64,
}

fn read_events(dir: &Path) -> Vec<Event> {
    std::fs::read_to_string(dir.join("events"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut p = l.split(' ');
            let at = p.next()?.parse().ok()?;
            let pid = p.next()?.parse().ok()?;
            let kind = p.next()?.to_owned();
            let a = p.next().unwrap_or_default().to_owned();
            let b = p.next().unwrap_or_default();
            Some(Event {
                at,
                pid,
                kind,
                key: a,
                token: b.parse().unwrap_or(0),
            })
        })
        .collect()
}

/// A critical section: from `start` to its end, seppuku, or its worker's death; `active_to` is
/// its last successful beat (the lock promises ownership at each successful beat).
#[derive(Debug, Clone)]
struct Section {
    pid: u32,
    key: String,
    token: u64,
    from: u128,
    to: u128,
    active_to: u128,
    frozen: bool,
}

fn check(dir: &Path, loses_data: bool) -> bool {
    let events = read_events(dir);
    let end_of_run = events.last().map(|e| e.at).unwrap_or_default();
    // Freezes and kills, by worker pid (the controller logs the pid as the event's key).
    let mut freezes: HashMap<u32, Vec<(u128, u128)>> = HashMap::new();
    let mut kills: Vec<(u32, u128)> = Vec::new();
    let mut open_freeze: HashMap<u32, u128> = HashMap::new();
    for e in &events {
        let target: u32 = e.key.parse().unwrap_or(0);
        match e.kind.as_str() {
            "freeze" => {
                open_freeze.insert(target, e.at);
            }
            "thaw" => {
                let from = open_freeze.remove(&target).unwrap_or(e.at);
                freezes.entry(target).or_default().push((from, e.at));
            }
            "kill" => kills.push((target, e.at)),
            _ => {}
        }
    }
    let died_at = |pid: u32| kills.iter().find(|(p, _)| *p == pid).map(|(_, at)| *at);
    // Sections.
    let mut sections: Vec<Section> = Vec::new();
    let mut open: HashMap<(u32, String), usize> = HashMap::new();
    for e in &events {
        match e.kind.as_str() {
            "start" => {
                open.insert((e.pid, e.key.clone()), sections.len());
                sections.push(Section {
                    pid: e.pid,
                    key: e.key.clone(),
                    token: e.token,
                    from: e.at,
                    to: died_at(e.pid).unwrap_or(end_of_run),
                    active_to: e.at,
                    frozen: false,
                });
            }
            "end" | "seppuku" => {
                if let Some(i) = open.remove(&(e.pid, e.key.clone())) {
                    sections[i].to = e.at;
                }
            }
            // Ownership is what a successful beat proves, at that moment; writes between beats
            // are the fenced resource's business.
            "beat" => {
                if let Some(&i) = open.get(&(e.pid, e.key.clone())) {
                    sections[i].active_to = e.at;
                }
            }
            _ => {}
        }
    }
    for s in &mut sections {
        s.frozen = freezes
            .get(&s.pid)
            .is_some_and(|f| f.iter().any(|(a, b)| *a < s.to && *b > s.from));
    }
    // Restarts of a store that loses its data forget every lock: from the stop to a second after
    // the start, two holders can overlap (each thinks it holds the lock) until the old one's next
    // recheck. Fencing must still refuse the old one once the new one has written.
    let mut data_loss: Vec<(u128, u128)> = Vec::new();
    let mut restart_began = None;
    for e in &events {
        match e.kind.as_str() {
            "restart" => restart_began = Some(e.at),
            "restarted" => {
                if let Some(from) = restart_began.take() {
                    data_loss.push((from, e.at + 1_000));
                }
            }
            _ => {}
        }
    }
    if !loses_data {
        data_loss.clear();
    }
    let in_data_loss = |at: u128| data_loss.iter().any(|(a, b)| *a <= at && at <= *b);
    // 1. Fencing: a write is stale when a higher token of its key had started before it.
    let mut starts: BTreeMap<String, Vec<(u128, u64)>> = BTreeMap::new();
    for s in &sections {
        starts
            .entry(s.key.clone())
            .or_default()
            .push((s.from, s.token));
    }
    let (mut accepted, mut refused, mut stale_accepted, mut stale_refused, mut fresh_refused) =
        (0, 0, 0, 0, 0);
    let mut stale_accepted_after_data_loss = 0;
    for e in events.iter().filter(|e| e.kind.starts_with("write-")) {
        let ok = e.kind == "write-ok";
        let stale = starts
            .get(&e.key)
            .is_some_and(|v| v.iter().any(|(at, t)| *at < e.at && *t > e.token));
        match (ok, stale) {
            (true, false) => accepted += 1,
            (true, true) if in_data_loss(e.at) => stale_accepted_after_data_loss += 1,
            (true, true) => stale_accepted += 1,
            (false, true) => stale_refused += 1,
            (false, false) => {
                refused += 1;
                fresh_refused += 1
            }
        }
    }
    // 2. Overlaps of active sections among processes that were not frozen. A server restart
    //    that loses data (Redis without persistence) forgets locks: overlaps starting within a
    //    second of one are counted apart (the fencing check above must still hold).
    let (mut overlaps, mut overlaps_after_data_loss) = (0, 0);
    for (i, a) in sections.iter().enumerate() {
        for b in &sections[i + 1..] {
            if a.key == b.key
                && a.pid != b.pid
                && !a.frozen
                && !b.frozen
                && a.from < b.active_to
                && b.from < a.active_to
            {
                let start = a.from.max(b.from);
                if in_data_loss(start) {
                    overlaps_after_data_loss += 1;
                } else {
                    overlaps += 1;
                    println!("  overlap: {a:?} / {b:?}");
                }
            }
        }
    }
    // 3. Seppuku: frozen holders whose lock was taken over during the freeze.
    let mut taken_over_while_frozen = 0;
    let mut seppukus = 0;
    let mut ended_on_waking = 0;
    for s in sections.iter().filter(|s| s.frozen) {
        let Some(freeze) = freezes
            .get(&s.pid)
            .and_then(|f| f.iter().find(|(a, b)| *a < s.to && *b > s.from))
        else {
            continue;
        };
        let taken = sections.iter().any(|o| {
            o.key == s.key
                && o.pid != s.pid
                && o.from > freeze.0
                && o.from < freeze.1 + 5_000
                && o.token > s.token
        });
        if taken && died_at(s.pid).map_or(true, |d| d > freeze.1) {
            let after_thaw: Vec<&Event> = events
                .iter()
                .filter(|e| e.pid == s.pid && e.key == s.key && e.token == s.token)
                .filter(|e| e.at >= freeze.1)
                .collect();
            // Frozen after its last beat, it only logs its end on waking and touches nothing:
            // nothing to stop.
            if !after_thaw.is_empty() && after_thaw.iter().all(|e| e.kind == "end") {
                ended_on_waking += 1;
                continue;
            }
            taken_over_while_frozen += 1;
            if after_thaw.iter().any(|e| e.kind == "seppuku") {
                seppukus += 1;
            } else {
                println!("  no seppuku: {s:?} (frozen {freeze:?})");
            }
        }
    }
    // 4. Every job held by a killed worker is picked up again.
    let mut takeover_ms = Vec::new();
    let mut lost_jobs = 0;
    for (pid, at) in &kills {
        for s in sections.iter().filter(|s| s.pid == *pid && s.to == *at) {
            match sections
                .iter()
                .filter(|o| o.key == s.key && o.from > *at)
                .map(|o| o.from)
                .min()
            {
                Some(next) => takeover_ms.push(next - at),
                None => lost_jobs += 1,
            }
        }
    }
    takeover_ms.sort_unstable();
    let sections_done = sections.len();
    println!(
        "  critical sections: {sections_done}; kills: {}; freezes: {}",
        kills.len(),
        freezes.values().map(Vec::len).sum::<usize>()
    );
    println!("  fenced writes accepted: {accepted}; refused: {refused}");
    println!("  stale writes (a newer holder had started): refused {stale_refused}, accepted {stale_accepted} (fencing violations; {stale_accepted_after_data_loss} more right after a restart that lost the store's data, before the new holder's first write)");
    println!("  writes of a current holder refused: {fresh_refused}");
    println!("  overlapping sections among processes not frozen: {overlaps} (and {overlaps_after_data_loss} right after a restart that lost the server's data)");
    println!("  frozen holders taken over: {taken_over_while_frozen}; seppukus at their next beat: {seppukus} (and {ended_on_waking} frozen after their last beat, which ended without touching the resource)");
    if takeover_ms.is_empty() {
        println!("  jobs of killed holders picked up again: none killed while holding");
    } else {
        println!(
            "  jobs of killed holders picked up again: {} of {} (takeover p50 {} ms, max {} ms)",
            takeover_ms.len(),
            takeover_ms.len() + lost_jobs,
            takeover_ms[takeover_ms.len() / 2],
            takeover_ms.last().copied().unwrap_or_default()
        );
    }
    let ok = stale_accepted == 0
        && fresh_refused == 0
        && overlaps == 0
        && seppukus == taken_over_while_frozen
        && lost_jobs == 0
        && sections_done > 0;
    println!("  verdict: {}", if ok { "PASS" } else { "FAIL" });
    ok
}
