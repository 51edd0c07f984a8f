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

use locker::{Leadership, LockAttempt, Locker, PermitAttempt, Wait};
use locker_conformance::servers::{self, Server, ServerControl, ServerKind};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Worker timings: a takeover needs the liveness TTL to pass.
const LIVENESS: Duration = Duration::from_secs(2);
const REPORT: Duration = Duration::from_millis(300);
const RECHECK: Duration = Duration::from_millis(100);

/// The semaphore the workers share, and its permits; and the election they campaign in.
const SEMAPHORE: &str = "chaos-sem";
const PERMITS: u32 = 2;
const ELECTION: &str = "chaos-leader";

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default()
}

/// Microseconds since the epoch: the moments a call returned (an acquire, a beat), compared across
/// processes by the checker; finer than the log lines' milliseconds so that a beat and another
/// process's acquire a few hundred microseconds apart are told apart.
fn now_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
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

/// A fenced write, logged with the moments it was sent and returned (µs): its line may be
/// written much later (a freeze right after the write), and the checker judges a write by
/// when it was sent, not by its line.
async fn timed_write(dir: &Path, pool: &sqlx::SqlitePool, key: &str, token: u64) {
    let sent_us = now_us();
    let ok = fenced_write(pool, key, token).await;
    let returned_us = now_us();
    log(
        dir,
        &format!(
            "write-{} {key} {token} {sent_us} {returned_us}",
            if ok { "ok" } else { "refused" }
        ),
    );
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
        // The plain keys, the semaphore and the election, in turn at random.
        let pick = (n >> 33) as usize % (keys + 2);
        // When the attempt began: a freeze between here and the start line below (during the
        // call, or after it returned but before `acquired_us`) leaves the moment the lock was
        // ours unknown to the checker, which then counts the section as frozen.
        let tried_us = now_us();
        let attempt = if pick < keys {
            match locker.acquire(format!("chaos-{pick}")).await {
                Ok(LockAttempt::Acquired(g)) => Some(g),
                Ok(LockAttempt::Held(_)) | Err(_) => None,
            }
        } else if pick == keys {
            match locker.semaphore(SEMAPHORE, PERMITS) {
                Ok(sem) => match sem.try_acquire().await {
                    Ok(PermitAttempt::Acquired(g)) => Some(g),
                    Ok(PermitAttempt::Full(_)) | Err(_) => None,
                },
                Err(_) => None,
            }
        } else {
            match locker.election(ELECTION) {
                Ok(election) => election
                    .campaign(Wait::up_to(Duration::ZERO))
                    .await
                    .ok()
                    .map(Leadership::into_guard),
                Err(_) => None,
            }
        };
        // Taken before anything else: the line below may be written much later (a freeze).
        let acquired_us = now_us();
        let Some(guard) = attempt else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // A permit's key is its slot's: each slot is checked as a lock, and the semaphore as a
        // whole for its count.
        let key = guard.key().to_owned();
        let token = guard.fencing_token().unwrap_or(0);
        let hb = guard.heartbeat();
        log(
            dir,
            &format!(
                "start {key} {token} {acquired_us} {} {tried_us}",
                guard.owner_hash()
            ),
        );
        // Register the token with the resource at once: from here on it refuses older holders.
        timed_write(dir, &pool, &key, token).await;
        let mut lost = false;
        for _ in 0..4 {
            // Work without beating, then write: a worker frozen here wakes up and writes with
            // its old token before its next beat, the case only fencing can stop.
            tokio::time::sleep(Duration::from_millis(100)).await;
            timed_write(dir, &pool, &key, token).await;
            let beat = hb.beat().await;
            // The moment the beat returned, the only moment it proves ownership at; its line
            // may be written later (a freeze right after the beat).
            let returned_us = now_us();
            if let Err(e) = beat {
                if e.kind() == locker::ErrorKind::LockLost {
                    log(dir, &format!("seppuku {key} {token}"));
                }
                lost = true;
                break;
            }
            log(dir, &format!("beat {key} {token} {returned_us}"));
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
    /// When the line was written (ms since the epoch).
    at: u128,
    pid: u32,
    kind: String,
    key: String,
    token: u64,
    /// `start`: when the acquire returned; `beat`: when the beat returned; `write-…`: when the
    /// write returned (µs since the epoch). All come before the line is written, maybe long
    /// before (a freeze in between).
    returned_us: Option<u128>,
    /// `write-…`: when the write was sent; `start`: when the attempt began (µs since the
    /// epoch).
    sent_us: Option<u128>,
}

fn read_events(dir: &Path) -> Vec<Event> {
    parse_events(&std::fs::read_to_string(dir.join("events")).unwrap_or_default())
}

/// Lines `{ms} {pid} {kind} [{key} [{token} [{µs} ...]]]`; the controller's lines carry the
/// target pid as the key.
fn parse_events(text: &str) -> Vec<Event> {
    text.lines()
        .filter_map(|l| {
            let mut p = l.split(' ');
            let at = p.next()?.parse().ok()?;
            let pid = p.next()?.parse().ok()?;
            let kind = p.next()?.to_owned();
            let a = p.next().unwrap_or_default().to_owned();
            let b = p.next().unwrap_or_default();
            let (sent_us, returned_us) = match kind.as_str() {
                "start" => {
                    let returned = p.next().and_then(|c| c.parse().ok());
                    // The owner hash, then when the attempt began.
                    let _owner = p.next();
                    (p.next().and_then(|c| c.parse().ok()), returned)
                }
                "beat" => (None, p.next().and_then(|c| c.parse().ok())),
                k if k.starts_with("write-") => {
                    let sent = p.next().and_then(|c| c.parse().ok());
                    (sent, p.next().and_then(|c| c.parse().ok()))
                }
                _ => (None, None),
            };
            Some(Event {
                at,
                pid,
                kind,
                key: a,
                token: b.parse().unwrap_or(0),
                returned_us,
                sent_us,
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
    /// When its acquire returned (µs); the lock was this section's from then at the latest.
    acquired_us: u128,
    /// When its attempt began (ms): a freeze of its process from then on puts the moment it
    /// held the lock in doubt (the line's `acquired_us` may have been taken after the freeze).
    tried: u128,
    to: u128,
    active_to: u128,
    frozen: bool,
}

/// What the checker found in a log.
#[derive(Debug, Default)]
struct Figures {
    sections: usize,
    kills: usize,
    freezes: usize,
    accepted: usize,
    refused: usize,
    stale_refused: usize,
    stale_accepted: usize,
    stale_accepted_after_data_loss: usize,
    /// Stale writes accepted before any write of the newer holder: fencing cannot refuse a
    /// token it has not seen yet, and such a write is ordered before every write of the newer
    /// holder (a frozen holder that woke between the newer holder's acquire and its first
    /// write). Not a violation; counted apart.
    stale_accepted_before_newer_write: usize,
    fresh_refused: usize,
    overlaps: usize,
    overlaps_after_data_loss: usize,
    /// Beats that returned `Ok` when another process's acquire of the key, with a higher token,
    /// had already returned: frozen or not, the lock promised what was no longer true.
    beats_ok_while_held: usize,
    beats_ok_while_held_after_data_loss: usize,
    taken_over_while_frozen: usize,
    seppukus: usize,
    ended_on_waking: usize,
    takeover_ms: Vec<u128>,
    lost_jobs: usize,
    /// The semaphore's sections, and the most of them active at once among processes not
    /// frozen (outside a restart that lost the data): at most `PERMITS`.
    semaphore_sections: usize,
    semaphore_most: usize,
    /// The election's terms (sections).
    election_sections: usize,
    /// One line per violation found, for the report.
    notes: Vec<String>,
}

impl Figures {
    fn ok(&self) -> bool {
        self.stale_accepted == 0
            && self.fresh_refused == 0
            && self.overlaps == 0
            && self.beats_ok_while_held == 0
            && self.seppukus == self.taken_over_while_frozen
            && self.lost_jobs == 0
            && self.semaphore_most <= PERMITS as usize
            && self.sections > 0
    }

    fn print(&self) {
        for n in &self.notes {
            println!("  {n}");
        }
        println!(
            "  critical sections: {}; kills: {}; freezes: {}",
            self.sections, self.kills, self.freezes
        );
        println!(
            "  fenced writes accepted: {}; refused: {}",
            self.accepted, self.refused
        );
        println!("  stale writes (a newer holder had started): refused {}, accepted {} (fencing violations: after a write of the newer holder; {} more before the newer holder's first write, which fencing cannot refuse yet; {} more right after a restart that lost the store's data)", self.stale_refused, self.stale_accepted, self.stale_accepted_before_newer_write, self.stale_accepted_after_data_loss);
        println!(
            "  writes of a current holder refused: {}",
            self.fresh_refused
        );
        println!("  overlapping sections among processes not frozen: {} (and {} right after a restart that lost the server's data)", self.overlaps, self.overlaps_after_data_loss);
        println!("  beats Ok while another held the lock: {} (frozen or not; and {} right after a restart that lost the server's data)", self.beats_ok_while_held, self.beats_ok_while_held_after_data_loss);
        println!("  frozen holders taken over: {}; seppukus at their next beat: {} (and {} frozen after their last beat, which ended without touching the resource)", self.taken_over_while_frozen, self.seppukus, self.ended_on_waking);
        if self.takeover_ms.is_empty() {
            println!("  jobs of killed holders picked up again: none killed while holding");
        } else {
            println!(
                "  jobs of killed holders picked up again: {} of {} (takeover p50 {} ms, max {} ms)",
                self.takeover_ms.len(),
                self.takeover_ms.len() + self.lost_jobs,
                self.takeover_ms[self.takeover_ms.len() / 2],
                self.takeover_ms.last().copied().unwrap_or_default()
            );
        }
        println!(
            "  semaphore {SEMAPHORE:?} ({PERMITS} permits): {} sections; most holders beating at once among processes not frozen: {} (its permits are also checked above, each as a lock)",
            self.semaphore_sections, self.semaphore_most
        );
        println!(
            "  election {ELECTION:?}: {} terms (checked above as a lock: one leader beating at once)",
            self.election_sections
        );
        println!("  verdict: {}", if self.ok() { "PASS" } else { "FAIL" });
    }
}

fn check(dir: &Path, loses_data: bool) -> bool {
    let figures = analyse(&read_events(dir), loses_data);
    figures.print();
    figures.ok()
}

fn analyse(events: &[Event], loses_data: bool) -> Figures {
    let mut f = Figures::default();
    let end_of_run = events.last().map(|e| e.at).unwrap_or_default();
    // Freezes and kills, by worker pid (the controller logs the pid as the event's key).
    let mut freezes: HashMap<u32, Vec<(u128, u128)>> = HashMap::new();
    let mut kills: Vec<(u32, u128)> = Vec::new();
    let mut open_freeze: HashMap<u32, u128> = HashMap::new();
    for e in events {
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
    for e in events {
        match e.kind.as_str() {
            "start" => {
                open.insert((e.pid, e.key.clone()), sections.len());
                sections.push(Section {
                    pid: e.pid,
                    key: e.key.clone(),
                    token: e.token,
                    from: e.at,
                    // Without the field, the line's own time: later than the acquire's return,
                    // so never a false violation below.
                    acquired_us: e.returned_us.unwrap_or(e.at * 1_000),
                    tried: e.sent_us.map_or(e.at, |us| us / 1_000),
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
            .is_some_and(|f| f.iter().any(|(a, b)| *a < s.to && *b > s.tried));
    }
    // Restarts of a store that loses its data forget every lock: from the stop to a second after
    // the start, two holders can overlap (each thinks it holds the lock) until the old one's next
    // recheck. Fencing must still refuse the old one once the new one has written.
    let mut data_loss: Vec<(u128, u128)> = Vec::new();
    let mut restart_began = None;
    for e in events {
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
    for e in events.iter().filter(|e| e.kind.starts_with("write-")) {
        let ok = e.kind == "write-ok";
        let stale = starts
            .get(&e.key)
            .is_some_and(|v| v.iter().any(|(at, t)| *at < e.at && *t > e.token));
        // The newer holder's first accepted write, by when it returned (µs; for lines without
        // the field, when its line was written, which is later): a stale write *sent* after that
        // reached a resource that had seen the newer token, and its acceptance is a violation.
        // One sent before may have been applied before it: fencing cannot refuse a token it
        // has not seen yet. Judged by the moment the write was sent, not by its line, which a
        // freeze between the write and the line can delay past the newer write (seen once in
        // CI: a write logged 686 ms after the newer holder's first write).
        let newer_first_write = || {
            events
                .iter()
                .filter(|w| w.kind == "write-ok" && w.key == e.key && w.token > e.token)
                .map(|w| w.returned_us.unwrap_or(w.at * 1_000))
                .min()
        };
        // Without the field, the line's time: later than the sending, so never a missed
        // violation.
        let sent = e.sent_us.unwrap_or(e.at * 1_000);
        match (ok, stale) {
            (true, false) => f.accepted += 1,
            (true, true) if in_data_loss(e.at) => f.stale_accepted_after_data_loss += 1,
            (true, true) if newer_first_write().map_or(true, |w| sent < w) => {
                f.stale_accepted_before_newer_write += 1
            }
            (true, true) => {
                f.stale_accepted += 1;
                f.notes.push(format!(
                    "stale write accepted: {} token {} sent at {sent} us (pid {}), after the first write of a newer holder returned at {:?} us",
                    e.key,
                    e.token,
                    e.pid,
                    newer_first_write()
                ));
            }
            (false, true) => f.stale_refused += 1,
            (false, false) => {
                f.refused += 1;
                f.fresh_refused += 1
            }
        }
    }
    // 2. Overlaps of active sections among processes that were not frozen. A server restart
    //    that loses data (Redis without persistence) forgets locks: overlaps starting within a
    //    second of one are counted apart (the fencing check above must still hold).
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
                    f.overlaps_after_data_loss += 1;
                } else {
                    f.overlaps += 1;
                    f.notes.push(format!("overlap: {a:?} / {b:?}"));
                }
            }
        }
    }
    // 3. Beats Ok while another process held the lock, frozen or not: a beat of P for key K
    //    that returned (µs, taken when the call returned, not when the line was written) at or
    //    after the return of another process's acquire of K with a higher token. That acquire
    //    had replaced P's lock before it returned, so the beat promised what was no longer true.
    //    A beat that returned before the acquire did is fine, however late its line was written.
    //    Takeovers within a second of a restart that lost the store's data are counted apart.
    for e in events.iter().filter(|e| e.kind == "beat") {
        let Some(returned) = e.returned_us else {
            continue;
        };
        let holder = sections
            .iter()
            .filter(|q| {
                q.key == e.key && q.pid != e.pid && q.token > e.token && q.acquired_us <= returned
            })
            .min_by_key(|q| q.acquired_us);
        let Some(q) = holder else {
            continue;
        };
        if in_data_loss(q.acquired_us / 1_000) {
            f.beats_ok_while_held_after_data_loss += 1;
        } else {
            f.beats_ok_while_held += 1;
            let frozen = freezes.get(&e.pid).is_some_and(|v| {
                v.iter()
                    .any(|(a, b)| *a * 1_000 <= returned && q.acquired_us <= *b * 1_000)
            });
            f.notes.push(format!(
                "beat Ok while another held the lock: pid {} key {} token {} (frozen: {frozen}) beat returned at {returned} us, {} us after pid {} (token {}) acquired it",
                e.pid,
                e.key,
                e.token,
                returned - q.acquired_us,
                q.pid,
                q.token
            ));
        }
    }
    // 4. Seppuku: frozen holders whose lock was taken over during the freeze.
    for s in sections.iter().filter(|s| s.frozen) {
        let Some(freeze) = freezes
            .get(&s.pid)
            .and_then(|f| f.iter().find(|(a, b)| *a < s.to && *b > s.from))
        else {
            continue;
        };
        // Taken over while it held the lock: another section of the key began after the
        // freeze began and before this one ended. (A successor after its end is a plain
        // hand-off: seen in CI after a section that began as its process woke, 1 ms before the
        // thaw line, and ended normally.)
        let taken = sections.iter().any(|o| {
            o.key == s.key
                && o.pid != s.pid
                && o.from > freeze.0
                && o.from < freeze.1 + 5_000
                && o.from < s.to
                && o.token > s.token
        });
        if taken && died_at(s.pid).map_or(true, |d| d > freeze.1) {
            let after_thaw: Vec<&Event> = events
                .iter()
                .filter(|e| e.pid == s.pid && e.key == s.key && e.token == s.token)
                // After the freeze began, not after the thaw line: the controller writes that
                // line after SIGCONT, and the woken worker may log before it does (seen: an end
                // line 1 ms before the thaw line). The freeze line is written after SIGSTOP, so
                // whatever a worker logs after it, it logs on waking.
                .filter(|e| e.at > freeze.0)
                .collect();
            // Frozen after its last beat, it only logs its end on waking and touches nothing:
            // nothing to stop.
            if !after_thaw.is_empty() && after_thaw.iter().all(|e| e.kind == "end") {
                f.ended_on_waking += 1;
                continue;
            }
            f.taken_over_while_frozen += 1;
            if after_thaw.iter().any(|e| e.kind == "seppuku") {
                f.seppukus += 1;
            } else {
                f.notes
                    .push(format!("no seppuku: {s:?} (frozen {freeze:?})"));
            }
        }
    }
    // 5. Every job held by a killed worker is picked up again.
    for (pid, at) in &kills {
        for s in sections.iter().filter(|s| s.pid == *pid && s.to == *at) {
            match sections
                .iter()
                .filter(|o| o.key == s.key && o.from > *at)
                .map(|o| o.from)
                .min()
            {
                Some(next) => f.takeover_ms.push(next - at),
                None => f.lost_jobs += 1,
            }
        }
    }
    // 6. The semaphore as a whole: never more than `PERMITS` of its sections active at once
    //    (from the start to the last successful beat) among processes that were not frozen;
    //    frozen holders are checked per permit by 3. Touching ends do not overlap (as in 2).
    let permit_prefix = format!("{SEMAPHORE}#permit");
    let mut edges: Vec<(u128, i32)> = Vec::new();
    for s in sections
        .iter()
        .filter(|s| s.key.starts_with(&permit_prefix))
    {
        f.semaphore_sections += 1;
        if !s.frozen && s.active_to > s.from && !in_data_loss(s.from) {
            edges.push((s.from, 1));
            edges.push((s.active_to, -1));
        }
    }
    edges.sort_unstable();
    let mut active = 0i32;
    for (at, step) in edges {
        active += step;
        if active > PERMITS as i32 && f.semaphore_most <= PERMITS as usize {
            f.notes.push(format!(
                "{active} holders of the semaphore {SEMAPHORE:?} ({PERMITS} permits) active at {at} ms"
            ));
        }
        f.semaphore_most = f.semaphore_most.max(usize::try_from(active).unwrap_or(0));
    }
    f.election_sections = sections.iter().filter(|s| s.key == ELECTION).count();
    f.takeover_ms.sort_unstable();
    f.sections = sections.len();
    f.kills = kills.len();
    f.freezes = freezes.values().map(Vec::len).sum();
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The controller's pid in the synthetic logs; workers are 100 (P) and 200 (Q).
    fn analyse_log(log: &str) -> Figures {
        let events = parse_events(log);
        assert!(!events.is_empty());
        analyse(&events, false)
    }

    #[test]
    fn a_frozen_holders_ok_beat_after_a_takeover_is_a_violation() {
        // P beats, is frozen, Q takes over (its acquire returns at 4,000.000 ms); P wakes and its
        // next beat returns Ok at 4,205.000 ms (a stale reply), then its write is refused and its
        // following beat fails. Every other check passes: only the new one sees it.
        let f = analyse_log(
            "1000 100 start chaos-0 5 999500 chaos-0@h/100.1.1
1001 100 write-ok chaos-0 5
1101 100 write-ok chaos-0 5
1102 100 beat chaos-0 5 1101900
1150 1 freeze 100
4001 200 start chaos-0 6 4000000 chaos-0@h/200.1.1
4002 200 write-ok chaos-0 6
4102 200 write-ok chaos-0 6
4103 200 beat chaos-0 6 4102900
4200 1 thaw 100
4203 200 write-ok chaos-0 6
4204 200 beat chaos-0 6 4203900
4206 100 beat chaos-0 5 4205000
4306 100 write-refused chaos-0 5
4307 100 seppuku chaos-0 5
4308 200 write-ok chaos-0 6
4309 200 beat chaos-0 6 4308900
4310 200 end chaos-0 6
",
        );
        assert_eq!(f.beats_ok_while_held, 1, "{f:?}");
        assert_eq!(f.notes.len(), 1, "{f:?}");
        assert!(f.notes[0].contains("frozen: true"), "{f:?}");
        assert_eq!((f.stale_accepted, f.fresh_refused, f.overlaps), (0, 0, 0));
        assert_eq!((f.taken_over_while_frozen, f.seppukus), (1, 1));
        assert!(!f.ok());
    }

    #[test]
    fn a_freeze_between_the_attempt_and_its_start_line_makes_the_section_frozen() {
        // P's attempt begins at 1,000 ms and returns a lock; P is frozen before it writes its
        // start line (or reads the clock for it), Q takes over at 3,500 ms, P wakes at
        // 4,000 ms, writes its start line, and its first beat fails. When P held the lock is
        // unknown (before the freeze): its section is frozen, not an overlap; its stale write
        // is still checked (refused).
        let log = "1001 1 freeze 100
3501 200 start chaos-0 6 3500000 chaos-0@h/200.1.1 3499000
3502 200 write-ok chaos-0 6
3602 200 write-ok chaos-0 6
3603 200 beat chaos-0 6 3602900
4000 1 thaw 100
4002 100 start chaos-0 5 4001900 chaos-0@h/100.1.1 1000000
4003 100 write-refused chaos-0 5
4103 100 seppuku chaos-0 5
4203 200 write-ok chaos-0 6
4204 200 beat chaos-0 6 4203900
4310 200 end chaos-0 6
";
        let f = analyse_log(log);
        assert_eq!(
            (f.overlaps, f.stale_accepted, f.stale_refused),
            (0, 0, 1),
            "{f:?}"
        );
        assert!(f.ok(), "{f:?}");
        // An attempt that began after the thaw proves ownership at its start line: an overlap.
        let f = analyse_log(&log.replace("chaos-0@h/100.1.1 1000000", "chaos-0@h/100.1.1 4000500"));
        assert_eq!(f.overlaps, 1, "{f:?}");
        assert!(!f.ok());
    }

    #[test]
    fn a_stale_write_before_the_newer_holders_first_write_is_counted_apart() {
        // P is frozen and taken over by Q (acquire returned at 4,000 ms); P wakes at 4,100 ms
        // and writes before Q's first write lands: the resource has not seen 6 yet. Then P's
        // next write comes after Q's: refused, as fencing promises.
        let log = "1000 100 start chaos-0 5 999500 chaos-0@h/100.1.1
1001 100 write-ok chaos-0 5
1150 1 freeze 100
4001 200 start chaos-0 6 4000000 chaos-0@h/200.1.1
4100 1 thaw 100
4101 100 write-ok chaos-0 5
4102 200 write-ok chaos-0 6
4150 100 write-refused chaos-0 5
4151 100 seppuku chaos-0 5
4203 200 write-ok chaos-0 6
4204 200 beat chaos-0 6 4203900
4310 200 end chaos-0 6
";
        let f = analyse_log(log);
        assert_eq!(
            (
                f.stale_accepted,
                f.stale_accepted_before_newer_write,
                f.stale_refused
            ),
            (0, 1, 1),
            "{f:?}"
        );
        assert!(f.ok(), "{f:?}");
        // Had it been accepted after Q's first write, it would be a violation.
        let f = analyse_log(&log.replace("4101 100 write-ok", "4103 100 write-ok"));
        assert_eq!(
            (f.stale_accepted, f.stale_accepted_before_newer_write),
            (1, 0)
        );
        assert!(!f.ok());
    }

    #[test]
    fn a_beat_that_returned_before_the_takeover_is_fine_however_late_its_line() {
        // P's beat returns at 1,101.900 ms, P is frozen before writing its line; Q's acquire
        // returns at 4,000.000 ms; P wakes, writes the beat's line at 4,201 ms (after Q's start
        // line), its write is refused, and its next beat fails. Then a plain hand-off: Q ends,
        // P starts again with a higher token. No violation.
        let f = analyse_log(
            "1000 100 start chaos-0 5 999500 chaos-0@h/100.1.1
1001 100 write-ok chaos-0 5
1101 100 write-ok chaos-0 5
1102 1 freeze 100
4001 200 start chaos-0 6 4000000 chaos-0@h/200.1.1
4002 200 write-ok chaos-0 6
4102 200 write-ok chaos-0 6
4103 200 beat chaos-0 6 4102900
4200 1 thaw 100
4201 100 beat chaos-0 5 1101900
4203 200 write-ok chaos-0 6
4204 200 beat chaos-0 6 4203900
4205 200 end chaos-0 6
4301 100 write-refused chaos-0 5
4302 100 seppuku chaos-0 5
4400 100 start chaos-0 7 4399800 chaos-0@h/100.1.2
4401 100 write-ok chaos-0 7
4501 100 write-ok chaos-0 7
4502 100 beat chaos-0 7 4501900
4503 100 end chaos-0 7
",
        );
        assert_eq!(f.beats_ok_while_held, 0, "{f:?}");
        assert!(f.notes.is_empty(), "{f:?}");
        assert_eq!((f.taken_over_while_frozen, f.seppukus), (1, 1));
        assert!(f.ok(), "{f:?}");
    }

    #[test]
    fn a_holder_frozen_after_its_last_beat_may_log_its_end_before_the_thaw_line() {
        // P beats, is frozen, Q takes over; P is woken by SIGCONT and logs its end 1 ms before
        // the controller writes the thaw line. P touched nothing after waking: no seppuku due.
        let f = analyse_log(
            "1000 100 start chaos-0 5 999500 chaos-0@h/100.1.1
1001 100 write-ok chaos-0 5
1101 100 write-ok chaos-0 5
1102 100 beat chaos-0 5 1101900
1150 1 freeze 100
4001 200 start chaos-0 6 4000000 chaos-0@h/200.1.1
4002 200 write-ok chaos-0 6
4102 200 beat chaos-0 6 4101900
4199 100 end chaos-0 5
4200 1 thaw 100
4203 200 write-ok chaos-0 6
4204 200 beat chaos-0 6 4203900
4205 200 end chaos-0 6
",
        );
        assert!(f.notes.is_empty(), "{f:?}");
        assert_eq!(f.ended_on_waking, 1, "{f:?}");
        assert!(f.ok(), "{f:?}");
    }

    #[test]
    fn a_stale_write_is_judged_by_when_it_was_sent_not_by_its_line() {
        // P's write with token 5 is sent at 1,100.000 ms and returns; P is frozen before its
        // line; Q takes over and its first write returns at 4,002.500 ms; P wakes and writes
        // the old write's line at 4,101 ms. The resource applied it before Q's: no violation.
        let log = "1000 100 start chaos-0 5 999500 chaos-0@h/100.1.1
1001 100 write-ok chaos-0 5 1000200 1000900
1150 1 freeze 100
4001 200 start chaos-0 6 4000000 chaos-0@h/200.1.1
4003 200 write-ok chaos-0 6 4002000 4002500
4100 1 thaw 100
4101 100 write-ok chaos-0 5 1100000 1100800
4150 100 write-refused chaos-0 5 4149000 4149700
4151 100 seppuku chaos-0 5
4203 200 write-ok chaos-0 6 4202000 4202600
4204 200 beat chaos-0 6 4203900
4310 200 end chaos-0 6
";
        let f = analyse_log(log);
        assert_eq!(
            (f.stale_accepted, f.stale_accepted_before_newer_write),
            (0, 1),
            "{f:?}"
        );
        assert!(f.ok(), "{f:?}");
        // Sent after Q's first write had returned, and accepted: a violation.
        let f = analyse_log(&log.replace(
            "4101 100 write-ok chaos-0 5 1100000 1100800",
            "4101 100 write-ok chaos-0 5 4100500 4100900",
        ));
        assert_eq!(
            (f.stale_accepted, f.stale_accepted_before_newer_write),
            (1, 0),
            "{f:?}"
        );
        assert!(!f.ok());
    }

    #[test]
    fn a_section_that_begins_as_its_process_wakes_is_not_taken_over_by_its_successor() {
        // P is frozen; its acquire, sent on waking, returns 1 ms before the controller's thaw
        // line; P's section ends normally; Q takes the key after it. No takeover, no seppuku due.
        let f = analyse_log(
            "1000 100 start chaos-0 5 999500 chaos-0@h/100.1.1
1001 100 write-ok chaos-0 5 1000200 1000900
1102 100 beat chaos-0 5 1101900
1103 100 end chaos-0 5
1150 1 freeze 100
4038 100 start chaos-0 7 4038000 chaos-0@h/100.1.2
4039 1 thaw 100
4040 100 write-ok chaos-0 7 4039100 4039900
4448 100 beat chaos-0 7 4447900
4449 100 end chaos-0 7
4500 200 start chaos-0 8 4499900 chaos-0@h/200.1.1
4501 200 write-ok chaos-0 8 4500100 4500900
4602 200 beat chaos-0 8 4601900
4603 200 end chaos-0 8
",
        );
        assert_eq!((f.taken_over_while_frozen, f.seppukus), (0, 0), "{f:?}");
        assert!(f.notes.is_empty(), "{f:?}");
        assert!(f.ok(), "{f:?}");
    }

    #[test]
    fn more_semaphore_holders_than_permits_is_a_violation() {
        // Three processes hold permits of a semaphore of 2 at once (a third slot that should
        // not exist): each slot alone is fine, the semaphore is not.
        let log = "1000 100 start chaos-sem#permit0 1 999500 o1
1001 200 start chaos-sem#permit1 1 1000500 o2
1002 300 start chaos-sem#permit2 1 1001500 o3
1100 100 beat chaos-sem#permit0 1 1099900
1101 200 beat chaos-sem#permit1 1 1100900
1102 300 beat chaos-sem#permit2 1 1101900
1103 100 end chaos-sem#permit0 1
1104 200 end chaos-sem#permit1 1
1105 300 end chaos-sem#permit2 1
";
        let f = analyse_log(log);
        assert_eq!((f.semaphore_sections, f.semaphore_most), (3, 3), "{f:?}");
        assert!(!f.ok(), "{f:?}");
        // Two at once, then the third after one ended: fine.
        let f = analyse_log(
            &log.replace("1002 300 start", "1104 300 start")
                .replace("1102 300 beat chaos-sem#permit2 1 1101900\n", "")
                .replace(
                    "1105 300 end",
                    "1106 300 beat chaos-sem#permit2 1 1105900\n1107 300 end",
                ),
        );
        assert_eq!(f.semaphore_most, 2, "{f:?}");
        assert!(f.ok(), "{f:?}");
    }

    #[test]
    fn after_a_restart_that_lost_the_data_it_is_counted_apart() {
        // The store forgot P's lock in a restart; Q acquires right after; P's beat within its
        // recheck interval returns Ok.
        let log = "1000 100 start chaos-0 5 999500 chaos-0@h/100.1.1
1001 100 write-ok chaos-0 5
1100 1 restart server
1300 1 restarted server
1400 200 start chaos-0 6 1399000 chaos-0@h/200.1.1
1401 200 write-ok chaos-0 6
1402 100 beat chaos-0 5 1401500
1450 100 write-refused chaos-0 5
1451 100 seppuku chaos-0 5
1501 200 write-ok chaos-0 6
1502 200 beat chaos-0 6 1501900
1503 200 end chaos-0 6
";
        let f = analyse(&parse_events(log), true);
        assert_eq!(
            (f.beats_ok_while_held, f.beats_ok_while_held_after_data_loss),
            (0, 1)
        );
        assert!(f.ok(), "{f:?}");
        let f = analyse(&parse_events(log), false);
        assert_eq!(f.beats_ok_while_held, 1);
        assert!(!f.ok());
    }
}
