#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backend;
mod clock;
mod election;
mod error;
mod events;
mod hash;
mod healing;
mod heartbeat;
mod locker;
mod memory;
pub mod metrics;
mod options;
mod record;
mod reporter;
mod semaphore;
pub mod url_params;
mod wait;

pub use backend::{
    factory_fn, read_each, AcquireDecision, AcquireOutcome, BackendFactory, Capabilities,
    ExtendOutcome, FnFactory, LockBackend, ReleaseOutcome,
};
pub use clock::suspend_aware_now;
pub use election::{Election, LeaderWatch, Leadership};
pub use error::{find_io_error, is_definite_io_error, BoxError, Error, ErrorKind, Result};
pub use events::{BackgroundError, BackgroundSource};
pub use hash::{
    new_owner_hash, new_process_hash, parse_owner_hash, validate_key, ParsedOwnerHash, MAX_KEY_LEN,
    MAX_TRACE_LEN,
};
pub use heartbeat::Heartbeat;
pub use locker::{LockAttempt, LockGuard, LockRequest, Locker, OwnerStatus, RunOutcome};
pub use memory::{CallCounts, MemoryBackend};
pub use options::{
    LockerBuilder, LockerOptions, DEFAULT_EXTEND_EVERY, DEFAULT_LIVENESS_TTL, DEFAULT_LOCK_TTL,
    DEFAULT_RECHECK_EVERY, DEFAULT_RECONNECT_AFTER_FAILURES, DEFAULT_REPORTER_START_TIMEOUT,
    DEFAULT_REPORT_EVERY, DEFAULT_SLOW_CALL_AFTER,
};
pub use record::{LockData, ProcessData};
pub use semaphore::{permit_key, PermitAttempt, Semaphore, MAX_PERMITS};
pub use wait::{ReleaseWatch, Wait, WatchHub};

/// Re-exported so that backend crates implement [`LockBackend`] with the same macro version.
pub use async_trait::async_trait;
