//! A cluster none of whose endpoints accepts a connection fails at once, naming them; a
//! locker's start ends on it without waiting for its timeout.

use std::time::Duration;

use locker_core::{ErrorKind, Locker};
use locker_etcd::{EtcdBackend, EtcdConfig};

/// Well under the client's connect wait (twice the 5 s connect timeout) and the locker's start
/// timeout (60 s here): a call that returns within it did not wait for either.
const NOT_WAITED: Duration = Duration::from_secs(5);

#[tokio::test]
async fn refused_ports_are_a_definite_retryable_error_naming_the_addresses() {
    let config = EtcdConfig::from_url("etcd://127.0.0.1:1").expect("url");
    let e = tokio::time::timeout(NOT_WAITED, EtcdBackend::connect(&config))
        .await
        .expect("connect waited for its timeout")
        .expect_err("nothing listens on port 1");
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable() && e.is_definite(), "{e:?}");
    assert!(
        e.to_string().contains("connection refused by 127.0.0.1:1"),
        "{e}"
    );

    let two = EtcdConfig::from_url("etcd://127.0.0.1:1,127.0.0.1:2").expect("url");
    let e = tokio::time::timeout(NOT_WAITED, EtcdBackend::connect(&two))
        .await
        .expect("connect waited for its timeout")
        .expect_err("nothing listens on ports 1 and 2");
    assert!(
        e.to_string()
            .contains("connection refused by 127.0.0.1:1, 127.0.0.1:2"),
        "{e}"
    );

    let locker = Locker::builder(config)
        .reporter_start_timeout(Duration::from_secs(60))
        .build()
        .expect("valid options");
    for e in [
        tokio::time::timeout(NOT_WAITED, locker.ready())
            .await
            .expect("ready waited for the start timeout")
            .expect_err("refused"),
        tokio::time::timeout(NOT_WAITED, locker.acquire("job"))
            .await
            .expect("acquire waited for the start timeout")
            .expect_err("refused"),
    ] {
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert!(e.to_string().contains("connection refused"), "{e}");
    }
    locker.abandon().await;
}
