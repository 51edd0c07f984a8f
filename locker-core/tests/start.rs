//! The start of a locker: `ready()`, and how acquire and mutex end their wait for the first
//! liveness write when the backend cannot be used.
//!
//! The start timeout is a long 60 s in the cases that must not wait for it; a bound of a few
//! seconds on such a call checks that it did not (the reporter runs on its own thread and
//! runtime, so a paused clock cannot stand in for the real one here).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use locker_core::{
    factory_fn, Error, ErrorKind, LockAttempt, LockBackend, Locker, LockerBuilder, MemoryBackend,
    Wait,
};

/// Far longer than any case may take: a call that returns within [`NOT_WAITED`] did not wait
/// for it.
const LONG_START: Duration = Duration::from_secs(60);
const NOT_WAITED: Duration = Duration::from_secs(5);

fn timings(builder: LockerBuilder, start_timeout: Duration) -> Locker {
    builder
        .report_every(Duration::from_millis(40))
        .liveness_ttl(Duration::from_millis(300))
        .reporter_start_timeout(start_timeout)
        .recheck_every(Duration::from_millis(50))
        .extend_every(Duration::from_millis(200))
        .lock_ttl(Duration::from_secs(2))
        .build()
        .expect("valid options")
}

/// A locker whose every connect fails at once with `error`.
fn failing(error: Error, start_timeout: Duration) -> Locker {
    let factory = factory_fn(move || {
        let error = error.clone();
        async move { Err::<Arc<dyn LockBackend>, _>(error) }
    });
    timings(Locker::builder(factory), start_timeout)
}

fn refused() -> Error {
    Error::unavailable("connection refused by 127.0.0.1:1")
        .with_source(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
        .set_definite(true)
}

async fn quickly<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(NOT_WAITED, f)
        .await
        .unwrap_or_else(|_| panic!("{what} waited for the start timeout"))
}

#[tokio::test]
async fn a_refused_connection_ends_the_start_at_once_and_stays_retryable() {
    let locker = failing(refused(), LONG_START);

    let e = quickly("ready", locker.ready())
        .await
        .expect_err("nothing to connect to");
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert!(e.is_retryable(), "a server may be restarting");
    assert!(e.is_definite());
    assert!(
        e.to_string().contains("connection refused by 127.0.0.1:1"),
        "{e}"
    );

    let e = quickly("acquire", locker.acquire("job"))
        .await
        .expect_err("nothing to connect to");
    assert_eq!(e.kind(), ErrorKind::Unavailable);

    let ran = quickly(
        "mutex",
        locker.mutex("job", Wait::up_to(Duration::ZERO), |_| async {}),
    )
    .await;
    assert_eq!(ran.expect_err("never ran").kind(), ErrorKind::Unavailable);
    locker.shutdown().await;
}

#[tokio::test]
async fn permanent_mistakes_keep_their_kind_and_are_not_retryable() {
    let cases = [
        Error::invalid_input("cannot open /nonexistent-dir/locks.db: No such file or directory"),
        Error::new(
            ErrorKind::Auth,
            "password authentication failed for user \"u\"",
        ),
    ];
    for error in cases {
        let locker = failing(error.clone(), LONG_START);
        let e = quickly("ready", locker.ready())
            .await
            .expect_err("cannot connect");
        assert_eq!(e.kind(), error.kind());
        assert!(!e.is_retryable());
        assert_eq!(e.message(), error.message());
        let e = quickly("acquire", locker.acquire("job"))
            .await
            .expect_err("cannot connect");
        assert_eq!(e.kind(), error.kind());
    }
}

#[tokio::test]
async fn a_store_that_does_not_answer_is_waited_for_and_named_in_the_timeout() {
    // Connects, but every liveness write fails with an error that is not an answer.
    let store = MemoryBackend::new();
    store.set_unavailable(true);
    let locker = timings(Locker::builder(store.clone()), Duration::from_millis(300));
    let e = locker.ready().await.expect_err("no write can succeed");
    assert_eq!(e.kind(), ErrorKind::Timeout);
    assert!(
        e.message()
            .contains("last reporter error: backend unavailable"),
        "the timeout names the reporter's last error: {e}"
    );

    // A connect that never returns: nothing to name, and the message says so.
    let hung = factory_fn(std::future::pending::<locker_core::Result<Arc<dyn LockBackend>>>);
    let locker = timings(Locker::builder(hung), Duration::from_millis(300));
    let e = locker.ready().await.expect_err("never connects");
    assert_eq!(e.kind(), ErrorKind::Timeout);
    // The reporter's own connect timeout (the same 300 ms) may fire first, then it is named.
    assert!(
        e.message().contains("has not answered yet")
            || e.message()
                .contains("last reporter error: timed out: reporter connect took longer"),
        "{e}"
    );
}

#[tokio::test]
async fn ready_succeeds_once_the_store_is_back() {
    let store = MemoryBackend::new();
    let attempts = Arc::new(AtomicUsize::new(0));
    let factory = {
        let attempts = attempts.clone();
        let store = store.clone();
        factory_fn(move || {
            let store = store.clone();
            let n = attempts.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 2 {
                    Err(refused())
                } else {
                    Ok(Arc::new(store) as Arc<dyn LockBackend>)
                }
            }
        })
    };
    let locker = timings(Locker::builder(factory), LONG_START);
    let e = quickly("ready", locker.ready()).await.expect_err("refused");
    assert!(e.is_retryable());
    // The reporter tries again every `report_every`; a caller that retries gets in.
    let mut tries = 0;
    loop {
        tries += 1;
        match quickly("ready", locker.ready()).await {
            Ok(()) => break,
            Err(e) if e.is_retryable() && tries < 200 => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("still failing after {tries} tries: {e}"),
        }
    }
    let LockAttempt::Acquired(guard) = locker.acquire("job").await.expect("acquire") else {
        panic!("the key is free");
    };
    let _ = guard.release().await.expect("release");
    locker.shutdown().await;
}

#[tokio::test]
async fn ready_is_immediate_on_a_working_store_and_fails_after_shutdown() {
    let locker = timings(Locker::builder(MemoryBackend::new()), LONG_START);
    quickly("ready", locker.ready())
        .await
        .expect("memory works");
    quickly("ready again", locker.ready())
        .await
        .expect("still fresh");
    locker.shutdown().await;
    let e = locker.ready().await.expect_err("shut down");
    assert_eq!(e.kind(), ErrorKind::Shutdown);
}
