//! Hostile inputs: each a clear typed error or a documented correct behaviour, never a panic, a
//! hang or a lost lock. (Wrong passwords: `locker-redis/tests/security.rs`; a server down at
//! start or paused: the conformance suite's fault cases on every backend.)

use std::sync::Arc;
use std::time::Duration;

use locker::{
    ErrorKind, LockAttempt, LockBackend, LockRequest, Locker, MemoryBackend, OwnerStatus,
    ReleaseOutcome,
};

fn locker_on(store: &MemoryBackend) -> Locker {
    Locker::builder(store.clone())
        .report_every(Duration::from_millis(50))
        .liveness_ttl(Duration::from_millis(400))
        .recheck_every(Duration::from_millis(50))
        .build()
        .expect("locker")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keys_are_typed_errors_and_odd_keys_work() {
    let store = MemoryBackend::new();
    let locker = locker_on(&store);
    // Empty and 1 MiB keys: refused (keys are at most 64 KiB).
    for key in [String::new(), "k".repeat(1 << 20)] {
        let e = locker.acquire(key.as_str()).await.expect_err("refused");
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    }
    // NUL, newline, @, #, /, {, } work and round-trip through owner hashes. (Keys are `&str`:
    // invalid UTF-8 cannot be passed, by type.)
    for key in [
        "nul\0key",
        "new\nline",
        "a@b",
        "a#b",
        "a/b",
        "{",
        "}",
        "{x}@h/1.2.3#t",
    ] {
        let guard = match locker.acquire(key).await.expect("acquire") {
            LockAttempt::Acquired(g) => g,
            LockAttempt::Held(h) => panic!("{key:?} held by {}", h.owner_hash),
        };
        match locker
            .owner_status(guard.owner_hash())
            .await
            .expect("status")
        {
            OwnerStatus::Running { key: k, .. } => assert_eq!(k, key),
            other => panic!("{key:?}: {other:?}"),
        }
        assert_eq!(
            guard.release().await.expect("release"),
            ReleaseOutcome::Released
        );
    }
    // A trace with `#` and `@` works; one that would make the owner hash ambiguous is refused.
    let guard = match locker
        .acquire(LockRequest::new("t").trace("run #7 @ host"))
        .await
        .expect("acquire")
    {
        LockAttempt::Acquired(g) => g,
        LockAttempt::Held(_) => unreachable!(),
    };
    assert_eq!(guard.lock_data().trace.as_deref(), Some("run #7 @ host"));
    drop(guard);
    let e = locker
        .acquire(LockRequest::new("t2").trace("x@h/1.2.3"))
        .await
        .expect_err("ambiguous");
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    locker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_values_in_the_store_are_typed_errors_or_read_as_records() {
    let store = MemoryBackend::new();
    let locker = locker_on(&store);
    let ttl = Duration::from_secs(60);
    // Garbage, and another program's JSON, in a lock key: Corrupt, never overwritten.
    for (key, value) in [
        ("garbage", "\u{0}\u{1}not json"),
        ("other-json", r#"{"owner":"someone","expires":123}"#),
    ] {
        store.put_raw(key, value, ttl);
        let e = locker.acquire(key).await.expect_err("corrupt");
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        assert_eq!(store.get_raw(key).as_deref(), Some(value));
    }
    // An old-format record (the Node library's, with no fencing token) is a record: its holder
    // is respected while alive.
    let node = r#"{"ownerHash":"old@node/1.2.3","processHash":"node/1.2","acquiredAt":"2026-01-13T10:00:00.000Z","extendedAt":"2026-01-13T10:00:00.000Z"}"#;
    store.put_raw("old", node, ttl);
    store.put_raw_process("node/1.2", r#"{"aliveAt":"2026-01-13T10:00:00.000Z"}"#, ttl);
    match locker.acquire("old").await.expect("acquire") {
        LockAttempt::Held(h) => {
            assert_eq!(h.owner_hash, "old@node/1.2.3");
            assert_eq!(h.fencing_token, None);
        }
        LockAttempt::Acquired(_) => panic!("took a live holder's lock"),
    }
    // Garbage in the holder's liveness key: Corrupt, the lock is not taken.
    store.put_raw_process("node/1.2", "garbage", ttl);
    let e = locker
        .acquire("old")
        .await
        .expect_err("corrupt liveness record");
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    locker.shutdown().await;
}

#[test]
fn bad_urls_are_typed_errors() {
    for url in [
        "mongodb://localhost",
        "redis://localhost:99999",
        "redis://localhost:port",
        "etcd://h:0x10",
        "sqlite::memory:",
        "sqlite:x.db?mode=memory",
        "sqlite:%3Amemory%3A",
        "sqlite:x.db?table_prefix=x%22%3B%20DROP",
        "",
        "://",
        "redis://[::1",
        "redis://h\0st",
        "redis://h#fragment",
        "redis://h?prefix=x{",
        "redis://h?command_timeout=0ms",
        "redis://h?command_timeout=99999999999999999999s",
        "redis+cluster://a:1,b:2/3",
        "postgres://u:p@h/db?sslmode=require&evil=1",
        "postgres://u:p@h/db?schema=a%22b",
        "postgres://u:%FF@h/db",
        "etcd://a:1/v3/kv",
        "etcd://a:1,:2",
    ] {
        match locker::connect(url) {
            Err(e) => assert_eq!(e.kind(), ErrorKind::InvalidInput, "{url}: {e}"),
            Ok(_) => panic!("{url:?} was accepted"),
        }
    }
    // Huge URLs: refused or parsed, quickly, without a panic.
    let long = "a".repeat(1 << 20);
    for url in [
        format!("redis://{long}"),
        format!("redis://h?prefix={long}"),
        format!("redis://{}h", "@".repeat(1 << 16)),
        format!("etcd://{}", "a:1,".repeat(1 << 14)),
        format!("sqlite:{long}?{}", "&".repeat(1 << 16)),
    ] {
        let _ = locker::connect(&url);
    }
}

#[cfg(any(feature = "redis", feature = "fred"))]
#[test]
fn passwords_with_url_delimiters_are_the_passwords_and_never_shown() {
    // Raw or percent-encoded: the user info runs to the last '@'.
    for url in [
        "redis://u:p?w#x/y@z@127.0.0.1:6379/0?prefix=app%3A",
        "redis://u:p%3Fw%23x%2Fy%40z@127.0.0.1:6379/0?prefix=app%3A",
        "redis+cluster://u:p?w#x/y@z@10.0.0.1:7000,10.0.0.2:7000",
    ] {
        let config = locker::redis::RedisConfig::from_url(url).expect(url);
        assert_eq!(
            config.key_prefix(),
            if url.contains("prefix") { "app:" } else { "" }
        );
        for text in [format!("{config:?}"), config.to_string()] {
            assert!(!text.contains("p?w") && !text.contains("p%3Fw"), "{text}");
        }
        assert!(locker::connect(url).is_ok(), "{url}");
    }
}

#[test]
fn zero_and_absurd_durations_are_typed_errors() {
    let base = || Locker::builder(MemoryBackend::new());
    for builder in [
        base().lock_ttl(Duration::ZERO),
        base().liveness_ttl(Duration::ZERO),
        base().report_every(Duration::ZERO),
        base().lock_ttl(Duration::from_secs(200 * 365 * 24 * 3600)),
        base().recheck_every(Duration::MAX),
    ] {
        let e = builder.build().expect_err("refused");
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    }
    // Years are fine where they make sense.
    base()
        .lock_ttl(Duration::from_secs(10 * 365 * 24 * 3600))
        .build()
        .expect("a ten-year lock TTL");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let store = MemoryBackend::new();
        let data = locker::LockData::new("k@h/1.2.3".into(), "h/1.2".into(), None);
        for ttl in [Duration::ZERO, Duration::MAX] {
            let e = store.acquire("k", &data, ttl).await.expect_err("refused");
            assert_eq!(e.kind(), ErrorKind::InvalidInput);
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_lost_while_a_lock_is_held_stops_the_job_first_and_leaves_nothing_behind() {
    let store = MemoryBackend::new();
    let locker = locker_on(&store);
    let guard = match locker.acquire("job").await.expect("acquire") {
        LockAttempt::Acquired(g) => g,
        LockAttempt::Held(_) => unreachable!(),
    };
    let lost = tokio::spawn(guard.heartbeat().lost());
    // The store goes away.
    store.set_unavailable(true);
    let died = std::time::Instant::now();
    let e = tokio::time::timeout(Duration::from_secs(5), lost)
        .await
        .expect("the job was told to stop")
        .expect("task");
    assert_eq!(e.kind(), ErrorKind::LockLost, "{e}");
    // Stopped no later than the liveness record could expire, i.e. before anyone could take
    // the lock over.
    assert!(
        died.elapsed() <= Duration::from_millis(400 + 100),
        "{:?}",
        died.elapsed()
    );
    // The release is retried in the background until the store is back; nothing stays behind.
    drop(guard);
    tokio::time::sleep(Duration::from_millis(200)).await;
    store.set_unavailable(false);
    let start = std::time::Instant::now();
    while store.get_raw("job").is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the lock stayed behind"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let other = Locker::builder(Arc::new(store.clone()) as Arc<dyn locker::BackendFactory>)
        .build()
        .expect("locker");
    assert!(matches!(
        other.acquire("job").await.expect("acquire"),
        LockAttempt::Acquired(_)
    ));
    other.shutdown().await;
    locker.shutdown().await;
}
