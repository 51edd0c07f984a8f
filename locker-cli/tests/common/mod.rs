//! Helpers shared by the tests of the real `locker` binary.
#![allow(dead_code, unreachable_pub)]

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub const BIN: &str = env!("CARGO_BIN_EXE_locker");

/// `locker` on a SQLite file of its own, with fast timings.
pub fn locker(dir: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env("LOCKER_URL", format!("sqlite://{}/locks.db", dir.display()))
        .env("LOCKER_LIVENESS_TTL", "1s")
        .env("LOCKER_REPORT_EVERY", "150ms")
        .env("LOCKER_RECHECK_EVERY", "100ms")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    cmd
}

pub fn output(cmd: &mut Command) -> Output {
    cmd.output().expect("run locker")
}

pub fn code(cmd: &mut Command) -> i32 {
    let out = output(cmd);
    out.status.code().unwrap_or_else(|| {
        panic!(
            "killed by a signal; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// `locker status KEY --json`, checking that the exit code agrees (0 held, 1 free).
pub fn status_json(dir: &Path, key: &str) -> serde_json::Value {
    let out = output(locker(dir).args(["status", key, "--json"]));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("not JSON; stderr: {}", String::from_utf8_lossy(&out.stderr)));
    let expected = if json["held"] == true { 0 } else { 1 };
    assert_eq!(out.status.code(), Some(expected), "{json}");
    json
}

pub fn wait_until_held(dir: &Path, key: &str) -> serde_json::Value {
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

pub fn signal(child: &Child, sig: Signal) {
    kill(Pid::from_raw(child.id() as i32), sig).expect("signal");
}

pub fn wait_code(mut child: Child, limit: Duration) -> i32 {
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
