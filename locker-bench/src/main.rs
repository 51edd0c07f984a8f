//! `locker-bench`: the lock against the raw protocol of each backend, side by side in one run, and
//! the figures behind the liveness design's promises (takeover latency, background cost).
//!
//! `cargo run --release -p locker-bench -- [--backends redis,fred,postgres,sqlite,etcd]`
//!
//! Servers are started the way the test harness starts them (local binaries, free loopback
//! ports). Output is Markdown, for BENCHMARKS.md.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use locker::{LockAttempt, Locker};
use locker_conformance::servers::{self, ServerKind};

mod chaos;
mod compare;
mod counting;
mod durable;
mod primitives;
mod raw;
mod roundtrips;
mod waiting;

#[derive(Parser, Debug)]
#[command(name = "locker-bench")]
struct Cli {
    /// Backends to measure.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "redis,fred,postgres,sqlite,etcd"
    )]
    backends: Vec<String>,
    /// Length of the contention measurement.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Repeats of the cycle comparison: each a slice of lock, raw (and rslock on Redis) cycles,
    /// in rotating order. Many short slices, not a few long ones: on a loaded 2-core machine,
    /// 7 repeats of 500 ms gave medians 0.15 apart from run to run, 30 of 150 ms within 0.05.
    #[arg(long, default_value_t = 30)]
    repeats: usize,
    /// Concurrent tasks for the concurrent and contention figures.
    #[arg(long, default_value_t = 64)]
    tasks: usize,
    /// Takeover trials per backend (0 to skip).
    #[arg(long, default_value_t = 20)]
    takeover_trials: usize,
    /// Locks held for the background-cost figures (empty to skip).
    #[arg(long, value_delimiter = ',', default_value = "1,100,10000", num_args = 0..)]
    held: Vec<usize>,
    /// Observation window of the background cost.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    window: Duration,
    /// Repeats of the Redis durable-mode comparison (a plain slice and a durable slice each,
    /// on a primary with one replica); 0 to skip.
    #[arg(long, default_value_t = 5)]
    durable_repeats: usize,
    /// Length of one slice of the cycle comparison.
    #[arg(long, default_value = "150ms", value_parser = humantime::parse_duration)]
    slice: Duration,
    /// Length of one slice of the durable-mode comparison.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    durable_slice: Duration,
    #[command(subcommand)]
    hold: Option<Sub>,
}

#[derive(Subcommand, Debug)]
enum Sub {
    /// (internal) Acquire KEY on URL, say so, and wait to be killed.
    Hold { url: String, key: String },
    /// The chaos test: workers, a fenced resource, kills, freezes, server pauses and restarts.
    Chaos {
        /// redis, fred, postgres, sqlite or etcd.
        #[arg(long)]
        backend: String,
        /// How long the controller injects faults.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long, default_value_t = 8)]
        workers: usize,
        #[arg(long, default_value_t = 4)]
        keys: usize,
        /// Redis without persistence: restarts lose the locks (overlaps right after them are
        /// then reported apart).
        #[arg(long)]
        volatile: bool,
    },
    /// One side's acquire + release cycles alone, for a profiler (`perf record -g -- locker-bench
    /// cycles ...`): starts its own server unless `--url` names one, prints cycles/s and the
    /// process's CPU per cycle.
    Cycles {
        /// redis, fred, postgres, sqlite or etcd.
        #[arg(long, default_value = "redis")]
        backend: String,
        /// lock or raw.
        #[arg(long, default_value = "lock")]
        side: String,
        #[arg(long)]
        url: Option<String>,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        seconds: Duration,
    },
    /// Waiting for a lock, per backend: hand-off latency, takeover with a waiter waiting,
    /// the store load of many waiters, fairness; next to the polling it replaced.
    Wait {
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "redis,fred,postgres,sqlite,etcd"
        )]
        backends: Vec<String>,
        /// Hand-off trials (0 to skip).
        #[arg(long, default_value_t = 200)]
        trials: usize,
        /// Takeover trials, a holder process SIGKILLed (0 to skip).
        #[arg(long, default_value_t = 10)]
        kill_trials: usize,
        /// Waiters of the load figure (0 to skip).
        #[arg(long, default_value_t = 64)]
        waiters: usize,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        load_window: Duration,
        /// 0s to skip.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        fairness_window: Duration,
    },
    /// Semaphores and elections, per backend: a permit's cycle next to a lock's, and the
    /// leadership hand-off after SIGKILL of the leader.
    Primitives {
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "redis,fred,postgres,sqlite,etcd"
        )]
        backends: Vec<String>,
        /// Repeats of the alternating slices.
        #[arg(long, default_value_t = 20)]
        repeats: usize,
        #[arg(long, default_value = "150ms", value_parser = humantime::parse_duration)]
        slice: Duration,
        /// Concurrent tasks of the concurrent row.
        #[arg(long, default_value_t = 64)]
        tasks: usize,
        /// Permits per semaphore (and tasks sharing one).
        #[arg(long, default_value_t = 4)]
        permits: u32,
        /// Hand-off trials (0 to skip).
        #[arg(long, default_value_t = 5)]
        trials: usize,
    },
    /// (internal) One chaos worker.
    ChaosWorker {
        #[arg(long)]
        url: String,
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long)]
        keys: usize,
    },
}

/// Timings of the takeover figures: a short liveness TTL, as a latency-sensitive deployment
/// would set.
const TAKEOVER_LIVENESS: Duration = Duration::from_secs(2);
const TAKEOVER_REPORT: Duration = Duration::from_millis(400);
/// `locker run --wait` polls every 200 ms.
const POLL: Duration = Duration::from_millis(200);

fn takeover_locker(url: &str) -> Locker {
    Locker::builder(locker::connect(url).expect("url"))
        .liveness_ttl(TAKEOVER_LIVENESS)
        .report_every(TAKEOVER_REPORT)
        .build()
        .expect("locker")
}

struct Stats {
    cycles_per_sec: f64,
    hist: Histogram<u64>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

/// `p50 / p99 / p999` of a latency histogram, in its unit (µs).
fn latency(hist: &Histogram<u64>) -> String {
    format!(
        "{} / {} / {}",
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999)
    )
}

async fn run_tasks<F, Fut>(tasks: usize, duration: Duration, cycle: F) -> Stats
where
    F: Fn(usize, u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let started = Instant::now();
    let deadline = started + duration;
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let cycle = cycle.clone();
            tokio::spawn(async move {
                let mut hist = histogram();
                let mut i = 0u64;
                while Instant::now() < deadline {
                    let t0 = Instant::now();
                    cycle(t, i).await;
                    let _ = hist.record(t0.elapsed().as_micros().max(1) as u64);
                    i += 1;
                }
                hist
            })
        })
        .collect();
    let mut hist = histogram();
    for h in handles {
        let _ = hist.add(h.await.expect("task"));
    }
    Stats {
        cycles_per_sec: hist.len() as f64 / started.elapsed().as_secs_f64(),
        hist,
    }
}

async fn lock_cycles(locker: &Locker, tag: &str, tasks: usize, duration: Duration) -> Stats {
    let locker = locker.clone();
    let tag = tag.to_owned();
    run_tasks(tasks, duration, move |t, i| {
        let (locker, key) = (locker.clone(), format!("bench/{tag}/{t}/{i}"));
        async move {
            match locker.acquire(key.as_str()).await.expect("acquire") {
                LockAttempt::Acquired(g) => {
                    let _ = g.release().await.expect("release");
                }
                LockAttempt::Held(h) => panic!("a fresh key was held by {}", h.owner_hash),
            }
        }
    })
    .await
}

async fn raw_cycles(raw: &Arc<raw::Raw>, tag: &str, tasks: usize, duration: Duration) -> Stats {
    let raw = raw.clone();
    let tag = tag.to_owned();
    run_tasks(tasks, duration, move |t, i| {
        let (raw, key) = (raw.clone(), format!("raw/{tag}/{t}/{i}"));
        async move {
            assert!(raw.acquire(&key, "owner").await.expect("raw acquire"));
            raw.release(&key, "owner").await.expect("raw release");
        }
    })
    .await
}

/// The `cycles` subcommand.
async fn cycles_alone(cli: &Cli, backend: &str, side: &str, url: Option<&str>, seconds: Duration) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (url, _server) = match url {
        Some(url) => (url.to_owned(), None),
        None => start_server(backend, dir.path()),
    };
    let cpu = compare::process_cpu();
    let stats = match side {
        "lock" => {
            let locker = Locker::builder(locker::connect(&url).expect("url"))
                .build()
                .expect("locker");
            locker.ready().await.expect("ready");
            let stats = lock_cycles(&locker, "profile", cli.tasks, seconds).await;
            locker.shutdown().await;
            stats
        }
        "raw" => {
            let raw = raw::Raw::connect(backend, &url).await.expect("raw connect");
            raw_cycles(&raw, "profile", cli.tasks, seconds).await
        }
        other => panic!("--side is lock or raw, not {other}"),
    };
    let cpu = compare::process_cpu() - cpu;
    let cycles = stats.hist.len() as f64;
    println!(
        "{backend} {side}, {} tasks: {:.0} cycles/s, client CPU {:.2} µs/cycle, p50/p99 {} / {} µs",
        cli.tasks,
        stats.cycles_per_sec,
        cpu.as_secs_f64() * 1e6 / cycles,
        stats.hist.value_at_quantile(0.5),
        stats.hist.value_at_quantile(0.99)
    );
}

/// Starts the server of a backend (none for SQLite: a file in `dir`); returns its URL and the
/// handle that stops it.
fn start_server(backend: &str, dir: &std::path::Path) -> (String, Option<servers::Server>) {
    match backend {
        "redis" | "fred" => {
            let server = servers::start_process(ServerKind::Redis).expect("redis-server");
            let url = if backend == "fred" {
                format!("{}?client=fred", server.url())
            } else {
                server.url().to_owned()
            };
            (url, Some(server))
        }
        "postgres" => {
            let server = servers::start_process(ServerKind::Postgres).expect("postgres");
            (server.url().to_owned(), Some(server))
        }
        "sqlite" => (format!("sqlite://{}/locks.db", dir.display()), None),
        "etcd" => {
            let server = servers::start_process(ServerKind::Etcd).expect("etcd");
            let url = format!("etcd://{}", server.url().trim_start_matches("http://"));
            (url, Some(server))
        }
        other => panic!("unknown backend {other}"),
    }
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i]
}

async fn bench_backend(cli: &Cli, name: &str, url: &str) {
    println!("\n### {name}\n\n`{url}`\n");
    let locker = Locker::builder(locker::connect(url).expect("url"))
        .build()
        .expect("locker");
    let contenders = compare::contenders(name, url, &locker).await;
    let probe = match name {
        "redis" | "fred" => compare::RedisProbe::connect(url).await,
        _ => None,
    };
    compare::cycles(cli, name, &contenders, probe.as_ref()).await;
    roundtrips::table(url).await;

    // Contention: one live holder, many tries.
    let holder = Locker::builder(locker::connect(url).expect("url"))
        .build()
        .expect("locker");
    let key = format!("bench/contended/{}", std::process::id());
    let guard = match holder.acquire(key.as_str()).await.expect("acquire") {
        LockAttempt::Acquired(g) => g,
        LockAttempt::Held(_) => panic!("fresh key held"),
    };
    let contender = locker.clone();
    let contended = run_tasks(cli.tasks, cli.duration, move |_, _| {
        let (locker, key) = (contender.clone(), key.clone());
        async move {
            assert!(matches!(
                locker.acquire(key.as_str()).await.expect("acquire"),
                LockAttempt::Held(_)
            ));
        }
    })
    .await;
    println!(
        "\n| contention ({} tasks, one key, live holder) | attempts/s | \"held\" p50 / p99 µs |\n|---|---|---|\n| try-once | {:.0} | {} / {} |",
        cli.tasks,
        contended.cycles_per_sec,
        contended.hist.value_at_quantile(0.5),
        contended.hist.value_at_quantile(0.99)
    );
    drop(guard);
    holder.shutdown().await;

    if cli.takeover_trials > 0 {
        takeover(cli, url).await;
    }
    if !cli.held.is_empty() {
        background(cli, url).await;
    }
    locker.shutdown().await;
}

/// Starts a process of this binary that acquires `key` on `url` (with [`takeover_locker`]),
/// and returns once it holds the lock; it then waits to be killed.
pub(crate) fn spawn_holder(url: &str, key: &str) -> std::process::Child {
    let exe = std::env::current_exe().expect("own path");
    let mut child = Command::new(&exe)
        .args(["hold", url, key])
        .stdout(Stdio::piped())
        .spawn()
        .expect("holder process");
    let mut line = String::new();
    let stdout = child.stdout.take().expect("stdout");
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("holder output");
    assert_eq!(line.trim(), "acquired", "holder failed");
    child
}

async fn takeover(cli: &Cli, url: &str) {
    let taker = takeover_locker(url);
    let mut times = Vec::new();
    for trial in 0..cli.takeover_trials {
        let key = format!("bench/takeover/{}/{trial}", std::process::id());
        let mut child = spawn_holder(url, &key);
        child.kill().expect("SIGKILL");
        let killed = Instant::now();
        let _ = child.wait();
        loop {
            match taker.acquire(key.as_str()).await.expect("acquire") {
                LockAttempt::Acquired(g) => {
                    times.push(killed.elapsed().as_secs_f64());
                    let _ = g.release().await.expect("release");
                    break;
                }
                LockAttempt::Held(_) => tokio::time::sleep(POLL).await,
            }
        }
    }
    taker.shutdown().await;
    times.sort_by(f64::total_cmp);
    println!(
        "\n| takeover after SIGKILL ({} trials, poll {:?}) | p50 s | p99 s | max s | liveness TTL |\n|---|---|---|---|---|\n| holder process killed | {:.2} | {:.2} | {:.2} | {:?} |",
        times.len(),
        POLL,
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        times.last().copied().unwrap_or_default(),
        TAKEOVER_LIVENESS
    );
}

async fn background(cli: &Cli, url: &str) {
    println!(
        "\n| locks held, beating (defaults: report {:?}, recheck {:?}, extend {:?}) | backend calls/s: ping / read / read_many / extend / other | one call per lock and interval would be (ping + read + extend) | store CPU per lock and recheck interval (Redis: `INFO cpu`) | memory per lock |",
        locker::DEFAULT_REPORT_EVERY,
        locker::DEFAULT_RECHECK_EVERY,
        locker::DEFAULT_EXTEND_EVERY
    );
    println!("|---|---|---|---|---|");
    let probe = compare::RedisProbe::connect(url).await;
    for (n, split_reads) in cli.held.iter().flat_map(|&n| [(n, true), (n, false)]) {
        let counts = Arc::new(counting::Counts::default());
        let factory = counting::CountingFactory {
            inner: locker::connect(url).expect("url"),
            counts: counts.clone(),
            split_reads,
        };
        let locker = Locker::builder(factory).build().expect("locker");
        let rss_before = rss_bytes();
        let mut guards = Vec::with_capacity(n);
        let mut beats = Vec::with_capacity(n);
        for i in 0..n {
            let key = format!("bench/held/{}/{n}/{i}", std::process::id());
            match locker.acquire(key.as_str()).await.expect("acquire") {
                LockAttempt::Acquired(g) => {
                    beats.push(tokio::spawn(g.heartbeat().lost()));
                    guards.push(g);
                }
                LockAttempt::Held(_) => panic!("fresh key held"),
            }
        }
        let per_lock = rss_bytes().saturating_sub(rss_before) / n as u64;
        // Steady state: every lock has passed its first recheck before counting starts.
        tokio::time::sleep(locker::DEFAULT_RECHECK_EVERY).await;
        let before = counts.snapshot();
        let cpu_before = match &probe {
            Some(p) => Some(p.cpu().await),
            None => None,
        };
        tokio::time::sleep(cli.window).await;
        let after = counts.snapshot();
        let store_cpu = match (&probe, cpu_before) {
            (Some(p), Some(before)) => {
                let intervals =
                    cli.window.as_secs_f64() / locker::DEFAULT_RECHECK_EVERY.as_secs_f64();
                let per = (p.cpu().await.saturating_sub(before)).as_secs_f64() * 1e6
                    / intervals
                    / n as f64;
                format!("{per:.2} µs")
            }
            _ => "-".to_owned(),
        };
        let d = after - before;
        let rate = |n: u64| n as f64 / cli.window.as_secs_f64();
        let expected = 1.0 / locker::DEFAULT_REPORT_EVERY.as_secs_f64()
            + n as f64 / locker::DEFAULT_RECHECK_EVERY.as_secs_f64()
            + n as f64 / locker::DEFAULT_EXTEND_EVERY.as_secs_f64();
        println!(
            "| {n}{} | {:.1} / {:.1} / {:.1} / {:.1} / {:.1} | {expected:.1} | {store_cpu} | {} B |",
            if split_reads { ", one read per lock (as before issue 17)" } else { ", rechecks batched" },
            rate(d.ping),
            rate(d.read),
            rate(d.read_many),
            rate(d.extend),
            rate(d.other()),
            per_lock
        );
        for b in beats {
            b.abort();
        }
        drop(guards);
        locker.shutdown().await;
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let version = |cmd: &str, arg: &str| {
        Command::new(cmd)
            .arg(arg)
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_owned()
            })
            .unwrap_or_default()
    };
    format!(
        "{cores} cores ({cpu}); {}; {}",
        version("redis-server", "--version"),
        version("etcd", "--version")
    )
}

fn main() {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    match &cli.hold {
        Some(Sub::Chaos {
            backend,
            duration,
            workers,
            keys,
            volatile,
        }) => {
            let ok = runtime.block_on(chaos::run(chaos::Run {
                backend: backend.clone(),
                duration: *duration,
                workers: *workers,
                keys: *keys,
                volatile: *volatile,
            }));
            std::process::exit(if ok { 0 } else { 1 });
        }
        Some(Sub::Cycles {
            backend,
            side,
            url,
            seconds,
        }) => {
            runtime.block_on(cycles_alone(&cli, backend, side, url.as_deref(), *seconds));
            return;
        }
        Some(Sub::Wait {
            backends,
            trials,
            kill_trials,
            waiters,
            load_window,
            fairness_window,
        }) => {
            let plan = waiting::Plan {
                trials: *trials,
                kill_trials: *kill_trials,
                waiters: *waiters,
                load_window: *load_window,
                fairness_window: *fairness_window,
            };
            println!(
                "## Waiting, run of {}\n\nMachine: {}\n\nCommand: `cargo run --release -p locker-bench -- wait --backends {} --trials {trials} --kill-trials {kill_trials} --waiters {waiters} --load-window {load_window:?} --fairness-window {fairness_window:?}`",
                humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
                machine(),
                backends.join(",")
            );
            let dir = tempfile::tempdir().expect("temporary directory");
            for backend in backends {
                let (url, server) = start_server(backend, dir.path());
                runtime.block_on(waiting::run(backend, &url, &plan));
                drop(server);
            }
            return;
        }
        Some(Sub::Primitives {
            backends,
            repeats,
            slice,
            tasks,
            permits,
            trials,
        }) => {
            println!(
                "## Semaphores and elections, run of {}\n\nMachine: {}\n\nCommand: `cargo run --release -p locker-bench -- primitives --backends {} --repeats {repeats} --slice {slice:?} --tasks {tasks} --permits {permits} --trials {trials}`",
                humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
                machine(),
                backends.join(","),
            );
            let plan = primitives::Plan {
                repeats: *repeats,
                slice: *slice,
                tasks: *tasks,
                permits: *permits,
                trials: *trials,
            };
            let dir = tempfile::tempdir().expect("temporary directory");
            for backend in backends {
                let (url, server) = start_server(backend, dir.path());
                runtime.block_on(primitives::run(backend, &url, &plan));
                drop(server);
            }
            return;
        }
        Some(Sub::ChaosWorker { url, dir, keys }) => {
            runtime.block_on(chaos::worker(url, dir, *keys));
            return;
        }
        _ => {}
    }
    if let Some(Sub::Hold { url, key }) = &cli.hold {
        runtime.block_on(async {
            let locker = takeover_locker(url);
            match locker.acquire(key.as_str()).await.expect("acquire") {
                LockAttempt::Acquired(g) => {
                    println!("acquired");
                    std::mem::forget(g);
                    std::future::pending::<()>().await;
                }
                LockAttempt::Held(_) => println!("held"),
            }
        });
        return;
    }
    println!(
        "## Run of {}\n\nMachine: {}\n",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
        machine()
    );
    println!("Command: `cargo run --release -p locker-bench -- --backends {} --repeats {} --slice {:?} --tasks {} --duration {:?} --takeover-trials {} --held {} --durable-repeats {} --durable-slice {:?}`", cli.backends.join(","), cli.repeats, cli.slice, cli.tasks, cli.duration, cli.takeover_trials, cli.held.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(","), cli.durable_repeats, cli.durable_slice);
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut keep = Vec::new();
    for backend in &cli.backends {
        if !matches!(
            backend.as_str(),
            "redis" | "fred" | "postgres" | "sqlite" | "etcd"
        ) {
            eprintln!("unknown backend {backend}");
            continue;
        }
        let (url, server) = start_server(backend, dir.path());
        keep.extend(server);
        runtime.block_on(bench_backend(&cli, backend, &url));
        if matches!(backend.as_str(), "redis" | "fred") && cli.durable_repeats > 0 {
            runtime.block_on(durable::compare(&cli, backend));
        }
    }
}
