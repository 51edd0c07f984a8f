//! `locker status KEY` and `locker owner OWNER_HASH`.

use std::process::ExitCode;

use clap::Args;
use locker::OwnerStatus;
use serde_json::json;

use crate::{fail, Global};

#[derive(Args, Debug)]
pub(crate) struct StatusArgs {
    /// The lock key.
    key: String,
    /// Print JSON: `{"key", "held", "lock"}`.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct OwnerArgs {
    /// The owner hash, as `locker run` passes it in `LOCKER_OWNER_HASH`.
    owner_hash: String,
    /// Print JSON: `{"status", "key", "lock"}`.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn status(global: &Global, args: StatusArgs) -> ExitCode {
    let locker = match global.locker() {
        Ok(l) => l,
        Err(e) => return fail(&e),
    };
    let lock = match locker.inspect(&args.key).await {
        Ok(lock) => lock,
        Err(e) => return fail(&e),
    };
    if args.json {
        println!(
            "{}",
            json!({ "key": args.key, "held": lock.is_some(), "lock": lock })
        );
    } else {
        match &lock {
            Some(lock) => println!(
                "{:?} is held by {} (process {}), acquired {}, extended {}{}",
                args.key,
                lock.owner_hash,
                lock.process_hash,
                lock.acquired_at.to_rfc3339(),
                lock.extended_at.to_rfc3339(),
                lock.fencing_token
                    .map(|t| format!(", fencing token {t}"))
                    .unwrap_or_default()
            ),
            None => println!("{:?} is free (no live holder)", args.key),
        }
    }
    ExitCode::SUCCESS
}

pub(crate) async fn owner(global: &Global, args: OwnerArgs) -> ExitCode {
    let locker = match global.locker() {
        Ok(l) => l,
        Err(e) => return fail(&e),
    };
    let status = match locker.owner_status(&args.owner_hash).await {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let (name, key, lock, text) = match &status {
        OwnerStatus::Running { key, lock } => (
            "running",
            Some(key),
            Some(lock),
            format!("running, holding {key:?}"),
        ),
        OwnerStatus::HeldByOther { key, lock } => (
            "held_by_other",
            Some(key),
            Some(lock),
            format!("not running: {key:?} is held by {}", lock.owner_hash),
        ),
        OwnerStatus::NoKey { key } => (
            "no_key",
            Some(key),
            None,
            format!("not running: {key:?} is not locked"),
        ),
        OwnerStatus::NoRunningProcess { key, lock } => (
            "no_running_process",
            Some(key),
            Some(lock),
            format!("not running: its process is dead; {key:?} is free to take"),
        ),
        OwnerStatus::Malformed => ("malformed", None, None, "not an owner hash".to_owned()),
    };
    if args.json {
        println!("{}", json!({ "status": name, "key": key, "lock": lock }));
    } else {
        println!("{}: {text}", args.owner_hash);
    }
    ExitCode::SUCCESS
}
