//! Watermark generation and combination.

use std::time::{Duration, Instant};

use millrace::window::{BoundedOutOfOrderness, WatermarkTracker};
use millrace::Timestamp;
use proptest::prelude::*;

#[test]
fn bounded_out_of_orderness_only_rises() {
    let mut g = BoundedOutOfOrderness::new(100);
    assert_eq!(g.current(), Timestamp::MIN);
    assert_eq!(g.observe(Timestamp(-50)), Some(Timestamp(-150)));
    assert_eq!(g.observe(Timestamp(-60)), None);
    assert_eq!(g.observe(Timestamp(-50)), None);
    assert_eq!(g.observe(Timestamp(40)), Some(Timestamp(-60)));
    assert_eq!(g.current(), Timestamp(-60));
    assert_eq!(
        BoundedOutOfOrderness::new(0).observe(Timestamp(i64::MIN)),
        None,
        "MIN is no progress"
    );
}

#[test]
fn tracker_forwards_the_minimum_of_its_inputs() {
    let t0 = Instant::now();
    let mut w = WatermarkTracker::new(3, None, t0);
    assert_eq!(
        w.update(0, Timestamp(10), t0),
        None,
        "inputs 1 and 2 still at -inf"
    );
    assert_eq!(w.update(1, Timestamp(20), t0), None);
    assert_eq!(w.update(2, Timestamp(5), t0), Some(Timestamp(5)));
    assert_eq!(w.update(2, Timestamp(30), t0), Some(Timestamp(10)));
    assert_eq!(
        w.update(0, Timestamp(8), t0),
        None,
        "an input's watermark never goes back"
    );
    assert_eq!(w.ended(0, t0), Some(Timestamp(20)));
    assert_eq!(w.ended(1, t0), Some(Timestamp(30)));
    assert_eq!(
        w.ended(2, t0),
        Some(Timestamp::MAX),
        "end of input on every input is +inf"
    );
}

#[test]
fn an_idle_input_stops_holding_the_watermark_back() {
    let t0 = Instant::now();
    let idle = Duration::from_secs(5);
    let mut w = WatermarkTracker::new(2, Some(idle), t0);
    assert_eq!(w.update(0, Timestamp(100), t0), None);
    let later = t0 + Duration::from_secs(6);
    assert_eq!(
        w.update(0, Timestamp(200), later),
        Some(Timestamp(200)),
        "input 1 silent for 6 s"
    );
    // Input 1 speaks again: it holds the watermark once more (no regression is emitted).
    w.heard(1, later);
    assert_eq!(w.update(0, Timestamp(300), later), None);
    assert_eq!(w.update(1, Timestamp(250), later), Some(Timestamp(250)));
    assert_eq!(w.current(), Timestamp(250));
}

#[test]
fn all_inputs_idle_release_the_highest_watermark_sent() {
    let t0 = Instant::now();
    let mut w = WatermarkTracker::new(2, Some(Duration::from_millis(1)), t0);
    assert_eq!(
        w.advance(t0 + Duration::from_secs(1)),
        None,
        "nothing was promised"
    );
    assert_eq!(w.current(), Timestamp::MIN);
    assert_eq!(
        w.update(0, Timestamp(100), t0),
        None,
        "input 1 is not idle yet"
    );
    assert_eq!(
        w.advance(t0 + Duration::from_secs(1)),
        Some(Timestamp(100)),
        "both silent: the watermark moves to what input 0 promised"
    );
}

proptest! {
    /// Without idleness the tracker's output is exactly the running minimum of the inputs'
    /// running maxima, and it never decreases.
    #[test]
    fn tracker_is_the_min_of_maxes(updates in proptest::collection::vec((0usize..4, -1000i64..1000), 0..200)) {
        let t0 = Instant::now();
        let mut w = WatermarkTracker::new(4, None, t0);
        let mut maxes = [i64::MIN; 4];
        let mut last = Timestamp::MIN;
        for (i, wm) in updates {
            maxes[i] = maxes[i].max(wm);
            let got = w.update(i, Timestamp(wm), t0);
            let min = Timestamp(*maxes.iter().min().unwrap());
            if min > last {
                prop_assert_eq!(got, Some(min));
                last = min;
            } else {
                prop_assert_eq!(got, None);
            }
            prop_assert_eq!(w.current(), last);
        }
    }
}
