//! Paths that cannot be opened fail at once, naming the cause, with a kind that says whether a
//! retry can help; a locker's start ends on them without waiting for its timeout.

use std::path::Path;
use std::time::Duration;

use locker_core::{ErrorKind, Locker};
use locker_sqlite::{SqliteBackend, SqliteConfig};

/// Well under the default command timeout (10 s) and the locker's start timeout (60 s here):
/// a call that returns within it did not wait for either.
const NOT_WAITED: Duration = Duration::from_secs(5);

fn config(path: &Path) -> SqliteConfig {
    SqliteConfig::builder(path).build().expect("valid config")
}

async fn connect_error(path: &Path) -> locker_core::Error {
    tokio::time::timeout(NOT_WAITED, SqliteBackend::connect(&config(path)))
        .await
        .expect("connect waited for its timeout")
        .expect_err("the path cannot be opened")
}

#[tokio::test]
async fn a_path_in_a_missing_directory_is_invalid_input_naming_the_path() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("no-such-dir").join("x").join("locks.db");
    let e = connect_error(&path).await;
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(!e.is_retryable());
    let text = e.to_string();
    assert!(
        text.contains(&format!("cannot open {}", path.display())),
        "{text}"
    );
    assert!(text.contains("No such file or directory"), "{text}");
    assert!(std::error::Error::source(&e).is_some());
}

#[tokio::test]
async fn a_file_where_a_directory_should_be_and_a_directory_as_the_file() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"not a directory").expect("write a file");
    let e = connect_error(&file.join("locks.db")).await;
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("is not a directory"), "{e}");

    let e = connect_error(dir.path()).await;
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("is a directory"), "{e}");
}

#[tokio::test]
async fn a_locker_on_a_missing_directory_fails_ready_and_acquire_at_once() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("no-such-dir").join("locks.db");
    let locker = Locker::builder(config(&path))
        .reporter_start_timeout(Duration::from_secs(60))
        .build()
        .expect("valid options");
    for e in [
        tokio::time::timeout(NOT_WAITED, locker.ready())
            .await
            .expect("ready waited for the start timeout")
            .expect_err("cannot open"),
        tokio::time::timeout(NOT_WAITED, locker.acquire("job"))
            .await
            .expect("acquire waited for the start timeout")
            .expect_err("cannot open"),
    ] {
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
        assert!(e.to_string().contains("cannot open"), "{e}");
    }
    locker.shutdown().await;
}
