//! The keyed window state machine: firing, lateness, late records, session merging, freed state,
//! and agreement with a brute-force reference on random out-of-order streams.

use std::collections::{BTreeMap, HashMap};

use millrace::window::{
    Assigner, Count, Mean, Session, Sliding, Sum, Tumbling, WindowOutput, WindowState,
};
use millrace::{Timestamp, Window};
use proptest::prelude::*;

type Out = Vec<WindowOutput<u32, f64, u64>>;

fn ts(ms: i64) -> Timestamp {
    Timestamp(ms)
}

fn results(out: &Out) -> Vec<(u32, Window, u64, bool)> {
    out.iter()
        .filter_map(|o| match o {
            WindowOutput::Result(r) => Some((r.key, r.window, r.value, r.update)),
            WindowOutput::Late { .. } => None,
        })
        .collect()
}

#[test]
fn tumbling_fires_at_the_end_and_frees_state() {
    let mut s = WindowState::new(
        Assigner::Tumbling(Tumbling::new(10_000, 0).unwrap()),
        Count,
        0,
    );
    let mut out = Out::new();
    for t in [0, 9_999, 10_000] {
        s.on_record(1, ts(t), 1.0, &mut out);
    }
    s.on_watermark(ts(9_999), &mut out);
    assert!(
        out.is_empty(),
        "[0, 10000) must not fire before the watermark reaches 10000"
    );
    s.on_watermark(ts(10_000), &mut out);
    let w0 = Window::new(ts(0), ts(10_000));
    assert_eq!(
        results(&out),
        vec![(1, w0, 2, false)],
        "the event at 10000 is not in [0, 10000)"
    );
    assert_eq!(s.live_windows(), 1);
    out.clear();
    s.on_watermark(Timestamp::MAX, &mut out);
    assert_eq!(
        results(&out),
        vec![(1, Window::new(ts(10_000), ts(20_000)), 1, false)]
    );
    assert_eq!(s.live_windows(), 0);
}

#[test]
fn late_records_update_within_lateness_and_are_returned_after_it() {
    let mut s = WindowState::new(Assigner::Tumbling(Tumbling::new(10, 0).unwrap()), Count, 5);
    let mut out = Out::new();
    s.on_record(7, ts(1), 1.0, &mut out);
    s.on_watermark(ts(10), &mut out);
    let w = Window::new(ts(0), ts(10));
    assert_eq!(results(&out), vec![(7, w, 1, false)]);
    out.clear();
    s.on_record(7, ts(9), 1.0, &mut out); // late but within lateness: an update
    assert_eq!(results(&out), vec![(7, w, 2, true)]);
    out.clear();
    s.on_watermark(ts(15), &mut out); // end + lateness reached: freed
    assert_eq!(s.live_windows(), 0);
    s.on_record(7, ts(3), 42.0, &mut out);
    assert_eq!(
        out,
        vec![WindowOutput::Late {
            key: 7,
            time: ts(3),
            record: 42.0
        }]
    );
    assert_eq!(s.late_records(), 1);
}

#[test]
fn a_window_first_seen_after_its_end_is_emitted_at_once() {
    let mut s = WindowState::new(
        Assigner::Tumbling(Tumbling::new(10, 0).unwrap()),
        Count,
        100,
    );
    let mut out = Out::new();
    s.on_watermark(ts(50), &mut out);
    s.on_record(1, ts(12), 1.0, &mut out);
    assert_eq!(
        results(&out),
        vec![(1, Window::new(ts(10), ts(20)), 1, false)]
    );
}

#[test]
fn sliding_records_join_live_windows_and_count_missed_ones() {
    let mut s = WindowState::new(Assigner::Sliding(Sliding::new(10, 5, 0).unwrap()), Count, 0);
    let mut out = Out::new();
    s.on_watermark(ts(10), &mut out);
    // t = 7 is in [5, 15) (live) and [0, 10) (freed at watermark 10).
    s.on_record(1, ts(7), 1.0, &mut out);
    assert!(out.is_empty());
    assert_eq!(s.missed_windows(), 1);
    assert_eq!(s.late_records(), 0);
    s.on_watermark(Timestamp::MAX, &mut out);
    assert_eq!(
        results(&out),
        vec![(1, Window::new(ts(5), ts(15)), 1, false)]
    );
    // With a slide larger than the size some instants are in no window: counted, not late.
    let mut g = WindowState::new(Assigner::Sliding(Sliding::new(3, 5, 0).unwrap()), Count, 0);
    let mut out = Out::new();
    g.on_record(1, ts(4), 1.0, &mut out);
    assert!(out.is_empty());
    assert_eq!((g.late_records(), g.outside_windows()), (0, 1));
}

#[test]
fn sessions_merge_and_touching_ones_stay_apart() {
    let mut s = WindowState::new(Assigner::Session(Session::new(10).unwrap()), Count, 0);
    let mut out = Out::new();
    for t in [0, 5, 15, 25] {
        s.on_record(1, ts(t), 1.0, &mut out);
    }
    // [0,10) ∪ [5,15) ∪ [15,25)? [5,15) and [15,25) touch: apart. [15,25) and [25,35) touch: apart.
    s.on_watermark(Timestamp::MAX, &mut out);
    let mut r = results(&out);
    r.sort_by_key(|x| x.1);
    assert_eq!(
        r,
        vec![
            (1, Window::new(ts(0), ts(15)), 2, false),
            (1, Window::new(ts(15), ts(25)), 1, false),
            (1, Window::new(ts(25), ts(35)), 1, false)
        ]
    );
    // A record that bridges two sessions merges them: [9, 19) overlaps [0, 10) and [18, 28).
    let mut s = WindowState::new(Assigner::Session(Session::new(10).unwrap()), Count, 0);
    let mut out = Out::new();
    for t in [0, 18, 9] {
        s.on_record(2, ts(t), 1.0, &mut out);
    }
    assert_eq!(s.live_windows(), 1);
    s.on_watermark(Timestamp::MAX, &mut out);
    assert_eq!(
        results(&out),
        vec![(2, Window::new(ts(0), ts(28)), 3, false)]
    );
    assert_eq!(s.live_windows(), 0);
}

#[test]
fn built_in_aggregates() {
    let mut s = WindowState::new(Assigner::Tumbling(Tumbling::new(10, 0).unwrap()), Sum, 0);
    let mut out = Vec::new();
    for (t, v) in [(1, 2.0), (2, 3.5), (11, 1.0)] {
        s.on_record("k", ts(t), v, &mut out);
    }
    s.on_watermark(Timestamp::MAX, &mut out);
    let mut sums: Vec<(i64, f64)> = out
        .iter()
        .map(|o| match o {
            WindowOutput::Result(r) => (r.window.start.0, r.value),
            WindowOutput::Late { .. } => unreachable!(),
        })
        .collect();
    sums.sort_by_key(|x| x.0);
    assert_eq!(sums, vec![(0, 5.5), (10, 1.0)]);
    let mut m = WindowState::new(Assigner::Tumbling(Tumbling::new(10, 0).unwrap()), Mean, 0);
    let mut out = Vec::new();
    for v in [1.0, 2.0, 6.0] {
        m.on_record((), ts(0), v, &mut out);
    }
    m.on_watermark(Timestamp::MAX, &mut out);
    assert!(matches!(&out[0], WindowOutput::Result(r) if r.value == Some(3.0)));
}

/// The last result per (key, window), whether some window's first result was marked as an
/// update, and the final state.
type Replay = (
    BTreeMap<(u32, Window), u64>,
    bool,
    WindowState<u32, f64, Count>,
);

/// Replays `events` in order with a bounded-out-of-orderness watermark (max seen − `ooo`) after
/// each, then +∞; returns the last result per (key, window), whether each window's first
/// result was an update, and the state.
fn replay(assigner: Assigner, lateness: i64, ooo: i64, events: &[(u32, i64)]) -> Replay {
    let mut s = WindowState::new(assigner, Count, lateness);
    let mut out = Out::new();
    let mut max = i64::MIN;
    for &(k, t) in events {
        s.on_record(k, ts(t), 1.0, &mut out);
        max = max.max(t);
        s.on_watermark(ts(max - ooo), &mut out);
    }
    s.on_watermark(Timestamp::MAX, &mut out);
    let mut last = BTreeMap::new();
    let mut first_was_update = false;
    for o in &out {
        if let WindowOutput::Result(r) = o {
            for old in &r.replaces {
                assert!(
                    last.remove(&(r.key, *old)).is_some(),
                    "replaces a window never emitted"
                );
            }
            let first = last.insert((r.key, r.window), r.value).is_none();
            if first && r.update && r.replaces.is_empty() {
                first_was_update = true;
            }
        }
    }
    (last, first_was_update, s)
}

/// Every window's count computed from scratch.
fn brute_force(assigner: Assigner, events: &[(u32, i64)]) -> BTreeMap<(u32, Window), u64> {
    let mut out = BTreeMap::new();
    match assigner {
        Assigner::Tumbling(a) => {
            for &(k, t) in events {
                *out.entry((k, a.assign(ts(t)))).or_default() += 1;
            }
        }
        Assigner::Sliding(a) => {
            for &(k, t) in events {
                for w in a.assign(ts(t)) {
                    *out.entry((k, w)).or_default() += 1;
                }
            }
        }
        Assigner::Session(a) => {
            let mut by_key: HashMap<u32, Vec<i64>> = HashMap::new();
            for &(k, t) in events {
                by_key.entry(k).or_default().push(t);
            }
            for (k, ts_) in by_key {
                let merged = a.merge(ts_.iter().map(|&t| a.assign(ts(t))).collect());
                for w in merged {
                    let n = ts_.iter().filter(|&&t| w.contains(ts(t))).count() as u64;
                    out.insert((k, w), n);
                }
            }
        }
    }
    out
}

fn assigners() -> impl Strategy<Value = Assigner> {
    prop_oneof![
        (1i64..50, -20i64..20).prop_map(|(s, o)| Assigner::Tumbling(Tumbling::new(s, o).unwrap())),
        (1i64..50, 1i64..30).prop_map(|(s, sl)| Assigner::Sliding(Sliding::new(s, sl, 0).unwrap())),
        (1i64..30).prop_map(|g| Assigner::Session(Session::new(g).unwrap())),
    ]
}

/// Events in a random order where each one is at most `ooo` behind the maximum seen so far.
fn disordered(ooo: i64) -> impl Strategy<Value = Vec<(u32, i64)>> {
    proptest::collection::vec((0u32..3, -200i64..200, 0i64..=ooo), 0..120).prop_map(|raw| {
        let mut max = i64::MIN;
        raw.into_iter()
            .map(|(k, t, back)| {
                let t = if max == i64::MIN {
                    t
                } else {
                    t.max(max - back)
                };
                max = max.max(t);
                (k, t)
            })
            .collect()
    })
}

proptest! {
    /// With lateness covering the disorder nothing is late, and the final result of every
    /// window equals the brute-force count; all state is freed at the end.
    #[test]
    fn matches_brute_force_when_nothing_is_late(assigner in assigners(), events in disordered(30)) {
        let (got, first_was_update, state) = replay(assigner, 30, 0, &events);
        prop_assert_eq!(got, brute_force(assigner, &events));
        prop_assert!(!first_was_update);
        prop_assert_eq!(state.late_records(), 0);
        prop_assert_eq!(state.live_windows(), 0);
    }

    /// A watermark that covers the disorder (max seen − 30) with no lateness: nothing is late,
    /// results are final at first emission, and they match brute force.
    #[test]
    fn bounded_out_of_orderness_watermarks_lose_nothing(assigner in assigners(), events in disordered(30)) {
        let (got, first_was_update, state) = replay(assigner, 0, 30, &events);
        prop_assert_eq!(got, brute_force(assigner, &events));
        prop_assert!(!first_was_update);
        prop_assert_eq!(state.late_records(), 0);
        prop_assert_eq!(state.live_windows(), 0);
    }

    /// Tumbling with allowed lateness and a watermark at the maximum seen: the final results
    /// equal brute force over exactly the records that were not returned as late.
    #[test]
    fn lateness_updates_cover_every_record_not_returned_late(events in disordered(30), size in 1i64..40, lateness in 0i64..30) {
        let a = Assigner::Tumbling(Tumbling::new(size, 0).unwrap());
        let mut s = WindowState::new(a, Count, lateness);
        let mut out = Out::new();
        let mut max = i64::MIN;
        for &(k, t) in &events {
            s.on_record(k, ts(t), 1.0, &mut out);
            max = max.max(t);
            s.on_watermark(ts(max), &mut out);
        }
        s.on_watermark(Timestamp::MAX, &mut out);
        let mut last = BTreeMap::new();
        let mut late: Vec<(u32, i64)> = Vec::new();
        for o in &out {
            match o {
                WindowOutput::Result(r) => {
                    let prev = last.insert((r.key, r.window), r.value);
                    prop_assert_eq!(prev.is_some(), r.update, "update flag marks re-emissions");
                }
                WindowOutput::Late { key, time, .. } => late.push((*key, time.0)),
            }
        }
        let mut kept = events.clone();
        for l in &late {
            let i = kept.iter().position(|e| e == l).unwrap();
            kept.remove(i);
        }
        prop_assert_eq!(last, brute_force(a, &kept));
        prop_assert_eq!(s.late_records(), late.len() as u64);
        prop_assert_eq!(s.live_windows(), 0);
    }

    /// Tumbling with no slack: every record is counted exactly once, in a result or as late.
    #[test]
    fn every_record_is_counted_or_returned_late(events in disordered(30), size in 1i64..40) {
        let a = Assigner::Tumbling(Tumbling::new(size, 0).unwrap());
        let (got, _, state) = replay(a, 0, 0, &events);
        let counted: u64 = got.values().sum();
        prop_assert_eq!(counted + state.late_records(), events.len() as u64);
        prop_assert_eq!(state.live_windows(), 0);
    }
}

#[test]
fn min_and_max_aggregates() {
    use millrace::window::{Max, Min};
    let a = Assigner::Tumbling(Tumbling::new(10, 0).unwrap());
    let mut lo = WindowState::new(a, Min, 0);
    let mut hi = WindowState::new(a, Max, 0);
    let (mut o1, mut o2) = (Vec::new(), Vec::new());
    for v in [3.0, -1.5, 7.25] {
        lo.on_record(0, ts(1), v, &mut o1);
        hi.on_record(0, ts(1), v, &mut o2);
    }
    lo.on_watermark(Timestamp::MAX, &mut o1);
    hi.on_watermark(Timestamp::MAX, &mut o2);
    assert!(matches!(&o1[0], WindowOutput::Result(r) if r.value == Some(-1.5)));
    assert!(matches!(&o2[0], WindowOutput::Result(r) if r.value == Some(7.25)));
}

/// `set_lateness` (a hot reload): a longer lateness keeps fired windows for late updates, for
/// fixed windows and for sessions (whose timers are rescheduled); a shorter one frees at the
/// next watermark what it has run out for.
#[test]
fn lateness_can_change_while_windows_are_held() {
    for assigner in [
        Assigner::Tumbling(Tumbling::new(10, 0).unwrap()),
        Assigner::Session(Session::new(10).unwrap()),
    ] {
        let mut s = WindowState::new(assigner, Count, 0);
        let mut out = Out::new();
        s.on_record(1, ts(1), 1.0, &mut out);
        s.set_lateness(100);
        s.on_watermark(ts(20), &mut out); // fires; held for late updates until 1 + 10 + 100
        assert_eq!(results(&out).len(), 1, "{assigner:?}");
        assert_eq!(s.live_windows(), 1, "{assigner:?}: kept for its lateness");
        out.clear();
        s.on_record(1, ts(3), 1.0, &mut out); // late, but within the new lateness: an update
        let r = results(&out);
        assert_eq!(r.len(), 1, "{assigner:?}: {out:?}");
        assert_eq!((r[0].2, r[0].3), (2, true), "{assigner:?}");
        // Shortened again: the window's lateness has run out at watermark 20.
        s.set_lateness(0);
        s.on_watermark(ts(21), &mut out);
        assert_eq!(
            s.live_windows(),
            0,
            "{assigner:?}: freed at the next watermark"
        );
        out.clear();
        s.on_record(1, ts(4), 1.0, &mut out);
        assert!(
            matches!(out.as_slice(), [WindowOutput::Late { .. }]),
            "{assigner:?}: {out:?}"
        );
    }
}
