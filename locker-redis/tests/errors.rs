//! A refused port fails a locker's start at once, with a retryable, definite error, whichever
//! client library talks to the server.

use std::time::Duration;

use locker_core::{ErrorKind, Locker};
use locker_redis::RedisConfig;

/// Far under the locker's start timeout (60 s here): a call that returns within it did not
/// wait for it.
const NOT_WAITED: Duration = Duration::from_secs(5);

async fn refused_at_once(url: &str) {
    let config = RedisConfig::from_url(url).expect("url");
    let locker = Locker::builder(config)
        .reporter_start_timeout(Duration::from_secs(60))
        .build()
        .expect("valid options");
    let e = tokio::time::timeout(NOT_WAITED, locker.ready())
        .await
        .unwrap_or_else(|_| panic!("{url}: ready waited for the start timeout"))
        .expect_err("nothing listens on port 1");
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{url}: {e}");
    assert!(e.is_retryable() && e.is_definite(), "{url}: {e:?}");
    assert!(e.to_string().contains("refused"), "{url}: {e}");
    locker.abandon().await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn a_refused_port_ends_the_start_at_once() {
    refused_at_once("redis://127.0.0.1:1").await;
}

#[cfg(feature = "fred")]
#[tokio::test]
async fn a_refused_port_ends_the_start_at_once_with_fred() {
    refused_at_once("redis://127.0.0.1:1?client=fred").await;
}
