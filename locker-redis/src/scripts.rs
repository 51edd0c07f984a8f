//! The server-side scripts: each compare-and-set is one `EVALSHA`, with the Node library's
//! semantics (an empty value is no lock; ownership is the decoded record's `ownerHash`).
//!
//! Every script answers a code, with a fencing token where it stored one, and the stored
//! record where it is someone else's (see [`Reply`] and [`values`]). A stored value that is not
//! a lock record answers `CORRUPT` and is left as it is.
//!
//! What a script costs the server is mostly its `redis.call`s (each a few microseconds inside a
//! script, more for one that creates a key): the common paths make as few as they can (an
//! acquire of a free key: `GET` of the key, `TIME`, `GET` and `SET` of a counter that exists,
//! `SET` of the key, or in a batch on Redis 7.0 or newer one `SET … NX GET` of the key and the
//! counter's share of the call; a release: `GET`, `DEL`) and compare owner hashes without
//! decoding records.
//!
//! What a script costs the server besides its calls is mostly the strings that enter Lua: each
//! key and argument, each value a call returns and each string the script builds is interned,
//! and Redis's Lua hashes every byte of it. So the arguments are what the operation needs and
//! no more (an owner's record prefix, not the owner hash beside it; the batch's counter and
//! liveness prefix once per call, not once per operation), and the answers are numbers where
//! they can be: codes and new tokens are integers, which the client reads without allocating.
//!
//! Fencing tokens: acquisition sets its slot's counter (see `keys`) to `max(counter + 1, server
//! time in µs)` and appends the token to the record. Tokens stay below 2^53, so JavaScript
//! readers see them exactly.

use locker_core::{Error, ErrorKind, LockData, Result};

/// The scripts' logic, as Lua functions of their keys and arguments, each answering a code (an
/// integer) and up to two values: a token and/or a record. Every script starts with those it needs and
/// calls one (or, for [`ScriptName::Batch`], one per operation), except the lone acquire, the
/// most frequent call, which is the same logic written out without functions
/// ([`LONE_ACQUIRE`]).
///
/// - `owned(cur, prefix)`: whether the stored value `cur` is the owner's whose records start
///   with `prefix` (`{"ownerHash":"…",`; the slow path decodes the owner hash from it): `true`, `false`, or `nil` for a value that is
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
///   and `store_counters()` writes back the counters it drew from, at the end: a batch of N
///   acquires costs one `TIME`, one `GET` and one `SET` of its slot's counter, not N of each. (Tokens within
///   a call still grow by one from the last: the same as N calls in the same microsecond.)
///   The counter write comes after the locks' writes; it cannot fail then (a script that has
///   written is not refused for memory, and `SET` replaces a value of any type).
/// - `acquire(lk, fk, rec, ttl, lp)`: a free key is stored (`ACQUIRED`: 1, token). In a batch on
///   Redis 7.0 or newer (`redis.REDIS_VERSION_NUM`, which older servers lack, so each node
///   decides for itself), one `SET … NX PX … GET` both stores a free key and reads a held one:
///   one command for either answer where a `GET` then a `SET` were two (each `redis.call`
///   costs the server a few microseconds). Its token is drawn first and kept only when it was
///   stored, so tokens stay one apart. A key holding an empty value (free, in the Node
///   library's terms) is then stored by a plain `SET`. A lone acquire (no batch) reads the key
///   first, so that a try on a held key reads neither the time nor a counter. A held one,
///   when `lp` (the liveness keys' prefix) is not empty, has its holder's liveness record
///   looked at (`lp` then the holder's `processHash`): there, `LIVE` (8) and the record;
///   missing, the lock is replaced (`TOOKOVER`: 2, token, the dead holder's record). With an
///   empty `lp`, `HELD` (7) and the record.
/// - `take_over(lk, fk, rec, ttl, prefix)`: stores `rec` if the key is free or the dead
///   owner's whose records start with `prefix`.
/// - `extend(lk, rec, ttl, prefix)`: rewrites the owner's record with `rec` (open at its end,
///   no token) and keeps the stored token (`EXTENDED`: 3 and the token's digits, or 4 for a
///   record without one); `NOKEY` (6) for no lock.
/// - `release(lk, wk, prefix)`: deletes the owner's record (`RELEASED`: 5; `NOKEY`: 6). When the script
///   was made with `NOTIFY` (release events on) and is given the lock's waiters' flag `wk`
///   (see `keys`), it deletes the flag with the lock, in the same `DEL`, and if the flag was
///   there (someone waits) publishes an empty message on the channel named as the lock key, to
///   wake the waiters (see `notify`): a release that nobody waits for costs no `PUBLISH`. A
///   `PUBLISH` the server refuses (an ACL user without channel rights: Redis 7's default for
///   new users) is ignored: the release happened, and waiters poll.
const OWNED: &str = r#"
local function owned(cur, prefix)
  if string.find(cur, prefix, 1, true) == 1 and string.byte(cur, -1) == 125 then return true end
  local plain = string.match(cur, '^{"ownerHash":"([^"\\]*)",')
  if plain and plain ~= string.sub(prefix, 15, -3) then return false end
  local ok, d = pcall(cjson.decode, cur)
  if not ok or type(d) ~= 'table' or type(d.ownerHash) ~= 'string'
      or type(d.processHash) ~= 'string' or type(d.acquiredAt) ~= 'string'
      or type(d.extendedAt) ~= 'string' then
    return nil
  end
  local okp, owner = pcall(cjson.decode, string.sub(prefix, 14, -2))
  return okp and d.ownerHash == owner
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
end
local function create(lk, fk, rec, ttl)
  local token = next_token(fk)
  redis.call('SET', lk, rec .. string.format('%d', token) .. '}', 'PX', ttl)
  drawn(fk, token)
  return token
end
local function store_counters()
  for fk in pairs(dirty) do redis.call('SET', fk, string.format('%d', last[fk])) end
end
"#;

/// The holder's `processHash`, `ph`, read from the held record `cur` (the Node library's field
/// order first, without decoding; decoded otherwise): `nil` for a value that is not a record
/// with one. Shared by the batch's `acquire` and [`LONE_ACQUIRE`].
macro_rules! holder_process {
    () => {
        r#"
  local ph = string.match(cur, '^{"ownerHash":"[^"\\]*","processHash":"([^"\\]*)",')
  if not ph then
    local ok, d = pcall(cjson.decode, cur)
    if ok and type(d) == 'table' and type(d.processHash) == 'string' then ph = d.processHash end
  end
"#
    };
}

const ACQUIRE: &str = concat!(
    r#"
local function acquire(lk, fk, rec, ttl, lp)
  local cur
  if SET_GET then
    local token = next_token(fk)
    cur = redis.call('SET', lk, rec .. string.format('%d', token) .. '}', 'NX', 'PX', ttl, 'GET')
    if not cur then
      drawn(fk, token)
      return 1, token
    end
  else
    cur = redis.call('GET', lk)
  end
  if not cur or cur == '' then return 1, create(lk, fk, rec, ttl) end
  if lp == '' then return 7, cur end"#,
    holder_process!(),
    r#"  if not ph then return 9, cur end
  local alive = redis.call('GET', lp .. ph)
  if alive and alive ~= '' then return 8, cur end
  return 2, create(lk, fk, rec, ttl), cur
end
"#
);

/// An acquire alone (KEYS: lock, counter; ARGV: open record, ttl ms, liveness prefix): the
/// batch's `acquire` without `SET_GET` and `create`, written out without functions. Each
/// `local function` of a script is a closure made at every call: the five an acquire needs
/// cost the server about 1 µs per call, a sixth of a lone acquire's time. (A batch makes them
/// once per call, for all its operations.) Its `redis.call`s are the same: the key, the
/// holder's liveness record if held, then `TIME`, `GET` and `SET` of the counter around the
/// lock's `SET`.
const LONE_ACQUIRE: &str = concat!(
    r#"local lk, fk, rec, ttl, lp = KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3]
local cur = redis.call('GET', lk)
if cur == '' then cur = false end
if cur then
  if lp == '' then return {7, cur} end"#,
    holder_process!(),
    r#"  if not ph then return {9, cur} end
  local alive = redis.call('GET', lp .. ph)
  if alive and alive ~= '' then return {8, cur} end
end
local t = redis.call('TIME')
local token = tonumber(t[1]) * 1000000 + tonumber(t[2])
local last = tonumber(redis.call('GET', fk) or '0') or 0
if last >= token then token = last + 1 end
local digits = string.format('%d', token)
redis.call('SET', lk, rec .. digits .. '}', 'PX', ttl)
redis.call('SET', fk, digits)
if cur then return {2, token, cur} end
return {1, token}
"#
);

const TAKE_OVER: &str = r#"
local function take_over(lk, fk, rec, ttl, prefix)
  local cur = redis.call('GET', lk)
  if cur and cur ~= '' then
    local o = owned(cur, prefix)
    if o == nil then return 9, cur end
    if not o then return 7, cur end
  end
  return 1, create(lk, fk, rec, ttl)
end
"#;

const EXTEND: &str = r#"
local function extend(lk, rec, ttl, prefix)
  local cur = redis.call('GET', lk)
  if not cur or cur == '' then return 6 end
  local o = owned(cur, prefix)
  if o == nil then return 9, cur end
  if not o then return 7, cur end
  local tok = string.match(cur, ',"fencingToken":(%d+)}$')
  if not tok then
    local ok, d = pcall(cjson.decode, cur)
    if not ok or type(d) ~= 'table' then return 9, cur end
    if type(d.fencingToken) == 'number' then tok = string.format('%d', d.fencingToken) end
  end
  if tok then
    redis.call('SET', lk, rec .. ',"fencingToken":' .. tok .. '}', 'PX', ttl)
    return 3, tok
  end
  redis.call('SET', lk, rec .. '}', 'PX', ttl)
  return 4
end
"#;

const RELEASE: &str = r#"
local function release(lk, wk, prefix)
  local cur = redis.call('GET', lk)
  if not cur or cur == '' then return 6 end
  local o = owned(cur, prefix)
  if o == nil then return 9, cur end
  if not o then return 7, cur end
  if NOTIFY and wk ~= lk then
    if redis.call('DEL', lk, wk) > 1 then pcall(redis.call, 'PUBLISH', lk, '') end
  else
    redis.call('DEL', lk)
  end
  return 5
end
"#;

/// One operation's script: the functions it needs (each `local function` is a closure made at
/// every call of the script, so a script carries no more than it calls), then a call of the
/// last with `call`'s keys and arguments; it answers the function's values.
fn single(functions: &[&str], call: &str, notify: bool) -> String {
    let store = if functions.contains(&CREATE) {
        "store_counters()\n"
    } else {
        ""
    };
    format!(
        "local NOTIFY = {notify}\nlocal SET_GET = false\n{}\nlocal out = {{{call}}}\n{store}return out\n",
        functions.concat()
    )
}

/// Several operations in one call. KEYS: the group's fencing counter, then each operation's
/// lock key (and, for `W`, its waiters' flag). ARGV: the liveness keys' prefix, then each
/// operation's letter and its arguments:
///
/// | letter | operation | keys | arguments |
/// |---|---|---|---|
/// | `A` | acquire | lock | open record, ttl ms |
/// | `C` | acquire, looking at a holder's liveness | lock | open record, ttl ms |
/// | `T` | take over | lock | open record, ttl ms, the dead owner's record prefix |
/// | `E` | extend | lock | open record (no token), ttl ms, the owner's record prefix |
/// | `R` | release | lock | the owner's record prefix |
/// | `W` | release, deleting the waiters' flag | lock, flag | the owner's record prefix |
///
/// The answer is each operation's code and values, one after another (see [`values`]). On a
/// cluster, all the keys must be on one slot (so every operation has the same counter).
///
/// An operation whose command fails (a lock key of another type) answers code 0 and the
/// others go on: no operation writes before the command that can fail it, so nothing of it
/// was stored, and the client sends it again alone to get its error.
fn batch(notify: bool) -> String {
    format!(
        r#"local NOTIFY = {notify}
local SET_GET = (redis.REDIS_VERSION_NUM or 0) >= 0x070000
{OWNED}{CREATE}{ACQUIRE}{TAKE_OVER}{EXTEND}{RELEASE}
local fk, lp = KEYS[1], ARGV[1]
local out, n, k, a = {{}}, 0, 2, 2
while a <= #ARGV do
  local op, ok, s, x, y = ARGV[a]
  if op == 'A' or op == 'C' then
    ok, s, x, y = pcall(acquire, KEYS[k], fk, ARGV[a + 1], ARGV[a + 2], op == 'C' and lp or '')
    k, a = k + 1, a + 3
  elseif op == 'R' then
    ok, s, x, y = pcall(release, KEYS[k], KEYS[k], ARGV[a + 1])
    k, a = k + 1, a + 2
  elseif op == 'W' then
    ok, s, x, y = pcall(release, KEYS[k], KEYS[k + 1], ARGV[a + 1])
    k, a = k + 2, a + 2
  elseif op == 'E' then
    ok, s, x, y = pcall(extend, KEYS[k], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3])
    k, a = k + 1, a + 4
  elseif op == 'T' then
    ok, s, x, y = pcall(take_over, KEYS[k], fk, ARGV[a + 1], ARGV[a + 2], ARGV[a + 3])
    k, a = k + 1, a + 4
  else
    return redis.error_reply('unknown batch operation')
  end
  if not ok then s, x, y = 0, nil, nil end
  n = n + 1
  out[n] = s
  if x then n = n + 1; out[n] = x end
  if y then n = n + 1; out[n] = y end
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
    /// KEYS: lock, counter. ARGV: open record, ttl ms, the dead owner's record prefix.
    TakeOver,
    /// KEYS: lock. ARGV: open record (without token), ttl ms, the owner's record prefix.
    Extend,
    /// KEYS: lock, and optionally its waiters' flag. ARGV: the owner's record prefix.
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
            ScriptName::Acquire => format!("local NOTIFY = {notify}\n{LONE_ACQUIRE}"),
            ScriptName::TakeOver => single(
                &[OWNED, CREATE, TAKE_OVER],
                "take_over(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])",
                notify,
            ),
            ScriptName::Extend => single(
                &[OWNED, EXTEND],
                "extend(KEYS[1], ARGV[1], ARGV[2], ARGV[3])",
                notify,
            ),
            ScriptName::Release => single(
                &[OWNED, RELEASE],
                "release(KEYS[1], KEYS[2] or KEYS[1], ARGV[1])",
                notify,
            ),
            ScriptName::Batch => batch(notify),
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// One value of a script's answer, as the client library read it: the scripts answer numbers
/// (codes, new tokens) as integers, so that the client allocates nothing for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Item {
    Int(i64),
    Text(String),
    Nil,
}

/// How many values follow an answer's code, or `None` for no known code. The codes: 0 the
/// batch could not run the operation (its command failed); 1 `ACQUIRED`, token; 2 `TOOKOVER`,
/// token, the dead holder's record; 3 `EXTENDED`, the kept token's digits; 4 `EXTENDED`, no
/// token; 5 `RELEASED`; 6 `NOKEY`; 7 `HELD`, record; 8 `LIVE`, record; 9 `CORRUPT`, the value.
pub(crate) fn values(code: &Item) -> Option<usize> {
    match code {
        Item::Int(0 | 4 | 5 | 6) => Some(0),
        Item::Int(1 | 3 | 7 | 8 | 9) => Some(1),
        Item::Int(2) => Some(2),
        _ => None,
    }
}

/// The code of an operation the batch script could not run (its command failed); it answers
/// no values.
pub(crate) const FAILED: Item = Item::Int(0);

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

/// Reads a script's answer (a code, then its values); a stored value that is not a record
/// becomes a `Corrupt` error.
pub(crate) fn parse_reply(key: &str, reply: Vec<Item>) -> Result<Reply> {
    let bad = || unexpected(key, &reply);
    let token = |item: &Item| match item {
        Item::Int(t) => u64::try_from(*t).ok(),
        Item::Text(t) => t.parse::<u64>().ok(),
        Item::Nil => None,
    };
    let text = |item: &Item| match item {
        Item::Text(t) => Some(t.clone()),
        _ => None,
    };
    let (code, rest) = reply.split_first().ok_or_else(bad)?;
    if values(code) != Some(rest.len()) {
        return Err(bad());
    }
    let Item::Int(code) = code else {
        return Err(bad());
    };
    Ok(match (code, rest) {
        (1, [t]) => Reply::Acquired(token(t).ok_or_else(bad)?),
        (2, [t, r]) => Reply::TookOver(token(t).ok_or_else(bad)?, text(r).ok_or_else(bad)?),
        (3, [t]) => Reply::Extended(Some(token(t).ok_or_else(bad)?)),
        (4, []) => Reply::Extended(None),
        (5, []) => Reply::Released,
        (6, []) => Reply::NoKey,
        (7, [r]) => Reply::Held(text(r).ok_or_else(bad)?),
        (8, [r]) => Reply::Live(text(r).ok_or_else(bad)?),
        (9, [r]) => {
            return Err(LockData::from_json(&text(r).unwrap_or_default())
                .err()
                .unwrap_or_else(|| Error::corrupt("the stored value is not a lock record"))
                .with_key(key))
        }
        _ => return Err(bad()),
    })
}

fn unexpected(key: &str, reply: &[Item]) -> Error {
    Error::new(
        ErrorKind::Other,
        format!("unexpected script reply {reply:?}"),
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
        use Item::{Int, Nil, Text};
        let t = |s: &str| Text(s.to_owned());
        assert_eq!(parse_reply("k", vec![Int(6)]).expect("ok"), Reply::NoKey);
        assert_eq!(parse_reply("k", vec![Int(5)]).expect("ok"), Reply::Released);
        assert_eq!(
            parse_reply("k", vec![Int(7), t("{}")]).expect("ok"),
            Reply::Held("{}".into())
        );
        assert_eq!(
            parse_reply("k", vec![Int(8), t("{}")]).expect("ok"),
            Reply::Live("{}".into())
        );
        assert_eq!(
            parse_reply("k", vec![Int(1), Int(1_764_000_000_000_001)]).expect("ok"),
            Reply::Acquired(1_764_000_000_000_001)
        );
        assert_eq!(
            parse_reply("k", vec![Int(2), Int(9), t("{}")]).expect("ok"),
            Reply::TookOver(9, "{}".into())
        );
        // A token kept by an extension is the stored record's digits.
        assert_eq!(
            parse_reply("k", vec![Int(3), t("18446744073709551615")]).expect("ok"),
            Reply::Extended(Some(u64::MAX))
        );
        assert_eq!(
            parse_reply("k", vec![Int(4)]).expect("ok"),
            Reply::Extended(None)
        );
        let e = parse_reply("k", vec![Int(9), t("garbage")]).expect_err("corrupt");
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert_eq!(e.key(), Some("k"));
        for bad in [
            vec![],
            vec![Int(7)],
            vec![Int(0)],
            vec![Int(10), t("x")],
            vec![t("HELD"), t("x")],
            vec![Int(1), t("x")],
            vec![Int(1), Int(-1)],
            vec![Int(1), Nil],
            vec![Int(3), t("18446744073709551616")],
            vec![Int(2), Int(1)],
            vec![Int(7), Int(1)],
            vec![Int(5), Nil],
        ] {
            assert_eq!(
                parse_reply("k", bad.clone()).expect_err("bad").kind(),
                ErrorKind::Other,
                "{bad:?}"
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
