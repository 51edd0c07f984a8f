//! `locker`: run any command under a cluster-wide lock.
//!
//! Exit codes follow `sysexits.h` (listed in `locker --help`): the command's own when it ran; 64
//! bad usage or URL; 69 the backend cannot be reached; 70 internal error; 75 someone else holds
//! the lock (`--conflict-exit-code`); 76 the lock was lost while the command ran (it was
//! stopped: seppuku); 77 the backend refused the credentials.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand};
use locker::{ErrorKind, Locker};

/// `eprintln!` that never panics: with stderr a closed pipe (`locker run ... 2>&1 | head`), a
/// panic would abort `locker` while it holds a lock.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod demo;
mod exporter;
mod inspect;
mod run;
mod supervise;

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

/// The start timeout of the CLI (the library's is longer: services start slower than commands).
const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(10);

const EXIT_CODES: &str = "\
Exit codes:
  0-255  the command's own exit code when it ran (128+N when a signal N ended it)
  1      `status`: the key is free; `release`: nothing was released
  64     bad usage, a bad flag value or a bad URL
  69     the backend cannot be reached (refused, unanswered, or an unopenable file)
  70     internal error (nothing is released when a command may still run)
  75     someone else holds the lock (change it with --conflict-exit-code)
  76     the lock was lost while the command ran; the command was stopped
  77     the backend refused the credentials
  126    the command could not be started; 127 the command was not found

Environment:
  LOCKER_URL and LOCKER_<FLAG> set each global flag (LOCKER_LOCK_TTL=10m ...).
  RUST_LOG filters the library's log lines on stderr (RUST_LOG=locker=debug); -v, -vv, -vvv
  show info, debug and trace lines without it (by default: warnings and errors).";

#[derive(Parser, Debug)]
#[command(
    name = "locker",
    version,
    about = "Run a command under a cluster-wide lock; it runs at most once across the cluster, is \
             picked up again when its machine dies, and stops if it loses the lock.",
    after_help = EXIT_CODES
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// `[default: 5m]`, in the words `humantime` parses back.
fn with_default(help: &str, default: Duration) -> String {
    format!("{help} [default: {}]", humantime::format_duration(default))
}

/// Options accepted before or after the subcommand.
#[derive(Args, Debug, Clone)]
pub(crate) struct Global {
    /// Backend URL: redis://, rediss://, redis+cluster://, rediss+cluster://, postgres://,
    /// sqlite://, etcd:// and etcds:// (with the `etcd` feature), memory://. Default: a SQLite
    /// file in the user's state directory ($XDG_STATE_HOME/locker/locks.db).
    #[arg(long, env = "LOCKER_URL", global = true, hide_env_values = true)]
    url: Option<String>,
    #[arg(long, env = "LOCKER_LOCK_TTL", global = true, value_name = "DURATION",
          value_parser = humantime::parse_duration,
          help = with_default("How long a lock lives without an extension", locker::DEFAULT_LOCK_TTL))]
    lock_ttl: Option<Duration>,
    #[arg(long, env = "LOCKER_LIVENESS_TTL", global = true, value_name = "DURATION",
          value_parser = humantime::parse_duration,
          help = with_default("How long this process's liveness record lives: a dead holder is \
                 taken over after this", locker::DEFAULT_LIVENESS_TTL))]
    liveness_ttl: Option<Duration>,
    #[arg(long, env = "LOCKER_REPORT_EVERY", global = true, value_name = "DURATION",
          value_parser = humantime::parse_duration,
          help = with_default("How often the liveness record is written (liveness TTL / 5 when \
                 only --liveness-ttl is given and it is under 2 x this)", locker::DEFAULT_REPORT_EVERY))]
    report_every: Option<Duration>,
    #[arg(long, env = "LOCKER_RECHECK_EVERY", global = true, value_name = "DURATION",
          value_parser = humantime::parse_duration,
          help = with_default("How often the lock is reread to notice a takeover", locker::DEFAULT_RECHECK_EVERY))]
    recheck_every: Option<Duration>,
    #[arg(long, env = "LOCKER_EXTEND_EVERY", global = true, value_name = "DURATION",
          value_parser = humantime::parse_duration,
          help = with_default("How often the lock is extended (lock TTL / 3 when only \
                 --lock-ttl is given and it is at most this)", locker::DEFAULT_EXTEND_EVERY))]
    extend_every: Option<Duration>,
    #[arg(long, env = "LOCKER_START_TIMEOUT", global = true, value_name = "DURATION",
          value_parser = humantime::parse_duration,
          help = with_default("How long to wait for the first liveness write of a backend that \
                 does not answer (a refused connection fails at once)", DEFAULT_START_TIMEOUT))]
    start_timeout: Option<Duration>,
    /// Serve the library's metrics in Prometheus's text format over HTTP at this address
    /// (`127.0.0.1:9464`) while `locker` runs; names and labels: the README's "Metrics" table.
    #[arg(
        long,
        env = "LOCKER_METRICS_LISTEN",
        global = true,
        value_name = "ADDR"
    )]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Show the library's log lines on stderr: -v info, -vv debug, -vvv trace (RUST_LOG, when
    /// set, chooses instead).
    #[arg(short, long, action = ArgAction::Count, global = true)]
    verbose: u8,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run COMMAND while holding the lock KEY.
    Run(run::RunArgs),
    /// Show who holds KEY, if a live process does; exits 1 when KEY is free.
    Status(inspect::StatusArgs),
    /// Show who leads the election on KEY (exits 1 when nobody does); --watch follows it.
    Leader(inspect::LeaderArgs),
    /// Show whether the job with OWNER_HASH is running.
    Owner(inspect::OwnerArgs),
    /// Release KEY if OWNER_HASH still holds it (for operators); exits 1 when it did not.
    Release(inspect::ReleaseArgs),
    /// The quick start: worker processes contend for jobs, one is killed, another takes over.
    Demo(demo::DemoArgs),
    /// One worker of the demo (started by `locker demo`).
    #[command(hide = true)]
    DemoWorker(demo::WorkerArgs),
    /// The process between `locker run` and its command (started by `locker run`).
    #[command(hide = true)]
    Supervise(supervise::SuperviseArgs),
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
        // Checked here so that the error names the flag the user gave, not the option the
        // library derived from it.
        for (flag, value) in self.timings() {
            if value == Some(Duration::ZERO) {
                return Err(locker::Error::invalid_input(format!(
                    "--{flag} must be greater than zero"
                )));
            }
        }
        self.builder(url)?.build().map_err(|e| self.name_flags(e))
    }

    /// The timing flags, by name.
    fn timings(&self) -> [(&'static str, Option<Duration>); 6] {
        [
            ("lock-ttl", self.lock_ttl),
            ("liveness-ttl", self.liveness_ttl),
            ("report-every", self.report_every),
            ("recheck-every", self.recheck_every),
            ("extend-every", self.extend_every),
            ("start-timeout", self.start_timeout),
        ]
    }

    /// An option error of the library, in the words of the command line: `report_every` becomes
    /// `--report-every` (or says what it was derived from).
    fn name_flags(&self, e: locker::Error) -> locker::Error {
        if e.kind() != ErrorKind::InvalidInput {
            return e;
        }
        let mut message = e.to_string();
        for (flag, value) in self.timings() {
            let option = match flag {
                "start-timeout" => "reporter_start_timeout".to_owned(),
                _ => flag.replace('-', "_"),
            };
            let name = match (value, flag) {
                (Some(_), _) => format!("--{flag}"),
                (None, "report-every") if self.liveness_ttl.is_some() => {
                    "the report interval derived from --liveness-ttl (set --report-every)".into()
                }
                (None, "extend-every") if self.lock_ttl.is_some() => {
                    "the extension interval derived from --lock-ttl (set --extend-every)".into()
                }
                (None, _) => format!("the default --{flag}"),
            };
            message = message.replace(&option, &name);
        }
        locker::Error::invalid_input(message)
    }

    fn builder(&self, url: &str) -> Result<locker::LockerBuilder, locker::Error> {
        let mut builder = Locker::builder(locker::connect(url)?)
            .reporter_start_timeout(self.start_timeout.unwrap_or(DEFAULT_START_TIMEOUT));
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
        Ok(builder)
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
    say!("locker: {e}");
    ExitCode::from(exit_code_for(e))
}

/// Log lines of the library on stderr, as `-v` or `RUST_LOG` choose; nothing by default but
/// warnings and errors.
fn init_tracing(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => EnvFilter::new(spec),
        _ => EnvFilter::new(match verbose {
            0 => "warn",
            1 => "info",
            2 => "debug",
            _ => "trace",
        }),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(true)
        .try_init();
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
    // A panic must not unwind into the drops that release a lock while a command may still
    // run: print it and abort (the supervisor then stops the command's tree, and the lock is
    // left to its liveness record's expiry).
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
    init_tracing(cli.global.verbose);
    if let Command::Supervise(args) = cli.command {
        return supervise::supervise(args);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            say!("locker: cannot start a runtime: {e}");
            return ExitCode::from(EX_SOFTWARE);
        }
    };
    runtime.block_on(async move {
        // Not in the demo's workers, which inherit the flag's variable from `locker demo`.
        let worker = matches!(cli.command, Command::DemoWorker(_));
        if let Some(addr) = cli.global.metrics_listen.filter(|_| !worker) {
            if let Err(e) = exporter::serve(addr).await {
                return fail(&e);
            }
        }
        match cli.command {
            Command::Run(args) => run::run(&cli.global, args).await,
            Command::Status(args) => inspect::status(&cli.global, args).await,
            Command::Leader(args) => inspect::leader(&cli.global, args).await,
            Command::Owner(args) => inspect::owner(&cli.global, args).await,
            Command::Release(args) => inspect::release(&cli.global, args).await,
            Command::Demo(args) => demo::demo(&cli.global, args).await,
            Command::DemoWorker(args) => demo::worker(&cli.global, args).await,
            Command::Supervise(_) => ExitCode::from(EX_SOFTWARE),
        }
    })
}
