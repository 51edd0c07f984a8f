//! The oldest server the backend accepts, and the check made at connect.
//!
//! **Why 5.0.0.** The acquire and take-over scripts call `TIME` (a non-deterministic command)
//! and then write. A script may do that only when the server replicates its *effects* (the
//! commands it ran) rather than the script itself: since Redis 5.0 that is the default
//! (`lua-replicate-commands yes`; since 7.0 the only mode). Redis 3.2 to 4.0 replicate scripts
//! verbatim unless the script calls `redis.replicate_commands()` first, so the first acquire
//! fails there with "Write commands not allowed after non deterministic commands". Everything
//! else the backend sends is older: `EVALSHA`, `SCRIPT LOAD`, `cjson` (2.6), `SET ... PX`
//! (2.6.12), `CLUSTER SLOTS` (3.0), `INFO server`. (`AUTH user password`, used only when a
//! user name is configured, needs 6.0; an older server refuses it as an authentication error.)
//!
//! **Which servers.** The check reads `redis_version` from `INFO server`. Valkey, KeyDB and
//! Dragonfly report one too (the Redis version they are compatible with), and that is the
//! number compared: the rule is the same for every product. A server that answers `INFO` with
//! no readable `redis_version` is refused, since nothing says it runs the scripts. A server
//! whose ACL denies `INFO` (`NOPERM`) is accepted: ACLs exist only since Redis 6.0.

use std::fmt;

use locker_core::{Error, Result};

/// A server version, `major.minor.patch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Version {
    pub(crate) major: u32,
    pub(crate) minor: u32,
    pub(crate) patch: u32,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The oldest `redis_version` accepted (see the module documentation).
pub(crate) const MIN_VERSION: Version = Version {
    major: 5,
    minor: 0,
    patch: 0,
};

/// Reads `redis_version` from the text of `INFO` (or `INFO server`) and parses it.
///
/// Accepts `major.minor.patch` and `major.minor`, each part decimal, with an optional suffix
/// after `-` or `+` (`7.2.4-rc1`). Redis' unstable branch reports `255.255.255`.
///
/// # Errors
/// [`ErrorKind::InvalidInput`](locker_core::ErrorKind::InvalidInput), not retryable, when the
/// field is missing or is not a version; the message quotes what was found.
pub(crate) fn parse_info_version(info: &str) -> Result<Version> {
    let raw = info
        .lines()
        .find_map(|line| line.trim().strip_prefix("redis_version:"))
        .ok_or_else(|| Error::invalid_input("the server's INFO reports no redis_version"))?
        .trim();
    let bad = || {
        Error::invalid_input(format!(
            "the server reports redis_version {raw:?}, not a version"
        ))
    };
    let core = raw.split(['-', '+']).next().unwrap_or_default();
    let parts = core
        .split('.')
        .map(|p| {
            if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) {
                p.parse::<u32>().map_err(|_| bad())
            } else {
                Err(bad())
            }
        })
        .collect::<Result<Vec<u32>>>()?;
    match parts[..] {
        [major, minor] => Ok(Version {
            major,
            minor,
            patch: 0,
        }),
        [major, minor, patch] => Ok(Version {
            major,
            minor,
            patch,
        }),
        _ => Err(bad()),
    }
}

/// Checks the `INFO` text of the server at `server` (a redacted URL or `host:port`): its version
/// or an error naming the server, the version found and the minimum.
///
/// # Errors
/// [`ErrorKind::InvalidInput`](locker_core::ErrorKind::InvalidInput), not retryable: an older
/// server, or no readable version.
pub(crate) fn check_info(server: &str, info: &str) -> Result<Version> {
    let found = parse_info_version(info).map_err(|e| {
        Error::invalid_input(format!(
            "{server}: {}; locker-redis needs Redis {MIN_VERSION} or newer",
            e.message()
        ))
    })?;
    if found < MIN_VERSION {
        return Err(Error::invalid_input(format!(
            "{server} runs Redis {found}, older than the minimum supported {MIN_VERSION}: the \
             lock scripts read TIME before they write, which needs script effects replication \
             (the default since Redis 5.0)"
        )));
    }
    Ok(found)
}

/// `INFO` denied by an ACL: ACLs exist from Redis 6.0 on, so the server is recent enough.
pub(crate) fn info_denied(server: &str) -> Result<()> {
    tracing::debug!(
        server,
        "INFO denied by ACL; the server is Redis 6.0 or newer"
    );
    Ok(())
}

/// `INFO` failed otherwise: the driver's error (already mapped), with its kind and
/// retryability, saying what was being done.
pub(crate) fn info_failed(server: &str, e: Error) -> Error {
    let message = format!("{server}: reading the server version (INFO server)");
    Error::new(e.kind(), message)
        .set_retryable(e.is_retryable())
        .set_definite(e.is_definite())
        .with_source(e)
}

/// The error for a server whose `INFO` reply is not text.
pub(crate) fn unreadable_info(server: &str) -> Error {
    Error::invalid_input(format!(
        "{server}: INFO did not answer text; locker-redis needs Redis {MIN_VERSION} or newer"
    ))
}

#[cfg(test)]
mod tests {
    use locker_core::ErrorKind;

    use super::*;

    fn v(major: u32, minor: u32, patch: u32) -> Version {
        Version {
            major,
            minor,
            patch,
        }
    }

    fn info(version: &str) -> String {
        format!("# Server\r\nredis_version:{version}\r\nredis_git_sha1:00000000\r\nredis_mode:standalone\r\n")
    }

    #[test]
    fn versions_parse_from_info() {
        for (text, want) in [
            ("6.2.14", v(6, 2, 14)),
            ("7.0.15", v(7, 0, 15)),
            ("4.0.9", v(4, 0, 9)),
            ("255.255.255", v(255, 255, 255)),
            ("5.0.0", v(5, 0, 0)),
            ("7.2", v(7, 2, 0)),
            ("7.2.4-rc1", v(7, 2, 4)),
        ] {
            assert_eq!(parse_info_version(&info(text)).expect(text), want, "{text}");
        }
        // Valkey reports its own version beside the compatible Redis version.
        let valkey = "# Server\nredis_version:7.2.4\nserver_name:valkey\nvalkey_version:8.0.1\n";
        assert_eq!(parse_info_version(valkey).expect("valkey"), v(7, 2, 4));
    }

    #[test]
    fn garbage_and_missing_fields_are_typed_errors() {
        for text in [
            "",
            "7",
            "7.x.1",
            "v7.0.0",
            "7.0.0.1",
            "..",
            "7..1",
            "banana",
            "99999999999.0.0",
        ] {
            let e = parse_info_version(&info(text)).expect_err(text);
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{text}");
            assert!(!e.is_retryable());
            assert!(e.message().contains(&format!("{text:?}")), "{e}");
        }
        for text in [
            "",
            "# Server\r\nredis_mode:standalone\r\n",
            "redis_versions 7.0.0",
        ] {
            let e = parse_info_version(text).expect_err("missing");
            assert_eq!(e.kind(), ErrorKind::InvalidInput);
            assert!(e.message().contains("no redis_version"), "{e}");
        }
    }

    #[test]
    fn older_servers_are_refused_with_both_versions_named() {
        let e = check_info("redis://10.0.0.5:6379", &info("4.0.9")).expect_err("old");
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(!e.is_retryable());
        for part in ["redis://10.0.0.5:6379", "4.0.9", "5.0.0"] {
            assert!(e.message().contains(part), "{e}");
        }
        assert_eq!(
            check_info("x", &info("4.9.255")).expect_err("old").kind(),
            ErrorKind::InvalidInput
        );
        assert_eq!(check_info("x", &info("5.0.0")).expect("min"), MIN_VERSION);
        assert!(check_info("x", &info("255.255.255")).is_ok());
        let e = check_info("x:1", "no version here").expect_err("missing");
        assert!(
            e.message().contains("x:1") && e.message().contains("5.0.0"),
            "{e}"
        );
    }
}
