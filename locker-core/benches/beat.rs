//! The heartbeat hot path: `beat()` when no recheck or extension is due.
//!
//! `cargo bench -p locker-core --bench beat`

// The macros below generate undocumented public items.
#![allow(missing_docs)]

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use futures::FutureExt;
use locker_core::{LockAttempt, Locker, MemoryBackend};

fn beat_when_nothing_is_due(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let locker = Locker::builder(MemoryBackend::new())
        .recheck_every(Duration::from_secs(3600))
        .extend_every(Duration::from_secs(3600))
        .lock_ttl(Duration::from_secs(7200))
        .build()
        .expect("locker");
    let guard = match runtime.block_on(locker.acquire("bench")).expect("acquire") {
        LockAttempt::Acquired(g) => g,
        LockAttempt::Held(_) => unreachable!("a fresh store"),
    };
    let heartbeat = guard.heartbeat();
    c.bench_function("beat_nothing_due", |b| {
        b.iter(|| {
            // Completes on its first poll when nothing is due.
            let done = heartbeat.beat().now_or_never();
            assert!(matches!(done, Some(Ok(()))));
        })
    });
    drop(guard);
    runtime.block_on(locker.shutdown());
}

criterion_group!(benches, beat_when_nothing_is_due);
criterion_main!(benches);
