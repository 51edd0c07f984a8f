//! The conformance cases, as plain `pub async fn`s over a [`Fixture`](crate::Fixture).
//!
//! Each returns [`Verdict::Passed`](crate::Verdict) or a skip with its reason, and panics on a
//! failed check. Call them from your own tests, or let [`conformance_suite!`](crate::conformance_suite)
//! generate one test per case.

mod backend;
mod faults;
mod locker;
mod primitives;
mod safety;
mod wait;

pub use backend::*;
pub use faults::*;
pub use locker::*;
pub use primitives::*;
pub use safety::*;
pub use wait::*;
