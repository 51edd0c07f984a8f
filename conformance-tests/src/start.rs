//! Helpers for a backend's tests of start-up errors: a failure the store answers at once (a
//! refused port, an unopenable file) must end a locker's start at once, not after its timeout.

use std::future::Future;
use std::time::Duration;

use locker_core::{BackendFactory, Error, Locker, Result};

/// Well under the start timeout of [`locker_with_long_start`] and under the clients' connect
/// waits: a call that returns within it did not wait for either.
pub const NOT_WAITED: Duration = Duration::from_secs(5);

/// A locker on `factory` with a 60 s start timeout, which no test of these waits for.
pub fn locker_with_long_start(factory: impl BackendFactory) -> Locker {
    Locker::builder(factory)
        .reporter_start_timeout(Duration::from_secs(60))
        .build()
        .expect("valid options")
}

/// The error `call` fails with; it must fail, within [`NOT_WAITED`]. `what` names the call in
/// the panic message.
pub async fn fails_at_once<T>(what: &str, call: impl Future<Output = Result<T>>) -> Error {
    match tokio::time::timeout(NOT_WAITED, call).await {
        Err(_) => panic!("{what} waited for its timeout"),
        Ok(Ok(_)) => panic!("{what} succeeded"),
        Ok(Err(e)) => e,
    }
}
