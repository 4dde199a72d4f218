//! The keyed-window workload's input, shared by `benches/window.rs` and
//! `benches/checkpoint.rs`: 10 million events over 10,000 keys, ten per millisecond of event
//! time, each up to 2 s older than the newest.

// Each bench that includes this uses a different part of it.
#![allow(dead_code)]

use std::sync::{Arc, OnceLock};

pub(crate) const EVENTS: usize = 10_000_000;
pub(crate) const KEYS: u64 = 10_000;
pub(crate) const SIZE_MS: i64 = 10_000;
pub(crate) const DISORDER_MS: i64 = 2_000;

/// (key, event time ms, value)
pub(crate) type Ev = (u32, i64, f64);

pub(crate) fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// The `i`th event of the workload (also past `EVENTS`: a longer run continues the pattern,
/// event time advancing one millisecond per ten events).
pub(crate) fn event(i: u64) -> Ev {
    let h = mix(i);
    let t = (i / 10) as i64 - (h >> 40) as i64 % DISORDER_MS;
    ((h % KEYS) as u32, t, (h & 0xff) as f64)
}

/// The events, generated once per process.
pub(crate) fn events() -> Arc<Vec<Ev>> {
    static DATA: OnceLock<Arc<Vec<Ev>>> = OnceLock::new();
    Arc::clone(DATA.get_or_init(|| Arc::new((0..EVENTS as u64).map(event).collect())))
}
