//! The documented metrics move: acquisitions by outcome, locks held, releases, takeovers,
//! losses by reason, liveness writes and lapses, background errors by source, waits. One test
//! (the recorder is global to the process), with `metrics-util`'s debugging recorder.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use locker_core::metrics::{
    ACQUIRE_SECONDS, ACQUIRE_TOTAL, BACKGROUND_ERRORS_TOTAL, LIVENESS_LAPSES_TOTAL,
    LIVENESS_WRITE_SECONDS, LOCKS_HELD, LOCKS_LOST_TOTAL, RELEASES_TOTAL, TAKEOVERS_TOTAL,
    WAIT_SECONDS,
};
use locker_core::{LockAttempt, LockBackend, LockGuard, Locker, MemoryBackend, Wait};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::MetricKind;

const LIVENESS: Duration = Duration::from_millis(300);

fn locker(store: &MemoryBackend) -> Locker {
    Locker::builder(store.clone())
        .report_every(Duration::from_millis(40))
        .liveness_ttl(LIVENESS)
        .reporter_start_timeout(Duration::from_secs(5))
        .recheck_every(Duration::from_millis(50))
        .extend_every(Duration::from_millis(200))
        .lock_ttl(Duration::from_secs(2))
        .build()
        .expect("options")
}

/// The metrics now: counters and gauges by (name, sorted labels), histograms as their number
/// of samples.
fn snapshot(snapshotter: &Snapshotter) -> HashMap<(String, Vec<(String, String)>), f64> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let (kind, key) = (key.kind(), key.key().clone());
            let mut labels: Vec<(String, String)> = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            let value = match (kind, value) {
                (MetricKind::Counter, DebugValue::Counter(n)) => n as f64,
                (MetricKind::Gauge, DebugValue::Gauge(g)) => g.into_inner(),
                (MetricKind::Histogram, DebugValue::Histogram(samples)) => samples.len() as f64,
                (kind, value) => panic!("{kind:?} with {value:?}"),
            };
            ((key.name().to_owned(), labels), value)
        })
        .collect()
}

struct Metrics {
    snapshotter: Snapshotter,
    /// The debugging recorder's counters and gauges are values; its histograms hand over their
    /// samples at each snapshot, so their counts are summed here.
    totals: HashMap<(String, Vec<(String, String)>), f64>,
}

/// The histograms of the table.
const HISTOGRAMS: &[&str] = &[ACQUIRE_SECONDS, LIVENESS_WRITE_SECONDS, WAIT_SECONDS];

impl Metrics {
    fn refresh(&mut self) {
        for (key, value) in snapshot(&self.snapshotter) {
            if HISTOGRAMS.contains(&key.0.as_str()) {
                *self.totals.entry(key).or_default() += value;
            } else {
                self.totals.insert(key, value);
            }
        }
    }

    fn get(&mut self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.refresh();
        let mut labels: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        labels.sort();
        self.totals
            .get(&(name.to_owned(), labels))
            .copied()
            .unwrap_or(0.0)
    }

    async fn eventually(&mut self, name: &str, labels: &[(&str, &str)], at_least: f64) {
        let start = Instant::now();
        loop {
            let value = self.get(name, labels);
            if value >= at_least {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{name}{labels:?} is {value}, expected at least {at_least}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn acquired(locker: &Locker, key: &str) -> LockGuard {
    match locker.acquire(key).await.expect("acquire") {
        LockAttempt::Acquired(guard) => guard,
        LockAttempt::Held(h) => panic!("{key} held by {}", h.owner_hash),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_metrics_move() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this test binary");
    let mut m = Metrics {
        snapshotter,
        totals: HashMap::new(),
    };
    let store = MemoryBackend::new();
    let (a, b) = (locker(&store), locker(&store));

    // Acquired, held, released.
    let guard = acquired(&a, "job").await;
    assert_eq!(m.get(ACQUIRE_TOTAL, &[("outcome", "acquired")]), 1.0);
    assert_eq!(m.get(ACQUIRE_SECONDS, &[("outcome", "acquired")]), 1.0);
    assert_eq!(m.get(LOCKS_HELD, &[]), 1.0);
    assert!(matches!(
        b.acquire("job").await.expect("try"),
        LockAttempt::Held(_)
    ));
    assert_eq!(m.get(ACQUIRE_TOTAL, &[("outcome", "held")]), 1.0);
    let _released = guard.release().await.expect("release");
    assert_eq!(m.get(RELEASES_TOTAL, &[("outcome", "released")]), 1.0);
    assert_eq!(m.get(LOCKS_HELD, &[]), 0.0);
    m.eventually(LIVENESS_WRITE_SECONDS, &[], 2.0).await;

    // A wait that times out, and one that acquires.
    let guard = acquired(&a, "waited").await;
    let e = b
        .acquire_wait("waited", Wait::up_to(Duration::from_millis(30)))
        .await
        .expect_err("held");
    assert_eq!(e.kind(), locker_core::ErrorKind::MutexTimeout);
    assert_eq!(m.get(WAIT_SECONDS, &[("outcome", "timeout")]), 1.0);
    let _released = guard.release().await.expect("release");
    let guard = b
        .acquire_wait("waited", Wait::up_to(Duration::from_secs(5)))
        .await
        .expect("free");
    assert_eq!(m.get(WAIT_SECONDS, &[("outcome", "acquired")]), 1.0);
    let _released = guard.release().await.expect("release");

    // Taken over: the store gives the lock to someone else; the next recheck finds it.
    let guard = acquired(&a, "stolen").await;
    let thief = locker_core::LockData::new(
        locker_core::new_owner_hash("stolen", "thief/1.1", None).expect("owner"),
        "thief/1.1".to_owned(),
        None,
    );
    let taken = store
        .take_over(
            "stolen",
            &thief,
            Duration::from_secs(60),
            guard.owner_hash(),
        )
        .await
        .expect("take over");
    assert!(matches!(taken, locker_core::AcquireOutcome::Acquired(_)));
    let heartbeat = guard.heartbeat();
    let lost = tokio::time::timeout(Duration::from_secs(5), heartbeat.lost())
        .await
        .expect("the loss is found");
    assert_eq!(lost.kind(), locker_core::ErrorKind::LockLost);
    assert_eq!(m.get(LOCKS_LOST_TOTAL, &[("reason", "taken_over")]), 1.0);
    assert_eq!(
        m.get(BACKGROUND_ERRORS_TOTAL, &[("source", "lock_lost")]),
        1.0
    );
    drop(guard);

    // A dead holder's lock taken over: `b` takes the lock of a process whose liveness record
    // is gone.
    let guard = acquired(&a, "orphan").await;
    store
        .forget_process(a.process_hash())
        .await
        .expect("forget");
    let before = m.get(TAKEOVERS_TOTAL, &[]);
    match b.acquire("orphan").await.expect("acquire") {
        LockAttempt::Acquired(g) => g.release().await.map(drop).expect("release"),
        LockAttempt::Held(h) => panic!("a dead holder kept its lock: {}", h.owner_hash),
    }
    assert_eq!(m.get(TAKEOVERS_TOTAL, &[]), before + 1.0);
    drop(guard);

    // A liveness lapse: the store stops answering for longer than the liveness TTL.
    let guard = acquired(&a, "lapse").await;
    store.set_unavailable(true);
    tokio::time::sleep(LIVENESS * 2).await;
    store.set_unavailable(false);
    m.eventually(LIVENESS_LAPSES_TOTAL, &[], 1.0).await;
    m.eventually(BACKGROUND_ERRORS_TOTAL, &[("source", "reporter")], 1.0)
        .await;
    let e = guard.heartbeat().beat().await.expect_err("lapsed");
    assert_eq!(e.kind(), locker_core::ErrorKind::LockLost);
    assert_eq!(
        m.get(LOCKS_LOST_TOTAL, &[("reason", "liveness_lapsed")]),
        1.0
    );
    drop(guard);

    // A drain counts the locks it stops.
    let guard = acquired(&b, "drained").await;
    b.drain("test");
    assert_eq!(m.get(LOCKS_LOST_TOTAL, &[("reason", "drained")]), 1.0);
    drop(guard);

    a.shutdown().await;
    b.shutdown().await;
    assert_eq!(m.get(LOCKS_HELD, &[]), 0.0);
}
