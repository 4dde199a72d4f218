//! Loom models of how a split source's parts take their stripes (`source::Deal`, behind
//! `Pipeline::source_split`): the parts' own `take` through the `crate::sync` shim, whose
//! atomics are loom's under `--cfg loom`. Unordered parts share one counter; every stripe
//! must go to exactly one part, whatever the interleaving, and every part must see the end.
//! Ordered parts are dealt `k % parts` and share nothing. Run with
//!
//! ```text
//! RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 \
//!     cargo test --release --test loom_split -- --include-ignored
//! ```
//!
//! The `#[ignore]`d model seeds a bug (`Deal::with_split_take`: the counter loaded and stored
//! back apart) and passes exactly when loom finds two parts reading the same stripe;
//! `.ci/loom` runs it.
#![cfg(loom)]

use loom::sync::{Arc, Mutex};
use loom::thread;
use millrace::Deal;

/// Stripes in the modelled data.
const STRIPES: usize = 3;

/// Two parts (this thread and one more) take stripes from `deal` until they are past the end;
/// returns how many times each stripe was taken.
fn run(deal: Deal) -> Vec<usize> {
    let taken = Arc::new(Mutex::new(vec![0usize; STRIPES]));
    let part = |i: usize| {
        let mut mine = deal.part(i);
        let taken = Arc::clone(&taken);
        move || loop {
            let k = mine.take();
            if k >= STRIPES {
                return;
            }
            taken.lock().unwrap()[k] += 1;
        }
    };
    let other = thread::spawn(part(1));
    part(0)();
    other.join().unwrap();
    let counts = taken.lock().unwrap().clone();
    counts
}

#[test]
fn every_stripe_goes_to_exactly_one_part() {
    loom::model(|| {
        let counts = run(Deal::new(2, false));
        assert_eq!(counts, vec![1; STRIPES], "each stripe once");
    });
}

#[test]
fn an_ordered_deal_gives_part_k_mod_parts() {
    loom::model(|| {
        let deal = Deal::new(2, true);
        let (mut a, mut b) = (deal.part(0), deal.part(1));
        assert_eq!((a.take(), a.take()), (0, 2));
        assert_eq!((b.take(), b.take()), (1, 3));
        assert_eq!(run(Deal::new(2, true)), vec![1; STRIPES]);
    });
}

/// The demonstration: with the counter read and written back apart, loom finds an
/// interleaving in which both parts take the same stripe.
#[test]
#[ignore = "demonstrates that loom catches a take that is not one read-modify-write"]
#[should_panic(expected = "each stripe once")]
fn a_split_take_is_caught() {
    loom::model(|| {
        let counts = run(Deal::with_split_take(2));
        assert_eq!(counts, vec![1; STRIPES], "each stripe once");
    });
}
