#![doc = include_str!("../README.md")]
//! ## Cargo features
//!
#![doc = document_features::document_features!()]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use locker_core::{
    BackendFactory, Capabilities, LockAttempt, LockBackend, Locker, LockerBuilder, ReleaseOutcome,
};

pub mod cases;
pub mod interpose;
mod memory;
pub mod servers;
pub mod start;
pub mod wedge;

pub use memory::memory_setup;
pub use servers::{ServerControl, ServerError};

/// Reads and writes raw values in the store, bypassing the backend's parsing: what the
/// corruption and compatibility cases need. Optional: without it those cases are skipped.
#[async_trait::async_trait]
pub trait RawAccess: Send + Sync + 'static {
    /// Stores `raw` as the value of the lock record of `key`, for `ttl`.
    async fn put_lock_raw(&self, key: &str, raw: &str, ttl: Duration) -> locker_core::Result<()>;
    /// The raw value of the lock record of `key`, if any.
    async fn get_lock_raw(&self, key: &str) -> locker_core::Result<Option<String>>;
}

/// A server started for one case alone, so that the fault cases can pause and restart it
/// without disturbing other tests.
pub struct PrivateServer {
    /// Connects to this server.
    pub factory: Arc<dyn BackendFactory>,
    /// Pauses, resumes, stops and restarts it.
    pub control: Arc<dyn ServerControl>,
    /// Whatever must live as long as the server (the server handle itself, usually).
    pub keep_alive: Box<dyn Any + Send + Sync>,
}

type PrivateServerFn =
    Arc<dyn Fn() -> BoxFuture<'static, Result<PrivateServer, ServerError>> + Send + Sync>;

/// How a backend is set up for the suite; made by the backend's test, passed to
/// [`conformance_suite!`].
pub struct Setup {
    name: String,
    factory: Arc<dyn BackendFactory>,
    unreachable: Option<Arc<dyn BackendFactory>>,
    raw: Option<Arc<dyn RawAccess>>,
    private_server: Option<PrivateServerFn>,
}

impl Setup {
    /// A backend called `name`, reached through `factory`.
    pub fn new(name: impl Into<String>, factory: impl BackendFactory) -> Self {
        Setup {
            name: name.into(),
            factory: Arc::new(factory),
            unreachable: None,
            raw: None,
            private_server: None,
        }
    }

    /// A factory configured like the real one but for a server that does not answer (a closed
    /// port): enables the "unreachable server" cases.
    pub fn with_unreachable(mut self, factory: impl BackendFactory) -> Self {
        self.unreachable = Some(Arc::new(factory));
        self
    }

    /// Raw access to the store: enables the corruption and compatibility cases.
    pub fn with_raw_access(mut self, raw: impl RawAccess) -> Self {
        self.raw = Some(Arc::new(raw));
        self
    }

    /// A way to start a private server: enables the fault cases (pause, restart).
    pub fn with_private_server<F, Fut>(mut self, start: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<PrivateServer, ServerError>> + Send + 'static,
    {
        self.private_server = Some(Arc::new(move || Box::pin(start())));
        self
    }
}

/// Timings scaled to a backend's TTL granularity, so that cases stay fast on Redis (1 ms) and
/// correct on etcd (1 s).
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// The TTL granularity the backend declared.
    pub granularity: Duration,
    /// Reporter interval.
    pub report_every: Duration,
    /// Liveness record TTL.
    pub liveness_ttl: Duration,
    /// Heartbeat recheck interval.
    pub recheck_every: Duration,
    /// A lock TTL short enough to wait out in a case.
    pub short_lock_ttl: Duration,
    /// The extension interval that goes with `short_lock_ttl`.
    pub short_extend_every: Duration,
}

impl Timing {
    /// Timings for a backend whose TTLs are rounded up to `granularity`.
    pub fn for_granularity(granularity: Duration) -> Self {
        // Long enough that a busy 2-core machine's stalls do not expire records by surprise.
        let ttl = Duration::from_millis(800).max(granularity * 3);
        Timing {
            granularity,
            report_every: ttl / 8,
            liveness_ttl: ttl,
            recheck_every: Duration::from_millis(50).max(granularity / 10),
            short_lock_ttl: ttl,
            short_extend_every: ttl / 4,
        }
    }

    /// How long until a record written with `ttl` has certainly expired, with a margin for the
    /// store's granularity and a busy machine.
    pub fn expiry_of(&self, ttl: Duration) -> Duration {
        ttl + self.granularity + Duration::from_millis(200)
    }
}

/// What a case gets: the backend under test and what it needs to exercise it.
pub struct Fixture {
    /// The suite's name (the backend).
    pub suite: String,
    /// The case's name.
    pub case: String,
    /// Connects to the backend.
    pub factory: Arc<dyn BackendFactory>,
    /// What the backend supports.
    pub capabilities: Capabilities,
    /// Timings for this backend.
    pub timing: Timing,
    /// Every key of this case starts with it, so cases run in parallel on one server.
    pub prefix: String,
    /// See [`Setup::with_unreachable`].
    pub unreachable: Option<Arc<dyn BackendFactory>>,
    /// See [`Setup::with_raw_access`].
    pub raw: Option<Arc<dyn RawAccess>>,
    private_server: Option<PrivateServerFn>,
}

impl Fixture {
    /// Connects once to read the capabilities.
    ///
    /// # Panics
    /// When the backend cannot be reached: the case fails with the reason.
    pub async fn new(suite: &str, case: &str, setup: Setup) -> Self {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let backend = setup
            .factory
            .connect()
            .await
            .unwrap_or_else(|e| panic!("{}: cannot connect to the backend: {e}", setup.name));
        let capabilities = backend.capabilities();
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        Fixture {
            suite: suite.to_owned(),
            case: case.to_owned(),
            timing: Timing::for_granularity(capabilities.ttl_granularity),
            capabilities,
            factory: setup.factory,
            prefix: format!("conformance/{case}/{nanos}.{seq}/"),
            unreachable: setup.unreachable,
            raw: setup.raw,
            private_server: setup.private_server,
        }
    }

    /// A key unique to this case.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// A new connection to the backend.
    pub async fn backend(&self) -> Arc<dyn LockBackend> {
        self.factory
            .connect()
            .await
            .expect("connect to the backend")
    }

    /// A locker builder on this backend with the case timings and a long lock TTL.
    pub fn locker_builder(&self) -> LockerBuilder {
        builder_with(self.factory.clone(), &self.timing)
    }

    /// A locker on this backend with the case timings and a long lock TTL.
    pub fn locker(&self) -> Locker {
        self.locker_builder().build().expect("valid timings")
    }

    /// A locker whose locks live [`Timing::short_lock_ttl`] (extended every
    /// `short_extend_every`), for cases about expiry.
    pub fn short_ttl_locker(&self) -> Locker {
        self.locker_builder()
            .lock_ttl(self.timing.short_lock_ttl)
            .extend_every(self.timing.short_extend_every)
            .build()
            .expect("valid timings")
    }

    /// Starts a private server, when the setup can (see [`Setup::with_private_server`]).
    pub async fn private_server(&self) -> Option<PrivateServer> {
        let start = self.private_server.as_ref()?;
        Some(start().await.expect("start a private server"))
    }

    /// Whether a private server can be started.
    pub fn has_private_server(&self) -> bool {
        self.private_server.is_some()
    }
}

/// A locker builder over `factory` with `timing` and a long lock TTL (30 s, extended every
/// 10 s), for cases about liveness rather than expiry.
pub fn builder_with(factory: Arc<dyn BackendFactory>, timing: &Timing) -> LockerBuilder {
    Locker::builder(factory)
        .report_every(timing.report_every)
        .liveness_ttl(timing.liveness_ttl)
        .recheck_every(timing.recheck_every)
        .reporter_start_timeout(Duration::from_secs(10))
        .lock_ttl(Duration::from_secs(30))
        .extend_every(Duration::from_secs(10))
}

/// One whole cycle through a locker over `factory`, with the timings for the backend's TTL
/// granularity: acquire the free `key` (with a fencing token), beat, release, shut down. It
/// panics at the first step that fails: a helper for a backend crate's own tests of how it
/// connects (TLS, authentication).
pub async fn lock_cycle(factory: Arc<dyn BackendFactory>, key: &str) {
    let granularity = factory
        .connect()
        .await
        .expect("connect")
        .capabilities()
        .ttl_granularity;
    let locker = builder_with(factory, &Timing::for_granularity(granularity))
        .build()
        .expect("locker");
    let guard = match locker.acquire(key).await.expect("acquire") {
        LockAttempt::Acquired(g) => g,
        LockAttempt::Held(h) => panic!("held by {}", h.owner_hash),
    };
    assert!(guard.fencing_token().is_some());
    guard.heartbeat().beat().await.expect("beat");
    assert_eq!(
        guard.release().await.expect("release"),
        ReleaseOutcome::Released
    );
    locker.shutdown().await;
}

impl fmt::Debug for Fixture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fixture")
            .field("suite", &self.suite)
            .field("case", &self.case)
            .field("capabilities", &self.capabilities)
            .field("timing", &self.timing)
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// How a case ended, when it did not fail (failures panic, as in any test).
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Verdict {
    /// Every check passed.
    Passed,
    /// The case does not apply to this backend; the reason says why.
    Skipped(String),
}

impl Verdict {
    /// A skip with its reason.
    pub fn skip(reason: impl Into<String>) -> Self {
        Verdict::Skipped(reason.into())
    }
}

/// Runs one case in its own runtime and reports it; what [`conformance_suite!`] expands to.
#[doc(hidden)]
pub fn __run<S, C, F>(suite: &str, case: &str, setup: S, run: C) -> Verdict
where
    S: Future<Output = Setup>,
    C: FnOnce(Fixture) -> F,
    F: Future<Output = Verdict>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build a tokio runtime");
    let verdict = runtime.block_on(async {
        let fixture = Fixture::new(suite, case, setup.await).await;
        run(fixture).await
    });
    let line = match &verdict {
        Verdict::Passed => format!("conformance {suite}::{case}: passed\n"),
        Verdict::Skipped(reason) => format!("conformance {suite}::{case}: SKIPPED ({reason})\n"),
    };
    // Straight to the process's stderr, past the test harness's capture, so every run lists
    // what ran and what was skipped.
    let _ = std::io::stderr().write_all(line.as_bytes());
    verdict
}

macro_rules! define_suite {
    ($d:tt; $($name:ident),* $(,)?) => {
        /// The name of every case, in the order the suite runs them.
        pub const CASE_NAMES: &[&str] = &[$(stringify!($name)),*];

        /// Runs the case named `case` (one of [`CASE_NAMES`]) against the backend `setup` makes,
        /// in a runtime of its own, as one test of [`conformance_suite!`] does: for a test or
        /// an example of your own that runs some cases. A failing check panics.
        ///
        /// # Panics
        /// When `case` is not one of [`CASE_NAMES`], or the case fails.
        pub fn run_case(suite: &str, case: &str, setup: impl Future<Output = Setup>) -> Verdict {
            match case {
                $(stringify!($name) => __run(suite, case, setup, |fixture| async move {
                    cases::$name(&fixture).await
                }),)*
                other => panic!("no conformance case is named {other:?} (see CASE_NAMES)"),
            }
        }

        /// Generates one `#[test]` per conformance case for a backend.
        ///
        /// `conformance_suite!(suite_name, setup_future)` makes a module `suite_name` with one
        /// test per entry of [`CASE_NAMES`]; `setup_future` is an expression whose value is a
        /// future of a [`Setup`] (an `async { ... }` block, or a call of an `async fn`), evaluated
        /// afresh inside each test's runtime.
        ///
        /// ```ignore
        /// locker_conformance::conformance_suite!(memory, async { locker_conformance::memory_setup() });
        /// ```
        #[macro_export]
        macro_rules! conformance_suite {
            ($d suite:ident, $d setup:expr $d(,)?) => {
                mod $d suite {
                    #[allow(unused_imports)]
                    use super::*;
                    $(
                        #[test]
                        fn $name() {
                            let _ = $d crate::__run(
                                stringify!($d suite),
                                stringify!($name),
                                async { $d setup.await },
                                |fixture| async move { $d crate::cases::$name(&fixture).await },
                            );
                        }
                    )*
                }
            };
        }
    };
}

define_suite!($;
    backend_acquire_free_key,
    backend_acquire_held_key_returns_holder,
    backend_extend_by_owner,
    backend_extend_by_non_owner,
    backend_extend_missing_key,
    backend_release_by_owner,
    backend_release_by_non_owner,
    backend_release_missing_key,
    backend_take_over_replaces_only_the_dead_owner,
    backend_acquire_checked_decides_in_one_call,
    backend_read_many_answers_each_key,
    backend_lock_ttl_expiry,
    backend_liveness_write_read_expiry,
    backend_forget_process,
    backend_concurrent_acquires_have_one_winner,
    backend_fencing_tokens_strictly_increase,
    backend_hostile_keys_round_trip,
    backend_zero_ttl_is_invalid_input,
    backend_corrupt_record_is_a_typed_error,
    backend_unknown_fields_survive_extend,
    backend_client_clock_skew_changes_nothing,
    locker_acquire_release_and_owner_status,
    locker_no_second_acquire_from_the_same_process,
    locker_no_release_of_someone_elses_lock,
    locker_takeover_after_the_owner_process_dies,
    locker_expiry_when_not_extended,
    locker_extension_keeps_the_lock,
    locker_acquire_and_run,
    locker_seppuku_after_a_takeover,
    locker_seppuku_after_a_takeover_by_the_same_process,
    locker_mutex_on_one_locker_never_overlaps,
    locker_mutex_on_two_lockers_never_overlaps,
    locker_reporter_writes_regularly,
    locker_reporter_reports_errors_against_an_unreachable_server,
    locker_clean_shutdown_frees_locks_at_once,
    locker_blocked_runtime_keeps_its_lock,
    wait_limit_is_respected,
    wait_is_cancel_safe,
    wait_acquires_after_release,
    wait_takes_over_from_a_dead_holder,
    wait_finds_a_silently_expired_lock,
    semaphore_never_more_than_permits,
    semaphore_callers_that_disagree_on_permits_are_refused,
    semaphore_dead_holders_permit_is_taken_over,
    election_hands_off_on_resign_and_death,
    semaphore_and_election_across_server_pauses,
    safety_stale_recheck_after_a_freeze_fails_the_beat,
    safety_late_acquire_reply_is_not_a_guard,
    safety_shutdown_waits_for_running_jobs,
    safety_cancelled_acquire_that_lands_late_is_undone,
    fault_server_paused_shorter_than_the_liveness_ttl,
    fault_server_restarted_locker_recovers,
    fault_server_unreachable_at_start,
);
