//! `locker run KEY -- COMMAND [ARGS...]`.
//!
//! The command runs under `locker supervise` (see [`crate::supervise`]), which owns its whole
//! process tree. This process holds the lock and releases it only after the supervisor has
//! exited, which it does only once the tree is gone. Every other way out (the supervisor killed,
//! a failed wait, a panic) leaves the lock to expire with this process's liveness record
//! instead of releasing it under a command that may still run.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use locker::{ErrorKind, LockRequest, Locker};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncBufReadExt;
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::Instant;

use crate::{fail, Global, EX_HELD, EX_LOST, EX_SOFTWARE};

const RUN_HELP: &str = "\
The command gets these variables:
  LOCKER_KEY            the lock key
  LOCKER_OWNER_HASH     this acquisition's owner hash (`locker owner`, `locker release --owner`)
  LOCKER_FENCING_TOKEN  the lock's fencing token, when the backend issues them: pass it to the
                        systems the command writes to, so that they refuse a stale holder
  LOCKER_PERMIT_KEY     with --permits, the key of the permit held (fencing tokens are per
                        permit: pass it along with the token); empty without --permits

The command runs in a process group of its own, under a small supervisor process that owns its
whole tree (Linux: it is the tree's subreaper). SIGHUP, SIGINT, SIGTERM and SIGQUIT sent to
`locker` are passed to that group (those ignored when `locker` started, as under nohup, stay
ignored), and the lock is held until the command has exited. When the command exits, what it
left running is stopped (SIGTERM, then SIGKILL after --kill-grace) before the lock is released.
When the lock is lost (taken over after this process froze past the liveness TTL, or released
by an operator), the group gets SIGTERM, then SIGKILL after --kill-grace, and `locker` exits 76.
When `locker` itself is killed (even with SIGKILL), the supervisor kills the command's tree at
once. When `locker` is the terminal's foreground job, the command's group gets the terminal
(Ctrl-C and Ctrl-\\ reach it directly; it may read it); Ctrl-Z cannot suspend a command that
holds a lock.

Exit codes: the command's own (128+N when signal N ended it); 64 bad usage; 69 the backend
cannot be reached; 70 internal error; 75 the lock is held by another process (or
--conflict-exit-code); 76 the lock was lost and the command stopped; 77 credentials refused;
126 the command could not be started; 127 the command was not found; 128+N when signal N
arrived before the command started.";

/// `--wait`: a duration or `forever`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// At most this long (zero: do not wait).
    For(Duration),
    /// Until the lock is free.
    Forever,
}

fn parse_wait(s: &str) -> Result<Wait, String> {
    match s.trim() {
        "forever" | "inf" | "infinity" => Ok(Wait::Forever),
        "0" => Ok(Wait::For(Duration::ZERO)),
        other => humantime::parse_duration(other)
            .map(Wait::For)
            .map_err(|e| format!("{e} (a duration like 30s or 5m, 0, or forever)")),
    }
}

#[derive(Args, Debug)]
#[command(after_help = RUN_HELP)]
pub(crate) struct RunArgs {
    /// The lock key: one command per key runs at once across the cluster.
    key: String,
    /// How long to wait for the lock when someone else holds it: a duration (30s, 5m), 0 (do
    /// not wait) or forever. The wait is woken by the store when the lock is released (Redis,
    /// PostgreSQL, etcd; SQLite polls with backoff) and tries again when the
    /// holder would be found dead; a signal ends it.
    #[arg(long, value_name = "DURATION|forever", default_value = "0s", value_parser = parse_wait)]
    wait: Wait,
    /// Let up to N copies run at once across the cluster (a semaphore of N permits on KEY;
    /// every caller of KEY must pass the same N). The command gets LOCKER_PERMIT_KEY, the
    /// key of the permit it holds.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=i64::from(locker::MAX_PERMITS)))]
    permits: Option<u32>,
    /// The exit code when someone else still holds the lock after --wait.
    #[arg(long, value_name = "N", default_value_t = EX_HELD)]
    conflict_exit_code: u8,
    /// A trace kept in the lock record and its owner hash (a run id, a host name).
    #[arg(long)]
    trace: Option<String>,
    /// How long the command has between SIGTERM and SIGKILL after the lock is lost, and what it
    /// left running after it exited.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    kill_grace: Duration,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true, num_args = 1..)]
    command: Vec<String>,
}

/// The signals `locker run` passes on to its command (and the supervisor to the group).
///
/// A signal this process was started with ignored (`nohup` ignores SIGHUP; a shell's background
/// job ignores SIGINT and SIGQUIT) is left ignored: no handler, nothing passed on, and the
/// command inherits the ignoring, as it would without `locker`.
pub(crate) struct SignalStreams {
    streams: Vec<(Signal, tokio::signal::unix::Signal)>,
}

/// The signals ignored at start, from `/proc/self/status` (empty where it cannot be read).
fn ignored_at_start() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("SigIgn:"))
                .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// Installs the handlers (inside a runtime); from then on these signals are caught, not fatal.
pub(crate) fn signal_streams() -> std::io::Result<SignalStreams> {
    let ignored = ignored_at_start();
    let mut streams = Vec::new();
    for sig in [
        Signal::SIGHUP,
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGQUIT,
    ] {
        if ignored & (1 << (sig as i32 - 1)) == 0 {
            streams.push((sig, signal(SignalKind::from_raw(sig as i32))?));
        }
    }
    Ok(SignalStreams { streams })
}

/// The next signal caught (pending forever when every signal is ignored).
pub(crate) async fn next_signal(s: &mut SignalStreams) -> Option<Signal> {
    std::future::poll_fn(|cx| {
        for (sig, stream) in &mut s.streams {
            if let std::task::Poll::Ready(r) = stream.poll_recv(cx) {
                return std::task::Poll::Ready(r.map(|()| *sig));
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// This binary, to start as the supervisor (on Linux, even if the file was replaced since).
fn this_binary() -> std::io::Result<std::path::PathBuf> {
    if cfg!(target_os = "linux") {
        Ok("/proc/self/exe".into())
    } else {
        std::env::current_exe()
    }
}

/// A signal arrived before the command started: nothing runs, so whatever was acquired is
/// released, and the exit code says which signal (shells' 128+N).
async fn interrupted(locker: &Locker, sig: Option<Signal>) -> ExitCode {
    let sig = sig.unwrap_or(Signal::SIGTERM);
    say!("locker: {sig} before the command started; not running it");
    locker.shutdown().await;
    ExitCode::from(u8::try_from(128 + sig as i32).unwrap_or(EX_SOFTWARE))
}

pub(crate) async fn run(global: &Global, args: RunArgs) -> ExitCode {
    // Handlers first: from now on these signals end the wait or reach the command, and never
    // kill `locker` between the acquire and the command.
    let Ok(mut signals) = signal_streams() else {
        say!("locker: cannot listen for signals");
        return ExitCode::from(EX_SOFTWARE);
    };
    let locker = match global.locker() {
        Ok(l) => l,
        Err(e) => return fail(&e),
    };
    let mut request = LockRequest::new(args.key.clone());
    if let Some(trace) = &args.trace {
        request = request.trace(trace.clone());
    }
    let wait = match args.wait {
        Wait::For(d) => locker::Wait::up_to(d),
        Wait::Forever => locker::Wait::forever(),
    };
    let acquire = async {
        match args.permits {
            None => locker.acquire_wait(request, wait).await,
            Some(permits) => locker.semaphore(request, permits)?.acquire_wait(wait).await,
        }
    };
    let attempt = tokio::select! {
        attempt = acquire => attempt,
        sig = next_signal(&mut signals) => return interrupted(&locker, sig).await,
    };
    let guard = match attempt {
        Ok(guard) => guard,
        Err(e) if e.kind() == ErrorKind::MutexTimeout => {
            match e.holder() {
                Some(holder) if args.permits.is_some() => say!(
                    "locker: every permit of {:?} is held ({} since {}, ...)",
                    args.key,
                    holder.owner_hash,
                    holder.acquired_at.to_rfc3339()
                ),
                Some(holder) => say!(
                    "locker: {:?} is held by {} (since {})",
                    args.key,
                    holder.owner_hash,
                    holder.acquired_at.to_rfc3339()
                ),
                None => say!("locker: {:?} is held", args.key),
            }
            locker.shutdown().await;
            return ExitCode::from(args.conflict_exit_code);
        }
        Err(e) => {
            locker.abandon().await;
            return fail(&e);
        }
    };

    // The control socket: the supervisor holds one end, this process the other. Both ends are
    // close-on-exec; the supervisor's end is made inheritable only for its own spawn.
    let (ours, theirs) = match UnixStream::pair().and_then(|pair| {
        pair.0.set_nonblocking(true)?;
        Ok(pair)
    }) {
        Ok(pair) => pair,
        Err(e) => {
            say!("locker: cannot make the control socket: {e}");
            let _ = guard.release().await;
            locker.shutdown().await;
            return ExitCode::from(EX_SOFTWARE);
        }
    };
    let inheritable = {
        use nix::fcntl::{fcntl, FcntlArg, FdFlag};
        fcntl(theirs.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty()))
    };
    let mut command = tokio::process::Command::new(match this_binary() {
        Ok(path) => path,
        Err(e) => {
            say!("locker: cannot find its own binary to supervise the command: {e}");
            let _ = guard.release().await;
            locker.shutdown().await;
            return ExitCode::from(EX_SOFTWARE);
        }
    });
    command
        .arg0("locker")
        .arg("supervise")
        .arg("--control-fd")
        .arg(theirs.as_raw_fd().to_string())
        .arg("--kill-grace")
        .arg(humantime::format_duration(args.kill_grace).to_string())
        .arg("--")
        .args(&args.command)
        .env("LOCKER_KEY", &args.key)
        .env("LOCKER_OWNER_HASH", guard.owner_hash())
        .env(
            "LOCKER_PERMIT_KEY",
            if args.permits.is_some() {
                guard.key()
            } else {
                ""
            },
        )
        // Its own process group: a terminal's Ctrl-C reaches `locker`, which passes it on once.
        .process_group(0);
    if let Some(token) = guard.fencing_token() {
        command.env("LOCKER_FENCING_TOKEN", token.to_string());
    }
    // The tree's orphans come here if the supervisor dies, so that they can be killed.
    let subreaper = nix::sys::prctl::set_child_subreaper(true).is_ok();
    let spawned = match inheritable {
        Ok(_) => command.spawn(),
        Err(e) => Err(e.into()),
    };
    // Only the supervisor holds its end now: its end of file means this process is gone.
    drop(theirs);
    let mut supervisor = match spawned {
        Ok(child) => child,
        Err(e) => {
            // Nothing was started: the lock can go.
            say!("locker: cannot start the command's supervisor: {e}");
            let _ = guard.release().await;
            locker.shutdown().await;
            return ExitCode::from(EX_SOFTWARE);
        }
    };
    let supervisor_pid = supervisor
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .map(Pid::from_raw);
    let forward = |sig: Signal| {
        if let Some(pid) = supervisor_pid {
            let _ = kill(pid, sig);
        }
    };

    // The command's process group, as the supervisor reports it once its handlers are in
    // place and the command started: signals are held back until then (sent earlier, they
    // would kill the supervisor), and the group is killed from here if the supervisor dies.
    let (group_tx, mut group_rx) = tokio::sync::watch::channel(None::<i32>);
    let control = tokio::net::UnixStream::from_std(ours);
    let mut control_writer = match control {
        Ok(stream) => {
            let (reader, writer) = stream.into_split();
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(reader).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(group) = line.strip_prefix("group ").and_then(|g| g.parse().ok()) {
                        group_tx.send_replace(Some(group));
                    }
                }
            });
            Some(writer)
        }
        Err(e) => {
            say!("locker: cannot use the control socket: {e}");
            None
        }
    };

    let lost = guard.heartbeat().lost();
    tokio::pin!(lost);
    let mut lost_yet = false;
    // Signals that arrived before the supervisor was ready.
    let mut held_back: Vec<Signal> = Vec::new();
    let mut ready = false;
    // When the supervisor is told to kill the tree with SIGKILL (seppuku past the grace).
    let mut kill_at: Option<Instant> = None;
    let status = loop {
        let kill_deadline = kill_at.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            status = supervisor.wait() => break status,
            changed = group_rx.changed(), if !ready => {
                if changed.is_err() || group_rx.borrow().is_some() {
                    ready = true;
                    for sig in held_back.drain(..) {
                        forward(sig);
                    }
                }
            }
            sig = next_signal(&mut signals) => {
                match sig {
                    Some(sig) if ready => forward(sig),
                    Some(sig) => held_back.push(sig),
                    None => {}
                }
            }
            e = &mut lost, if !lost_yet => {
                lost_yet = true;
                say!("locker: {e}");
                say!(
                    "locker: stopping the command (SIGTERM, then SIGKILL after {})",
                    humantime::format_duration(args.kill_grace)
                );
                if ready {
                    forward(Signal::SIGTERM);
                } else {
                    held_back.push(Signal::SIGTERM);
                }
                kill_at = Some(Instant::now() + args.kill_grace);
            }
            () = tokio::time::sleep_until(kill_deadline), if kill_at.is_some() => {
                kill_at = None;
                // End of file: the supervisor kills the whole tree with SIGKILL.
                drop(control_writer.take());
            }
        }
    };
    let code = match status {
        // The supervisor exits by itself only once the whole tree is gone.
        Ok(status) if status.code().is_some() => status
            .code()
            .and_then(|c| u8::try_from(c).ok())
            .unwrap_or(EX_SOFTWARE),
        other => {
            // The supervisor was killed, or could not be waited for: the command's tree may
            // still run. As the subreaper, this process now inherits the tree's orphans: kill
            // them until none is left. Only then may the lock go.
            match other {
                Ok(status) => say!("locker: the command's supervisor ended by {status}"),
                Err(e) => say!("locker: waiting for the command's supervisor failed: {e}"),
            }
            drop(control_writer.take());
            let group = *group_rx.borrow();
            if subreaper && kill_orphans(group, ORPHANS_LIMIT).await {
                say!("locker: the command's tree was killed");
                if lost_yet {
                    drop(guard);
                } else {
                    let _ = guard.release().await;
                }
                locker.shutdown().await;
            } else {
                if let Some(group) = group {
                    let _ = kill(Pid::from_raw(-group), Signal::SIGKILL);
                }
                say!(
                    "locker: the command's tree may still run; the lock is not released (it is \
                     free once this process's liveness record expires)"
                );
                locker.abandon().await;
                drop(guard);
            }
            return ExitCode::from(EX_SOFTWARE);
        }
    };
    if lost_yet {
        drop(guard);
        locker.shutdown().await;
        return ExitCode::from(EX_LOST);
    }
    let _ = guard.release().await;
    locker.shutdown().await;
    ExitCode::from(code)
}

/// How long `locker run` tries to kill an orphaned tree before it gives up on releasing.
const ORPHANS_LIMIT: Duration = Duration::from_secs(10);

/// Kills the command's group and every child of this process (the orphans of the tree,
/// reparented here as the subreaper), reaping them, until none is left. False if some
/// remained after `limit`.
async fn kill_orphans(group: Option<i32>, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    loop {
        if let Some(group) = group {
            let _ = kill(Pid::from_raw(-group), Signal::SIGKILL);
        }
        let children = crate::supervise::children_of(std::process::id());
        if children.is_empty() {
            return true;
        }
        for child in children {
            let _ = kill(child, Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(child, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
