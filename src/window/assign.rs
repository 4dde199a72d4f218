//! The three assigners and their validation.

use crate::time::{Timestamp, Window};

/// An assigner's parameters are invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AssignerError {
    /// A size, slide or gap that is not positive.
    #[error("{what} must be positive, found {value} ms")]
    NotPositive {
        /// Which parameter.
        what: &'static str,
        /// Its value.
        value: i64,
    },
}

fn positive(what: &'static str, value: i64) -> Result<i64, AssignerError> {
    if value > 0 {
        Ok(value)
    } else {
        Err(AssignerError::NotPositive { what, value })
    }
}

/// The largest `s ≤ t` with `s ≡ offset (mod step)`, in i128 so that it stays exact at the
/// ends of the i64 range (it may lie below `i64::MIN`).
#[inline]
fn floor_to(t: i64, step: i64, offset: i64) -> i128 {
    // In i64 whenever nothing overflows (every realistic time): a 128-bit division costs
    // several times a 64-bit one.
    if let Some(start) = t
        .checked_sub(offset)
        .and_then(|d| t.checked_sub(d.rem_euclid(step)))
    {
        return start as i128;
    }
    let rem = (t as i128 - offset as i128).rem_euclid(step as i128);
    t as i128 - rem
}

/// The instant an event at `t` is placed at: `t` itself, except at `i64::MAX` (the watermark
/// of end of input), which no half-open window with an `i64` end can hold; an event there is
/// placed at `i64::MAX - 1`, in the last window of the range.
#[inline]
fn placed(t: Timestamp) -> i64 {
    t.0.min(i64::MAX - 1)
}

/// `[start, start + size)` clamped to the representable range (only the first and last
/// windows of the i64 range are ever clamped).
#[inline]
fn clamped(start: i128, size: i64) -> Window {
    if let Some(end) = i64::try_from(start)
        .ok()
        .and_then(|s| s.checked_add(size).map(|e| (s, e)))
    {
        return Window {
            start: Timestamp(end.0),
            end: Timestamp(end.1),
        };
    }
    let clamp = |v: i128| v.clamp(i64::MIN as i128, i64::MAX as i128) as i64;
    Window {
        start: Timestamp(clamp(start)),
        end: Timestamp(clamp(start + size as i128)),
    }
}

/// Fixed-size, non-overlapping windows: every instant is in exactly one.
///
/// ```
/// use millrace::{window::Tumbling, Timestamp, Window};
/// let w = Tumbling::new(10_000, 0).unwrap();
/// assert_eq!(w.assign(Timestamp(10_000)), Window::new(Timestamp(10_000), Timestamp(20_000)));
/// assert_eq!(w.assign(Timestamp(-1)), Window::new(Timestamp(-10_000), Timestamp(0)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tumbling {
    size: i64,
    offset: i64,
}

impl Tumbling {
    /// Windows of `size` ms, starting at multiples of `size` shifted by `offset` ms.
    pub fn new(size: i64, offset: i64) -> Result<Self, AssignerError> {
        Ok(Tumbling {
            size: positive("size", size)?,
            offset: offset.rem_euclid(size.max(1)),
        })
    }

    /// The window containing `t`.
    #[inline]
    pub fn assign(&self, t: Timestamp) -> Window {
        clamped(floor_to(placed(t), self.size, self.offset), self.size)
    }
}

/// Fixed-size windows starting every `slide` ms; an instant is in `ceil(size / slide)` or
/// `floor(size / slide)` of them (exactly `size / slide` when `slide` divides `size`). A `size`
/// that is not a multiple of `slide` is allowed: each window is still `[s, s + size)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sliding {
    size: i64,
    slide: i64,
    offset: i64,
}

impl Sliding {
    /// Windows of `size` ms starting every `slide` ms (shifted by `offset`).
    pub fn new(size: i64, slide: i64, offset: i64) -> Result<Self, AssignerError> {
        let size = positive("size", size)?;
        let slide = positive("slide", slide)?;
        Ok(Sliding {
            size,
            slide,
            offset: offset.rem_euclid(slide),
        })
    }

    /// Every window containing `t`, latest start first.
    ///
    /// ```
    /// use millrace::{window::Sliding, Timestamp};
    /// let w = Sliding::new(10_000, 5_000, 0).unwrap();
    /// let starts: Vec<i64> = w.assign(Timestamp(10_000)).iter().map(|w| w.start.0).collect();
    /// assert_eq!(starts, vec![10_000, 5_000]);
    /// ```
    pub fn assign(&self, t: Timestamp) -> Vec<Window> {
        let t = placed(t);
        let mut out = Vec::with_capacity((self.size / self.slide + 1) as usize);
        let mut start = floor_to(t, self.slide, self.offset);
        // Windows starting below `i64::MIN` clamp to the same start but keep their ends, so
        // they stay distinct: an event at `i64::MIN` is in as many windows as any other.
        while start + self.size as i128 > t as i128 {
            let w = clamped(start, self.size);
            debug_assert!(w.contains(Timestamp(t)));
            out.push(w);
            start -= self.slide as i128;
        }
        out
    }
}

/// Activity-bounded windows: each event opens `[t, t + gap)`; windows that overlap merge.
/// Half-open: `[a, a + gap)` and `[a + gap, …)` touch but do not overlap, so they stay apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    gap: i64,
}

impl Session {
    /// Sessions that close after `gap` ms without events.
    pub fn new(gap: i64) -> Result<Self, AssignerError> {
        Ok(Session {
            gap: positive("gap", gap)?,
        })
    }

    /// The window an event at `t` opens on its own.
    pub fn assign(&self, t: Timestamp) -> Window {
        let t = Timestamp(placed(t));
        Window {
            start: t,
            end: t.saturating_add(self.gap),
        }
    }

    /// Merges `windows` into disjoint sessions, sorted by start.
    pub fn merge(&self, mut windows: Vec<Window>) -> Vec<Window> {
        windows.sort();
        let mut out: Vec<Window> = Vec::with_capacity(windows.len());
        for w in windows {
            match out.last_mut() {
                Some(last) if last.overlaps(&w) => *last = last.cover(&w),
                _ => out.push(w),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `window` fuzz target: an event at `i64::MAX` was in no window (tumbling
    /// and session windows ended where it is; the sliding assigner's debug assertion fired).
    #[test]
    fn an_event_at_the_end_of_the_range_is_in_the_last_window() {
        let t = Timestamp::MAX;
        let w = Tumbling::new(10, 0).unwrap().assign(t);
        assert!(w.contains(Timestamp(i64::MAX - 1)), "{w:?}");
        assert_eq!(w.end, Timestamp::MAX);
        let w = Tumbling::new(i64::MAX, 0).unwrap().assign(t);
        assert_eq!(w, Window::new(Timestamp(0), Timestamp::MAX));
        let ws = Sliding::new(10, 3, 0).unwrap().assign(t);
        assert_eq!(ws.len(), 4, "{ws:?}");
        assert!(ws
            .iter()
            .all(|w| w.end <= Timestamp::MAX && w.len_millis() > 0));
        let w = Session::new(5).unwrap().assign(t);
        assert_eq!(w, Window::new(Timestamp(i64::MAX - 1), Timestamp::MAX));
    }

    /// Found by the `window` fuzz target: at `i64::MIN` the sliding assigner stopped at the
    /// first window whose start clamps, losing the others that hold the event.
    #[test]
    fn an_event_at_the_start_of_the_range_is_in_every_sliding_window_that_holds_it() {
        let t = Timestamp::MIN;
        let ws = Sliding::new(10, 3, 0).unwrap().assign(t);
        // Starts MIN-1, MIN-4, MIN-7 (all clamp to MIN), ends MIN+9, MIN+6, MIN+3.
        let ends: Vec<i64> = ws.iter().map(|w| w.end.0 - i64::MIN).collect();
        assert_eq!(ends, vec![9, 6, 3]);
        assert!(ws.iter().all(|w| w.contains(t) && w.start == t));
    }
}
