//! Paths that cannot be opened fail at once, naming the cause, with a kind that says whether a
//! retry can help; a locker's start ends on them without waiting for its timeout.

use locker_conformance::start::{fails_at_once, locker_with_long_start};
use locker_core::ErrorKind;
use locker_sqlite::{SqliteBackend, SqliteConfig};
use std::path::Path;

fn config(path: &Path) -> SqliteConfig {
    SqliteConfig::builder(path).build().expect("valid config")
}

async fn connect_error(path: &Path) -> locker_core::Error {
    fails_at_once("connect", SqliteBackend::connect(&config(path))).await
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
    let locker = locker_with_long_start(config(&path));
    for e in [
        fails_at_once("ready", locker.ready()).await,
        fails_at_once("acquire", locker.acquire("job")).await,
    ] {
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
        assert!(e.to_string().contains("cannot open"), "{e}");
    }
    locker.shutdown().await;
}
