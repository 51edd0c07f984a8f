//! Two lockers (as two processes would) compete for one job; the second finds it held, then
//! runs it after the first is done.
//!
//! `cargo run -p locker --example quickstart [URL]` (default: SQLite in a temporary directory).

use std::time::Duration;

use locker::{Locker, RunOutcome};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), locker::Error> {
    let dir = std::env::temp_dir().join(format!("locker-quickstart-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temporary directory");
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| format!("sqlite://{}/locks.db", dir.display()));
    println!("backend: {url}");
    let first = Locker::builder(locker::connect(&url)?).build()?;
    let second = Locker::builder(locker::connect(&url)?).build()?;

    let (a, b) = tokio::join!(
        first.acquire_and_run("nightly-report", |heartbeat| async move {
            println!("first: running as {}", heartbeat.owner_hash());
            heartbeat.sleep(Duration::from_millis(500)).await?;
            Ok::<_, locker::Error>("first done")
        }),
        async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            second
                .acquire_and_run("nightly-report", |_| async { "second ran" })
                .await
        }
    );
    match b? {
        RunOutcome::Held(holder) => println!("second: held by {}", holder.owner_hash),
        RunOutcome::Ran(v) => println!("second: {v}"),
    }
    if let RunOutcome::Ran(result) = a? {
        println!("first: {}", result?);
    }
    let again = second
        .acquire_and_run("nightly-report", |_| async { "second ran after the first" })
        .await?;
    println!("second: {again:?}");
    first.shutdown().await;
    second.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
