//! How one stage instance's state is encoded in its checkpoint file.
//!
//! An instance's snapshot is an [`InstanceState`]: named parts (`head`, `chain.<step>`,
//! `tail`), each a MessagePack value (`rmp-serde`: self-describing, so `serde_json::Value`
//! round-trips, and unlike JSON it keeps NaN and ±∞). Keyed state is one part per key group
//! ([`KeyedPart`]), so that a restore at another parallelism can pick groups by range.
//!
//! Key groups: every key's routing hash maps to one of `max_parallelism` groups
//! (`key_group`); instance `i` of `p` owns the contiguous range `group_range(i, p, max)`,
//! and hash partitioning routes group `g` to the instance whose range holds it
//! (`instance_of_group`), so a key's state is always where its group says.

use std::ops::Range;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// The default number of key groups.
pub(crate) const DEFAULT_MAX_PARALLELISM: u16 = 128;

/// The key group of a routing hash (multiply-shift: the hash is well mixed).
#[inline]
pub(crate) fn key_group(hash: u64, max_parallelism: u16) -> u16 {
    ((u128::from(hash) * u128::from(max_parallelism)) >> 64) as u16
}

/// The key groups instance `instance` of `parallelism` owns: contiguous, covering
/// `0..max_parallelism` over all instances, disjoint.
pub(crate) fn group_range(instance: usize, parallelism: usize, max_parallelism: u16) -> Range<u16> {
    let m = max_parallelism as usize;
    let start = instance * m / parallelism;
    let end = (instance + 1) * m / parallelism;
    start as u16..end as u16
}

/// The instance (of `parallelism`) that owns key group `group`.
#[inline]
pub(crate) fn instance_of_group(group: u16, parallelism: usize, max_parallelism: u16) -> usize {
    // The inverse of `group_range`: the largest i with i * m / p <= g.
    ((group as usize + 1) * parallelism - 1) / max_parallelism as usize
}

/// One stage instance's state: named, encoded parts.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceState {
    /// `(part name, MessagePack bytes)`, in the order they were put. Each part's bytes are
    /// one MessagePack `bin` (see `parts_bin`), not an array of integers.
    #[serde(with = "parts_bin")]
    pub parts: Vec<(String, Vec<u8>)>,
    /// The key groups this instance's keyed parts cover (for `checkpoint verify`).
    pub key_groups: Option<(u16, u16)>,
    /// Source positions as plain numbers (`(part, byte offset)`), for `checkpoint verify`'s
    /// "never behind the previous checkpoint".
    pub positions: Vec<(String, u64)>,
    /// Sink files this instance pre-committed at the barrier (paths relative to the sink's
    /// directory), which the checkpoint's completion commits.
    pub precommitted: Vec<String>,
}

impl InstanceState {
    /// Adds part `name`.
    pub fn put<T: Serialize + ?Sized>(&mut self, name: &str, value: &T) -> Result<(), Error> {
        let bytes = rmp_serde::to_vec(value).map_err(|e| encode_error(name, e))?;
        self.parts.push((name.to_string(), bytes));
        Ok(())
    }

    /// Part `name`, decoded; `None` when absent.
    pub fn get<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, Error> {
        match self.parts.iter().find(|(n, _)| n == name) {
            None => Ok(None),
            Some((_, bytes)) => rmp_serde::from_slice(bytes)
                .map(Some)
                .map_err(|e| decode_error(name, e)),
        }
    }

    /// Encodes the whole state (the bytes of the instance's checkpoint file).
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        rmp_serde::to_vec(self).map_err(|e| encode_error("instance", e))
    }

    /// Decodes what [`encode`](Self::encode) wrote.
    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        rmp_serde::from_slice(bytes).map_err(|e| decode_error("instance", e))
    }
}

/// Keyed state of one instance, by key group: `groups[i] = (group, entries)`, groups ascending,
/// each entry a key and its state.
#[derive(Debug, Serialize, Deserialize)]
pub struct KeyedPart<K, A> {
    pub groups: Vec<(u16, Vec<(K, A)>)>,
}

/// [`InstanceState::parts`] with each part's bytes as one MessagePack `bin`.
///
/// serde's default for a `Vec<u8>` is a sequence, which MessagePack writes as an array of
/// integers: every byte of 128 or more then takes two bytes (random state grows by half), and
/// encoding and decoding go through one serde call per byte — for a large keyed state most
/// of the cost of a checkpoint's snapshot and of a restore. As `bin` a part is one length and
/// a copy. Decoding accepts both, so a checkpoint written with arrays still restores.
mod parts_bin {
    use serde::de::{self, SeqAccess, Visitor};
    use serde::ser::SerializeSeq;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    struct Bin<'a>(&'a [u8]);

    impl Serialize for Bin<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(self.0)
        }
    }

    struct Bytes(Vec<u8>);

    impl<'de> Deserialize<'de> for Bytes {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Vec<u8>;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("bytes")
                }
                fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                    Ok(v.to_vec())
                }
                fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                    Ok(v)
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                    // Bounded by the input: each element is at least one byte of it.
                    let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
                    while let Some(b) = seq.next_element()? {
                        v.push(b);
                    }
                    Ok(v)
                }
            }
            d.deserialize_byte_buf(V).map(Bytes)
        }
    }

    pub(super) fn serialize<S: Serializer>(
        parts: &[(String, Vec<u8>)],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(parts.len()))?;
        for (name, bytes) in parts {
            seq.serialize_element(&(name, Bin(bytes)))?;
        }
        seq.end()
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<(String, Vec<u8>)>, D::Error> {
        let parts: Vec<(String, Bytes)> = Deserialize::deserialize(d)?;
        Ok(parts.into_iter().map(|(n, b)| (n, b.0)).collect())
    }
}

fn encode_error(part: &str, e: impl std::fmt::Display) -> Error {
    Error::Checkpoint {
        message: format!("cannot encode state part `{part}`: {e}"),
    }
}

fn decode_error(part: &str, e: impl std::fmt::Display) -> Error {
    Error::Checkpoint {
        message: format!("cannot decode state part `{part}`: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_ranges_cover_every_group_once_and_invert() {
        for p in 1..=16 {
            let mut next = 0u16;
            for i in 0..p {
                let r = group_range(i, p, 128);
                assert_eq!(r.start, next, "p={p} i={i}");
                for g in r.clone() {
                    assert_eq!(instance_of_group(g, p, 128), i, "p={p} g={g}");
                }
                next = r.end;
            }
            assert_eq!(next, 128);
        }
    }

    #[test]
    fn parts_round_trip_including_nan() {
        let mut s = InstanceState::default();
        s.put("a", &(f64::NAN, f64::INFINITY)).unwrap();
        s.put("v", &serde_json::json!({"k": [1, "x", null]}))
            .unwrap();
        let back = InstanceState::decode(&s.encode().unwrap()).unwrap();
        let (x, y): (f64, f64) = back.get("a").unwrap().unwrap();
        assert!(x.is_nan() && y.is_infinite());
        let v: serde_json::Value = back.get("v").unwrap().unwrap();
        assert_eq!(v, serde_json::json!({"k": [1, "x", null]}));
        assert_eq!(back.get::<u8>("missing").unwrap(), None);
    }

    /// A part's bytes are one `bin` (a 1,000-byte part of bytes ≥ 128 costs about 1,000
    /// bytes, not 2,000), and a file written with the old array encoding still decodes.
    #[test]
    fn parts_are_bin_and_the_array_encoding_still_decodes() {
        let mut s = InstanceState::default();
        s.parts.push(("raw".to_string(), vec![0xffu8; 1000]));
        let encoded = s.encode().unwrap();
        assert!(encoded.len() < 1100, "{} bytes", encoded.len());
        assert_eq!(InstanceState::decode(&encoded).unwrap(), s);

        #[derive(Serialize)]
        struct Old<'a> {
            parts: &'a Vec<(String, Vec<u8>)>,
            key_groups: Option<(u16, u16)>,
            positions: Vec<(String, u64)>,
            precommitted: Vec<String>,
        }
        let old = rmp_serde::to_vec(&Old {
            parts: &s.parts,
            key_groups: None,
            positions: vec![],
            precommitted: vec![],
        })
        .unwrap();
        assert!(old.len() > 2000, "the array encoding: {} bytes", old.len());
        assert_eq!(InstanceState::decode(&old).unwrap(), s);
    }
}
