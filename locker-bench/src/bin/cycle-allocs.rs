//! Allocations per acquire + release cycle on a real Redis, through a `Locker` and raw (`SET NX
//! PX`, then a compare-and-delete script, with the same `redis` client), one task: where the
//! client's allocator time goes, in counts.
//!
//! `cargo run --release -p locker-bench --bin cycle-allocs -- redis://127.0.0.1:6379[?client=fred] [CYCLES]`
#![forbid(unsafe_code)]

use std::alloc::System;

use locker::{LockAttempt, Locker};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
                       return redis.call('DEL', KEYS[1]) else return 0 end";

fn main() {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let locker = Locker::builder(locker::connect(&url).expect("url"))
            .build()
            .expect("locker");
        locker.ready().await.expect("ready");
        let client = redis::Client::open(url.split('?').next().unwrap_or(&url)).expect("client");
        let mut raw = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let script = redis::Script::new(RELEASE);
        let n: u64 = std::env::args()
            .nth(2)
            .and_then(|n| n.parse().ok())
            .unwrap_or(5_000);
        println!("| repeat | lock: allocations + reallocations per cycle | lock: bytes | raw: allocations + reallocations per cycle | raw: bytes |\n|---|---|---|---|---|");
        for repeat in 1..=3 {
            let keys: Vec<String> = (0..n).map(|i| format!("allocs/{repeat}/{i}")).collect();
            let region = Region::new(GLOBAL);
            for key in &keys {
                match locker.acquire(key.as_str()).await.expect("acquire") {
                    LockAttempt::Acquired(g) => {
                        let _ = g.release().await.expect("release");
                    }
                    LockAttempt::Held(h) => panic!("held by {}", h.owner_hash),
                }
            }
            let lock = region.change();
            let region = Region::new(GLOBAL);
            for key in &keys {
                let set: Option<String> = redis::cmd("SET")
                    .arg(key)
                    .arg("owner")
                    .arg("NX")
                    .arg("PX")
                    .arg(300_000)
                    .query_async(&mut raw)
                    .await
                    .expect("set");
                assert!(set.is_some());
                let _: i64 = script
                    .key(key)
                    .arg("owner")
                    .invoke_async(&mut raw)
                    .await
                    .expect("release");
            }
            let rawc = region.change();
            let per = |s: stats_alloc::Stats| {
                format!(
                    "{:.1} + {:.1} | {:.0}",
                    s.allocations as f64 / n as f64,
                    s.reallocations as f64 / n as f64,
                    s.bytes_allocated as f64 / n as f64
                )
            };
            println!("| {repeat} | {} | {} |", per(lock), per(rawc));
        }
        locker.shutdown().await;
    });
}
