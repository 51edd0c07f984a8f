//! The chaos test, short form, per backend (the long form: `locker-bench chaos --duration 10m`).
//! Runs one backend at a time: the machine has two cores and the test measures timing behaviour.

use std::io::Write;
use std::process::Command;
use std::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn chaos(backend: &str) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let out = Command::new(env!("CARGO_BIN_EXE_locker-bench"))
        .args(["chaos", "--backend", backend, "--duration", "20s"])
        .output()
        .expect("run locker-bench chaos");
    let report = String::from_utf8_lossy(&out.stdout);
    // The figures go straight to the test process's stderr, past the harness's capture, so that
    // every run (CI's included) shows them.
    let _ = std::io::stderr().write_all(report.as_bytes());
    assert!(
        out.status.success() && report.contains("verdict: PASS"),
        "{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("fencing violations"), "{report}");
}

#[test]
fn chaos_sqlite() {
    chaos("sqlite");
}

#[test]
fn chaos_redis() {
    chaos("redis");
}

#[test]
fn chaos_postgres() {
    chaos("postgres");
}

#[test]
fn chaos_etcd() {
    chaos("etcd");
}
