//! `beat()` allocates nothing when no recheck or extension is due (alone in its test binary, so
//! that no other test allocates meanwhile).

use std::alloc::System;
use std::time::Duration;

use futures::FutureExt;
use locker_core::{LockAttempt, Locker, MemoryBackend};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

#[test]
fn a_beat_with_nothing_due_allocates_nothing() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // Long intervals: after the first liveness write the reporter sleeps, and no beat has I/O.
    let locker = Locker::builder(MemoryBackend::new())
        .report_every(Duration::from_secs(30))
        .liveness_ttl(Duration::from_secs(120))
        .recheck_every(Duration::from_secs(3600))
        .extend_every(Duration::from_secs(3600))
        .lock_ttl(Duration::from_secs(7200))
        .build()
        .expect("locker");
    let guard = match runtime.block_on(locker.acquire("k")).expect("acquire") {
        LockAttempt::Acquired(g) => g,
        LockAttempt::Held(_) => unreachable!("a fresh store"),
    };
    let heartbeat = guard.heartbeat();
    // Let the reporter finish its first write.
    std::thread::sleep(Duration::from_millis(100));
    let region = Region::new(GLOBAL);
    for _ in 0..10_000 {
        let done = heartbeat.beat().now_or_never();
        assert!(matches!(done, Some(Ok(()))));
    }
    let stats = region.change();
    assert_eq!(stats.allocations, 0, "{stats:?}");
    assert_eq!(stats.reallocations, 0, "{stats:?}");
    drop(guard);
    runtime.block_on(locker.shutdown());
}
