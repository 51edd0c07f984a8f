//! Backend-level cases: the `LockBackend` contract, call by call.

use std::collections::HashSet;
use std::time::Duration;

use locker_core::{
    new_owner_hash, AcquireDecision, AcquireOutcome, ErrorKind, ExtendOutcome, LockBackend,
    LockData, ProcessData, ReleaseOutcome,
};

use crate::{Fixture, Verdict};

const TTL: Duration = Duration::from_secs(30);

/// A lock record for `key` owned by a made-up process `n`.
pub fn record(key: &str, n: u32) -> LockData {
    let process = format!("conformance-host/{n}.{n}");
    let owner = new_owner_hash(key, &process, None).expect("valid owner hash");
    LockData::new(owner, process, None)
}

async fn must_acquire(backend: &dyn LockBackend, key: &str, data: &LockData) -> LockData {
    match backend.acquire(key, data, TTL).await.expect("acquire") {
        AcquireOutcome::Acquired(stored) => stored,
        AcquireOutcome::Held(holder) => panic!("{key:?} is held by {}", holder.owner_hash),
    }
}

/// Acquire on a free key stores the record and returns it.
pub async fn backend_acquire_free_key(fx: &Fixture) -> Verdict {
    let b = fx.backend().await;
    let key = fx.key("free");
    let mine = record(&key, 1);
    let stored = must_acquire(&*b, &key, &mine).await;
    assert_eq!(stored.owner_hash, mine.owner_hash);
    assert_eq!(stored.process_hash, mine.process_hash);
    assert_eq!(stored.acquired_at, mine.acquired_at);
    assert_eq!(stored.fencing_token.is_some(), fx.capabilities.fencing);
    assert_eq!(b.read(&key).await.expect("read"), Some(stored));
    Verdict::Passed
}

/// Acquire on a held key changes nothing and returns the holder's record.
pub async fn backend_acquire_held_key_returns_holder(fx: &Fixture) -> Verdict {
    let b = fx.backend().await;
    let key = fx.key("held");
    let first = must_acquire(&*b, &key, &record(&key, 1)).await;
    match b
        .acquire(&key, &record(&key, 2), TTL)
        .await
        .expect("acquire")
    {
        AcquireOutcome::Held(holder) => assert_eq!(holder, first),
        AcquireOutcome::Acquired(d) => panic!("second acquire won: {}", d.owner_hash),
    }
    assert_eq!(b.read(&key).await.expect("read"), Some(first));
    Verdict::Passed
}

/// Extend by the owner rewrites the record and keeps the fencing token.
pub async fn backend_extend_by_owner(fx: &Fixture) -> Verdict {
    let b = fx.backend().await;
    let key = fx.key("extend");
    let stored = must_acquire(&*b, &key, &record(&key, 1)).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let newer = stored.extended_now();
    match b
        .extend(&key, &newer, TTL, &stored.owner_hash)
        .await
        .expect("extend")
    {
        ExtendOutcome::Extended(d) => {
            assert_eq!(d.extended_at, newer.extended_at);
            assert_eq!(d.fencing_token, stored.fencing_token);
        }
        other => panic!("owner could not extend: {other:?}"),
    }
    let now = b.read(&key).await.expect("read").expect("still there");
    assert_eq!(now.extended_at, newer.extended_at);
    assert_eq!(now.acquired_at, stored.acquired_at);
    assert_eq!(now.fencing_token, stored.fencing_token);
    Verdict::Passed
}

/// Extend by someone else changes nothing and returns the holder.
pub async fn backend_extend_by_non_owner(fx: &Fixture) -> Verdict {
    let b = fx.backend().await;
    let key = fx.key("extend-other");
    let stored = must_acquire(&*b, &key, &record(&key, 1)).await;
    let intruder = record(&key, 2);
    match b
        .extend(&key, &intruder, TTL, &intruder.owner_hash)
        .await
        .expect("extend")
    {
        ExtendOutcome::Held(holder) => assert_eq!(holder, stored),
        other => panic!("non-owner extension: {other:?}"),
    }
    assert_eq!(b.read(&key).await.expect("read"), Some(stored));
    Verdict::Passed
}

/// Extend of a missing key creates nothing.
pub async fn backend_extend_missing_key(fx: &Fixture) -> Verdict {
    let b = fx.backend().await;
    let key = fx.key("extend-missing");
    let mine = record(&key, 1);
    let outcome = b
        .extend(&key, &mine, TTL, &mine.owner_hash)
        .await
        .expect("extend");
    assert_eq!(outcome, ExtendOutcome::NoKey);
    assert_eq!(b.read(&key).await.expect("read"), None);
    Verdict::Passed
}

/// Release by the owner deletes the lock.
pub async fn backend_release_by_owner(fx: &Fixture) -> Verdict {
    let b = fx.backend().await;
    let key = fx.key("release");
    let stored = must_acquire(&*b, &key, &record(&key, 1)).await;
    let outcome = b.release(&key, &stored.owner_hash).await.expect("release");
    assert_eq!(outcome, ReleaseOutcome::Released);
    assert_eq!(b.read(&key).await.expect("read"), None);
    must_acquire(&*b, &key, &record(&key, 2)).await;
    Verdict::Passed
}

/// Release by someone else deletes nothing and returns the holder.
pub async fn backend_release_by_non_owner(fx: &Fixture) -> Verdict {
    let b = fx.backend().await;
    let key = fx.key("release-other");
    let stored = must_acquire(&*b, &key, &record(&key, 1)).await;
    let outcome = b
        .release(&key, &record(&key, 2).owner_hash)
        .await
        .expect("release");
    assert_eq!(outcome, ReleaseOutcome::Held(stored.clone()));
    assert_eq!(b.read(&key).await.expect("read"), Some(stored));
    Verdict::Passed
}

/// Release of a missing key says so.
pub async fn backend_release_missing_key(fx: &Fixture) -> Verdict {
    let b = fx.backend().await;
    let key = fx.key("release-missing");
    let outcome = b
        .release(&key, &record(&key, 1).owner_hash)
        .await
        .expect("release");
    assert_eq!(outcome, ReleaseOutcome::NoKey);
    Verdict::Passed
}

/// `take_over` replaces the lock only while it is still the dead owner's, and acquires a
/// missing key.
pub async fn backend_take_over_replaces_only_the_dead_owner(fx: &Fixture) -> Verdict {
    let b = fx.backend().await;
    let key = fx.key("take-over");
    let dead = must_acquire(&*b, &key, &record(&key, 1)).await;
    let heir = record(&key, 2);
    let stored = match b
        .take_over(&key, &heir, TTL, &dead.owner_hash)
        .await
        .expect("take over")
    {
        AcquireOutcome::Acquired(d) => d,
        AcquireOutcome::Held(h) => panic!("take over refused, held by {}", h.owner_hash),
    };
    assert_eq!(stored.owner_hash, heir.owner_hash);
    if fx.capabilities.fencing {
        assert!(stored.fencing_token > dead.fencing_token);
    }
    // A second heir that also saw the dead owner loses: the lock is no longer the dead one's.
    match b
        .take_over(&key, &record(&key, 3), TTL, &dead.owner_hash)
        .await
        .expect("take over")
    {
        AcquireOutcome::Held(h) => assert_eq!(h.owner_hash, heir.owner_hash),
        AcquireOutcome::Acquired(d) => panic!("took over a live heir's lock: {}", d.owner_hash),
    }
    // On a missing key it acquires.
    let other = fx.key("take-over-missing");
    match b
        .take_over(&other, &record(&other, 4), TTL, "nobody")
        .await
        .expect("take over")
    {
        AcquireOutcome::Acquired(_) => {}
        AcquireOutcome::Held(h) => panic!("missing key held by {}", h.owner_hash),
    }
    Verdict::Passed
}

/// `acquire_checked` makes the whole decision: a free key is acquired, a key held by a live
/// process is left alone, and (with [`Capabilities::checked_acquire`]) a dead holder's lock is
/// taken over in the same call, with a higher fencing token; without the capability a held key
/// answers `Held`, whatever its holder's liveness.
///
/// [`Capabilities::checked_acquire`]: locker_core::Capabilities::checked_acquire
pub async fn backend_acquire_checked_decides_in_one_call(fx: &Fixture) -> Verdict {
    let b = fx.backend().await;
    let key = fx.key("checked");
    let first = record(&key, 1);
    b.ping(&first.process_hash, &ProcessData::now(), TTL)
        .await
        .expect("ping");
    let stored = match b.acquire_checked(&key, &first, TTL).await.expect("acquire") {
        AcquireDecision::Acquired(stored) => stored,
        other => panic!("a free key: {other:?}"),
    };
    assert_eq!(stored.owner_hash, first.owner_hash);
    assert_eq!(stored.fencing_token.is_some(), fx.capabilities.fencing);
    assert_eq!(b.read(&key).await.expect("read"), Some(stored.clone()));
    let second = record(&key, 2);
    match b
        .acquire_checked(&key, &second, TTL)
        .await
        .expect("acquire")
    {
        AcquireDecision::HeldByLive(holder) if fx.capabilities.checked_acquire => {
            assert_eq!(holder, stored)
        }
        AcquireDecision::Held(holder) if !fx.capabilities.checked_acquire => {
            assert_eq!(holder, stored)
        }
        other => panic!("a key held by a live process: {other:?}"),
    }
    b.forget_process(&first.process_hash).await.expect("forget");
    match b
        .acquire_checked(&key, &second, TTL)
        .await
        .expect("acquire")
    {
        AcquireDecision::TookOver { stored: new, dead } if fx.capabilities.checked_acquire => {
            assert_eq!(dead, stored);
            assert_eq!(new.owner_hash, second.owner_hash);
            if fx.capabilities.fencing {
                assert!(new.fencing_token > stored.fencing_token);
            }
            assert_eq!(b.read(&key).await.expect("read"), Some(new));
        }
        AcquireDecision::Held(holder) if !fx.capabilities.checked_acquire => {
            assert_eq!(holder, stored);
            assert_eq!(b.read(&key).await.expect("read"), Some(stored));
        }
        other => panic!("a key held by a dead process: {other:?}"),
    }
    Verdict::Passed
}

/// `read_many` answers what `read` answers, key by key and in order, a corrupt record being
/// that key's own error; duplicates and an empty list included.
pub async fn backend_read_many_answers_each_key(fx: &Fixture) -> Verdict {
    let b = fx.backend().await;
    let (x, y, free) = (fx.key("many-x"), fx.key("many-y"), fx.key("many-free"));
    let stored_x = must_acquire(&*b, &x, &record(&x, 1)).await;
    let stored_y = must_acquire(&*b, &y, &record(&y, 2)).await;
    let mut keys = vec![x.as_str(), free.as_str(), y.as_str(), x.as_str()];
    let corrupt = fx.key("many-corrupt");
    if let Some(raw) = &fx.raw {
        raw.put_lock_raw(&corrupt, "not a record", TTL)
            .await
            .expect("write raw");
        keys.push(corrupt.as_str());
    }
    let found = b.read_many(&keys).await.expect("read_many");
    assert_eq!(found.len(), keys.len());
    let ok = |i: usize| found[i].as_ref().expect("a record or none").clone();
    assert_eq!(ok(0), Some(stored_x.clone()));
    assert_eq!(ok(1), None);
    assert_eq!(ok(2), Some(stored_y));
    assert_eq!(ok(3), Some(stored_x));
    if fx.raw.is_some() {
        let e = found[4].as_ref().expect_err("corrupt");
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    }
    assert!(b.read_many(&[]).await.expect("read_many").is_empty());
    // Many keys at once (more than one chunk of a store that splits them).
    let many: Vec<String> = (0..1500).map(|i| fx.key(&format!("many-{i}"))).collect();
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    let found = b.read_many(&refs).await.expect("read_many");
    assert_eq!(found.len(), many.len());
    assert!(found.iter().all(|r| matches!(r, Ok(None))));
    Verdict::Passed
}

/// A lock that is not extended expires after its TTL (by the store's clock).
pub async fn backend_lock_ttl_expiry(fx: &Fixture) -> Verdict {
    let b = fx.backend().await;
    let key = fx.key("expiry");
    let ttl = fx.timing.short_lock_ttl;
    let mine = record(&key, 1);
    match b.acquire(&key, &mine, ttl).await.expect("acquire") {
        AcquireOutcome::Acquired(_) => {}
        AcquireOutcome::Held(h) => panic!("held by {}", h.owner_hash),
    }
    tokio::time::sleep(ttl / 4).await;
    assert!(b.read(&key).await.expect("read").is_some(), "expired early");
    tokio::time::sleep(fx.timing.expiry_of(ttl)).await;
    assert_eq!(b.read(&key).await.expect("read"), None, "did not expire");
    let outcome = b
        .extend(&key, &mine, ttl, &mine.owner_hash)
        .await
        .expect("extend");
    assert_eq!(
        outcome,
        ExtendOutcome::NoKey,
        "an expired lock cannot be extended"
    );
    Verdict::Passed
}

/// Liveness records are written, read back, and expire after their TTL.
pub async fn backend_liveness_write_read_expiry(fx: &Fixture) -> Verdict {
    let b = fx.backend().await;
    let process = format!("{}proc/1.2", fx.prefix.replace('/', "_"));
    assert_eq!(b.read_process(&process).await.expect("read"), None);
    let alive = ProcessData::now();
    // At least a second, so the re-arm below has room on a busy machine.
    let ttl = fx.timing.liveness_ttl.max(Duration::from_secs(1));
    b.ping(&process, &alive, ttl).await.expect("ping");
    assert_eq!(b.read_process(&process).await.expect("read"), Some(alive));
    // A second ping re-arms the TTL.
    tokio::time::sleep(ttl / 2).await;
    let later = ProcessData::now();
    b.ping(&process, &later, ttl).await.expect("ping");
    // Past the first write's expiry, well before the second's.
    tokio::time::sleep(ttl * 5 / 8).await;
    assert_eq!(
        b.read_process(&process).await.expect("read"),
        Some(later),
        "a re-armed record expired early"
    );
    tokio::time::sleep(fx.timing.expiry_of(ttl)).await;
    assert_eq!(b.read_process(&process).await.expect("read"), None);
    Verdict::Passed
}

/// `forget_process` deletes a liveness record at once, and forgetting an unknown one is fine.
pub async fn backend_forget_process(fx: &Fixture) -> Verdict {
    let b = fx.backend().await;
    let process = format!("{}forget/1.2", fx.prefix.replace('/', "_"));
    b.ping(&process, &ProcessData::now(), TTL)
        .await
        .expect("ping");
    b.forget_process(&process).await.expect("forget");
    assert_eq!(b.read_process(&process).await.expect("read"), None);
    b.forget_process(&process)
        .await
        .expect("forget an unknown process");
    Verdict::Passed
}

/// 50 concurrent acquires of one key, on separate connections: exactly one wins.
pub async fn backend_concurrent_acquires_have_one_winner(fx: &Fixture) -> Verdict {
    let key = fx.key("race");
    let mut backends = Vec::new();
    for _ in 0..5 {
        backends.push(fx.backend().await);
    }
    let attempts = (0..50u32).map(|i| {
        let b = backends[i as usize % backends.len()].clone();
        let key = key.clone();
        tokio::spawn(async move { b.acquire(&key, &record(&key, i), TTL).await })
    });
    let mut winners = Vec::new();
    let mut holders = HashSet::new();
    for r in futures::future::join_all(attempts).await {
        match r.expect("task").expect("acquire") {
            AcquireOutcome::Acquired(d) => winners.push(d.owner_hash),
            AcquireOutcome::Held(h) => {
                holders.insert(h.owner_hash);
            }
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    assert!(
        holders.iter().all(|h| *h == winners[0]),
        "losers saw other holders: {holders:?}"
    );
    Verdict::Passed
}

/// Fencing tokens strictly increase across acquire/release, expiry and take-over cycles.
pub async fn backend_fencing_tokens_strictly_increase(fx: &Fixture) -> Verdict {
    if !fx.capabilities.fencing {
        return Verdict::skip("the backend does not assign fencing tokens");
    }
    let b = fx.backend().await;
    let key = fx.key("fencing");
    let mut last = 0;
    let mut check = |d: &LockData| {
        let t = d.fencing_token.expect("fencing backend gave no token");
        assert!(t > last, "token {t} after {last}");
        last = t;
    };
    for i in 0..3 {
        let d = must_acquire(&*b, &key, &record(&key, i)).await;
        check(&d);
        assert_eq!(
            b.release(&key, &d.owner_hash).await.expect("release"),
            ReleaseOutcome::Released
        );
    }
    let ttl = fx.timing.short_lock_ttl;
    match b
        .acquire(&key, &record(&key, 10), ttl)
        .await
        .expect("acquire")
    {
        AcquireOutcome::Acquired(d) => check(&d),
        AcquireOutcome::Held(h) => panic!("held by {}", h.owner_hash),
    }
    tokio::time::sleep(fx.timing.expiry_of(ttl)).await;
    let d = must_acquire(&*b, &key, &record(&key, 11)).await;
    check(&d);
    match b
        .take_over(&key, &record(&key, 12), TTL, &d.owner_hash)
        .await
        .expect("take over")
    {
        AcquireOutcome::Acquired(d) => check(&d),
        AcquireOutcome::Held(h) => panic!("held by {}", h.owner_hash),
    }
    Verdict::Passed
}

/// Keys with `@`, `/`, `#`, `{}`, spaces, newlines, Unicode and 1 KiB length round-trip.
pub async fn backend_hostile_keys_round_trip(fx: &Fixture) -> Verdict {
    let b = fx.backend().await;
    let long = "k".repeat(1024);
    let names = [
        "at@sign",
        "a@host/1.2.3",
        "slash/ed",
        "hash#tag",
        "{braces}",
        "{",
        "with space",
        "new\nline\r\n",
        "tab\tand\"quote'",
        "ünïcødé ✓ 🔒 中文",
        long.as_str(),
    ];
    for name in names {
        let key = fx.key(name);
        let mine = record(&key, 1);
        let stored = must_acquire(&*b, &key, &mine).await;
        assert_eq!(stored.owner_hash, mine.owner_hash, "{name:?}");
        let read = b.read(&key).await.expect("read").expect("stored");
        assert_eq!(read, stored, "{name:?}");
        assert_eq!(
            b.release(&key, &mine.owner_hash).await.expect("release"),
            ReleaseOutcome::Released,
            "{name:?}"
        );
    }
    Verdict::Passed
}

/// A zero TTL is refused with a typed error rather than creating an immortal record.
pub async fn backend_zero_ttl_is_invalid_input(fx: &Fixture) -> Verdict {
    let b = fx.backend().await;
    let key = fx.key("zero-ttl");
    let mine = record(&key, 1);
    let e = b
        .acquire(&key, &mine, Duration::ZERO)
        .await
        .expect_err("zero TTL accepted");
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    let e = b
        .ping("conformance-host/1.1", &ProcessData::now(), Duration::ZERO)
        .await
        .expect_err("zero TTL accepted");
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert_eq!(b.read(&key).await.expect("read"), None);
    Verdict::Passed
}

/// A stored value that is not a lock record gives a typed "corrupt" error on every call that
/// reads it, never a panic, and is never overwritten by an acquire.
pub async fn backend_corrupt_record_is_a_typed_error(fx: &Fixture) -> Verdict {
    let Some(raw) = &fx.raw else {
        return Verdict::skip("the setup gives no raw access to the store");
    };
    let b = fx.backend().await;
    for (i, garbage) in [
        "not json",
        "{\"ownerHash\":",
        "[1,2,3]",
        "{\"foo\":\"bar\"}",
        "\"just a string\"",
        "{\"ownerHash\":42,\"processHash\":\"p\"}",
        "CLAIMS_MINE",
    ]
    .into_iter()
    .enumerate()
    {
        let key = fx.key(&format!("corrupt-{i}"));
        let mine = record(&key, 1);
        // A value that names the caller as owner but is not a whole record is not ours either.
        let claims_mine = format!("{{\"ownerHash\":{:?}}}", mine.owner_hash);
        let garbage = if garbage == "CLAIMS_MINE" {
            claims_mine.as_str()
        } else {
            garbage
        };
        raw.put_lock_raw(&key, garbage, TTL)
            .await
            .expect("write raw");
        let corrupt = |r: locker_core::Result<()>, what: &str| {
            let e = r.expect_err(&format!("{what} accepted {garbage:?}"));
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{what} on {garbage:?}: {e}");
        };
        corrupt(b.read(&key).await.map(drop), "read");
        corrupt(b.acquire(&key, &mine, TTL).await.map(drop), "acquire");
        corrupt(
            b.extend(&key, &mine, TTL, &mine.owner_hash).await.map(drop),
            "extend",
        );
        corrupt(b.release(&key, &mine.owner_hash).await.map(drop), "release");
        corrupt(
            b.take_over(&key, &mine, TTL, "nobody").await.map(drop),
            "take_over",
        );
        assert_eq!(
            raw.get_lock_raw(&key).await.expect("read raw").as_deref(),
            Some(garbage),
            "a corrupt record was overwritten"
        );
    }
    Verdict::Passed
}

/// Fields written by other versions survive an extension (read-modify-write).
pub async fn backend_unknown_fields_survive_extend(fx: &Fixture) -> Verdict {
    let Some(raw) = &fx.raw else {
        return Verdict::skip("the setup gives no raw access to the store");
    };
    let b = fx.backend().await;
    let key = fx.key("unknown-fields");
    let mine = record(&key, 1);
    let stored = must_acquire(&*b, &key, &mine).await;
    let mut json: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&raw.get_lock_raw(&key).await.expect("raw").expect("stored"))
            .expect("the stored record is a JSON object");
    json.insert("futureField".into(), serde_json::json!({"nested": [1, 2]}));
    let json = serde_json::Value::Object(json).to_string();
    raw.put_lock_raw(&key, &json, TTL).await.expect("write raw");
    let read = b.read(&key).await.expect("read").expect("stored");
    assert!(read.extra.contains_key("futureField"), "{read:?}");
    match b
        .extend(&key, &read.extended_now(), TTL, &stored.owner_hash)
        .await
        .expect("extend")
    {
        ExtendOutcome::Extended(_) => {}
        other => panic!("{other:?}"),
    }
    let after = raw.get_lock_raw(&key).await.expect("raw").expect("stored");
    assert!(
        after.contains("\"futureField\":{\"nested\":[1,2]}"),
        "unknown field lost: {after}"
    );
    Verdict::Passed
}

/// Records carry the client's wall-clock times, but TTLs are the store's: a client whose clock
/// is minutes off can neither steal a live lock nor keep a dead one.
pub async fn backend_client_clock_skew_changes_nothing(fx: &Fixture) -> Verdict {
    let b = fx.backend().await;
    let skewed = |key: &str, n: u32, minutes: i64| {
        let mut d = record(key, n);
        d.acquired_at += chrono::Duration::minutes(minutes);
        d.extended_at += chrono::Duration::minutes(minutes);
        d
    };
    // A live lock, and a client 10 minutes ahead (whose records look newer) or behind.
    let key = fx.key("skew-live");
    let holder = must_acquire(&*b, &key, &record(&key, 1)).await;
    for minutes in [10, -10] {
        match b
            .acquire(&key, &skewed(&key, 2, minutes), TTL)
            .await
            .expect("acquire")
        {
            AcquireOutcome::Held(h) => assert_eq!(h.owner_hash, holder.owner_hash),
            AcquireOutcome::Acquired(_) => panic!("a skewed clock ({minutes} min) stole a lock"),
        }
    }
    // A dead lock, written by a client 10 minutes behind (its records look old) or ahead
    // (they look fresh): it expires by the store's clock all the same.
    for minutes in [-10, 10] {
        let key = fx.key(&format!("skew-dead{minutes}"));
        let ttl = fx.timing.short_lock_ttl;
        let late = skewed(&key, 3, minutes);
        match b.acquire(&key, &late, ttl).await.expect("acquire") {
            AcquireOutcome::Acquired(_) => {}
            AcquireOutcome::Held(h) => panic!("held by {}", h.owner_hash),
        }
        tokio::time::sleep(fx.timing.expiry_of(ttl)).await;
        let outcome = b
            .extend(&key, &late.extended_now(), ttl, &late.owner_hash)
            .await
            .expect("extend");
        assert_eq!(
            outcome,
            ExtendOutcome::NoKey,
            "a skewed clock ({minutes} min) kept a dead lock"
        );
        must_acquire(&*b, &key, &record(&key, 4)).await;
    }
    Verdict::Passed
}
