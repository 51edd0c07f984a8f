//! The key layout, shared with the Node library, and the hash-slot arithmetic that keeps each
//! lock's fencing counter on the lock's own Redis Cluster slot.
//!
//! - lock: `{prefix}lock:{key}`
//! - liveness: `{prefix}proc:{processHash}`
//! - fencing counter: on a Redis Cluster, `{prefix}fence:{T}`, one per slot, where `T` is a short
//!   hash tag chosen so that the counter hashes to the lock's slot (or, when the prefix carries a
//!   hash tag, one `{prefix}fence`, which shares the prefix's slot like every other key); on one
//!   server (standalone, or a master found through Sentinel), one `{prefix}fence` for every
//!   lock, so that a batch of acquires reads and writes one counter once.
//! - waiters' flag (this library only; release events): `{prefix}wait:{key}`, or on a Redis
//!   Cluster without a tagged prefix `{prefix}wait:{T}:{key}` with the lock's slot's tag `T`,
//!   so that the release script deletes the lock and the flag in one `DEL` on one slot.

use std::sync::OnceLock;

use locker_core::{Error, Result};

/// Number of Redis Cluster hash slots.
const SLOTS: u16 = 16384;

/// The keys of one store, under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyLayout {
    prefix: String,
    /// The prefix holds a complete hash tag, so every key already shares one slot.
    prefix_tagged: bool,
    /// One fencing counter for every lock: a tagged prefix, or a store of one server.
    one_counter: bool,
}

impl KeyLayout {
    /// A layout under `prefix`. A prefix with a `{` must hold a complete, non-empty hash tag
    /// (`app{1}:`), or Redis Cluster would hash its keys in ways the counter cannot follow.
    pub(crate) fn new(prefix: &str) -> Result<Self> {
        let prefix_tagged = match prefix.find('{') {
            None => false,
            Some(open) => match prefix[open + 1..].find('}') {
                Some(len) if len > 0 => true,
                _ => {
                    return Err(Error::invalid_input(format!(
                        "key prefix {prefix:?} has a '{{' without a non-empty hash tag closed \
                         by '}}' inside the prefix"
                    )))
                }
            },
        };
        Ok(KeyLayout {
            prefix: prefix.to_owned(),
            prefix_tagged,
            one_counter: prefix_tagged,
        })
    }

    /// The layout for a store of one server (not a cluster): one fencing counter for every lock.
    pub(crate) fn on_one_server(mut self, one_server: bool) -> Self {
        self.one_counter |= one_server;
        self
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The prefix holds a complete hash tag: every key of the layout is on one slot.
    pub(crate) fn prefix_tagged(&self) -> bool {
        self.prefix_tagged
    }

    pub(crate) fn lock(&self, key: &str) -> String {
        let mut lock = String::with_capacity(self.prefix.len() + 5 + key.len());
        lock.push_str(&self.prefix);
        lock.push_str("lock:");
        lock.push_str(key);
        lock
    }

    pub(crate) fn process(&self, process_hash: &str) -> String {
        format!("{}proc:{process_hash}", self.prefix)
    }

    /// The waiters' flag of the lock under `lock_key`: set by a process while it waits for the
    /// lock, so that the release publishes only when someone may be waiting (see `notify`).
    /// On the lock's slot.
    pub(crate) fn waiters(&self, lock_key: &str) -> String {
        let key = lock_key
            .strip_prefix(self.prefix.as_str())
            .and_then(|rest| rest.strip_prefix("lock:"))
            .unwrap_or(lock_key);
        if self.one_counter {
            let mut flag = String::with_capacity(self.prefix.len() + 5 + key.len());
            flag.push_str(&self.prefix);
            flag.push_str("wait:");
            flag.push_str(key);
            return flag;
        }
        let tag = &tags()[usize::from(key_slot(lock_key.as_bytes()))];
        format!("{}wait:{{{tag}}}:{key}", self.prefix)
    }

    /// The fencing counter of `key`'s slot, shared by every lock on the slot: one counter per
    /// slot (one in all for a tagged prefix or a single server) whatever the number of keys,
    /// updated in place.
    pub(crate) fn fence(&self, lock_key: &str) -> String {
        if self.one_counter {
            let mut fence = String::with_capacity(self.prefix.len() + 5);
            fence.push_str(&self.prefix);
            fence.push_str("fence");
            return fence;
        }
        let tag = &tags()[usize::from(key_slot(lock_key.as_bytes()))];
        format!("{}fence:{{{tag}}}", self.prefix)
    }
}

/// The Redis Cluster slot of a key: CRC16 (XMODEM) of the key, or of its hash tag (the part
/// between the first `{` and the next `}`, if not empty), modulo 16384.
pub(crate) fn key_slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16(hashed) % SLOTS
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// For every slot, a short string that hashes to it. Built once by enumerating numbers in base
/// 36 (about 150,000 CRCs, a few milliseconds).
fn tags() -> &'static [String] {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    TAGS.get_or_init(|| {
        let mut tags = vec![String::new(); usize::from(SLOTS)];
        let mut missing = usize::from(SLOTS);
        let mut n: u64 = 0;
        while missing > 0 {
            let tag = base36(n);
            let slot = usize::from(crc16(tag.as_bytes()) % SLOTS);
            if tags[slot].is_empty() {
                tags[slot] = tag;
                missing -= 1;
            }
            n += 1;
        }
        tags
    })
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
        assert_eq!(key_slot(b"foo{{bar}}zap"), crc16(b"{bar") % SLOTS);
    }

    #[test]
    fn the_node_key_layout() {
        let k = KeyLayout::new("").expect("layout");
        assert_eq!(k.lock("job"), "lock:job");
        assert_eq!(k.process("host/1.2"), "proc:host/1.2");
        let k = KeyLayout::new("app:").expect("layout");
        assert_eq!(k.lock("job"), "app:lock:job");
    }

    #[test]
    fn the_fencing_counter_shares_the_lock_slot() {
        for prefix in ["", "app:", "app{7}:"] {
            let layout = KeyLayout::new(prefix).expect("layout");
            for key in [
                "a",
                "job-17",
                "{tag}x",
                "x{tag}",
                "{}",
                "a}b{",
                "ünï 🔒",
                "k\n",
            ] {
                let lock = layout.lock(key);
                let fence = layout.fence(&lock);
                assert_eq!(
                    key_slot(lock.as_bytes()),
                    key_slot(fence.as_bytes()),
                    "{lock:?} / {fence:?}"
                );
                assert!(fence.starts_with(prefix));
                assert_ne!(lock, fence);
            }
        }
    }

    #[test]
    fn the_waiters_flag_shares_the_lock_slot_and_is_no_other_key() {
        for (prefix, one_server) in [
            ("", false),
            ("app:", false),
            ("app{7}:", false),
            ("app:", true),
        ] {
            let layout = KeyLayout::new(prefix)
                .expect("layout")
                .on_one_server(one_server);
            let keys = [
                "a",
                "b",
                "job-17",
                "{tag}x",
                "x{tag}",
                "{}",
                "a}b{",
                "ünï 🔒",
                "k\n",
            ];
            let mut flags = std::collections::HashSet::new();
            for key in keys {
                let lock = layout.lock(key);
                let flag = layout.waiters(&lock);
                if !one_server {
                    assert_eq!(
                        key_slot(lock.as_bytes()),
                        key_slot(flag.as_bytes()),
                        "{lock:?} / {flag:?}"
                    );
                }
                assert!(flag.starts_with(&format!("{prefix}wait:")), "{flag:?}");
                assert!(flag.ends_with(key), "{flag:?}");
                assert_ne!(flag, lock);
                assert_ne!(flag, layout.fence(&lock));
                assert!(flags.insert(flag), "two keys share a flag");
            }
        }
        let single = KeyLayout::new("app:").expect("layout").on_one_server(true);
        assert_eq!(single.waiters(&single.lock("a")), "app:wait:a");
    }

    #[test]
    fn one_counter_per_slot() {
        let layout = KeyLayout::new("").expect("layout");
        let fence = |key: &str| layout.fence(&layout.lock(key));
        let slot = |key: &str| key_slot(layout.lock(key).as_bytes());
        assert_ne!(slot("a"), slot("b"));
        assert_ne!(fence("a"), fence("b"));
        assert_eq!(fence("x{t}"), fence("y{t}"), "one slot, one counter");
        let tagged = KeyLayout::new("app{1}:").expect("layout");
        assert_eq!(tagged.fence(&tagged.lock("a")), "app{1}:fence");
        // One server: one counter for every lock, whatever their slots.
        let single = KeyLayout::new("app:").expect("layout").on_one_server(true);
        assert_eq!(single.fence(&single.lock("a")), "app:fence");
        assert_eq!(single.fence(&single.lock("b")), "app:fence");
        let cluster = KeyLayout::new("app:").expect("layout").on_one_server(false);
        assert_ne!(
            cluster.fence(&cluster.lock("a")),
            cluster.fence(&cluster.lock("b"))
        );
    }

    #[test]
    fn a_prefix_with_a_broken_hash_tag_is_refused() {
        for bad in ["a{", "a{}", "{x"] {
            assert!(KeyLayout::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn every_slot_has_a_tag() {
        let tags = tags();
        assert!(tags.iter().all(|t| !t.is_empty() && t.len() <= 4));
        for (slot, tag) in tags.iter().enumerate().step_by(997) {
            assert_eq!(usize::from(crc16(tag.as_bytes()) % SLOTS), slot);
        }
    }
}
