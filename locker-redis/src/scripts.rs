//! The server-side scripts: each compare-and-set is one `EVALSHA`, with the Node library's
//! semantics (an empty value is no lock; ownership is the decoded record's `ownerHash`).
//!
//! Every script answers a status, with a fencing token where it stored one, and the stored
//! record where it is someone else's. A stored value that is not a lock record answers
//! `CORRUPT` and is left as it is.
//!
//! What a script costs the server is mostly its `redis.call`s (each a few microseconds inside a
//! script, more for one that creates a key): the common paths make as few as they can (an
//! acquire of a free key: `GET` of the key, `TIME`, `GET` and `SET` of a counter that exists,
//! `SET` of the key, or in a batch on Redis 7.0 or newer one `SET … NX GET` of the key and the
//! counter's share of the call; a release: `GET`, `DEL`) and compare owner hashes without
//! decoding records.
//!
//! Fencing tokens: acquisition sets its slot's counter (see `keys`) to `max(counter + 1, server
//! time in µs)` and appends the token to the record. Tokens stay below 2^53, so JavaScript
//! readers see them exactly.

use locker_core::{Error, ErrorKind, LockData, Result};

/// The scripts' logic, as Lua functions of their keys and arguments, each answering up to three
/// values: a status, then a token and/or a record. Every script starts with those it needs and
/// calls one (or, for [`ScriptName::Batch`], one per operation).
///
/// - `owned(cur, owner, prefix)`: whether the stored value `cur` is `owner`'s (whose records
///   start with `prefix`, `{"ownerHash":"…",`): `true`, `false`, or `nil` for a value that is
///   not a lock record. Fast paths, without decoding: a value that starts with the prefix and
///   ends with `}` is the owner's (records are written by the scripts from the client's JSON,
///   so an owner's own record always has that form; the Node library writes `ownerHash` first,
///   too); one whose first field is a plain (escape-free) `ownerHash` string that differs is
///   someone else's (the client decodes it, and finds it corrupt if it is). Anything else
///   (another field order, escapes, not JSON) is decoded, and must be a whole lock record.
/// - `create(lk, fk, rec, ttl)`: stores `rec` (a record open at its end: `{…,"fencingToken":`)
///   under `lk` for `ttl` ms, closed by a new token: `max(last + 1, server time in µs)`, where
///   `last` is the slot's counter `fk` (overwritten in place, no expiry). The time floor keeps
///   tokens increasing across a lost counter (a restart without persistence) and next to the
///   tokens of earlier versions of this library, which were the same floor over a counter per
///   key: a fleet can be upgraded process by process. A counter that is not a number counts as
///   missing, as before. The server time is read once per script call and each counter once,
///   and `store_counters()` writes back the counters it drew from, at the end: a batch of N acquires costs
///   one `TIME`, one `GET` and one `SET` of its slot's counter, not N of each. (Tokens within
///   a call still grow by one from the last: the same as N calls in the same microsecond.)
///   The counter write comes after the locks' writes; it cannot fail then (a script that has
///   written is not refused for memory, and `SET` replaces a value of any type).
/// - `acquire(lk, fk, rec, ttl, lp)`: a free key is stored (`ACQUIRED`, token). In a batch on
///   Redis 7.0 or newer (`redis.REDIS_VERSION_NUM`, which older servers lack, so each node
///   decides for itself), one `SET … NX PX … GET` both stores a free key and reads a held one:
///   one command for either answer where a `GET` then a `SET` were two (each `redis.call`
///   costs the server a few microseconds). Its token is drawn first and kept only when it was
///   stored, so tokens stay one apart. A key holding an empty value (free, in the Node
///   library's terms) is then stored by a plain `SET`. A lone acquire (no batch) reads the key
///   first, so that a try on a held key reads neither the time nor a counter. A held one,
///   when `lp` (the liveness keys' prefix) is not empty, has its holder's liveness record
///   looked at (`lp` then the holder's `processHash`): there, `LIVE` and the record; missing,
///   the lock is replaced (`TOOKOVER`, token, the dead holder's record). With an empty `lp`,
///   `HELD` and the record.
/// - `take_over(lk, fk, rec, ttl, dead, prefix)`: stores `rec` if the key is free or `dead`'s.
/// - `extend(lk, fk, rec, ttl, owner, prefix)`: rewrites `owner`'s record with `rec` (open at
///   its end, no token) and keeps the stored token (`EXTENDED`, token or empty).
/// - `release(lk, wk, owner, prefix)`: deletes `owner`'s record (`RELEASED`). When the script
///   was made with `NOTIFY` (release events on) and is given the lock's waiters' flag `wk`
///   (see `keys`), it deletes the flag with the lock, in the same `DEL`, and if the flag was
///   there (someone waits) publishes an empty message on the channel named as the lock key, to
///   wake the waiters (see `notify`): a release that nobody waits for costs no `PUBLISH`. A
///   `PUBLISH` the server refuses (an ACL user without channel rights: Redis 7's default for
///   new users) is ignored: the release happened, and waiters poll.
const OWNED: &str = r#"
local function owned(cur, owner, prefix)
  if string.sub(cur, 1, #prefix) == prefix and string.byte(cur, -1) == 125 then return true end
  local plain = string.match(cur, '^{"ownerHash":"([^"\\]*)",')
  if plain and plain ~= string.sub(prefix, 15, -3) then return false end
  local ok, d = pcall(cjson.decode, cur)
  if not ok or type(d) ~= 'table' or type(d.ownerHash) ~= 'string'
      or type(d.processHash) ~= 'string' or type(d.acquiredAt) ~= 'string'
      or type(d.extendedAt) ~= 'string' then
    return nil
  end
  return d.ownerHash == owner
end
"#;

const CREATE: &str = r#"
local now, last, dirty = nil, {}, {}
local function next_token(fk)
  if not now then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  end
  local l = last[fk]
  if not l then
    l = tonumber(redis.call('GET', fk) or '0') or 0
    last[fk] = l
  end
  if l >= now then return l + 1 end
  return now
end
local function drawn(fk, token)
  last[fk] = token
  dirty[fk] = true
  return string.format('%d', token)
end
local function create(lk, fk, rec, ttl)
  local tok = drawn(fk, next_token(fk))
  redis.call('SET', lk, rec .. tok .. '}', 'PX', ttl)
  return tok
end
local function store_counters()
  for fk in pairs(dirty) do redis.call('SET', fk, string.format('%d', last[fk])) end
end
"#;

const ACQUIRE: &str = r#"
local function acquire(lk, fk, rec, ttl, lp)
  local cur
  if SET_GET then
    local token = next_token(fk)
    local tok = string.format('%d', token)
    cur = redis.call('SET', lk, rec .. tok .. '}', 'NX', 'PX', ttl, 'GET')
    if not cur then
      drawn(fk, token)
      return 'ACQUIRED', tok
    end
  else
    cur = redis.call('GET', lk)
  end
  if not cur or cur == '' then return 'ACQUIRED', create(lk, fk, rec, ttl) end
  if lp == '' then return 'HELD', cur end
  local ph = string.match(cur, '^{"ownerHash":"[^"\\]*","processHash":"([^"\\]*)",')
  if not ph then
    local ok, d = pcall(cjson.decode, cur)
    if not ok or type(d) ~= 'table' or type(d.processHash) ~= 'string' then
      return 'CORRUPT', cur
    end
    ph = d.processHash
  end
  local alive = redis.call('GET', lp .. ph)
  if alive and alive ~= '' then return 'LIVE', cur end
  return 'TOOKOVER', create(lk, fk, rec, ttl), cur
end
"#;

const TAKE_OVER: &str = r#"
local function take_over(lk, fk, rec, ttl, dead, prefix)
  local cur = redis.call('GET', lk)
  if cur and cur ~= '' then
    local o = owned(cur, dead, prefix)
    if o == nil then return 'CORRUPT', cur end
    if not o then return 'HELD', cur end
  end
  return 'ACQUIRED', create(lk, fk, rec, ttl)
end
"#;

const EXTEND: &str = r#"
local function extend(lk, fk, rec, ttl, owner, prefix)
  local cur = redis.call('GET', lk)
  if not cur or cur == '' then return 'NOKEY' end
  local o = owned(cur, owner, prefix)
  if o == nil then return 'CORRUPT', cur end
  if not o then return 'HELD', cur end
  local tok = string.match(cur, ',"fencingToken":(%d+)}$')
  if not tok then
    local ok, d = pcall(cjson.decode, cur)
    if not ok or type(d) ~= 'table' then return 'CORRUPT', cur end
    if type(d.fencingToken) == 'number' then tok = string.format('%d', d.fencingToken) end
  end
  if tok then
    redis.call('SET', lk, rec .. ',"fencingToken":' .. tok .. '}', 'PX', ttl)
    return 'EXTENDED', tok
  end
  redis.call('SET', lk, rec .. '}', 'PX', ttl)
  return 'EXTENDED', ''
end
"#;

const RELEASE: &str = r#"
local function release(lk, wk, owner, prefix)
  local cur = redis.call('GET', lk)
  if not cur or cur == '' then return 'NOKEY' end
  local o = owned(cur, owner, prefix)
  if o == nil then return 'CORRUPT', cur end
  if not o then return 'HELD', cur end
  if NOTIFY and wk ~= lk then
    if redis.call('DEL', lk, wk) > 1 then pcall(redis.call, 'PUBLISH', lk, '') end
  else
    redis.call('DEL', lk)
  end
  return 'RELEASED'
end
"#;

/// One operation's script: the functions it needs (each `local function` is a closure made at
/// every call of the script, so a script carries no more than it calls), then a call of the
/// last with the script's keys (lock, counter; the lock twice for extend and release) and
/// arguments (up to four).
fn single(functions: &[&str], function: &str, notify: bool) -> String {
    let store = if functions.contains(&CREATE) {
        "store_counters()\n"
    } else {
        ""
    };
    format!(
        "local NOTIFY = {notify}\nlocal SET_GET = false\n{}\nlocal s, a, b = {function}(KEYS[1], KEYS[2] or KEYS[1], ARGV[1], ARGV[2], \
         ARGV[3] or '', ARGV[4] or '')\n{store}return {{s, a or '', b or ''}}\n",
        functions.concat()
    )
}

/// Several operations in one call: KEYS has two keys per operation (lock, counter), ARGV five
/// values (the operation's letter, then its four arguments, padded with empty strings); the
/// answer is three values per operation. On a cluster, all the keys must be on one slot.
///
/// An operation whose command fails (a lock key of another type) answers `ERROR` and the others
/// go on: no operation writes before the command that
/// can fail it, so nothing of it was stored, and the client sends it again alone to get its
/// error.
fn batch(notify: bool) -> String {
    format!(
        r#"local NOTIFY = {notify}
local SET_GET = (redis.REDIS_VERSION_NUM or 0) >= 0x070000
{OWNED}{CREATE}{ACQUIRE}{TAKE_OVER}{EXTEND}{RELEASE}
local ops = {{A = acquire, T = take_over, E = extend, R = release}}
local out = {{}}
for k = 0, #KEYS / 2 - 1 do
  local ok, s, a, b = pcall(ops[ARGV[5 * k + 1]], KEYS[2 * k + 1], KEYS[2 * k + 2],
    ARGV[5 * k + 2], ARGV[5 * k + 3], ARGV[5 * k + 4], ARGV[5 * k + 5])
  if not ok then s, a, b = 'ERROR', '', '' end
  out[3 * k + 1] = s
  out[3 * k + 2] = a or ''
  out[3 * k + 3] = b or ''
end
store_counters()
return out
"#
    )
}

/// Which script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScriptName {
    /// KEYS: lock, counter. ARGV: open record (`{…,"fencingToken":`), ttl ms, liveness key
    /// prefix (empty: do not look at the holder's liveness).
    Acquire,
    /// KEYS: lock, counter. ARGV: open record, ttl ms, dead owner hash, its record's prefix.
    TakeOver,
    /// KEYS: lock. ARGV: open record (without token), ttl ms, owner hash, its record's prefix.
    Extend,
    /// KEYS: lock. ARGV: owner hash, its record's prefix.
    Release,
    /// Several of the above; see [`batch`].
    Batch,
}

impl ScriptName {
    pub(crate) const ALL: [ScriptName; 5] = [
        ScriptName::Acquire,
        ScriptName::TakeOver,
        ScriptName::Extend,
        ScriptName::Release,
        ScriptName::Batch,
    ];

    /// The script's text; with `notify`, a release publishes on the lock key's channel
    /// (standalone servers only: on a cluster a `PUBLISH` goes to every node).
    pub(crate) fn source(self, notify: bool) -> String {
        match self {
            ScriptName::Acquire => single(&[CREATE, ACQUIRE], "acquire", notify),
            ScriptName::TakeOver => single(&[OWNED, CREATE, TAKE_OVER], "take_over", notify),
            ScriptName::Extend => single(&[OWNED, EXTEND], "extend", notify),
            ScriptName::Release => single(&[OWNED, RELEASE], "release", notify),
            ScriptName::Batch => batch(notify),
        }
    }

    /// The operation's letter in a [`ScriptName::Batch`] call.
    pub(crate) fn letter(self) -> &'static str {
        match self {
            ScriptName::Acquire => "A",
            ScriptName::TakeOver => "T",
            ScriptName::Extend => "E",
            ScriptName::Release => "R",
            ScriptName::Batch => "",
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

/// A record's JSON without its fencing token and its closing `}`, then `suffix`, as the scripts
/// expect it (they append the token, or only the `}`). One allocation, sized for a record.
pub(crate) fn open_record(data: &LockData, suffix: &str) -> String {
    let mut json = Vec::with_capacity(256 + data.trace.as_ref().map_or(0, String::len));
    // Serializing strings, numbers and a JSON map into a vector cannot fail.
    let _ = if data.fencing_token.is_none() {
        serde_json::to_writer(&mut json, data)
    } else {
        serde_json::to_writer(
            &mut json,
            &LockData {
                fencing_token: None,
                ..data.clone()
            },
        )
    };
    json.pop();
    json.extend_from_slice(suffix.as_bytes());
    String::from_utf8(json).unwrap_or_default()
}

/// The start of every record `owner_hash` writes: `{"ownerHash":"…",`, for the scripts' fast
/// ownership check.
pub(crate) fn owner_prefix(owner_hash: &str) -> String {
    let mut out = Vec::with_capacity(owner_hash.len() + 24);
    out.extend_from_slice(b"{\"ownerHash\":");
    // Serializing a string into a vector cannot fail.
    let _ = serde_json::to_writer(&mut out, owner_hash);
    out.push(b',');
    String::from_utf8(out).unwrap_or_default()
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
    fn open_records_and_owner_prefixes_are_the_records_json() {
        let owner = "job \"q\"@host/1.2.3";
        let mut data = LockData::new(owner.to_owned(), "host/1.2".to_owned(), Some("t\n".into()));
        let whole = data.to_json();
        assert_eq!(open_record(&data, "") + "}", whole);
        assert!(whole.starts_with(&owner_prefix(owner)), "{whole}");
        data.fencing_token = Some(42);
        let open = open_record(&data, ",\"fencingToken\":");
        assert_eq!(open.clone() + "42}", data.to_json());
        assert!(!open[..open.len() - 16].contains("fencingToken"), "{open}");
    }

    #[test]
    fn scripts_close_their_braces() {
        for name in ScriptName::ALL {
            for notify in [false, true] {
                let src = name.source(notify);
                assert!(!src.contains("{{"), "{name:?}: unescaped format braces");
                assert!(src.contains("return"), "{name:?}");
                assert!(src.starts_with(&format!("local NOTIFY = {notify}\n")));
            }
        }
    }
}
