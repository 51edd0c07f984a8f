//! The server-side scripts: each compare-and-set is one `EVALSHA`, with the Node library's
//! semantics (an empty value is no lock; ownership is the decoded record's `ownerHash`).
//!
//! Every script answers `{STATUS}` or `{STATUS, record}`. A stored value that is not a lock
//! record answers `CORRUPT` and is left as it is.
//!
//! Fencing tokens: acquisition sets the key's counter to `max(counter + 1, server time in µs)`
//! and appends the token to the record. The time floor keeps tokens increasing even after the
//! counter expired (a day after its last use) or was lost with a restart of a server without
//! persistence. Tokens stay below 2^53, so JavaScript readers see them exactly.

use locker_core::{Error, ErrorKind, LockData, Result};

/// Decodes the current value into `d`, or answers CORRUPT when it is not a whole lock record
/// (so a value that merely names the caller's owner hash is never deleted or overwritten).
const DECODE: &str = r#"
local ok, d = pcall(cjson.decode, cur)
if not ok or type(d) ~= 'table' or type(d.ownerHash) ~= 'string'
    or type(d.processHash) ~= 'string' or type(d.acquiredAt) ~= 'string'
    or type(d.extendedAt) ~= 'string' then
  return {'CORRUPT', cur}
end
"#;

/// Stores ARGV[1] (a record without token) under KEYS[1] for ARGV[2] ms with a new token from
/// the counter KEYS[2] (kept ARGV[3] ms).
const CREATE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local token = (tonumber(redis.call('GET', KEYS[2]) or '0') or 0) + 1
if now > token then token = now end
local tok = string.format('%d', token)
redis.call('SET', KEYS[2], tok, 'PX', ARGV[3])
local rec = string.sub(ARGV[1], 1, -2) .. ',"fencingToken":' .. tok .. '}'
redis.call('SET', KEYS[1], rec, 'PX', ARGV[2])
return {'ACQUIRED', rec}
"#;

/// KEYS: lock, counter. ARGV: record, ttl ms, counter ttl ms.
pub(crate) fn acquire() -> String {
    format!(
        r#"
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= '' then return {{'HELD', cur}} end
{CREATE}"#
    )
}

/// KEYS: lock, counter. ARGV: record, ttl ms, counter ttl ms, dead owner hash.
pub(crate) fn take_over() -> String {
    format!(
        r#"
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= '' then
{DECODE}
  if d.ownerHash ~= ARGV[4] then return {{'HELD', cur}} end
end
{CREATE}"#
    )
}

/// KEYS: lock. ARGV: record (without token), ttl ms, owner hash. Keeps the stored token.
pub(crate) fn extend() -> String {
    format!(
        r#"
local cur = redis.call('GET', KEYS[1])
if not cur or cur == '' then return {{'NOKEY'}} end
{DECODE}
if d.ownerHash ~= ARGV[3] then return {{'HELD', cur}} end
local rec = ARGV[1]
if type(d.fencingToken) == 'number' then
  rec = string.sub(rec, 1, -2) .. ',"fencingToken":' .. string.format('%d', d.fencingToken) .. '}}'
end
redis.call('SET', KEYS[1], rec, 'PX', ARGV[2])
return {{'EXTENDED', rec}}
"#
    )
}

/// KEYS: lock. ARGV: owner hash.
pub(crate) fn release() -> String {
    format!(
        r#"
local cur = redis.call('GET', KEYS[1])
if not cur or cur == '' then return {{'NOKEY'}} end
{DECODE}
if d.ownerHash ~= ARGV[1] then return {{'HELD', cur}} end
redis.call('DEL', KEYS[1])
return {{'RELEASED'}}
"#
    )
}

/// Which script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScriptName {
    Acquire,
    TakeOver,
    Extend,
    Release,
}

impl ScriptName {
    pub(crate) const ALL: [ScriptName; 4] = [
        ScriptName::Acquire,
        ScriptName::TakeOver,
        ScriptName::Extend,
        ScriptName::Release,
    ];

    pub(crate) fn source(self) -> String {
        match self {
            ScriptName::Acquire => acquire(),
            ScriptName::TakeOver => take_over(),
            ScriptName::Extend => extend(),
            ScriptName::Release => release(),
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// A script's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    Acquired(String),
    Extended(String),
    Released,
    NoKey,
    Held(String),
}

/// Reads a script's answer; a stored value that is not a record becomes a `Corrupt` error.
pub(crate) fn parse_reply(key: &str, reply: Vec<String>) -> Result<Reply> {
    let mut it = reply.into_iter();
    let status = it.next().unwrap_or_default();
    let value = it.next();
    let with_value =
        |f: fn(String) -> Reply| value.clone().map(f).ok_or_else(|| unexpected(key, &status));
    match status.as_str() {
        "ACQUIRED" => with_value(Reply::Acquired),
        "EXTENDED" => with_value(Reply::Extended),
        "HELD" => with_value(Reply::Held),
        "RELEASED" => Ok(Reply::Released),
        "NOKEY" => Ok(Reply::NoKey),
        "CORRUPT" => Err(LockData::from_json(value.as_deref().unwrap_or_default())
            .err()
            .unwrap_or_else(|| Error::corrupt("the stored value is not a lock record"))
            .with_key(key)),
        _ => Err(unexpected(key, &status)),
    }
}

fn unexpected(key: &str, status: &str) -> Error {
    Error::new(
        ErrorKind::Other,
        format!("unexpected script reply {status:?}"),
    )
    .with_key(key)
}

/// A record's JSON without its fencing token, as the scripts expect it (they append the token).
pub(crate) fn record_without_token(data: &LockData) -> String {
    LockData {
        fencing_token: None,
        ..data.clone()
    }
    .to_json()
}

/// Parses a record a script returned or `GET` read.
pub(crate) fn parse_record(key: &str, json: &str) -> Result<LockData> {
    LockData::from_json(json).map_err(|e| e.with_key(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse_into_typed_outcomes() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(parse_reply("k", s(&["NOKEY"])).expect("ok"), Reply::NoKey);
        assert_eq!(
            parse_reply("k", s(&["RELEASED"])).expect("ok"),
            Reply::Released
        );
        assert_eq!(
            parse_reply("k", s(&["HELD", "{}"])).expect("ok"),
            Reply::Held("{}".into())
        );
        let e = parse_reply("k", s(&["CORRUPT", "garbage"])).expect_err("corrupt");
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert_eq!(e.key(), Some("k"));
        for bad in [s(&[]), s(&["HELD"]), s(&["WHAT", "x"])] {
            assert_eq!(
                parse_reply("k", bad).expect_err("bad").kind(),
                ErrorKind::Other
            );
        }
    }

    #[test]
    fn scripts_close_their_braces() {
        for name in ScriptName::ALL {
            let src = name.source();
            assert!(!src.contains("{{"), "{name:?}: unescaped format braces");
            assert!(src.contains("return"), "{name:?}");
        }
    }
}
