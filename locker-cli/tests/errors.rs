//! The real `locker` binary on a backend it cannot use: the error names the cause, the exit
//! code says what kind of failure it is, and the answer comes at once rather than after the
//! start timeout (10 s by default; 60 s here, so that a run that waited for it cannot pass).

use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Far under the start timeout: a run that ends within it did not wait for it. (A functional
/// bound, not a speed benchmark: the failures below are known in milliseconds.)
const NOT_WAITED: Duration = Duration::from_secs(5);

/// `locker --url URL --start-timeout 60s ARGS...`, with its output and how long it took.
fn locker(url: &str, args: &[&str]) -> (Output, Duration) {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_locker"))
        .env_remove("LOCKER_URL")
        .args(["--url", url, "--start-timeout", "60s"])
        .args(args)
        .output()
        .expect("run locker");
    (out, started.elapsed())
}

/// Both `status` (reads, no liveness reporter) and `run` (starts the reporter) fail with
/// `code`, saying each of `causes` on stderr, without waiting for the start timeout.
fn fails_at_once(url: &str, code: i32, causes: &[&str]) {
    for args in [&["status", "k"][..], &["run", "k", "--", "true"][..]] {
        let (out, took) = locker(url, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(code),
            "{url} {args:?}: exit code; stderr: {stderr}"
        );
        for cause in causes {
            assert!(
                stderr.contains(cause),
                "{url} {args:?}: stderr does not say {cause:?}: {stderr}"
            );
        }
        assert!(
            took < NOT_WAITED,
            "{url} {args:?}: took {took:?}, as if waiting for the start timeout; stderr: {stderr}"
        );
    }
}

/// A path in a directory that does not exist is a mistake in the URL: 64, naming the path.
#[cfg(feature = "sqlite")]
#[test]
fn a_sqlite_path_in_a_missing_directory_names_the_path() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir
        .path()
        .join("nonexistent-dir")
        .join("x")
        .join("locks.db");
    let url = format!("sqlite://{}", path.display());
    fails_at_once(
        &url,
        64,
        &[
            &format!("cannot open {}", path.display()),
            "No such file or directory",
        ],
    );
}

/// A refused port: 69 (unavailable), naming the address.
#[cfg(feature = "postgres")]
#[test]
fn a_refused_postgres_port_names_the_address() {
    fails_at_once(
        "postgres://u@127.0.0.1:1/db",
        69,
        &["connection refused by 127.0.0.1:1"],
    );
}

#[cfg(feature = "etcd")]
#[test]
fn a_refused_etcd_port_names_the_address() {
    fails_at_once(
        "etcd://127.0.0.1:1",
        69,
        &["connection refused by 127.0.0.1:1"],
    );
}

#[cfg(feature = "redis")]
#[test]
fn a_refused_redis_port_says_refused() {
    fails_at_once("redis://127.0.0.1:1", 69, &["Connection refused"]);
}
