//! Watermark generation and combination, as pure state machines that the runtime drives:
//! a generator per source instance, and a tracker per stage instance that forwards the minimum
//! over its inputs, letting idle inputs stop holding it back.

use std::time::{Duration, Instant};

use crate::time::Timestamp;

/// Bounded out-of-orderness: after seeing event times up to `max`, promises that no record
/// older than `max - bound` will follow. The watermark is `max - bound` (it only rises).
///
/// ```
/// use millrace::{window::BoundedOutOfOrderness, Timestamp};
/// let mut g = BoundedOutOfOrderness::new(2_000);
/// assert_eq!(g.observe(Timestamp(10_000)), Some(Timestamp(8_000)));
/// assert_eq!(g.observe(Timestamp(9_000)), None); // older than the maximum: no progress
/// assert_eq!(g.observe(Timestamp(12_500)), Some(Timestamp(10_500)));
/// ```
#[derive(Debug, Clone)]
pub struct BoundedOutOfOrderness {
    bound: i64,
    max: Option<Timestamp>,
    emitted: Timestamp,
}

impl BoundedOutOfOrderness {
    /// Tolerates records up to `bound_ms` older than the newest seen.
    pub fn new(bound_ms: i64) -> Self {
        BoundedOutOfOrderness {
            bound: bound_ms.max(0),
            max: None,
            emitted: Timestamp::MIN,
        }
    }

    /// Notes one record's event time; returns the new watermark if it advanced.
    pub fn observe(&mut self, t: Timestamp) -> Option<Timestamp> {
        if self.max.is_some_and(|m| t <= m) {
            return None;
        }
        self.max = Some(t);
        let wm = t.saturating_sub(self.bound);
        (wm > self.emitted).then(|| {
            self.emitted = wm;
            wm
        })
    }

    /// The last watermark returned (`Timestamp::MIN` before the first).
    pub fn current(&self) -> Timestamp {
        self.emitted
    }

    /// The newest event time seen and the last watermark returned, in ms (for a checkpoint).
    pub(crate) fn save(&self) -> (Option<i64>, i64) {
        (self.max.map(|t| t.0), self.emitted.0)
    }

    /// Restores what [`save`](Self::save) returned.
    pub(crate) fn load(&mut self, (max, emitted): (Option<i64>, i64)) {
        self.max = max.map(Timestamp);
        self.emitted = Timestamp(emitted);
    }
}

/// Combines the watermarks of a stage's inputs (one per upstream instance): the stage's
/// watermark is their minimum, except that an input silent for longer than `idle_after` stops
/// holding it back until it speaks again (when every input is silent, the watermark is the
/// highest any of them sent). An ended input counts as `Timestamp::MAX`.
#[derive(Debug, Clone)]
pub struct WatermarkTracker {
    inputs: Vec<Input>,
    idle_after: Option<Duration>,
    emitted: Timestamp,
}

#[derive(Debug, Clone)]
struct Input {
    watermark: Timestamp,
    last_heard: Instant,
}

impl WatermarkTracker {
    /// A tracker over `inputs` inputs, all at `Timestamp::MIN`. `idle_after: None` never
    /// releases a silent input.
    pub fn new(inputs: usize, idle_after: Option<Duration>, now: Instant) -> Self {
        WatermarkTracker {
            inputs: vec![
                Input {
                    watermark: Timestamp::MIN,
                    last_heard: now
                };
                inputs
            ],
            idle_after,
            emitted: Timestamp::MIN,
        }
    }

    /// Input `i` sent a record (it is active, whatever its watermark).
    pub fn heard(&mut self, i: usize, now: Instant) {
        self.inputs[i].last_heard = now;
    }

    /// Input `i` sent watermark `wm` (a lower one than it sent before is ignored); returns the
    /// stage's new watermark if it advanced.
    pub fn update(&mut self, i: usize, wm: Timestamp, now: Instant) -> Option<Timestamp> {
        let input = &mut self.inputs[i];
        input.last_heard = now;
        input.watermark = input.watermark.max(wm);
        self.advance(now)
    }

    /// Input `i` ended: it no longer holds the watermark back.
    pub fn ended(&mut self, i: usize, now: Instant) -> Option<Timestamp> {
        self.update(i, Timestamp::MAX, now)
    }

    /// Re-evaluates idleness (call it when the stage wakes without input); returns the new
    /// watermark if releasing idle inputs advanced it.
    pub fn advance(&mut self, now: Instant) -> Option<Timestamp> {
        let idle = |input: &Input| {
            input.watermark < Timestamp::MAX
                && self
                    .idle_after
                    .is_some_and(|d| now.duration_since(input.last_heard) >= d)
        };
        let active = self
            .inputs
            .iter()
            .filter(|i| !idle(i))
            .map(|i| i.watermark)
            .min();
        // All idle: nobody holds the watermark back, so it moves to the furthest any input
        // promised (as a Flink valve does when every channel goes idle).
        let min = match active {
            Some(min) => min,
            None => self.inputs.iter().map(|i| i.watermark).max()?,
        };
        (min > self.emitted).then(|| {
            self.emitted = min;
            min
        })
    }

    /// The last watermark returned.
    pub fn current(&self) -> Timestamp {
        self.emitted
    }
}
