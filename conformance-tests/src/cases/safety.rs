//! Safety at the edges: replies that arrive after a freeze, shutdown under running jobs,
//! acquires that land after their caller gave up. Each runs on the real store, through
//! [`Interposed`](crate::interpose::Interposed).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use locker_core::{ErrorKind, LockAttempt, LockGuard, Locker};

use super::locker::{acquired, held};
use crate::interpose::{Interposed, Interposer};
use crate::{builder_with, Fixture, Verdict};

/// Runs `locker` on its own thread and runtime: once `start` says so, tries `key` every
/// `every` until it gets it (a takeover, once the holder's liveness record expired), then
/// signals `taken` and holds the lock until `release` says so. Its own thread, because the
/// case's runtime is about to be blocked.
fn take_over_elsewhere(
    locker: Locker,
    key: String,
    every: Duration,
    limit: Duration,
    start: mpsc::Receiver<()>,
    taken: mpsc::Sender<String>,
    release: mpsc::Receiver<()>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            // Warm up (connect, first liveness write) on another key before the race.
            if let Ok(LockAttempt::Acquired(g)) = locker.acquire(format!("{key}/warm-up")).await {
                let _ = g.release().await;
            }
            if start.recv_timeout(limit).is_err() {
                return;
            }
            let start = Instant::now();
            let guard: LockGuard = loop {
                match locker.acquire(&key).await {
                    Ok(LockAttempt::Acquired(guard)) => break guard,
                    Ok(LockAttempt::Held(_)) | Err(_) => {
                        assert!(start.elapsed() < limit, "no takeover within {limit:?}");
                        tokio::time::sleep(every).await;
                    }
                }
            };
            let _ = taken.send(guard.owner_hash().to_owned());
            let _ = tokio::task::spawn_blocking(move || release.recv()).await;
            let _ = guard.release().await;
            locker.shutdown().await;
        });
    })
}

/// The hook of a frozen holder: its liveness writes stop, the other process starts trying, the
/// thread blocks until the other has taken the lock over, then the writes come back (as after
/// a freeze, the reporter writes again as soon as it wakes) and the stale reply is handed back.
fn freeze_until_taken_over(
    control: Arc<Interposer>,
    start: mpsc::Sender<()>,
    taken: mpsc::Receiver<String>,
    limit: Duration,
) -> impl FnOnce() + Send + 'static {
    move || {
        control.cut_pings(true);
        let _ = start.send(());
        let taken = taken.recv_timeout(limit);
        control.cut_pings(false);
        taken.expect("the other locker took the lock over");
        control.wait_for_a_ping(limit);
    }
}

/// Another process that takes a key over while its holder is frozen in an [`Interposer`] hook.
struct Takeover {
    release: mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Takeover {
    /// Starts the other process (waiting for the hook's signal), and returns the hook to install
    /// on the holder.
    fn arrange(
        fx: &Fixture,
        control: &Arc<Interposer>,
        key: &str,
    ) -> (impl FnOnce() + Send + 'static, Takeover) {
        let (start_tx, start_rx) = mpsc::channel();
        let (taken_tx, taken_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel();
        let hook = freeze_until_taken_over(control.clone(), start_tx, taken_rx, limit(fx));
        let thread = take_over_elsewhere(
            fx.locker(),
            key.to_owned(),
            fx.timing.report_every,
            limit(fx),
            start_rx,
            taken_tx,
            release_rx,
        );
        let takeover = Takeover {
            release: release_tx,
            thread,
        };
        (hook, takeover)
    }

    /// Lets the other process release and stop, and waits for it.
    fn finish(self) {
        let _ = self.release.send(());
        self.thread.join().expect("the other locker's thread");
    }
}

fn limit(fx: &Fixture) -> Duration {
    fx.timing.liveness_ttl * 10 + Duration::from_secs(10)
}

/// A recheck's reply says "yours"; then the holder's runtime freezes, its liveness writes
/// stop, and another process takes the lock over; the holder wakes with the ready reply.
/// The beat must fail (seppuku), not say "yours".
pub async fn safety_stale_recheck_after_a_freeze_fails_the_beat(fx: &Fixture) -> Verdict {
    let (factory, control) = Interposed::new(fx.factory.clone());
    let a = builder_with(Arc::new(factory), &fx.timing)
        .build()
        .expect("locker");
    let key = fx.key("k");
    let guard = acquired(&a, &key).await;
    let heartbeat = guard.heartbeat();
    heartbeat.beat().await.expect("a beat before the freeze");

    let (hook, takeover) = Takeover::arrange(fx, &control, &key);
    control.after_next_read(hook);
    // The next beat that is due rechecks (a read): its reply is the stale "yours".
    tokio::time::sleep(fx.timing.recheck_every * 2).await;
    let beat = heartbeat.beat().await;
    takeover.finish();
    let err = beat.expect_err("a beat said \"yours\" after another process took the lock over");
    assert_eq!(err.kind(), ErrorKind::LockLost, "{err}");
    drop(guard);
    a.shutdown().await;
    Verdict::Passed
}

/// An acquire's reply says "acquired"; then the process freezes as above and another process
/// takes the fresh lock over. The late reply must not become a guard.
pub async fn safety_late_acquire_reply_is_not_a_guard(fx: &Fixture) -> Verdict {
    let (factory, control) = Interposed::new(fx.factory.clone());
    let a = builder_with(Arc::new(factory), &fx.timing)
        .build()
        .expect("locker");
    let observer = fx.locker();
    let key = fx.key("k");
    // Start the reporter first, so the hook below catches the acquire of `key` itself.
    let warm = acquired(&a, &fx.key("warm-up")).await;
    let _ = warm.release().await.expect("release");

    let (hook, takeover) = Takeover::arrange(fx, &control, &key);
    control.after_next_acquire(hook);
    let attempt = a.acquire(&key).await;
    let b_owner = held(&observer, &key).await.owner_hash;
    takeover.finish();
    match attempt {
        Ok(LockAttempt::Acquired(guard)) => panic!(
            "a late acquire reply became a guard ({}) while {b_owner} held the lock",
            guard.owner_hash()
        ),
        Ok(LockAttempt::Held(holder)) => panic!("unexpected: held by {}", holder.owner_hash),
        Err(e) => assert!(e.is_retryable(), "a retryable error, got {e}"),
    }
    assert!(
        !b_owner.starts_with(&format!("{key}@{}", a.process_hash())),
        "the other locker holds the lock"
    );
    a.shutdown().await;
    observer.shutdown().await;
    Verdict::Passed
}

/// `shutdown` never releases a lock, nor deletes the liveness record, under a job that still
/// runs: a bounded shutdown returns the running keys and keeps the lock held (and the process
/// alive) past the liveness TTL; the lock is free at once when the job ends.
pub async fn safety_shutdown_waits_for_running_jobs(fx: &Fixture) -> Verdict {
    let a = fx.locker();
    let b = fx.locker();
    let key = fx.key("k");
    // Warm `b` up (connection, first liveness write), so that its checks below are quick.
    let _ = acquired(&b, &fx.key("warm-up")).await.release().await;
    let done = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicBool::new(false));
    let (end_job, job_may_end) = tokio::sync::oneshot::channel::<()>();
    let job = {
        let (a, key, done, started) = (a.clone(), key.clone(), done.clone(), started.clone());
        tokio::spawn(async move {
            a.acquire_and_run(&key, |_heartbeat| async move {
                started.store(true, Ordering::SeqCst);
                // A job that does not beat, so it does not notice the drain.
                let _ = job_may_end.await;
                done.store(true, Ordering::SeqCst);
            })
            .await
        })
    };
    let start = Instant::now();
    let owner = loop {
        // The job runs (not only its lock written: the acquire's reply may still be on its
        // way to `a`, and a shutdown then finds no running job yet).
        if started.load(Ordering::SeqCst) {
            if let Some(lock) = b.inspect(&key).await.expect("inspect") {
                break lock.owner_hash;
            }
        }
        assert!(start.elapsed() < limit(fx), "the job never took the lock");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };

    let running = a.shutdown_timeout(fx.timing.recheck_every).await;
    assert_eq!(running, vec![key.clone()]);
    // Past a whole liveness TTL, the lock is still held by a live process.
    tokio::time::sleep(fx.timing.expiry_of(fx.timing.liveness_ttl)).await;
    assert_eq!(
        held(&b, &key).await.owner_hash,
        owner,
        "the lock moved while its job ran"
    );
    assert!(
        b.inspect(&key).await.expect("inspect").is_some(),
        "the holder looks dead"
    );

    // An unbounded shutdown waits for the job.
    let shutdown = {
        let a = a.clone();
        tokio::spawn(async move { a.shutdown().await })
    };
    tokio::time::sleep(fx.timing.recheck_every * 4).await;
    assert!(
        !shutdown.is_finished(),
        "shutdown returned while the job ran"
    );
    let _ = end_job.send(());
    shutdown.await.expect("shutdown task");
    assert!(
        done.load(Ordering::SeqCst),
        "shutdown returned before the job ended"
    );
    let _ = job.await.expect("job task").expect("acquire_and_run");
    // The job is over and the shutdown complete: free at once.
    let guard = acquired(&b, &key).await;
    let _ = guard.release().await.expect("release");
    b.shutdown().await;
    Verdict::Passed
}

/// An acquire whose caller gave up (a timeout) but whose write lands later, after the undo
/// was first tried, is still undone: the key is not blocked by a live process with no guard.
pub async fn safety_cancelled_acquire_that_lands_late_is_undone(fx: &Fixture) -> Verdict {
    let (factory, control) = Interposed::new(fx.factory.clone());
    let a = builder_with(Arc::new(factory), &fx.timing)
        .build()
        .expect("locker");
    let b = fx.locker();
    let key = fx.key("k");
    let warm = acquired(&a, &fx.key("warm-up")).await;
    let _ = warm.release().await.expect("release");

    let delay = fx.timing.liveness_ttl;
    control.delay_next_acquire(delay);
    let attempt = tokio::time::timeout(delay / 4, a.acquire(&key)).await;
    assert!(attempt.is_err(), "the acquire should still be in flight");
    // The write lands at `delay`, after the first undo; nobody else touches the key meanwhile.
    let start = Instant::now();
    while control.delayed_acquires_landed() == 0 {
        assert!(start.elapsed() < limit(fx), "the delayed acquire never ran");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let landed = Instant::now();
    // It must be undone soon, not left to block the key for a whole lock TTL (30 s here).
    loop {
        match b.acquire(&key).await.expect("acquire") {
            LockAttempt::Acquired(guard) => {
                let _ = guard.release().await.expect("release");
                break;
            }
            LockAttempt::Held(holder) => {
                assert!(
                    landed.elapsed() < fx.timing.liveness_ttl * 4,
                    "the late acquire of {} still blocks the key {:?} after it landed",
                    holder.owner_hash,
                    landed.elapsed()
                );
            }
        }
        tokio::time::sleep(fx.timing.recheck_every).await;
    }
    a.shutdown().await;
    b.shutdown().await;
    Verdict::Passed
}
