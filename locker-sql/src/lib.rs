//! What the SQL backends of distributed-locker (`locker-postgres`, `locker-sqlite`) share:
//! quoted identifiers from a user's prefix, TTLs as milliseconds, and the row layout.
//!
//! Both keep one row per lock key (`key`, `owner_hash`, `record`, `fencing_token`,
//! `expires_at`) and one per live process (`process_hash`, `record`, `expires_at`), where
//! `record` is the Node library's JSON of the record without its fencing token (the token has a
//! column of its own, assigned by the database), and `expires_at` is computed by the database's
//! clock. What differs (the SQL dialect, how tokens are assigned, the connection) stays in each
//! backend.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::future::Future;
use std::time::Duration;

use locker_core::{Error, ErrorKind, LockData, Result};

/// The tables of one store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tables {
    /// Quoted, schema-qualified name of the locks table.
    pub locks: String,
    /// Quoted, schema-qualified name of the liveness table.
    pub processes: String,
    /// Quoted, schema-qualified name of the fencing sequence or table.
    pub fencing: String,
    /// Quoted, schema-qualified name of the migrations table.
    pub migrations: String,
    /// Quoted schema name, if any.
    pub schema: Option<String>,
    /// The table prefix, unquoted (a plain identifier), for names such as indexes.
    pub prefix: String,
}

impl Tables {
    /// Names under `schema` (if any) with `prefix` (for example `locker_`).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] unless the schema and the
    /// prefix are plain identifiers (`[A-Za-z_][A-Za-z0-9_]*`, the prefix may be empty), so that
    /// names never need escaping tricks and always mean the same table.
    pub fn new(schema: Option<&str>, prefix: &str) -> Result<Self> {
        if let Some(schema) = schema {
            check_identifier("schema", schema, false)?;
        }
        check_identifier("table prefix", prefix, true)?;
        let name = |table: &str| match schema {
            Some(s) => format!("\"{s}\".\"{prefix}{table}\""),
            None => format!("\"{prefix}{table}\""),
        };
        Ok(Tables {
            locks: name("locks"),
            processes: name("processes"),
            fencing: name("fencing"),
            migrations: name("migrations"),
            schema: schema.map(|s| format!("\"{s}\"")),
            prefix: prefix.to_owned(),
        })
    }

    /// Replaces `{locks}`, `{processes}`, `{fencing}`, `{migrations}`, `{schema}` and `{prefix}`
    /// in a SQL template.
    pub fn render(&self, template: &str) -> String {
        template
            .replace("{prefix}", &self.prefix)
            .replace("{locks}", &self.locks)
            .replace("{processes}", &self.processes)
            .replace("{fencing}", &self.fencing)
            .replace("{migrations}", &self.migrations)
            .replace("{schema}", self.schema.as_deref().unwrap_or("public"))
    }
}

fn check_identifier(what: &str, s: &str, may_be_empty: bool) -> Result<()> {
    let ok = if s.is_empty() {
        may_be_empty
    } else {
        let mut chars = s.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
            && s.len() <= 40
    };
    if ok {
        Ok(())
    } else {
        Err(Error::invalid_input(format!(
            "{what} {s:?} must be a plain identifier ([A-Za-z_][A-Za-z0-9_]*, at most 40 characters)"
        )))
    }
}

/// A TTL in whole milliseconds (rounded up), refusing zero and anything over a century.
pub fn ttl_ms(ttl: Duration) -> Result<i64> {
    if ttl.is_zero() {
        return Err(Error::invalid_input("TTL must be greater than zero"));
    }
    let ms = ttl.as_nanos().div_ceil(1_000_000);
    i64::try_from(ms)
        .ok()
        .filter(|ms| *ms <= 100 * 365 * 24 * 3600 * 1000)
        .ok_or_else(|| Error::invalid_input(format!("TTL of {ttl:?} is too long")))
}

/// A duration from the URL parameter `name` (the rule every backend's URL follows).
pub use locker_core::url_params::duration as parse_duration;

/// Runs one database call within `limit`, mapping its error with `map`; past the limit, a
/// retryable [`ErrorKind::Timeout`] naming `store`.
pub async fn within<T, E>(
    limit: Duration,
    store: &str,
    call: impl Future<Output = std::result::Result<T, E>>,
    map: impl FnOnce(E) -> Error,
) -> Result<T> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result.map_err(map),
        Err(_) => Err(Error::new(
            ErrorKind::Timeout,
            format!("{store} did not answer within {limit:?}"),
        )),
    }
}

/// The JSON stored in the `record` column: the record without its fencing token.
pub fn stored_record(data: &LockData) -> String {
    LockData {
        fencing_token: None,
        ..data.clone()
    }
    .to_json()
}

/// A lock record from its row: the `record` JSON plus the `fencing_token` column.
///
/// # Errors
/// [`ErrorKind::Corrupt`] when the JSON is not a lock record
/// or the token is negative.
pub fn lock_from_row(key: &str, record: &str, fencing_token: Option<i64>) -> Result<LockData> {
    let mut data = LockData::from_json(record).map_err(|e| e.with_key(key))?;
    if let Some(token) = fencing_token {
        let token = u64::try_from(token)
            .map_err(|_| Error::corrupt(format!("negative fencing token {token}")).with_key(key))?;
        data.fencing_token = Some(token);
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use locker_core::ErrorKind;

    #[test]
    fn names_are_quoted_and_checked() {
        let t = Tables::new(Some("jobs"), "locker_").expect("valid");
        assert_eq!(t.locks, "\"jobs\".\"locker_locks\"");
        assert_eq!(
            t.render("SELECT 1 FROM {locks}"),
            "SELECT 1 FROM \"jobs\".\"locker_locks\""
        );
        let t = Tables::new(None, "").expect("valid");
        assert_eq!(t.processes, "\"processes\"");
        for (schema, prefix) in [
            (Some("a b"), "x"),
            (None, "x\"; DROP"),
            (Some(""), "x"),
            (None, "1x"),
        ] {
            let e = Tables::new(schema, prefix).expect_err("invalid");
            assert_eq!(e.kind(), ErrorKind::InvalidInput);
        }
    }

    #[test]
    fn ttls_are_milliseconds() {
        assert_eq!(ttl_ms(Duration::from_micros(1)).expect("ok"), 1);
        assert_eq!(ttl_ms(Duration::from_secs(3)).expect("ok"), 3000);
        assert!(ttl_ms(Duration::ZERO).is_err());
        assert!(ttl_ms(Duration::MAX).is_err());
    }

    #[test]
    fn rows_become_records() {
        let d = LockData::new("k@h/1.2.3".into(), "h/1.2".into(), None);
        let stored = stored_record(&LockData {
            fencing_token: Some(9),
            ..d.clone()
        });
        assert!(!stored.contains("fencingToken"));
        let back = lock_from_row("k", &stored, Some(9)).expect("row");
        assert_eq!(back.fencing_token, Some(9));
        assert_eq!(back.owner_hash, d.owner_hash);
        assert_eq!(
            lock_from_row("k", "garbage", Some(1))
                .expect_err("bad")
                .kind(),
            ErrorKind::Corrupt
        );
        assert_eq!(
            lock_from_row("k", &stored, Some(-1))
                .expect_err("bad")
                .kind(),
            ErrorKind::Corrupt
        );
    }
}

/// A `read_many` in the making, for a backend that reads many keys with one statement: one
/// answer per key, in order, an invalid key's answer being its own error.
#[derive(Debug)]
pub struct ManyReads<'a> {
    keys: &'a [&'a str],
    records: Vec<Result<Option<LockData>>>,
}

impl<'a> ManyReads<'a> {
    /// Checks each key with `check`; every valid key reads as "no lock" until found.
    pub fn new(keys: &'a [&'a str], check: impl Fn(&str) -> Result<()>) -> Self {
        let records = keys.iter().map(|k| check(k).map(|()| None)).collect();
        ManyReads { keys, records }
    }

    /// The valid keys, to look up.
    pub fn wanted(&self) -> Vec<&'a str> {
        self.keys
            .iter()
            .zip(&self.records)
            .filter(|(_, r)| r.is_ok())
            .map(|(k, _)| *k)
            .collect()
    }

    /// The answers, given the rows found: `(key, record, fencing token)`.
    pub fn finish(
        mut self,
        rows: impl IntoIterator<Item = (String, String, Option<i64>)>,
    ) -> Vec<Result<Option<LockData>>> {
        let found: std::collections::HashMap<String, Result<LockData>> = rows
            .into_iter()
            .map(|(key, record, token)| {
                let lock = lock_from_row(&key, &record, token);
                (key, lock)
            })
            .collect();
        for (key, slot) in self.keys.iter().zip(self.records.iter_mut()) {
            if slot.is_ok() {
                if let Some(lock) = found.get(*key) {
                    *slot = lock.clone().map(Some);
                }
            }
        }
        self.records
    }
}
