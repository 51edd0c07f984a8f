//! A locker on the application's own `redis::Client`, or its own `fred` configuration (issue
//! 19): the conformance cases pass, the liveness reporter included, on its own connection
//! while the jobs' runtime is blocked.

use locker_conformance::servers::{self, ServerKind};
use locker_conformance::{run_case, Setup, Verdict};
use locker_redis::RedisConfig;

#[cfg(feature = "redis")]
#[test]
fn a_locker_on_the_applications_client() {
    let server = servers::shared(ServerKind::Redis).unwrap_or_else(|e| panic!("{e}"));
    for case in [
        "locker_acquire_release_and_owner_status",
        "locker_takeover_after_the_owner_process_dies",
        "locker_seppuku_after_a_takeover",
        "locker_blocked_runtime_keeps_its_lock",
        "wait_acquires_after_release",
    ] {
        let verdict = run_case("redis_app_client", case, async {
            let client = redis::Client::open(server.url()).expect("the application's client");
            let config = RedisConfig::builder()
                .redis_client(client)
                .key_prefix("app-client:")
                .build()
                .expect("config");
            Setup::new("redis-app-client", config)
        });
        assert_eq!(verdict, Verdict::Passed, "{case}");
    }
}

#[cfg(feature = "redis")]
#[test]
fn a_client_is_one_standalone_server() {
    let client = redis::Client::open("redis://127.0.0.1:6379").expect("client");
    for builder in [
        RedisConfig::builder()
            .redis_client(client.clone())
            .cluster(true),
        RedisConfig::builder()
            .redis_client(client.clone())
            .node("127.0.0.1", 6380),
        // Set after the client, which says database 0: it would not be used.
        RedisConfig::builder()
            .redis_client(client.clone())
            .database(3),
    ] {
        let e = builder.build().expect_err("refused");
        assert_eq!(e.kind(), locker_core::ErrorKind::InvalidInput, "{e}");
    }
}

#[cfg(feature = "fred")]
#[test]
fn a_locker_on_the_applications_fred_config() {
    let server = servers::shared(ServerKind::Redis).unwrap_or_else(|e| panic!("{e}"));
    for case in [
        "locker_acquire_release_and_owner_status",
        "locker_takeover_after_the_owner_process_dies",
        "locker_blocked_runtime_keeps_its_lock",
        "wait_acquires_after_release",
    ] {
        let verdict = run_case("fred_app_config", case, async {
            let fred = fred::types::config::Config::from_url(server.url()).expect("fred's config");
            let config = RedisConfig::builder()
                .fred_config(fred)
                .key_prefix("app-fred:")
                .build()
                .expect("config");
            Setup::new("fred-app-config", config)
        });
        assert_eq!(verdict, Verdict::Passed, "{case}");
    }
}
