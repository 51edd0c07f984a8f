//! Release notifications on a standalone server, both clients (the conformance suite wakes
//! waiters on a cluster too): a release publishes on the lock key's channel and wakes a waiter;
//! a broken pub/sub connection is made again (and its waiters woken); a release that publishes
//! nothing (a Node worker's, or a raw `DEL`) is found by the fallback poll; without release
//! events, waiters poll.

mod common;
use common::{command_calls, private_redis};

use std::time::Duration;

use locker_conformance::cases::acquired;
use locker_conformance::servers::{self, ServerKind};
use locker_core::{LockBackend, LockGuard, Locker, Wait};
use locker_redis::{ClientLibrary, RedisBackend, RedisConfig};

/// A test that waits this long has failed.
const PATIENCE: Duration = Duration::from_secs(20);

fn config(client: ClientLibrary) -> RedisConfig {
    let server = servers::shared(ServerKind::Redis).unwrap_or_else(|e| panic!("{e}"));
    RedisConfig::from_url(server.url())
        .expect("url")
        .into_builder()
        .client(client)
        .key_prefix("notify:")
        .build()
        .expect("config")
}

fn locker(config: &RedisConfig, recheck_every: Duration) -> Locker {
    Locker::builder(config.clone())
        .recheck_every(recheck_every)
        .build()
        .expect("locker")
}

/// A task waiting for `key` on `b`.
fn start_waiter(
    b: &Locker,
    key: &str,
    wait: Wait,
) -> tokio::task::JoinHandle<locker_core::Result<LockGuard>> {
    let (b, key) = (b.clone(), key.to_owned());
    tokio::spawn(async move { b.acquire_wait(key.as_str(), wait).await })
}

/// The guard a waiter got, or a failure saying `why` it should have come.
async fn waited(
    waiter: tokio::task::JoinHandle<locker_core::Result<LockGuard>>,
    why: &str,
) -> LockGuard {
    tokio::time::timeout(PATIENCE, waiter)
        .await
        .expect(why)
        .expect("task")
        .expect("acquire_wait")
}

fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{name}-{nanos}")
}

/// Kills the server's pub/sub connections; the notifier opens a new one, subscribes again and
/// wakes its waiters, so a release after that still wakes a waiter that never polls.
async fn a_broken_subscription_is_made_again(client: ClientLibrary) {
    let config = config(client);
    assert!(
        RedisBackend::connect(&config)
            .await
            .expect("connect")
            .capabilities()
            .release_events
    );
    let (a, b) = (
        locker(&config, Duration::from_secs(5)),
        locker(&config, Duration::from_secs(5)),
    );
    let key = unique("broken");
    let guard = acquired(&a, &key).await;
    let waiter = start_waiter(
        &b,
        &key,
        Wait::forever().backoff(|_| Duration::from_secs(3600)),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut redis = common::shared_connection().await;
    let killed: u64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut redis)
        .await
        .expect("client kill");
    assert!(killed >= 1, "no pub/sub connection to kill");
    // The notifier reconnects within a second or two.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!waiter.is_finished(), "acquired a held lock");
    let _ = guard.release().await.expect("release");
    let got = waited(waiter, "woken after the pub/sub connection was made again").await;
    let _ = got.release().await.expect("release");
    a.shutdown().await;
    b.shutdown().await;
}

/// A lock deleted by a process that publishes nothing (as a Node worker's release) is found by
/// the fallback poll, every `recheck_every`.
async fn a_silent_release_is_found_by_the_poll(client: ClientLibrary) {
    let config = config(client);
    let (a, b) = (
        locker(&config, Duration::from_millis(200)),
        locker(&config, Duration::from_millis(200)),
    );
    let key = unique("silent");
    let guard = acquired(&a, &key).await;
    let lock_key = RedisBackend::connect(&config)
        .await
        .expect("connect")
        .lock_key(&key);
    let waiter = start_waiter(&b, &key, Wait::forever());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut redis = common::shared_connection().await;
    let deleted: u64 = redis::cmd("DEL")
        .arg(&lock_key)
        .query_async(&mut redis)
        .await
        .expect("del");
    assert_eq!(deleted, 1);
    let got = waited(waiter, "found by the fallback poll").await;
    drop(guard);
    let _ = got.release().await.expect("release");
    a.shutdown().await;
    b.shutdown().await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_rs_makes_a_broken_subscription_again() {
    a_broken_subscription_is_made_again(ClientLibrary::Redis).await;
}

#[cfg(feature = "fred")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fred_makes_a_broken_subscription_again() {
    a_broken_subscription_is_made_again(ClientLibrary::Fred).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_rs_finds_a_silent_release_by_polling() {
    a_silent_release_is_found_by_the_poll(ClientLibrary::Redis).await;
}

#[cfg(feature = "fred")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fred_finds_a_silent_release_by_polling() {
    a_silent_release_is_found_by_the_poll(ClientLibrary::Fred).await;
}

/// With `release_events=false` the scripts publish nothing, no pub/sub connection is opened,
/// and waiters poll.
async fn without_release_events_waiters_poll(client: ClientLibrary) {
    let config = config(client)
        .into_builder()
        .release_events(false)
        .build()
        .expect("config");
    let backend = RedisBackend::connect(&config).await.expect("connect");
    assert!(!backend.capabilities().release_events);
    assert!(backend.watch_release("k").await.expect("watch").is_none());
    let (a, b) = (
        locker(&config, Duration::from_millis(200)),
        locker(&config, Duration::from_millis(200)),
    );
    let key = unique("no-events");
    let guard = acquired(&a, &key).await;
    let waiter = start_waiter(&b, &key, Wait::forever());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = guard.release().await.expect("release");
    let got = waited(waiter, "found by polling").await;
    let _ = got.release().await.expect("release");
    a.shutdown().await;
    b.shutdown().await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_rs_without_release_events_polls() {
    without_release_events_waiters_poll(ClientLibrary::Redis).await;
}

#[cfg(feature = "fred")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fred_without_release_events_polls() {
    without_release_events_waiters_poll(ClientLibrary::Fred).await;
}

/// An ACL user without channel rights (Redis 7's default for new users): releases still
/// succeed (the script's `PUBLISH` is refused and ignored), and waiters poll.
async fn a_user_without_channel_rights_releases_and_polls(client: ClientLibrary) {
    let user = format!("nochan-{}", unique("u").rsplit('-').next().unwrap_or("0"));
    let mut redis = common::shared_connection().await;
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user)
        .arg("on")
        .arg(">secret")
        .arg("~*")
        .arg("+@all")
        .arg("resetchannels")
        .query_async(&mut redis)
        .await
        .expect("acl setuser");
    let config = config(client)
        .into_builder()
        .username(&user)
        .password("secret")
        .build()
        .expect("config");
    let (a, b) = (
        locker(&config, Duration::from_millis(200)),
        locker(&config, Duration::from_millis(200)),
    );
    let key = unique("nochan");
    let guard = acquired(&a, &key).await;
    let waiter = start_waiter(&b, &key, Wait::forever());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        guard.release().await.expect("the release succeeds"),
        locker_core::ReleaseOutcome::Released
    );
    let got = waited(waiter, "found by polling").await;
    let _ = got.release().await.expect("release");
    a.shutdown().await;
    b.shutdown().await;
    let _: () = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(&user)
        .query_async(&mut redis)
        .await
        .expect("acl deluser");
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_rs_user_without_channel_rights() {
    a_user_without_channel_rights_releases_and_polls(ClientLibrary::Redis).await;
}

#[cfg(feature = "fred")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fred_user_without_channel_rights() {
    a_user_without_channel_rights_releases_and_polls(ClientLibrary::Fred).await;
}

/// A release publishes only when someone waits (the waiters' flag): none for a lock nobody
/// waits for; one that wakes a waiter that never polls; and the waiter that loses the race
/// after a wake-up is woken again by the winner's release (its flag was set again).
async fn a_release_publishes_only_when_someone_waits(client: ClientLibrary) {
    // A server of its own: the PUBLISH count is this test's alone.
    let (_server, config, mut redis) = private_redis(client, "flag:").await;
    let never_polls = || Wait::forever().backoff(|_| Duration::from_secs(3600));
    let (a, b, c) = (
        locker(&config, Duration::from_secs(60)),
        locker(&config, Duration::from_secs(60)),
        locker(&config, Duration::from_secs(60)),
    );
    let key = unique("flag");

    let before = command_calls(&mut redis, "publish").await;
    for _ in 0..10 {
        let guard = acquired(&a, &key).await;
        let _ = guard.release().await.expect("release");
    }
    assert_eq!(
        command_calls(&mut redis, "publish").await - before,
        0,
        "releases that nobody waited for published"
    );

    let guard = acquired(&a, &key).await;
    let first = start_waiter(&b, &key, never_polls());
    let second = start_waiter(&c, &key, never_polls());
    // Both subscribed and flagged the key before their first try.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !first.is_finished() && !second.is_finished(),
        "acquired a held lock"
    );
    let _ = guard.release().await.expect("release");
    // One of them wins; the other lost its try and waits again.
    let (winner, loser) = tokio::time::timeout(PATIENCE, async {
        loop {
            if first.is_finished() {
                return (first, second);
            }
            if second.is_finished() {
                return (second, first);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("a release with waiters woke neither");
    let got = waited(winner, "woken by the release").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!loser.is_finished(), "acquired a held lock");
    let _ = got.release().await.expect("release");
    let got = waited(loser, "woken again by the winner's release").await;
    let _ = got.release().await.expect("release");
    assert!(
        command_calls(&mut redis, "publish").await - before >= 2,
        "the waiters were woken without a PUBLISH"
    );
    a.shutdown().await;
    b.shutdown().await;
    c.shutdown().await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_rs_publishes_only_when_someone_waits() {
    a_release_publishes_only_when_someone_waits(ClientLibrary::Redis).await;
}

#[cfg(feature = "fred")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fred_publishes_only_when_someone_waits() {
    a_release_publishes_only_when_someone_waits(ClientLibrary::Fred).await;
}
