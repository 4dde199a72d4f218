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

/// A duration [`parse_duration_ms`] cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid duration {text:?}: expected e.g. \"500ms\", \"10s\", \"2m\", \"1h\", \"1d\" or \"1m30s\""
)]
pub struct ParseDurationError {
    text: String,
}

impl ParseDurationError {
    /// The text that was given.
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// A timestamp [`parse_rfc3339_ms`] cannot read: the text and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid RFC 3339 time {text:?}: {kind}")]
pub struct ParseTimeError {
    text: String,
    kind: ParseTimeErrorKind,
}

impl ParseTimeError {
    /// The text that was given.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// What is wrong with it.
    pub fn kind(&self) -> ParseTimeErrorKind {
        self.kind
    }
}

/// What is wrong with a timestamp (see [`ParseTimeError`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum ParseTimeErrorKind {
    /// It ends before the date and time are complete.
    #[error("too short")]
    TooShort,
    /// A date, time or offset field is not digits.
    #[error("expected digits")]
    ExpectedDigits,
    /// A separator (`-`, `T`, `:`) is missing or wrong.
    #[error("malformed")]
    Malformed,
    /// The month or day does not exist (`2023-02-29`).
    #[error("no such date")]
    NoSuchDate,
    /// The hour, minute or second is out of range.
    #[error("no such time of day")]
    NoSuchTimeOfDay,
    /// A `.` with no digits after it.
    #[error("empty fraction")]
    EmptyFraction,
    /// The offset's hours or minutes are out of range.
    #[error("bad offset")]
    BadOffset,
    /// Neither `Z` nor an offset such as `+02:00` at the end.
    #[error("expected Z or an offset like +02:00 at the end")]
    MissingOffset,
}

/// Parses a duration such as `"10s"`, `"500ms"`, `"2m"`, `"1h"`, `"1d"` or `"1m30s"` into
/// milliseconds. Units: `ms`, `s`, `m`, `h`, `d`; at least one `<integer><unit>` part.
///
/// ```
/// use millrace::parse_duration_ms;
/// assert_eq!(parse_duration_ms("1m30s"), Ok(90_000));
/// assert!(parse_duration_ms("10").is_err());
/// ```
pub fn parse_duration_ms(text: &str) -> Result<i64, ParseDurationError> {
    let err = || ParseDurationError {
        text: text.to_string(),
    };
    let s = text.trim();
    if s.is_empty() {
        return Err(err());
    }
    let bytes = s.as_bytes();
    let (mut i, mut total) = (0, 0i64);
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        let n: i64 = s[start..i].parse().map_err(|_| err())?;
        let unit_start = i;
        while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
            i += 1;
        }
        let per = match &s[unit_start..i] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(err()),
        };
        total = n
            .checked_mul(per)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(err)?;
    }
    Ok(total)
}

/// Parses an RFC 3339 timestamp (`2024-05-01T12:00:00Z`, `2024-05-01T12:00:00.250+02:00`) into
/// milliseconds since the Unix epoch. Fractions beyond milliseconds are truncated.
///
/// ```
/// use millrace::parse_rfc3339_ms;
/// assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:10Z"), Ok(10_000));
/// assert_eq!(parse_rfc3339_ms("1969-12-31T23:59:59.5-00:00"), Ok(-500));
/// ```
pub fn parse_rfc3339_ms(text: &str) -> Result<i64, ParseTimeError> {
    use ParseTimeErrorKind as Why;
    let err = |kind| ParseTimeError {
        text: text.to_string(),
        kind,
    };
    let b = text.as_bytes();
    let num = |from: usize, len: usize| -> Result<i64, ParseTimeError> {
        let part = text
            .get(from..from + len)
            .ok_or_else(|| err(Why::TooShort))?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return Err(err(Why::ExpectedDigits));
        }
        part.parse::<i64>().map_err(|_| err(Why::ExpectedDigits))
    };
    let sep = |at: usize, want: &[u8]| -> Result<(), ParseTimeError> {
        match b.get(at) {
            Some(c) if want.contains(c) => Ok(()),
            _ => Err(err(Why::Malformed)),
        }
    };
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    sep(4, b"-")?;
    sep(7, b"-")?;
    sep(10, b"Tt ")?;
    let (hour, minute, second) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    sep(13, b":")?;
    sep(16, b":")?;
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return Err(err(Why::NoSuchDate));
    }
    if hour > 23 || minute > 59 || second > 60 {
        return Err(err(Why::NoSuchTimeOfDay));
    }
    let mut i = 19;
    let mut millis = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return Err(err(Why::EmptyFraction));
        }
        let frac = &text[start..i.min(start + 3)];
        millis = frac.parse::<i64>().map_err(|_| err(Why::ExpectedDigits))?
            * 10i64.pow(3 - frac.len() as u32);
    }
    let offset_min = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(&c @ (b'+' | b'-')) if i + 6 == b.len() => {
            sep(i + 3, b":")?;
            let (oh, om) = (num(i + 1, 2)?, num(i + 4, 2)?);
            if oh > 23 || om > 59 {
                return Err(err(Why::BadOffset));
            }
            let m = oh * 60 + om;
            if c == b'-' {
                -m
            } else {
                m
            }
        }
        _ => return Err(err(Why::MissingOffset)),
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3_600 + minute * 60 + second - offset_min * 60;
    Ok(secs * 1_000 + millis)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}
