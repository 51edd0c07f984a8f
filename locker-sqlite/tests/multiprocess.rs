//! Several OS processes contend on one SQLite file, each running the same critical section
//! under `Locker::mutex`; no two sections ever overlap, and every one runs.
//!
//! The test re-executes its own binary as the workers (`LOCKER_SQLITE_WORKER` set), so it needs
//! no other program. A section proves exclusion with a marker file created with `create_new`
//! (which fails if another process is inside) and counts itself in a log.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use locker_core::{Locker, Wait};
use locker_sqlite::SqliteConfig;

const WORKERS: usize = 4;
const SECTIONS_PER_WORKER: usize = 10;

fn main() -> ExitCode {
    match std::env::var_os("LOCKER_SQLITE_WORKER") {
        Some(dir) => worker(Path::new(&dir)),
        None => parent(),
    }
}

fn parent() -> ExitCode {
    println!("\nrunning 1 test");
    let dir = tempfile::tempdir().expect("temporary directory");
    let started = Instant::now();
    let children: Vec<_> = (0..WORKERS)
        .map(|_| {
            Command::new(std::env::current_exe().expect("own path"))
                .env("LOCKER_SQLITE_WORKER", dir.path())
                .spawn()
                .expect("spawn a worker process")
        })
        .collect();
    let mut failed = Vec::new();
    for mut child in children {
        let status = child.wait().expect("wait for a worker");
        if !status.success() {
            failed.push(status);
        }
    }
    let log = fs::read_to_string(dir.path().join("log")).unwrap_or_default();
    let sections = log.lines().count();
    let pids: std::collections::BTreeSet<&str> = log.lines().collect();
    let ok =
        failed.is_empty() && sections == WORKERS * SECTIONS_PER_WORKER && pids.len() == WORKERS;
    println!(
        "test {WORKERS}_processes_contend_on_one_sqlite_file ... {} ({sections} sections by {} \
         processes in {:?}; failed workers: {failed:?})",
        if ok { "ok" } else { "FAILED" },
        pids.len(),
        started.elapsed()
    );
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn worker(dir: &Path) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let config = SqliteConfig::builder(dir.join("locks.db"))
            .build()
            .expect("config");
        let locker = Locker::builder(config)
            .report_every(Duration::from_millis(100))
            .liveness_ttl(Duration::from_secs(2))
            .recheck_every(Duration::from_millis(20))
            .build()
            .expect("locker");
        let marker: PathBuf = dir.join("inside");
        for _ in 0..SECTIONS_PER_WORKER {
            let marker = marker.clone();
            let section = locker
                .mutex(
                    "the-one-job",
                    Wait::up_to(Duration::from_secs(120)),
                    |hb| async move {
                        if fs::File::create_new(&marker).is_err() {
                            eprintln!("worker {}: another process is inside", std::process::id());
                            return false;
                        }
                        let mut log = OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(marker.with_file_name("log"))
                            .expect("log");
                        writeln!(log, "{}", std::process::id()).expect("write log");
                        let held = hb.sleep(Duration::from_millis(10)).await.is_ok();
                        fs::remove_file(&marker).expect("leave");
                        held
                    },
                )
                .await;
            match section {
                Ok(true) => {}
                Ok(false) => return ExitCode::from(3),
                Err(e) => {
                    eprintln!("worker {}: {e}", std::process::id());
                    return ExitCode::from(4);
                }
            }
        }
        locker.shutdown().await;
        ExitCode::SUCCESS
    })
}
