//! The `testcontainers` provider: the same servers, clusters included, from container images,
//! for hosts with a Docker engine.
//!
//! - **Images.** `LOCKER_TEST_REDIS_IMAGE`, `LOCKER_TEST_POSTGRES_IMAGE` and
//!   `LOCKER_TEST_ETCD_IMAGE` (`name:tag`) choose them; the defaults are the official images
//!   ([`DEFAULT_REDIS_IMAGE`], [`DEFAULT_POSTGRES_IMAGE`], [`DEFAULT_ETCD_IMAGE`]). On a host that
//!   reaches no registry, `scripts/build-test-images` builds small images from the Debian
//!   binaries and prints the variables that select them.
//! - **Network.** Every container runs on the host's network and binds 127.0.0.1 on a free port
//!   the harness picks, so no test traffic leaves the loopback interface and an engine started
//!   with `--bridge=none` is enough. (On Docker Desktop, host networking must be enabled.)
//! - **Control.** Pause, resume, stop and start go through the engine's API (`docker pause`, ...);
//!   readiness is probed from the host over the server's own protocol, after every start.
//! - **Cleanup.** A dropped server's containers are removed at once. Containers that outlive
//!   their handle (a [`shared`](super::shared) server, a killed test process) are removed when the
//!   test process exits, by a small reaper process that waits for the end of its standard input
//!   and then runs `docker rm -f`. Every container carries the label [`LABEL`] (value: the test
//!   process's pid), so a leftover can be found with `docker ps -a --filter label=...`.

use std::io::Write;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use testcontainers::runners::SyncRunner;
use testcontainers::{Container, GenericImage, ImageExt};

use super::process::{free_port, which};
use super::{
    etcd, postgres, redis, GroupReady, Member, Provider, Server, ServerControl, ServerError,
    ServerKind,
};

/// The label on every container the harness starts; its value is the test process's pid.
pub const LABEL: &str = "org.distributed-locker.test";

/// A second label, with the value of `LOCKER_TEST_RUN_ID` when that is set, so that a test
/// command can find its own run's containers on a shared engine.
pub const RUN_LABEL: &str = "org.distributed-locker.test.run";

/// The default Redis image (the official one).
pub const DEFAULT_REDIS_IMAGE: &str = "redis:7.4";
/// The default PostgreSQL image (the official one).
pub const DEFAULT_POSTGRES_IMAGE: &str = "postgres:17";
/// The default etcd image (the etcd project's).
pub const DEFAULT_ETCD_IMAGE: &str = "quay.io/coreos/etcd:v3.5.17";

/// The environment variable that chooses the image of `kind` (clusters use the image of their
/// single-server kind).
pub fn image_var(kind: ServerKind) -> &'static str {
    match kind {
        ServerKind::Redis | ServerKind::RedisCluster => "LOCKER_TEST_REDIS_IMAGE",
        ServerKind::Postgres => "LOCKER_TEST_POSTGRES_IMAGE",
        ServerKind::Etcd | ServerKind::EtcdCluster => "LOCKER_TEST_ETCD_IMAGE",
    }
}

/// The image servers of `kind` start from: its variable's value, or the official image.
pub fn image(kind: ServerKind) -> String {
    let default = match kind {
        ServerKind::Redis | ServerKind::RedisCluster => DEFAULT_REDIS_IMAGE,
        ServerKind::Postgres => DEFAULT_POSTGRES_IMAGE,
        ServerKind::Etcd | ServerKind::EtcdCluster => DEFAULT_ETCD_IMAGE,
    };
    std::env::var(image_var(kind))
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// `name:tag` split at the tag's colon (not a registry's port); no tag means `latest`.
fn split_image(spec: &str) -> (String, String) {
    match spec.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name.to_owned(), tag.to_owned()),
        _ => (spec.to_owned(), "latest".to_owned()),
    }
}

/// The engine's address as testcontainers finds it: `DOCKER_HOST`, else the first socket that
/// exists of `/var/run/docker.sock`, `$XDG_RUNTIME_DIR/.docker/run/docker.sock`,
/// `~/.docker/run/docker.sock` and `~/.docker/desktop/docker.sock` (testcontainers also reads
/// `~/.testcontainers.properties`, which this ignores: set `DOCKER_HOST` instead).
pub fn docker_host() -> String {
    if let Ok(host) = std::env::var("DOCKER_HOST") {
        if !host.trim().is_empty() {
            return host;
        }
    }
    let mut candidates = vec![std::path::PathBuf::from("/var/run/docker.sock")];
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
        candidates.push(std::path::Path::new(&dir).join(".docker/run/docker.sock"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        let home = std::path::Path::new(&home);
        candidates.push(home.join(".docker/run/docker.sock"));
        candidates.push(home.join(".docker/desktop/docker.sock"));
    }
    candidates
        .into_iter()
        .find(|p| p.exists())
        .map(|p| format!("unix://{}", p.display()))
        .unwrap_or_else(|| "unix:///var/run/docker.sock".to_owned())
}

/// Whether a Docker engine answers a ping at [`docker_host`] (a `unix://` or `tcp://` address)
/// within about a second.
pub fn engine_answers() -> bool {
    use std::io::Read;
    let host = docker_host();
    let timeout = Duration::from_secs(1);
    let ping = |mut stream: Box<dyn ReadWrite>| {
        let mut reply = String::new();
        stream
            .write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            .is_ok()
            && stream.read_to_string(&mut reply).is_ok()
            && reply.starts_with("HTTP/1.")
            && reply.contains(" 200 ")
    };
    if let Some(path) = host.strip_prefix("unix://") {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(s) => {
                let _ = s.set_read_timeout(Some(timeout));
                let _ = s.set_write_timeout(Some(timeout));
                ping(Box::new(s))
            }
            Err(_) => false,
        }
    } else if let Some(addr) = host.strip_prefix("tcp://") {
        use std::net::ToSocketAddrs;
        let Some(addr) = addr.to_socket_addrs().ok().and_then(|mut a| a.next()) else {
            return false;
        };
        match std::net::TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => {
                let _ = s.set_read_timeout(Some(timeout));
                let _ = s.set_write_timeout(Some(timeout));
                ping(Box::new(s))
            }
            Err(_) => false,
        }
    } else {
        false
    }
}

trait ReadWrite: std::io::Read + Write {}
impl<T: std::io::Read + Write> ReadWrite for T {}

/// Starts a server (or cluster) of `kind` in containers.
pub(super) fn start(kind: ServerKind) -> Result<Server, ServerError> {
    match kind {
        ServerKind::Redis => {
            let port = free_port(0)?;
            let node = redis_node(kind, port, false)?;
            server(
                kind,
                vec![format!("redis://127.0.0.1:{port}")],
                vec![node],
                None,
            )
        }
        ServerKind::RedisCluster => redis_cluster(3, 0),
        ServerKind::Postgres => {
            let port = free_port(0)?;
            let node = ContainerNode::create(
                kind,
                port,
                GenericImage::new("", "")
                    .with_env_var("POSTGRES_HOST_AUTH_METHOD", "trust")
                    .with_env_var("PGPORT", port.to_string()),
                &[
                    "postgres",
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=300",
                    "-c",
                    "jit=off",
                ],
                Box::new(move || postgres::accepts(port)),
            )?;
            let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
            server(kind, vec![url], vec![node], None)
        }
        ServerKind::Etcd | ServerKind::EtcdCluster => {
            let members = if kind == ServerKind::Etcd { 1 } else { 3 };
            let mut ports = Vec::new();
            for _ in 0..members {
                ports.push((free_port(0)?, free_port(0)?));
            }
            let token = etcd::cluster_token();
            let mut nodes = Vec::new();
            for (i, &(client, _)) in ports.iter().enumerate() {
                let mut cmd = vec!["etcd".to_owned()];
                cmd.extend(etcd::member_args(
                    i,
                    &ports,
                    &format!("/var/lib/etcd/m{i}"),
                    &token,
                ));
                let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
                nodes.push(ContainerNode::create(
                    kind,
                    client,
                    GenericImage::new("", "").into(),
                    &cmd,
                    Box::new(move || etcd::healthy(client)),
                )?);
            }
            let endpoints = ports
                .iter()
                .map(|(client, _)| format!("http://127.0.0.1:{client}"))
                .collect();
            server(kind, endpoints, nodes, None)
        }
    }
}

/// A Redis Cluster of `masters` masters, each with `replicas_each` replicas, in containers (see
/// [`super::start_redis_cluster_with_replicas`] for the order of its nodes).
pub(super) fn redis_cluster(masters: usize, replicas_each: usize) -> Result<Server, ServerError> {
    let kind = ServerKind::RedisCluster;
    let mut ports = Vec::new();
    let mut nodes = Vec::new();
    for _ in 0..masters * (1 + replicas_each) {
        let port = free_port(redis::BUS_OFFSET)?;
        nodes.push(redis_node(kind, port, true)?);
        ports.push(port);
    }
    let endpoints = ports
        .iter()
        .map(|p| format!("redis://127.0.0.1:{p}"))
        .collect();
    let ready: GroupReady = Box::new(move || redis::form_cluster(&ports, masters));
    server(kind, endpoints, nodes, Some(ready))
}

/// A server of `kind` made of containers, started and ready.
fn server(
    kind: ServerKind,
    endpoints: Vec<String>,
    nodes: Vec<ContainerNode>,
    ready: Option<GroupReady>,
) -> Result<Server, ServerError> {
    Server::from_nodes(
        kind,
        Provider::Testcontainers,
        endpoints,
        nodes,
        ready,
        Vec::new(),
    )
}

fn redis_node(kind: ServerKind, port: u16, cluster: bool) -> Result<ContainerNode, ServerError> {
    let mut cmd = vec!["redis-server".to_owned()];
    cmd.extend(redis::server_args(port, "/data", cluster));
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    ContainerNode::create(
        kind,
        port,
        GenericImage::new("", "").into(),
        &cmd,
        Box::new(move || redis::answers(port)),
    )
}

type Probe = Box<dyn Fn() -> bool + Send + Sync>;
type Request = testcontainers::ContainerRequest<GenericImage>;

/// One server in one container.
struct ContainerNode {
    label: String,
    /// The container and what the harness did to it, changed only after the engine agreed, and
    /// under one lock, so that a pause and a stop never interleave.
    state: Mutex<State>,
    ready: Probe,
}

struct State {
    container: Option<Container<GenericImage>>,
    running: bool,
    paused: bool,
}

impl std::fmt::Debug for ContainerNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label)
    }
}

/// Runs `f` on a thread of its own: testcontainers' blocking calls run their own runtime, which
/// tokio forbids on a thread that is already inside one (a test's async setup, a fault case).
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| match s.spawn(f).join() {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

impl ContainerNode {
    /// Creates and starts (without waiting until ready) a container of `kind`'s image, on the
    /// host's network, running `cmd`. `request` carries the environment (its image name is
    /// replaced by the configured one).
    fn create(
        kind: ServerKind,
        port: u16,
        request: Request,
        cmd: &[&str],
        ready: Probe,
    ) -> Result<Self, ServerError> {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let spec = image(kind);
        let (name, tag) = split_image(&spec);
        let slug = kind.to_string().to_lowercase().replace(' ', "-");
        let pid = std::process::id();
        let container_name = format!(
            "locker-test-{slug}-{pid}-{}",
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let mut request = request
            .with_name(name)
            .with_tag(tag)
            .with_network("host")
            .with_label(LABEL, pid.to_string())
            .with_container_name(&container_name)
            .with_cmd(cmd.iter().copied());
        if let Ok(run) = std::env::var("LOCKER_TEST_RUN_ID") {
            request = request.with_label(RUN_LABEL, run);
        }
        // Registered by name before it exists: testcontainers leaves a container that was
        // created but failed to start.
        reap_at_exit(&container_name)?;
        let container = off_runtime(|| request.start()).map_err(|e| {
            remove_now(&container_name);
            ServerError::failed(format!(
                "{kind}: start a container from image {spec}: {e}. Is a Docker engine running \
                 (DOCKER_HOST)? With no image registry, build local images with \
                 `scripts/build-test-images` and set {} to the tag it prints",
                image_var(kind)
            ))
        })?;
        let node = ContainerNode {
            label: format!(
                "{kind} in container {container_name} (image {spec}) on 127.0.0.1:{port}"
            ),
            state: Mutex::new(State {
                container: Some(container),
                running: true,
                paused: false,
            }),
            ready,
        };
        let line = format!("locker-conformance: started {}\n", node.label);
        let _ = std::io::stderr().write_all(line.as_bytes());
        Ok(node)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `op` on the container, off any runtime.
    fn engine<T: Send>(
        &self,
        state: &State,
        what: &str,
        op: impl FnOnce(&Container<GenericImage>) -> testcontainers::core::error::Result<T> + Send,
    ) -> Result<T, ServerError> {
        let container = state
            .container
            .as_ref()
            .ok_or_else(|| ServerError::failed(format!("{}: removed", self.label)))?;
        off_runtime(|| op(container))
            .map_err(|e| ServerError::failed(format!("{}: {what}: {e}", self.label)))
    }

    fn is_running(&self) -> Result<bool, ServerError> {
        let state = self.lock();
        self.engine(&state, "inspect", |c| c.is_running())
    }

    /// The last lines of the container's output, for error messages.
    fn log_tail(&self) -> String {
        let state = self.lock();
        let out = self
            .engine(&state, "read its logs", |c| {
                let mut all = c.stdout_to_vec()?;
                all.extend(c.stderr_to_vec()?);
                Ok(all)
            })
            .unwrap_or_else(|e| e.to_string().into_bytes());
        let text = String::from_utf8_lossy(&out);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Member for ContainerNode {
    fn spawn(&self) -> Result<(), ServerError> {
        let mut state = self.lock();
        if !state.running {
            self.engine(&state, "start", |c| c.start())?;
            state.running = true;
        }
        Ok(())
    }

    fn wait_ready(&self, limit: Duration) -> Result<(), ServerError> {
        let start = Instant::now();
        let mut last_error = None;
        loop {
            // An engine error may pass (a busy engine): only a container that is known to
            // have stopped ends the wait early.
            match self.is_running() {
                Ok(true) if (self.ready)() => return Ok(()),
                Ok(true) => {}
                Ok(false) => {
                    return Err(ServerError::failed(format!(
                        "{} exited during start-up; its output ends with:\n{}",
                        self.label,
                        self.log_tail()
                    )))
                }
                Err(e) => last_error = Some(e),
            }
            if start.elapsed() > limit {
                let engine = last_error
                    .map(|e| format!(" (last engine error: {e})"))
                    .unwrap_or_default();
                return Err(ServerError::failed(format!(
                    "{} was not ready within {limit:?}{engine}; its output ends with:\n{}",
                    self.label,
                    self.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl ServerControl for ContainerNode {
    fn pause(&self) -> Result<(), ServerError> {
        let mut state = self.lock();
        if !state.paused {
            self.engine(&state, "pause", |c| futures::executor::block_on(c.pause()))?;
            state.paused = true;
        }
        Ok(())
    }

    fn resume(&self) -> Result<(), ServerError> {
        let mut state = self.lock();
        if state.paused {
            self.engine(&state, "unpause", |c| {
                futures::executor::block_on(c.unpause())
            })?;
            state.paused = false;
        }
        Ok(())
    }

    fn stop(&self) -> Result<(), ServerError> {
        let mut state = self.lock();
        if !state.running {
            return Ok(());
        }
        if state.paused {
            self.engine(&state, "unpause", |c| {
                futures::executor::block_on(c.unpause())
            })?;
            state.paused = false;
        }
        self.engine(&state, "stop", |c| c.stop_with_timeout(Some(10)))?;
        state.running = false;
        Ok(())
    }

    fn kill(&self) -> Result<(), ServerError> {
        let mut state = self.lock();
        if !state.running {
            return Ok(());
        }
        let id = state
            .container
            .as_ref()
            .map(|c| c.id().to_owned())
            .ok_or_else(|| ServerError::failed(format!("{}: removed", self.label)))?;
        // A paused container is unpaused first, as `stop` does (the engine may refuse to kill
        // it); it can then run for the moment between the two calls.
        if state.paused {
            docker_cli(&self.label, &["unpause", &id])?;
            state.paused = false;
        }
        docker_cli(&self.label, &["kill", "--signal", "KILL", &id])?;
        // The engine reports the container exited once it has reaped it.
        let start = Instant::now();
        while self.engine(&state, "inspect", |c| c.is_running())? {
            if start.elapsed() > Duration::from_secs(10) {
                return Err(ServerError::failed(format!(
                    "{}: still running 10 s after docker kill",
                    self.label
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        state.running = false;
        Ok(())
    }

    fn start(&self) -> Result<(), ServerError> {
        self.spawn()?;
        self.wait_ready(Duration::from_secs(60))
    }

    fn pids(&self) -> Vec<u32> {
        Vec::new()
    }
}

/// Runs `docker ARGS...` against [`docker_host`] (testcontainers has no kill), failing with its
/// error output.
fn docker_cli(label: &str, args: &[&str]) -> Result<(), ServerError> {
    let out = Command::new("docker")
        .env("DOCKER_HOST", docker_host())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| ServerError::io(format!("{label}: run docker {}", args.join(" ")), e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ServerError::failed(format!(
            "{label}: docker {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

impl Drop for ContainerNode {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        let container = state.container.take();
        let paused = state.paused;
        // Dropping the container removes it (`docker rm -f -v`), through the engine; a paused
        // one is unpaused first.
        off_runtime(move || {
            if let Some(c) = &container {
                if paused {
                    let _ = futures::executor::block_on(c.unpause());
                }
            }
            drop(container);
        });
    }
}

/// Removes a container by name through the docker command line, now, ignoring errors (it may
/// not exist).
fn remove_now(name: &str) {
    let _ = Command::new("docker")
        .env("DOCKER_HOST", docker_host())
        .args(["rm", "-f", "-v", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Registers a container (id or name) with this process's reaper, which removes it when the
/// process exits.
fn reap_at_exit(id: &str) -> Result<(), ServerError> {
    static REAPER: OnceLock<Result<Mutex<ChildStdin>, String>> = OnceLock::new();
    let reaper = REAPER
        .get_or_init(spawn_reaper)
        .as_ref()
        .map_err(|e| ServerError::failed(e.clone()))?;
    let mut stdin = reaper.lock().unwrap_or_else(|p| p.into_inner());
    writeln!(stdin, "{id}").map_err(|e| ServerError::io("register a container with the reaper", e))
}

/// Collects container ids, one per line, until its standard input ends (the test process is
/// gone, however it ended), then removes them all. It ignores the terminal's signals and runs
/// in its own session, so a Ctrl-C or a kill of the test's process group does not stop it first.
const REAPER: &str = r#"
trap '' INT TERM HUP
ids=
while read -r id; do ids="$ids $id"; done
if [ -n "$ids" ]; then
  docker unpause $ids >/dev/null 2>&1
  docker rm -f -v $ids >/dev/null 2>&1
fi
"#;

fn spawn_reaper() -> Result<Mutex<ChildStdin>, String> {
    if which("docker").is_none() {
        return Err(
            "the `docker` command is not in PATH: the harness uses it to remove its \
                    containers when the test process exits (install docker.io)"
                .into(),
        );
    }
    let mut cmd = match which("setsid") {
        Some(setsid) => {
            let mut cmd = Command::new(setsid);
            cmd.arg("sh");
            cmd
        }
        None => Command::new("sh"),
    };
    let mut child = cmd
        .arg("-c")
        .arg(REAPER)
        .arg("locker-test-reaper")
        .env("DOCKER_HOST", docker_host())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("start the container reaper (sh): {e}"))?;
    child
        .stdin
        .take()
        .map(Mutex::new)
        .ok_or_else(|| "the container reaper has no standard input".to_owned())
}

#[cfg(test)]
mod tests {
    use super::split_image;

    #[test]
    fn image_specs_split_at_the_tag() {
        let s = |a: &str, b: &str| (a.to_owned(), b.to_owned());
        assert_eq!(split_image("redis:7.4"), s("redis", "7.4"));
        assert_eq!(split_image("redis"), s("redis", "latest"));
        assert_eq!(
            split_image("quay.io/coreos/etcd:v3.5.17"),
            s("quay.io/coreos/etcd", "v3.5.17")
        );
        assert_eq!(
            split_image("localhost:5000/redis"),
            s("localhost:5000/redis", "latest")
        );
        assert_eq!(
            split_image("localhost:5000/redis:7"),
            s("localhost:5000/redis", "7")
        );
    }
}
