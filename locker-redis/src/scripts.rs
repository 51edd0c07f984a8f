//! The server-side scripts: each compare-and-set is one `EVALSHA`, with the Node library's
//! semantics (an empty value is no lock; ownership is the decoded record's `ownerHash`).
//!
//! Every script answers a status, with a fencing token where it stored one, and the stored
//! record where it is someone else's. A stored value that is not a lock record answers
//! `CORRUPT` and is left as it is.
//!
//! What a script costs the server is mostly its `redis.call`s (each a few microseconds inside a
//! script, more for one that creates a key): the common paths make as few as they can (an
//! acquire of a free key: `GET`, `INCR` of a counter that exists, `SET`; a release: `GET`,
//! `DEL`) and compare owner hashes without decoding records.
//!
//! Fencing tokens: acquisition increments its slot's counter (see `keys`) and appends the token
//! to the record; a missing counter starts from the server's clock in µs. Tokens stay below
//! 2^53, so JavaScript readers see them exactly.

use locker_core::{Error, ErrorKind, LockData, Result};

/// Decides whether the stored value `cur` is owned by ARGV[`owner`] (whose record starts with
/// ARGV[`owner` + 1], `{"ownerHash":"…",`): `true` or `false` when it can tell, and otherwise
/// returns `{'CORRUPT', cur}` from the script.
///
/// Fast paths, without decoding the record: a record that starts with the caller's prefix and
/// ends with `}` is the caller's (records are written by the scripts from the client's JSON, so
/// the caller's own record always has that form; the Node library writes `ownerHash` first,
/// too); one whose first field is a plain (escape-free) `ownerHash` string that differs is
/// someone else's, and the caller decodes it when it needs the record. Anything else (another
/// field order, escapes, not JSON) is decoded, and must be a whole lock record.
fn owned(owner: usize) -> String {
    let prefix = owner + 1;
    format!(
        r#"
local owned
if string.sub(cur, 1, #ARGV[{prefix}]) == ARGV[{prefix}] and string.byte(cur, -1) == 125 then
  owned = true
else
  local plain = string.match(cur, '^{{"ownerHash":"([^"\\]*)",')
  if plain and plain ~= string.sub(ARGV[{prefix}], 15, -3) then
    owned = false
  else
    local ok, d = pcall(cjson.decode, cur)
    if not ok or type(d) ~= 'table' or type(d.ownerHash) ~= 'string'
        or type(d.processHash) ~= 'string' or type(d.acquiredAt) ~= 'string'
        or type(d.extendedAt) ~= 'string' then
      return {{'CORRUPT', cur}}
    end
    owned = d.ownerHash == ARGV[{owner}]
  end
end
"#
    )
}

/// Stores ARGV[1] (a record open at its end: `{…,"fencingToken":`) under KEYS[1] for ARGV[2]
/// ms, with a new token from the slot's counter KEYS[2] closing it.
///
/// The counter is `INCR`ed in place; a missing one starts from the server's clock in µs, so
/// tokens stay above those of a counter lost with a restart of a server without persistence:
/// a counter grows by one per acquisition on its slot, far slower than the clock (each script
/// takes microseconds), so it never gets ahead of the clock it started from. (`redis.call`, not
/// `pcall`: a counter that is not a number fails the script, and the lock is not stored.)
const CREATE: &str = r#"
local token = redis.call('INCR', KEYS[2])
if token == 1 then
  local t = redis.call('TIME')
  token = tonumber(t[1]) * 1000000 + tonumber(t[2])
  redis.call('SET', KEYS[2], string.format('%d', token))
end
local tok = string.format('%d', token)
redis.call('SET', KEYS[1], ARGV[1] .. tok .. '}', 'PX', ARGV[2])
"#;

/// KEYS: lock, counter. ARGV: open record, ttl ms, liveness key prefix (empty:
/// do not look at the holder's liveness).
///
/// A key held by a process whose liveness record (the prefix then the holder's `processHash`)
/// is missing is taken over in the same call (`TOOKOVER`); `LIVE` says the holder's liveness
/// record is there, `HELD` that it was not looked at.
pub(crate) fn acquire() -> String {
    format!(
        r#"
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= '' then
  if ARGV[3] == '' then return {{'HELD', cur}} end
  local ph = string.match(cur, '^{{"ownerHash":"[^"\\]*","processHash":"([^"\\]*)",')
  if not ph then
    local ok, d = pcall(cjson.decode, cur)
    if not ok or type(d) ~= 'table' or type(d.processHash) ~= 'string' then
      return {{'CORRUPT', cur}}
    end
    ph = d.processHash
  end
  local alive = redis.call('GET', ARGV[3] .. ph)
  if alive and alive ~= '' then return {{'LIVE', cur}} end
{CREATE}
  return {{'TOOKOVER', tok, cur}}
end
{CREATE}
return {{'ACQUIRED', tok}}
"#
    )
}

/// KEYS: lock, counter. ARGV: open record, ttl ms, dead owner hash, its
/// record's prefix.
pub(crate) fn take_over() -> String {
    format!(
        r#"
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= '' then
{owned}
  if not owned then return {{'HELD', cur}} end
end
{CREATE}
return {{'ACQUIRED', tok}}
"#,
        owned = owned(3)
    )
}

/// KEYS: lock. ARGV: open record (without token), ttl ms, owner hash, its record's prefix.
/// Keeps the stored token: the answer is `{'EXTENDED', token}` (an empty token when the record
/// had none).
pub(crate) fn extend() -> String {
    format!(
        r#"
local cur = redis.call('GET', KEYS[1])
if not cur or cur == '' then return {{'NOKEY'}} end
{owned}
if not owned then return {{'HELD', cur}} end
local tok = string.match(cur, ',"fencingToken":(%d+)}}$')
if not tok then
  local ok, d = pcall(cjson.decode, cur)
  if not ok or type(d) ~= 'table' then return {{'CORRUPT', cur}} end
  if type(d.fencingToken) == 'number' then tok = string.format('%d', d.fencingToken) end
end
if tok then
  redis.call('SET', KEYS[1], ARGV[1] .. ',"fencingToken":' .. tok .. '}}', 'PX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1] .. '}}', 'PX', ARGV[2])
  tok = ''
end
return {{'EXTENDED', tok}}
"#,
        owned = owned(3)
    )
}

/// KEYS: lock. ARGV: owner hash, its record's prefix.
pub(crate) fn release() -> String {
    format!(
        r#"
local cur = redis.call('GET', KEYS[1])
if not cur or cur == '' then return {{'NOKEY'}} end
{owned}
if not owned then return {{'HELD', cur}} end
redis.call('DEL', KEYS[1])
return {{'RELEASED'}}
"#,
        owned = owned(1)
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
    /// Stored, with this fencing token.
    Acquired(u64),
    /// A dead holder's lock replaced, with this token; the holder's record.
    TookOver(u64, String),
    /// Extended; the token kept (none when the record had none).
    Extended(Option<u64>),
    Released,
    NoKey,
    /// Held; the holder's liveness record was not looked at.
    Held(String),
    /// Held by a process whose liveness record is there.
    Live(String),
}

/// Reads a script's answer; a stored value that is not a record becomes a `Corrupt` error.
pub(crate) fn parse_reply(key: &str, reply: Vec<String>) -> Result<Reply> {
    let mut it = reply.into_iter();
    let status = it.next().unwrap_or_default();
    let mut value = || it.next().ok_or_else(|| unexpected(key, &status));
    let token = |s: String| s.parse::<u64>().map_err(|_| unexpected(key, &status));
    match status.as_str() {
        "ACQUIRED" => Ok(Reply::Acquired(token(value()?)?)),
        "TOOKOVER" => {
            let tok = token(value()?)?;
            Ok(Reply::TookOver(tok, value()?))
        }
        "EXTENDED" => match value()? {
            t if t.is_empty() => Ok(Reply::Extended(None)),
            t => Ok(Reply::Extended(Some(token(t)?))),
        },
        "HELD" => Ok(Reply::Held(value()?)),
        "LIVE" => Ok(Reply::Live(value()?)),
        "RELEASED" => Ok(Reply::Released),
        "NOKEY" => Ok(Reply::NoKey),
        "CORRUPT" => Err(LockData::from_json(&value().unwrap_or_default())
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

/// A record's JSON without its fencing token and its closing `}`, as the scripts expect it
/// (they append the token, or only the `}`).
pub(crate) fn open_record(data: &LockData) -> String {
    let mut json = if data.fencing_token.is_none() {
        data.to_json()
    } else {
        LockData {
            fencing_token: None,
            ..data.clone()
        }
        .to_json()
    };
    json.pop();
    json
}

/// The start of every record `owner_hash` writes: `{"ownerHash":"…",`, for the scripts' fast
/// ownership check.
pub(crate) fn owner_prefix(owner_hash: &str) -> String {
    let quoted = serde_json::to_string(owner_hash).unwrap_or_default();
    format!("{{\"ownerHash\":{quoted},")
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
        assert_eq!(
            parse_reply("k", s(&["ACQUIRED", "1764000000000001"])).expect("ok"),
            Reply::Acquired(1_764_000_000_000_001)
        );
        assert_eq!(
            parse_reply("k", s(&["TOOKOVER", "9", "{}"])).expect("ok"),
            Reply::TookOver(9, "{}".into())
        );
        assert_eq!(
            parse_reply("k", s(&["EXTENDED", ""])).expect("ok"),
            Reply::Extended(None)
        );
        let e = parse_reply("k", s(&["CORRUPT", "garbage"])).expect_err("corrupt");
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert_eq!(e.key(), Some("k"));
        for bad in [
            s(&[]),
            s(&["HELD"]),
            s(&["WHAT", "x"]),
            s(&["ACQUIRED", "x"]),
            s(&["ACQUIRED", "-1"]),
            s(&["TOOKOVER", "1"]),
        ] {
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
#[cfg(test)]
mod dump {
    #[test]
    #[ignore]
    fn dump_scripts() {
        for n in super::ScriptName::ALL {
            std::fs::write(format!("/tmp/sb/{n:?}.lua"), n.source()).unwrap();
        }
    }
}
