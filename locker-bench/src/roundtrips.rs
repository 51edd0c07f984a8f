//! Round trips per decision: the backend calls one acquire, try, takeover, extend or release
//! makes, counted by the [`counting`](crate::counting) decorator.

use std::sync::Arc;

use locker::{LockAttempt, Locker};

use crate::counting::{CountingFactory, Counts, Snapshot};

fn plain_locker(url: &str) -> Locker {
    Locker::builder(locker::connect(url).expect("url"))
        .build()
        .expect("locker")
}

/// Prints the round-trip table of the backend at `url`.
pub(crate) async fn table(url: &str) {
    let counts = Arc::new(Counts::default());
    let factory = CountingFactory {
        inner: locker::connect(url).expect("url"),
        counts: counts.clone(),
        split_reads: false,
    };
    let locker = Locker::builder(factory).build().expect("locker");
    locker.ready().await.expect("counted locker ready");
    let holder = plain_locker(url);
    holder.ready().await.expect("holder ready");
    let store = locker::connect(url)
        .expect("url")
        .connect()
        .await
        .expect("backend");
    let atomic_take_over = store.capabilities().atomic_take_over;
    let pid = std::process::id();
    let key = |what: &str| format!("bench/round-trips/{pid}/{what}");
    let mut rows: Vec<(&str, Snapshot)> = Vec::new();

    // A free key, then extend and release of the lock it gave.
    let before = counts.snapshot();
    let guard = match locker.acquire(key("free").as_str()).await.expect("acquire") {
        LockAttempt::Acquired(g) => g,
        LockAttempt::Held(_) => panic!("a fresh key was held"),
    };
    rows.push(("acquire of a free key", counts.snapshot() - before));
    let before = counts.snapshot();
    guard.extend().await.expect("extend");
    rows.push(("extend", counts.snapshot() - before));
    let before = counts.snapshot();
    let _ = guard.release().await.expect("release");
    rows.push(("release", counts.snapshot() - before));

    // A key held by a live process.
    let held = match holder.acquire(key("held").as_str()).await.expect("acquire") {
        LockAttempt::Acquired(g) => g,
        LockAttempt::Held(_) => panic!("a fresh key was held"),
    };
    let before = counts.snapshot();
    let attempt = locker.acquire(key("held").as_str()).await.expect("try");
    assert!(matches!(attempt, LockAttempt::Held(_)), "took a live lock");
    rows.push((
        "try on a key held by a live process",
        counts.snapshot() - before,
    ));
    let _ = held.release().await.expect("release");

    // A key whose holder died: its lock record stays, its liveness record goes.
    let dead = plain_locker(url);
    let orphan = match dead.acquire(key("dead").as_str()).await.expect("acquire") {
        LockAttempt::Acquired(g) => g,
        LockAttempt::Held(_) => panic!("a fresh key was held"),
    };
    dead.abandon().await;
    drop(orphan); // an abandoned locker sends nothing more
    store
        .forget_process(dead.process_hash())
        .await
        .expect("forget the dead process");
    let before = counts.snapshot();
    let taken = match locker
        .acquire(key("dead").as_str())
        .await
        .expect("takeover")
    {
        LockAttempt::Acquired(g) => g,
        LockAttempt::Held(h) => panic!("the dead holder's lock was not taken over: {h:?}"),
    };
    rows.push((
        "takeover of a dead holder's lock",
        counts.snapshot() - before,
    ));
    let _ = taken.release().await.expect("release");

    println!(
        "\n| decision (round trips, counted per backend method call; the liveness reporter's pings apart) | backend calls | round trips | calls |\n|---|---|---|---|"
    );
    for (what, d) in rows {
        let calls = d.decision_calls();
        let n: u64 = calls.iter().map(|&(_, n)| n).sum();
        // The default `take_over` is a release then an acquire.
        let trips = n + if atomic_take_over { 0 } else { d.take_over };
        println!(
            "| {what} | {n} | {trips} | {} |",
            calls
                .iter()
                .map(|(m, n)| format!("{m} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if !atomic_take_over {
        println!(
            "\nThis backend's `take_over` is not atomic (`Capabilities::atomic_take_over` false): counted as two round trips, as the default (release, then acquire) makes; a backend's own `take_over` may make more store calls inside (etcd's reads the record, deletes it if unchanged, and creates the new one on a lease)."
        );
    }
    locker.shutdown().await;
    holder.shutdown().await;
}
