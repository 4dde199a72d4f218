//! Event time: [`Timestamp`] (milliseconds, negative allowed) and the half-open [`Window`].
//!
//! `Window::contains` is the only membership test in the crate: a window `[start, end)` holds
//! `start` and not `end`, so with 10 s tumbling windows an event at exactly 10,000 ms is in
//! `[10000, 20000)` and nowhere else (seed bug 5: modules that disagreed on this put boundary
//! events in two windows or in none).

use std::fmt;

/// A point in event time, in milliseconds since the Unix epoch (negative before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// The earliest representable time (a watermark of −∞).
    pub const MIN: Timestamp = Timestamp(i64::MIN);
    /// The latest representable time: the watermark of end of input, which fires every window.
    pub const MAX: Timestamp = Timestamp(i64::MAX);

    /// A timestamp from milliseconds.
    pub const fn from_millis(ms: i64) -> Self {
        Timestamp(ms)
    }

    /// The timestamp in milliseconds.
    pub const fn millis(self) -> i64 {
        self.0
    }

    /// `self + ms`, saturating at the ends of the range.
    pub const fn saturating_add(self, ms: i64) -> Self {
        Timestamp(self.0.saturating_add(ms))
    }

    /// `self - ms`, saturating at the ends of the range.
    pub const fn saturating_sub(self, ms: i64) -> Self {
        Timestamp(self.0.saturating_sub(ms))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Timestamp::MIN => f.write_str("-inf"),
            Timestamp::MAX => f.write_str("+inf"),
            Timestamp(ms) => write!(f, "{ms}ms"),
        }
    }
}

/// A half-open interval of event time, `[start, end)`.
///
/// ```
/// use millrace::{Timestamp, Window};
/// let w = Window::new(Timestamp(10_000), Timestamp(20_000));
/// assert!(w.contains(Timestamp(10_000)));
/// assert!(!w.contains(Timestamp(20_000)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Window {
    /// The first instant inside the window.
    pub start: Timestamp,
    /// The first instant after the window.
    pub end: Timestamp,
}

impl Window {
    /// The window `[start, end)`. Panics if `end < start`.
    pub fn new(start: Timestamp, end: Timestamp) -> Self {
        assert!(
            start <= end,
            "a window cannot end ({end}) before it starts ({start})"
        );
        Window { start, end }
    }

    /// Whether `t` lies in `[start, end)`: the one membership test of the crate.
    #[inline]
    pub fn contains(&self, t: Timestamp) -> bool {
        self.start <= t && t < self.end
    }

    /// Whether the two windows share an instant. `[a, b)` and `[b, c)` do not.
    #[inline]
    pub fn overlaps(&self, other: &Window) -> bool {
        self.start < other.end && other.start < self.end
    }

    /// The smallest window covering both.
    pub fn cover(&self, other: &Window) -> Window {
        Window {
            start: self.start.min(other.start),
            end: self.end.max(other.end),
        }
    }

    /// The window's length in milliseconds.
    pub fn len_millis(&self) -> i64 {
        self.end.0.saturating_sub(self.start.0)
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {})", self.start.0, self.end.0)
    }
}
