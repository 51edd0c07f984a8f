//! `locker status KEY`, `locker owner OWNER_HASH` and `locker release KEY --owner OWNER_HASH`.

use std::process::ExitCode;

use clap::Args;
use locker::{OwnerStatus, ReleaseOutcome};
use serde_json::json;

use crate::{fail, Global};

/// `status` of a free key, `release` that released nothing: scripts test for it.
const EX_NO: u8 = 1;

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

#[derive(Args, Debug)]
pub(crate) struct ReleaseArgs {
    /// The lock key.
    key: String,
    /// Release only if this owner hash (from `locker status`, or `LOCKER_OWNER_HASH` in the
    /// command's environment) still holds KEY. Its job stops at its next heartbeat: the lock is
    /// gone.
    #[arg(long, value_name = "OWNER_HASH")]
    owner: String,
    /// Print JSON: `{"key", "released", "lock"}` (`lock`: the record of another holder).
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
    locker.shutdown().await;
    if lock.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EX_NO)
    }
}

/// Node's `release(key, lockData)`: deletes the lock only if `--owner` still holds it, straight
/// on the store (no liveness record is written for this).
pub(crate) async fn release(global: &Global, args: ReleaseArgs) -> ExitCode {
    match locker::parse_owner_hash(&args.owner) {
        Some(parsed) if parsed.key == args.key => {}
        Some(parsed) => {
            return fail(&locker::Error::invalid_input(format!(
                "--owner is an owner hash of the key {:?}, not of {:?}",
                parsed.key, args.key
            )))
        }
        None => {
            return fail(&locker::Error::invalid_input(format!(
                "--owner {:?} is not an owner hash (see `locker status KEY`)",
                args.owner
            )))
        }
    }
    let backend = match async { locker::connect(&global.url()?)?.connect().await }.await {
        Ok(b) => b,
        Err(e) => return fail(&e),
    };
    let outcome = match backend.release(&args.key, &args.owner).await {
        Ok(o) => o,
        Err(e) => return fail(&e),
    };
    let (released, holder) = match &outcome {
        ReleaseOutcome::Released => (true, None),
        ReleaseOutcome::NoKey => (false, None),
        ReleaseOutcome::Held(lock) => (false, Some(lock)),
    };
    if args.json {
        println!(
            "{}",
            json!({ "key": args.key, "released": released, "lock": holder })
        );
    } else {
        match holder {
            _ if released => println!("released {:?} (held by {})", args.key, args.owner),
            Some(lock) => println!(
                "{:?} is held by {}, not by {}: nothing released",
                args.key, lock.owner_hash, args.owner
            ),
            None => println!("{:?} is not locked: nothing released", args.key),
        }
    }
    if released {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EX_NO)
    }
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
    locker.shutdown().await;
    ExitCode::SUCCESS
}

#[derive(Args, Debug)]
pub(crate) struct LeaderArgs {
    /// The election key (a key that `locker run` or `Locker::election` campaigns for).
    key: String,
    /// Print a line at every change of leader, until interrupted.
    #[arg(long)]
    watch: bool,
    /// Print JSON lines: `{"key", "leader", "term"}` (`leader`: the leader's record or null).
    #[arg(long)]
    json: bool,
}

/// `locker leader KEY`: who leads the election on KEY (exits 1 when nobody does), and with
/// `--watch` every change after.
pub(crate) async fn leader(global: &Global, args: LeaderArgs) -> ExitCode {
    let locker = match global.locker() {
        Ok(l) => l,
        Err(e) => return fail(&e),
    };
    let election = match locker.election(args.key.as_str()) {
        Ok(e) => e,
        Err(e) => return fail(&e),
    };
    let mut watch = election.observe();
    let Ok(mut signals) = crate::run::signal_streams() else {
        say!("locker: cannot listen for signals");
        return ExitCode::from(crate::EX_SOFTWARE);
    };
    let mut led = false;
    loop {
        let leader = tokio::select! {
            leader = watch.changed() => leader,
            _ = crate::run::next_signal(&mut signals) => break,
        };
        let leader = match leader {
            Ok(leader) => leader,
            Err(e) if args.watch && e.is_retryable() => {
                say!("locker: {e}");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => {
                locker.shutdown().await;
                return fail(&e);
            }
        };
        led = leader.is_some();
        if args.json {
            let term = leader.as_ref().and_then(|l| l.fencing_token);
            println!(
                "{}",
                json!({ "key": args.key, "leader": leader, "term": term })
            );
        } else {
            match &leader {
                Some(l) => println!(
                    "{:?} is led by {} (process {}{}), since {}{}",
                    args.key,
                    l.owner_hash,
                    l.process_hash,
                    l.trace
                        .as_deref()
                        .map(|t| format!(", trace {t:?}"))
                        .unwrap_or_default(),
                    l.acquired_at.to_rfc3339(),
                    l.fencing_token
                        .map(|t| format!(", term {t}"))
                        .unwrap_or_default()
                ),
                None => println!("{:?} has no leader", args.key),
            }
        }
        if !args.watch {
            break;
        }
    }
    locker.shutdown().await;
    if led || args.watch {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EX_NO)
    }
}
