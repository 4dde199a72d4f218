//! Keyed state by key group, for the heads that hold it (keyed aggregates, windows): which
//! groups an instance owns, how its entries are grouped for a snapshot, and the check that a
//! restored part belongs to it. The group of a key is computed with the *same hash the router
//! partitions by* (passed in as [`KeyGroups::hash`]), so a key's state is always stored under
//! the group that routes the key to its instance.

use std::collections::BTreeMap;

use crate::checkpoint::state::{key_group, KeyedPart};
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

/// Checks that every group of a restored keyed part is this instance's.
pub(crate) fn check_groups<K, A>(
    cx: &Cx,
    part: &KeyedPart<K, A>,
    mine: std::ops::Range<u16>,
) -> Result<(), Error> {
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
