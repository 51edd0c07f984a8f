//! `locker-bench primitives`: a semaphore permit's acquire + release cycle next to a plain
//! lock's (alternating slices, as the cycle comparison), and the leadership hand-off after the
//! leader's process is SIGKILLed (a campaigner waiting, an observer watching).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use locker::{Locker, PermitAttempt, Wait};

use crate::{
    lock_cycles, percentile, run_tasks, spawn_holder, takeover_locker, Stats, TAKEOVER_LIVENESS,
    TAKEOVER_REPORT,
};

/// What to measure.
pub(crate) struct Plan {
    pub(crate) repeats: usize,
    pub(crate) slice: Duration,
    pub(crate) tasks: usize,
    pub(crate) permits: u32,
    pub(crate) trials: usize,
}

/// Permit cycles: each task takes and returns a permit of a semaphore of `permits` shared by
/// `permits` tasks, so a permit is never short, but which one is free varies (a slot tried
/// may be taken by a neighbour: then it costs another try). Under such churn a scan can find
/// every slot held, each at the moment it was tried, though never all at once: such a `Full`
/// answer is counted in `full` (with retryable errors: SQLite's "the lock row kept changing"),
/// and its time is in the slice, not in the cycles.
async fn permit_slice(
    locker: &Locker,
    tag: &str,
    tasks: usize,
    permits: u32,
    slice: Duration,
    full: &Arc<AtomicU64>,
) -> Stats {
    let (locker, tag, full) = (locker.clone(), tag.to_owned(), full.clone());
    run_tasks(tasks, slice, move |t, _| {
        let group = t / permits as usize;
        let semaphore = locker
            .semaphore(format!("bench/prim/sem/{tag}/{group}"), permits)
            .expect("semaphore");
        let full = full.clone();
        async move {
            loop {
                match semaphore.try_acquire().await {
                    Ok(PermitAttempt::Acquired(g)) => {
                        let _ = g.release().await.expect("release");
                        return;
                    }
                    Ok(PermitAttempt::Full(_)) => {
                        full.fetch_add(1, Ordering::Relaxed);
                    }
                    // SQLite under this churn: "the lock row kept changing".
                    Err(e) if e.is_retryable() => {
                        full.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => panic!("try_acquire: {e}"),
                }
            }
        }
    })
    .await
}

pub(crate) async fn run(backend: &str, url: &str, plan: &Plan) {
    println!("\n### {backend}\n\n`{url}`\n");
    let locker = Locker::builder(locker::connect(url).expect("url"))
        .build()
        .expect("locker");
    locker.ready().await.expect("ready");
    // Warm up both sides.
    let _ = lock_cycles(&locker, "prim/warm", 4, Duration::from_millis(300)).await;
    let full = Arc::new(AtomicU64::new(0));
    let _ = permit_slice(
        &locker,
        "warm",
        4,
        plan.permits,
        Duration::from_millis(300),
        &full,
    )
    .await;
    println!(
        "| cycle (acquire + release), {} repeats of alternating {:?} slices | lock cycles/s | permit cycles/s (semaphore of {}, {} tasks per semaphore) | permit/lock per repeat: median (min–max) |\n|---|---|---|---|",
        plan.repeats, plan.slice, plan.permits, plan.permits
    );
    let mut lists = Vec::new();
    for tasks in [1, plan.tasks] {
        let (mut lock_n, mut lock_t, mut permit_n, mut permit_t) = (0u64, 0.0, 0u64, 0.0);
        let mut ratios = Vec::new();
        full.store(0, Ordering::Relaxed);
        for repeat in 0..plan.repeats {
            let tag = format!("{tasks}/{repeat}/{}", std::process::id());
            let mut rates = [0.0; 2];
            // Alternate which side goes first.
            for k in 0..2 {
                let side = (repeat + k) % 2;
                let t0 = Instant::now();
                let stats = if side == 0 {
                    lock_cycles(&locker, &format!("prim/{tag}"), tasks, plan.slice).await
                } else {
                    permit_slice(&locker, &tag, tasks, plan.permits, plan.slice, &full).await
                };
                let elapsed = t0.elapsed().as_secs_f64();
                let n = stats.hist.len();
                rates[side] = n as f64 / elapsed;
                if side == 0 {
                    lock_n += n;
                    lock_t += elapsed;
                } else {
                    permit_n += n;
                    permit_t += elapsed;
                }
            }
            ratios.push(rates[1] / rates[0]);
        }
        let list = ratios
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(" ");
        ratios.sort_by(f64::total_cmp);
        println!(
            "| {tasks} task{} | {:.0} | {:.0} | **{:.2}** ({:.2}–{:.2}) |",
            if tasks == 1 { "" } else { "s" },
            lock_n as f64 / lock_t,
            permit_n as f64 / permit_t,
            percentile(&ratios, 0.5),
            ratios.first().copied().unwrap_or_default(),
            ratios.last().copied().unwrap_or_default()
        );
        lists.push((tasks, list, full.load(Ordering::Relaxed), permit_n));
    }
    println!();
    for (tasks, list, full, cycles) in lists {
        println!(
            "- permit/lock per repeat, {tasks} task(s): {list}; `Full` answers (and retryable errors) while a permit was never short: {full} in {cycles} permit cycles"
        );
    }
    locker.shutdown().await;
    if plan.trials > 0 {
        handoff(url, plan.trials).await;
    }
}

/// The leader (a process holding the election's lock) is SIGKILLed while a campaigner waits
/// and an observer watches: how long until the campaigner leads, and until the observer sees
/// the new leader.
async fn handoff(url: &str, trials: usize) {
    let campaigner = takeover_locker(url);
    let watcher = takeover_locker(url);
    campaigner.ready().await.expect("ready");
    watcher.ready().await.expect("ready");
    let (mut led, mut seen) = (Vec::new(), Vec::new());
    for trial in 0..trials {
        let key = format!("bench/election/{}/{trial}", std::process::id());
        let mut leader = spawn_holder(url, &key);
        let election = campaigner.election(key.as_str()).expect("election");
        let mut watch = watcher.election(key.as_str()).expect("election").observe();
        let first = watch.changed().await.expect("observe").expect("a leader");
        let campaign = tokio::spawn(async move { election.campaign(Wait::forever()).await });
        // Let the campaigner find the leader and subscribe; then kill at a different moment
        // of the leader's report cycle in each trial (its last report sets the takeover time).
        let phase = (trial as u64 * 157) % TAKEOVER_REPORT.as_millis() as u64;
        tokio::time::sleep(Duration::from_millis(200 + phase)).await;
        leader.kill().expect("SIGKILL");
        let killed = Instant::now();
        let _ = leader.wait();
        let observed = tokio::spawn(async move {
            loop {
                match watch.changed().await.expect("observe") {
                    Some(l) if l.owner_hash != first.owner_hash => return Instant::now(),
                    _ => {}
                }
            }
        });
        let leadership = campaign.await.expect("task").expect("campaign");
        led.push(killed.elapsed().as_secs_f64());
        let at = observed.await.expect("observer");
        seen.push(at.duration_since(killed).as_secs_f64());
        let _ = leadership.resign().await.expect("resign");
    }
    campaigner.shutdown().await;
    watcher.shutdown().await;
    led.sort_by(f64::total_cmp);
    seen.sort_by(f64::total_cmp);
    println!(
        "\n| leadership hand-off after SIGKILL of the leader ({trials} trials, liveness TTL {TAKEOVER_LIVENESS:?}) | p50 s | max s |\n|---|---|---|\n| the waiting campaigner leads | {:.2} | {:.2} |\n| an observer sees the new leader | {:.2} | {:.2} |",
        percentile(&led, 0.5),
        led.last().copied().unwrap_or_default(),
        percentile(&seen, 0.5),
        seen.last().copied().unwrap_or_default(),
    );
}
