//! The real `locker` binary: exit codes, `--wait`, signal forwarding, seppuku after a takeover,
//! status and owner output, and the demo.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const BIN: &str = env!("CARGO_BIN_EXE_locker");

/// `locker` on a SQLite file of its own, with fast timings.
fn locker(dir: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env("LOCKER_URL", format!("sqlite://{}/locks.db", dir.display()))
        .env("LOCKER_LIVENESS_TTL", "1s")
        .env("LOCKER_REPORT_EVERY", "150ms")
        .env("LOCKER_RECHECK_EVERY", "100ms")
        .stdin(Stdio::null());
    cmd
}

fn output(cmd: &mut Command) -> Output {
    cmd.output().expect("run locker")
}

fn code(cmd: &mut Command) -> i32 {
    let out = output(cmd);
    out.status.code().unwrap_or_else(|| {
        panic!(
            "killed by a signal; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn status_json(dir: &Path, key: &str) -> serde_json::Value {
    let out = output(locker(dir).args(["status", key, "--json"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn wait_until_held(dir: &Path, key: &str) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let status = status_json(dir, key);
        if status["held"] == true {
            return status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{key} never held"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(child: &Child, sig: Signal) {
    kill(Pid::from_raw(child.id() as i32), sig).expect("signal");
}

fn wait_code(mut child: Child, limit: Duration) -> i32 {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status.code().expect("exit code");
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_command_runs_under_the_lock_and_its_exit_code_is_returned() {
    let dir = tempfile::tempdir().expect("dir");
    assert_eq!(
        code(locker(dir.path()).args(["run", "k", "--", "sh", "-c", "exit 7"])),
        7
    );
    assert_eq!(
        code(locker(dir.path()).args([
            "run",
            "k",
            "--",
            "sh",
            "-c",
            r#"test "$LOCKER_KEY" = k && test -n "$LOCKER_OWNER_HASH" && test -n "$LOCKER_FENCING_TOKEN""#
        ])),
        0
    );
    assert_eq!(
        code(locker(dir.path()).args(["run", "k", "--", "/nonexistent/cmd"])),
        127
    );
    // The lock was released each time.
    assert_eq!(status_json(dir.path(), "k")["held"], false);
}

#[test]
fn a_held_lock_exits_75_and_wait_waits_for_it() {
    let dir = tempfile::tempdir().expect("dir");
    let holder = locker(dir.path())
        .args(["run", "k", "--", "sleep", "2"])
        .spawn()
        .expect("holder");
    let status = wait_until_held(dir.path(), "k");
    let out = output(locker(dir.path()).args(["run", "k", "--", "true"]));
    assert_eq!(out.status.code(), Some(75));
    let owner = status["lock"]["ownerHash"].as_str().expect("owner");
    assert!(String::from_utf8_lossy(&out.stderr).contains(owner));
    let started = Instant::now();
    assert_eq!(
        code(locker(dir.path()).args(["run", "--wait", "20s", "k", "--", "true"])),
        0
    );
    assert!(
        started.elapsed() > Duration::from_millis(500),
        "did not wait"
    );
    assert_eq!(wait_code(holder, Duration::from_secs(20)), 0);
}

#[test]
fn bad_usage_and_bad_urls_exit_64() {
    let dir = tempfile::tempdir().expect("dir");
    for args in [
        vec!["--url", "bogus://x", "run", "k", "--", "true"],
        vec!["--url", "redis://host:notaport", "run", "k", "--", "true"],
        vec!["run", "k"],
        vec!["run", "--wait", "soon", "k", "--", "true"],
        vec!["--lock-ttl", "forever", "status", "k"],
        vec!["no-such-command"],
        vec!["run", "", "--", "true"],
    ] {
        assert_eq!(code(locker(dir.path()).args(&args)), 64, "{args:?}");
    }
    // Global flags go before or after the subcommand.
    assert_eq!(
        code(locker(dir.path()).args(["status", "k", "--lock-ttl", "30s"])),
        0
    );
}

#[test]
fn an_unreachable_backend_exits_69() {
    let dir = tempfile::tempdir().expect("dir");
    for url in [
        "redis://127.0.0.1:1",
        "sqlite:///nonexistent-locker-dir/locks.db",
    ] {
        let out = output(locker(dir.path()).args([
            "--url",
            url,
            "--start-timeout",
            "1s",
            "run",
            "k",
            "--",
            "true",
        ]));
        assert_eq!(
            out.status.code(),
            Some(69),
            "{url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn signals_are_passed_to_the_command_and_the_lock_released_after() {
    let dir = tempfile::tempdir().expect("dir");
    let holder = locker(dir.path())
        .args([
            "run",
            "k",
            "--",
            "sh",
            "-c",
            r#"sleep 30 & trap 'kill $!; exit 42' TERM; wait"#,
        ])
        .spawn()
        .expect("holder");
    wait_until_held(dir.path(), "k");
    signal(&holder, Signal::SIGTERM);
    assert_eq!(wait_code(holder, Duration::from_secs(20)), 42);
    assert_eq!(status_json(dir.path(), "k")["held"], false);
}

#[test]
fn a_frozen_holder_is_taken_over_and_kills_its_command_when_it_wakes() {
    let dir = tempfile::tempdir().expect("dir");
    let mark = dir.path().join("terminated");
    let holder = locker(dir.path())
        .args([
            "run",
            "--kill-grace",
            "5s",
            "k",
            "--",
            "sh",
            "-c",
            &format!(
                r#"sleep 60 & trap 'kill $!; touch {}; exit 0' TERM; wait"#,
                mark.display()
            ),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .expect("holder");
    wait_until_held(dir.path(), "k");
    // Freeze `locker` (not its command) past the liveness TTL: its reporter stops too.
    signal(&holder, Signal::SIGSTOP);
    let taker = output(locker(dir.path()).args(["run", "--wait", "20s", "k", "--", "true"]));
    assert_eq!(
        taker.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&taker.stderr)
    );
    signal(&holder, Signal::SIGCONT);
    let out = holder.wait_with_output().expect("holder output");
    assert_eq!(
        out.status.code(),
        Some(76),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(mark.exists(), "the command was not stopped");
    assert!(String::from_utf8_lossy(&out.stderr).contains("lock lost"));
}

#[test]
fn status_and_owner_report_in_text_and_json() {
    let dir = tempfile::tempdir().expect("dir");
    let holder = locker(dir.path())
        .args(["run", "--trace", "nightly", "k", "--", "sleep", "2"])
        .spawn()
        .expect("holder");
    let status = wait_until_held(dir.path(), "k");
    let owner = status["lock"]["ownerHash"]
        .as_str()
        .expect("owner")
        .to_owned();
    assert!(owner.ends_with("#nightly"), "{owner}");
    let text = output(locker(dir.path()).args(["status", "k"]));
    assert!(String::from_utf8_lossy(&text.stdout).contains(&owner));
    let json: serde_json::Value = serde_json::from_slice(
        &output(locker(dir.path()).args(["owner", &owner, "--json"])).stdout,
    )
    .expect("JSON");
    assert_eq!(json["status"], "running");
    assert_eq!(json["key"], "k");
    assert_eq!(wait_code(holder, Duration::from_secs(20)), 0);
    let json: serde_json::Value = serde_json::from_slice(
        &output(locker(dir.path()).args(["owner", &owner, "--json"])).stdout,
    )
    .expect("JSON");
    assert_eq!(json["status"], "no_key");
    let json: serde_json::Value = serde_json::from_slice(
        &output(locker(dir.path()).args(["owner", "junk", "--json"])).stdout,
    )
    .expect("JSON");
    assert_eq!(json["status"], "malformed");
}

#[test]
fn the_demo_runs_every_job_once_and_shows_a_takeover() {
    let out = Command::new(BIN)
        .arg("demo")
        .env_remove("LOCKER_URL")
        .output()
        .expect("demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("each exactly once: yes"), "{stdout}");
    assert!(stdout.contains("taken over"), "{stdout}");
}
