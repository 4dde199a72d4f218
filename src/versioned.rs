//! A stage's logic as a versioned value: the core of hot reload.
//!
//! A reloadable stage reads its logic from a [`Versioned`] cell (an RCU
//! [`Snapshot`] plus counts per version) **once per input batch**, so each
//! batch is processed by exactly one version, and an old version lives until the last batch
//! that loaded it is done (it is an `Arc`). No sleep, grace period or epoch is involved.
//!
//! The cell knows nothing of what the logic is; each reloadable stage keeps its own kind of
//! value in one and switches between versions only between batches:
//!
//! - built-in record operations (`filter`, `select`, `words`, in `config::live_map`): a
//!   `LiveMap` step, fused like the fixed operators, loads its version when a batch begins
//!   (`Chain::begin_batch`);
//! - native plugin nodes (`plugin::native`): the node instance is recreated from the new version
//!   (its library, loaded from a fresh copy, and parameters) before the first batch that sees
//!   it; the old instance, and with it the old library, is released after its last batch;
//! - `window` stages: the window head applies a new `allowed_lateness` or `on_error` to its
//!   running state (`WindowState::set_lateness`) before the batch;
//! - `exec` stages and process plugins (`exec::live`): `ReloadExecHead` starts a new child for
//!   the new version and sends it the batches from then on; the old child gets end of input,
//!   finishes its records, and is waited for; its output is read to the end before the new
//!   child's, so order is kept and no output batch mixes versions.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::sync::Mutex;

use crate::Snapshot;

/// A stage's logic, replaceable between batches, with the records each version processed.
pub(crate) struct Versioned<V> {
    cell: Snapshot<V>,
    counts: Mutex<BTreeMap<u64, u64>>,
}

impl<V> Versioned<V> {
    pub(crate) fn new(v: V) -> Arc<Self> {
        Arc::new(Versioned {
            cell: Snapshot::new(v),
            counts: Mutex::new(BTreeMap::new()),
        })
    }

    /// The current version, for one batch (the `Arc` of [`crate::sync`], as the cell's).
    pub(crate) fn load(&self) -> (u64, crate::sync::Arc<V>) {
        self.cell.load_versioned()
    }

    /// Publishes a new version; returns its number.
    pub(crate) fn store(&self, v: V) -> u64 {
        self.cell.store(v)
    }

    /// Records that version `version` processed `n` records.
    pub(crate) fn count(&self, version: u64, n: u64) {
        *self.counts.lock().entry(version).or_default() += n;
    }

    /// Records processed per version.
    pub(crate) fn counts(&self) -> BTreeMap<u64, u64> {
        self.counts.lock().clone()
    }
}
