//! Connect errors name their cause at once, with a kind that says whether a retry can help;
//! a locker's start ends on them without waiting for its timeout.

use std::time::Duration;

use locker_conformance::servers::{self, ServerKind};
use locker_conformance::start::{fails_at_once, locker_with_long_start};
use locker_core::ErrorKind;
use locker_postgres::{PostgresBackend, PostgresConfig};

fn config(url: &str) -> PostgresConfig {
    PostgresConfig::from_url(url)
        .expect("url")
        .into_builder()
        .connect_timeout(Duration::from_secs(30))
        .build()
        .expect("config")
}

#[tokio::test]
async fn a_refused_port_is_a_definite_retryable_error_naming_the_address() {
    let config = config("postgres://u@127.0.0.1:1/db");
    let e = fails_at_once("connect", PostgresBackend::connect(&config)).await;
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable() && e.is_definite(), "{e:?}");
    assert!(
        e.to_string().contains("connection refused by 127.0.0.1:1"),
        "{e}"
    );

    let locker = locker_with_long_start(config);
    let e = fails_at_once("ready", locker.ready()).await;
    assert!(
        e.to_string().contains("connection refused by 127.0.0.1:1"),
        "{e}"
    );
    let e = fails_at_once("acquire", locker.acquire("job")).await;
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    locker.abandon().await;
}

#[tokio::test]
async fn a_database_that_does_not_exist_is_invalid_input() {
    let server = servers::shared(ServerKind::Postgres).unwrap_or_else(|e| panic!("{e}"));
    let mut url = url_without_database(server.url());
    url.push_str("/no_such_database_for_locker");
    let e = fails_at_once("connect", PostgresBackend::connect(&config(&url))).await;
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(!e.is_retryable());
    assert!(e.to_string().contains("no_such_database_for_locker"), "{e}");
}

/// `postgres://user@host:port/db?query` without `/db?query`.
fn url_without_database(url: &str) -> String {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let end = url[after_scheme..]
        .find(['/', '?'])
        .map_or(url.len(), |i| after_scheme + i);
    url[..end].to_owned()
}
