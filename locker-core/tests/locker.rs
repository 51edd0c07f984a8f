//! Locker behaviour over `MemoryBackend`, with millisecond timings so the suite stays fast.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use locker_core::{
    AcquireOutcome, BackgroundSource, ErrorKind, LockAttempt, LockBackend, LockData, LockGuard,
    LockRequest, Locker, MemoryBackend, OwnerStatus, ReleaseOutcome, RunOutcome, Wait,
};

const REPORT: Duration = Duration::from_millis(40);
const LIVENESS: Duration = Duration::from_millis(300);

fn fast(store: &MemoryBackend) -> locker_core::LockerBuilder {
    Locker::builder(store.clone())
        .report_every(REPORT)
        .liveness_ttl(LIVENESS)
        .reporter_start_timeout(Duration::from_secs(5))
        .recheck_every(Duration::from_millis(50))
        .extend_every(Duration::from_millis(200))
        .lock_ttl(Duration::from_secs(2))
}

fn locker(store: &MemoryBackend) -> Locker {
    fast(store).build().expect("valid options")
}

async fn acquired(locker: &Locker, key: &str) -> LockGuard {
    match locker.acquire(key).await.expect("acquire") {
        LockAttempt::Acquired(guard) => guard,
        LockAttempt::Held(holder) => panic!("{key} is held by {}", holder.owner_hash),
    }
}

async fn held(locker: &Locker, key: &str) -> locker_core::LockData {
    match locker.acquire(key).await.expect("acquire") {
        LockAttempt::Acquired(guard) => panic!("{key} was acquired as {}", guard.owner_hash()),
        LockAttempt::Held(holder) => holder,
    }
}

async fn eventually(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquires_releases_and_reports_owner_status() {
    let store = MemoryBackend::new();
    let (a, b) = (locker(&store), locker(&store));
    let guard = match a
        .acquire(LockRequest::new("k").trace("my-trace"))
        .await
        .expect("acquire")
    {
        LockAttempt::Acquired(g) => g,
        LockAttempt::Held(_) => panic!("free key was held"),
    };
    let owner = guard.owner_hash().to_owned();
    assert!(
        owner.starts_with(&format!("k@{}.", a.process_hash())),
        "{owner}"
    );
    assert!(owner.ends_with("#my-trace"), "{owner}");
    assert_eq!(guard.lock_data().trace.as_deref(), Some("my-trace"));
    assert_eq!(
        b.owner_status(&owner).await.expect("status"),
        OwnerStatus::Running {
            key: "k".into(),
            lock: guard.lock_data()
        }
    );
    let holder = held(&b, "k").await;
    assert_eq!(holder.owner_hash, owner);
    assert_eq!(
        b.inspect("k").await.expect("inspect"),
        Some(guard.lock_data())
    );

    assert_eq!(
        guard.release().await.expect("release"),
        ReleaseOutcome::Released
    );
    assert_eq!(
        b.owner_status(&owner).await.expect("status"),
        OwnerStatus::NoKey { key: "k".into() }
    );
    assert_eq!(b.inspect("k").await.expect("inspect"), None);
    assert_eq!(
        b.owner_status("not an owner hash").await.expect("status"),
        OwnerStatus::Malformed
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_report_is_written_before_the_first_acquire_returns() {
    let store = MemoryBackend::new();
    let a = locker(&store);
    assert_eq!(
        store.calls().ping,
        0,
        "nothing starts before the first acquire"
    );
    let _guard = acquired(&a, "k").await;
    assert!(store
        .read_process(a.process_hash())
        .await
        .expect("read")
        .is_some());
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_acquire_from_the_same_locker_is_held() {
    let store = MemoryBackend::new();
    let a = locker(&store);
    let guard = acquired(&a, "k").await;
    assert_eq!(held(&a, "k").await.owner_hash, guard.owner_hash());
    assert_eq!(
        guard.release().await.expect("release"),
        ReleaseOutcome::Released
    );
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_releases_someone_elses_lock() {
    let store = MemoryBackend::new();
    let (a, b) = (locker(&store), locker(&store));
    let old = acquired(&a, "k").await;
    // Make a's lock look abandoned, so b takes it over.
    assert_eq!(
        store.release("k", old.owner_hash()).await.expect("release"),
        ReleaseOutcome::Released
    );
    let new = acquired(&b, "k").await;
    match old.release().await.expect("release") {
        ReleaseOutcome::Held(holder) => assert_eq!(holder.owner_hash, new.owner_hash()),
        other => panic!("released someone else's lock: {other:?}"),
    }
    assert_eq!(
        store.read("k").await.expect("read").map(|d| d.owner_hash),
        Some(new.owner_hash().to_owned())
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_process_lock_is_taken_over_within_one_liveness_ttl() {
    let store = MemoryBackend::new();
    let (dying, b) = (locker(&store), locker(&store));
    let guard = acquired(&dying, "k").await;
    let owner = guard.owner_hash().to_owned();
    std::mem::forget(guard); // a crash releases nothing
    held(&b, "k").await;

    dying.abandon().await;
    let died = Instant::now();
    let new = loop {
        match b.acquire("k").await.expect("acquire") {
            LockAttempt::Acquired(g) => break g,
            LockAttempt::Held(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    let took = died.elapsed();
    // The record was last written at most one report before the death and lives one TTL.
    assert!(
        took <= LIVENESS + Duration::from_millis(150),
        "took {took:?}"
    );
    assert_eq!(new.fencing_token(), Some(2));
    match b.owner_status(&owner).await.expect("status") {
        OwnerStatus::HeldByOther { lock, .. } => assert_eq!(lock.owner_hash, new.owner_hash()),
        other => panic!("{other:?}"),
    }
    assert_eq!(store.calls().take_over, 1);
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_expires_when_not_extended_and_its_heartbeat_fails() {
    let store = MemoryBackend::new();
    let a = fast(&store)
        .lock_ttl(Duration::from_millis(300))
        .extend_every(Duration::from_millis(100))
        .build()
        .expect("options");
    let guard = acquired(&a, "k").await;
    let heartbeat = guard.heartbeat();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(a.inspect("k").await.expect("inspect"), None);
    assert_eq!(
        a.owner_status(guard.owner_hash()).await.expect("status"),
        OwnerStatus::NoKey { key: "k".into() }
    );
    let reads = store.calls().lock_calls();
    let e = heartbeat.beat().await.expect_err("expired");
    assert_eq!(e.kind(), ErrorKind::LockLost);
    assert_eq!(
        store.calls().lock_calls(),
        reads,
        "known locally, without I/O"
    );
    assert_eq!(
        heartbeat.beat().await.expect_err("sticky").kind(),
        ErrorKind::LockLost
    );
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beating_extends_the_lock_past_its_ttl() {
    let store = MemoryBackend::new();
    let a = fast(&store)
        .lock_ttl(Duration::from_millis(300))
        .extend_every(Duration::from_millis(100))
        .build()
        .expect("options");
    let guard = acquired(&a, "k").await;
    let first = guard.lock_data();
    guard
        .heartbeat()
        .sleep(Duration::from_millis(1000))
        .await
        .expect("beats");
    let now = store.read("k").await.expect("read").expect("still held");
    assert_eq!(now.owner_hash, first.owner_hash);
    assert_eq!(now.acquired_at, first.acquired_at);
    assert!(now.extended_at > first.extended_at);
    assert_eq!(
        now.fencing_token, first.fencing_token,
        "extension keeps the token"
    );
    assert!(store.calls().extend >= 5, "{:?}", store.calls());
    // An explicit extension works too.
    guard.extend().await.expect("extend");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_and_run_holds_the_lock_while_the_job_runs() {
    let store = MemoryBackend::new();
    let (a, b) = (locker(&store), locker(&store));
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let job = tokio::spawn({
        let a = a.clone();
        async move {
            a.acquire_and_run("k", |hb| async move {
                let _ = started_tx.send(hb.owner_hash().to_owned());
                tokio::select! {
                    _ = stop_rx => {}
                    e = hb.lost() => panic!("lost: {e}"),
                }
                7
            })
            .await
        }
    });
    let owner = started_rx.await.expect("started");
    for _ in 0..20 {
        assert_eq!(held(&b, "k").await.owner_hash, owner);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop_tx.send(()).expect("job waits");
    assert_eq!(job.await.expect("joined").expect("ran"), RunOutcome::Ran(7));
    // Released when the job ended.
    assert_eq!(store.read("k").await.expect("read"), None);
    match b.acquire_and_run("k", |_| async { 8 }).await.expect("run") {
        RunOutcome::Ran(v) => assert_eq!(v, 8),
        RunOutcome::Held(h) => panic!("held by {}", h.owner_hash),
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_and_run_releases_after_an_error_and_after_a_panic() {
    let store = MemoryBackend::new();
    let a = locker(&store);
    let out = a
        .acquire_and_run("k", |_| async { Err::<(), _>("job failed") })
        .await
        .expect("ran");
    assert_eq!(out, RunOutcome::Ran(Err("job failed")));
    assert_eq!(store.read("k").await.expect("read"), None);

    let panicking = tokio::spawn({
        let a = a.clone();
        async move {
            a.acquire_and_run("k", |_| async {
                panic!("job panicked");
            })
            .await
        }
    });
    let e = panicking.await.expect_err("the panic resumes");
    assert!(e.is_panic());
    assert_eq!(
        store.read("k").await.expect("read"),
        None,
        "released before resuming"
    );
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_job_releases_in_the_background() {
    let store = MemoryBackend::new();
    let a = locker(&store);
    let run = a.acquire_and_run(
        "k",
        |hb| async move { hb.sleep(Duration::from_secs(60)).await },
    );
    // Cancel the whole run while the job sleeps.
    assert!(tokio::time::timeout(Duration::from_millis(100), run)
        .await
        .is_err());
    eventually("background release", Duration::from_secs(2), || {
        store.calls().release >= 1
    })
    .await;
    assert_eq!(store.read("k").await.expect("read"), None);
    a.shutdown().await;
}

#[test]
fn a_guard_dropped_outside_any_runtime_is_released() {
    let store = MemoryBackend::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (a, guard) = rt.block_on(async {
        let a = locker(&store);
        let guard = acquired(&a, "k").await;
        (a, guard)
    });
    drop(rt);
    drop(guard); // no runtime here: the reporter thread releases it
    let start = Instant::now();
    while store.calls().release == 0 {
        assert!(start.elapsed() < Duration::from_secs(2), "not released");
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seppuku_on_the_next_beat_after_a_takeover() {
    let store = MemoryBackend::new();
    let (a, b) = (locker(&store), locker(&store));
    let guard = acquired(&a, "k").await;
    let hb = guard.heartbeat();
    hb.beat().await.expect("held");
    // Someone deletes the lock (an operator, a failover that lost the write) and b takes it.
    let _ = store
        .release("k", guard.owner_hash())
        .await
        .expect("release");
    let new = acquired(&b, "k").await;
    tokio::time::sleep(Duration::from_millis(60)).await; // a recheck is due
    let e = hb.beat().await.expect_err("seppuku");
    assert_eq!(e.kind(), ErrorKind::LockLost);
    assert_eq!(
        e.holder().map(|h| h.owner_hash.as_str()),
        Some(new.owner_hash())
    );
    assert!(e.to_string().contains(new.owner_hash()), "{e}");
    assert_eq!(hb.lost().await.kind(), ErrorKind::LockLost);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seppuku_after_a_takeover_by_the_same_locker() {
    let store = MemoryBackend::new();
    let a = locker(&store);
    let old = acquired(&a, "k").await;
    let hb = old.heartbeat();
    // This process's liveness record vanishes (as after a long network cut), so even this
    // same locker may take the lock over.
    store
        .forget_process(a.process_hash())
        .await
        .expect("forget");
    let new = acquired(&a, "k").await;
    assert_ne!(new.owner_hash(), old.owner_hash());
    assert!(new.fencing_token() > old.fencing_token());
    tokio::time::sleep(Duration::from_millis(60)).await;
    let e = hb.beat().await.expect_err("seppuku");
    assert_eq!(e.kind(), ErrorKind::LockLost);
    assert_eq!(
        e.holder().map(|h| h.owner_hash.as_str()),
        Some(new.owner_hash())
    );
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_completes_when_the_lock_is_taken_over() {
    let store = MemoryBackend::new();
    let a = locker(&store);
    let guard = acquired(&a, "k").await;
    let lost = tokio::spawn(guard.heartbeat().lost());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !lost.is_finished(),
        "lost() resolved while the lock was held"
    );
    // Another owner replaces the lock in one atomic step.
    let other = LockData::new("k@other/1.2.3".into(), "other/1.2".into(), None);
    let taken = store
        .take_over("k", &other, Duration::from_secs(10), guard.owner_hash())
        .await
        .expect("take over");
    assert!(matches!(taken, AcquireOutcome::Acquired(_)));
    let e = tokio::time::timeout(Duration::from_secs(2), lost)
        .await
        .expect("lost() noticed within a recheck")
        .expect("joined");
    assert_eq!(e.kind(), ErrorKind::LockLost);
    assert_eq!(
        e.holder().map(|h| h.owner_hash.as_str()),
        Some("k@other/1.2.3")
    );
    a.shutdown().await;
}

#[test]
fn a_blocked_runtime_keeps_its_lock() {
    let store = MemoryBackend::new();
    let (tx, rx) = std::sync::mpsc::channel();
    let job_store = store.clone();
    let job = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let a = fast(&job_store)
                .lock_ttl(Duration::from_secs(30))
                .build()
                .expect("options");
            let guard = acquired(&a, "k").await;
            tx.send(()).expect("main waits");
            // The job blocks its (only) runtime thread for three liveness TTLs.
            std::thread::sleep(3 * LIVENESS);
            let beat = guard.heartbeat().beat().await;
            let released = guard.release().await;
            a.shutdown().await;
            (beat, released)
        })
    });
    rx.recv().expect("acquired");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let b = locker(&store);
        // Well past one liveness TTL into the block, the owner is still alive to the cluster.
        tokio::time::sleep(2 * LIVENESS).await;
        held(&b, "k").await;
        b.shutdown().await;
    });
    let (beat, released) = job.join().expect("job thread");
    beat.expect("the lock is still ours after the block");
    assert_eq!(released.expect("release"), ReleaseOutcome::Released);
}

async fn mutex_never_overlaps(lockers: usize) {
    let store = MemoryBackend::new();
    let pool: Vec<Locker> = (0..lockers).map(|_| locker(&store)).collect();
    let inside = Arc::new(AtomicUsize::new(0));
    let runs = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..10u64)
        .map(|i| {
            let locker = pool[i as usize % lockers].clone();
            let (inside, runs) = (inside.clone(), runs.clone());
            tokio::spawn(async move {
                locker
                    .mutex("m", Wait::up_to(Duration::from_secs(20)), |hb| async move {
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "overlap");
                        hb.sleep(Duration::from_millis(i * 5)).await.expect("held");
                        assert_eq!(inside.fetch_sub(1, Ordering::SeqCst), 1, "overlap");
                        runs.fetch_add(1, Ordering::SeqCst);
                    })
                    .await
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("no overlap panic").expect("mutex");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 10);
    for l in pool {
        l.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutex_on_one_locker_never_overlaps() {
    mutex_never_overlaps(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutex_on_two_lockers_never_overlaps() {
    mutex_never_overlaps(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutex_timeout_names_the_holder() {
    let store = MemoryBackend::new();
    let (a, b) = (locker(&store), locker(&store));
    let guard = acquired(&a, "m").await;
    let e = b
        .mutex("m", Wait::up_to(Duration::from_millis(100)), |_| async {
            unreachable!("ran while held")
        })
        .await
        .expect_err("timeout");
    assert_eq!(e.kind(), ErrorKind::MutexTimeout);
    assert_eq!(e.key(), Some("m"));
    assert_eq!(
        e.holder().map(|h| h.owner_hash.as_str()),
        Some(guard.owner_hash())
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_beats_coalesce_into_one_backend_call() {
    let store = MemoryBackend::new();
    let a = locker(&store);
    let guard = acquired(&a, "k").await;
    let hb = guard.heartbeat();

    // Nothing due: beats are free.
    let before = store.calls();
    for _ in 0..1000 {
        hb.beat().await.expect("beat");
    }
    assert_eq!(store.calls().lock_calls(), before.lock_calls());

    for round in 0..2 {
        tokio::time::sleep(Duration::from_millis(60)).await; // a recheck is due
        let before = store.calls().lock_calls();
        let beats = (0..100).map(|_| hb.beat());
        for r in futures::future::join_all(beats).await {
            r.expect("beat");
        }
        assert_eq!(store.calls().lock_calls() - before, 1, "round {round}");
    }
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_fails_every_heartbeat_and_acquire() {
    let store = MemoryBackend::new();
    let a = locker(&store);
    let guard = acquired(&a, "k").await;
    a.drain("deploy in progress");
    assert!(a.is_draining());
    let e = guard.heartbeat().beat().await.expect_err("draining");
    assert_eq!(e.kind(), ErrorKind::Draining);
    assert!(e.to_string().contains("deploy in progress"), "{e}");
    assert_eq!(
        a.acquire("other").await.expect_err("draining").kind(),
        ErrorKind::Draining
    );
    assert_eq!(
        guard.release().await.expect("release"),
        ReleaseOutcome::Released
    );
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_another_locker_acquire_at_once() {
    let store = MemoryBackend::new();
    let (a, b) = (locker(&store), locker(&store));
    let guard = acquired(&a, "k1").await;
    let guard2 = acquired(&a, "k2").await;
    drop(guard2);
    a.shutdown().await;
    assert_eq!(
        store.read_process(a.process_hash()).await.expect("read"),
        None
    );
    assert_eq!(store.read("k1").await.expect("read"), None);
    let _k1 = acquired(&b, "k1").await;
    let _k2 = acquired(&b, "k2").await;
    let e = guard.heartbeat().beat().await.expect_err("stopped");
    assert!(
        matches!(e.kind(), ErrorKind::Draining | ErrorKind::LockLost),
        "{e}"
    );
    assert_eq!(
        a.acquire("k3").await.expect_err("shut down").kind(),
        ErrorKind::Shutdown
    );
    a.shutdown().await; // idempotent
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_at_start_is_a_timeout_that_names_the_cause() {
    let store = MemoryBackend::new();
    store.set_unavailable(true);
    let a = fast(&store)
        .reporter_start_timeout(Duration::from_millis(300))
        .build()
        .expect("options");
    let mut errors = a.subscribe_errors();
    let e = a.acquire("k").await.expect_err("unreachable");
    assert_eq!(e.kind(), ErrorKind::Timeout);
    assert!(e.is_retryable());
    assert!(e.to_string().contains("unavailable"), "{e}");
    let bg = errors.recv().await.expect("a background error");
    assert_eq!(bg.source, BackgroundSource::Reporter);
    assert_eq!(bg.error.kind(), ErrorKind::Unavailable);

    store.set_unavailable(false);
    let _k = acquired(&a, "k").await; // recovers without a new Locker
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_liveness_lapse_fails_the_heartbeat_even_after_recovery() {
    let store = MemoryBackend::new();
    let a = fast(&store)
        .lock_ttl(Duration::from_secs(30))
        .build()
        .expect("options");
    let guard = acquired(&a, "k").await;
    store.set_unavailable(true);
    tokio::time::sleep(LIVENESS + Duration::from_millis(100)).await;
    store.set_unavailable(false);
    // Let the reporter write again: the record is fresh, but it was missing for a while.
    tokio::time::sleep(3 * REPORT).await;
    let e = guard.heartbeat().beat().await.expect_err("lapsed");
    assert_eq!(e.kind(), ErrorKind::LockLost);
    assert!(e.to_string().contains("liveness"), "{e}");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_outage_is_retried_not_fatal() {
    let store = MemoryBackend::new();
    let a = locker(&store);
    let mut errors = a.subscribe_errors();
    let guard = acquired(&a, "k").await;
    let hb = guard.heartbeat();
    store.set_unavailable(true);
    tokio::time::sleep(Duration::from_millis(60)).await; // a recheck is due
    hb.beat()
        .await
        .expect("a retryable failure does not kill the job");
    let bg = loop {
        let e = errors.recv().await.expect("error");
        if e.source == BackgroundSource::Heartbeat {
            break e;
        }
    };
    assert!(bg.error.is_retryable());
    store.set_unavailable(false);
    tokio::time::sleep(Duration::from_millis(60)).await;
    hb.beat().await.expect("healthy again");
    assert_eq!(
        guard.release().await.expect("release"),
        ReleaseOutcome::Released
    );
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_tokens_strictly_increase_across_cycles_and_takeovers() {
    let store = MemoryBackend::new();
    let (a, b) = (locker(&store), locker(&store));
    let mut last = 0;
    for i in 0..6 {
        let who = if i % 2 == 0 { &a } else { &b };
        let guard = acquired(who, "f").await;
        let token = guard.fencing_token().expect("memory backend fences");
        assert!(token > last, "{token} after {last}");
        last = token;
        if i == 3 {
            // Taken over after its holder "died".
            store
                .forget_process(who.process_hash())
                .await
                .expect("forget");
            std::mem::forget(guard);
        } else {
            let _ = guard.release().await.expect("release");
        }
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keys_are_typed_errors_and_hostile_keys_work() {
    let store = MemoryBackend::new();
    let a = locker(&store);
    for bad in [String::new(), "k".repeat(locker_core::MAX_KEY_LEN + 1)] {
        let e = a.acquire(bad.as_str()).await.expect_err("invalid");
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert_eq!(
            a.inspect(&bad).await.expect_err("invalid").kind(),
            ErrorKind::InvalidInput
        );
    }
    let e = a
        .acquire(LockRequest::new("k").trace("x@host/1.2.3"))
        .await
        .expect_err("ambiguous trace");
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    let long = "λ".repeat(512);
    for key in [
        "a@b/1.2.3",
        "x/y#z",
        "{slot}",
        "with space",
        "new\nline",
        "nul\0",
        "🔒",
        long.as_str(),
    ] {
        let guard = acquired(&a, key).await;
        match a.owner_status(guard.owner_hash()).await.expect("status") {
            OwnerStatus::Running { key: k, .. } => assert_eq!(k, key),
            other => panic!("{key:?}: {other:?}"),
        }
        assert_eq!(
            guard.release().await.expect("release"),
            ReleaseOutcome::Released
        );
    }
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_record_is_a_typed_error_not_a_panic() {
    let store = MemoryBackend::new();
    let a = locker(&store);
    store.put_raw("k", "{not json", Duration::from_secs(10));
    let e = a.acquire("k").await.expect_err("corrupt");
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(!e.is_retryable());
    assert_eq!(
        a.inspect("k").await.expect_err("corrupt").kind(),
        ErrorKind::Corrupt
    );
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_cancelled_after_the_write_landed_is_released() {
    let store = MemoryBackend::new();
    let a = locker(&store);
    // Start the reporter first, so the slow store only delays the acquire's answer.
    let warm = acquired(&a, "warm-up").await;
    drop(warm);
    while store.get_raw("warm-up").is_some() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    store.set_latency(Duration::from_millis(200));
    let before = store.calls();
    let attempt = tokio::time::timeout(Duration::from_millis(50), a.acquire("k")).await;
    assert!(attempt.is_err(), "the answer came before the timeout");
    // The memory store applies a call before its latency: the write landed although the
    // caller gave up. (The undo may already have removed it: the reporter takes commands
    // while a liveness write waits on the slow store.)
    assert_eq!(
        store.calls().acquire,
        before.acquire + 1,
        "the write was sent"
    );
    let start = Instant::now();
    while store.get_raw("k").is_some() || store.calls().release == before.release {
        assert!(start.elapsed() < Duration::from_secs(3), "never released");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    store.set_latency(Duration::ZERO);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_fires_by_the_lock_deadline_even_when_the_store_hangs() {
    let store = MemoryBackend::new();
    let a = fast(&store)
        .lock_ttl(Duration::from_millis(300))
        .extend_every(Duration::from_millis(100))
        .build()
        .expect("options");
    let guard = acquired(&a, "k").await;
    // Every answer now takes far longer than the lock lives.
    store.set_latency(Duration::from_secs(10));
    let started = Instant::now();
    let e = tokio::time::timeout(Duration::from_secs(5), guard.heartbeat().lost())
        .await
        .expect("lost() waited on the hung store instead of the lock's deadline");
    assert_eq!(e.kind(), ErrorKind::LockLost, "{e}");
    assert!(started.elapsed() < Duration::from_secs(5));
    store.set_latency(Duration::ZERO);
    a.abandon().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_shutdowns_all_wait_for_the_end() {
    let store = MemoryBackend::new();
    let a = locker(&store);
    let _guard = acquired(&a, "k").await;
    let (x, y) = (a.clone(), a.clone());
    tokio::join!(x.shutdown(), y.shutdown());
    // Whichever returned first, both saw the whole shutdown.
    assert_eq!(
        store.read_process(a.process_hash()).await.expect("read"),
        None
    );
    assert_eq!(store.read("k").await.expect("read"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_gives_running_jobs_a_grace_to_end() {
    let store = MemoryBackend::new();
    let a = locker(&store);
    let job = tokio::spawn({
        let a = a.clone();
        async move {
            a.acquire_and_run("k", |hb| async move {
                loop {
                    if let Err(e) = hb.beat().await {
                        // Still ours while the job winds down: the drain came first.
                        assert_eq!(e.kind(), ErrorKind::Draining);
                        return "stopped cleanly";
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    a.shutdown().await;
    assert_eq!(
        job.await.expect("job").expect("ran"),
        RunOutcome::Ran("stopped cleanly")
    );
    assert_eq!(store.read("k").await.expect("read"), None);
}

/// A store connection whose acquires misbehave, as `OddAcquire`'s `replay` and `delay` say.
#[derive(Debug, Clone)]
struct OddAcquire {
    store: MemoryBackend,
    /// Each acquire is sent twice, as by a client library that replays a call after a
    /// reconnect that lost the first answer: the second attempt finds the first one's lock.
    replay: bool,
    /// Each acquire's answer comes this much later.
    delay: Duration,
    /// Acquires of keys that end so fail with a retryable error (none when empty).
    refuse_suffix: &'static str,
}

#[async_trait::async_trait]
impl LockBackend for OddAcquire {
    fn capabilities(&self) -> locker_core::Capabilities {
        self.store.capabilities()
    }
    async fn acquire(
        &self,
        key: &str,
        data: &LockData,
        ttl: Duration,
    ) -> locker_core::Result<AcquireOutcome> {
        if !self.refuse_suffix.is_empty() && key.ends_with(self.refuse_suffix) {
            return Err(locker_core::Error::unavailable(format!(
                "the row of {key} is busy"
            )));
        }
        if self.replay {
            let _lost_answer = self.store.acquire(key, data, ttl).await?;
        }
        tokio::time::sleep(self.delay).await;
        self.store.acquire(key, data, ttl).await
    }
    async fn extend(
        &self,
        key: &str,
        data: &LockData,
        ttl: Duration,
        owner_hash: &str,
    ) -> locker_core::Result<locker_core::ExtendOutcome> {
        self.store.extend(key, data, ttl, owner_hash).await
    }
    async fn release(&self, key: &str, owner_hash: &str) -> locker_core::Result<ReleaseOutcome> {
        self.store.release(key, owner_hash).await
    }
    async fn ping(
        &self,
        process_hash: &str,
        data: &locker_core::ProcessData,
        ttl: Duration,
    ) -> locker_core::Result<()> {
        self.store.ping(process_hash, data, ttl).await
    }
    async fn read(&self, key: &str) -> locker_core::Result<Option<LockData>> {
        self.store.read(key).await
    }
    async fn read_process(
        &self,
        process_hash: &str,
    ) -> locker_core::Result<Option<locker_core::ProcessData>> {
        self.store.read_process(process_hash).await
    }
    async fn forget_process(&self, process_hash: &str) -> locker_core::Result<()> {
        self.store.forget_process(process_hash).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_acquire_that_finds_its_own_lock_owns_it() {
    let store = MemoryBackend::new();
    let factory_store = store.clone();
    let a = Locker::builder(locker_core::factory_fn(move || {
        let store = factory_store.clone();
        async move {
            Ok(Arc::new(OddAcquire {
                store,
                replay: true,
                delay: Duration::ZERO,
                refuse_suffix: "",
            }) as Arc<dyn LockBackend>)
        }
    }))
    .report_every(REPORT)
    .liveness_ttl(LIVENESS)
    .build()
    .expect("options");
    let guard = acquired(&a, "k").await;
    assert_eq!(
        guard.release().await.expect("release"),
        ReleaseOutcome::Released
    );
    assert_eq!(store.read("k").await.expect("read"), None);
    a.shutdown().await;
}

/// `lost()` and `sleep()` complete at once on a drain, and on a loss found by another clone
/// of the heartbeat, not at their next recheck (5 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_and_sleep_wake_at_once_on_drain_and_on_loss() {
    let store = MemoryBackend::new();
    let slow_rechecks = |store: &MemoryBackend| {
        // Nothing is due for seconds: neither a recheck, nor an extension, nor the end of the
        // liveness record's freshness, so only the wake-up itself can end the waits below.
        fast(store)
            .report_every(Duration::from_secs(1))
            .liveness_ttl(Duration::from_secs(10))
            .recheck_every(Duration::from_secs(5))
            .lock_ttl(Duration::from_secs(60))
            .extend_every(Duration::from_secs(20))
            .build()
            .expect("options")
    };
    let (a, b) = (slow_rechecks(&store), slow_rechecks(&store));
    const AT_ONCE: Duration = Duration::from_millis(500);

    // A loss found by another clone (an extension that finds someone else's record).
    let guard = acquired(&a, "lost").await;
    let waiting = tokio::spawn(guard.heartbeat().lost());
    let sleeping = {
        let hb = guard.heartbeat();
        tokio::spawn(async move { hb.sleep(Duration::from_secs(60)).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _ = store
        .release("lost", guard.owner_hash())
        .await
        .expect("release by hand");
    let new = acquired(&b, "lost").await;
    let e = guard.extend().await.expect_err("taken over");
    assert_eq!(e.kind(), ErrorKind::LockLost);
    let lost = tokio::time::timeout(AT_ONCE, waiting)
        .await
        .expect("lost() woke at once")
        .expect("task");
    assert_eq!(lost.kind(), ErrorKind::LockLost);
    let slept = tokio::time::timeout(AT_ONCE, sleeping)
        .await
        .expect("sleep() woke at once")
        .expect("task");
    assert_eq!(slept.expect_err("lost").kind(), ErrorKind::LockLost);
    drop(guard);

    // A drain.
    let guard = acquired(&a, "drain").await;
    let waiting = tokio::spawn(guard.heartbeat().lost());
    let sleeping = {
        let hb = guard.heartbeat();
        tokio::spawn(async move { hb.sleep(Duration::from_secs(60)).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    a.drain("deploy");
    let lost = tokio::time::timeout(AT_ONCE, waiting)
        .await
        .expect("lost() woke at once")
        .expect("task");
    assert_eq!(lost.kind(), ErrorKind::Draining);
    let slept = tokio::time::timeout(AT_ONCE, sleeping)
        .await
        .expect("sleep() woke at once")
        .expect("task");
    assert_eq!(slept.expect_err("drained").kind(), ErrorKind::Draining);
    drop(guard);
    drop(new);
    a.shutdown().await;
    b.shutdown().await;
}

/// Two lockers built back to back in one process never share a process hash, so one's
/// shutdown never deletes the other's liveness record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockers_built_back_to_back_keep_their_own_liveness() {
    let store = MemoryBackend::new();
    let lockers: Vec<Locker> = (0..50).map(|_| locker(&store)).collect();
    let hashes: std::collections::HashSet<&str> =
        lockers.iter().map(|l| l.process_hash()).collect();
    assert_eq!(hashes.len(), lockers.len(), "a process hash repeated");
    let (a, b) = (&lockers[0], &lockers[1]);
    let guard = acquired(b, "k").await;
    let _ = acquired(a, "other").await.release().await;
    a.shutdown().await;
    assert!(
        store
            .read_process(b.process_hash())
            .await
            .expect("read")
            .is_some(),
        "a's shutdown deleted b's liveness record"
    );
    drop(guard);
    for l in &lockers {
        l.shutdown().await;
    }
}

/// `abandon` ends a shutdown that waits for a job, as a crash would: nothing is released,
/// the liveness record is left to expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandon_ends_a_shutdown_that_waits() {
    let store = MemoryBackend::new();
    let a = fast(&store)
        .lock_ttl(Duration::from_secs(30))
        .extend_every(Duration::from_secs(10))
        .build()
        .expect("options");
    let guard = acquired(&a, "k").await;
    let waiting = {
        let a = a.clone();
        tokio::spawn(async move { a.shutdown().await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "shutdown must wait for the guard");
    a.abandon().await;
    tokio::time::timeout(Duration::from_secs(1), waiting)
        .await
        .expect("shutdown returned after abandon")
        .expect("task");
    drop(guard); // sends nothing after abandon
    tokio::time::sleep(LIVENESS + Duration::from_millis(100)).await;
    assert_eq!(
        store.read_process(a.process_hash()).await.expect("read"),
        None
    );
    assert!(
        store.read("k").await.expect("read").is_some(),
        "abandon released nothing"
    );
}

/// One process holding many locks rechecks them together: one `read_many` per recheck
/// interval (after the first, which aligns them), not one read per lock; and a lock found
/// taken over by another lock's recheck still fails its own next beat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rechecks_of_many_locks_share_one_read_per_interval() {
    let store = MemoryBackend::new();
    let locker = fast(&store)
        .recheck_every(Duration::from_millis(100))
        .extend_every(Duration::from_secs(60))
        .lock_ttl(Duration::from_secs(120))
        .build()
        .expect("options");
    let n = 40;
    let mut guards = Vec::new();
    let mut jobs = Vec::new();
    for i in 0..n {
        let guard = acquired(&locker, &format!("many-{i}")).await;
        let hb = guard.heartbeat();
        // Each job beats every 7 ms: its recheck is due at its own time.
        jobs.push(tokio::spawn(async move {
            loop {
                if let Err(e) = hb.beat().await {
                    return e;
                }
                tokio::time::sleep(Duration::from_millis(7)).await;
            }
        }));
        guards.push(guard);
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    // Aligned after the first interval.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let before = store.calls();
    let window = Duration::from_millis(1000);
    tokio::time::sleep(window).await;
    let after = store.calls();
    let (reads, batches) = (after.read - before.read, after.read_many - before.read_many);
    // 10 intervals: about 10 calls (a few more when a beat comes late); one per lock would be
    // 400.
    assert!(
        reads + batches <= 25,
        "{n} locks rechecked every 100 ms for 1 s took {reads} reads and {batches} read_many calls"
    );
    assert!(batches >= 5, "rechecks stopped: {batches} read_many calls");

    // Another process takes one lock over; the job of that lock stops at its next beat.
    let victim = guards[17].owner_hash().to_owned();
    let thief = LockData::new("many-17@thief/1.1.1".into(), "thief/1.1".into(), None);
    store.put_raw("many-17", &thief.to_json(), Duration::from_secs(60));
    let e = tokio::time::timeout(Duration::from_secs(2), jobs.remove(17))
        .await
        .expect("the job stopped")
        .expect("task");
    assert_eq!(e.kind(), ErrorKind::LockLost, "{victim}: {e}");
    assert_eq!(
        e.holder().map(|h| h.owner_hash.as_str()),
        Some("many-17@thief/1.1.1")
    );
    for j in jobs {
        assert!(!j.is_finished(), "another job stopped");
        j.abort();
    }
    drop(guards);
    locker.shutdown().await;
}

/// An acquire whose reply came after the lock TTL is refused (a timeout), and it is not a lost
/// lock for the application, which never had it: no `LockLost` event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_acquire_reply_is_no_lost_lock_event() {
    let slow = OddAcquire {
        store: MemoryBackend::new(),
        replay: false,
        delay: Duration::from_millis(700),
        refuse_suffix: "",
    };
    let factory = locker_core::factory_fn(move || {
        let slow = slow.clone();
        async move { Ok(Arc::new(slow) as Arc<dyn LockBackend>) }
    });
    let locker = Locker::builder(factory)
        .report_every(REPORT)
        .liveness_ttl(LIVENESS)
        .recheck_every(Duration::from_millis(50))
        .extend_every(Duration::from_millis(100))
        .lock_ttl(Duration::from_millis(500))
        .build()
        .expect("options");
    let mut errors = locker.subscribe_errors();
    let e = locker.acquire("late").await.expect_err("too late to trust");
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    while let Ok(event) = errors.try_recv() {
        assert_ne!(event.source, BackgroundSource::LockLost, "{event}");
    }
    locker.shutdown().await;
}

/// A semaphore's scan goes past a slot whose acquire fails with a retryable error: another
/// slot may be free. When none is, the error comes back, not `Full`: not every slot answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_semaphore_scan_goes_past_a_slot_that_fails() {
    let busy = OddAcquire {
        store: MemoryBackend::new(),
        replay: false,
        delay: Duration::ZERO,
        refuse_suffix: "#permit0",
    };
    let factory = locker_core::factory_fn(move || {
        let busy = busy.clone();
        async move { Ok(Arc::new(busy) as Arc<dyn LockBackend>) }
    });
    let locker = Locker::builder(factory)
        .report_every(REPORT)
        .liveness_ttl(LIVENESS)
        .build()
        .expect("options");
    let semaphore = locker.semaphore("s", 2).expect("semaphore");
    // The first slot tried changes from call to call: slot 0 comes first in some of them.
    for _ in 0..8 {
        match semaphore.try_acquire().await.expect("slot 1 is free") {
            locker_core::PermitAttempt::Acquired(guard) => {
                assert_eq!(guard.key(), "s#permit1");
                let _ = guard.release().await.expect("release");
            }
            locker_core::PermitAttempt::Full(holders) => panic!("full: {holders:?}"),
        }
    }
    let held = match semaphore.try_acquire().await.expect("slot 1 is free") {
        locker_core::PermitAttempt::Acquired(guard) => guard,
        locker_core::PermitAttempt::Full(holders) => panic!("full: {holders:?}"),
    };
    let e = semaphore
        .try_acquire()
        .await
        .expect_err("slot 0 did not answer");
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable());
    let _ = held.release().await.expect("release");
    locker.shutdown().await;
}

/// A semaphore's waiters and a lock's waiters of the same key are in different lines: a
/// permit free on `k` is not kept waiting behind a waiter for the lock `k`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_semaphore_waiter_is_not_in_line_behind_a_lock_waiter_of_the_same_key() {
    let store = MemoryBackend::new();
    // A lock that outlives the case without beats: only the line can let the permit wait.
    let a = fast(&store)
        .lock_ttl(Duration::from_secs(60))
        .extend_every(Duration::from_secs(20))
        .build()
        .expect("options");
    let b = locker(&store);
    let held = acquired(&a, "k").await;
    let lock_waiter = tokio::spawn({
        let b = b.clone();
        async move { b.acquire_wait("k", Wait::forever()).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!lock_waiter.is_finished(), "acquired a held lock");
    let permit = tokio::time::timeout(
        Duration::from_secs(5),
        b.semaphore("k", 1)
            .expect("semaphore")
            .acquire_wait(Wait::forever()),
    )
    .await
    .expect("the permit waited behind the lock's waiter")
    .expect("a permit");
    assert_eq!(permit.key(), "k#permit0");
    let _ = permit.release().await.expect("release");
    let _ = held.release().await.expect("release");
    let got = lock_waiter
        .await
        .expect("task")
        .expect("the lock, once released");
    let _ = got.release().await.expect("release");
    a.shutdown().await;
    b.shutdown().await;
}
