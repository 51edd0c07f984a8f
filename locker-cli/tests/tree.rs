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
    let script = r#"trap 'touch hup; sleep 1; exit 3' HUP
sleep 300 & echo $$ $! > pids.tmp && mv pids.tmp pids
wait; wait"#;
    let holder = spawn(dir.path(), &["run", "k", "--", "sh", "-c", script]);
    let pids = tree_pids(dir.path());
    wait_until_held(dir.path(), "k");
    signal(&holder, Signal::SIGHUP);
    let start = Instant::now();
    while !dir.path().join("hup").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no SIGHUP reached the command"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The command is in its trap: `locker` survived the SIGHUP and holds the lock.
    assert!(alive(pids[0]));
    assert_eq!(status_json(dir.path(), "k")["held"], true);
    let (code, stderr) = finish(holder, dir.path());
    assert_eq!(code, 3, "{stderr}");
    // The background sleep got the SIGHUP too.
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
fn when_the_supervisor_dies_the_group_is_killed_and_the_lock_is_not_released() {
    let dir = tempfile::tempdir().expect("dir");
    let script = "sleep 300 & echo $$ $! > pids.tmp && mv pids.tmp pids; wait";
    // A liveness TTL long enough to see the lock still held after `locker` exits.
    let holder = spawn_with(
        locker(dir.path())
            .env("LOCKER_LIVENESS_TTL", "30s")
            .env("LOCKER_REPORT_EVERY", "1s")
            .args(["run", "k", "--", "sh", "-c", script]),
        dir.path(),
    );
    let pids = tree_pids(dir.path());
    let supervisor = parent(pids[0]).expect("the shell's parent");
    assert_eq!(parent(supervisor), Some(holder.id() as i32));
    kill(Pid::from_raw(supervisor), Signal::SIGKILL).expect("kill the supervisor");
    let (code, stderr) = finish(holder, dir.path());
    assert_eq!(code, 70, "{stderr}");
    assert!(stderr.contains("not released"), "{stderr}");
    wait_all_dead(&pids, Duration::from_secs(5));
    let status = status_json(dir.path(), "k");
    assert_eq!(
        status["held"], true,
        "released although its command might still run"
    );
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
    std::thread::sleep(Duration::from_millis(500));
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
    // `nohup`'s way: SIGHUP ignored before `locker` starts. The command inherits the ignoring
    // and outlives a SIGHUP sent to `locker` (which is ignored too).
    let holder = spawn_with(
        Command::new("sh").arg("-c").arg(format!(
            "trap '' HUP; exec {} run k -- sh -c 'echo $$ > pids.tmp && mv pids.tmp pids; sleep 1; touch done'",
            BIN
        )).envs(locker(dir.path()).get_envs().filter_map(|(k, v)| Some((k, v?)))),
        dir.path(),
    );
    let pids = tree_pids(dir.path());
    signal(&holder, Signal::SIGHUP);
    let (code, stderr) = finish(holder, dir.path());
    assert_eq!(code, 0, "{stderr}");
    assert!(dir.path().join("done").exists());
    wait_all_dead(&pids, Duration::from_millis(1));
}
