//! Connections that heal (issue 16, point 1), over `MemoryBackend` connections that can be
//! wedged one by one: a wedged connection's calls never answer. The same cases run against real
//! servers behind a TCP proxy in each backend's `tests/wedge.rs`.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use locker_core::{
    async_trait, AcquireOutcome, BackendFactory, Error, ExtendOutcome, LockAttempt, LockBackend,
    LockData, Locker, LockerBuilder, MemoryBackend, ProcessData, ReleaseOutcome, Result,
};

/// A connection to the shared store that hangs for good once wedged.
#[derive(Debug)]
struct Conn {
    store: MemoryBackend,
    wedged: Arc<AtomicBool>,
    /// Acquires fail: 0 never, 1 with an error the store answered, 2 with a lost connection, 3
    /// with a replica's refusal (`READONLY`: the store answered, from the wrong node).
    refuse: Arc<AtomicU8>,
}

impl Conn {
    async fn gate(&self) {
        if self.wedged.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
    }
}

#[async_trait]
impl LockBackend for Conn {
    fn capabilities(&self) -> locker_core::Capabilities {
        self.store.capabilities()
    }
    async fn acquire(&self, key: &str, data: &LockData, ttl: Duration) -> Result<AcquireOutcome> {
        self.gate().await;
        match self.refuse.load(Ordering::SeqCst) {
            1 => return Err(Error::unavailable("TRYAGAIN").set_store_answered(true)),
            2 => return Err(Error::unavailable("connection reset")),
            3 => {
                return Err(Error::unavailable("READONLY")
                    .set_store_answered(true)
                    .set_wrong_node(true))
            }
            _ => {}
        }
        self.store.acquire(key, data, ttl).await
    }
    async fn extend(
        &self,
        key: &str,
        data: &LockData,
        ttl: Duration,
        owner_hash: &str,
    ) -> Result<ExtendOutcome> {
        self.gate().await;
        self.store.extend(key, data, ttl, owner_hash).await
    }
    async fn release(&self, key: &str, owner_hash: &str) -> Result<ReleaseOutcome> {
        self.gate().await;
        self.store.release(key, owner_hash).await
    }
    async fn ping(&self, process_hash: &str, data: &ProcessData, ttl: Duration) -> Result<()> {
        self.gate().await;
        self.store.ping(process_hash, data, ttl).await
    }
    async fn read(&self, key: &str) -> Result<Option<LockData>> {
        self.gate().await;
        self.store.read(key).await
    }
    async fn read_process(&self, process_hash: &str) -> Result<Option<ProcessData>> {
        self.gate().await;
        self.store.read_process(process_hash).await
    }
    async fn forget_process(&self, process_hash: &str) -> Result<()> {
        self.gate().await;
        self.store.forget_process(process_hash).await
    }
}

/// Opens [`Conn`]s and keeps their switches.
#[derive(Clone)]
struct Factory {
    store: MemoryBackend,
    opened: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
    refuse: Arc<AtomicU8>,
}

impl Factory {
    fn new(store: &MemoryBackend) -> Self {
        Factory {
            store: store.clone(),
            opened: Arc::default(),
            refuse: Arc::default(),
        }
    }
    fn opened(&self) -> usize {
        self.opened.lock().expect("lock").len()
    }
    fn wedge_all(&self) {
        for w in self.opened.lock().expect("lock").iter() {
            w.store(true, Ordering::SeqCst);
        }
    }
}

#[async_trait]
impl BackendFactory for Factory {
    async fn connect(&self) -> Result<Arc<dyn LockBackend>> {
        let wedged = Arc::new(AtomicBool::new(false));
        self.opened.lock().expect("lock").push(wedged.clone());
        Ok(Arc::new(Conn {
            store: self.store.clone(),
            wedged,
            refuse: self.refuse.clone(),
        }))
    }
}

fn builder(factory: &Factory) -> LockerBuilder {
    Locker::builder(factory.clone())
        .report_every(Duration::from_millis(40))
        .liveness_ttl(Duration::from_millis(600))
        .recheck_every(Duration::from_millis(50))
        .extend_every(Duration::from_millis(500))
        .lock_ttl(Duration::from_secs(5))
        .slow_call_after(Duration::from_millis(30))
        .reconnect_after_failures(3)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wedged_connections_are_replaced_on_both_sides() {
    let store = MemoryBackend::new();
    let factory = Factory::new(&store);
    let a = builder(&factory).build().expect("options");
    let LockAttempt::Acquired(guard) = a.acquire("k").await.expect("acquire") else {
        panic!("k is free");
    };
    assert_eq!(factory.opened(), 2, "one connection per side");
    factory.wedge_all();

    // The jobs' side: an acquire goes through again once its connection was replaced.
    let start = Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_millis(500), a.acquire("k2")).await {
            Ok(Ok(LockAttempt::Acquired(g))) => {
                let _ = g.release().await.expect("release");
                break;
            }
            Ok(Ok(LockAttempt::Held(h))) => panic!("k2 held by {}", h.owner_hash),
            Ok(Err(_)) | Err(_) => {}
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the jobs' connection was never replaced"
        );
    }
    // The reporter's side: past two liveness TTLs since the wedge, the process stayed alive
    // all along, so its lock was never lost, and its beats work.
    tokio::time::sleep(Duration::from_millis(1200).saturating_sub(start.elapsed())).await;
    guard
        .heartbeat()
        .beat()
        .await
        .expect("the lock is still ours");
    guard.extend().await.expect("extend");
    let observer = builder(&Factory::new(&store)).build().expect("options");
    match observer.acquire("k").await.expect("acquire") {
        LockAttempt::Held(h) => assert_eq!(h.process_hash, a.process_hash()),
        LockAttempt::Acquired(_) => panic!("the observer took k: the liveness lapsed"),
    }
    assert!(factory.opened() >= 4, "opened {}", factory.opened());
    let _ = guard.release().await.expect("release");
    a.shutdown().await;
    observer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_healing_a_wedge_costs_the_lock() {
    let store = MemoryBackend::new();
    let factory = Factory::new(&store);
    let a = builder(&factory)
        .reconnect_after_failures(0)
        .build()
        .expect("options");
    let LockAttempt::Acquired(guard) = a.acquire("k").await.expect("acquire") else {
        panic!("k is free");
    };
    factory.wedge_all();
    let observer = builder(&Factory::new(&store)).build().expect("options");
    let start = Instant::now();
    loop {
        if let LockAttempt::Acquired(g) = observer.acquire("k").await.expect("acquire") {
            let _ = g.release().await.expect("release");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "never lapsed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(factory.opened(), 2, "nothing reconnected");
    drop(guard);
    a.abandon().await;
    observer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_does_not_wait_for_a_hung_liveness_write() {
    let store = MemoryBackend::new();
    let factory = Factory::new(&store);
    // A liveness write may wait up to the 20 s TTL; healing is off so nothing cuts it short.
    let a = builder(&factory)
        .liveness_ttl(Duration::from_secs(20))
        .reconnect_after_failures(0)
        .build()
        .expect("options");
    a.ready().await.expect("ready");
    factory.wedge_all();
    // Let a liveness write start on the wedged connection.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), a.abandon())
        .await
        .expect("abandon waited for the hung liveness write");
    eprintln!("abandon took {:?}", start.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_the_store_answered_do_not_replace_a_connection() {
    for (refuse, replaced) in [(1, false), (2, true)] {
        let store = MemoryBackend::new();
        let factory = Factory::new(&store);
        let a = builder(&factory).build().expect("options");
        a.ready().await.expect("ready");
        factory.refuse.store(refuse, Ordering::SeqCst);
        for _ in 0..10 {
            let e = a.acquire("k").await.expect_err("refused");
            assert!(e.is_retryable(), "{e}");
        }
        // A replacement is made in the background: give it time to show.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            factory.opened() > 2,
            replaced,
            "refuse mode {refuse}: {} connections opened",
            factory.opened()
        );
        a.shutdown().await;
    }
}

/// A connection that reaches a replica (an old master after a failover) refuses writes while
/// its reads succeed: it is replaced at the first refusal, though the reads in between would
/// reset a count of failures in a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_to_the_wrong_node_is_replaced_at_once() {
    let store = MemoryBackend::new();
    let factory = Factory::new(&store);
    let a = builder(&factory).build().expect("options");
    let LockAttempt::Acquired(guard) = a.acquire("k").await.expect("acquire") else {
        panic!("k is free");
    };
    let opened = factory.opened();
    factory.refuse.store(3, Ordering::SeqCst);
    let start = Instant::now();
    while factory.opened() == opened {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the connection to the wrong node was kept"
        );
        let e = a.acquire("other").await.expect_err("refused");
        assert!(e.is_wrong_node(), "{e}");
        // A read in between succeeds.
        a.inspect("k").await.expect("read");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    factory.refuse.store(0, Ordering::SeqCst);
    let _released = guard.release().await;
    a.shutdown().await;
}
