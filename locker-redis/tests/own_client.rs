//! A locker on the application's own `redis::Client`, `ClusterClient` or connection manager
//! settings, or its own `fred` configuration or builder (issue 19): the conformance cases pass,
//! the liveness reporter included, on its own connection while the jobs' runtime is blocked.

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

#[cfg(feature = "redis")]
#[test]
fn a_locker_on_the_applications_cluster_client() {
    let server = servers::shared(ServerKind::RedisCluster).unwrap_or_else(|e| panic!("{e}"));
    for case in [
        "locker_acquire_release_and_owner_status",
        "locker_takeover_after_the_owner_process_dies",
        "locker_blocked_runtime_keeps_its_lock",
        // Release events are off (the client does not tell its nodes): the waiter polls.
        "wait_acquires_after_release",
    ] {
        let verdict = run_case("redis_app_cluster_client", case, async {
            let client = redis::cluster::ClusterClient::builder(server.endpoints().to_vec())
                .retries(4)
                .build()
                .expect("the application's cluster client");
            let config = RedisConfig::builder()
                .redis_cluster_client(client)
                .key_prefix("app-cluster:")
                .build()
                .expect("config");
            assert!(config.is_cluster() && !config.release_events());
            Setup::new("redis-app-cluster-client", config)
        });
        match (case, verdict) {
            (_, Verdict::Passed) if case != "wait_acquires_after_release" => {}
            // The case says so when the waiter got the lock by polling, as it must here.
            ("wait_acquires_after_release", Verdict::Skipped(why)) if why.contains("polling") => {}
            (case, verdict) => panic!("{case}: {verdict:?}"),
        }
    }
}

#[cfg(feature = "redis")]
#[test]
fn a_locker_with_the_applications_connection_manager_settings() {
    let server = servers::shared(ServerKind::Redis).unwrap_or_else(|e| panic!("{e}"));
    for case in [
        "locker_acquire_release_and_owner_status",
        "locker_blocked_runtime_keeps_its_lock",
    ] {
        let verdict = run_case("redis_app_manager_config", case, async {
            let settings = redis::aio::ConnectionManagerConfig::new()
                .set_number_of_retries(4)
                .set_max_delay(std::time::Duration::from_millis(200));
            let config = RedisConfig::from_url(server.url())
                .expect("url")
                .into_builder()
                .connection_manager_config(settings)
                .key_prefix("app-manager:")
                .build()
                .expect("config");
            Setup::new("redis-app-manager-config", config)
        });
        assert_eq!(verdict, Verdict::Passed, "{case}");
    }
}

#[cfg(feature = "redis")]
#[test]
fn a_cluster_client_is_the_whole_target() {
    let client = redis::cluster::ClusterClient::new(["redis://127.0.0.1:7000"]).expect("client");
    for builder in [
        RedisConfig::builder()
            .redis_cluster_client(client.clone())
            .node("127.0.0.1", 7001),
        RedisConfig::builder()
            .redis_cluster_client(client.clone())
            .client(locker_redis::ClientLibrary::Fred),
        RedisConfig::builder()
            .redis_cluster_client(client.clone())
            .redis_client(redis::Client::open("redis://127.0.0.1:6379").expect("client")),
    ] {
        let e = builder.build().expect_err("refused");
        assert_eq!(e.kind(), locker_core::ErrorKind::InvalidInput, "{e}");
    }
}

#[cfg(feature = "fred")]
#[test]
fn a_locker_on_the_applications_fred_builder() {
    let server = servers::shared(ServerKind::Redis).unwrap_or_else(|e| panic!("{e}"));
    for case in [
        "locker_acquire_release_and_owner_status",
        "locker_blocked_runtime_keeps_its_lock",
        "wait_acquires_after_release",
    ] {
        let verdict = run_case("fred_app_builder", case, async {
            let fred = fred::types::config::Config::from_url(server.url()).expect("fred's config");
            let mut builder = fred::types::Builder::from_config(fred);
            builder
                .with_performance_config(|p| p.max_feed_count = 100)
                .set_policy(fred::types::config::ReconnectPolicy::new_constant(0, 200));
            let config = RedisConfig::builder()
                .fred_builder(builder)
                .key_prefix("app-fred-builder:")
                .build()
                .expect("config");
            Setup::new("fred-app-builder", config)
        });
        assert_eq!(verdict, Verdict::Passed, "{case}");
    }
    // A builder that does not say where to connect.
    let e = RedisConfig::builder()
        .fred_builder(fred::types::Builder::default())
        .build()
        .expect_err("refused");
    assert_eq!(e.kind(), locker_core::ErrorKind::InvalidInput, "{e}");
}
