//! What holding a lock costs the process, apart from the store: the time and allocations of a
//! `beat()` with nothing due (the call a job makes in its inner loop), and the memory the
//! locker keeps per held lock, and the allocations of an acquire + release cycle. The backend
//! stores nothing and answers at once, so only the locker is measured.
//!
//! `cargo run --release -p locker-bench --bin beat-cost`
#![forbid(unsafe_code)]

use std::alloc::System;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use locker::{
    AcquireOutcome, BackendFactory, Capabilities, ExtendOutcome, LockAttempt, LockBackend,
    LockData, Locker, ProcessData, ReleaseOutcome, Result,
};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Grants every lock, keeps nothing.
#[derive(Debug)]
struct Null;

#[async_trait]
impl LockBackend for Null {
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
    async fn acquire(&self, _: &str, data: &LockData, _: Duration) -> Result<AcquireOutcome> {
        Ok(AcquireOutcome::Acquired(data.clone()))
    }
    async fn extend(
        &self,
        _: &str,
        data: &LockData,
        _: Duration,
        _: &str,
    ) -> Result<ExtendOutcome> {
        Ok(ExtendOutcome::Extended(data.clone()))
    }
    async fn release(&self, _: &str, _: &str) -> Result<ReleaseOutcome> {
        Ok(ReleaseOutcome::Released)
    }
    async fn ping(&self, _: &str, _: &ProcessData, _: Duration) -> Result<()> {
        Ok(())
    }
    async fn read(&self, _: &str) -> Result<Option<LockData>> {
        Ok(None)
    }
    async fn read_process(&self, _: &str) -> Result<Option<ProcessData>> {
        Ok(Some(ProcessData::now()))
    }
    async fn forget_process(&self, _: &str) -> Result<()> {
        Ok(())
    }
}

#[async_trait]
impl BackendFactory for Null {
    async fn connect(&self) -> Result<Arc<dyn LockBackend>> {
        Ok(Arc::new(Null))
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let locker = Locker::builder(Null).build().expect("locker");
        let guard = match locker.acquire("beat-cost").await.expect("acquire") {
            LockAttempt::Acquired(g) => g,
            LockAttempt::Held(_) => unreachable!("the null store grants every lock"),
        };
        let hb = guard.heartbeat();
        hb.beat().await.expect("beat");
        println!("| repeat | ns per beat (nothing due) | allocations per beat | bytes allocated per beat |\n|---|---|---|---|");
        let n = 2_000_000u64;
        for repeat in 1..=3 {
            let region = Region::new(GLOBAL);
            let t0 = Instant::now();
            for _ in 0..n {
                hb.beat().await.expect("beat");
            }
            let elapsed = t0.elapsed();
            let stats = region.change();
            println!(
                "| {repeat} | {:.1} | {:.3} | {:.1} |",
                elapsed.as_nanos() as f64 / n as f64,
                stats.allocations as f64 / n as f64,
                stats.bytes_allocated as f64 / n as f64
            );
        }
        drop(hb);
        let _ = guard.release().await;

        println!("\n| locks held | bytes the locker keeps per lock (allocated − freed while acquiring, key of 24 bytes) |\n|---|---|");
        for held in [1_000usize, 10_000] {
            let region = Region::new(GLOBAL);
            let mut guards = Vec::with_capacity(held);
            let before = region.change();
            for i in 0..held {
                match locker
                    .acquire(format!("held/{i:019}").as_str())
                    .await
                    .expect("acquire")
                {
                    LockAttempt::Acquired(g) => guards.push(g),
                    LockAttempt::Held(_) => unreachable!("the null store grants every lock"),
                }
            }
            let stats = region.change();
            let kept = (stats.bytes_allocated as i64 - stats.bytes_deallocated as i64
                - (before.bytes_allocated as i64 - before.bytes_deallocated as i64))
                as f64
                - (guards.capacity() * std::mem::size_of::<locker::LockGuard>()) as f64;
            println!("| {held} | {:.0} |", kept / held as f64);
            for g in guards {
                let _ = g.release().await;
            }
        }

        // The locker's own work per cycle, the store apart (the null store clones the record
        // it is given, one `LockData`, as a real store returns one).
        println!("\n| repeat | allocations + reallocations per acquire + release (null store) | bytes allocated per cycle |\n|---|---|---|");
        let n = 20_000u64;
        let keys: Vec<String> = (0..n).map(|i| format!("cycle/{i:019}")).collect();
        for repeat in 1..=3 {
            let region = Region::new(GLOBAL);
            for key in &keys {
                match locker.acquire(key.as_str()).await.expect("acquire") {
                    LockAttempt::Acquired(g) => {
                        let _ = g.release().await;
                    }
                    LockAttempt::Held(_) => unreachable!("the null store grants every lock"),
                }
            }
            let stats = region.change();
            println!(
                "| {repeat} | {:.1} + {:.1} | {:.0} |",
                stats.allocations as f64 / n as f64,
                stats.reallocations as f64 / n as f64,
                stats.bytes_allocated as f64 / n as f64
            );
        }
        locker.shutdown().await;
    });
}
