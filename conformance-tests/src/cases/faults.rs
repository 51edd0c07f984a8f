//! Fault cases: a private server paused, restarted, or not there at all.

use std::time::{Duration, Instant};

use locker_core::{ErrorKind, LockAttempt};

use super::locker::{acquired, held};
use crate::{builder_with, Fixture, Verdict};

/// Paused for less than the liveness TTL: locks survive, a call made meanwhile either completes
/// after the pause or fails with a retryable error, and heartbeats go on afterwards.
pub async fn fault_server_paused_shorter_than_the_liveness_ttl(fx: &Fixture) -> Verdict {
    let Some(server) = fx.private_server().await else {
        return Verdict::skip("the setup cannot start a private server");
    };
    let t = fx.timing;
    let a = builder_with(server.factory.clone(), &t)
        .build()
        .expect("timings");
    let b = builder_with(server.factory.clone(), &t)
        .build()
        .expect("timings");
    let key = fx.key("k");
    let guard = acquired(&a, &key).await;
    let hb = guard.heartbeat();
    held(&b, &key).await; // b's reporter runs too

    let pause = t.liveness_ttl / 3;
    server.control.pause().expect("pause");
    let factory = server.factory.clone();
    let during = tokio::spawn(async move {
        let backend = factory.connect().await?;
        backend.read("conformance/probe").await.map(drop)
    });
    tokio::time::sleep(pause).await;
    server.control.resume().expect("resume");
    match tokio::time::timeout(Duration::from_secs(30), during)
        .await
        .expect("a call made during the pause ended within 30 s after it")
        .expect("task")
    {
        Ok(()) => {}
        Err(e) => assert!(e.is_retryable(), "non-retryable error during a pause: {e}"),
    }
    // Let both reporters write again, then the lock is still a's.
    tokio::time::sleep(t.report_every * 2).await;
    hb.beat().await.expect("the lock survived the pause");
    assert_eq!(held(&b, &key).await.owner_hash, guard.owner_hash());
    tokio::time::sleep(t.recheck_every + Duration::from_millis(10)).await;
    hb.beat()
        .await
        .expect("the recheck after the pause sees our lock");
    drop(guard);
    a.shutdown().await;
    b.shutdown().await;
    drop(server);
    Verdict::Passed
}

/// Restarted: the same locker goes on (its reporter writes again, new locks are taken) without
/// being rebuilt; a lock held across the restart is either still held or reported lost, never
/// silently doubled.
pub async fn fault_server_restarted_locker_recovers(fx: &Fixture) -> Verdict {
    let Some(server) = fx.private_server().await else {
        return Verdict::skip("the setup cannot start a private server");
    };
    let t = fx.timing;
    let a = builder_with(server.factory.clone(), &t)
        .build()
        .expect("timings");
    let key = fx.key("before");
    let guard = acquired(&a, &key).await;
    let hb = guard.heartbeat();

    let control = server.control.clone();
    tokio::task::spawn_blocking(move || control.restart())
        .await
        .expect("task")
        .expect("restart");

    // The same locker acquires a new key within a bounded time.
    let after = fx.key("after");
    let deadline = Instant::now() + Duration::from_secs(30);
    let new = loop {
        match a.acquire(after.as_str()).await {
            Ok(LockAttempt::Acquired(g)) => break g,
            Ok(LockAttempt::Held(h)) => panic!("fresh key held by {}", h.owner_hash),
            Err(e) => {
                assert!(e.is_retryable(), "non-retryable error after a restart: {e}");
                assert!(Instant::now() < deadline, "no recovery within 30 s: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    // The reporter writes again.
    let backend = server.factory.connect().await.expect("connect");
    let deadline = Instant::now() + Duration::from_secs(30);
    while backend
        .read_process(a.process_hash())
        .await
        .ok()
        .flatten()
        .is_none()
    {
        assert!(
            Instant::now() < deadline,
            "the reporter did not write again"
        );
        tokio::time::sleep(t.report_every).await;
    }
    // The old lock: kept (a store that persists) or lost (one that does not), but a beat says
    // which, and another locker agrees.
    tokio::time::sleep(t.recheck_every + Duration::from_millis(10)).await;
    let c = builder_with(server.factory.clone(), &t)
        .build()
        .expect("timings");
    let (owner, token) = (guard.owner_hash().to_owned(), guard.fencing_token());
    match hb.beat().await {
        Ok(()) => {
            assert_eq!(held(&c, &key).await.owner_hash, owner);
            drop(guard);
        }
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::LockLost, "{e}");
            // Either the store forgot the lock, or it kept it and the loss is this process's
            // liveness lapsing during a long restart: the job stops, and its guard releases
            // the lock (still ours, and our process is alive again, so nobody else may take
            // it before that).
            let kept = backend
                .read(&key)
                .await
                .expect("read")
                .is_some_and(|lock| lock.owner_hash == owner);
            if kept {
                let _ = guard.release().await.expect("release");
            } else {
                drop(guard);
            }
            let other = acquired(&c, &key).await;
            // The store may forget a lock, but not the order of its tokens.
            assert!(
                other.fencing_token() > token,
                "token {:?} after {token:?} across a restart",
                other.fencing_token()
            );
        }
    }
    drop(new);
    a.shutdown().await;
    c.shutdown().await;
    drop(server);
    Verdict::Passed
}

/// Unreachable at start: connecting or the first acquire fails with a clear, retryable error
/// within the timeouts, and no lock is reported held.
pub async fn fault_server_unreachable_at_start(fx: &Fixture) -> Verdict {
    let Some(unreachable) = fx.unreachable.clone() else {
        return Verdict::skip("the setup gives no unreachable server");
    };
    let started = Instant::now();
    match tokio::time::timeout(Duration::from_secs(30), unreachable.connect())
        .await
        .expect("connect returned within 30 s")
    {
        Err(e) => {
            assert!(e.is_retryable(), "{e}");
            assert!(!e.to_string().is_empty());
        }
        Ok(backend) => {
            // Lazily connecting clients fail on the first call instead.
            let e = tokio::time::timeout(Duration::from_secs(30), backend.read("probe"))
                .await
                .expect("the first call returned within 30 s")
                .expect_err("a call to an unreachable server succeeded");
            assert!(e.is_retryable(), "{e}");
        }
    }
    assert!(started.elapsed() < Duration::from_secs(30));
    let a = builder_with(unreachable, &fx.timing)
        .reporter_start_timeout(Duration::from_secs(2))
        .build()
        .expect("timings");
    let e = a
        .acquire(fx.key("k").as_str())
        .await
        .expect_err("acquired on an unreachable server");
    assert!(e.is_retryable(), "{e}");
    a.abandon().await;
    Verdict::Passed
}
