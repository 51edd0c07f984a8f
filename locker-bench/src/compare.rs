//! The lock against the raw protocol (and, on Redis, against `rslock`): acquire + release
//! cycles in short alternating slices, so that every side sees the same machine, with what a
//! cycle costs the server and this process.
//!
//! A run of 3 s of one side then 3 s of the other gave ratios from 0.64 to 0.95 for the same
//! command on this 2-core machine, whose load moves by the second; slices of a few hundred
//! milliseconds, the order rotating each repeat, and the median of the per-repeat ratios agree
//! from run to run.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use locker::Locker;
use nix::sys::resource::{getrusage, UsageWho};

use crate::{histogram, latency, lock_cycles, percentile, raw, raw_cycles, run_tasks, Cli, Stats};

/// One way to do an acquire + release cycle.
#[derive(Clone)]
pub(crate) enum Contender {
    Lock(Locker),
    Raw(Arc<raw::Raw>),
    /// `rslock`'s `LockManager` on one server, and the TTL it sets.
    Rslock(rslock::LockManager, Duration),
    /// The lock with another setting of the backend, named (PostgreSQL's prepared statements).
    Variant(Locker, &'static str),
}

impl Contender {
    fn name(&self) -> &'static str {
        match self {
            Contender::Lock(_) => "lock",
            Contender::Raw(_) => "raw",
            Contender::Rslock(..) => "rslock",
            Contender::Variant(_, name) => name,
        }
    }

    async fn cycles(&self, tag: &str, tasks: usize, duration: Duration) -> Stats {
        match self {
            Contender::Lock(locker) | Contender::Variant(locker, _) => {
                lock_cycles(locker, tag, tasks, duration).await
            }
            Contender::Raw(raw) => raw_cycles(raw, tag, tasks, duration).await,
            Contender::Rslock(manager, ttl) => {
                let (manager, ttl, tag) = (manager.clone(), *ttl, tag.to_owned());
                run_tasks(tasks, duration, move |t, i| {
                    let (manager, key) = (manager.clone(), format!("rslock/{tag}/{t}/{i}"));
                    async move {
                        let lock = manager
                            .lock(key.as_str(), ttl)
                            .await
                            .expect("rslock acquire of a fresh key");
                        manager.unlock(&lock).await;
                    }
                })
                .await
            }
        }
    }
}

/// This process's CPU time so far (user + system, every thread: the runtime's workers and the
/// locker's reporter thread alike).
pub(crate) fn process_cpu() -> Duration {
    getrusage(UsageWho::RUSAGE_SELF)
        .map(|u| {
            let tv = |t: nix::sys::time::TimeVal| {
                Duration::from_secs(t.tv_sec().max(0) as u64)
                    + Duration::from_micros(t.tv_usec().max(0) as u64)
            };
            tv(u.user_time()) + tv(u.system_time())
        })
        .unwrap_or_default()
}

/// A side connection to the Redis server for its statistics: the server process's CPU
/// (`INFO cpu`) and the time per command (`INFO commandstats`, reset before each slice).
pub(crate) struct RedisProbe {
    conn: redis::aio::MultiplexedConnection,
}

/// What the server spent during one slice.
#[derive(Default)]
struct ServerSlice {
    cpu: Duration,
    /// Per command: calls, µs.
    commands: BTreeMap<String, (u64, u64)>,
}

impl RedisProbe {
    pub(crate) async fn connect(url: &str) -> Option<Self> {
        let url = url.split('?').next().unwrap_or(url);
        let conn = redis::Client::open(url)
            .ok()?
            .get_multiplexed_async_connection()
            .await
            .ok()?;
        Some(RedisProbe { conn })
    }

    async fn info(&self, section: &str) -> String {
        let mut c = self.conn.clone();
        redis::cmd("INFO")
            .arg(section)
            .query_async(&mut c)
            .await
            .unwrap_or_default()
    }

    /// The server process's CPU time so far.
    pub(crate) async fn cpu(&self) -> Duration {
        let info = self.info("cpu").await;
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        Duration::from_secs_f64(field("used_cpu_user:") + field("used_cpu_sys:"))
    }

    async fn start(&self) -> Duration {
        let mut c = self.conn.clone();
        let _: Result<(), _> = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut c)
            .await;
        self.cpu().await
    }

    async fn end(&self, cpu_before: Duration) -> ServerSlice {
        let cpu = self.cpu().await.saturating_sub(cpu_before);
        let info = self.info("commandstats").await;
        let commands = info
            .lines()
            .filter_map(|l| {
                let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
                // The probe's own commands.
                if matches!(name, "info" | "config" | "config|resetstat") {
                    return None;
                }
                let field = |f: &str| {
                    rest.split(',')
                        .find_map(|x| x.strip_prefix(f))
                        .and_then(|v| v.parse::<u64>().ok())
                };
                Some((name.to_owned(), (field("calls=")?, field("usec=")?)))
            })
            .collect();
        ServerSlice { cpu, commands }
    }
}

/// One contender's slices, merged.
struct Side {
    cycles: u64,
    elapsed: Duration,
    hist: Histogram<u64>,
    client_cpu: Duration,
    server_cpu: Duration,
    commands: BTreeMap<String, (u64, u64)>,
    /// Cycles per second of each repeat's slice.
    rates: Vec<f64>,
}

impl Side {
    fn new() -> Self {
        Side {
            cycles: 0,
            elapsed: Duration::ZERO,
            hist: histogram(),
            client_cpu: Duration::ZERO,
            server_cpu: Duration::ZERO,
            commands: BTreeMap::new(),
            rates: Vec::new(),
        }
    }

    fn rate(&self) -> f64 {
        self.cycles as f64 / self.elapsed.as_secs_f64()
    }

    fn latency(&self) -> String {
        latency(&self.hist)
    }

    fn per_cycle_us(&self, d: Duration) -> f64 {
        d.as_secs_f64() * 1e6 / self.cycles.max(1) as f64
    }

    /// `commandstats` per cycle: `evalsha 2.0 × 5.1 µs`, ...
    fn commands(&self) -> String {
        let per = self.cycles.max(1) as f64;
        self.commands
            .iter()
            .map(|(name, &(calls, usec))| {
                format!(
                    "{name} {:.2} calls, {:.2} µs",
                    calls as f64 / per,
                    usec as f64 / per
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Per-repeat ratios of `a` to `b`, as `median (min–max)`, and the list.
fn ratios(a: &Side, b: &Side) -> (String, String) {
    let mut r: Vec<f64> = a.rates.iter().zip(&b.rates).map(|(x, y)| x / y).collect();
    let list = r
        .iter()
        .map(|x| format!("{x:.2}"))
        .collect::<Vec<_>>()
        .join(" ");
    r.sort_by(f64::total_cmp);
    (
        format!(
            "**{:.2}** ({:.2}–{:.2})",
            percentile(&r, 0.5),
            r.first().copied().unwrap_or_default(),
            r.last().copied().unwrap_or_default()
        ),
        list,
    )
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "–".to_owned()
    }
}

/// The cycle, cost and (on Redis) `rslock` tables of one backend.
pub(crate) async fn cycles(
    cli: &Cli,
    backend: &str,
    contenders: &[Contender],
    probe: Option<&RedisProbe>,
) {
    // Warm up every side (connections, scripts, the reporter).
    for c in contenders {
        let _ = c.cycles("warm", 4, Duration::from_millis(300)).await;
    }
    let n = contenders.len();
    let mut results = Vec::new();
    for (label, tasks) in [("sequential", 1), ("concurrent", cli.tasks)] {
        let mut sides: Vec<Side> = (0..n).map(|_| Side::new()).collect();
        for repeat in 0..cli.repeats {
            // Rotate which side goes first, so that none always follows another.
            for k in 0..n {
                let i = (repeat + k) % n;
                let c = &contenders[i];
                let tag = format!("{label}/{repeat}/{}", std::process::id());
                let server_before = match probe {
                    Some(p) => Some(p.start().await),
                    None => None,
                };
                let cpu_before = process_cpu();
                let t0 = Instant::now();
                let stats = c.cycles(&tag, tasks, cli.slice).await;
                let elapsed = t0.elapsed();
                let client_cpu = process_cpu().saturating_sub(cpu_before);
                let server = match (probe, server_before) {
                    (Some(p), Some(before)) => p.end(before).await,
                    _ => ServerSlice::default(),
                };
                let s = &mut sides[i];
                let cycles = stats.hist.len();
                s.cycles += cycles;
                s.elapsed += elapsed;
                let _ = s.hist.add(&stats.hist);
                s.client_cpu += client_cpu;
                s.server_cpu += server.cpu;
                for (name, (calls, usec)) in server.commands {
                    let e = s.commands.entry(name).or_default();
                    e.0 += calls;
                    e.1 += usec;
                }
                s.rates.push(cycles as f64 / elapsed.as_secs_f64());
            }
        }
        results.push((label, tasks, sides));
    }

    let lock = contenders
        .iter()
        .position(|c| matches!(c, Contender::Lock(_)));
    let raw = contenders
        .iter()
        .position(|c| matches!(c, Contender::Raw(_)));
    let rs = contenders
        .iter()
        .position(|c| matches!(c, Contender::Rslock(..)));
    let variant = contenders.iter().enumerate().find_map(|(i, c)| match c {
        Contender::Variant(_, name) => Some((i, *name)),
        _ => None,
    });
    let (Some(lock), Some(raw)) = (lock, raw) else {
        return;
    };

    println!(
        "{} repeats of alternating {:?} slices per side (order rotating each repeat); rates merged over the slices; the ratio column is the median of the per-repeat ratios (min–max).\n",
        cli.repeats, cli.slice
    );
    println!("| cycle (acquire + release) | lock cycles/s | raw cycles/s | lock/raw per repeat: median (min–max) | lock p50/p99/p999 µs | raw p50/p99/p999 µs |");
    println!("|---|---|---|---|---|---|");
    for (label, tasks, sides) in &results {
        let (l, r) = (&sides[lock], &sides[raw]);
        println!(
            "| {label} ({tasks} task{}) | {:.0} | {:.0} | {} | {} | {} |",
            if *tasks == 1 { "" } else { "s" },
            l.rate(),
            r.rate(),
            ratios(l, r).0,
            l.latency(),
            r.latency()
        );
    }
    println!();
    for (label, _, sides) in &results {
        println!(
            "- lock/raw per repeat, {label}: {}",
            ratios(&sides[lock], &sides[raw]).1
        );
    }

    if let Some(rs) = rs {
        third_side(
            &results,
            "| `rslock` 0.10 as a peer (same slices) | rslock cycles/s | rslock/raw: median (min–max) | lock/rslock: median (min–max) | rslock p50/p99/p999 µs |",
            (lock, raw, rs),
            true,
            "lock/rslock",
        );
    }
    if let Some((v, name)) = variant {
        third_side(
            &results,
            &format!("| {name}, a setting of the lock (same slices) | cycles/s | {name}/raw: median (min–max) | {name}/lock: median (min–max) | p50/p99/p999 µs |"),
            (lock, raw, v),
            false,
            &format!("{name}/raw"),
        );
    }

    // Cost per cycle.
    let names: Vec<&str> = contenders.iter().map(Contender::name).collect();
    let server_note = match backend {
        "redis" | "fred" => {
            "the Redis process's CPU (`INFO cpu`, user + sys) over the slices ÷ cycles"
        }
        "sqlite" => "none: SQLite runs inside this process, so its CPU is in the client column",
        "postgres" => {
            "not measured (one server process per connection; `pg_stat_statements` is not loaded)"
        }
        _ => "not measured",
    };
    println!(
        "\nCost per cycle, µs. Client: this process's CPU (`getrusage` user + sys over the slices, all threads, the locker's reporter thread included) ÷ cycles. Server: {server_note}.\n"
    );
    let has_server = probe.is_some();
    let mut header = String::from("| cost per cycle |");
    let mut rule = String::from("|---|");
    for who in ["client", "server"] {
        if who == "server" && !has_server {
            continue;
        }
        for name in &names {
            header.push_str(&format!(" {name} {who} µs |"));
            rule.push_str("---|");
        }
        header.push_str(&format!(" lock/raw {who} |"));
        rule.push_str("---|");
        if rs.is_some() {
            header.push_str(&format!(" lock/rslock {who} |"));
            rule.push_str("---|");
        }
    }
    println!("{header}\n{rule}");
    for (label, tasks, sides) in &results {
        let mut row = format!(
            "| {label} ({tasks} task{}) |",
            if *tasks == 1 { "" } else { "s" }
        );
        let mut add = |f: &dyn Fn(&Side) -> f64| {
            for s in sides {
                row.push_str(&format!(" {:.2} |", f(s)));
            }
            row.push_str(&format!(" {} |", ratio(f(&sides[lock]), f(&sides[raw]))));
            if let Some(rs) = rs {
                row.push_str(&format!(" {} |", ratio(f(&sides[lock]), f(&sides[rs]))));
            }
        };
        add(&|s: &Side| s.per_cycle_us(s.client_cpu));
        if has_server {
            add(&|s: &Side| s.per_cycle_us(s.server_cpu));
        }
        println!("{row}");
    }
    if has_server {
        println!("\nServer time per cycle by command (`INFO commandstats`, reset before each slice; a script's time includes the commands it calls, which are listed too):\n");
        for (label, _, sides) in &results {
            for (name, s) in names.iter().zip(sides) {
                println!("- {label}, {name}: {}", s.commands());
            }
        }
    }
}

/// The table of a third side (`side`) beside lock and raw: its rate, its ratio to raw, its ratio
/// to the lock (lock over it with `lock_first`, else it over lock), its latency; then, per
/// repeat, lock over it (`lock_first`) or it over raw, named `repeats`.
fn third_side(
    results: &[(&str, usize, Vec<Side>)],
    heading: &str,
    (lock, raw, side): (usize, usize, usize),
    lock_first: bool,
    repeats: &str,
) {
    println!("\n{heading}");
    println!("|---|---|---|---|---|");
    for (label, tasks, sides) in results {
        let (l, r, s) = (&sides[lock], &sides[raw], &sides[side]);
        println!(
            "| {label} ({tasks} task{}) | {:.0} | {} | {} | {} |",
            if *tasks == 1 { "" } else { "s" },
            s.rate(),
            ratios(s, r).0,
            if lock_first {
                ratios(l, s).0
            } else {
                ratios(s, l).0
            },
            s.latency()
        );
    }
    println!();
    for (label, _, sides) in results {
        let per_repeat = if lock_first {
            ratios(&sides[lock], &sides[side]).1
        } else {
            ratios(&sides[side], &sides[raw]).1
        };
        println!("- {repeats} per repeat, {label}: {per_repeat}");
    }
}

/// The contenders of a backend: the lock, the raw protocol, on Redis `rslock`, and on
/// PostgreSQL the lock with prepared statements.
pub(crate) async fn contenders(backend: &str, url: &str, locker: &Locker) -> Vec<Contender> {
    let raw = raw::Raw::connect(backend, url).await.expect("raw client");
    let mut v = vec![Contender::Lock(locker.clone()), Contender::Raw(raw)];
    if backend == "postgres" {
        let sep = if url.contains('?') { '&' } else { '?' };
        let prepared = Locker::builder(
            locker::connect(&format!("{url}{sep}prepared_statements=true")).expect("url"),
        )
        .build()
        .expect("locker");
        v.push(Contender::Variant(prepared, "prepared"));
    }
    if matches!(backend, "redis" | "fred") {
        // `rslock` always speaks through redis-rs, whichever client the locker uses.
        let plain = url.split('?').next().unwrap_or(url).to_owned();
        let manager = rslock::LockManager::new(vec![plain]);
        v.push(Contender::Rslock(manager, locker.options().lock_ttl));
    }
    v
}
