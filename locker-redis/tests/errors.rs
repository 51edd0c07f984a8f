//! A refused port fails a locker's start at once, with a retryable, definite error, whichever
//! client library talks to the server.

use locker_conformance::start::{fails_at_once, locker_with_long_start};
use locker_core::ErrorKind;
use locker_redis::RedisConfig;

async fn refused_at_once(url: &str) {
    let config = RedisConfig::from_url(url).expect("url");
    let locker = locker_with_long_start(config);
    let e = fails_at_once(&format!("{url}: ready"), locker.ready()).await;
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
