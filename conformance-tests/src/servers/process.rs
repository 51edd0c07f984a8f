//! Servers run as local processes: a wrapper that never leaves one behind, free ports, and
//! readiness probes.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

use super::{Member, ServerControl, ServerError};

/// Runs the server in the background, prints its pid, and stops it when its standard input
/// closes, which the kernel does when the test process exits for any reason (a panic, a
/// `static` server never dropped, a killed test run). So no server outlives its tests.
const WRAPPER: &str = r#"
"$@" >>"$LOCKER_TEST_LOG" 2>&1 </dev/null &
pid=$!
echo "$pid"
if read -r _line; then
  # A controlled stop: the harness has stopped the server and keeps its data.
  wait "$pid"
  exit 0
fi
# End of input: the test process is gone. Wake the server's whole group (it may have been
# paused), stop it, and after 10 s kill whatever is left; then delete its files.
kill -CONT -- "-$pid" 2>/dev/null
kill "-$LOCKER_TEST_STOP_SIGNAL" "$pid" 2>/dev/null
( sleep 10; kill -KILL -- "-$pid" 2>/dev/null ) &
killer=$!
wait "$pid"
kill -KILL -- "-$pid" 2>/dev/null
kill "$killer" 2>/dev/null
if [ -n "$LOCKER_TEST_CLEANUP" ]; then rm -rf "$LOCKER_TEST_CLEANUP"; fi
"#;

type Probe = Box<dyn Fn() -> bool + Send + Sync>;

/// One server process, which can be stopped, started again on the same port and data, paused
/// and resumed.
pub(crate) struct ServerProcess {
    label: String,
    argv: Vec<OsString>,
    log: PathBuf,
    cleanup: Option<PathBuf>,
    stop_signal: Signal,
    ready: Probe,
    running: Mutex<Option<Running>>,
}

struct Running {
    wrapper: Child,
    pid: Pid,
    stdin: Option<ChildStdin>,
}

impl ServerProcess {
    /// A server run as `program args...` in its own session (so that pausing it pauses its
    /// children, and a terminal's Ctrl-C reaches the wrapper, not the server).
    pub(crate) fn new(
        label: impl Into<String>,
        program: &Path,
        args: Vec<OsString>,
        run_as: Option<&RunAs>,
        log: PathBuf,
        stop_signal: Signal,
        ready: impl Fn() -> bool + Send + Sync + 'static,
    ) -> Self {
        let mut argv: Vec<OsString> = vec!["setsid".into()];
        if let Some(user) = run_as {
            argv.extend(user.setpriv_args());
        }
        argv.push(program.into());
        argv.extend(args);
        ServerProcess {
            label: label.into(),
            argv,
            log,
            cleanup: None,
            stop_signal,
            ready: Box::new(ready),
            running: Mutex::new(None),
        }
    }

    /// Deletes `dir` once the server has exited, even when the test process died first.
    pub(crate) fn cleanup_on_exit(mut self, dir: PathBuf) -> Self {
        self.cleanup = Some(dir);
        self
    }

    /// Starts the process (without waiting for it to be ready).
    pub(crate) fn spawn(&self) -> Result<(), ServerError> {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if running.is_some() {
            return Ok(());
        }
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(WRAPPER)
            .arg("locker-test-wrapper")
            .args(&self.argv)
            .env("LOCKER_TEST_LOG", &self.log)
            .env("LOCKER_TEST_STOP_SIGNAL", signal_name(self.stop_signal))
            .env(
                "LOCKER_TEST_CLEANUP",
                self.cleanup.clone().unwrap_or_default(),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut wrapper = cmd
            .spawn()
            .map_err(|e| ServerError::io(format!("start {}", self.label), e))?;
        let stdout = wrapper.stdout.take();
        let mut line = String::new();
        if let Some(stdout) = stdout {
            let _ = BufReader::new(stdout).read_line(&mut line);
        }
        let pid: i32 = line.trim().parse().map_err(|_| {
            let _ = wrapper.kill();
            ServerError::failed(format!(
                "{}: the wrapper printed no pid ({line:?})",
                self.label
            ))
        })?;
        *running = Some(Running {
            stdin: wrapper.stdin.take(),
            wrapper,
            pid: Pid::from_raw(pid),
        });
        Ok(())
    }

    /// Waits until the readiness probe answers, failing early if the process died.
    pub(crate) fn wait_ready(&self, limit: Duration) -> Result<(), ServerError> {
        let start = Instant::now();
        loop {
            if (self.ready)() {
                // A server that could not bind its port exits at once; make sure the answer
                // came from ours and not from another test process's server on that port.
                std::thread::sleep(Duration::from_millis(50));
                if self.is_alive() {
                    return Ok(());
                }
            }
            if !self.is_alive() {
                return Err(ServerError::failed(format!(
                    "{} exited during start-up; its log ({}) ends with:\n{}",
                    self.label,
                    self.log.display(),
                    log_tail(&self.log)
                )));
            }
            if start.elapsed() > limit {
                return Err(ServerError::failed(format!(
                    "{} was not ready within {limit:?}; its log ({}) ends with:\n{}",
                    self.label,
                    self.log.display(),
                    log_tail(&self.log)
                )));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn pid(&self) -> Option<Pid> {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|r| r.pid)
    }

    fn is_alive(&self) -> bool {
        self.pid().is_some_and(process_alive)
    }

    fn signal_group(&self, signal: Signal) -> Result<(), ServerError> {
        let pid = self
            .pid()
            .ok_or_else(|| ServerError::failed(format!("{} is not running", self.label)))?;
        killpg(pid, signal)
            .map_err(|e| ServerError::failed(format!("{}: {signal} failed: {e}", self.label)))
    }
}

impl ServerControl for ServerProcess {
    fn pause(&self) -> Result<(), ServerError> {
        self.signal_group(Signal::SIGSTOP)
    }

    fn resume(&self) -> Result<(), ServerError> {
        self.signal_group(Signal::SIGCONT)
    }

    fn stop(&self) -> Result<(), ServerError> {
        self.halt(false)
    }

    fn kill(&self) -> Result<(), ServerError> {
        self.halt(true)
    }

    fn start(&self) -> Result<(), ServerError> {
        self.spawn()?;
        self.wait_ready(Duration::from_secs(60))
    }

    fn pids(&self) -> Vec<u32> {
        self.pid()
            .and_then(|p| u32::try_from(p.as_raw()).ok())
            .into_iter()
            .collect()
    }
}

impl ServerProcess {
    /// Stops the server with its stop signal (waking it first if paused), or with `kill` at
    /// once with SIGKILL to its whole group (a paused one too), and reaps it, keeping its data.
    fn halt(&self, kill_now: bool) -> Result<(), ServerError> {
        let mut slot = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let Some(pid) = slot.as_ref().map(|r| r.pid) else {
            return Ok(());
        };
        if kill_now {
            // ESRCH: it died by itself, and is reaped below all the same.
            match killpg(pid, Signal::SIGKILL) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => {
                    return Err(ServerError::failed(format!(
                        "{}: SIGKILL failed: {e}",
                        self.label
                    )))
                }
            }
        }
        let Some(mut running) = slot.take() else {
            return Ok(());
        };
        drop(slot);
        if kill_now {
            wait_until(Duration::from_secs(5), || !process_alive(pid));
        } else {
            let _ = killpg(pid, Signal::SIGCONT);
            let _ = kill(pid, self.stop_signal);
            if !wait_until(Duration::from_secs(15), || !process_alive(pid)) {
                let _ = killpg(pid, Signal::SIGKILL);
                wait_until(Duration::from_secs(5), || !process_alive(pid));
            }
        }
        // A line (not end of input) tells the wrapper this stop was ours: it reaps the server
        // and exits, keeping the data for a restart.
        if let Some(mut stdin) = running.stdin.take() {
            let _ = stdin.write_all(b"stop\n");
        }
        let _ = running.wrapper.wait();
        // Children of the server (PostgreSQL backends) leave with it; make sure.
        if !wait_until(Duration::from_secs(5), || !group_alive(pid)) {
            let _ = killpg(pid, Signal::SIGKILL);
            if !wait_until(Duration::from_secs(5), || !group_alive(pid)) {
                return Err(ServerError::failed(format!(
                    "{}: processes of group {pid} survived SIGKILL",
                    self.label
                )));
            }
        }
        Ok(())
    }
}

impl Member for ServerProcess {
    fn spawn(&self) -> Result<(), ServerError> {
        ServerProcess::spawn(self)
    }

    fn wait_ready(&self, limit: Duration) -> Result<(), ServerError> {
        ServerProcess::wait_ready(self, limit)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = ServerControl::stop(self);
    }
}

impl std::fmt::Debug for ServerProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerProcess")
            .field("label", &self.label)
            .field("pid", &self.pid())
            .finish()
    }
}

/// A server process that is gone or a zombie waiting to be reaped.
pub(crate) fn process_alive(pid: Pid) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().chars().next()),
            Some(Some('Z' | 'X'))
        ),
        Err(_) => false,
    }
}

fn group_alive(pgid: Pid) -> bool {
    !matches!(killpg(pgid, None), Err(Errno::ESRCH))
}

fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

fn signal_name(s: Signal) -> &'static str {
    s.as_str().trim_start_matches("SIG")
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// An unprivileged user to run a server as, for servers that refuse root (PostgreSQL).
#[derive(Debug, Clone)]
pub(crate) struct RunAs {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
}

impl RunAs {
    /// `nobody` when running as root, `None` otherwise.
    pub(crate) fn nobody_if_root() -> Result<Option<RunAs>, ServerError> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(None);
        }
        let user = nix::unistd::User::from_name("nobody")
            .map_err(|e| ServerError::failed(format!("look up user nobody: {e}")))?
            .ok_or_else(|| {
                ServerError::failed(
                    "running as root, and there is no user `nobody` to run the server as",
                )
            })?;
        Ok(Some(RunAs {
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        }))
    }

    fn setpriv_args(&self) -> Vec<OsString> {
        vec![
            "setpriv".into(),
            format!("--reuid={}", self.uid).into(),
            format!("--regid={}", self.gid).into(),
            "--clear-groups".into(),
            "--".into(),
        ]
    }

    /// `command` run as this user.
    pub(crate) fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new("setpriv");
        cmd.args(self.setpriv_args()[1..].iter()).arg(program);
        cmd
    }

    /// Gives `dir` (and what is in it) to this user.
    pub(crate) fn own(&self, dir: &Path) -> Result<(), ServerError> {
        std::os::unix::fs::chown(dir, Some(self.uid), Some(self.gid))
            .map_err(|e| ServerError::io(format!("chown {}", dir.display()), e))
    }
}

/// A loopback port that is free now, and, with `plus` (Redis Cluster's bus port offset), whose
/// `port + plus` is free too. Ports come from below the kernel's ephemeral range (32768 and up),
/// bus ports included, so that client connections never take them.
pub(crate) fn free_port(plus: u16) -> Result<u16, ServerError> {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    const LOW: u16 = 20_000;
    let high: u16 = if plus == 0 { 32_000 } else { 32_000 - plus };
    let span = high - LOW;
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default()
        ^ std::process::id();
    let _ = NEXT.compare_exchange(
        0,
        (seed % 10_000) as u16 + 1,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..2000 {
        let port = LOW + NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && (plus == 0 || free(port + plus)) {
            return Ok(port);
        }
    }
    Err(ServerError::failed(format!(
        "no free loopback port between {LOW} and {high}"
    )))
}

/// Sends `request` to a loopback port and returns what came back within a second, reading
/// until `complete` says the answer is whole (or the server closes).
pub(crate) fn tcp_exchange(
    port: u16,
    request: &[u8],
    complete: impl Fn(&[u8]) -> bool,
) -> Option<String> {
    let timeout = Duration::from_secs(1);
    let mut stream = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    stream.write_all(request).ok()?;
    let mut buf = vec![0; 4096];
    let mut out = Vec::new();
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if complete(&out) || out.len() > 64 * 1024 {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// A private temporary directory named `locker-test-<what>-…`.
pub(crate) fn temp_dir(what: &str) -> Result<tempfile::TempDir, ServerError> {
    tempfile::Builder::new()
        .prefix(&format!("locker-test-{what}-"))
        .tempdir()
        .map_err(|e| ServerError::io("create a temporary directory", e))
}

/// Finds `name` in `PATH`.
pub(crate) fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}
