//! The cost of the Redis backend's durable mode (`wait_replicas`): acquire + release cycles
//! with and without `WAIT` after each acquire, on one primary with one replica, interleaved in
//! short slices so that both see the same machine.

use std::time::{Duration, Instant};

use locker::Locker;
use locker_conformance::servers::{self, Server};

use crate::{histogram, latency, lock_cycles, Cli, Stats};

/// The wait timeout of the durable locker: the library's default.
const WAIT_TIMEOUT: Duration = locker::redis::DEFAULT_WAIT_TIMEOUT;

fn port(server: &Server) -> u16 {
    server
        .url()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port")
}

/// A primary and one replica from the local `redis-server`, the replica in sync.
async fn start_pair() -> (Server, Server) {
    let primary = tokio::task::spawn_blocking(|| {
        servers::start_redis_with(["--repl-diskless-sync-delay", "0"], false)
    })
    .await
    .expect("task")
    .expect("primary redis-server");
    let primary_port = port(&primary).to_string();
    let replica = tokio::task::spawn_blocking(move || {
        servers::start_redis_with(["--replicaof", "127.0.0.1", primary_port.as_str()], false)
    })
    .await
    .expect("task")
    .expect("replica redis-server");
    let mut conn = redis::Client::open(primary.url())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the primary");
    // Listed online is not enough: after a diskless full sync, a replica acknowledges nothing
    // until it has sent its first `REPLCONF ACK`, up to a second later. Ready is a write that
    // `WAIT` sees acknowledged.
    let start = Instant::now();
    loop {
        let () = redis::cmd("SET")
            .arg("bench/probe")
            .arg("1")
            .query_async(&mut conn)
            .await
            .expect("SET");
        let acked: u64 = redis::cmd("WAIT")
            .arg(1)
            .arg(200)
            .query_async(&mut conn)
            .await
            .expect("WAIT");
        if acked >= 1 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the replica acknowledged nothing within 30 s"
        );
    }
    (primary, replica)
}

/// `calls` and `usec_per_call` of `WAIT` on the server at `url`, as `1234 calls, 5.6 µs`.
async fn wait_stats(url: &str) -> String {
    let Ok(mut conn) = redis::Client::open(url)
        .expect("client")
        .get_multiplexed_async_connection()
        .await
    else {
        return String::new();
    };
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_wait:"))
        .map(|rest| {
            let field = |name: &str| {
                rest.split(',')
                    .find_map(|f| f.strip_prefix(name))
                    .unwrap_or("?")
                    .to_owned()
            };
            format!(
                "{} calls, {} µs of server time per call",
                field("calls="),
                field("usec_per_call=")
            )
        })
        .unwrap_or_else(|| "none".to_owned())
}

/// One side's slices, merged.
struct Side {
    cycles: u64,
    elapsed: Duration,
    hist: hdrhistogram::Histogram<u64>,
}

impl Side {
    fn new() -> Self {
        Side {
            cycles: 0,
            elapsed: Duration::ZERO,
            hist: histogram(),
        }
    }

    fn add(&mut self, stats: &Stats, elapsed: Duration) {
        self.cycles += stats.hist.len();
        self.elapsed += elapsed;
        let _ = self.hist.add(&stats.hist);
    }

    fn rate(&self) -> f64 {
        self.cycles as f64 / self.elapsed.as_secs_f64()
    }

    fn latency(&self) -> String {
        latency(&self.hist)
    }
}

/// Durable against plain cycles, for the `redis` or `fred` client.
pub(crate) async fn compare(cli: &Cli, backend: &str) {
    let (primary, _replica) = start_pair().await;
    let client = if backend == "fred" {
        "?client=fred"
    } else {
        "?"
    };
    let plain_url = format!("{}{client}", primary.url());
    let durable_url = format!(
        "{plain_url}{}wait_replicas=1&wait_timeout={}ms",
        if client == "?" { "" } else { "&" },
        WAIT_TIMEOUT.as_millis()
    );
    let plain_url = plain_url.trim_end_matches('?').to_owned();
    println!(
        "\n#### {backend}: durable mode (`WAIT 1 {}`) against plain, one primary + one replica\n\n`{durable_url}` against `{plain_url}`; {} slices of {:?} each, alternating, and which side goes first alternates too\n",
        WAIT_TIMEOUT.as_millis(),
        cli.durable_repeats * 2,
        cli.durable_slice
    );
    let connect = |url: &str| {
        Locker::builder(locker::connect(url).expect("url"))
            .build()
            .expect("locker")
    };
    let (plain, durable) = (connect(&plain_url), connect(&durable_url));
    // Warm up both (connections, scripts, the reporters).
    let _ = lock_cycles(&plain, "durable-warm-p", 4, Duration::from_millis(300)).await;
    let _ = lock_cycles(&durable, "durable-warm-d", 4, Duration::from_millis(300)).await;

    println!("| cycle (acquire + release) | plain cycles/s | durable cycles/s | durable/plain | ratio per repeat: min / median / max | plain p50/p99/p999 µs | durable p50/p99/p999 µs |");
    println!("|---|---|---|---|---|---|---|");
    for (label, tasks) in [("sequential", 1), ("concurrent", cli.tasks)] {
        let (mut p, mut d) = (Side::new(), Side::new());
        let mut ratios = Vec::new();
        for repeat in 0..cli.durable_repeats {
            let tag =
                |side: &str| format!("durable/{label}/{side}/{repeat}/{}", std::process::id());
            let run = |locker: &Locker, side: &str| {
                let (locker, tag) = (locker.clone(), tag(side));
                async move {
                    let t0 = Instant::now();
                    let stats = lock_cycles(&locker, &tag, tasks, cli.durable_slice).await;
                    (stats, t0.elapsed())
                }
            };
            // Alternate which goes first, so that neither always follows the other.
            let ((ps, pe), (ds, de)) = if repeat % 2 == 0 {
                let plain_slice = run(&plain, "p").await;
                (plain_slice, run(&durable, "d").await)
            } else {
                let durable_slice = run(&durable, "d").await;
                (run(&plain, "p").await, durable_slice)
            };
            ratios.push(
                (ds.hist.len() as f64 / de.as_secs_f64())
                    / (ps.hist.len() as f64 / pe.as_secs_f64()),
            );
            p.add(&ps, pe);
            d.add(&ds, de);
        }
        ratios.sort_by(f64::total_cmp);
        println!(
            "| {label} ({tasks} task{}) | {:.0} | {:.0} | {:.2} | {:.2} / {:.2} / {:.2} | {} | {} |",
            if tasks == 1 { "" } else { "s" },
            p.rate(),
            d.rate(),
            d.rate() / p.rate(),
            ratios.first().copied().unwrap_or_default(),
            crate::percentile(&ratios, 0.5),
            ratios.last().copied().unwrap_or_default(),
            p.latency(),
            d.latency()
        );
    }
    println!(
        "\n`WAIT` on the primary over the whole comparison: {}.",
        wait_stats(primary.url()).await
    );
    plain.shutdown().await;
    durable.shutdown().await;
}
