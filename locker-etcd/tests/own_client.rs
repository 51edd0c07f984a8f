//! A locker on the application's own etcd client (issue 19): the conformance cases pass on it,
//! and the liveness reporter, on a client of its own, keeps writing while the jobs' runtime
//! (where the application's client lives) is blocked.

/// In a module named `etcd`, so that `scripts/test` runs them beside the other tests, with
/// the etcd suites.
mod etcd {
    use std::time::Duration;

    use etcd_client::{Client, ConnectOptions};
    use locker_conformance::servers::{self, ServerKind};
    use locker_conformance::{run_case, Setup, Verdict};
    use locker_core::{LockAttempt, Locker};
    use locker_etcd::EtcdConfig;

    #[test]
    fn a_locker_on_the_applications_client() {
        let server = servers::shared(ServerKind::Etcd).unwrap_or_else(|e| panic!("{e}"));
        for case in [
            "locker_acquire_release_and_owner_status",
            "locker_takeover_after_the_owner_process_dies",
        ] {
            let verdict = run_case("etcd_app_client", case, async {
                let base = EtcdConfig::from_url(server.url()).expect("url");
                let options = ConnectOptions::new();
                let client = Client::connect(base.endpoints(), Some(options.clone()))
                    .await
                    .expect("the application's client");
                let config = base
                    .into_builder()
                    .client(client)
                    .connect_options(options)
                    .prefix("app-client/")
                    .build()
                    .expect("config");
                Setup::new("etcd-app-client", config)
            });
            assert_eq!(verdict, Verdict::Passed, "{case}");
        }
    }

    /// The application's client lives on a runtime that its thread then blocks: a reporter that
    /// used it would stop writing, and another locker would take the lock over.
    #[test]
    fn the_reporter_does_not_use_the_applications_client() {
        let server = servers::shared(ServerKind::Etcd).unwrap_or_else(|e| panic!("{e}"));
        let liveness = Duration::from_secs(2);
        let base = EtcdConfig::from_url(server.url())
            .expect("url")
            .into_builder()
            .prefix("app-client-blocked/")
            .build()
            .expect("config");
        let builder = move |config: EtcdConfig| {
            Locker::builder(config)
                .report_every(Duration::from_millis(400))
                .liveness_ttl(liveness)
                .recheck_every(Duration::from_millis(500))
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let app = {
            let base = base.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async {
                    let client = Client::connect(base.endpoints(), None)
                        .await
                        .expect("the application's client");
                    let config = base.into_builder().client(client).build().expect("config");
                    let locker = builder(config).build().expect("locker");
                    let guard = match locker.acquire("blocked").await.expect("acquire") {
                        LockAttempt::Acquired(guard) => guard,
                        LockAttempt::Held(h) => panic!("held by {}", h.owner_hash),
                    };
                    tx.send(()).expect("signal");
                    // The application's runtime, and its client with it, stand still.
                    std::thread::sleep(liveness * 3);
                    let beat = guard.heartbeat().beat().await;
                    let _ = guard.release().await;
                    locker.shutdown().await;
                    beat
                })
            })
        };
        rx.recv().expect("acquired");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let other = builder(base).build().expect("locker");
            tokio::time::sleep(liveness * 2).await;
            match other.acquire("blocked").await.expect("acquire") {
                LockAttempt::Held(_) => {}
                LockAttempt::Acquired(_) => panic!(
                    "the lock was taken over: the reporter stopped with the application's runtime"
                ),
            }
            other.shutdown().await;
        });
        app.join()
            .expect("application thread")
            .expect("the lock is still held after the block");
    }
}
