//! The suite's own check: `MemoryBackend` as a backend under test, with a "server" whose
//! faults are simulated.

use std::sync::Arc;
use std::time::Duration;

use locker_core::{BackendFactory, MemoryBackend};

use crate::servers::{ServerControl, ServerError};
use crate::{PrivateServer, RawAccess, Setup};

/// The setup that runs the suite against [`MemoryBackend`]: raw access, an "unreachable"
/// store, and private stores whose pause, stop and restart are simulated (a restart forgets
/// every record, as a server without persistence does).
pub fn memory_setup() -> Setup {
    let store = MemoryBackend::new();
    let unreachable = MemoryBackend::new();
    unreachable.set_unavailable(true);
    Setup::new("memory", store.clone())
        .with_raw_access(MemoryRaw(store))
        .with_unreachable(unreachable)
        .with_private_server(|| async {
            let store = MemoryBackend::new();
            Ok(PrivateServer {
                factory: Arc::new(store.clone()) as Arc<dyn BackendFactory>,
                control: Arc::new(MemoryControl(store)),
                keep_alive: Box::new(()),
            })
        })
}

struct MemoryRaw(MemoryBackend);

#[async_trait::async_trait]
impl RawAccess for MemoryRaw {
    async fn put_lock_raw(&self, key: &str, raw: &str, ttl: Duration) -> locker_core::Result<()> {
        self.0.put_raw(key, raw, ttl);
        Ok(())
    }

    async fn get_lock_raw(&self, key: &str) -> locker_core::Result<Option<String>> {
        Ok(self.0.get_raw(key))
    }
}

#[derive(Debug)]
struct MemoryControl(MemoryBackend);

impl ServerControl for MemoryControl {
    fn pause(&self) -> Result<(), ServerError> {
        self.0.set_unavailable(true);
        Ok(())
    }

    fn resume(&self) -> Result<(), ServerError> {
        self.0.set_unavailable(false);
        Ok(())
    }

    fn stop(&self) -> Result<(), ServerError> {
        self.0.set_unavailable(true);
        self.0.clear();
        Ok(())
    }

    /// As a stop: the simulated store keeps nothing either way.
    fn kill(&self) -> Result<(), ServerError> {
        self.stop()
    }

    fn start(&self) -> Result<(), ServerError> {
        self.0.set_unavailable(false);
        Ok(())
    }

    fn pids(&self) -> Vec<u32> {
        Vec::new()
    }
}
