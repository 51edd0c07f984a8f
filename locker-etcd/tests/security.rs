//! etcd over TLS, with a certificate made for the test, and with authentication: a lock cycle
//! works; an untrusted certificate, plain HTTP against a TLS port and a wrong password fail
//! promptly with typed errors, and the password never shows in them.

use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, Permission};
use locker_conformance::servers::{self, Server, TestPki};
use locker_core::{BackendFactory, ErrorKind};
use locker_etcd::EtcdConfig;

fn port(server: &Server) -> u16 {
    server
        .url()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port")
}

fn builder(server: &Server, tls: bool) -> locker_etcd::EtcdConfigBuilder {
    EtcdConfig::builder()
        .tls(tls)
        .endpoint("127.0.0.1", port(server))
        .connect_timeout(Duration::from_secs(2))
        .command_timeout(Duration::from_secs(3))
}

/// A full cycle through a locker over `config` (see [`locker_conformance::lock_cycle`]).
async fn lock_cycle(config: EtcdConfig, key: &str) {
    locker_conformance::lock_cycle(std::sync::Arc::new(config), key).await;
}

/// Connecting with `config` fails within 10 s; the error's kind.
async fn connect_fails(config: EtcdConfig) -> locker_core::Error {
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(30), config.connect())
        .await
        .expect("an answer within 30 s, not a hang");
    let e = match result {
        Ok(_) => panic!("connected"),
        Err(e) => e,
    };
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}: {e}",
        started.elapsed()
    );
    e
}

fn tls_server(pki: &TestPki) -> Server {
    let path = |p: std::path::PathBuf| p.display().to_string();
    servers::start_etcd_with(
        [
            format!("--cert-file={}", path(pki.cert_file())),
            format!("--key-file={}", path(pki.key_file())),
        ],
        true,
    )
    .expect("etcd with TLS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_trusted_ca() {
    let pki = TestPki::generate().expect("certificates");
    let server = tls_server(&pki);
    assert!(server.url().starts_with("https://"), "{}", server.url());
    let config = builder(&server, true)
        .ca_certificate_pem(pki.ca_pem())
        .build()
        .expect("config");
    assert!(config.to_string().starts_with("etcds://"), "{config}");
    lock_cycle(config, "tls").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_an_untrusted_certificate_fails_promptly() {
    let pki = TestPki::generate().expect("certificates");
    let server = tls_server(&pki);
    // The system's roots do not know the test's CA: a configuration error, not retried.
    let e = connect_fails(builder(&server, true).build().expect("config")).await;
    assert_eq!(e.kind(), ErrorKind::Auth, "{e}");
    assert!(!e.is_retryable(), "{e}");
    // Nor does another CA.
    let other = TestPki::generate().expect("certificates");
    let e = connect_fails(
        builder(&server, true)
            .ca_certificate_pem(other.ca_pem())
            .build()
            .expect("config"),
    )
    .await;
    assert_eq!(e.kind(), ErrorKind::Auth, "{e}");
    // Plain HTTP against the TLS port: the transport fails (which, in general, may pass).
    let e = connect_fails(builder(&server, false).build().expect("config")).await;
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication() {
    let server = servers::start_etcd_with(Vec::<String>::new(), false).expect("etcd");
    let endpoint = server.url().to_owned();
    // Users as an operator would set them up: root, and a user for the locker.
    let mut admin = Client::connect([endpoint.as_str()], None)
        .await
        .expect("connect");
    admin
        .user_add("root", "r00t-secret", None)
        .await
        .expect("root");
    admin
        .user_grant_role("root", "root")
        .await
        .expect("root role");
    admin.role_add("locker").await.expect("role");
    admin
        .role_grant_permission("locker", Permission::read_write("").with_from_key())
        .await
        .expect("permission");
    admin
        .user_add("alice", "s3cret/with@odd#chars", None)
        .await
        .expect("alice");
    admin
        .user_grant_role("alice", "locker")
        .await
        .expect("alice's role");
    admin.auth_enable().await.expect("auth enable");

    // Without credentials, a request is refused.
    let mut anonymous = Client::connect([endpoint.as_str()], None)
        .await
        .expect("connect");
    assert!(anonymous.get("k", None).await.is_err());

    let good = builder(&server, false)
        .user("alice", "s3cret/with@odd#chars")
        .build()
        .expect("config");
    assert!(!format!("{good} {good:?}").contains("s3cret"));
    lock_cycle(good, "auth").await;

    let bad = builder(&server, false)
        .user("alice", "wrong-password-value")
        .build()
        .expect("config");
    let e = connect_fails(bad).await;
    assert_eq!(e.kind(), ErrorKind::Auth, "{e}");
    assert!(!e.is_retryable(), "{e}");
    assert!(
        !format!("{e} {e:?}").contains("wrong-password-value"),
        "{e:?}"
    );

    // Checked with the root user too, so the test's own setup is known to be right.
    let options = ConnectOptions::new().with_user("root", "r00t-secret");
    let mut root = Client::connect([endpoint.as_str()], Some(options))
        .await
        .expect("root connects");
    root.get("k", None).await.expect("root reads");
}
