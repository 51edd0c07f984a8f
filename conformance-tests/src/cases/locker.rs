//! Locker-level cases: the behaviour users see, on the backend under test.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use locker_core::{
    ErrorKind, LockAttempt, LockData, LockGuard, LockRequest, Locker, OwnerStatus, ReleaseOutcome,
    RunOutcome, Wait,
};

use crate::{Fixture, Verdict};

/// Acquires `key` or panics naming the holder.
pub async fn acquired(locker: &Locker, key: &str) -> LockGuard {
    match locker.acquire(key).await.expect("acquire") {
        LockAttempt::Acquired(guard) => guard,
        LockAttempt::Held(holder) => panic!("{key:?} is held by {}", holder.owner_hash),
    }
}

/// Expects `key` to be held, and returns the holder.
pub async fn held(locker: &Locker, key: &str) -> LockData {
    match locker.acquire(key).await.expect("acquire") {
        LockAttempt::Acquired(guard) => panic!("{key:?} was free: {}", guard.owner_hash()),
        LockAttempt::Held(holder) => holder,
    }
}

/// Acquire, owner status while held, held for others, release, owner status after.
pub async fn locker_acquire_release_and_owner_status(fx: &Fixture) -> Verdict {
    let (a, b) = (fx.locker(), fx.locker());
    let key = fx.key("k");
    let guard = match a
        .acquire(LockRequest::new(&key).trace("my-trace"))
        .await
        .expect("acquire")
    {
        LockAttempt::Acquired(g) => g,
        LockAttempt::Held(h) => panic!("held by {}", h.owner_hash),
    };
    let owner = guard.owner_hash().to_owned();
    assert!(owner.ends_with("#my-trace"), "{owner}");
    match b.owner_status(&owner).await.expect("status") {
        OwnerStatus::Running { key: k, lock } => {
            assert_eq!(k, key);
            assert_eq!(lock.owner_hash, owner);
            assert_eq!(lock.trace.as_deref(), Some("my-trace"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(held(&b, &key).await.owner_hash, owner);
    assert_eq!(
        b.inspect(&key)
            .await
            .expect("inspect")
            .map(|d| d.owner_hash),
        Some(owner.clone())
    );
    assert_eq!(
        guard.release().await.expect("release"),
        ReleaseOutcome::Released
    );
    assert_eq!(
        b.owner_status(&owner).await.expect("status"),
        OwnerStatus::NoKey { key: key.clone() }
    );
    assert_eq!(b.inspect(&key).await.expect("inspect"), None);
    a.shutdown().await;
    b.shutdown().await;
    Verdict::Passed
}

/// The same locker cannot acquire a key it already holds.
pub async fn locker_no_second_acquire_from_the_same_process(fx: &Fixture) -> Verdict {
    let a = fx.locker();
    let key = fx.key("k");
    let guard = acquired(&a, &key).await;
    assert_eq!(held(&a, &key).await.owner_hash, guard.owner_hash());
    assert_eq!(
        guard.release().await.expect("release"),
        ReleaseOutcome::Released
    );
    a.shutdown().await;
    Verdict::Passed
}

/// A guard whose lock moved on releases nothing.
pub async fn locker_no_release_of_someone_elses_lock(fx: &Fixture) -> Verdict {
    let (a, b) = (fx.locker(), fx.locker());
    let key = fx.key("k");
    let old = acquired(&a, &key).await;
    let backend = fx.backend().await;
    let _ = backend
        .release(&key, old.owner_hash())
        .await
        .expect("release");
    let new = acquired(&b, &key).await;
    match old.release().await.expect("release") {
        ReleaseOutcome::Held(h) => assert_eq!(h.owner_hash, new.owner_hash()),
        other => panic!("released someone else's lock: {other:?}"),
    }
    assert_eq!(
        backend
            .read(&key)
            .await
            .expect("read")
            .map(|d| d.owner_hash),
        Some(new.owner_hash().to_owned())
    );
    // A guard still alive keeps a shutdown waiting: release it first.
    let _ = new.release().await.expect("release");
    a.shutdown().await;
    b.shutdown().await;
    Verdict::Passed
}

/// When the owner process dies (its reporter stops), another process takes over within about
/// one liveness TTL, although the lock TTL is long.
pub async fn locker_takeover_after_the_owner_process_dies(fx: &Fixture) -> Verdict {
    let (dying, b) = (fx.locker(), fx.locker());
    let key = fx.key("k");
    let guard = acquired(&dying, &key).await;
    let owner = guard.owner_hash().to_owned();
    std::mem::forget(guard); // a crash releases nothing
    held(&b, &key).await;
    dying.abandon().await;
    let died = Instant::now();
    let limit = fx.timing.expiry_of(fx.timing.liveness_ttl) + Duration::from_secs(1);
    let new = loop {
        match b.acquire(&key).await.expect("acquire") {
            LockAttempt::Acquired(g) => break g,
            LockAttempt::Held(h) => {
                assert_eq!(h.owner_hash, owner);
                assert!(died.elapsed() < limit, "no takeover after {limit:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    match b.owner_status(&owner).await.expect("status") {
        OwnerStatus::HeldByOther { lock, .. } => assert_eq!(lock.owner_hash, new.owner_hash()),
        other => panic!("{other:?}"),
    }
    let _ = new.release().await.expect("release");
    b.shutdown().await;
    Verdict::Passed
}

/// A lock that is not extended expires after the lock TTL, and its heartbeat fails.
pub async fn locker_expiry_when_not_extended(fx: &Fixture) -> Verdict {
    let t = fx.timing;
    let a = fx.short_ttl_locker();
    let key = fx.key("k");
    let guard = acquired(&a, &key).await;
    tokio::time::sleep(t.expiry_of(t.short_lock_ttl)).await;
    assert_eq!(a.inspect(&key).await.expect("inspect"), None);
    assert_eq!(
        a.owner_status(guard.owner_hash()).await.expect("status"),
        OwnerStatus::NoKey { key: key.clone() }
    );
    let e = guard.heartbeat().beat().await.expect_err("expired");
    assert_eq!(e.kind(), ErrorKind::LockLost);
    a.shutdown().await;
    Verdict::Passed
}

/// A beating job keeps its lock well past the lock TTL.
pub async fn locker_extension_keeps_the_lock(fx: &Fixture) -> Verdict {
    let t = fx.timing;
    let a = fx.short_ttl_locker();
    let key = fx.key("k");
    let guard = acquired(&a, &key).await;
    let first = guard.lock_data();
    guard
        .heartbeat()
        .sleep(t.short_lock_ttl * 3)
        .await
        .expect("beating keeps the lock");
    let backend = fx.backend().await;
    let now = backend.read(&key).await.expect("read").expect("still held");
    assert_eq!(now.owner_hash, first.owner_hash);
    assert_eq!(now.acquired_at, first.acquired_at);
    assert!(now.extended_at > first.extended_at);
    assert_eq!(now.fencing_token, first.fencing_token);
    assert_eq!(
        guard.release().await.expect("release"),
        ReleaseOutcome::Released
    );
    a.shutdown().await;
    Verdict::Passed
}

/// `acquire_and_run` holds the lock while the job runs and releases it after.
pub async fn locker_acquire_and_run(fx: &Fixture) -> Verdict {
    let (a, b) = (fx.locker(), fx.locker());
    let key = fx.key("k");
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let job = tokio::spawn({
        let (a, key) = (a.clone(), key.clone());
        async move {
            a.acquire_and_run(key.as_str(), |hb| async move {
                let _ = started_tx.send(hb.owner_hash().to_owned());
                tokio::select! {
                    _ = stop_rx => {}
                    e = hb.lost() => panic!("lost: {e}"),
                }
                "done"
            })
            .await
        }
    });
    let owner = started_rx.await.expect("job started");
    for _ in 0..10 {
        assert_eq!(held(&b, &key).await.owner_hash, owner);
        tokio::time::sleep(fx.timing.recheck_every).await;
    }
    stop_tx.send(()).expect("job waits");
    assert_eq!(
        job.await.expect("joined").expect("ran"),
        RunOutcome::Ran("done")
    );
    assert_eq!(b.inspect(&key).await.expect("inspect"), None);
    let again = b
        .acquire_and_run(key.as_str(), |_| async { 2 })
        .await
        .expect("run");
    assert_eq!(again, RunOutcome::Ran(2));
    a.shutdown().await;
    b.shutdown().await;
    Verdict::Passed
}

/// A job whose lock was taken over fails its next beat, naming the new owner.
pub async fn locker_seppuku_after_a_takeover(fx: &Fixture) -> Verdict {
    let (a, b) = (fx.locker(), fx.locker());
    let key = fx.key("k");
    let guard = acquired(&a, &key).await;
    let hb = guard.heartbeat();
    hb.beat().await.expect("held");
    let backend = fx.backend().await;
    let _ = backend
        .release(&key, guard.owner_hash())
        .await
        .expect("release");
    let new = acquired(&b, &key).await;
    tokio::time::sleep(fx.timing.recheck_every + Duration::from_millis(10)).await;
    let e = hb.beat().await.expect_err("seppuku");
    assert_eq!(e.kind(), ErrorKind::LockLost);
    assert_eq!(
        e.holder().map(|h| h.owner_hash.as_str()),
        Some(new.owner_hash())
    );
    // The lost lock does not keep `a`'s shutdown waiting; a live guard would keep `b`'s.
    a.shutdown().await;
    let _ = new.release().await.expect("release");
    b.shutdown().await;
    Verdict::Passed
}

/// Seppuku also when the new owner is the same locker (its liveness record vanished).
pub async fn locker_seppuku_after_a_takeover_by_the_same_process(fx: &Fixture) -> Verdict {
    let a = fx.locker();
    let key = fx.key("k");
    let old = acquired(&a, &key).await;
    let hb = old.heartbeat();
    let backend = fx.backend().await;
    // The reporter may write the record again between the deletion and the acquire's check:
    // try until the acquire sees it missing.
    let mut new = None;
    for _ in 0..20 {
        backend
            .forget_process(a.process_hash())
            .await
            .expect("forget");
        if let LockAttempt::Acquired(g) = a.acquire(key.as_str()).await.expect("acquire") {
            new = Some(g);
            break;
        }
    }
    let new = new.expect("the same locker never took its own lock over");
    assert_ne!(new.owner_hash(), old.owner_hash());
    tokio::time::sleep(fx.timing.recheck_every + Duration::from_millis(10)).await;
    let e = hb.beat().await.expect_err("seppuku");
    assert_eq!(e.kind(), ErrorKind::LockLost);
    assert_eq!(
        e.holder().map(|h| h.owner_hash.as_str()),
        Some(new.owner_hash())
    );
    let _ = new.release().await.expect("release");
    a.shutdown().await;
    Verdict::Passed
}

async fn mutex_never_overlaps(fx: &Fixture, lockers: usize) -> Verdict {
    let pool: Vec<Locker> = (0..lockers).map(|_| fx.locker()).collect();
    let key = fx.key("mutex");
    let inside = Arc::new(AtomicUsize::new(0));
    let runs = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..10u32)
        .map(|i| {
            let locker = pool[i as usize % lockers].clone();
            let (inside, runs, key) = (inside.clone(), runs.clone(), key.clone());
            tokio::spawn(async move {
                locker
                    .mutex(
                        key.as_str(),
                        Wait::up_to(Duration::from_secs(60)),
                        |hb| async move {
                            assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "overlap");
                            hb.sleep(Duration::from_millis(u64::from(i) * 10))
                                .await
                                .expect("held");
                            assert_eq!(inside.fetch_sub(1, Ordering::SeqCst), 1, "overlap");
                            runs.fetch_add(1, Ordering::SeqCst);
                        },
                    )
                    .await
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("no overlap").expect("mutex");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 10);
    for l in pool {
        l.shutdown().await;
    }
    Verdict::Passed
}

/// Ten tasks on one locker under `mutex` never overlap.
pub async fn locker_mutex_on_one_locker_never_overlaps(fx: &Fixture) -> Verdict {
    mutex_never_overlaps(fx, 1).await
}

/// Ten tasks on two lockers under `mutex` never overlap.
pub async fn locker_mutex_on_two_lockers_never_overlaps(fx: &Fixture) -> Verdict {
    mutex_never_overlaps(fx, 2).await
}

/// The reporter rewrites the liveness record about every `report_every`.
pub async fn locker_reporter_writes_regularly(fx: &Fixture) -> Verdict {
    let a = fx.locker();
    let key = fx.key("k");
    let guard = acquired(&a, &key).await;
    let backend = fx.backend().await;
    let mut seen = std::collections::BTreeSet::new();
    let t = fx.timing;
    let until = Instant::now() + t.report_every * 20;
    while Instant::now() < until {
        let alive = backend
            .read_process(a.process_hash())
            .await
            .expect("read")
            .expect("the liveness record exists while the locker runs");
        seen.insert(alive.alive_at);
        tokio::time::sleep(t.report_every / 4).await;
    }
    assert!(
        seen.len() >= 8,
        "only {} distinct reports in 20 intervals",
        seen.len()
    );
    drop(guard);
    a.shutdown().await;
    Verdict::Passed
}

/// Against an unreachable server, the first acquire fails with a retryable error within the
/// start timeout, and the reporter's errors reach the subscribers.
pub async fn locker_reporter_reports_errors_against_an_unreachable_server(fx: &Fixture) -> Verdict {
    let Some(unreachable) = fx.unreachable.clone() else {
        return Verdict::skip("the setup gives no unreachable server");
    };
    let a = crate::builder_with(unreachable, &fx.timing)
        .reporter_start_timeout(Duration::from_secs(2))
        .build()
        .expect("timings");
    let mut errors = a.subscribe_errors();
    let started = Instant::now();
    let e = a
        .acquire(fx.key("k").as_str())
        .await
        .expect_err("acquired on an unreachable server");
    assert!(e.is_retryable(), "{e}");
    assert!(
        matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::Timeout),
        "{e}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    let bg = tokio::time::timeout(Duration::from_secs(30), errors.recv())
        .await
        .expect("a background error within 30 s")
        .expect("error");
    assert!(bg.error.is_retryable(), "{}", bg.error);
    a.abandon().await;
    Verdict::Passed
}

/// After `shutdown`, another locker acquires at once, without waiting for any TTL.
pub async fn locker_clean_shutdown_frees_locks_at_once(fx: &Fixture) -> Verdict {
    let (a, b) = (fx.locker(), fx.locker());
    let key = fx.key("k");
    // A job that stops when its heartbeat says so: the drain reaches it at once.
    // The job says when it runs: the record is in the store a moment before the acquire
    // returns, and a shutdown in that moment refuses the guard (no job runs then).
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let job = {
        let (a, key) = (a.clone(), key.clone());
        tokio::spawn(async move {
            a.acquire_and_run(&key, |heartbeat| async move {
                let _ = started_tx.send(());
                heartbeat.lost().await
            })
            .await
        })
    };
    tokio::time::timeout(Duration::from_secs(30), started)
        .await
        .expect("the job never started")
        .expect("the job never started");
    assert!(b.inspect(&key).await.expect("inspect").is_some());
    a.shutdown().await;
    match job.await.expect("job task").expect("acquire_and_run") {
        RunOutcome::Ran(stopped) => assert_eq!(stopped.kind(), ErrorKind::Draining, "{stopped}"),
        RunOutcome::Held(h) => panic!("held by {}", h.owner_hash),
    }
    let backend = fx.backend().await;
    assert_eq!(
        backend.read_process(a.process_hash()).await.expect("read"),
        None
    );
    assert_eq!(
        backend.read(&key).await.expect("read"),
        None,
        "shutdown left the lock behind"
    );
    let new = acquired(&b, &key).await;
    assert_eq!(
        a.acquire(key.as_str()).await.expect_err("shut down").kind(),
        ErrorKind::Shutdown
    );
    let _ = new.release().await.expect("release");
    b.shutdown().await;
    Verdict::Passed
}

/// A job that blocks its runtime thread for three liveness TTLs keeps its lock, because the
/// reporter runs on its own thread.
pub async fn locker_blocked_runtime_keeps_its_lock(fx: &Fixture) -> Verdict {
    let key = fx.key("k");
    let t = fx.timing;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let factory = fx.factory.clone();
    let job_key = key.clone();
    let job = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let a = crate::builder_with(factory, &t).build().expect("timings");
            let guard = acquired(&a, &job_key).await;
            let _ = tx.send(());
            std::thread::sleep(t.liveness_ttl * 3);
            let beat = guard.heartbeat().beat().await;
            let released = guard.release().await;
            a.shutdown().await;
            (beat, released)
        })
    });
    rx.await.expect("acquired");
    let b = fx.locker();
    tokio::time::sleep(t.liveness_ttl * 2).await;
    held(&b, &key).await;
    let (beat, released) = tokio::task::spawn_blocking(move || job.join())
        .await
        .expect("join task")
        .expect("job thread");
    beat.expect("the lock is still ours after the block");
    assert_eq!(released.expect("release"), ReleaseOutcome::Released);
    b.shutdown().await;
    Verdict::Passed
}
