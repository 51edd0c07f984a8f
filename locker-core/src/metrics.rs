//! Metrics, through the [`metrics`](https://docs.rs/metrics) facade: the application installs
//! the recorder (an exporter) it wants; with none installed, each of these is one atomic load.
//!
//! The constants below are every metric name, each with its labels; the workspace README's
//! "Metrics and spans" section has them as one table. This module is the one place that
//! writes them.

use std::time::Duration;

use crate::backend::ReleaseOutcome;
use crate::events::BackgroundSource;
use crate::heartbeat::Loss;

/// Acquire calls, by `outcome`: `acquired`, `held`, `error`.
pub const ACQUIRE_TOTAL: &str = "locker_acquire_total";
/// Seconds an acquire call took, by `outcome`.
pub const ACQUIRE_SECONDS: &str = "locker_acquire_seconds";
/// Locks of dead processes taken over (each also counts as an `acquired` acquire).
pub const TAKEOVERS_TOTAL: &str = "locker_takeovers_total";
/// Locks held by this process's guards now.
pub const LOCKS_HELD: &str = "locker_locks_held";
/// Locks lost while held, by `reason`: `taken_over`, `key_gone`, `expired`, `liveness_lapsed`,
/// `drained`, `abandoned`.
pub const LOCKS_LOST_TOTAL: &str = "locker_locks_lost_total";
/// Releases that reached the store, by `outcome`: `released`, `no_key` (it had expired),
/// `held` (someone else holds it now); failed releases count as background errors.
pub const RELEASES_TOTAL: &str = "locker_releases_total";
/// Seconds a successful liveness write took.
pub const LIVENESS_WRITE_SECONDS: &str = "locker_liveness_write_seconds";
/// Liveness writes that landed after the previous record may have expired.
pub const LIVENESS_LAPSES_TOTAL: &str = "locker_liveness_lapses_total";
/// Background errors, by `source` (see [`BackgroundSource`]).
pub const BACKGROUND_ERRORS_TOTAL: &str = "locker_background_errors_total";
/// Seconds an [`acquire_wait`](crate::Locker::acquire_wait) took, by `outcome`: `acquired`,
/// `timeout`, `error`.
pub const WAIT_SECONDS: &str = "locker_wait_seconds";

/// `metrics::$kind!($name, $label => value)` with the value one of the literals listed, so
/// that the macro's key is a static one (a label given by a variable makes the macro allocate
/// the key's label list at every call, recorder or not: three allocations per lock cycle); a
/// value not listed falls back to that.
macro_rules! labelled {
    ($kind:ident, $name:expr, $label:literal, $value:expr, [$($known:literal),+]) => {
        match $value {
            $($known => metrics::$kind!($name, $label => $known),)+
            other => metrics::$kind!($name, $label => other),
        }
    };
}

pub(crate) fn acquire(outcome: &'static str, took: Duration) {
    labelled!(
        counter,
        ACQUIRE_TOTAL,
        "outcome",
        outcome,
        ["acquired", "held", "error"]
    )
    .increment(1);
    labelled!(
        histogram,
        ACQUIRE_SECONDS,
        "outcome",
        outcome,
        ["acquired", "held", "error"]
    )
    .record(took.as_secs_f64());
}

pub(crate) fn took_over() {
    metrics::counter!(TAKEOVERS_TOTAL).increment(1);
}

pub(crate) fn held_changed(delta: f64) {
    metrics::gauge!(LOCKS_HELD).increment(delta);
}

pub(crate) fn lost(loss: &Loss) {
    let reason = match loss {
        Loss::TakenOver(_) => "taken_over",
        Loss::NoKey => "key_gone",
        Loss::Expired => "expired",
        Loss::LivenessLapsed => "liveness_lapsed",
        Loss::Abandoned => "abandoned",
        Loss::Released => return,
    };
    lost_for(reason, 1);
}

pub(crate) fn lost_for(reason: &'static str, locks: u64) {
    if locks > 0 {
        labelled!(
            counter,
            LOCKS_LOST_TOTAL,
            "reason",
            reason,
            [
                "taken_over",
                "key_gone",
                "expired",
                "liveness_lapsed",
                "drained",
                "abandoned"
            ]
        )
        .increment(locks);
    }
}

pub(crate) fn release(outcome: &ReleaseOutcome) {
    let outcome = match outcome {
        ReleaseOutcome::Released => "released",
        ReleaseOutcome::NoKey => "no_key",
        ReleaseOutcome::Held(_) => "held",
    };
    labelled!(
        counter,
        RELEASES_TOTAL,
        "outcome",
        outcome,
        ["released", "no_key", "held"]
    )
    .increment(1);
}

pub(crate) fn liveness_written(took: Duration, lapsed: bool) {
    metrics::histogram!(LIVENESS_WRITE_SECONDS).record(took.as_secs_f64());
    if lapsed {
        metrics::counter!(LIVENESS_LAPSES_TOTAL).increment(1);
    }
}

pub(crate) fn background_error(source: BackgroundSource) {
    metrics::counter!(BACKGROUND_ERRORS_TOTAL, "source" => source.label()).increment(1);
}

pub(crate) fn waited(outcome: &'static str, took: Duration) {
    labelled!(
        histogram,
        WAIT_SECONDS,
        "outcome",
        outcome,
        ["acquired", "timeout", "error"]
    )
    .record(took.as_secs_f64());
}
