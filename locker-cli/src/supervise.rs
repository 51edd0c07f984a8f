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
//! It writes the command's process group to the socket once its signal handlers are installed
//! and the command started: `locker run` holds signals back until then, and can still kill the
//! group if the supervisor itself is killed.
//!
//! The command stays unreaped (a zombie) until the rest of its tree is gone, so that its
//! process group id, which the supervisor keeps signalling, cannot be reused by another
//! process group meanwhile.
//!
//! When `locker run` owns the terminal (it is the foreground job), the terminal is handed to
//! the command's group, so that an interactive command can read it and Ctrl-C, Ctrl-\ reach it
//! directly; it is handed back before the supervisor exits. A command holding a lock cannot be
//! suspended from the terminal (Ctrl-Z): the lock would outlive it, so it is continued at once.

use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Args;
use nix::errno::Errno;
use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
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
    /// The command itself exited with this exit code (128+N for signal N); it stays unreaped
    /// until the rest of the tree is gone.
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

/// The direct children of process `parent` (for the supervisor: after reparenting, every
/// orphan of the tree), zombies included, from `/proc`.
pub(crate) fn children_of(parent: u32) -> Vec<Pid> {
    let parent = parent.to_string();
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
        (ppid == parent).then(|| Pid::from_raw(pid))
    })
    .collect()
}

/// Sends `sig` to the command's group and to every other child of this process (processes
/// that left the group are reparented here once their parent is gone). A stopped process
/// keeps a SIGTERM pending: it is continued too.
fn signal_tree(group: Pid, sig: Signal) {
    let _ = kill(Pid::from_raw(-group.as_raw()), sig);
    let others: Vec<Pid> = children_of(std::process::id())
        .into_iter()
        .filter(|&c| c != group)
        .collect();
    for &child in &others {
        let _ = kill(child, sig);
    }
    if sig == Signal::SIGTERM {
        let _ = kill(Pid::from_raw(-group.as_raw()), Signal::SIGCONT);
        for child in others {
            let _ = kill(child, Signal::SIGCONT);
        }
    }
}

/// Runs `f` with SIGTTOU blocked in this thread: a process outside the terminal's foreground
/// group may then change it.
fn with_sigttou_blocked<T>(f: impl FnOnce() -> T) -> T {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTTOU);
    let mut old = SigSet::empty();
    let blocked =
        nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), Some(&mut old));
    let result = f();
    if blocked.is_ok() {
        let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    }
    result
}

/// The terminal's foreground group, if stdin is a terminal and `locker run` (this process's
/// parent) is its foreground job: the group to hand the terminal back to.
fn terminal_of_parent() -> Option<Pid> {
    let foreground = nix::unistd::tcgetpgrp(std::io::stdin()).ok()?;
    let parent_group = nix::unistd::getpgid(Some(nix::unistd::getppid())).ok()?;
    (foreground == parent_group).then_some(foreground)
}

fn give_terminal(group: Pid) {
    let _ = with_sigttou_blocked(|| nix::unistd::tcsetpgrp(std::io::stdin(), group));
}

/// Reaps the tree (on its own thread): everything but the command as it ends; the command once
/// it exited and nothing else is left. Continues a command stopped from the terminal.
fn reap(main: Pid, events: mpsc::Sender<Event>) {
    let mut told_tty = false;
    // Until the command exits: wait for any child, look before reaping.
    loop {
        match waitid(
            Id::All,
            WaitPidFlag::WEXITED | WaitPidFlag::WSTOPPED | WaitPidFlag::WNOWAIT,
        ) {
            Ok(WaitStatus::Stopped(pid, sig)) => {
                // Consume the stop report.
                let _ = waitpid(pid, Some(WaitPidFlag::WUNTRACED | WaitPidFlag::WNOHANG));
                match sig {
                    Signal::SIGTSTP => {
                        say!("locker: a command that holds a lock cannot be suspended; continuing it");
                        let _ = kill(Pid::from_raw(-main.as_raw()), Signal::SIGCONT);
                        let _ = kill(pid, Signal::SIGCONT);
                    }
                    // Continuing it would only stop it again.
                    Signal::SIGTTIN | Signal::SIGTTOU if !told_tty => {
                        told_tty = true;
                        say!(
                            "locker: the command stopped to use the terminal, which `locker` does \
                             not own (it runs in the background); give it no terminal \
                             (</dev/null) or run `locker` in the foreground"
                        );
                    }
                    _ => {}
                }
            }
            Ok(status) if status.pid() == Some(main) => {
                if let Some(code) = status_code(status) {
                    let _ = events.send(Event::CommandExited(code));
                    break;
                }
            }
            Ok(status) => {
                if let Some(pid) = status.pid() {
                    let _ = waitpid(pid, Some(WaitPidFlag::WNOHANG));
                }
            }
            Err(Errno::EINTR) => {}
            Err(_) => {
                let _ = events.send(Event::TreeGone);
                return;
            }
        }
    }
    // The command is a zombie now, which keeps its group id reserved: reap the others until
    // none is left, then the command.
    loop {
        let others: Vec<Pid> = children_of(std::process::id())
            .into_iter()
            .filter(|&c| c != main)
            .collect();
        if others.is_empty() {
            let _ = waitpid(main, None);
            let _ = events.send(Event::TreeGone);
            return;
        }
        for pid in others {
            let _ = waitpid(pid, Some(WaitPidFlag::WNOHANG));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub(crate) fn supervise(args: SuperviseArgs) -> ExitCode {
    let control = args.control_fd;
    if let Err(e) = check_control_socket(control) {
        say!("locker supervise: --control-fd {control}: {e} (it is started by `locker run`)");
        return ExitCode::from(EX_SOFTWARE);
    }
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        say!("locker: cannot become the subreaper of the command's tree: {e}");
        return ExitCode::from(EX_SOFTWARE);
    }
    let (events, inbox) = mpsc::channel();

    // Signal handlers before the command starts, so no signal meant for it is lost or kills
    // this process (`locker run` holds signals back until the "group" line below).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            say!("locker: cannot start a runtime: {e}");
            return ExitCode::from(EX_SOFTWARE);
        }
    };
    let streams = runtime.block_on(async { crate::run::signal_streams() });
    let Ok(mut streams) = streams else {
        say!("locker: cannot listen for signals");
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

    let terminal = terminal_of_parent();
    let mut command = std::process::Command::new(&args.command[0]);
    command.args(&args.command[1..]).process_group(0);
    let child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            say!("locker: cannot run {:?}: {e}", args.command[0]);
            return ExitCode::from(if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            });
        }
    };
    let main = Pid::from_raw(child.id() as i32);
    if terminal.is_some() {
        give_terminal(main);
        // It may have been stopped reading the terminal before it was its own.
        let _ = kill(Pid::from_raw(-main.as_raw()), Signal::SIGCONT);
    }
    // The group is the command's pid (process_group(0)). This line also tells `locker run`
    // that signals can be passed on now.
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
    std::thread::spawn(move || reap(main, events));

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
                let left = children_of(std::process::id())
                    .into_iter()
                    .any(|p| p != main);
                if left {
                    say!(
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
    if let Some(group) = terminal {
        give_terminal(group);
    }
    ExitCode::from(code.unwrap_or(EX_SOFTWARE))
}
