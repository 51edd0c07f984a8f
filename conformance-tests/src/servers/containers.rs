//! The `testcontainers` provider: the same servers from container images, for hosts with a
//! Docker engine. Image names and tags come from `LOCKER_TEST_<KIND>_IMAGE` (`name:tag`); the
//! defaults are the official images.
//!
//! Pause, resume, stop and start go through the Docker command line (`docker pause` ...).
//! Clusters are not offered by this provider yet: use the `process` provider for them.

use std::process::Command;
use std::sync::{Arc, Mutex};

use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::SyncRunner;
use testcontainers::{GenericImage, ImageExt};

use super::{Provider, Server, ServerControl, ServerError, ServerKind};

fn image(kind: ServerKind, default: &str) -> (String, String) {
    let var = match kind {
        ServerKind::Redis | ServerKind::RedisCluster => "LOCKER_TEST_REDIS_IMAGE",
        ServerKind::Postgres => "LOCKER_TEST_POSTGRES_IMAGE",
        ServerKind::Etcd | ServerKind::EtcdCluster => "LOCKER_TEST_ETCD_IMAGE",
    };
    let spec = std::env::var(var).unwrap_or_else(|_| default.to_owned());
    match spec.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name.to_owned(), tag.to_owned()),
        _ => (spec, "latest".to_owned()),
    }
}

fn failed(kind: ServerKind, e: impl std::fmt::Display) -> ServerError {
    ServerError::failed(format!(
        "{kind} container: {e} (is a Docker engine running?)"
    ))
}

/// Starts a server of `kind` in a container.
pub(super) fn start(kind: ServerKind) -> Result<Server, ServerError> {
    let (name, tag) = match kind {
        ServerKind::Redis => image(kind, "redis:7"),
        ServerKind::Postgres => image(kind, "postgres:16"),
        ServerKind::Etcd => image(kind, "quay.io/coreos/etcd:v3.5.17"),
        ServerKind::RedisCluster | ServerKind::EtcdCluster => {
            return Err(ServerError::NotAvailable {
                what: format!("{kind} from testcontainers"),
                how: "use LOCKER_TEST_PROVIDER=process (local binaries) for clusters".into(),
            })
        }
    };
    let (port, endpoint): (u16, fn(u16) -> String) = match kind {
        ServerKind::Redis => (6379, |p| format!("redis://127.0.0.1:{p}")),
        ServerKind::Postgres => (5432, |p| {
            format!("postgres://postgres@127.0.0.1:{p}/postgres")
        }),
        _ => (2379, |p| format!("http://127.0.0.1:{p}")),
    };
    let image = GenericImage::new(name, tag).with_exposed_port(port.tcp());
    let request = match kind {
        ServerKind::Redis => image
            .with_wait_for(WaitFor::message_on_stdout("Ready to accept connections"))
            .with_cmd(["redis-server", "--save", "", "--appendonly", "no"]),
        ServerKind::Postgres => image
            .with_wait_for(WaitFor::message_on_stderr(
                "database system is ready to accept connections",
            ))
            .with_env_var("POSTGRES_HOST_AUTH_METHOD", "trust"),
        _ => image
            .with_wait_for(WaitFor::message_on_stderr("ready to serve client requests"))
            .with_cmd([
                "etcd",
                "--listen-client-urls=http://0.0.0.0:2379",
                "--advertise-client-urls=http://127.0.0.1:2379",
            ]),
    };
    let container = request.start().map_err(|e| failed(kind, e))?;
    let host_port = container
        .get_host_port_ipv4(port)
        .map_err(|e| failed(kind, e))?;
    let control: Arc<dyn ServerControl> = Arc::new(DockerControl {
        id: container.id().to_owned(),
    });
    Ok(Server {
        kind,
        provider: Provider::Testcontainers,
        endpoints: vec![endpoint(host_port)],
        nodes: vec![control.clone()],
        control: Some(control),
        _keep_alive: vec![Box::new(Mutex::new(container))],
    })
}

/// Controls a container through the `docker` command line.
#[derive(Debug)]
struct DockerControl {
    id: String,
}

impl DockerControl {
    fn docker(&self, verb: &str) -> Result<(), ServerError> {
        let out = Command::new("docker")
            .args([verb, &self.id])
            .output()
            .map_err(|e| ServerError::io(format!("docker {verb}"), e))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(ServerError::failed(format!(
                "docker {verb} {}: {}",
                self.id,
                String::from_utf8_lossy(&out.stderr)
            )))
        }
    }
}

impl ServerControl for DockerControl {
    fn pause(&self) -> Result<(), ServerError> {
        self.docker("pause")
    }

    fn resume(&self) -> Result<(), ServerError> {
        self.docker("unpause")
    }

    fn stop(&self) -> Result<(), ServerError> {
        self.docker("stop")
    }

    fn start(&self) -> Result<(), ServerError> {
        self.docker("start")
    }

    fn pids(&self) -> Vec<u32> {
        Vec::new()
    }
}
