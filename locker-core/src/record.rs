//! The two records a backend stores: one [`LockData`] per held key and one [`ProcessData`] per
//! live process.
//!
//! Their JSON is byte-for-byte the Node library's (`@clickup/distributed-locker`), so Rust and
//! Node processes can share one store during a migration.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The record stored under each held lock key.
///
/// Serialized as the Node library writes it:
/// `{"ownerHash":"…","processHash":"…","trace":"…","acquiredAt":"2026-01-13T10:00:00.000Z",
/// "extendedAt":"…","fencingToken":7}`, where `trace` and `fencingToken` are left out when absent.
/// Fields this version does not know are kept in [`extra`](LockData::extra) and written back
/// unchanged, so a read-modify-write by this library never drops what a newer writer added.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LockData {
    /// Identifies the one job (coroutine) that holds the lock: `{key}@{processHash}.{seq}[#trace]`.
    pub owner_hash: String,
    /// Identifies the process that runs the job: `{hostname}/{pid}.{nanos}`. The lock is free as
    /// soon as this process has no liveness record.
    pub process_hash: String,
    /// The caller's trace (a request id, a job name), if one was given at acquire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
    /// When the current owner acquired the lock (wall clock of the acquiring process).
    #[serde(with = "js_date")]
    pub acquired_at: DateTime<Utc>,
    /// When the current owner last extended the lock.
    #[serde(with = "js_date")]
    pub extended_at: DateTime<Utc>,
    /// A number that strictly increases with every acquisition of this key, assigned by
    /// backends that support fencing (see [`Capabilities::fencing`](crate::Capabilities)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fencing_token: Option<u64>,
    /// Fields written by other versions or other implementations, kept as they were.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl LockData {
    /// A fresh record acquired and extended now, with no fencing token yet.
    pub fn new(owner_hash: String, process_hash: String, trace: Option<String>) -> Self {
        let now = now_millis();
        LockData {
            owner_hash,
            process_hash,
            trace,
            acquired_at: now,
            extended_at: now,
            fencing_token: None,
            extra: serde_json::Map::new(),
        }
    }

    /// The same record with `extended_at` set to now: what an extension writes.
    pub fn extended_now(&self) -> Self {
        LockData {
            extended_at: now_millis(),
            ..self.clone()
        }
    }

    /// The record as the JSON the Node library writes.
    pub fn to_json(&self) -> String {
        // Serializing plain strings, numbers and a JSON map cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses a stored record; anything that is not a lock record is an [`ErrorKind::Corrupt`]
    /// error naming what was wrong.
    ///
    /// [`ErrorKind::Corrupt`]: crate::ErrorKind::Corrupt
    pub fn from_json(json: &str) -> Result<Self> {
        serde_json::from_str(json).map_err(|e| {
            Error::corrupt(format!(
                "stored value is not a lock record ({e}): {}",
                preview(json)
            ))
        })
    }
}

/// The liveness record each process keeps alive while it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessData {
    /// When the process last reported that it is alive.
    #[serde(with = "js_date")]
    pub alive_at: DateTime<Utc>,
    /// Fields written by other versions or other implementations, kept as they were.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl ProcessData {
    /// A record saying the process is alive now.
    pub fn now() -> Self {
        ProcessData {
            alive_at: now_millis(),
            extra: serde_json::Map::new(),
        }
    }

    /// The record as the JSON the Node library writes.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses a stored liveness record; anything else is an [`ErrorKind::Corrupt`] error.
    ///
    /// [`ErrorKind::Corrupt`]: crate::ErrorKind::Corrupt
    pub fn from_json(json: &str) -> Result<Self> {
        serde_json::from_str(json).map_err(|e| {
            Error::corrupt(format!(
                "stored value is not a liveness record ({e}): {}",
                preview(json)
            ))
        })
    }
}

/// The current wall-clock time at JavaScript's millisecond precision.
pub(crate) fn now_millis() -> DateTime<Utc> {
    let ms = Utc::now().timestamp_millis();
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// At most 64 characters of a stored value, for error messages.
fn preview(s: &str) -> String {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{:?}…", &s[..cut]),
        None => format!("{s:?}"),
    }
}

/// Times as JavaScript's `Date.prototype.toJSON()` writes them: `2026-01-13T10:00:00.000Z`.
/// Reading accepts any RFC 3339 time, so records written with other precisions or offsets load.
mod js_date {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        match digits(t) {
            Some(b) => s.serialize_str(std::str::from_utf8(&b).map_err(serde::ser::Error::custom)?),
            None => s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true)),
        }
    }

    /// `to_rfc3339_opts(SecondsFormat::Millis, true)`, digit by digit into 24 bytes, for the
    /// years JavaScript writes with four digits (every record's, in practice) and no leap
    /// second: neither a `String` nor the formatting machinery (which cost about 5 % of a lock
    /// cycle's client CPU in a profile at 64 tasks).
    fn digits(t: &DateTime<Utc>) -> Option<[u8; 24]> {
        use chrono::{Datelike, Timelike};
        let year = u32::try_from(t.year()).ok().filter(|y| *y <= 9999)?;
        if t.nanosecond() >= 1_000_000_000 {
            return None;
        }
        let mut b = *b"0000-00-00T00:00:00.000Z";
        let mut put = |at: usize, width: usize, mut v: u32| {
            for i in (at..at + width).rev() {
                // A digit: `v % 10` is below 10.
                b[i] = b'0' + (v % 10) as u8;
                v /= 10;
            }
        };
        put(0, 4, year);
        put(5, 2, t.month());
        put(8, 2, t.day());
        put(11, 2, t.hour());
        put(14, 2, t.minute());
        put(17, 2, t.second());
        put(20, 3, t.nanosecond() / 1_000_000);
        Some(b)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| serde::de::Error::custom(format!("bad time {s:?}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("valid time")
            .with_timezone(&Utc)
    }

    #[test]
    fn times_are_written_as_chrono_writes_them() {
        let mut times: Vec<DateTime<Utc>> = [
            "2026-01-13T10:00:00Z",
            "2026-01-13T10:00:01.5Z",
            "1970-01-01T00:00:00Z",
            "0000-01-01T00:00:00.999999Z",
            "9999-12-31T23:59:59.999Z",
            "2016-12-31T23:59:60.250Z",
        ]
        .iter()
        .map(|s| t(s))
        .collect();
        times.extend(DateTime::from_timestamp_millis(-62_198_755_200_001));
        times.extend(DateTime::from_timestamp_millis(253_402_300_800_000));
        let mut ms: i64 = 1;
        while ms < 4_000_000_000_000 {
            times.extend(DateTime::from_timestamp_millis(ms));
            ms = ms * 7 + 13;
        }
        #[derive(Serialize)]
        struct Written(#[serde(with = "js_date")] DateTime<Utc>);
        for time in times {
            assert_eq!(
                serde_json::to_string(&Written(time)).expect("json"),
                format!("\"{}\"", time.to_rfc3339_opts(SecondsFormat::Millis, true))
            );
        }
    }

    #[test]
    fn lock_json_is_exactly_the_node_librarys() {
        let mut d = LockData::new("k@h/1.2.3".into(), "h/1.2".into(), None);
        d.acquired_at = t("2026-01-13T10:00:00Z");
        d.extended_at = t("2026-01-13T10:00:01.5Z");
        assert_eq!(
            d.to_json(),
            r#"{"ownerHash":"k@h/1.2.3","processHash":"h/1.2","acquiredAt":"2026-01-13T10:00:00.000Z","extendedAt":"2026-01-13T10:00:01.500Z"}"#
        );
        d.trace = Some("req-1".into());
        d.fencing_token = Some(42);
        assert_eq!(
            d.to_json(),
            r#"{"ownerHash":"k@h/1.2.3","processHash":"h/1.2","trace":"req-1","acquiredAt":"2026-01-13T10:00:00.000Z","extendedAt":"2026-01-13T10:00:01.500Z","fencingToken":42}"#
        );
    }

    #[test]
    fn process_json_is_exactly_the_node_librarys() {
        let p = ProcessData {
            alive_at: t("2026-01-13T10:00:00.123Z"),
            extra: Default::default(),
        };
        assert_eq!(p.to_json(), r#"{"aliveAt":"2026-01-13T10:00:00.123Z"}"#);
        assert_eq!(ProcessData::from_json(&p.to_json()).expect("parses"), p);
    }

    #[test]
    fn node_written_record_parses_and_unknown_fields_survive_a_rewrite() {
        // As written by the Node library (`JSON.stringify` of its LockData), plus a field from a
        // hypothetical newer version.
        let node = r#"{"ownerHash":"job@web-1/4242.123456789.0#t","processHash":"web-1/4242.123456789","trace":"t","acquiredAt":"2026-01-13T10:00:00.000Z","extendedAt":"2026-01-13T10:00:00.000Z","future":{"a":[1,2]}}"#;
        let d = LockData::from_json(node).expect("parses");
        assert_eq!(d.trace.as_deref(), Some("t"));
        assert_eq!(d.fencing_token, None);
        assert_eq!(d.extra["future"], serde_json::json!({"a": [1, 2]}));
        let rewritten: serde_json::Value =
            serde_json::from_str(&d.extended_now().to_json()).expect("json");
        assert_eq!(rewritten["future"], serde_json::json!({"a": [1, 2]}));
        assert_eq!(rewritten["acquiredAt"], "2026-01-13T10:00:00.000Z");
    }

    #[test]
    fn fresh_times_have_millisecond_precision() {
        let d = LockData::new("o".into(), "p".into(), None);
        assert_eq!(d.acquired_at.timestamp_subsec_nanos() % 1_000_000, 0);
        let json: serde_json::Value = serde_json::from_str(&d.to_json()).expect("json");
        let at = json["acquiredAt"].as_str().expect("string");
        assert_eq!(at.len(), "2026-01-13T10:00:00.000Z".len(), "{at}");
        assert!(at.ends_with('Z'));
    }

    #[test]
    fn garbage_is_a_typed_corrupt_error() {
        for bad in [
            "",
            "not json",
            "[]",
            "{}",
            r#"{"ownerHash":1}"#,
            r#"{"ownerHash":"o","processHash":"p","acquiredAt":"yesterday","extendedAt":"x"}"#,
            "\u{0}\u{ffff}",
        ] {
            let e = LockData::from_json(bad).expect_err(bad);
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{bad:?}");
            assert!(!e.is_retryable());
            let e = ProcessData::from_json(bad).expect_err(bad);
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{bad:?}");
        }
        let long = "x".repeat(10_000);
        assert!(
            LockData::from_json(&long)
                .expect_err("bad")
                .to_string()
                .len()
                < 400
        );
    }
}
