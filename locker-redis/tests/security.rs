//! TLS with a certificate made for the test, and ACL users: a wrong password is an auth error,
//! not a hang, and never shows in errors.

use std::time::{Duration, Instant};

use locker_conformance::servers;
use locker_core::{BackendFactory, ErrorKind};
use locker_redis::{ClientLibrary, RedisConfig};

fn clients() -> Vec<ClientLibrary> {
    vec![
        #[cfg(feature = "redis")]
        ClientLibrary::Redis,
        #[cfg(feature = "fred")]
        ClientLibrary::Fred,
    ]
}

/// A full cycle through a locker over `config` (see [`locker_conformance::lock_cycle`]).
async fn lock_cycle(config: RedisConfig, key: &str) {
    locker_conformance::lock_cycle(std::sync::Arc::new(config), key).await;
}

/// The CA and certificate of a test, and the `redis-server` flags that serve them.
fn pki() -> (servers::TestPki, Vec<String>) {
    let pki = servers::TestPki::generate().expect("certificates");
    let path = |p: std::path::PathBuf| p.display().to_string();
    let args = vec![
        "--tls-cert-file".into(),
        path(pki.cert_file()),
        "--tls-key-file".into(),
        path(pki.key_file()),
        "--tls-ca-cert-file".into(),
        path(pki.ca_file()),
        "--tls-auth-clients".into(),
        "no".into(),
    ];
    (pki, args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_self_signed_certificate() {
    let (pki, args) = pki();
    let server = servers::start_redis_with(&args, true).expect("TLS redis-server");
    assert!(server.url().starts_with("rediss://"));
    for client in clients() {
        let config = RedisConfig::from_url(server.url())
            .expect("url")
            .into_builder()
            .root_certificate_pem(pki.ca_pem().to_owned())
            .client(client)
            .build()
            .expect("config");
        lock_cycle(config, &format!("tls-{client:?}")).await;

        // Without our CA the server's certificate is refused: an error, promptly.
        let untrusted = RedisConfig::from_url(server.url())
            .expect("url")
            .into_builder()
            .client(client)
            .connect_timeout(Duration::from_secs(2))
            .build()
            .expect("config");
        let started = Instant::now();
        let refused = match untrusted.connect().await {
            Err(e) => e,
            Ok(b) => b.read("k").await.expect_err("an untrusted server answered"),
        };
        assert!(started.elapsed() < Duration::from_secs(20), "{refused}");
        assert_ne!(refused.kind(), ErrorKind::Corrupt, "{refused}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_user_and_password() {
    let server = servers::start_redis_with(
        [
            "--user",
            "default",
            "off",
            "--user",
            "locker",
            "on",
            ">s3cret-pw",
            "~*",
            "&*",
            "+@all",
        ],
        false,
    )
    .expect("redis-server with ACLs");
    let port = server.url().rsplit(':').next().expect("port").to_owned();
    for client in clients() {
        let good = RedisConfig::from_url(&format!("redis://locker:s3cret-pw@127.0.0.1:{port}"))
            .expect("url")
            .with_client(client);
        lock_cycle(good, &format!("acl-{client:?}")).await;

        for url in [
            format!("redis://locker:wrong-pw@127.0.0.1:{port}"),
            format!("redis://127.0.0.1:{port}"),
        ] {
            let bad = RedisConfig::from_url(&url)
                .expect("url")
                .into_builder()
                .client(client)
                .connect_timeout(Duration::from_secs(2))
                .build()
                .expect("config");
            let started = Instant::now();
            let e = match bad.connect().await {
                Err(e) => e,
                Ok(b) => b
                    .read("k")
                    .await
                    .expect_err("read without the right password"),
            };
            assert!(started.elapsed() < Duration::from_secs(20), "hung: {e}");
            assert_eq!(e.kind(), ErrorKind::Auth, "{client:?} {url}: {e}");
            assert!(!e.is_retryable());
            let shown = format!("{e} {e:?}");
            assert!(
                !shown.contains("wrong-pw") && !shown.contains("s3cret"),
                "{shown}"
            );
        }
    }
}
