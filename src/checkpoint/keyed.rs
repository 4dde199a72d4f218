//! Keyed state by key group, for the heads that hold it (keyed aggregates, windows): which
//! groups an instance owns, how its entries are grouped for a snapshot, and the check that a
//! restored part belongs to it. The group of a key is computed with the *same hash the router
//! partitions by* (passed in as [`KeyGroups::hash`]), so a key's state is always stored under
//! the group that routes the key to its instance.
//!
//! It also owns the *order* of keyed state: heads keep their keys in first-seen order
//! ([`FxIndexMap`]), which is the order they emit results in, and a snapshot records each
//! entry's position so that a restore rebuilds it — a resumed run at parallelism 1 then emits
//! exactly what an uninterrupted one does, in the same order.

use std::collections::BTreeMap;

use crate::checkpoint::state::{group_range, key_group, KeyedPart};
use crate::error::Error;
use crate::runtime::Cx;

/// How a keyed head finds its key groups.
pub(crate) struct KeyGroups<K> {
    /// The hash the router partitions by.
    pub hash: fn(&K) -> u64,
    /// The stage's parallelism.
    pub parallelism: usize,
}

impl<K> Clone for KeyGroups<K> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<K> Copy for KeyGroups<K> {}

/// The key groups a keyed stage's instances route by: the run's `max_parallelism`, or more
/// when there are more instances (as `ChannelTail` does).
pub(crate) fn key_groups_of(cx: &Cx, parallelism: usize) -> u16 {
    cx.run
        .max_parallelism()
        .max(parallelism.min(u16::MAX as usize) as u16)
}

/// Keyed state of an instance as a [`KeyedPart`]: entries by key group, groups ascending.
pub(crate) fn keyed_part<'a, K, A>(
    entries: impl Iterator<Item = (&'a K, &'a A)>,
    hash: fn(&K) -> u64,
    groups: u16,
) -> KeyedPart<&'a K, &'a A>
where
    K: 'a,
    A: 'a,
{
    let mut by_group: BTreeMap<u16, Vec<(&K, &A)>> = BTreeMap::new();
    for (k, a) in entries {
        by_group
            .entry(key_group(hash(k), groups))
            .or_default()
            .push((k, a));
    }
    KeyedPart {
        groups: by_group.into_iter().collect(),
    }
}

/// Records in a snapshot the key groups this instance of a `parallelism`-wide keyed stage
/// owns (for the manifest, and `checkpoint verify`'s coverage check).
pub(crate) fn record_key_groups(
    cx: &Cx,
    state: &mut crate::checkpoint::state::InstanceState,
    parallelism: usize,
) {
    let mine = group_range(cx.instance, parallelism, key_groups_of(cx, parallelism));
    state.key_groups = Some((mine.start, mine.end));
}

/// Checks that every group of a restored keyed part is this instance's (of a
/// `parallelism`-wide keyed stage).
pub(crate) fn check_groups<K, A>(
    cx: &Cx,
    part: &KeyedPart<K, A>,
    parallelism: usize,
) -> Result<(), Error> {
    let mine = group_range(cx.instance, parallelism, key_groups_of(cx, parallelism));
    for (g, _) in &part.groups {
        if !mine.contains(g) {
            return Err(Error::Checkpoint {
                message: format!(
                    "stage `{}`: instance {} was handed state of key group {g}, outside its \
                     groups {}..{}: the checkpoint was taken at another parallelism or is corrupt",
                    cx.stage, cx.instance, mine.start, mine.end
                ),
            });
        }
    }
    Ok(())
}

/// Owned entries as a [`KeyedPart`]: by key group, groups ascending.
pub(crate) fn keyed_part_owned<K, A>(
    entries: impl IntoIterator<Item = (K, A)>,
    hash: fn(&K) -> u64,
    groups: u16,
) -> KeyedPart<K, A> {
    let mut by_group: BTreeMap<u16, Vec<(K, A)>> = BTreeMap::new();
    for (k, a) in entries {
        by_group
            .entry(key_group(hash(&k), groups))
            .or_default()
            .push((k, a));
    }
    KeyedPart {
        groups: by_group.into_iter().collect(),
    }
}

/// A map that iterates in insertion order, with the hash the rest of the engine uses.
pub(crate) type FxIndexMap<K, V> = indexmap::IndexMap<K, V, rustc_hash::FxBuildHasher>;

/// For a snapshot's keyed part: the position in `map` (first-seen order) of each of its
/// entries, in the part's order (by key group).
pub(crate) fn first_seen_order<K: std::hash::Hash + Eq, A>(
    map: &FxIndexMap<K, A>,
    part: &KeyedPart<&K, &A>,
) -> Vec<u32> {
    part.groups
        .iter()
        .flat_map(|(_, entries)| entries.iter())
        .map(|(k, _)| map.get_index_of(*k).expect("a key of the map") as u32)
        .collect()
}

/// A restored part's entries (in the part's order) put back in first-seen order by the
/// positions [`first_seen_order`] recorded; in the part's order when there are none (or they
/// do not fit, which a corrupt checkpoint could cause: the checksums make it unlikely).
pub(crate) fn in_first_seen_order<E>(
    entries: impl Iterator<Item = E>,
    order: Option<Vec<u32>>,
) -> Vec<E> {
    let entries: Vec<E> = entries.collect();
    match order {
        Some(order) if order.len() == entries.len() => {
            let mut v: Vec<(u32, E)> = order.into_iter().zip(entries).collect();
            v.sort_unstable_by_key(|(i, _)| *i);
            v.into_iter().map(|(_, e)| e).collect()
        }
        _ => entries,
    }
}
