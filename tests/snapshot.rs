//! Ordinary (std-thread) tests of `millrace::Snapshot`: monotonic versions per reader under a
//! busy writer, values consistent with their versions, each value dropped exactly once, and old
//! values kept alive by their readers. The exhaustive interleavings are in `tests/loom_snapshot.rs`.
// A test drives the engine from outside with std's threads and atomics: the `crate::sync`
// rule (clippy.toml) is for the engine's own code.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;

use millrace::Snapshot;

const STORES: u64 = 10_000;
const READERS: usize = 4;

/// Per-test drop bookkeeping: one flag per value id (set on drop), and a total.
struct Drops {
    dropped: Vec<AtomicBool>,
    total: AtomicUsize,
}

impl Drops {
    fn new(values: usize) -> Arc<Self> {
        Arc::new(Drops {
            dropped: (0..values).map(|_| AtomicBool::new(false)).collect(),
            total: AtomicUsize::new(0),
        })
    }

    fn is_dropped(&self, id: u64) -> bool {
        self.dropped[id as usize].load(Ordering::SeqCst)
    }
}

/// A value that knows the version it was published as and records its drop.
struct Tracked {
    id: u64,
    /// A copy of `id`, to catch a value seen half-written (it cannot be, but that is the point).
    check: u64,
    drops: Arc<Drops>,
}

impl Tracked {
    fn new(id: u64, drops: &Arc<Drops>) -> Self {
        Tracked {
            id,
            check: !id,
            drops: Arc::clone(drops),
        }
    }

    fn assert_whole(&self) {
        assert_eq!(self.check, !self.id, "torn value");
        assert!(
            !self.drops.is_dropped(self.id),
            "value {} used after drop",
            self.id
        );
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let was = self.drops.dropped[self.id as usize].swap(true, Ordering::SeqCst);
        assert!(!was, "value {} dropped twice", self.id);
        self.drops.total.fetch_add(1, Ordering::SeqCst);
    }
}

/// Readers see versions that never go backwards, each with the value published as it, while one
/// writer stores 10,000 versions; every value is dropped exactly once.
#[test]
fn readers_see_monotonic_consistent_versions() {
    let drops = Drops::new(STORES as usize + 1);
    let cell = Arc::new(Snapshot::new(Tracked::new(0, &drops)));
    let done = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(READERS + 1));

    let readers: Vec<_> = (0..READERS)
        .map(|r| {
            let (cell, done, start) = (cell.clone(), done.clone(), start.clone());
            thread::spawn(move || {
                start.wait();
                let mut last = 0;
                let mut loads = 0u64;
                let mut distinct = 0u64;
                loop {
                    // Read `done` first: a load after seeing it must see the last version.
                    let finished = done.load(Ordering::SeqCst);
                    // Alternate the two ways of reading.
                    let (version, value) = if loads % 2 == 0 {
                        cell.load_versioned()
                    } else {
                        let value = cell.load();
                        (value.id, value)
                    };
                    value.assert_whole();
                    assert_eq!(value.id, version, "reader {r}: value not of its version");
                    assert!(
                        version >= last,
                        "reader {r}: version went back from {last} to {version}"
                    );
                    distinct += u64::from(version != last);
                    last = version;
                    loads += 1;
                    if finished {
                        assert_eq!(version, STORES, "reader {r}: load after the last store");
                        return (loads, distinct);
                    }
                }
            })
        })
        .collect();

    start.wait();
    for i in 1..=STORES {
        assert_eq!(cell.store(Tracked::new(i, &drops)), i);
        // A load after a store sees that store's value or a later one (here: exactly it).
        let (version, value) = cell.load_versioned();
        assert_eq!((version, value.id), (i, i));
    }
    done.store(true, Ordering::SeqCst);

    for reader in readers {
        let (loads, distinct) = reader.join().unwrap();
        assert!(loads > 0 && distinct > 0);
    }
    assert_eq!(cell.version(), STORES);
    // Every retired value is gone already (no reader holds one); only the current one is left.
    assert_eq!(drops.total.load(Ordering::SeqCst), STORES as usize);
    assert!(!drops.is_dropped(STORES));
    drop(cell);
    assert_eq!(drops.total.load(Ordering::SeqCst), STORES as usize + 1);
}

/// A reader's `Arc` keeps an old value alive, readable and undropped through later stores; it is
/// dropped when the reader lets go, not before and not again.
#[test]
fn reader_keeps_old_value_alive() {
    let drops = Drops::new(102);
    let cell = Snapshot::new(Tracked::new(0, &drops));
    let (v0, held) = cell.load_versioned();
    assert_eq!(v0, 0);
    let held_elsewhere = thread::scope(|s| {
        // Another thread takes version 1 and keeps it until after the stores below.
        let (v1, one) = s
            .spawn(|| {
                cell.store(Tracked::new(1, &drops));
                cell.load_versioned()
            })
            .join()
            .unwrap();
        assert_eq!((v1, one.id), (1, 1));
        one
    });
    for i in 2..=101 {
        assert_eq!(cell.store(Tracked::new(i, &drops)), i);
    }
    // 2..=100 are retired and unheld: dropped. 0 and 1 are held; 101 is current.
    assert_eq!(drops.total.load(Ordering::SeqCst), 99);
    held.assert_whole();
    held_elsewhere.assert_whole();
    assert_eq!((held.id, held_elsewhere.id), (0, 1));
    drop(held);
    assert!(drops.is_dropped(0));
    assert!(!drops.is_dropped(1));
    thread::spawn(move || drop(held_elsewhere)).join().unwrap();
    assert!(drops.is_dropped(1));
    assert_eq!(drops.total.load(Ordering::SeqCst), 101);
    assert_eq!(cell.load().id, 101);
    drop(cell);
    assert_eq!(drops.total.load(Ordering::SeqCst), 102);
}

/// Concurrent writers: the versions they get back are exactly 1..=N (distinct, none skipped),
/// each writer's own versions increase, the final value is the one stored with the highest
/// version, and everything is dropped exactly once.
#[test]
fn concurrent_stores_are_linearizable() {
    const WRITERS: u64 = 4;
    const PER_WRITER: u64 = 2_500;
    let total = WRITERS * PER_WRITER;
    // Value id = writer * PER_WRITER + seq + 1; id 0 is the initial value.
    let drops = Drops::new(total as usize + 1);
    let cell = Arc::new(Snapshot::new(Tracked::new(0, &drops)));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (cell, drops) = (cell.clone(), drops.clone());
            thread::spawn(move || {
                let mut got = Vec::with_capacity(PER_WRITER as usize);
                for seq in 0..PER_WRITER {
                    let id = w * PER_WRITER + seq + 1;
                    let version = cell.store(Tracked::new(id, &drops));
                    // A load after our store sees it or a later one.
                    let (seen, value) = cell.load_versioned();
                    value.assert_whole();
                    assert!(seen >= version);
                    if seen == version {
                        assert_eq!(value.id, id);
                    }
                    got.push((version, id));
                }
                got
            })
        })
        .collect();
    let mut all: Vec<(u64, u64)> = Vec::new();
    for writer in writers {
        let got = writer.join().unwrap();
        assert!(got.windows(2).all(|w| w[0].0 < w[1].0), "per-writer order");
        all.extend(got);
    }
    all.sort_unstable();
    let versions: Vec<u64> = all.iter().map(|&(v, _)| v).collect();
    assert_eq!(versions, (1..=total).collect::<Vec<_>>());
    let (last_version, last_id) = *all.last().unwrap();
    let (version, value) = cell.load_versioned();
    assert_eq!((version, value.id), (last_version, last_id));
    drop(value);
    assert_eq!(drops.total.load(Ordering::SeqCst), total as usize);
    drop(cell);
    assert_eq!(drops.total.load(Ordering::SeqCst), total as usize + 1);
}

/// `Debug`, `Default` and `From` behave as documented.
#[test]
fn debug_default_from() {
    let cell: Snapshot<u32> = Snapshot::default();
    assert_eq!((cell.version(), *cell.load()), (0, 0));
    let cell = Snapshot::from("x");
    cell.store("y");
    assert_eq!(
        format!("{cell:?}"),
        r#"Snapshot { version: 1, value: "y" }"#
    );
}
