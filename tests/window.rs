//! Window assigners at the boundaries, and against brute force (seed bug 5: one half-open
//! semantics everywhere, so a boundary event lands in exactly the windows that contain it).

use millrace::window::{AssignerError, Session, Sliding, Tumbling};
use millrace::{Timestamp, Window};
use proptest::prelude::*;

fn w(start: i64, end: i64) -> Window {
    Window::new(Timestamp(start), Timestamp(end))
}

#[test]
fn window_is_half_open() {
    let x = w(0, 10);
    assert!(x.contains(Timestamp(0)));
    assert!(x.contains(Timestamp(9)));
    assert!(!x.contains(Timestamp(10)));
    assert!(!x.contains(Timestamp(-1)));
    assert!(
        !w(0, 10).overlaps(&w(10, 20)),
        "touching windows do not overlap"
    );
    assert!(w(0, 11).overlaps(&w(10, 20)));
}

#[test]
fn tumbling_boundaries() {
    let t = Tumbling::new(10_000, 0).unwrap();
    assert_eq!(t.assign(Timestamp(0)), w(0, 10_000));
    assert_eq!(t.assign(Timestamp(9_999)), w(0, 10_000));
    assert_eq!(
        t.assign(Timestamp(10_000)),
        w(10_000, 20_000),
        "the seed's t = 10 s"
    );
    assert_eq!(t.assign(Timestamp(-1)), w(-10_000, 0));
    assert_eq!(t.assign(Timestamp(-10_000)), w(-10_000, 0));
    assert_eq!(t.assign(Timestamp(-10_001)), w(-20_000, -10_000));
    let shifted = Tumbling::new(10, 3).unwrap();
    assert_eq!(shifted.assign(Timestamp(3)), w(3, 13));
    assert_eq!(shifted.assign(Timestamp(2)), w(-7, 3));
    assert_eq!(shifted.assign(Timestamp(-7)), w(-7, 3));
}

#[test]
fn sliding_boundaries_and_non_multiple_slides() {
    let s = Sliding::new(10, 5, 0).unwrap();
    assert_eq!(s.assign(Timestamp(10)), vec![w(10, 20), w(5, 15)]);
    assert_eq!(s.assign(Timestamp(9)), vec![w(5, 15), w(0, 10)]);
    assert_eq!(s.assign(Timestamp(-5)), vec![w(-5, 5), w(-10, 0)]);
    // size not a multiple of slide: handled, each window is [s, s + size).
    let odd = Sliding::new(10, 4, 0).unwrap();
    assert_eq!(odd.assign(Timestamp(8)), vec![w(8, 18), w(4, 14), w(0, 10)]);
    assert_eq!(odd.assign(Timestamp(10)), vec![w(8, 18), w(4, 14)]);
    // slide larger than size: some instants are in no window.
    let gappy = Sliding::new(3, 5, 0).unwrap();
    assert_eq!(gappy.assign(Timestamp(4)), vec![]);
    assert_eq!(gappy.assign(Timestamp(5)), vec![w(5, 8)]);
}

#[test]
fn session_windows_merge_only_when_they_overlap() {
    let s = Session::new(30).unwrap();
    let merged = s.merge(vec![s.assign(Timestamp(0)), s.assign(Timestamp(29))]);
    assert_eq!(merged, vec![w(0, 59)]);
    let apart = s.merge(vec![s.assign(Timestamp(0)), s.assign(Timestamp(30))]);
    assert_eq!(
        apart,
        vec![w(0, 30), w(30, 60)],
        "[a, a+gap) and [a+gap, ...) stay apart"
    );
    let neg = s.merge(vec![
        s.assign(Timestamp(-100)),
        s.assign(Timestamp(-80)),
        s.assign(Timestamp(-10)),
    ]);
    assert_eq!(neg, vec![w(-100, -50), w(-10, 20)]);
}

#[test]
fn extreme_timestamps_do_not_overflow() {
    let t = Tumbling::new(1000, 0).unwrap();
    let lo = t.assign(Timestamp(i64::MIN));
    assert!(lo.contains(Timestamp(i64::MIN)), "{lo}");
    let hi = t.assign(Timestamp(i64::MAX - 1));
    assert!(hi.contains(Timestamp(i64::MAX - 1)));
    let s = Sliding::new(1000, 300, 0).unwrap();
    assert!(s
        .assign(Timestamp(i64::MAX - 1))
        .iter()
        .all(|x| x.contains(Timestamp(i64::MAX - 1))));
    assert!(!s.assign(Timestamp(i64::MIN + 5)).is_empty());
}

#[test]
fn invalid_parameters_are_rejected() {
    assert_eq!(
        Tumbling::new(0, 0).unwrap_err(),
        AssignerError::NotPositive {
            what: "size",
            value: 0
        }
    );
    assert_eq!(
        Sliding::new(10, -1, 0).unwrap_err().to_string(),
        "slide must be positive, found -1 ms"
    );
    assert!(Session::new(0).is_err());
}

proptest! {
    /// Tumbling: exactly one window contains t, and it is the assigned one.
    #[test]
    fn tumbling_matches_brute_force(t in -100_000i64..100_000, size in 1i64..500, offset in -1000i64..1000) {
        let a = Tumbling::new(size, offset).unwrap().assign(Timestamp(t));
        prop_assert!(a.contains(Timestamp(t)));
        prop_assert_eq!(a.len_millis(), size);
        prop_assert_eq!((a.start.0 - offset).rem_euclid(size), 0);
    }

    /// Sliding: the assigned windows are exactly those, among all windows of the grid, that
    /// contain t.
    #[test]
    fn sliding_matches_brute_force(t in -10_000i64..10_000, size in 1i64..200, slide in 1i64..200, offset in -300i64..300) {
        let got = Sliding::new(size, slide, offset).unwrap().assign(Timestamp(t));
        let first = t - size - 2 * slide;
        let mut expect = Vec::new();
        let mut s = first - (first - offset).rem_euclid(slide);
        while s <= t + slide {
            let x = w(s, s + size);
            if x.contains(Timestamp(t)) {
                expect.push(x);
            }
            s += slide;
        }
        expect.reverse();
        prop_assert_eq!(got, expect);
    }

    /// Session: merged sessions are disjoint, cover every event, and each is the union of
    /// overlapping event windows (no gap of `gap` or more inside a session).
    #[test]
    fn sessions_are_disjoint_and_cover_every_event(mut ts in proptest::collection::vec(-1000i64..1000, 1..40), gap in 1i64..100) {
        let s = Session::new(gap).unwrap();
        let merged = s.merge(ts.iter().map(|&t| s.assign(Timestamp(t))).collect());
        for pair in merged.windows(2) {
            prop_assert!(pair[0].end <= pair[1].start, "disjoint and sorted");
        }
        for &t in &ts {
            prop_assert_eq!(merged.iter().filter(|m| m.contains(Timestamp(t))).count(), 1);
        }
        ts.sort_unstable();
        ts.dedup();
        for m in &merged {
            let inside: Vec<i64> = ts.iter().copied().filter(|&t| m.contains(Timestamp(t))).collect();
            prop_assert_eq!(inside[0], m.start.0);
            prop_assert_eq!(inside[inside.len() - 1] + gap, m.end.0);
            prop_assert!(inside.windows(2).all(|p| p[1] - p[0] < gap));
        }
    }
}

#[test]
fn durations_parse_with_units() {
    use millrace::parse_duration_ms as d;
    assert_eq!(d("500ms"), Ok(500));
    assert_eq!(d("10s"), Ok(10_000));
    assert_eq!(d("2m"), Ok(120_000));
    assert_eq!(d("1h"), Ok(3_600_000));
    assert_eq!(d("1d"), Ok(86_400_000));
    assert_eq!(d("1m30s"), Ok(90_000));
    assert_eq!(d(" 0s "), Ok(0));
    for bad in ["", "10", "s", "10x", "-1s", "1.5s", "99999999999999999999s"] {
        assert_eq!(d(bad).unwrap_err().text(), bad);
    }
    assert_eq!(
        d("10x").unwrap_err().to_string(),
        "invalid duration \"10x\": expected e.g. \"500ms\", \"10s\", \"2m\", \"1h\", \"1d\" or \"1m30s\""
    );
}

#[test]
fn rfc3339_times_match_an_independent_conversion() {
    use millrace::parse_rfc3339_ms as p;
    // Expected values from Python's datetime.fromisoformat.
    for (text, ms) in [
        ("1970-01-01T00:00:00Z", 0),
        ("2024-02-29T23:59:59.999Z", 1_709_251_199_999),
        ("2000-01-01T00:00:00+05:30", 946_665_000_000),
        ("1900-03-01T12:34:56.7-08:00", -2_203_817_103_300),
        ("0001-01-01T00:00:00Z", -62_135_596_800_000),
        ("9999-12-31T23:59:59Z", 253_402_300_799_000),
        ("2026-11-23T19:05:58.123456Z", 1_795_460_758_123),
        ("2026-11-23t19:05:58z", 1_795_460_758_000),
    ] {
        assert_eq!(p(text), Ok(ms), "{text}");
    }
    use millrace::ParseTimeErrorKind as Why;
    for (bad, why) in [
        ("2023-02-29T00:00:00Z", Why::NoSuchDate),
        ("2024-13-01T00:00:00Z", Why::NoSuchDate),
        ("2024-01-01T24:00:00Z", Why::NoSuchTimeOfDay),
        ("2024-01-01T00:00:00", Why::MissingOffset),
        ("2024-01-01T00:00:00+0200", Why::MissingOffset),
        ("2024-01-01T00:00:00+25:00", Why::BadOffset),
        ("2024-01-01 00:00:00.Z", Why::EmptyFraction),
        ("2024-01-01_00:00:00Z", Why::Malformed),
        ("20240101T000000Z", Why::ExpectedDigits),
        ("", Why::TooShort),
    ] {
        let e = p(bad).unwrap_err();
        assert_eq!((e.text(), e.kind()), (bad, why), "{e}");
    }
    assert_eq!(
        p("2024-01-01T00:00:00").unwrap_err().to_string(),
        "invalid RFC 3339 time \"2024-01-01T00:00:00\": expected Z or an offset like +02:00 at the end"
    );
}
