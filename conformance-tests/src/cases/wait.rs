//! Waiting cases: [`Locker::acquire_wait`](locker_core::Locker::acquire_wait) on the backend
//! under test.

use std::time::{Duration, Instant};

use locker_core::{ErrorKind, LockAttempt, Wait};

use crate::cases::{acquired, held};
use crate::{Fixture, Verdict};

/// How long a case waits for a waiter that should get the lock soon, before failing: far
/// longer than any hand-off, far shorter than the pauses the cases set to prove a wake-up.
const PATIENCE: Duration = Duration::from_secs(15);

/// A wait with a limit ends with `MutexTimeout` naming the holder, no sooner than the limit
/// and not a whole poll interval later; a zero limit makes one try.
pub async fn wait_limit_is_respected(fx: &Fixture) -> Verdict {
    let (a, b) = (fx.locker(), fx.locker());
    let key = fx.key("k");
    let guard = acquired(&a, &key).await;
    // The first try also waits for the reporter's first write: settle it first.
    b.ready().await.expect("ready");
    let limit = Duration::from_millis(300);
    let started = Instant::now();
    let e = b
        .acquire_wait(key.as_str(), Wait::up_to(limit))
        .await
        .expect_err("held");
    let waited = started.elapsed();
    assert_eq!(e.kind(), ErrorKind::MutexTimeout, "{e}");
    assert_eq!(e.key(), Some(key.as_str()));
    assert_eq!(
        e.holder().map(|h| h.owner_hash.as_str()),
        Some(guard.owner_hash())
    );
    assert!(
        waited >= limit,
        "gave up after {waited:?}, before {limit:?}"
    );
    assert!(waited < limit + PATIENCE, "overran the limit: {waited:?}");

    let e = b
        .acquire_wait(key.as_str(), Wait::up_to(Duration::ZERO))
        .await
        .expect_err("held");
    assert_eq!(e.kind(), ErrorKind::MutexTimeout, "{e}");
    let _ = guard.release().await.expect("release");
    let zero = b
        .acquire_wait(key.as_str(), Wait::up_to(Duration::ZERO))
        .await
        .expect("a free key is acquired with a zero limit");
    let _ = zero.release().await.expect("release");
    a.shutdown().await;
    b.shutdown().await;
    Verdict::Passed
}

/// Dropping a waiting `acquire_wait` leaves nothing behind: the key stays the holder's, and
/// once released anyone (the same locker included) acquires it.
pub async fn wait_is_cancel_safe(fx: &Fixture) -> Verdict {
    let (a, b) = (fx.locker(), fx.locker());
    let key = fx.key("k");
    let guard = acquired(&a, &key).await;
    for _ in 0..3 {
        let waiting = tokio::time::timeout(
            Duration::from_millis(150),
            b.acquire_wait(key.as_str(), Wait::forever()),
        )
        .await;
        assert!(waiting.is_err(), "acquired a held lock: {waiting:?}");
    }
    assert_eq!(held(&b, &key).await.owner_hash, guard.owner_hash());
    let _ = guard.release().await.expect("release");
    assert_eq!(b.inspect(&key).await.expect("inspect"), None);
    let again = tokio::time::timeout(PATIENCE, b.acquire_wait(key.as_str(), Wait::forever()))
        .await
        .expect("the cancelled waits left the key's line stuck")
        .expect("acquire");
    let _ = again.release().await.expect("release");
    a.shutdown().await;
    b.shutdown().await;
    Verdict::Passed
}

/// A waiter gets the lock after the holder releases it: woken by the store on backends with
/// release events (the case then sets a one-hour poll, so only a wake-up can end the wait in
/// time), by its poll on the others.
pub async fn wait_acquires_after_release(fx: &Fixture) -> Verdict {
    let (a, b) = (fx.locker(), fx.locker());
    let key = fx.key("k");
    let guard = acquired(&a, &key).await;
    let events = fx.capabilities.release_events;
    let wait = if events {
        Wait::forever().backoff(|_| Duration::from_secs(3600))
    } else {
        Wait::forever()
    };
    let waiter = tokio::spawn({
        let (b, key) = (b.clone(), key.clone());
        async move { b.acquire_wait(key.as_str(), wait).await }
    });
    // Let the waiter try, find the lock held and subscribe.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "acquired a held lock");
    let _ = guard.release().await.expect("release");
    let got = tokio::time::timeout(PATIENCE, waiter)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the waiter was not woken by the release within {PATIENCE:?} (release events: \
                 {events})"
            )
        })
        .expect("waiter task")
        .expect("acquire_wait");
    let _ = got.release().await.expect("release");
    a.shutdown().await;
    b.shutdown().await;
    if events {
        Verdict::Passed
    } else {
        Verdict::skip(
            "acquired after the release by polling: the backend has no release events \
             (Capabilities::release_events)",
        )
    }
}

/// A waiter takes over the lock of a holder whose process died, soon after the holder's
/// liveness record expires, although its poll interval is long: it tries again when the
/// record would expire (`LockBackend::liveness_left`).
pub async fn wait_takes_over_from_a_dead_holder(fx: &Fixture) -> Verdict {
    if fx
        .backend()
        .await
        .liveness_left("conformance-no-such-process")
        .await
        .expect("liveness_left")
        .is_none()
    {
        return Verdict::skip(
            "the backend cannot tell how long a liveness record has left \
             (LockBackend::liveness_left): waiters find a dead holder at their next poll",
        );
    }
    let t = fx.timing;
    let dying = fx.locker();
    // A poll interval far longer than the case may last.
    let b = fx
        .locker_builder()
        .recheck_every(Duration::from_secs(600))
        .build()
        .expect("timings");
    let key = fx.key("k");
    let guard = acquired(&dying, &key).await;
    std::mem::forget(guard); // a crash releases nothing
    let waiter = tokio::spawn({
        let (b, key) = (b.clone(), key.clone());
        async move { b.acquire_wait(key.as_str(), Wait::forever()).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished(), "acquired a held lock");
    dying.abandon().await;
    let limit = t.expiry_of(t.liveness_ttl) + PATIENCE;
    let got = tokio::time::timeout(limit, waiter)
        .await
        .unwrap_or_else(|_| panic!("no takeover within {limit:?} of the holder's death"))
        .expect("waiter task")
        .expect("acquire_wait");
    let _ = got.release().await.expect("release");
    b.shutdown().await;
    Verdict::Passed
}

/// A lock that goes away without any notification (it expired: its holder stopped extending
/// it) is still found free by a waiter, through its fallback poll.
pub async fn wait_finds_a_silently_expired_lock(fx: &Fixture) -> Verdict {
    let t = fx.timing;
    let a = fx.short_ttl_locker();
    let b = fx.locker();
    let key = fx.key("k");
    let guard = acquired(&a, &key).await; // never beats: the lock expires
    let got = tokio::time::timeout(
        t.expiry_of(t.short_lock_ttl) + PATIENCE,
        b.acquire_wait(key.as_str(), Wait::forever()),
    )
    .await
    .expect("the expired lock was not found by the fallback poll")
    .expect("acquire_wait");
    let e = guard.heartbeat().beat().await.expect_err("expired");
    assert_eq!(e.kind(), ErrorKind::LockLost);
    assert!(matches!(
        a.acquire(key.as_str()).await.expect("acquire"),
        LockAttempt::Held(_)
    ));
    let _ = got.release().await.expect("release");
    a.shutdown().await;
    b.shutdown().await;
    Verdict::Passed
}
