//! `locker demo`: worker processes contend for a handful of jobs on the embedded SQLite default;
//! one worker is killed with SIGKILL while it holds a job, and another takes the job over within
//! seconds. Ends with a summary and exit code 0 when every job ran exactly once, without overlap.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;
use locker::RunOutcome;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{fail, Global};

const JOBS: usize = 4;
const WORKERS: usize = 3;
const JOB_TIME: Duration = Duration::from_secs(2);
const LIVENESS_TTL: Duration = Duration::from_secs(2);

#[derive(Args, Debug)]
pub(crate) struct DemoArgs {}

#[derive(Args, Debug)]
pub(crate) struct WorkerArgs {
    /// The demo's directory (database, markers, event log).
    #[arg(long)]
    dir: PathBuf,
}

fn millis() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default()
}

fn event(dir: &Path, line: &str) {
    if let Ok(mut log) = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("events"))
    {
        // One write(2) per line: with O_APPEND, lines of concurrent workers never interleave.
        let entry = format!("{} {} {line}\n", millis(), std::process::id());
        let _ = log.write_all(entry.as_bytes());
    }
}

fn demo_global(global: &Global, dir: &Path) -> Global {
    let mut g = global.clone();
    if g.url.is_none() {
        g.url = Some(format!("sqlite://{}", dir.join("demo.db").display()));
    }
    g.liveness_ttl = Some(g.liveness_ttl.unwrap_or(LIVENESS_TTL));
    g.report_every = Some(g.report_every.unwrap_or(Duration::from_millis(250)));
    g.recheck_every = Some(g.recheck_every.unwrap_or(Duration::from_millis(200)));
    g
}

/// One worker: takes jobs that are not done yet, one at a time, until all are done.
pub(crate) async fn worker(global: &Global, args: WorkerArgs) -> ExitCode {
    let dir = args.dir;
    let locker = match demo_global(global, &dir).locker() {
        Ok(l) => l,
        Err(e) => return fail(&e),
    };
    loop {
        let mut remaining = 0;
        for job in 1..=JOBS {
            if dir.join(format!("done-{job}")).exists() {
                continue;
            }
            remaining += 1;
            let key = format!("demo-job-{job}");
            let job_dir = dir.clone();
            let outcome = locker
                .acquire_and_run(key.as_str(), |hb| async move {
                    let dir = job_dir;
                    if dir.join(format!("done-{job}")).exists() {
                        return Ok(());
                    }
                    // Exclusion check: a marker that only one live holder may have.
                    let inside = dir.join(format!("inside-{job}"));
                    if let Ok(holder) = fs::read_to_string(&inside) {
                        let alive = holder
                            .trim()
                            .parse::<i32>()
                            .is_ok_and(|pid| kill(Pid::from_raw(pid), None).is_ok());
                        if alive {
                            event(&dir, &format!("OVERLAP job-{job} with {}", holder.trim()));
                        }
                    }
                    let _ = fs::write(&inside, std::process::id().to_string());
                    event(&dir, &format!("start job-{job}"));
                    hb.sleep(JOB_TIME).await?;
                    event(&dir, &format!("done job-{job}"));
                    let _ = fs::write(dir.join(format!("done-{job}")), "");
                    let _ = fs::remove_file(&inside);
                    Ok::<_, locker::Error>(())
                })
                .await;
            match outcome {
                Ok(RunOutcome::Ran(Err(e))) => event(&dir, &format!("lost job-{job}: {e}")),
                Ok(_) => {}
                Err(e) => event(&dir, &format!("error job-{job}: {e}")),
            }
        }
        if remaining == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    locker.shutdown().await;
    ExitCode::SUCCESS
}

struct Event {
    at: u128,
    pid: u32,
    what: String,
}

fn read_events(dir: &Path) -> Vec<Event> {
    fs::read_to_string(dir.join("events"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ' ');
            Some(Event {
                at: parts.next()?.parse().ok()?,
                pid: parts.next()?.parse().ok()?,
                what: parts.next()?.to_owned(),
            })
        })
        .collect()
}

pub(crate) async fn demo(global: &Global, _args: DemoArgs) -> ExitCode {
    let dir = std::env::temp_dir().join(format!("locker-demo-{}", std::process::id()));
    if let Err(e) = fs::create_dir_all(&dir) {
        say!("locker: cannot create {}: {e}", dir.display());
        return ExitCode::from(crate::EX_SOFTWARE);
    }
    let g = demo_global(global, &dir);
    let url = g.url.clone().unwrap_or_default();
    println!("locker demo: {WORKERS} worker processes, {JOBS} jobs of {JOB_TIME:?} each");
    println!("  backend: {url}");
    println!(
        "  liveness TTL {:?}: a dead worker's job is taken over within about that long\n",
        g.liveness_ttl.unwrap_or(LIVENESS_TTL)
    );
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            say!("locker: cannot find my own binary: {e}");
            return ExitCode::from(crate::EX_SOFTWARE);
        }
    };
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.arg("demo-worker")
            .arg("--dir")
            .arg(&dir)
            .arg("--url")
            .arg(&url);
        match cmd.spawn() {
            Ok(child) => workers.push(child),
            Err(e) => {
                say!("locker: cannot start a worker: {e}");
                return ExitCode::from(crate::EX_SOFTWARE);
            }
        }
    }

    let started = Instant::now();
    let mut shown = 0;
    let mut victim: Option<(u32, String, u128)> = None;
    let mut takeover: Option<(String, u128)> = None;
    while started.elapsed() < Duration::from_secs(50) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let events = read_events(&dir);
        for e in &events[shown..] {
            let t = e.at.saturating_sub(events[0].at) as f64 / 1000.0;
            println!("  {t:6.2}s  worker {}: {}", e.pid, e.what);
            if let Some((pid, job, killed_at)) = &victim {
                if takeover.is_none() && e.pid != *pid && e.what == format!("start {job}") {
                    let after = e.at.saturating_sub(*killed_at);
                    println!(
                        "           -> {job} taken over {:.2}s after its worker was killed",
                        after as f64 / 1000.0
                    );
                    takeover = Some((job.clone(), after));
                }
            }
        }
        shown = events.len();
        // Kill the first worker to start a job, halfway through it.
        if victim.is_none() {
            if let Some(first) = events.iter().find(|e| e.what.starts_with("start ")) {
                if millis().saturating_sub(first.at) >= JOB_TIME.as_millis() / 2 {
                    let job = first.what.trim_start_matches("start ").to_owned();
                    let _ = kill(Pid::from_raw(first.pid as i32), Signal::SIGKILL);
                    let at = millis();
                    // Reap it, so that it is gone and not a zombie.
                    for w in workers.iter_mut() {
                        if w.id() == Some(first.pid) {
                            let _ = w.wait().await;
                        }
                    }
                    println!(
                        "  {:6.2}s  *** killed worker {} (SIGKILL) while it holds {job} ***",
                        at.saturating_sub(events[0].at) as f64 / 1000.0,
                        first.pid
                    );
                    victim = Some((first.pid, job, at));
                }
            }
        }
        if (1..=JOBS).all(|j| dir.join(format!("done-{j}")).exists()) && takeover.is_some() {
            break;
        }
    }
    for mut w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(10), w.wait()).await;
        let _ = w.start_kill();
    }

    // The summary, from the event log.
    let events = read_events(&dir);
    let mut done: BTreeMap<String, usize> = BTreeMap::new();
    for e in &events {
        if let Some(job) = e.what.strip_prefix("done ") {
            *done.entry(job.to_owned()).or_default() += 1;
        }
    }
    let overlaps = events
        .iter()
        .filter(|e| e.what.starts_with("OVERLAP"))
        .count();
    let each_once = done.len() == JOBS && done.values().all(|n| *n == 1);
    println!("\nsummary:");
    println!(
        "  jobs done: {} of {JOBS}, each exactly once: {}",
        done.len(),
        if each_once { "yes" } else { "NO" }
    );
    println!("  overlapping runs of a job: {overlaps}");
    match &takeover {
        Some((job, after)) => println!(
            "  takeover of {job} after its worker died: {:.2}s (liveness TTL {:?})",
            *after as f64 / 1000.0,
            g.liveness_ttl.unwrap_or(LIVENESS_TTL)
        ),
        None => println!("  takeover: none observed"),
    }
    let _ = fs::remove_dir_all(&dir);
    if each_once && overlaps == 0 && takeover.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
