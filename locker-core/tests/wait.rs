//! Waiting for a lock over `MemoryBackend`: what the store pays for many waiters, the order in
//! which one locker's waiters get the lock, and what ends a wait. The cases every backend must
//! pass are in the conformance suite (`wait_*`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use locker_core::{ErrorKind, LockAttempt, LockGuard, Locker, MemoryBackend, Wait};

/// Far longer than any hand-off here; a test that waits this long has failed.
const PATIENCE: Duration = Duration::from_secs(15);

fn locker(store: &MemoryBackend) -> Locker {
    Locker::builder(store.clone())
        .report_every(Duration::from_millis(40))
        .liveness_ttl(Duration::from_millis(300))
        .reporter_start_timeout(Duration::from_secs(5))
        .recheck_every(Duration::from_secs(2))
        .extend_every(Duration::from_millis(200))
        .lock_ttl(Duration::from_secs(2))
        .build()
        .expect("valid options")
}

async fn acquired(locker: &Locker, key: &str) -> LockGuard {
    match locker.acquire(key).await.expect("acquire") {
        LockAttempt::Acquired(guard) => guard,
        LockAttempt::Held(holder) => panic!("{key} is held by {}", holder.owner_hash),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_waiters_in_one_locker_cost_the_store_what_one_does_and_get_the_lock_in_order() {
    const WAITERS: usize = 32;
    let store = MemoryBackend::new();
    let (a, b) = (locker(&store), locker(&store));
    b.ready().await.expect("ready");
    let guard = acquired(&a, "k").await;
    let order = Arc::new(Mutex::new(Vec::new()));
    let before = store.calls();
    let mut waiters = Vec::new();
    for i in 0..WAITERS {
        let (b, order) = (b.clone(), order.clone());
        waiters.push(tokio::spawn(async move {
            let guard = b
                .acquire_wait("k", Wait::forever())
                .await
                .expect("acquire_wait");
            order.lock().expect("order").push(i);
            let _ = guard.release().await.expect("release");
        }));
        // Each in line before the next comes.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let waiting = store.calls();
    let tries = waiting.acquire - before.acquire;
    // The first in line: a try, a subscription, a try again, maybe one fallback poll. The
    // other 31 wait for their turn without calling the store (one try each would be 32).
    assert!(
        tries <= 4,
        "{tries} acquire calls while {WAITERS} waiters waited"
    );
    assert!(waiting.watch_release - before.watch_release <= 1);

    let _ = guard.release().await.expect("release");
    for w in waiters {
        tokio::time::timeout(PATIENCE, w)
            .await
            .expect("every waiter gets the lock in turn")
            .expect("waiter");
    }
    let after = store.calls();
    let per_hand_off = (after.acquire - waiting.acquire) as f64 / WAITERS as f64;
    // Each waiter: the try that got the lock, and at most the first try of its turn (which
    // may find its predecessor still holding it) and one after a wake-up.
    assert!(
        per_hand_off <= 3.0,
        "{per_hand_off} acquire calls per hand-off"
    );
    assert_eq!(
        *order.lock().expect("order"),
        (0..WAITERS).collect::<Vec<_>>()
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_in_the_same_locker_wakes_its_waiter_without_the_store() {
    let store = MemoryBackend::new();
    store.set_notifications_lost(true);
    let a = locker(&store);
    let guard = acquired(&a, "k").await;
    let waiter = tokio::spawn({
        let a = a.clone();
        async move {
            a.acquire_wait("k", Wait::forever().backoff(|_| Duration::from_secs(3600)))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished());
    let _ = guard.release().await.expect("release");
    let got = tokio::time::timeout(PATIENCE, waiter)
        .await
        .expect("woken by the locker's own release")
        .expect("task")
        .expect("acquire_wait");
    let _ = got.release().await.expect("release");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_notification_is_made_up_by_the_poll() {
    let store = MemoryBackend::new();
    store.set_notifications_lost(true);
    let (a, b) = (locker(&store), locker(&store));
    let guard = acquired(&a, "k").await;
    let waiter = tokio::spawn({
        let b = b.clone();
        async move { b.acquire_wait("k", Wait::forever()).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = guard.release().await.expect("release");
    // The fallback poll comes within `recheck_every` (2 s).
    let got = tokio::time::timeout(PATIENCE, waiter)
        .await
        .expect("found by the fallback poll")
        .expect("task")
        .expect("acquire_wait");
    let _ = got.release().await.expect("release");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_and_shutdown_end_a_wait() {
    let store = MemoryBackend::new();
    let (a, b) = (locker(&store), locker(&store));
    let guard = acquired(&a, "k").await;
    let slow = || Wait::forever().backoff(|_| Duration::from_secs(3600));
    let waiter = tokio::spawn({
        let b = b.clone();
        async move { b.acquire_wait("k", slow()).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    b.drain("deploy");
    let e = tokio::time::timeout(PATIENCE, waiter)
        .await
        .expect("the drain ended the wait")
        .expect("task")
        .expect_err("draining");
    assert_eq!(e.kind(), ErrorKind::Draining);

    let c = locker(&store);
    let waiter = tokio::spawn({
        let c = c.clone();
        async move { c.acquire_wait("k", slow()).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.shutdown().await;
    let e = tokio::time::timeout(PATIENCE, waiter)
        .await
        .expect("the shutdown ended the wait")
        .expect("task")
        .expect_err("shut down");
    assert_eq!(e.kind(), ErrorKind::Shutdown);
    let _ = guard.release().await.expect("release");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_backoff_paces_the_tries() {
    let store = MemoryBackend::new();
    store.set_notifications_lost(true);
    let (a, b) = (locker(&store), locker(&store));
    b.ready().await.expect("ready");
    let guard = acquired(&a, "k").await;
    let before = store.calls().acquire;
    let asked = Arc::new(Mutex::new(Vec::new()));
    let e = b
        .acquire_wait(
            "k",
            Wait::up_to(Duration::from_millis(300)).backoff({
                let asked = asked.clone();
                move |attempt| {
                    asked.lock().expect("asked").push(attempt);
                    Duration::from_millis(40)
                }
            }),
        )
        .await
        .expect_err("held");
    assert_eq!(e.kind(), ErrorKind::MutexTimeout);
    let tries = store.calls().acquire - before;
    let asked = asked.lock().expect("asked").clone();
    // A pause after every try but two: the one right after subscribing to release events,
    // and the last, which the limit ended.
    assert!(asked.len() >= 2, "{asked:?}");
    assert_eq!(asked, (0..asked.len() as u32).collect::<Vec<_>>());
    assert_eq!(tries, asked.len() as u64 + 2, "{tries} tries for {asked:?}");
    let _ = guard.release().await.expect("release");
    a.shutdown().await;
    b.shutdown().await;
}
