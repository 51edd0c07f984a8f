//! `locker-bench wait`: what waiting for a lock costs and how fast it ends, per backend, next
//! to the polling it replaced (`locker run --wait` tried every 200 ms; `mutex` every
//! `recheck_delay`).
//!
//! - hand-off: from the holder's `release` returning to the waiter's `acquire_wait` returning,
//!   against the store's round trip (a `read`) measured in the same run;
//! - takeover: a holder process SIGKILLed while a waiter waits (liveness TTL 2 s);
//! - load: 64 waiters on one held key, store calls per second, waiting vs polling;
//! - fairness: 16 tasks in 4 lockers looping on one key.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use locker::{LockAttempt, LockGuard, Locker, Wait};

use crate::counting::{CountingFactory, Counts};
use crate::{percentile, spawn_holder, takeover_locker, TAKEOVER_LIVENESS};

/// The poll of `locker run --wait` before waiting was woken by the store.
const OLD_POLL: Duration = Duration::from_millis(200);

/// What to measure.
pub(crate) struct Plan {
    pub(crate) trials: usize,
    pub(crate) kill_trials: usize,
    pub(crate) waiters: usize,
    pub(crate) load_window: Duration,
    pub(crate) fairness_window: Duration,
}

fn locker(url: &str) -> Locker {
    Locker::builder(locker::connect(url).expect("url"))
        .build()
        .expect("locker")
}

async fn acquired(locker: &Locker, key: &str) -> LockGuard {
    match locker.acquire(key).await.expect("acquire") {
        LockAttempt::Acquired(g) => g,
        LockAttempt::Held(h) => panic!("{key} held by {}", h.owner_hash),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub(crate) async fn run(backend: &str, url: &str, plan: &Plan) {
    println!("\n### {backend}\n");
    let events = locker::connect(url)
        .expect("url")
        .connect()
        .await
        .expect("connect")
        .capabilities()
        .release_events;
    println!("Release events: {events}.\n");
    if plan.trials > 0 {
        hand_off(url, plan.trials).await;
    }
    if plan.kill_trials > 0 {
        takeover(url, plan.kill_trials).await;
    }
    if plan.waiters > 0 && !plan.load_window.is_zero() {
        load(url, plan.waiters, plan.load_window).await;
    }
    if !plan.fairness_window.is_zero() {
        fairness(url, plan.fairness_window).await;
    }
}

async fn hand_off(url: &str, trials: usize) {
    let (a, b) = (locker(url), locker(url));
    a.ready().await.expect("ready");
    b.ready().await.expect("ready");
    let pid = std::process::id();
    // The store's round trip: a read of a free key.
    let backend = locker::connect(url)
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut rtt = Vec::new();
    for i in 0..200 {
        let t = Instant::now();
        let _ = backend.read(&format!("bench/rtt/{pid}/{i}")).await;
        rtt.push(ms(t.elapsed()));
    }
    rtt.sort_by(f64::total_cmp);
    let rtt50 = percentile(&rtt, 0.5);

    let mut woken = Vec::new();
    // One warm-up trial (the first wait opens the backend's subscription connection).
    for trial in 0..=trials {
        let key = format!("bench/handoff/{pid}/{trial}");
        let guard = acquired(&a, &key).await;
        let waiter = tokio::spawn({
            let (b, key) = (b.clone(), key.clone());
            async move {
                let g = b.acquire_wait(key.as_str(), Wait::forever()).await;
                (g, Instant::now())
            }
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        let _ = guard.release().await.expect("release");
        let released = Instant::now();
        let (g, got) = waiter.await.expect("waiter");
        let _ = g.expect("acquire_wait").release().await;
        if trial > 0 {
            woken.push(ms(got.saturating_duration_since(released)));
        }
    }
    woken.sort_by(f64::total_cmp);

    let old_trials = (trials / 10).max(20);
    let mut polled = Vec::new();
    for trial in 0..old_trials {
        let key = format!("bench/handoff-poll/{pid}/{trial}");
        let guard = acquired(&a, &key).await;
        let waiter = tokio::spawn({
            let (b, key) = (b.clone(), key.clone());
            async move {
                loop {
                    match b.acquire(key.as_str()).await.expect("acquire") {
                        LockAttempt::Acquired(g) => return (g, Instant::now()),
                        LockAttempt::Held(_) => tokio::time::sleep(OLD_POLL).await,
                    }
                }
            }
        });
        // A random point of the poll's cycle.
        tokio::time::sleep(Duration::from_millis(30 + (trial as u64 * 37) % 200)).await;
        let _ = guard.release().await.expect("release");
        let released = Instant::now();
        let (g, got) = waiter.await.expect("waiter");
        let _ = g.release().await;
        polled.push(ms(got.saturating_duration_since(released)));
    }
    polled.sort_by(f64::total_cmp);
    println!(
        "| hand-off (release returned → waiter's acquire returned) | trials | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|"
    );
    println!(
        "| `acquire_wait` | {} | {:.2} | {:.2} | {:.2} |",
        woken.len(),
        percentile(&woken, 0.5),
        percentile(&woken, 0.99),
        woken.last().copied().unwrap_or_default()
    );
    println!(
        "| polling every {OLD_POLL:?} (`locker run --wait` before) | {} | {:.1} | {:.1} | {:.1} |",
        polled.len(),
        percentile(&polled, 0.5),
        percentile(&polled, 0.99),
        polled.last().copied().unwrap_or_default()
    );
    println!(
        "\nStore round trip (`read`), p50: {rtt50:.2} ms; the target, 2 round trips + 2 ms: {:.2} ms.\n",
        2.0 * rtt50 + 2.0
    );
    a.shutdown().await;
    b.shutdown().await;
}

async fn takeover(url: &str, trials: usize) {
    let taker = takeover_locker(url);
    taker.ready().await.expect("ready");
    let mut times = Vec::new();
    for trial in 0..trials {
        let key = format!("bench/wait-takeover/{}/{trial}", std::process::id());
        let mut child = spawn_holder(url, &key);
        let waiter = tokio::spawn({
            let (taker, key) = (taker.clone(), key.clone());
            async move {
                let g = taker.acquire_wait(key.as_str(), Wait::forever()).await;
                (g, Instant::now())
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        child.kill().expect("SIGKILL");
        let killed = Instant::now();
        let _ = child.wait();
        let (g, got) = waiter.await.expect("waiter");
        let _ = g.expect("acquire_wait").release().await;
        times.push(got.saturating_duration_since(killed).as_secs_f64());
    }
    taker.shutdown().await;
    times.sort_by(f64::total_cmp);
    println!(
        "| takeover after SIGKILL, a waiter waiting ({} trials) | p50 s | p99 s | max s | liveness TTL | target (TTL + 100 ms) |\n|---|---|---|---|---|---|\n| `acquire_wait` | {:.2} | {:.2} | {:.2} | {:?} | {:.2} |\n",
        times.len(),
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        times.last().copied().unwrap_or_default(),
        TAKEOVER_LIVENESS,
        (TAKEOVER_LIVENESS + Duration::from_millis(100)).as_secs_f64()
    );
}

/// `waiters` tasks over 4 lockers (each its own connections and process hash), all waiting on
/// one key a live holder keeps, for `window`: the store calls they make per second.
async fn load(url: &str, waiters: usize, window: Duration) {
    let holder = locker(url);
    let pid = std::process::id();
    let mut rows = Vec::new();
    for polling in [false, true] {
        let key = format!("bench/load/{pid}/{polling}");
        let guard = acquired(&holder, &key).await;
        let counts = Arc::new(Counts::default());
        let lockers: Vec<Locker> = (0..4)
            .map(|_| {
                Locker::builder(CountingFactory {
                    inner: Arc::new(locker::connect(url).expect("url")),
                    counts: counts.clone(),
                    split_reads: false,
                })
                .build()
                .expect("locker")
            })
            .collect();
        for l in &lockers {
            l.ready().await.expect("ready");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let before = counts.snapshot();
        let tasks: Vec<_> = (0..waiters)
            .map(|i| {
                let (l, key, stop) = (lockers[i % 4].clone(), key.clone(), stop.clone());
                tokio::spawn(async move {
                    if polling {
                        while !stop.load(Ordering::Relaxed) {
                            if let LockAttempt::Acquired(g) =
                                l.acquire(key.as_str()).await.expect("acquire")
                            {
                                panic!("acquired a held lock: {}", g.owner_hash());
                            }
                            tokio::time::sleep(OLD_POLL).await;
                        }
                    } else {
                        let wait = Wait::up_to(Duration::from_secs(3600));
                        tokio::select! {
                            g = l.acquire_wait(key.as_str(), wait) => {
                                panic!("acquired a held lock: {g:?}");
                            }
                            () = async {
                                while !stop.load(Ordering::Relaxed) {
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                }
                            } => {}
                        }
                    }
                })
            })
            .collect();
        tokio::time::sleep(window).await;
        let calls = counts.snapshot() - before;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.expect("waiter");
        }
        let per_sec = calls.waiting_calls() as f64 / window.as_secs_f64();
        rows.push((polling, per_sec, calls));
        for l in lockers {
            l.shutdown().await;
        }
        let _ = guard.release().await;
    }
    holder.shutdown().await;
    println!(
        "| {waiters} waiters (4 lockers) on one held key, {window:?} | store calls/s (tries, liveness lookups, subscriptions) |\n|---|---|"
    );
    for (polling, per_sec, calls) in rows {
        let what = if polling {
            format!("polling every {OLD_POLL:?} (before)")
        } else {
            "`acquire_wait`".to_owned()
        };
        println!(
            "| {what} | {per_sec:.1} ({} tries, {} liveness lookups, {} subscriptions) |",
            calls.other(),
            calls.liveness_left,
            calls.watch_release
        );
    }
    println!();
}

/// 16 tasks in 4 lockers loop on one key for `window`, each holding it 5 ms.
async fn fairness(url: &str, window: Duration) {
    let lockers: Vec<Locker> = (0..4).map(|_| locker(url)).collect();
    for l in &lockers {
        l.ready().await.expect("ready");
    }
    let key = format!("bench/fairness/{}", std::process::id());
    let deadline = Instant::now() + window;
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let (l, key) = (lockers[i % 4].clone(), key.clone());
            tokio::spawn(async move {
                let (mut got, mut longest) = (0u64, Duration::ZERO);
                while Instant::now() < deadline {
                    let asked = Instant::now();
                    let left = deadline.saturating_duration_since(asked);
                    match l.acquire_wait(key.as_str(), Wait::up_to(left)).await {
                        Ok(g) => {
                            longest = longest.max(asked.elapsed());
                            got += 1;
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            let _ = g.release().await;
                        }
                        Err(e) if e.kind() == locker::ErrorKind::MutexTimeout => {
                            longest = longest.max(asked.elapsed());
                        }
                        Err(e) => panic!("acquire_wait: {e}"),
                    }
                }
                (got, longest)
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.expect("task"));
    }
    for l in lockers {
        l.shutdown().await;
    }
    let counts: Vec<u64> = results.iter().map(|r| r.0).collect();
    let total: u64 = counts.iter().sum();
    let (min, max) = (
        counts.iter().min().copied().unwrap_or_default(),
        counts.iter().max().copied().unwrap_or_default(),
    );
    let longest = results.iter().map(|r| r.1).max().unwrap_or_default();
    println!(
        "| fairness: 16 tasks in 4 lockers, one key, {window:?}, 5 ms holds | acquisitions | per task min / mean / max | longest wait |\n|---|---|---|---|\n| `acquire_wait` | {total} | {min} / {:.1} / {max} | {:.2} s |\n",
        total as f64 / 16.0,
        longest.as_secs_f64()
    );
}
