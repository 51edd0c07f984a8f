//! Process and owner hashes, in the Node library's formats.
//!
//! - process hash: `{hostname}/{pid}.{nanos}`
//! - owner hash: `{key}@{processHash}.{seq}`, plus `#{trace}` when a trace is given.
//!
//! Backends treat both as opaque strings; only the [`Locker`](crate::Locker) builds and parses
//! them.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};

/// Keys longer than this many bytes are refused with [`ErrorKind::InvalidInput`], so one bad
/// caller cannot fill a store or a log line. 64 KiB is far above any sensible job name.
///
/// [`ErrorKind::InvalidInput`]: crate::ErrorKind::InvalidInput
pub const MAX_KEY_LEN: usize = 64 * 1024;

/// Traces longer than this many bytes are refused, for the same reason as [`MAX_KEY_LEN`].
pub const MAX_TRACE_LEN: usize = 4 * 1024;

/// Owner hashes of one OS process never repeat: the sequence is process-wide, as in the Node
/// library.
static SEQ: AtomicU64 = AtomicU64::new(0);

/// A new process hash for this OS process: `{hostname}/{pid}.{nanos since the Unix epoch}`.
///
/// Each [`Locker`](crate::Locker) makes its own, so two lockers in one OS process are two
/// "processes" to the rest of the cluster.
pub fn new_process_hash() -> String {
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    // The parser splits on the last '@' that is followed by `host/pid.nanos.seq` and on the
    // first '/' after it, so a hostname may contain neither.
    let host = if host.is_empty() {
        "localhost".to_owned()
    } else {
        host.replace(['/', '@'], "_")
    };
    format!("{host}/{}.{}", std::process::id(), unique_nanos())
}

/// Nanoseconds since the Unix epoch, but strictly greater than every earlier value returned in
/// this OS process: two lockers built within one clock tick (or after the wall clock stepped
/// back) still get different process hashes, so one's shutdown never deletes the other's
/// liveness record. The digits keep the Node format (`{pid}.{digits}`).
fn unique_nanos() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or_default();
    next_unique(&LAST, now)
}

/// `now`, or one more than the last value handed out if the clock has not moved past it.
fn next_unique(last: &AtomicU64, now: u64) -> u64 {
    let mut seen = last.load(Ordering::Relaxed);
    loop {
        let next = now.max(seen.saturating_add(1));
        match last.compare_exchange_weak(seen, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(current) => seen = current,
        }
    }
}

/// Checks a lock key: not empty, at most [`MAX_KEY_LEN`] bytes. Any other content is allowed
/// (`@`, `/`, `#`, newlines, NUL, any Unicode).
pub fn validate_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::invalid_input("lock key must not be empty"));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(Error::invalid_input(format!(
            "lock key is {} bytes, more than the limit of {MAX_KEY_LEN}",
            key.len()
        )));
    }
    Ok(())
}

/// Builds a new owner hash `{key}@{processHash}.{seq}[#trace]` and checks that
/// [`parse_owner_hash`] gives the key back: a trace crafted to look like another owner hash
/// is refused rather than allowed to make [`Locker::owner_status`](crate::Locker::owner_status)
/// report the wrong key.
pub fn new_owner_hash(key: &str, process_hash: &str, trace: Option<&str>) -> Result<String> {
    validate_key(key)?;
    if let Some(trace) = trace {
        if trace.len() > MAX_TRACE_LEN {
            return Err(Error::invalid_input(format!(
                "trace is {} bytes, more than the limit of {MAX_TRACE_LEN}",
                trace.len()
            )));
        }
    }
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    // `{key}@{process_hash}.{seq}[#{trace}]`, in one allocation (room for 20 digits).
    // As in the Node library, an empty trace is no trace.
    let trace = trace.filter(|t| !t.is_empty());
    let mut owner_hash =
        String::with_capacity(key.len() + process_hash.len() + 23 + trace.map_or(0, str::len));
    owner_hash.push_str(key);
    owner_hash.push('@');
    owner_hash.push_str(process_hash);
    // Writing to a `String` cannot fail.
    let _ = write!(owner_hash, ".{seq}");
    if let Some(trace) = trace {
        owner_hash.push('#');
        owner_hash.push_str(trace);
    }
    match parse_owner_hash(&owner_hash) {
        Some(parsed) if parsed.key == key && parsed.process_hash == process_hash => Ok(owner_hash),
        _ => Err(Error::invalid_input(format!(
            "trace {trace:?} would make the owner hash of key {key:?} ambiguous"
        ))
        .with_key(key)),
    }
}

/// The parts of an owner hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedOwnerHash<'a> {
    /// The lock key.
    pub key: &'a str,
    /// The process hash of the process that acquired the lock.
    pub process_hash: &'a str,
    /// The trace, without its `#`, when there is one.
    pub trace: Option<&'a str>,
}

/// Splits an owner hash into key, process hash and trace; `None` when it is malformed.
///
/// Matches exactly what the Node library's `/^(.+)@([^/]+\/\d+\.\d+)\.\d+(#.*)?$/s` matches, with
/// the same choice among ambiguous splits (the longest key), so both libraries read each other's
/// owner hashes alike.
pub fn parse_owner_hash(owner_hash: &str) -> Option<ParsedOwnerHash<'_>> {
    // The key is `.+` (greedy), so try the '@' separators from the right.
    for (at, _) in owner_hash.rmatch_indices('@') {
        if at == 0 {
            break;
        }
        let rest = &owner_hash[at + 1..];
        if let Some((process_len, trace)) = match_after_at(rest) {
            return Some(ParsedOwnerHash {
                key: &owner_hash[..at],
                process_hash: &rest[..process_len],
                trace,
            });
        }
    }
    None
}

/// Matches `[^/]+/\d+\.\d+\.\d+(#.*)?$` at the start of `s`; returns the length of the process
/// hash part (`[^/]+/\d+\.\d+`) and the trace.
fn match_after_at(s: &str) -> Option<(usize, Option<&str>)> {
    let slash = s.find('/')?;
    if slash == 0 {
        return None;
    }
    let mut i = slash + 1;
    let b = s.as_bytes();
    let digits = |i: &mut usize| {
        let start = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i > start
    };
    let dot = |i: &mut usize| {
        if *i < b.len() && b[*i] == b'.' {
            *i += 1;
            true
        } else {
            false
        }
    };
    if !(digits(&mut i) && dot(&mut i) && digits(&mut i)) {
        return None;
    }
    let process_len = i;
    if !(dot(&mut i) && digits(&mut i)) {
        return None;
    }
    match b.get(i) {
        None => Some((process_len, None)),
        Some(b'#') => Some((process_len, Some(&s[i + 1..]))),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn process_hash_has_the_node_format() {
        let p = new_process_hash();
        let (host, rest) = p.split_once('/').expect("slash");
        assert!(!host.is_empty());
        let (pid, nanos) = rest.split_once('.').expect("dot");
        assert_eq!(pid, std::process::id().to_string());
        assert!(nanos.parse::<u128>().is_ok(), "{p}");
    }

    /// Lockers built back to back (within one clock tick) on several threads never share a
    /// process hash.
    #[test]
    fn process_hashes_never_repeat_within_a_process() {
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| (0..5000).map(|_| new_process_hash()).collect::<Vec<_>>())
            })
            .collect();
        let mut all = std::collections::HashSet::new();
        for t in threads {
            for p in t.join().expect("thread") {
                assert!(all.insert(p.clone()), "repeated process hash {p}");
            }
        }
        assert_eq!(all.len(), 20_000);
    }

    /// A clock that did not tick, or stepped back, still gives a new value.
    #[test]
    fn a_clock_that_does_not_tick_still_gives_unique_digits() {
        let last = AtomicU64::new(0);
        assert_eq!(next_unique(&last, 500), 500);
        assert_eq!(next_unique(&last, 500), 501);
        assert_eq!(next_unique(&last, 100), 502);
        assert_eq!(next_unique(&last, 900), 900);
    }

    #[test]
    fn owner_hash_round_trips_hostile_keys() {
        let p = "host-1/123.456";
        let long = "k".repeat(1024);
        for key in [
            "plain",
            "a@b",
            "a@host/1.2.3",
            "x/y#z",
            "{slot}",
            "with space",
            "multi\nline\r\n",
            "nul\0byte",
            "ünïcødé ✓ 🔒",
            "@",
            "#",
            "trailing@",
            long.as_str(),
        ] {
            for trace in [None, Some("t-1"), Some("has # and spaces")] {
                let h = new_owner_hash(key, p, trace).expect(key);
                let parsed = parse_owner_hash(&h).expect(&h);
                assert_eq!(parsed.key, key);
                assert_eq!(parsed.process_hash, p);
                assert_eq!(parsed.trace, trace);
            }
        }
    }

    #[test]
    fn parser_agrees_with_the_node_regex() {
        let ok = |h: &str, key: &str, proc_: &str| {
            let p = parse_owner_hash(h).expect(h);
            assert_eq!((p.key, p.process_hash), (key, proc_), "{h}");
        };
        ok("k@h/1.2.3", "k", "h/1.2");
        ok("k@h/1.2.3#", "k", "h/1.2");
        ok("k@h/1.2.3#x@h/4.5.6", "k@h/1.2.3#x", "h/4.5");
        ok("a@b@h/1.2.3", "a@b", "h/1.2");
        ok("k@h@x/1.2.3", "k@h", "x/1.2");
        for bad in [
            "",
            "k",
            "@h/1.2.3",
            "k@h/1.2",
            "k@/1.2.3",
            "k@h/1.2.3x",
            "k@h/a.2.3",
            "k@h/1..3",
            "k@h/1.2.",
        ] {
            assert_eq!(parse_owner_hash(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn an_ambiguous_trace_is_refused() {
        let e = new_owner_hash("k", "h/1.2", Some("x@h/4.5.6")).expect_err("ambiguous");
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
    }

    #[test]
    fn bad_keys_and_traces_are_typed_errors() {
        assert_eq!(
            validate_key("").expect_err("empty").kind(),
            ErrorKind::InvalidInput
        );
        let huge = "k".repeat(MAX_KEY_LEN + 1);
        assert_eq!(
            validate_key(&huge).expect_err("huge").kind(),
            ErrorKind::InvalidInput
        );
        assert!(validate_key(&huge[1..]).is_ok());
        let trace = "t".repeat(MAX_TRACE_LEN + 1);
        assert_eq!(
            new_owner_hash("k", "h/1.2", Some(&trace))
                .expect_err("long trace")
                .kind(),
            ErrorKind::InvalidInput
        );
    }

    #[test]
    fn sequence_makes_owner_hashes_unique() {
        let a = new_owner_hash("k", "h/1.2", None).expect("ok");
        let b = new_owner_hash("k", "h/1.2", None).expect("ok");
        assert_ne!(a, b);
    }
}
