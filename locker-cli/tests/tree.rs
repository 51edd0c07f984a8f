//! `locker run` owns its command's whole process tree: the four ways a command used to be left
//! running without the lock (`kill -9` of `locker`, SIGHUP, seppuku with grandchildren, an
//! error exit), each checked for survivors and for a release while one ran.

mod common;

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Whether `pid` is a live process (a zombie is dead: it runs nothing).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().next())
                .unwrap_or("?");
            state != "Z" && state != "X"
        }
        Err(_) => false,
    }
}

fn parent(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The pids the command wrote to `pids` (the shell and what it started), once it has.
fn tree_pids(dir: &Path) -> Vec<i32> {
    let file = dir.join("pids");
    let start = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(&file) {
            if text.ends_with('\n') {
                let pids: Vec<i32> = text
                    .split_whitespace()
                    .map(|p| p.parse().expect("a pid"))
                    .collect();
                assert!(pids.iter().all(|&p| alive(p)), "{pids:?}");
                return pids;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the command never wrote its pids"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_for_file(path: &Path) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A signal mask of `/proc/PID/status` (`SigCgt`, `SigIgn`).
fn signal_mask(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .expect("mask")
}

fn has(mask: u64, sig: Signal) -> bool {
    mask & (1 << (sig as i32 - 1)) != 0
}

/// Waits until `pid` catches `sig` (its handlers are installed).
fn wait_catching(pid: u32, sig: Signal) {
    let start = Instant::now();
    while !has(signal_mask(pid, "SigCgt:"), sig) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no handler for {sig}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_all_dead(pids: &[i32], limit: Duration) {
    let start = Instant::now();
    while pids.iter().any(|&p| alive(p)) {
        assert!(
            start.elapsed() < limit,
            "still running after {limit:?}: {:?}",
            pids.iter().filter(|&&p| alive(p)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `locker` started in `dir`, its stderr kept in `dir/stderr`.
fn spawn(dir: &Path, args: &[&str]) -> Child {
    spawn_with(locker(dir).args(args), dir)
}

fn spawn_with(cmd: &mut Command, dir: &Path) -> Child {
    let stderr = std::fs::File::create(dir.join("stderr")).expect("stderr file");
    cmd.current_dir(dir)
        .stderr(stderr)
        .spawn()
        .expect("locker run")
}

/// The exit code of `locker` (within a bound far above what it needs), and its stderr.
fn finish(child: Child, dir: &Path) -> (i32, String) {
    let code = wait_code(child, Duration::from_secs(30));
    let stderr = std::fs::read_to_string(dir.join("stderr")).unwrap_or_default();
    (code, stderr)
}

/// A shell whose tree is a background `sleep`, one that ignores SIGTERM, and one that left the
/// process group (`setsid`); it writes `$$` and their pids to `pids`.
const TREE: &str = r#"sleep 300 & a=$!
(trap '' TERM; sleep 300) & b=$!
setsid sleep 300 & c=$!
echo $$ $a $b $c > pids.tmp && mv pids.tmp pids
wait"#;

#[test]
fn kill_9_of_locker_kills_the_whole_tree_before_anyone_else_can_take_the_lock() {
    let dir = tempfile::tempdir().expect("dir");
    let holder = spawn(dir.path(), &["run", "k", "--", "sh", "-c", TREE]);
    let pids = tree_pids(dir.path());
    wait_until_held(dir.path(), "k");
    signal(&holder, Signal::SIGKILL);
    // Whoever takes the lock next (after the dead holder's liveness record expires) must find
    // none of the old tree running.
    let check = format!(
        "for p in {}; do if [ -e /proc/$p ] && ! grep -q '^[^)]*) [ZX]' /proc/$p/stat; then echo $p runs; exit 9; fi; done",
        pids.iter().map(i32::to_string).collect::<Vec<_>>().join(" ")
    );
    let next =
        output(locker(dir.path()).args(["run", "--wait", "20s", "k", "--", "sh", "-c", &check]));
    assert_eq!(
        next.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&next.stdout),
        String::from_utf8_lossy(&next.stderr)
    );
    wait_all_dead(&pids, Duration::from_secs(5));
    let mut holder = holder;
    let _ = holder.wait();
}

#[test]
fn sighup_reaches_the_group_and_the_lock_is_held_until_the_command_exits() {
    let dir = tempfile::tempdir().expect("dir");
    // The shell stays in its trap until the test says `go`; its background child marks the
    // SIGHUP it got (before the command exited, so not from the cleanup after it).
    let script = r#"trap 'touch hup; while [ ! -e go ]; do sleep 0.05; done; exit 3' HUP
sh -c 'trap "touch child-hup; exit 0" HUP; while :; do sleep 0.05; done' & c=$!
echo $$ $c > pids.tmp && mv pids.tmp pids
wait; wait"#;
    let holder = spawn(dir.path(), &["run", "k", "--", "sh", "-c", script]);
    let pids = tree_pids(dir.path());
    wait_until_held(dir.path(), "k");
    signal(&holder, Signal::SIGHUP);
    wait_for_file(&dir.path().join("hup"));
    wait_for_file(&dir.path().join("child-hup"));
    // The command is in its trap: `locker` survived the SIGHUP and holds the lock.
    assert!(alive(pids[0]));
    assert_eq!(status_json(dir.path(), "k")["held"], true);
    std::fs::write(dir.path().join("go"), "").expect("go");
    let (code, stderr) = finish(holder, dir.path());
    assert_eq!(code, 3, "{stderr}");
    wait_all_dead(&pids, Duration::from_millis(1));
    assert_eq!(status_json(dir.path(), "k")["held"], false);
}

#[test]
fn seppuku_stops_grandchildren_too_even_those_that_left_the_group_or_ignore_sigterm() {
    let dir = tempfile::tempdir().expect("dir");
    let holder = spawn(
        dir.path(),
        &["run", "--kill-grace", "1s", "k", "--", "sh", "-c", TREE],
    );
    let pids = tree_pids(dir.path());
    let owner = wait_until_held(dir.path(), "k")["lock"]["ownerHash"]
        .as_str()
        .expect("owner")
        .to_owned();
    // An operator releases the lock: the holder's next beat finds it gone.
    let released = output(locker(dir.path()).args(["release", "k", "--owner", &owner]));
    assert_eq!(released.status.code(), Some(0));
    let (code, stderr) = finish(holder, dir.path());
    assert_eq!(code, 76, "{stderr}");
    assert!(stderr.contains("lock lost"), "{stderr}");
    // `locker` exits only once the whole tree is gone.
    wait_all_dead(&pids, Duration::from_millis(1));
    // Releasing again: nothing to release, exit 1.
    let again = output(locker(dir.path()).args(["release", "k", "--owner", &owner]));
    assert_eq!(again.status.code(), Some(1));
}

#[test]
fn when_the_supervisor_dies_locker_kills_the_orphaned_tree_before_it_releases() {
    let dir = tempfile::tempdir().expect("dir");
    let holder = spawn(dir.path(), &["run", "k", "--", "sh", "-c", TREE]);
    let pids = tree_pids(dir.path());
    let supervisor = parent(pids[0]).expect("the shell's parent");
    assert_eq!(parent(supervisor), Some(holder.id() as i32));
    // The tree, `setsid` process included, is orphaned: `locker`, as the subreaper, gets it.
    kill(Pid::from_raw(supervisor), Signal::SIGKILL).expect("kill the supervisor");
    let (code, stderr) = finish(holder, dir.path());
    assert_eq!(code, 70, "{stderr}");
    assert!(stderr.contains("tree was killed"), "{stderr}");
    // Released only once none of the tree runs.
    wait_all_dead(&pids, Duration::from_millis(1));
    assert_eq!(status_json(dir.path(), "k")["held"], false);
}

#[test]
fn a_signal_while_waiting_ends_the_wait_and_runs_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let holder = spawn(dir.path(), &["run", "k", "--", "sleep", "30"]);
    wait_until_held(dir.path(), "k");
    let waiter = spawn(
        dir.path(),
        &["run", "--wait", "forever", "k", "--", "touch", "ran"],
    );
    wait_catching(waiter.id(), Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    signal(&waiter, Signal::SIGTERM);
    assert_eq!(wait_code(waiter, Duration::from_secs(10)), 128 + 15);
    assert!(!dir.path().join("ran").exists());
    assert_eq!(
        code(locker(dir.path()).args(["run", "--conflict-exit-code", "3", "k", "--", "true"])),
        3
    );
    signal(&holder, Signal::SIGINT);
    assert_eq!(wait_code(holder, Duration::from_secs(10)), 128 + 2);
    assert_eq!(status_json(dir.path(), "k")["held"], false);
}

#[test]
fn a_signal_ignored_at_start_stays_ignored_as_under_nohup() {
    let dir = tempfile::tempdir().expect("dir");
    // `nohup`'s way: SIGHUP ignored before `locker` starts. `locker` installs no handler for it,
    // and the command inherits the ignoring.
    let script = "echo $$ > pids.tmp && mv pids.tmp pids; while [ ! -e go ]; do sleep 0.05; done";
    let holder = spawn_with(
        Command::new("sh")
            .arg("-c")
            .arg(format!("trap '' HUP; exec {BIN} run k -- sh -c '{script}'"))
            .envs(
                locker(dir.path())
                    .get_envs()
                    .filter_map(|(k, v)| Some((k, v?))),
            ),
        dir.path(),
    );
    let pids = tree_pids(dir.path());
    wait_catching(holder.id(), Signal::SIGTERM);
    assert!(has(signal_mask(holder.id(), "SigIgn:"), Signal::SIGHUP));
    let command = u32::try_from(pids[0]).expect("pid");
    assert!(has(signal_mask(command, "SigIgn:"), Signal::SIGHUP));
    signal(&holder, Signal::SIGHUP);
    assert!(alive(pids[0]));
    std::fs::write(dir.path().join("go"), "").expect("go");
    let (code, stderr) = finish(holder, dir.path());
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn an_interactive_command_gets_the_terminal_and_cannot_be_suspended() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().expect("dir");
    // `script` gives `locker` a terminal (a pty) whose foreground job it is, as in a shell.
    let command = format!(
        "{BIN} run k -- sh -c 'echo $$ > pids.tmp && mv pids.tmp pids; read x; echo got:$x'"
    );
    let mut term = locker(dir.path())
        .get_envs()
        .fold(&mut Command::new("timeout"), |c, (k, v)| match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        })
        .args(["30", "script", "-qec", &command, "/dev/null"])
        .current_dir(dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("script (util-linux)");
    let pids = tree_pids(dir.path());
    let mut input = term.stdin.take().expect("stdin");
    // Ctrl-Z reaches the command's group (the terminal's foreground group now), which is
    // continued at once; then a line for `read`, which works only if the group owns the
    // terminal (a background group would be stopped by SIGTTIN).
    input.write_all(b"\x1a").expect("write");
    std::thread::sleep(Duration::from_millis(300));
    input.write_all(b"hello\n").expect("write");
    let mut out = String::new();
    term.stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read");
    let status = term.wait().expect("wait");
    assert_eq!(status.code(), Some(0), "{out}");
    assert!(out.contains("got:hello"), "{out}");
    assert!(out.contains("cannot be suspended"), "{out}");
    wait_all_dead(&pids, Duration::from_secs(5));
}
