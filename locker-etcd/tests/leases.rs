//! Lock leases (issue 17): a try on a held key grants no lease (counted in raft entries); a
//! released lock's lease is kept and given, renewed, to the next acquire, which then has its
//! whole TTL; an expired spare is never used; a lock acquired on this connection is extended
//! and released by its creation revision, and one taken over meanwhile is left to its new
//! holder; a kept lease is renewed on one keep-alive stream, and one revoked meanwhile is not
//! used; a long lock's lease, within its second of slack, is not renewed again and still
//! outlives the lock's TTL; an acquire on a frozen server fails, and the connection recovers.

/// In a module named `etcd`, so that `scripts/test` runs them beside the other tests, with
/// the etcd suites.
mod etcd {
    use std::time::Duration;

    use etcd_client::Client;
    use locker_conformance::servers::{self, ServerKind};
    use locker_core::{AcquireOutcome, ExtendOutcome, LockBackend, LockData, ReleaseOutcome};
    use locker_etcd::{EtcdBackend, EtcdConfig};

    const TTL: Duration = Duration::from_secs(30);
    /// Below the TTL from which lock leases get a second of slack: every reuse of a kept lease
    /// renews it.
    const SHORT: Duration = Duration::from_secs(5);

    /// The tests of this file share one etcd server, and one of them counts its log entries: they
    /// run one at a time.
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    async fn backend(prefix: &str) -> (EtcdBackend, Client) {
        let server = servers::shared(ServerKind::Etcd).unwrap_or_else(|e| panic!("{e}"));
        let config = EtcdConfig::from_url(server.url())
            .expect("url")
            .into_builder()
            .prefix(prefix)
            .build()
            .expect("config");
        let backend = EtcdBackend::connect(&config).await.expect("connect");
        let client = Client::connect(config.endpoints(), None)
            .await
            .expect("client");
        (backend, client)
    }

    fn record(key: &str, n: u32) -> LockData {
        let process = format!("host/{n}.{n}");
        let owner = locker_core::new_owner_hash(key, &process, None).expect("owner");
        LockData::new(owner, process, None)
    }

    async fn acquired(b: &EtcdBackend, key: &str, data: &LockData, ttl: Duration) -> LockData {
        match b.acquire(key, data, ttl).await.expect("acquire") {
            AcquireOutcome::Acquired(stored) => stored,
            AcquireOutcome::Held(h) => panic!("{key} held by {}", h.owner_hash),
        }
    }

    /// Two acquire + release cycles of `job` (short locks): the second renews the kept lease,
    /// on a stream that then stays open.
    async fn two_cycles(b: &EtcdBackend) {
        for n in 1..3 {
            let data = record("job", n);
            acquired(b, "job", &data, SHORT).await;
            assert_eq!(
                b.release("job", &data.owner_hash).await.expect("release"),
                ReleaseOutcome::Released
            );
        }
    }

    /// The lease the lock under `key` is stored on.
    async fn lease_of(client: &mut Client, prefix: &str, key: &str) -> i64 {
        let resp = client
            .get(format!("{prefix}lock/{key}"), None)
            .await
            .expect("get");
        resp.kvs().first().expect("a lock").lease()
    }

    /// The whole seconds the server says `lease` has left (rounded down).
    async fn ttl_left(client: &mut Client, lease: i64) -> i64 {
        client
            .lease_time_to_live(lease, None)
            .await
            .expect("ttl")
            .ttl()
    }

    /// The server's raft log index: every write (a lease grant or revocation, a transaction with a
    /// write in it, even one whose comparison fails) adds an entry.
    async fn raft_index(client: &mut Client) -> u64 {
        client.status().await.expect("status").raft_index()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_try_on_a_held_key_grants_no_lease_after_the_first() {
        let _serial = SERIAL.lock().await;
        let prefix = "leases-held/";
        let (holder, mut client) = backend(prefix).await;
        let (trier, _) = backend(prefix).await;
        let first = record("busy", 1);
        acquired(&holder, "busy", &first, TTL).await;
        // One try: the lease it is granted is kept for the next.
        let _ = trier
            .acquire("busy", &record("busy", 2), TTL)
            .await
            .expect("try");
        let before = raft_index(&mut client).await;
        for _ in 0..20 {
            match trier
                .acquire("busy", &record("busy", 2), TTL)
                .await
                .expect("try")
            {
                AcquireOutcome::Held(h) => assert_eq!(h.owner_hash, first.owner_hash),
                AcquireOutcome::Acquired(_) => panic!("a held key was acquired"),
            }
        }
        let entries = raft_index(&mut client).await - before;
        // One transaction each; a lease granted and revoked per try would be three.
        assert!(
            entries <= 25,
            "20 tries on a held key wrote {entries} raft entries: leases were granted for them"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_released_lease_is_reused_with_the_whole_ttl() {
        let _serial = SERIAL.lock().await;
        let prefix = "leases-reuse/";
        let (b, mut client) = backend(prefix).await;
        let ttl = Duration::from_secs(4);
        let first = record("one", 1);
        acquired(&b, "one", &first, ttl).await;
        let lease = lease_of(&mut client, prefix, "one").await;
        assert_eq!(
            b.release("one", &first.owner_hash).await.expect("release"),
            ReleaseOutcome::Released
        );
        // Let the kept lease run down by two seconds, then acquire another key.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let second = record("two", 2);
        acquired(&b, "two", &second, ttl).await;
        assert_eq!(
            lease_of(&mut client, prefix, "two").await,
            lease,
            "the released lock's lease was not reused"
        );
        // Renewed when reused: the whole TTL is left (etcd answers whole seconds, rounded down),
        // not the two seconds it had.
        let left = ttl_left(&mut client, lease).await;
        assert!(
            left >= 3,
            "the reused lease has {left} s left, not the lock's 4"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_expired_spare_lease_is_not_used() {
        let _serial = SERIAL.lock().await;
        let prefix = "leases-expired/";
        let (b, mut client) = backend(prefix).await;
        let ttl = Duration::from_secs(1);
        let first = record("short", 1);
        acquired(&b, "short", &first, ttl).await;
        let old = lease_of(&mut client, prefix, "short").await;
        assert_eq!(
            b.release("short", &first.owner_hash)
                .await
                .expect("release"),
            ReleaseOutcome::Released
        );
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let second = record("short", 2);
        acquired(&b, "short", &second, Duration::from_secs(5)).await;
        let new = lease_of(&mut client, prefix, "short").await;
        assert_ne!(new, old, "an expired lease was used");
        assert!(ttl_left(&mut client, new).await >= 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lock_taken_over_meanwhile_is_left_to_its_new_holder() {
        let _serial = SERIAL.lock().await;
        let prefix = "leases-taken/";
        let (b, _) = backend(prefix).await;
        let (heir, _) = backend(prefix).await;
        let mine = record("job", 1);
        let stored = acquired(&b, "job", &mine, TTL).await;
        // Extended through this connection's record of its lock.
        match b
            .extend("job", &mine, TTL, &mine.owner_hash)
            .await
            .expect("extend")
        {
            ExtendOutcome::Extended(new) => assert_eq!(new.fencing_token, stored.fencing_token),
            other => panic!("{other:?}"),
        }
        // Another connection takes it over.
        let theirs = record("job", 2);
        let taken = match heir
            .take_over("job", &theirs, TTL, &mine.owner_hash)
            .await
            .expect("take over")
        {
            AcquireOutcome::Acquired(taken) => taken,
            AcquireOutcome::Held(h) => panic!("held by {}", h.owner_hash),
        };
        assert!(taken.fencing_token > stored.fencing_token);
        match b
            .extend("job", &mine, TTL, &mine.owner_hash)
            .await
            .expect("extend")
        {
            ExtendOutcome::Held(h) => assert_eq!(h.owner_hash, theirs.owner_hash),
            other => panic!("extended a lock taken over: {other:?}"),
        }
        match b.release("job", &mine.owner_hash).await.expect("release") {
            ReleaseOutcome::Held(h) => assert_eq!(h.owner_hash, theirs.owner_hash),
            other => panic!("released a lock taken over: {other:?}"),
        }
        assert_eq!(b.read("job").await.expect("read"), Some(taken));
    }

    /// How many lease keep-alive streams the shared server has opened so far.
    async fn keep_alive_streams_started() -> u64 {
        let server = servers::shared(ServerKind::Etcd).unwrap_or_else(|e| panic!("{e}"));
        keep_alive_streams_started_at(server.url()).await
    }

    /// How many lease keep-alive streams the server at `url` has opened so far (its Prometheus
    /// metrics).
    async fn keep_alive_streams_started_at(url: &str) -> u64 {
        keep_alive_metric(url, "grpc_server_started_total{").await
    }

    /// How many lease renewals (keep-alive messages, on any stream) the shared server has
    /// received so far.
    async fn renewals_received() -> u64 {
        let server = servers::shared(ServerKind::Etcd).unwrap_or_else(|e| panic!("{e}"));
        keep_alive_metric(server.url(), "grpc_server_msg_received_total{").await
    }

    /// The server's counter `metric` (a Prometheus line's start) for `LeaseKeepAlive`.
    async fn keep_alive_metric(url: &str, metric: &str) -> u64 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let address = url
            .split("://")
            .nth(1)
            .and_then(|rest| rest.split(['/', ',']).next())
            .expect("host:port in the server's URL")
            .to_owned();
        let mut tcp = tokio::net::TcpStream::connect(&address)
            .await
            .expect("metrics");
        tcp.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes())
            .await
            .expect("request");
        let mut text = String::new();
        tcp.read_to_string(&mut text).await.expect("metrics text");
        let line = text
            .lines()
            .find(|l| l.starts_with(metric) && l.contains("grpc_method=\"LeaseKeepAlive\""))
            .unwrap_or_else(|| panic!("no LeaseKeepAlive {metric} in etcd's /metrics:\n{text}"));
        line.rsplit(' ')
            .next()
            .and_then(|n| n.parse::<f64>().ok())
            .expect("a number") as u64
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_kept_lease_is_renewed_on_one_stream() {
        let _serial = SERIAL.lock().await;
        let prefix = "leases-stream/";
        let (b, mut client) = backend(prefix).await;
        let first = record("cycle", 1);
        acquired(&b, "cycle", &first, SHORT).await;
        let lease = lease_of(&mut client, prefix, "cycle").await;
        assert_eq!(
            b.release("cycle", &first.owner_hash)
                .await
                .expect("release"),
            ReleaseOutcome::Released
        );
        let before = keep_alive_streams_started().await;
        for n in 2..22 {
            let data = record("cycle", n);
            acquired(&b, "cycle", &data, SHORT).await;
            assert_eq!(lease_of(&mut client, prefix, "cycle").await, lease);
            assert_eq!(
                b.release("cycle", &data.owner_hash).await.expect("release"),
                ReleaseOutcome::Released
            );
        }
        let streams = keep_alive_streams_started().await - before;
        // The first renewal opens the stream; the other 19 are messages on it.
        assert!(
            streams <= 2,
            "20 renewals of one kept lease opened {streams} keep-alive streams"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_kept_lease_revoked_meanwhile_is_not_used() {
        let _serial = SERIAL.lock().await;
        // A short lock renews the kept lease (whose stream answers a TTL of 0); a long one,
        // within the lease's second of slack, does not, and its transaction finds the lease
        // gone.
        for (ttl, prefix) in [(SHORT, "leases-revoked/"), (TTL, "leases-revoked-slack/")] {
            let (b, mut client) = backend(prefix).await;
            for n in 1..3 {
                let data = record("job", n);
                acquired(&b, "job", &data, ttl).await;
                assert_eq!(
                    b.release("job", &data.owner_hash).await.expect("release"),
                    ReleaseOutcome::Released
                );
            }
            let third = record("job", 3);
            acquired(&b, "job", &third, ttl).await;
            let old = lease_of(&mut client, prefix, "job").await;
            assert_eq!(
                b.release("job", &third.owner_hash).await.expect("release"),
                ReleaseOutcome::Released
            );
            // Revoked behind the connection's back.
            client.lease_revoke(old).await.expect("revoke");
            let fourth = record("job", 4);
            acquired(&b, "job", &fourth, ttl).await;
            let new = lease_of(&mut client, prefix, "job").await;
            assert_ne!(new, old, "{ttl:?}: a revoked lease was used");
            let left = ttl_left(&mut client, new).await;
            let whole = i64::try_from(ttl.as_secs()).expect("secs");
            assert!(
                left >= whole - 1,
                "the new lease has {left} s left, not the lock's {whole}"
            );
        }
    }

    /// A lock of 10 s or more has a lease one second longer than its TTL, so that an acquire
    /// within a second of the lease's grant or renewal needs no renewal; the lock still has its
    /// whole TTL from the acquire on the server.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lease_renewed_within_its_slack_is_not_renewed_again() {
        let _serial = SERIAL.lock().await;
        let prefix = "leases-slack/";
        let (b, mut client) = backend(prefix).await;
        let first = record("often", 1);
        acquired(&b, "often", &first, TTL).await;
        let lease = lease_of(&mut client, prefix, "often").await;
        let granted = client
            .lease_time_to_live(lease, None)
            .await
            .expect("ttl")
            .granted_ttl();
        assert_eq!(granted, 31, "a 30 s lock's lease");
        assert_eq!(
            b.release("often", &first.owner_hash)
                .await
                .expect("release"),
            ReleaseOutcome::Released
        );
        let before = renewals_received().await;
        let started = tokio::time::Instant::now();
        let mut cycles = 0;
        // Twenty acquires on the kept lease, within its first second.
        while cycles < 20 && started.elapsed() < Duration::from_millis(800) {
            let data = record("often", 2 + cycles);
            acquired(&b, "often", &data, TTL).await;
            assert_eq!(lease_of(&mut client, prefix, "often").await, lease);
            // At least the lock's whole TTL left (etcd answers whole seconds, rounded down).
            let left = ttl_left(&mut client, lease).await;
            assert!(left >= 29, "the lock's lease has {left} s left, not 30");
            assert_eq!(
                b.release("often", &data.owner_hash).await.expect("release"),
                ReleaseOutcome::Released
            );
            cycles += 1;
        }
        assert!(cycles >= 5, "only {cycles} cycles in 800 ms");
        let renewals = renewals_received().await - before;
        assert_eq!(
            renewals, 0,
            "{cycles} acquires within a second of the lease's grant renewed it {renewals} times"
        );
        // Past that second, the next acquire renews it: the whole TTL again.
        tokio::time::sleep(Duration::from_millis(1100).saturating_sub(started.elapsed())).await;
        let last = record("often", 100);
        acquired(&b, "often", &last, TTL).await;
        assert_eq!(lease_of(&mut client, prefix, "often").await, lease);
        assert_eq!(renewals_received().await - before, 1);
        let left = ttl_left(&mut client, lease).await;
        assert!(left >= 30, "renewed, the lease has {left} s left, not 31");
    }

    /// An acquire on a frozen server (its transaction and the renewal of a kept lease beside
    /// it unanswered) fails within the command timeout with a retryable error; what it sent may
    /// still be run once the server wakes up. The lease it took is not kept, nor its stream (a
    /// stream is kept only after a whole renewal and answer, so an answer left unread on it is
    /// never taken for the answer to a later one). Then the connection works as before: whole
    /// TTLs, and renewals on one kept stream again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_frozen_server_fails_an_acquire_and_the_connection_recovers() {
        let server = tokio::task::spawn_blocking(|| servers::start_private(ServerKind::Etcd))
            .await
            .expect("join")
            .unwrap_or_else(|e| panic!("{e}"));
        let control = server.control().expect("a server the harness controls");
        let prefix = "leases-frozen/";
        let config = EtcdConfig::from_url(server.url())
            .expect("url")
            .into_builder()
            .prefix(prefix)
            .command_timeout(Duration::from_secs(3))
            .build()
            .expect("config");
        let b = EtcdBackend::connect(&config).await.expect("connect");
        let mut client = Client::connect(config.endpoints(), None)
            .await
            .expect("client");
        two_cycles(&b).await;

        let paused = control.clone();
        tokio::task::spawn_blocking(move || paused.pause())
            .await
            .expect("join")
            .expect("pause");
        let third = record("job", 3);
        let frozen = b.acquire("job", &third, SHORT).await;
        let resumed = control.clone();
        tokio::task::spawn_blocking(move || resumed.resume())
            .await
            .expect("join")
            .expect("resume");
        let e = frozen.expect_err("an acquire on a frozen server");
        assert!(e.is_retryable(), "{e}");
        // Its transaction was sent: the server may run it once it wakes up. Whatever it did,
        // the lock is the frozen acquire's or nobody's, and its owner can release it (as the
        // locker does after an acquire it gave up).
        match b.read("job").await.expect("read") {
            None => {}
            Some(stored) => {
                assert_eq!(stored.owner_hash, third.owner_hash);
                // Released, or gone already with its lease (which the connection did not keep).
                let released = b.release("job", &third.owner_hash).await.expect("release");
                assert!(
                    matches!(released, ReleaseOutcome::Released | ReleaseOutcome::NoKey),
                    "{released:?}"
                );
            }
        }

        let data = record("job", 4);
        acquired(&b, "job", &data, SHORT).await;
        let mut lease = lease_of(&mut client, prefix, "job").await;
        let left = ttl_left(&mut client, lease).await;
        assert!(left >= 4, "the lock's lease has {left} s left, not 5");
        assert_eq!(
            b.release("job", &data.owner_hash).await.expect("release"),
            ReleaseOutcome::Released
        );
        let before = keep_alive_streams_started_at(server.url()).await;
        for n in 5..15 {
            let data = record("job", n);
            acquired(&b, "job", &data, SHORT).await;
            if n > 5 {
                assert_eq!(lease_of(&mut client, prefix, "job").await, lease);
            }
            lease = lease_of(&mut client, prefix, "job").await;
            assert_eq!(
                b.release("job", &data.owner_hash).await.expect("release"),
                ReleaseOutcome::Released
            );
        }
        let streams = keep_alive_streams_started_at(server.url()).await - before;
        assert!(
            streams <= 2,
            "10 renewals of one kept lease after the thaw opened {streams} streams"
        );
        drop(server);
    }
}
