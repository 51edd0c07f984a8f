//! `locker run KEY -- COMMAND [ARGS...]`.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use locker::{LockAttempt, LockRequest};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};

use crate::{fail, Global, EX_HELD, EX_LOST, EX_SOFTWARE};

#[derive(Args, Debug)]
pub(crate) struct RunArgs {
    /// The lock key: one command per key runs at once across the cluster.
    key: String,
    /// How long to wait for the lock when someone else holds it (default: do not wait).
    #[arg(long, value_parser = humantime::parse_duration)]
    wait: Option<Duration>,
    /// A trace kept in the lock record and its owner hash (a run id, a host name).
    #[arg(long)]
    trace: Option<String>,
    /// After the lock is lost, how long the command has between SIGTERM and SIGKILL.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    kill_grace: Duration,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true, num_args = 1..)]
    command: Vec<String>,
}

fn forward(pid: Option<u32>, sig: Signal) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        let _ = kill(Pid::from_raw(pid), sig);
    }
}

fn exit_status_code(status: std::process::ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(1),
        (None, Some(sig)) => u8::try_from(128 + sig).unwrap_or(1),
        _ => 1,
    }
}

pub(crate) async fn run(global: &Global, args: RunArgs) -> ExitCode {
    let locker = match global.locker() {
        Ok(l) => l,
        Err(e) => return fail(&e),
    };
    let mut request = LockRequest::new(args.key.clone());
    if let Some(trace) = &args.trace {
        request = request.trace(trace.clone());
    }
    let deadline = tokio::time::Instant::now() + args.wait.unwrap_or_default();
    let guard = loop {
        match locker.acquire(request.clone()).await {
            Ok(LockAttempt::Acquired(guard)) => break guard,
            Ok(LockAttempt::Held(holder)) => {
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    eprintln!(
                        "locker: {:?} is held by {} (since {})",
                        args.key,
                        holder.owner_hash,
                        holder.acquired_at.to_rfc3339()
                    );
                    locker.shutdown().await;
                    return ExitCode::from(EX_HELD);
                }
                tokio::time::sleep((deadline - now).min(Duration::from_millis(200))).await;
            }
            Err(e) => {
                locker.abandon().await;
                return fail(&e);
            }
        }
    };

    let mut command = tokio::process::Command::new(&args.command[0]);
    command
        .args(&args.command[1..])
        .env("LOCKER_KEY", &args.key)
        .env("LOCKER_OWNER_HASH", guard.owner_hash())
        // Its own process group: a terminal's Ctrl-C reaches `locker`, which forwards it once.
        .process_group(0);
    if let Some(token) = guard.fencing_token() {
        command.env("LOCKER_FENCING_TOKEN", token.to_string());
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!("locker: cannot run {:?}: {e}", args.command[0]);
            let _ = guard.release().await;
            locker.shutdown().await;
            return ExitCode::from(if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            });
        }
    };
    let pid = child.id();
    let (mut sigint, mut sigterm) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(i), Ok(t)) => (i, t),
        _ => {
            eprintln!("locker: cannot listen for signals");
            return ExitCode::from(EX_SOFTWARE);
        }
    };
    let lost = guard.heartbeat().lost();
    tokio::pin!(lost);
    let code = loop {
        tokio::select! {
            status = child.wait() => match status {
                Ok(status) => break exit_status_code(status),
                Err(e) => {
                    eprintln!("locker: waiting for the command failed: {e}");
                    break EX_SOFTWARE;
                }
            },
            _ = sigint.recv() => forward(pid, Signal::SIGINT),
            _ = sigterm.recv() => forward(pid, Signal::SIGTERM),
            e = &mut lost => {
                eprintln!("locker: {e}");
                eprintln!(
                    "locker: stopping the command (SIGTERM, then SIGKILL after {:?})",
                    args.kill_grace
                );
                forward(pid, Signal::SIGTERM);
                if tokio::time::timeout(args.kill_grace, child.wait()).await.is_err() {
                    forward(pid, Signal::SIGKILL);
                    let _ = child.wait().await;
                }
                break EX_LOST;
            }
        }
    };
    if code != EX_LOST {
        let _ = guard.release().await;
    } else {
        drop(guard);
    }
    locker.shutdown().await;
    ExitCode::from(code)
}
