//! `locker`: run any command under a cluster-wide lock.
//!
//! Exit codes follow `sysexits.h`: the command's own when it ran; 64 bad usage or URL; 69 the
//! backend cannot be reached; 75 someone else holds the lock; 76 the lock was lost while the
//! command ran (it was stopped: seppuku); 77 the backend refused the credentials.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use locker::{ErrorKind, Locker};

mod demo;
mod inspect;
mod run;

/// Bad usage or a bad URL.
pub(crate) const EX_USAGE: u8 = 64;
/// The backend cannot be reached.
pub(crate) const EX_UNAVAILABLE: u8 = 69;
/// Internal error.
pub(crate) const EX_SOFTWARE: u8 = 70;
/// Someone else holds the lock.
pub(crate) const EX_HELD: u8 = 75;
/// The lock was lost while the command ran.
pub(crate) const EX_LOST: u8 = 76;
/// The backend refused the credentials.
pub(crate) const EX_NOPERM: u8 = 77;

#[derive(Parser, Debug)]
#[command(
    name = "locker",
    version,
    about = "Run a command under a cluster-wide lock; it runs at most once across the cluster, is \
             picked up again when its machine dies, and stops if it loses the lock."
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Options accepted before or after the subcommand.
#[derive(Args, Debug, Clone)]
pub(crate) struct Global {
    /// Backend URL: redis://, rediss://, redis+cluster://, postgres://, sqlite://, etcd://,
    /// memory://. Default: a SQLite file in the user's state directory.
    #[arg(long, env = "LOCKER_URL", global = true)]
    url: Option<String>,
    /// How long a lock lives without an extension.
    #[arg(long, env = "LOCKER_LOCK_TTL", global = true, value_parser = humantime::parse_duration)]
    lock_ttl: Option<Duration>,
    /// How long a process's liveness record lives: a dead holder is taken over after this.
    #[arg(long, env = "LOCKER_LIVENESS_TTL", global = true, value_parser = humantime::parse_duration)]
    liveness_ttl: Option<Duration>,
    /// How often the liveness record is written.
    #[arg(long, env = "LOCKER_REPORT_EVERY", global = true, value_parser = humantime::parse_duration)]
    report_every: Option<Duration>,
    /// How often the lock is reread to notice a takeover.
    #[arg(long, env = "LOCKER_RECHECK_EVERY", global = true, value_parser = humantime::parse_duration)]
    recheck_every: Option<Duration>,
    /// How often the lock is extended.
    #[arg(long, env = "LOCKER_EXTEND_EVERY", global = true, value_parser = humantime::parse_duration)]
    extend_every: Option<Duration>,
    /// How long to wait for the first liveness write before giving up on the backend.
    #[arg(long, env = "LOCKER_START_TIMEOUT", global = true, value_parser = humantime::parse_duration)]
    start_timeout: Option<Duration>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run COMMAND while holding the lock KEY.
    Run(run::RunArgs),
    /// Show who holds KEY, if a live process does.
    Status(inspect::StatusArgs),
    /// Show whether the job with OWNER_HASH is running.
    Owner(inspect::OwnerArgs),
    /// The quick start: worker processes contend for jobs, one is killed, another takes over.
    Demo(demo::DemoArgs),
    /// One worker of the demo (started by `locker demo`).
    #[command(hide = true)]
    DemoWorker(demo::WorkerArgs),
}

impl Global {
    /// The backend URL: the flag, the environment, or the default SQLite file.
    pub(crate) fn url(&self) -> Result<String, locker::Error> {
        if let Some(url) = &self.url {
            return Ok(url.clone());
        }
        let dir = default_state_dir()
            .ok_or_else(|| locker::Error::invalid_input("no HOME or XDG_STATE_HOME: pass --url"))?
            .join("locker");
        std::fs::create_dir_all(&dir).map_err(|e| {
            locker::Error::invalid_input(format!("cannot create {}", dir.display())).with_source(e)
        })?;
        Ok(format!("sqlite://{}", dir.join("locks.db").display()))
    }

    /// A locker on the URL with the timings given.
    pub(crate) fn locker(&self) -> Result<Locker, locker::Error> {
        self.locker_on(&self.url()?)
    }

    pub(crate) fn locker_on(&self, url: &str) -> Result<Locker, locker::Error> {
        let mut builder = Locker::builder(locker::connect(url)?)
            .reporter_start_timeout(self.start_timeout.unwrap_or(Duration::from_secs(10)));
        if let Some(d) = self.lock_ttl {
            builder = builder.lock_ttl(d);
            // Keep the default extension pace valid for short TTLs.
            if self.extend_every.is_none() && d <= locker::DEFAULT_EXTEND_EVERY {
                builder = builder.extend_every(d / 3);
            }
        }
        if let Some(d) = self.liveness_ttl {
            builder = builder.liveness_ttl(d);
            if self.report_every.is_none() && d < locker::DEFAULT_REPORT_EVERY * 2 {
                builder = builder.report_every(d / 5);
            }
        }
        if let Some(d) = self.report_every {
            builder = builder.report_every(d);
        }
        if let Some(d) = self.recheck_every {
            builder = builder.recheck_every(d);
        }
        if let Some(d) = self.extend_every {
            builder = builder.extend_every(d);
        }
        builder.build()
    }
}

fn default_state_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local").join("state"))
}

/// The exit code for an error that kept the command from running.
pub(crate) fn exit_code_for(e: &locker::Error) -> u8 {
    match e.kind() {
        ErrorKind::InvalidInput => EX_USAGE,
        ErrorKind::Unavailable | ErrorKind::Timeout => EX_UNAVAILABLE,
        ErrorKind::Auth => EX_NOPERM,
        _ => EX_SOFTWARE,
    }
}

pub(crate) fn fail(e: &locker::Error) -> ExitCode {
    eprintln!("locker: {e}");
    ExitCode::from(exit_code_for(e))
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EX_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("locker: cannot start a runtime: {e}");
            return ExitCode::from(EX_SOFTWARE);
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => run::run(&cli.global, args).await,
            Command::Status(args) => inspect::status(&cli.global, args).await,
            Command::Owner(args) => inspect::owner(&cli.global, args).await,
            Command::Demo(args) => demo::demo(&cli.global, args).await,
            Command::DemoWorker(args) => demo::worker(&cli.global, args).await,
        }
    })
}
