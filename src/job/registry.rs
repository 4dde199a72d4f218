//! A keyed table behind one lock, whose check-and-act operations happen inside one critical
//! section: `remove` hands the entry back, so of two concurrent cleanups exactly one gets it and
//! the other is a no-op (the seed's `if id in table: del table[id]` race cannot happen).

use std::collections::BTreeMap;

use crate::sync::Mutex;

/// A table of `V` by `K` under one mutex.
#[derive(Debug)]
pub struct Registry<K, V> {
    entries: Mutex<BTreeMap<K, V>>,
    /// A seeded bug for the loom models' demonstration: `remove` looks the entry up in one
    /// critical section and removes it in another (the seed's race).
    #[cfg(loom)]
    remove_checked_apart: bool,
}

impl<K: Ord + Clone, V: Clone> Registry<K, V> {
    /// An empty table.
    pub fn new() -> Self {
        Registry {
            entries: Mutex::new(BTreeMap::new()),
            #[cfg(loom)]
            remove_checked_apart: false,
        }
    }

    /// A table whose `remove` checks and acts in two critical sections: only for the loom
    /// model that must show it catches the race.
    #[cfg(loom)]
    #[doc(hidden)]
    pub fn with_remove_checked_apart() -> Self {
        Registry {
            remove_checked_apart: true,
            ..Self::new()
        }
    }

    /// Inserts `value` unless `key` is present; returns whether it was inserted.
    pub fn insert(&self, key: K, value: V) -> bool {
        let mut e = self.entries.lock();
        if e.contains_key(&key) {
            return false;
        }
        e.insert(key, value);
        true
    }

    /// A clone of the entry.
    pub fn get(&self, key: &K) -> Option<V> {
        self.entries.lock().get(key).cloned()
    }

    /// Removes and returns the entry; `None` if it was not there (a second cleanup).
    pub fn remove(&self, key: &K) -> Option<V> {
        #[cfg(loom)]
        if self.remove_checked_apart {
            let found = self.entries.lock().get(key).cloned()?;
            self.entries.lock().remove(key);
            return Some(found);
        }
        self.entries.lock().remove(key)
    }

    /// Removes and returns the entry if `pred` holds for it, in one critical section.
    pub fn remove_if(&self, key: &K, pred: impl FnOnce(&V) -> bool) -> Option<V> {
        let mut e = self.entries.lock();
        match e.get(key) {
            Some(v) if pred(v) => e.remove(key),
            _ => None,
        }
    }

    /// Clones of every entry, by key.
    pub fn list(&self) -> Vec<(K, V)> {
        self.entries
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs `f` on the whole table inside the critical section.
    pub fn with<R>(&self, f: impl FnOnce(&mut BTreeMap<K, V>) -> R) -> R {
        f(&mut self.entries.lock())
    }
}

impl<K: Ord + Clone, V: Clone> Default for Registry<K, V> {
    fn default() -> Self {
        Self::new()
    }
}
