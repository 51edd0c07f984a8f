//! `locker supervise`: the process between `locker run` and its command, which owns the
//! command's whole process tree.
//!
//! `locker run` cannot stop anything once it is killed with SIGKILL (or by the OOM killer), and
//! `PR_SET_PDEATHSIG` reaches only the direct child, not what it forks. So `locker run` starts
//! this small process (its own binary, in a process group of its own), which:
//!
//! - makes itself the *child subreaper* (Linux `PR_SET_CHILD_SUBREAPER`): every orphan of the
//!   command's tree is reparented to it, so it sees (and reaps) the whole tree, even processes
//!   that left the command's process group, and exits only once the tree is gone;
//! - starts the command in a new process group, after installing its signal handlers;
//! - forwards SIGHUP, SIGINT, SIGTERM and SIGQUIT from `locker run` to the command's group;
//! - when the command exits and left processes behind, sends them SIGTERM, then SIGKILL after
//!   the kill grace;
//! - holds one end of a socket pair whose other end only `locker run` holds. End of file on it
//!   means `locker run` is gone (killed, crashed) or wants the tree killed now (seppuku past its
//!   grace): the supervisor then kills the whole tree with SIGKILL.
//!
//! Its exit code is the command's (128+N for a command ended by signal N), given only once
//! the whole tree is gone: that is what `locker run` waits for before it releases the lock.
//! It writes the command's process group to the socket, so that `locker run` can still kill
//! the group if the supervisor itself is killed.

use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Args;
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

use crate::EX_SOFTWARE;

#[derive(Args, Debug)]
pub(crate) struct SuperviseArgs {
    /// The supervisor's end of the socket pair `locker run` made.
    #[arg(long)]
    control_fd: RawFd,
    /// How long processes left behind by the command have between SIGTERM and SIGKILL.
    #[arg(long, value_parser = humantime::parse_duration)]
    kill_grace: Duration,
    /// The command and its arguments.
    #[arg(last = true, required = true, num_args = 1..)]
    command: Vec<String>,
}

/// What the supervisor's threads tell its main loop.
enum Event {
    /// A signal to forward to the command's group.
    Signal(Signal),
    /// `locker run` is gone, or asks for the tree to be killed now.
    ControlClosed,
    /// The command itself exited with this exit code (128+N for signal N).
    CommandExited(u8),
    /// No child is left: the whole tree is gone.
    TreeGone,
}

/// The exit code for a wait status, shells' way: the code, or 128+N for signal N.
pub(crate) fn status_code(status: WaitStatus) -> Option<u8> {
    match status {
        WaitStatus::Exited(_, code) => Some(u8::try_from(code).unwrap_or(1)),
        WaitStatus::Signaled(_, sig, _) => Some(u8::try_from(128 + sig as i32).unwrap_or(1)),
        _ => None,
    }
}

/// Checks the control socket's descriptor and keeps it from the command: only `locker run`
/// and this process hold the pair.
fn check_control_socket(fd: RawFd) -> nix::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    nix::sys::socket::getsockname::<nix::sys::socket::UnixAddr>(fd)?;
    let mut flags = FdFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFD)?);
    flags.insert(FdFlag::FD_CLOEXEC);
    fcntl(fd, FcntlArg::F_SETFD(flags))?;
    Ok(())
}

/// The direct children of this process (after reparenting: every orphan of the tree), from
/// `/proc`.
fn children() -> Vec<Pid> {
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| {
        let name = entry.ok()?.file_name().into_string().ok()?;
        let pid: i32 = name.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // pid (comm) state ppid ...: the name may hold spaces and parentheses.
        let after = &stat[stat.rfind(')')? + 1..];
        let ppid = after.split_whitespace().nth(1)?;
        (ppid == me).then(|| Pid::from_raw(pid))
    })
    .collect()
}

/// Sends `sig` to the command's group and to every child of this process (processes that left
/// the group are reparented here once their parent is gone).
fn signal_tree(group: Pid, sig: Signal) {
    let _ = kill(Pid::from_raw(-group.as_raw()), sig);
    for child in children() {
        let _ = kill(child, sig);
    }
}

pub(crate) fn supervise(args: SuperviseArgs) -> ExitCode {
    let control = args.control_fd;
    if let Err(e) = check_control_socket(control) {
        eprintln!("locker supervise: --control-fd {control}: {e} (it is started by `locker run`)");
        return ExitCode::from(EX_SOFTWARE);
    }
    #[cfg(target_os = "linux")]
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        eprintln!("locker: cannot become the subreaper of the command's tree: {e}");
        return ExitCode::from(EX_SOFTWARE);
    }
    let (events, inbox) = mpsc::channel();

    // Signal handlers before the command starts, so no signal meant for it is lost or kills
    // this process.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("locker: cannot start a runtime: {e}");
            return ExitCode::from(EX_SOFTWARE);
        }
    };
    let streams = runtime.block_on(async { crate::run::signal_streams() });
    let Ok(mut streams) = streams else {
        eprintln!("locker: cannot listen for signals");
        return ExitCode::from(EX_SOFTWARE);
    };
    let signal_events = events.clone();
    std::thread::spawn(move || {
        runtime.block_on(async move {
            while let Some(sig) = crate::run::next_signal(&mut streams).await {
                if signal_events.send(Event::Signal(sig)).is_err() {
                    break;
                }
            }
        })
    });

    let mut command = std::process::Command::new(&args.command[0]);
    command.args(&args.command[1..]).process_group(0);
    let child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!("locker: cannot run {:?}: {e}", args.command[0]);
            return ExitCode::from(if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            });
        }
    };
    let main = Pid::from_raw(child.id() as i32);
    // The group is the command's pid (process_group(0)); `locker run` needs it only if this
    // process dies.
    let _ = nix::sys::socket::send(
        control,
        format!("group {main}\n").as_bytes(),
        nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
    );

    let control_events = events.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        // Nothing is ever written by `locker run`: only the end of the stream matters.
        loop {
            match nix::unistd::read(control, &mut buf) {
                Ok(0) => break,
                Ok(_) | Err(Errno::EINTR) => {}
                Err(_) => break,
            }
        }
        let _ = control_events.send(Event::ControlClosed);
    });

    std::thread::spawn(move || loop {
        match waitpid(None, None) {
            Ok(status) if status.pid() == Some(main) => {
                if let Some(code) = status_code(status) {
                    let _ = events.send(Event::CommandExited(code));
                }
            }
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => {
                let _ = events.send(Event::TreeGone);
                break;
            }
        }
    });

    let mut code = None;
    // When the processes left are to be killed with SIGKILL.
    let mut kill_at: Option<Instant> = None;
    loop {
        let wait = match kill_at {
            Some(at) => at
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(10)),
            None => Duration::from_secs(3600),
        };
        match inbox.recv_timeout(wait) {
            Ok(Event::Signal(sig)) => signal_tree(main, sig),
            Ok(Event::ControlClosed) => {
                kill_at = Some(Instant::now());
            }
            Ok(Event::CommandExited(c)) => {
                code = Some(c);
                if !children().is_empty() {
                    eprintln!(
                        "locker: the command exited; stopping what it left running (SIGTERM, \
                         then SIGKILL after {})",
                        humantime::format_duration(args.kill_grace)
                    );
                    signal_tree(main, Signal::SIGTERM);
                    let at = Instant::now() + args.kill_grace;
                    kill_at = Some(kill_at.map_or(at, |k| k.min(at)));
                }
            }
            Ok(Event::TreeGone) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if kill_at.is_some_and(|at| Instant::now() >= at) {
            // Repeated until the tree is gone: children of a killed process are reparented
            // here and found by the next round.
            signal_tree(main, Signal::SIGKILL);
            kill_at = Some(Instant::now() + Duration::from_millis(20));
        }
    }
    ExitCode::from(code.unwrap_or(EX_SOFTWARE))
}
