//! PostgreSQL from the local Debian server binaries (`/usr/lib/postgresql/<version>/bin`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sys::signal::Signal;

use super::process::{free_port, temp_dir, RunAs, ServerProcess};
use super::{Provider, Server, ServerError, ServerKind};

/// The newest installed PostgreSQL's `bin` directory.
fn bin_dir() -> Result<PathBuf, ServerError> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .ok_or_else(|| ServerError::NotAvailable {
            what: "PostgreSQL (no /usr/lib/postgresql/*/bin/postgres)".into(),
            how: ServerKind::Postgres.how_to_get(),
        })
}

fn run(mut cmd: Command, what: &str) -> Result<(), ServerError> {
    let out = cmd
        .output()
        .map_err(|e| ServerError::io(what.to_owned(), e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ServerError::failed(format!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

fn command(run_as: Option<&RunAs>, program: &Path, dir: &Path) -> Command {
    let mut cmd = match run_as {
        Some(user) => user.command(program),
        None => Command::new(program),
    };
    cmd.current_dir(dir).env("HOME", dir);
    cmd
}

/// Starts one PostgreSQL server with trust authentication for user `postgres`. PostgreSQL
/// refuses to run as root, so as root it runs as `nobody`.
pub(super) fn start() -> Result<Server, ServerError> {
    let bin = bin_dir()?;
    let run_as = RunAs::nobody_if_root()?;
    let dir = temp_dir("postgres")?;
    let data = dir.path().join("data");
    if let Some(user) = &run_as {
        user.own(dir.path())?;
    }
    let mut initdb = command(run_as.as_ref(), &bin.join("initdb"), dir.path());
    initdb.arg("-D").arg(&data).args([
        "-U",
        "postgres",
        "-A",
        "trust",
        "-E",
        "UTF8",
        "--locale=C",
        "--no-sync",
    ]);
    run(initdb, "initdb")?;

    let port = free_port(0)?;
    let args: Vec<OsString> = [
        "-D".into(),
        data.clone().into_os_string(),
        "-p".into(),
        port.to_string().into(),
        "-c".into(),
        "listen_addresses=127.0.0.1".into(),
        "-c".into(),
        "unix_socket_directories=".into(),
        "-c".into(),
        "fsync=off".into(),
        "-c".into(),
        "synchronous_commit=off".into(),
        "-c".into(),
        "full_page_writes=off".into(),
        "-c".into(),
        "max_connections=300".into(),
    ]
    .into();
    let pg_isready = bin.join("pg_isready");
    let process = ServerProcess::new(
        format!("postgres on 127.0.0.1:{port}"),
        &bin.join("postgres"),
        args,
        run_as.as_ref(),
        dir.path().join("server.log"),
        // "Fast" shutdown: SIGTERM would wait for every client to disconnect.
        Signal::SIGINT,
        move || {
            Command::new(&pg_isready)
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "-U",
                    "postgres",
                    "-t",
                    "1",
                ])
                .output()
                .is_ok_and(|o| o.status.success())
        },
    )
    .cleanup_on_exit(dir.path().to_owned());
    Server::from_nodes(
        ServerKind::Postgres,
        Provider::Process,
        vec![format!("postgres://postgres@127.0.0.1:{port}/postgres")],
        vec![process],
        None,
        vec![Box::new(dir)],
    )
}

/// Whether a PostgreSQL server on a loopback port accepts a session for user `postgres` now: it
/// answers a startup message with an authentication request (`R`), not with an error (`E`, for
/// example "the database system is starting up").
#[cfg_attr(not(feature = "testcontainers"), allow(dead_code))]
pub(super) fn accepts(port: u16) -> bool {
    let mut body = Vec::new();
    body.extend(196_608_u32.to_be_bytes()); // protocol 3.0
    for s in ["user", "postgres", "database", "postgres"] {
        body.extend(s.as_bytes());
        body.push(0);
    }
    body.push(0);
    let len = u32::try_from(body.len() + 4).unwrap_or(u32::MAX);
    let mut message = len.to_be_bytes().to_vec();
    message.extend(body);
    super::process::tcp_exchange(port, &message, |b| !b.is_empty())
        .is_some_and(|r| r.starts_with('R'))
}

/// Whether a PostgreSQL server binary is installed under `/usr/lib/postgresql`.
pub(super) fn installed() -> bool {
    bin_dir().is_ok()
}
