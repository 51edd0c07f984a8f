//! The primitives built on locks: [`Semaphore`](locker_core::Semaphore) and
//! [`Election`](locker_core::Election), on the backend under test.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use locker_core::{ErrorKind, LockData, LockRequest, Locker, PermitAttempt, Wait};

use crate::{Fixture, Verdict};

/// How long a case waits for something that should happen soon, before failing.
const PATIENCE: Duration = Duration::from_secs(15);

/// `permits` holders at most, never more: a full semaphore names its holders, a released
/// permit goes to a waiter, and many tasks in several processes contending for 2 permits
/// never run more than 2 jobs at once.
pub async fn semaphore_never_more_than_permits(fx: &Fixture) -> Verdict {
    let (a, b, c) = (fx.locker(), fx.locker(), fx.locker());
    let key = fx.key("sem");
    let sem = |l: &Locker| l.semaphore(key.as_str(), 2).expect("semaphore");
    let first = permit(&sem(&a)).await;
    let second = permit(&sem(&b)).await;
    assert_ne!(first.key(), second.key(), "two holders of one permit slot");
    if fx.capabilities.fencing {
        assert!(first.fencing_token().is_some() && second.fencing_token().is_some());
    }
    let holders = match sem(&c).try_acquire().await.expect("try_acquire") {
        PermitAttempt::Full(holders) => holders,
        PermitAttempt::Acquired(g) => panic!("a third permit of 2: {}", g.key()),
    };
    let mut owners: Vec<&str> = holders.iter().map(|h| h.owner_hash.as_str()).collect();
    owners.sort_unstable();
    let mut expected = vec![first.owner_hash(), second.owner_hash()];
    expected.sort_unstable();
    assert_eq!(owners, expected);
    assert_eq!(sem(&c).holders().await.expect("holders").len(), 2);

    // A release wakes (or lets a poll find) a waiter.
    let waiter = tokio::spawn({
        let s = sem(&c);
        async move { s.acquire_wait(Wait::forever()).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished(), "a third permit of 2");
    let freed = first.key().to_owned();
    let _ = first.release().await.expect("release");
    let third = tokio::time::timeout(PATIENCE, waiter)
        .await
        .expect("the waiter did not get the released permit")
        .expect("waiter task")
        .expect("acquire_wait");
    assert_eq!(third.key(), freed);
    let _ = third.release().await.expect("release");
    let _ = second.release().await.expect("release");

    // Contention: 3 processes × 3 tasks, 4 jobs each, 2 permits.
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for locker in [&a, &b, &c] {
        for _ in 0..3 {
            let (s, running, most) = (sem(locker), running.clone(), most.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..4 {
                    s.run(Wait::up_to(PATIENCE * 2), |heartbeat| {
                        counted_job(&running, &most, heartbeat, Duration::from_millis(5))
                    })
                    .await
                    .expect("a permit")
                    .expect("beat");
                }
            }));
        }
    }
    for task in tasks {
        task.await.expect("contending task");
    }
    let most = most.load(Ordering::SeqCst);
    assert!(most <= 2, "{most} jobs ran at once under a semaphore of 2");
    assert!(most >= 1);
    for l in [a, b, c] {
        l.shutdown().await;
    }
    Verdict::Passed
}

/// Callers that use one key with different permit counts are told so (a typed
/// `InvalidInput` naming the holder), rather than handed a permit; zero permits is refused.
pub async fn semaphore_callers_that_disagree_on_permits_are_refused(fx: &Fixture) -> Verdict {
    let (a, b) = (fx.locker(), fx.locker());
    let key = fx.key("sem");
    let two = a.semaphore(key.as_str(), 2).expect("semaphore");
    let (x, y) = (permit(&two).await, permit(&two).await);
    // Permit 0 is the only slot of a semaphore of 1, and it is held with a count of 2.
    let one = b.semaphore(key.as_str(), 1).expect("semaphore");
    let e = one.try_acquire().await.expect_err("counts disagree");
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(e.holder().is_some(), "{e}");
    let e = one
        .acquire_wait(Wait::up_to(Duration::from_secs(1)))
        .await
        .expect_err("counts disagree");
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    for bad in [0, locker_core::MAX_PERMITS + 1] {
        let e = b.semaphore(key.as_str(), bad).expect_err("bad count");
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    }
    let _ = x.release().await.expect("release");
    let _ = y.release().await.expect("release");
    a.shutdown().await;
    b.shutdown().await;
    Verdict::Passed
}

/// The permits of a process that died are taken over within about a liveness TTL, and a dead
/// process's permits are not counted as held.
pub async fn semaphore_dead_holders_permit_is_taken_over(fx: &Fixture) -> Verdict {
    let t = fx.timing;
    let (dying, b) = (fx.locker(), fx.locker());
    let key = fx.key("sem");
    let sem = dying.semaphore(key.as_str(), 2).expect("semaphore");
    let (x, y) = (permit(&sem).await, permit(&sem).await);
    std::mem::forget(x); // a crash releases nothing
    std::mem::forget(y);
    dying.abandon().await;
    let got = tokio::time::timeout(
        t.expiry_of(t.liveness_ttl) + PATIENCE,
        b.semaphore(key.as_str(), 2)
            .expect("semaphore")
            .acquire_wait(Wait::forever()),
    )
    .await
    .expect("no permit taken over from the dead holder")
    .expect("acquire_wait");
    let holders = b
        .semaphore(key.as_str(), 2)
        .expect("semaphore")
        .holders()
        .await
        .expect("holders");
    let owners: Vec<&str> = holders.iter().map(|h| h.owner_hash.as_str()).collect();
    assert_eq!(
        owners,
        [got.owner_hash()],
        "a dead process counts as a holder"
    );
    let _ = got.release().await.expect("release");
    b.shutdown().await;
    Verdict::Passed
}

/// Leadership passes to a waiting campaigner when the leader resigns and when its process
/// dies; terms grow with fencing; an observer sees every leader, in order, and nobody
/// leads twice at once.
pub async fn election_hands_off_on_resign_and_death(fx: &Fixture) -> Verdict {
    let t = fx.timing;
    let (a, b, c, o) = (fx.locker(), fx.locker(), fx.locker(), fx.locker());
    let key = fx.key("election");
    let campaign = |l: &Locker, name: &str| {
        let election = l
            .election(LockRequest::new(key.as_str()).trace(name))
            .expect("election");
        async move { election.campaign(Wait::forever()).await }
    };
    let observer = o.election(key.as_str()).expect("election");
    let seen = Arc::new(std::sync::Mutex::new(Vec::<Option<LockData>>::new()));
    let watching = tokio::spawn({
        let (mut watch, seen) = (observer.observe(), seen.clone());
        async move {
            loop {
                let leader = watch.changed().await.expect("observe");
                seen.lock().expect("seen").push(leader);
            }
        }
    });

    let leader_a = campaign(&a, "a").await.expect("a campaigns");
    assert_eq!(
        observer
            .leader()
            .await
            .expect("leader")
            .map(|l| l.owner_hash),
        Some(leader_a.owner_hash().to_owned())
    );
    let waiting_b = tokio::spawn(campaign(&b, "b"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting_b.is_finished(), "two leaders");
    let owner_a = leader_a.owner_hash().to_owned();
    let term_a = leader_a.term();
    let _ = leader_a.resign().await.expect("resign");
    let leader_b = tokio::time::timeout(PATIENCE, waiting_b)
        .await
        .expect("b did not lead after a resigned")
        .expect("task")
        .expect("b campaigns");
    if fx.capabilities.fencing {
        assert!(leader_b.term() > term_a, "terms must grow");
    }
    // Long enough for the observer's poll to see b.
    tokio::time::sleep(t.recheck_every * 4 + Duration::from_millis(300)).await;

    let waiting_c = tokio::spawn(campaign(&c, "c"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting_c.is_finished(), "two leaders");
    let owner_b = leader_b.owner_hash().to_owned();
    std::mem::forget(leader_b); // b's process dies
    b.abandon().await;
    let leader_c = tokio::time::timeout(t.expiry_of(t.liveness_ttl) + PATIENCE, waiting_c)
        .await
        .expect("c did not lead after b died")
        .expect("task")
        .expect("c campaigns");
    let owner_c = leader_c.owner_hash().to_owned();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let leaders = loop {
        let leaders: Vec<String> = seen
            .lock()
            .expect("seen")
            .iter()
            .flatten()
            .map(|l| l.owner_hash.clone())
            .collect();
        if leaders.last() == Some(&owner_c) || tokio::time::Instant::now() > deadline {
            break leaders;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    watching.abort();
    assert_eq!(
        leaders,
        [owner_a, owner_b, owner_c],
        "the observer saw these leaders, in this order"
    );
    let _ = leader_c.resign().await.expect("resign");
    for l in [a, c, o] {
        l.shutdown().await;
    }
    Verdict::Passed
}

/// A job that counts itself in `running` while it works for `work`, records the most at
/// once in `most`, and ends with a beat, whose result it returns.
fn counted_job(
    running: &Arc<AtomicUsize>,
    most: &Arc<AtomicUsize>,
    heartbeat: locker_core::Heartbeat,
    work: Duration,
) -> impl std::future::Future<Output = locker_core::Result<()>> {
    let (running, most) = (running.clone(), most.clone());
    async move {
        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
        most.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(work).await;
        let beat = heartbeat.beat().await;
        running.fetch_sub(1, Ordering::SeqCst);
        beat
    }
}

async fn permit(sem: &locker_core::Semaphore) -> locker_core::LockGuard {
    match sem.try_acquire().await.expect("try_acquire") {
        PermitAttempt::Acquired(guard) => guard,
        PermitAttempt::Full(holders) => panic!("full: {holders:?}"),
    }
}

/// A private server paused (shorter than the liveness TTL) twice while tasks of two processes
/// contend for a semaphore of 2 and a campaigner waits for a leader: never more than 2 jobs at
/// once, calls made meanwhile end with a retryable error at worst, the leader keeps its
/// leadership through the pauses, and the work goes on afterwards.
pub async fn semaphore_and_election_across_server_pauses(fx: &Fixture) -> Verdict {
    let Some(server) = fx.private_server().await else {
        return Verdict::skip("the setup cannot start a private server");
    };
    let t = fx.timing;
    let build = || {
        crate::builder_with(server.factory.clone(), &t)
            .build()
            .expect("timings")
    };
    let (a, b) = (build(), build());
    let key = fx.key("sem");
    let leader = a
        .election(fx.key("election").as_str())
        .expect("election")
        .campaign(Wait::forever())
        .await
        .expect("a leads");
    // A campaign ends with the store's error, as any wait: campaign again after a
    // retryable one, as an application would.
    let campaigner = tokio::spawn({
        let election = b.election(fx.key("election").as_str()).expect("election");
        async move {
            loop {
                match election.campaign(Wait::forever()).await {
                    Err(e) if e.is_retryable() => {
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                    other => return other,
                }
            }
        }
    });

    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for locker in [&a, &b] {
        for _ in 0..2 {
            let s = locker.semaphore(key.as_str(), 2).expect("semaphore");
            let (running, most, done, stop) =
                (running.clone(), most.clone(), done.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let job = s
                        .run(Wait::up_to(PATIENCE), |heartbeat| {
                            counted_job(&running, &most, heartbeat, Duration::from_millis(10))
                        })
                        .await;
                    match job {
                        Ok(Ok(())) => {
                            done.fetch_add(1, Ordering::SeqCst);
                        }
                        // A beat or a try during a pause.
                        Ok(Err(e)) | Err(e) => assert!(
                            e.is_retryable() || e.kind() == ErrorKind::MutexTimeout,
                            "{e}"
                        ),
                    }
                }
            }));
        }
    }
    for _ in 0..2 {
        tokio::time::sleep(t.liveness_ttl / 2).await;
        server.control.pause().expect("pause");
        tokio::time::sleep(t.liveness_ttl / 3).await;
        server.control.resume().expect("resume");
    }
    // Work goes on after the pauses.
    let after = done.load(Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while done.load(Ordering::SeqCst) < after + 8 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the semaphore's jobs did not go on after the pauses"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await.expect("contending task");
    }
    let most = most.load(Ordering::SeqCst);
    assert!(most <= 2, "{most} jobs ran at once under a semaphore of 2");

    // The leader kept its leadership; the campaigner still waits, and leads once it resigns.
    tokio::time::sleep(t.report_every * 2).await;
    leader
        .heartbeat()
        .beat()
        .await
        .expect("the leader kept its leadership through the pauses");
    assert!(!campaigner.is_finished(), "two leaders");
    let _ = leader.resign().await.expect("resign");
    let next = tokio::time::timeout(PATIENCE, campaigner)
        .await
        .expect("the campaigner did not lead after the resignation")
        .expect("task")
        .expect("campaign");
    let _ = next.resign().await.expect("resign");
    a.shutdown().await;
    b.shutdown().await;
    drop(server);
    Verdict::Passed
}
