//! Shards of the inbound stream (docs/protocol.md, "Shards"): which shard a user's messages go
//! to, and the names of a shard's streams. Producers compute both (the Python example does, in
//! a dozen lines); a worker answers an entry on another shard than its user's with
//! `validation.wrong_shard`.
//!
//! With `streams.shards = 1` (the default) there is one shard, named as configured. With
//! `N > 1`, shard `s` has its own hash tag `{s}of{N}-{j}` (the smallest `j` that puts the tag's
//! Redis Cluster slot in the middle half of the `s`-th of `N` equal slot ranges, so that on a
//! cluster whose masters hold equal ranges the shards spread over the masters), and each
//! configured name `X` becomes `X:{tag}` (the reply prefix `P` becomes `P{tag}:`). Every key a
//! script touches together with shard `s`'s stream carries that tag, so it lives in that
//! shard's slot.

use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::config::StreamsConfig;
use crate::error::ValidationError;
use crate::protocol::InboundMessage;

/// The hash slots of a Redis Cluster.
const SLOTS: u32 = 16_384;

/// The most shards a layout may have (each tag then has a window of 8 slots).
pub const MAX_SHARDS: u32 = 1024;

/// The Redis Cluster hash slot of `key`: CRC16 (XMODEM) of its hash tag
/// ([`crate::stream::hash_tag`]) modulo 16384.
pub fn slot(key: &str) -> u32 {
    let tag = crate::stream::hash_tag(key);
    u32::from(crc16::State::<crc16::XMODEM>::calculate(tag.as_bytes())) % SLOTS
}

/// The shard of user `user` of business `business` among `n`: Lamping and Veach's jump
/// consistent hash ("A Fast, Minimal Memory, Consistent Hash Algorithm", 2014) of the first
/// eight bytes, big-endian, of SHA-256 over the UTF-8 text `"<business>:<user>"`, both in
/// canonical form (the business id hyphenated in lower case, the user id without surrounding
/// ASCII whitespace). Moving from `n` to `n + 1` shards moves about `1 / (n + 1)` of the users.
pub fn shard_of(business: &Uuid, user: &str, n: u32) -> u32 {
    if n <= 1 {
        return 0;
    }
    let digest = Sha256::new()
        .chain_update(business.hyphenated().to_string())
        .chain_update(b":")
        .chain_update(user)
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    jump(u64::from_be_bytes(first), n)
}

/// Jump consistent hash: a bucket in `0..n` for `key`.
fn jump(mut key: u64, n: u32) -> u32 {
    let (mut bucket, mut next) = (0i64, 0i64);
    while next < i64::from(n) {
        bucket = next;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        next = ((bucket + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    bucket as u32
}

/// The hash tag of shard `s` of `n` (`n > 1`): `{s}of{n}-{j}` for the smallest `j ≥ 0` whose
/// slot (CRC16 of the tag modulo 16384, as Redis Cluster computes it) lies in
/// `[(4s + 1) · 16384 / 4n, (4s + 3) · 16384 / 4n)` (integer division).
pub fn tag(s: u32, n: u32) -> String {
    let (s, n) = (u64::from(s), u64::from(n.max(1)));
    let slots = u64::from(SLOTS);
    let lo = (4 * s + 1) * slots / (4 * n);
    let hi = (4 * s + 3) * slots / (4 * n);
    (0u64..)
        .map(|j| format!("{s}of{n}-{j}"))
        .find(|t| (lo..hi).contains(&u64::from(slot(t))))
        .unwrap_or_default()
}

/// Checks that `msg` arrived on its user's shard of the layout `streams` is a shard of.
///
/// # Errors
/// [`ValidationError::WrongShard`], naming the stream it belongs on.
pub fn check(msg: &InboundMessage, streams: &StreamsConfig) -> Result<(), ValidationError> {
    let Some(here) = streams.shard.filter(|_| streams.shards > 1) else {
        return Ok(());
    };
    let expected = shard_of(&msg.business_id, &msg.user_id, streams.shards);
    if expected == here {
        return Ok(());
    }
    Err(ValidationError::WrongShard {
        expected,
        shards: streams.shards,
        stream: streams.shard(expected).inbound,
    })
}

impl StreamsConfig {
    /// The configuration of shard `s`: its stream names (unchanged with one shard) and its
    /// index, which the worker checks entries against.
    #[must_use]
    pub fn shard(&self, s: u32) -> StreamsConfig {
        let names = self.configured_names.clone().unwrap_or_else(|| {
            Box::new([
                self.inbound.clone(),
                self.outbound.clone(),
                self.dead_letter.clone(),
                self.reply_prefix.clone(),
            ])
        });
        let mut c = self.clone();
        c.shard = Some(s);
        let [inbound, outbound, dead_letter, reply_prefix] = &*names;
        if self.shards > 1 {
            let tag = tag(s, self.shards);
            c.inbound = format!("{inbound}:{{{tag}}}");
            c.outbound = format!("{outbound}:{{{tag}}}");
            c.dead_letter = format!("{dead_letter}:{{{tag}}}");
            c.reply_prefix = format!("{reply_prefix}{{{tag}}}:");
        } else {
            c.inbound.clone_from(inbound);
            c.outbound.clone_from(outbound);
            c.dead_letter.clone_from(dead_letter);
            c.reply_prefix.clone_from(reply_prefix);
        }
        c.configured_names = Some(names);
        c
    }

    /// Every shard of the layout, in order.
    pub fn all_shards(&self) -> Vec<StreamsConfig> {
        (0..self.shards.max(1)).map(|s| self.shard(s)).collect()
    }

    /// The shards this process reads: `streams.read_shards`, or all of them.
    pub fn read_shards(&self) -> Vec<StreamsConfig> {
        if self.read_shards.is_empty() {
            return self.all_shards();
        }
        self.read_shards.iter().map(|s| self.shard(*s)).collect()
    }

    /// The shard user `user` of business `business` writes to.
    pub fn for_user(&self, business: &Uuid, user: &str) -> StreamsConfig {
        self.shard(shard_of(business, user, self.shards))
    }

    /// The shard of an entry whose `business_id` and `user_id` fields are `business` and
    /// `user` as a producer wrote them (any spelling; surrounding whitespace). A business id
    /// that does not parse goes to shard 0, which answers it with `validation.invalid_field`.
    pub fn for_fields(&self, business: &str, user: &str) -> StreamsConfig {
        match crate::protocol::inbound::canonical_business(business) {
            Some(b) => self.for_user(&b, crate::protocol::inbound::canonical_user(user)),
            None => self.shard(0),
        }
    }

    /// Whether the layout can be used: shard counts in range, shards to read among them, and
    /// (with more than one shard) names free of braces, so that the shard's tag is the hash
    /// tag of every name.
    ///
    /// # Errors
    /// What is wrong, in words.
    pub fn check_layout(&self) -> Result<(), String> {
        if !(1..=MAX_SHARDS).contains(&self.shards) {
            return Err(format!(
                "streams.shards must be between 1 and {MAX_SHARDS}, not {}",
                self.shards
            ));
        }
        if let Some(s) = self.read_shards.iter().find(|s| **s >= self.shards) {
            return Err(format!(
                "streams.read_shards names shard {s}, but there are {} (0 to {})",
                self.shards,
                self.shards - 1
            ));
        }
        if self.previous_shards == self.shards || self.previous_shards > MAX_SHARDS {
            return Err(format!(
                "streams.previous_shards ({}) must be 0 (no move under way) or another shard \
                 count up to {MAX_SHARDS} than streams.shards ({})",
                self.previous_shards, self.shards
            ));
        }
        if self.shards > 1 || self.previous_shards > 1 {
            let names = [
                ("streams.inbound", &self.inbound),
                ("streams.outbound", &self.outbound),
                ("streams.dead_letter", &self.dead_letter),
                ("streams.reply_prefix", &self.reply_prefix),
            ];
            if let Some((what, name)) = names.iter().find(|(_, n)| n.contains(['{', '}'])) {
                return Err(format!(
                    "with more than one shard every shard has its own hash tag, so {what} \
                     (`{name}`) must not contain braces"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(shards: u32) -> StreamsConfig {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml");
        let mut c = crate::config::Config::load(std::path::Path::new(path), None)
            .expect("default config")
            .streams;
        c.shards = shards;
        c
    }

    /// The vectors of docs/protocol.md ("Shards"): any producer's implementation must agree.
    #[test]
    fn shard_function_test_vectors() {
        let b = Uuid::parse_str("7d1f4c9e-2b1a-4e55-9a7c-0c0ffee00001").expect("uuid");
        // (user, shard of 3, of 6, of 16)
        let table = [
            ("alice", 2, 4, 15),
            ("bob", 1, 1, 1),
            ("carol", 1, 1, 8),
            ("heidi", 0, 0, 15),
            ("mallory", 0, 0, 0),
            ("oscar", 0, 5, 5),
            ("Zoë", 1, 4, 15),
        ];
        for (user, of3, of6, of16) in table {
            let got = [3, 6, 16].map(|n| shard_of(&b, user, n));
            assert_eq!(got, [of3, of6, of16], "{user}");
        }
        let tags: Vec<String> = (0..3).map(|s| tag(s, 3)).collect();
        assert_eq!(tags, ["0of3-3", "1of3-1", "2of3-13"]);
        let tags: Vec<String> = (0..6).map(|s| tag(s, 6)).collect();
        assert_eq!(
            tags,
            [
                "0of6-42", "1of6-13", "2of6-12", "3of6-23", "4of6-31", "5of6-55"
            ]
        );
    }

    #[test]
    fn slots_are_those_redis_computes() {
        use redis::cluster_routing::Slot;
        for key in [
            "foo",
            "somekey",
            "{user1000}.following",
            "a{}b",
            "icmp:inbound:{0of3-0}",
        ] {
            let ours = u16::try_from(slot(key)).ok().and_then(Slot::new);
            assert_eq!(ours, Some(Slot::for_key(key)), "{key}");
        }
        assert_eq!(slot("foo"), 12_182);
        assert_eq!(slot("somekey"), 11_058);
    }

    #[test]
    fn jump_hash_spreads_users_and_moves_few_when_shards_are_added() {
        let b = Uuid::nil();
        let users: Vec<String> = (0..6000).map(|i| format!("user-{i}")).collect();
        let mut counts = [0u32; 6];
        for u in &users {
            counts[shard_of(&b, u, 6) as usize] += 1;
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
        let moved = users
            .iter()
            .filter(|u| shard_of(&b, u, 3) != shard_of(&b, u, 4))
            .count();
        // About a quarter move from 3 to 4 shards, all of them to the new shard.
        assert!((1200..1800).contains(&moved), "{moved}");
        assert!(
            users
                .iter()
                .filter(|u| shard_of(&b, u, 3) != shard_of(&b, u, 4))
                .all(|u| shard_of(&b, u, 4) == 3)
        );
        assert_eq!(shard_of(&b, "anyone", 1), 0);
    }

    #[test]
    fn each_shard_tag_lies_in_the_middle_of_its_slot_range() {
        for n in [2, 3, 6, 16, MAX_SHARDS] {
            for s in 0..n {
                let slot = slot(&tag(s, n));
                // Its range among n equal ranges is s, away from the edges.
                assert_eq!(slot * n / SLOTS, s, "shard {s} of {n}");
            }
        }
    }

    #[test]
    fn every_name_of_a_shard_is_in_its_slot_and_one_shard_keeps_the_configured_names() {
        let one = config(1);
        assert_eq!(one.shard(0).inbound, one.inbound);
        assert_eq!(one.shard(0).reply_prefix, one.reply_prefix);
        let three = config(3);
        // A shard's shards are the layout's.
        assert_eq!(three.shard(1).shard(2).inbound, three.shard(2).inbound);
        let shards = three.all_shards();
        assert_eq!(shards.len(), 3);
        for (s, c) in shards.iter().enumerate() {
            assert_eq!(c.shard, Some(s as u32));
            assert_eq!(crate::stream::check_one_slot(c, "icmp:"), Ok(()));
            assert!(c.inbound.starts_with("icmp:inbound:{"), "{}", c.inbound);
        }
        let slots: std::collections::HashSet<_> = shards.iter().map(|c| slot(&c.inbound)).collect();
        assert_eq!(slots.len(), 3);
    }

    #[test]
    fn a_layout_with_braces_or_shards_out_of_range_is_refused() {
        assert_eq!(config(1).check_layout(), Ok(()));
        assert_eq!(config(6).check_layout(), Ok(()));
        assert!(config(0).check_layout().is_err());
        assert!(config(MAX_SHARDS + 1).check_layout().is_err());
        let mut c = config(3);
        c.read_shards = vec![0, 3];
        assert!(
            c.check_layout()
                .expect_err("shard 3")
                .contains("read_shards")
        );
        let mut c = config(3);
        c.outbound = "{icmp}:outbound".into();
        assert!(
            c.check_layout()
                .expect_err("braces")
                .contains("streams.outbound")
        );
        // One shard keeps today's rules: tags are the operator's to choose.
        c.shards = 1;
        assert_eq!(c.check_layout(), Ok(()));
        // A move names another count, and from several shards needs brace-free names too.
        c.previous_shards = 3;
        assert!(c.check_layout().is_err());
        let mut c = config(3);
        c.previous_shards = 3;
        assert!(c.check_layout().is_err());
        c.previous_shards = 1;
        assert_eq!(c.check_layout(), Ok(()));
    }
}
