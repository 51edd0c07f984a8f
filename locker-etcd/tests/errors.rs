//! A cluster none of whose endpoints accepts a connection fails at once, naming them; a
//! locker's start ends on it without waiting for its timeout.

use locker_conformance::start::{fails_at_once, locker_with_long_start};
use locker_core::ErrorKind;
use locker_etcd::{EtcdBackend, EtcdConfig};

#[tokio::test]
async fn refused_ports_are_a_definite_retryable_error_naming_the_addresses() {
    let config = EtcdConfig::from_url("etcd://127.0.0.1:1").expect("url");
    let e = fails_at_once("connect", EtcdBackend::connect(&config)).await;
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable() && e.is_definite(), "{e:?}");
    assert!(
        e.to_string().contains("connection refused by 127.0.0.1:1"),
        "{e}"
    );

    let two = EtcdConfig::from_url("etcd://127.0.0.1:1,127.0.0.1:2").expect("url");
    let e = fails_at_once("connect", EtcdBackend::connect(&two)).await;
    assert!(
        e.to_string()
            .contains("connection refused by 127.0.0.1:1, 127.0.0.1:2"),
        "{e}"
    );

    let locker = locker_with_long_start(config);
    for e in [
        fails_at_once("ready", locker.ready()).await,
        fails_at_once("acquire", locker.acquire("job")).await,
    ] {
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert!(e.to_string().contains("connection refused"), "{e}");
    }
    locker.abandon().await;
}
