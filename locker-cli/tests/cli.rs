//! The real `locker` binary: exit codes, `--wait`, signal forwarding, seppuku after a takeover,
//! status and owner output, and the demo.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

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
    // Global flags go before or after the subcommand (exit 1: the key is free).
    assert_eq!(
        code(locker(dir.path()).args(["status", "k", "--lock-ttl", "30s"])),
        1
    );
}

#[test]
fn signals_are_passed_to_the_command_and_the_lock_released_after() {
    let dir = tempfile::tempdir().expect("dir");
    // The command says when its trap is set (a signal before that would kill the shell, 143).
    let ready = dir.path().join("trap-set");
    let holder = locker(dir.path())
        .args(["run", "k", "--", "sh", "-c"])
        .arg(r#"trap 'kill $!; exit 42' TERM; sleep 30 & : > "$0"; wait"#)
        .arg(&ready)
        .spawn()
        .expect("holder");
    wait_until_held(dir.path(), "k");
    let start = std::time::Instant::now();
    while !ready.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the command never set its trap"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
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

#[test]
fn help_lists_exit_codes_variables_and_timing_defaults() {
    let top = output(Command::new(BIN).arg("--help"));
    let top = String::from_utf8_lossy(&top.stdout);
    for needle in [
        "Exit codes:",
        "75",
        "76",
        "RUST_LOG",
        "--lock-ttl <DURATION>",
        "[default: 5m]",
        "[default: 10s]",
        "[default: 2s]",
        "[default: 1m]",
    ] {
        assert!(top.contains(needle), "{needle:?} missing from:\n{top}");
    }
    let run = output(Command::new(BIN).args(["run", "--help"]));
    let run = String::from_utf8_lossy(&run.stdout);
    for needle in [
        "LOCKER_KEY",
        "LOCKER_OWNER_HASH",
        "LOCKER_FENCING_TOKEN",
        "--kill-grace <DURATION>",
        "[default: 10s]",
        "--wait <DURATION|forever>",
        "--conflict-exit-code <N>",
        "[default: 75]",
        "SIGHUP",
    ] {
        assert!(run.contains(needle), "{needle:?} missing from:\n{run}");
    }
}

#[test]
fn option_errors_name_the_flag_given() {
    let dir = tempfile::tempdir().expect("dir");
    for (args, flag) in [
        (
            vec!["--liveness-ttl", "0s", "status", "k"],
            "--liveness-ttl",
        ),
        (vec!["status", "k", "--lock-ttl", "0ms"], "--lock-ttl"),
        (
            vec!["--lock-ttl", "1m", "--extend-every", "2m", "status", "k"],
            "--extend-every",
        ),
        (
            vec![
                "--liveness-ttl",
                "2s",
                "--report-every",
                "5s",
                "status",
                "k",
            ],
            "--report-every",
        ),
    ] {
        let out = output(
            locker(dir.path())
                .env_remove("LOCKER_REPORT_EVERY")
                .args(&args),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
        assert!(
            !stderr.contains("_every") && !stderr.contains("_ttl"),
            "{stderr}"
        );
    }
}

#[test]
fn verbose_and_rust_log_show_the_library_events() {
    let dir = tempfile::tempdir().expect("dir");
    let quiet = output(locker(dir.path()).args(["run", "k", "--", "true"]));
    assert_eq!(String::from_utf8_lossy(&quiet.stderr), "");
    for cmd in [
        locker(dir.path()).args(["-vv", "run", "k", "--", "true"]),
        locker(dir.path())
            .env("RUST_LOG", "locker_core=debug")
            .args(["run", "k", "--", "true"]),
    ] {
        let out = output(cmd);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        assert!(
            stderr.contains("DEBUG") && stderr.contains("locker_core"),
            "{stderr}"
        );
    }
}

#[test]
fn permits_let_n_copies_run_at_once_and_no_more() {
    let dir = tempfile::tempdir().expect("dir");
    let copy = || {
        locker(dir.path())
            .args([
                "run",
                "--permits",
                "2",
                "k",
                "--",
                "sh",
                "-c",
                r#"case "$LOCKER_PERMIT_KEY" in k#permit[01]) sleep 3;; *) exit 9;; esac"#,
            ])
            .spawn()
            .expect("copy")
    };
    let (first, second) = (copy(), copy());
    wait_until_held(dir.path(), "k#permit0");
    wait_until_held(dir.path(), "k#permit1");
    let out = output(locker(dir.path()).args(["run", "--permits", "2", "k", "--", "true"]));
    assert_eq!(out.status.code(), Some(75));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("every permit"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A caller that disagrees on the count is told so (permit 0 is held with a count of 2).
    let out = output(locker(dir.path()).args(["run", "--permits", "1", "k", "--", "true"]));
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("2 permits"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        code(locker(dir.path()).args(["run", "--permits", "0", "k", "--", "true"])),
        64
    );
    // A waiter gets the first permit freed.
    assert_eq!(
        code(locker(dir.path()).args([
            "run",
            "--permits",
            "2",
            "--wait",
            "20s",
            "k",
            "--",
            "sh",
            "-c",
            r#"test -n "$LOCKER_PERMIT_KEY""#
        ])),
        0
    );
    assert_eq!(wait_code(first, Duration::from_secs(20)), 0);
    assert_eq!(wait_code(second, Duration::from_secs(20)), 0);
}

#[test]
fn leader_shows_who_holds_the_key_and_follows_changes() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().expect("dir");
    let out = output(locker(dir.path()).args(["leader", "L"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("has no leader"));

    let mut watcher = locker(dir.path())
        .args(["leader", "L", "--watch", "--json"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("watcher");
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = watcher.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let json: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
            if tx.send(json).is_err() {
                break;
            }
        }
    });
    let next = || rx.recv_timeout(Duration::from_secs(20)).expect("a line");
    assert_eq!(next()["leader"], serde_json::Value::Null);
    let leader = locker(dir.path())
        .args(["run", "--trace", "node-7", "L", "--", "sleep", "2"])
        .spawn()
        .expect("leader");
    let led = next();
    assert_eq!(led["key"], "L");
    assert_eq!(led["leader"]["trace"], "node-7");
    assert_eq!(led["term"], led["leader"]["fencingToken"]);
    assert!(led["term"].as_u64().is_some(), "{led}");
    assert_eq!(wait_code(leader, Duration::from_secs(20)), 0);
    assert_eq!(next()["leader"], serde_json::Value::Null);
    signal(&watcher, Signal::SIGINT);
    assert_eq!(wait_code(watcher, Duration::from_secs(20)), 0);
}

/// A port nobody listens on now (bound, then freed).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

#[test]
fn metrics_listen_serves_the_library_metrics_while_the_command_runs() {
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    // The command scrapes `locker` while it holds the lock (bash's /dev/tcp: no curl needed).
    let scrape = format!(
        "exec 3<>/dev/tcp/127.0.0.1/{port}; printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3"
    );
    let out = output(
        locker(dir.path())
            .args(["--metrics-listen", &addr, "run", "k", "--", "bash", "-c"])
            .arg(&scrape),
    );
    let page = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{page}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
    assert!(page.contains("locker_locks_held 1\n"), "{page}");
    assert!(
        page.contains("locker_acquire_total{outcome=\"acquired\"} 1\n"),
        "{page}"
    );
    assert!(page.contains("locker_liveness_write_seconds"), "{page}");

    // An address already taken: exit 69, and the command never ran.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let marker = dir.path().join("ran");
    let out = output(
        locker(dir.path())
            .args(["--metrics-listen", &addr, "run", "k", "--", "touch"])
            .arg(&marker),
    );
    assert_eq!(
        out.status.code(),
        Some(69),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--metrics-listen"));
    assert!(!marker.exists(), "the command ran");
    // Not an address: a usage error.
    assert_eq!(
        code(locker(dir.path()).args(["--metrics-listen", "nowhere", "run", "k", "--", "true"])),
        64
    );
}
