//! NDJSON kept as bytes: a fast, allocation-free check that a line is a JSON object, and the
//! validation of whole blocks of lines.
//!
//! A pipeline that only moves records between `ndjson.read`, `exec` stages and `ndjson.write`
//! need not build them into values: it passes blocks of lines through byte for byte, checking
//! each line on the way (see `docs/config.md`, "Byte path"). The check must reject everything
//! the value path (`serde_json`) rejects, so it is conservative: [`classify`] answers
//! [`Line::Object`] only when sure, and [`Line::Doubt`] for anything unusual (deep nesting,
//! exponents, long numbers, surrogate escapes, a top level that is not an object, invalid
//! syntax), which [`check_block`] hands to `serde_json` for the verdict and the error message.
//! A property test and a fuzz target hold it to that.

use serde_json::Value;

use crate::describe::kind_of;

/// What [`classify`] says of one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Line {
    /// Certainly one valid JSON object (surrounding whitespace allowed).
    Object,
    /// Only ASCII whitespace: skipped, as the value path skips it.
    Blank,
    /// Not sure: ask `serde_json`.
    Doubt,
}

/// Nesting deeper than this is left to `serde_json` (whose limit is 128).
const MAX_DEPTH: usize = 100;
/// Numbers with more digits than this are left to `serde_json` (range checks).
const MAX_DIGITS: usize = 300;

/// Bytes that may appear in a string without ending it or starting an escape: anything but
/// `"`, `\` and control characters (UTF-8 is checked separately, over whole blocks).
static STRING_PLAIN: [bool; 256] = {
    let mut t = [true; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = false;
        i += 1;
    }
    t[b'"' as usize] = false;
    t[b'\\' as usize] = false;
    t
};

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// The high bit of each byte of `x` that is below `n` (`n` ≤ 128); the lowest flag is exact
/// (a borrow can only add flags above a true one).
#[inline]
fn bytes_below(x: u64, n: u8) -> u64 {
    x.wrapping_sub(ONES * u64::from(n)) & !x & HIGHS
}

/// How many bytes at the start of `s` are plain string content (see [`STRING_PLAIN`]):
/// sixteen at a time with SSE2 (part of every x86_64), then eight at a time.
#[inline]
fn plain_run(s: &[u8]) -> usize {
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    while i + 16 <= s.len() {
        let (special, _) = masks16(s, i);
        if special != 0 {
            return i + special.trailing_zeros() as usize;
        }
        i += 16;
    }
    while let Some(word) = s.get(i..i + 8) {
        let x = u64::from_le_bytes(word.try_into().expect("eight bytes"));
        let special = bytes_below(x ^ (ONES * u64::from(b'"')), 1)
            | bytes_below(x ^ (ONES * u64::from(b'\\')), 1)
            | bytes_below(x, 0x20);
        if special != 0 {
            return i + (special.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    i + s[i..]
        .iter()
        .position(|&b| !STRING_PLAIN[b as usize])
        .unwrap_or(s.len() - i)
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// What a caller of [`classify_with`] learns of a line besides its verdict. Every method is
/// called only while the line is being recognised: a line that ends as [`Line::Doubt`] may
/// have reported some fields first.
pub(crate) trait Visit {
    /// Whether [`long_integer`](Visit::long_integer) is wanted (checked at compile time).
    const LONG_INTEGERS: bool = false;
    /// A field of the top-level object: the bytes of its key inside the quotes (escapes not
    /// decoded) and of its value, as ranges of the line.
    #[inline(always)]
    fn field(&mut self, _key: (usize, usize), _value: (usize, usize)) {}
    /// An integer (no fraction) of 19 digits or more, which may be outside 64 bits.
    #[inline(always)]
    fn long_integer(&mut self) {}
}

/// No visit: [`classify`].
struct NoVisit;

impl Visit for NoVisit {}

/// Classifies one line (UTF-8 is the caller's to check).
pub(crate) fn classify(s: &[u8]) -> Line {
    classify_with(s, &mut NoVisit)
}

/// [`classify`], telling `v` the top-level fields it finds (see [`Visit`]).
///
/// The top-level object is read by straight-line code — a key, a colon, a value, then a comma
/// or the end — because nearly every line is a flat object of strings and numbers, and a state
/// machine's dispatch per token was most of the check's time (an indirect jump, mispredicted
/// as the token kinds alternate). Nested values are read the same way ([`nested`]). Every
/// "not sure" returns [`Line::Doubt`], never "valid".
#[inline]
pub(crate) fn classify_with<V: Visit>(s: &[u8], v: &mut V) -> Line {
    let n = s.len();
    let mut i = skip_ws(s, 0);
    if i == n {
        return Line::Blank;
    }
    if s[i] != b'{' {
        return Line::Doubt; // not an object, or blank by a wider notion of whitespace
    }
    i = skip_ws(s, i + 1);
    if s.get(i) == Some(&b'}') {
        i += 1;
    } else {
        loop {
            let Some((key_end, after)) = key(s, i) else {
                return Line::Doubt;
            };
            let value_start = skip_ws(s, after);
            let Some(value_end) = value(s, value_start, 1, v) else {
                return Line::Doubt;
            };
            v.field((i + 1, key_end - 1), (value_start, value_end));
            i = skip_ws(s, value_end);
            match s.get(i) {
                Some(b',') => i = skip_ws(s, i + 1),
                Some(b'}') => {
                    i += 1;
                    break;
                }
                _ => return Line::Doubt,
            }
        }
    }
    if skip_ws(s, i) == n {
        Line::Object
    } else {
        Line::Doubt
    }
}

/// One value starting at `i`, inside `depth` open brackets; the position after it.
#[inline(always)]
fn value<V: Visit>(s: &[u8], i: usize, depth: usize, v: &mut V) -> Option<usize> {
    match *s.get(i)? {
        b'"' => string(s, i),
        b'-' | b'0'..=b'9' => {
            let e = number(s, i)?;
            if V::LONG_INTEGERS && e - i >= 19 {
                long_integer(&s[i..e], v);
            }
            Some(e)
        }
        b't' => literal(s, i, b"true"),
        b'f' => literal(s, i, b"false"),
        b'n' => literal(s, i, b"null"),
        b'{' | b'[' => nested(s, i, depth, v),
        _ => None,
    }
}

#[inline(always)]
fn literal(s: &[u8], i: usize, word: &[u8]) -> Option<usize> {
    s[i..].starts_with(word).then_some(i + word.len())
}

/// Tells `v` of an integer of 19 digits or more (`number` is a number's bytes).
#[cold]
fn long_integer<V: Visit>(number: &[u8], v: &mut V) {
    if !number.contains(&b'.') && number.iter().filter(|b| b.is_ascii_digit()).count() >= 19 {
        v.long_integer();
    }
}

/// A nested object or array, starting at the `{` or `[` at `i`, with `depth` brackets around
/// it already open (the top-level object's is one); the position after its closing bracket.
///
/// The same straight-line reading as the top level's, by recursion: at most [`MAX_DEPTH`]
/// brackets are open at once (deeper is left to `serde_json`), so the stack stays small.
#[inline(never)]
fn nested<V: Visit>(s: &[u8], i: usize, depth: usize, v: &mut V) -> Option<usize> {
    if depth == MAX_DEPTH {
        return None;
    }
    let close = if s[i] == b'{' { b'}' } else { b']' };
    let mut i = skip_ws(s, i + 1);
    if s.get(i) == Some(&close) {
        return Some(i + 1);
    }
    loop {
        if close == b'}' {
            i = skip_ws(s, key(s, i)?.1);
        }
        i = skip_ws(s, value(s, i, depth + 1, v)?);
        match *s.get(i)? {
            b',' => i = skip_ws(s, i + 1),
            b if b == close => return Some(i + 1),
            _ => return None,
        }
    }
}

#[inline]
fn skip_ws(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && is_ws(s[i]) {
        i += 1;
    }
    i
}

/// `"key"` then `:` from `i`; the positions after the key's closing quote and after the colon.
#[inline]
fn key(s: &[u8], i: usize) -> Option<(usize, usize)> {
    if s.get(i) != Some(&b'"') {
        return None;
    }
    let end = string(s, i)?;
    let i = skip_ws(s, end);
    (s.get(i) == Some(&b':')).then_some((end, i + 1))
}

/// A string starting at the `"` at `i`; the position after its closing quote.
///
/// Inlined for the common string (no escape, its closing quote among the next sixteen bytes:
/// one vector compare); anything else is [`string_rest`]'s.
#[inline(always)]
fn string(s: &[u8], i: usize) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    if let Some((special, quote)) = specials16(s, i + 1) {
        let first = special & special.wrapping_neg();
        if quote & first != 0 {
            return Some(i + 2 + first.trailing_zeros() as usize);
        }
    }
    string_rest(s, i)
}

/// The sixteen bytes `s[at..at + 16]` (in bounds) as two bit masks, bit `k` for byte
/// `at + k`: the bytes that are not plain string content (see [`STRING_PLAIN`]), and the
/// quotes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn masks16(s: &[u8], at: usize) -> (u32, u32) {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_min_epu8, _mm_movemask_epi8, _mm_or_si128,
        _mm_set1_epi8,
    };
    assert!(at + 16 <= s.len());
    // SAFETY: SSE2 is in the x86_64 baseline, so the intrinsics are available; the unaligned
    // load reads the 16 bytes s[at..at + 16], in bounds (asserted).
    unsafe {
        let v = _mm_loadu_si128(s.as_ptr().add(at).cast::<__m128i>());
        let quote = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8));
        let backslash = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8));
        // v <= 0x1f (unsigned) exactly when min(v, 0x1f) == v.
        let control = _mm_cmpeq_epi8(_mm_min_epu8(v, _mm_set1_epi8(0x1f)), v);
        let special = _mm_or_si128(_mm_or_si128(quote, backslash), control);
        (
            _mm_movemask_epi8(special) as u32,
            _mm_movemask_epi8(quote) as u32,
        )
    }
}

/// [`masks16`] from `at`; when fewer than sixteen bytes are left, the line's last sixteen read
/// and shifted, so that bits past the end are zero. `None` for a line shorter than sixteen
/// bytes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn specials16(s: &[u8], at: usize) -> Option<(u32, u32)> {
    let n = s.len();
    let (load, shift) = if at + 16 <= n {
        (at, 0)
    } else if n >= 16 && at <= n {
        (n - 16, at - (n - 16))
    } else {
        return None;
    };
    let (special, quote) = masks16(s, load);
    Some((special >> shift, quote >> shift))
}

/// [`string`] for any string: runs of plain bytes, escapes, the closing quote.
#[inline(never)]
fn string_rest(s: &[u8], mut i: usize) -> Option<usize> {
    i += 1;
    loop {
        i += plain_run(&s[i..]);
        match *s.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' => {
                i += 1;
                match *s.get(i)? {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => i += 1,
                    b'u' => {
                        let hex = s.get(i + 1..i + 5)?;
                        if !hex.iter().all(u8::is_ascii_hexdigit) {
                            return None;
                        }
                        // Surrogates must pair up: leave that to serde_json.
                        if matches!(hex[0], b'd' | b'D') && !matches!(hex[1], b'0'..=b'7') {
                            return None;
                        }
                        i += 5;
                    }
                    _ => return None,
                }
            }
            _ => return None, // a control character
        }
    }
}

/// The position after the ASCII digits from `i`: eight bytes at a time, then one at a time. A
/// digit loop byte by byte mispredicts its exit on every number of a new length.
#[inline]
fn digits(s: &[u8], mut i: usize) -> usize {
    while let Some(word) = s.get(i..i + 8) {
        let x = u64::from_le_bytes(word.try_into().expect("eight bytes"));
        let not_digit = non_digits(x);
        if not_digit != 0 {
            return i + (not_digit.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < s.len() && s[i].is_ascii_digit() {
        i += 1;
    }
    i
}

/// The high bit of each byte of `x` that is not an ASCII digit, exactly (no borrow or carry
/// crosses a byte): `y = x ^ '0'` is below 10 exactly for a digit; the low seven bits of `y`
/// plus 0x76 set the high bit when they are 10 or more, and cannot carry out of the byte.
#[inline]
fn non_digits(x: u64) -> u64 {
    let y = x ^ (ONES * u64::from(b'0'));
    (((y & !HIGHS).wrapping_add(ONES * 0x76)) | y) & HIGHS
}

/// A number starting at `i`; the position after it. Exponents and very long numbers are left
/// to serde_json (they can be out of range).
#[inline(always)]
fn number(s: &[u8], mut i: usize) -> Option<usize> {
    if s[i] == b'-' {
        i += 1;
    }
    match *s.get(i)? {
        b'0' => i += 1,
        b'1'..=b'9' => {
            let e = digits(s, i);
            if e - i > MAX_DIGITS {
                return None;
            }
            i = e;
        }
        _ => return None,
    }
    if s.get(i) == Some(&b'.') {
        let e = digits(s, i + 1);
        if e == i + 1 || e - i > MAX_DIGITS {
            return None;
        }
        i = e;
    }
    if matches!(s.get(i), Some(b'e' | b'E')) {
        return None;
    }
    Some(i)
}

/// The positions of the `\n`s in a block, in order: sixty-four bytes a step with SSE2 into one
/// bit mask, then one bit per newline. Records are often shorter than the setup of a
/// `memchr` call per line, which this replaces where a block is split into lines.
pub(crate) struct Newlines<'a> {
    data: &'a [u8],
    /// Where the bytes not yet in `mask` start.
    next: usize,
    /// Newlines found and not yet returned, bit `k` for byte `base + k`.
    mask: u64,
    base: usize,
}

impl<'a> Newlines<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Newlines<'a> {
        Newlines {
            data,
            next: 0,
            mask: 0,
            base: 0,
        }
    }

    /// The newlines of the 64 bytes from `at` (`at + 64` is in bounds).
    #[inline]
    fn mask64(&self, at: usize) -> u64 {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{
                __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_set1_epi8,
            };
            let mut m = 0u64;
            for k in 0..4 {
                // SAFETY: SSE2 is in the x86_64 baseline; the unaligned load reads the 16
                // bytes data[at + 16k..at + 16k + 16], in bounds as at + 64 <= data.len().
                let bits = unsafe {
                    let v = _mm_loadu_si128(self.data.as_ptr().add(at + 16 * k).cast::<__m128i>());
                    _mm_movemask_epi8(_mm_cmpeq_epi8(v, _mm_set1_epi8(b'\n' as i8))) as u16
                };
                m |= u64::from(bits) << (16 * k);
            }
            m
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            newline_bits(&self.data[at..at + 64])
        }
    }
}

/// The newlines of up to 64 bytes, bit `k` for byte `k`, one byte at a time.
fn newline_bits(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .enumerate()
        .fold(0, |m, (k, &b)| m | (u64::from(b == b'\n') << k))
}

impl Iterator for Newlines<'_> {
    type Item = usize;

    #[inline]
    fn next(&mut self) -> Option<usize> {
        while self.mask == 0 {
            let at = self.next;
            if at + 64 <= self.data.len() {
                self.mask = self.mask64(at);
                self.next = at + 64;
            } else if at < self.data.len() {
                self.mask = newline_bits(&self.data[at..]);
                self.next = self.data.len();
            } else {
                return None;
            }
            self.base = at;
        }
        let k = self.mask.trailing_zeros() as usize;
        self.mask &= self.mask - 1;
        Some(self.base + k)
    }
}

/// A line that failed the check: its number and what is wrong with it.
#[derive(Debug)]
pub(crate) struct BadLine {
    /// 1-based line number.
    pub line: u64,
    /// What is wrong, as the value path says it.
    pub message: String,
}

/// Checks a block of whole lines (`first_line` is the number of its first line), removing
/// blank lines and `\r` before `\n` the way the value path drops them, and checking that no
/// line is longer than `max_line` bytes (not counting its `\r\n` or `\n`). Returns the number of records.
pub(crate) fn check_block(
    data: &mut Vec<u8>,
    first_line: u64,
    max_line: usize,
) -> Result<u64, BadLine> {
    // The first line that is not UTF-8, and where it starts: reported when the check gets
    // there, so that an earlier bad line is reported first, as the value path would.
    let mut not_utf8 = std::str::from_utf8(data).err().map(|e| {
        let at = e.valid_up_to();
        let line = first_line + memchr::memchr_iter(b'\n', &data[..at]).count() as u64;
        let start = memchr::memrchr(b'\n', &data[..at]).map_or(0, |i| i + 1);
        let end = memchr::memchr(b'\n', &data[at..]).map_or(data.len(), |i| at + i);
        let cut = &data[start..end];
        let message = if cut.strip_suffix(b"\r").unwrap_or(cut).len() > max_line {
            // A line over the cap comes cut to `max_line + 1` bytes, maybe inside a character.
            line_too_long(max_line)
        } else {
            match serde_object(&data[start..end]) {
                Err(m) => m,
                Ok(_) => "invalid UTF-8".to_string(),
            }
        };
        (start, BadLine { line, message })
    });
    let mut records = 0u64;
    let mut compact = false;
    let mut line_no = first_line;
    let mut start = 0;
    let mut newlines = Newlines::new(data);
    while start < data.len() {
        if not_utf8.as_ref().is_some_and(|(at, _)| *at == start) {
            return Err(not_utf8.take().expect("checked").1);
        }
        let end = newlines.next().unwrap_or(data.len());
        let line = &data[start..end];
        if line.strip_suffix(b"\r").unwrap_or(line).len() > max_line {
            return Err(BadLine {
                line: line_no,
                message: line_too_long(max_line),
            });
        }
        let verdict = match classify(line) {
            // Bytes are kept as they are: no range check on numbers (see `serde_object`).
            Line::Doubt => match serde_object(line) {
                Ok(Value::Null) => Line::Blank,
                Ok(_) => Line::Object,
                Err(message) => {
                    return Err(BadLine {
                        line: line_no,
                        message,
                    })
                }
            },
            v => v,
        };
        match verdict {
            Line::Object => {
                records += 1;
                compact |= line.ends_with(b"\r") || end == data.len();
            }
            _ => compact = true,
        }
        line_no += 1;
        start = end + 1;
    }
    if compact {
        *data = compacted(data);
    }
    Ok(records)
}

/// The block's non-blank lines, each ending in exactly `\n`.
fn compacted(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 1);
    for line in data.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if !line.iter().all(u8::is_ascii_whitespace) {
            out.extend_from_slice(line);
            out.push(b'\n');
        }
    }
    out
}

/// The error for a line over the cap (`max_line_bytes`, not counting a `\r\n` or `\n` ending).
pub(crate) fn line_too_long(max_line: usize) -> String {
    format!("line longer than max_line_bytes ({max_line})")
}

/// [`parse_object`] for a line read by `ndjson.read` (without its `\n`), refusing one longer than
/// `max_line` bytes first.
pub(crate) fn parse_line(line: &[u8], max_line: usize) -> Result<Value, String> {
    if line.len() > max_line {
        return Err(line_too_long(max_line));
    }
    parse_object(line)
}

/// Parses one NDJSON line into an object for the value path; `Value::Null` marks a blank line to
/// skip. An integer outside both `i64` and `u64` is refused: `serde_json` would make it an `f64`
/// and lose its digits.
pub(crate) fn parse_object(line: &[u8]) -> Result<Value, String> {
    let v = serde_object(line)?;
    // Only a float of 2^63 or more in size can have been such an integer: the text is looked at
    // only then, so clean input pays for one walk over the value.
    if has_huge_float(&v) {
        if let Some(n) = integer_out_of_range(line) {
            let shown: String = n.chars().take(40).collect();
            let more = if shown.len() < n.len() { "…" } else { "" };
            return Err(format!(
                "integer {shown}{more} is out of the 64-bit range (it would lose digits)"
            ));
        }
    }
    Ok(v)
}

/// Parses one NDJSON line into an object as `serde_json` does (the byte path's reference);
/// `Value::Null` marks a blank line.
pub(crate) fn serde_object(line: &[u8]) -> Result<Value, String> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    match serde_json::from_slice::<Value>(line) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(other) => Err(format!("expected a JSON object, found {}", kind_of(&other))),
        Err(e) => Err(format!("invalid JSON: {e}")),
    }
}

/// 2^63: the smallest size of a float that an integer outside `i64` and `u64` becomes.
const TWO_POW_63: f64 = (1u64 << 63) as f64;

/// Whether `v` holds a float of magnitude 2^63 or more.
fn has_huge_float(v: &Value) -> bool {
    match v {
        Value::Number(n) => n
            .as_f64()
            .is_some_and(|f| n.is_f64() && f.abs() >= TWO_POW_63),
        Value::Array(a) => a.iter().any(has_huge_float),
        Value::Object(m) => m.values().any(has_huge_float),
        _ => false,
    }
}

/// The first integer (no fraction, no exponent) in the valid JSON text `s` that fits neither
/// `i64` nor `u64`.
fn integer_out_of_range(s: &[u8]) -> Option<&str> {
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'"' => {
                i += 1;
                while i < s.len() && s[i] != b'"' {
                    i += if s[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                let end = digits(s, i + 1);
                i = end;
                let mut integer = true;
                if s.get(i) == Some(&b'.') {
                    integer = false;
                    i = digits(s, i + 1);
                }
                if matches!(s.get(i), Some(b'e' | b'E')) {
                    integer = false;
                    i += 1;
                    if matches!(s.get(i), Some(b'+' | b'-')) {
                        i += 1;
                    }
                    i = digits(s, i);
                }
                if integer {
                    let t = std::str::from_utf8(&s[start..end]).ok()?;
                    if t.parse::<i64>().is_err() && t.parse::<u64>().is_err() {
                        return Some(t);
                    }
                }
            }
            _ => i += 1,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The reference: what the value path accepts as a record.
    fn reference(line: &[u8]) -> Result<bool, ()> {
        match serde_object(line) {
            Ok(Value::Null) => Ok(false),
            Ok(_) => Ok(true),
            Err(_) => Err(()),
        }
    }

    fn agrees(line: &[u8]) {
        let ours = classify(line);
        let theirs = reference(line);
        match ours {
            Line::Object => assert_eq!(theirs, Ok(true), "{:?}", String::from_utf8_lossy(line)),
            Line::Blank => assert_eq!(theirs, Ok(false), "{:?}", String::from_utf8_lossy(line)),
            Line::Doubt => {}
        }
    }

    #[test]
    fn common_records_are_recognised_without_serde() {
        for ok in [
            r#"{}"#,
            r#" {"a":1} "#,
            r#"{"id":1,"ts":1700000000000,"user":"user-1","url":"https://x/?a=1","amount":12.5,"tags":["t1","t2"],"n":null,"b":true,"c":false,"o":{"x":[]}}"#,
            r#"{"esc":"a\"b\\c\/d\b\f\n\r\t\u00e9\uD83D\uDE00"}"#,
            r#"{"neg":-0.5,"zero":0,"big":123456789012345678901234567890}"#,
            "{\"utf8\":\"caf\u{e9} \u{1F600}\"}",
        ] {
            // Surrogate pairs are left to serde_json; everything else is recognised.
            let want = if ok.contains("uD83D") {
                Line::Doubt
            } else {
                Line::Object
            };
            assert_eq!(classify(ok.as_bytes()), want, "{ok}");
            agrees(ok.as_bytes());
        }
        assert_eq!(classify(b"  \t "), Line::Blank);
        assert_eq!(classify(b""), Line::Blank);
    }

    #[test]
    fn anything_odd_is_doubted_and_serde_decides() {
        for bad in [
            r#"{"a":1"#,
            r#"{"a":1}}"#,
            r#"{"a":01}"#,
            r#"{"a":1.}"#,
            r#"{"a":.5}"#,
            r#"{"a":-}"#,
            r#"{"a":1e5}"#,
            r#"{"a":tru}"#,
            r#"{"a":"x\q"}"#,
            r#"{"a":"\u12"}"#,
            "{\"a\":\"tab\there\"}",
            r#"{a:1}"#,
            r#"{"a":1,}"#,
            r#"[1,2]"#,
            r#""str""#,
            r#"{"a":[1,]}"#,
            r#"{"a" 1}"#,
            r#"{"a":1} x"#,
        ] {
            assert_eq!(classify(bad.as_bytes()), Line::Doubt, "{bad}");
            agrees(bad.as_bytes());
        }
        let deep = format!("{{\"a\":{}1{}}}", "[".repeat(200), "]".repeat(200));
        assert_eq!(classify(deep.as_bytes()), Line::Doubt);
    }

    #[test]
    fn blocks_are_checked_line_by_line_and_blank_lines_dropped() {
        let mut b = b"{\"a\":1}\n\n  \n{\"b\":2}\r\n{\"c\":3}".to_vec();
        assert_eq!(check_block(&mut b, 10, 100).unwrap(), 3);
        assert_eq!(b, b"{\"a\":1}\n{\"b\":2}\n{\"c\":3}\n");

        let mut b = b"{\"a\":1}\n{\"a\":1e999}\n".to_vec();
        let e = check_block(&mut b, 7, 100).unwrap_err();
        assert_eq!(e.line, 8);
        assert!(e.message.contains("invalid JSON"), "{}", e.message);

        let mut b = b"{\"a\":1}\n[1]\n".to_vec();
        let e = check_block(&mut b, 1, 100).unwrap_err();
        assert_eq!(
            (e.line, e.message.as_str()),
            (2, "expected a JSON object, found an array")
        );

        let mut b = b"{\"a\":1}\n{\"a\":\"\xff\"}\n".to_vec();
        let e = check_block(&mut b, 1, 100).unwrap_err();
        assert_eq!(e.line, 2);

        // Found by the `ndjson` fuzz target: the UTF-8 check ran over the whole block first,
        // so a later line that is not UTF-8 was reported before an earlier bad line.
        let mut b = b"{\"a\":1}\n[1]\n{\"a\":\"\xc3\"}\n".to_vec();
        let e = check_block(&mut b, 1, 100).unwrap_err();
        assert_eq!(
            (e.line, e.message.as_str()),
            (2, "expected a JSON object, found an array")
        );
        let mut b = b"{\"a\":1}\n{\"a\":\"\xc3\"}\n[1]\n".to_vec();
        let e = check_block(&mut b, 1, 100).unwrap_err();
        assert_eq!(e.line, 2, "{}", e.message);

        let mut b = b"{\"a\":1}\n{\"long\":\"xxxxxxxxxxxxxxxxxxxx\"}\n".to_vec();
        let e = check_block(&mut b, 1, 20).unwrap_err();
        assert_eq!(e.line, 2);
        assert_eq!(e.message, "line longer than max_line_bytes (20)");

        let mut b = b"{\"a\":1}\n{\"b\":2}\n".to_vec();
        let before = b.clone();
        assert_eq!(check_block(&mut b, 1, 100).unwrap(), 2);
        assert_eq!(b, before, "a clean block is passed on untouched");
    }

    #[test]
    fn integers_outside_64_bits_are_refused_on_the_value_path_only() {
        for (line, ok) in [
            (
                r#"{"n":18446744073709551615,"m":-9223372036854775808}"#,
                true,
            ),
            (r#"{"n":18446744073709551616}"#, false),
            (r#"{"n":-9223372036854775809}"#, false),
            (r#"{"a":[1,{"b":123456789012345678901234567890}]}"#, false),
            // Floats, and digits in strings, are what they say.
            (
                r#"{"f":1.8446744073709552e19,"g":18446744073709551616.0}"#,
                true,
            ),
            (r#"{"s":"18446744073709551616","f":1e19}"#, true),
            (r#"{"18446744073709551616":1e30}"#, true),
        ] {
            assert_eq!(parse_object(line.as_bytes()).is_ok(), ok, "{line}");
            // The byte path keeps the bytes: serde_json's own verdict, no range check.
            assert!(serde_object(line.as_bytes()).is_ok(), "{line}");
            let mut b = format!("{line}\n").into_bytes();
            assert_eq!(check_block(&mut b, 1, 1000).unwrap(), 1, "{line}");
        }
        let e = parse_object(br#"{"n":18446744073709551616}"#).unwrap_err();
        assert_eq!(
            e,
            "integer 18446744073709551616 is out of the 64-bit range (it would lose digits)"
        );
        let long = format!("{{\"n\":{}}}", "9".repeat(100));
        let e = parse_object(long.as_bytes()).unwrap_err();
        assert!(
            e.starts_with(&format!("integer {}…", "9".repeat(40))),
            "{e}"
        );
        // Beyond f64 serde_json refuses, on both paths.
        assert!(parse_object(br#"{"n":1e400}"#)
            .unwrap_err()
            .contains("number out of range"));
    }

    /// JSON-ish text: valid documents, then mutated by a byte or two.
    fn jsonish() -> impl Strategy<Value = Vec<u8>> {
        let leaf = prop_oneof![
            Just("null".to_string()),
            Just("true".to_string()),
            any::<i64>().prop_map(|i| i.to_string()),
            any::<f64>().prop_map(|f| serde_json::json!(f).to_string()),
            "[a-z\\\\\"\u{e9}\u{1F600} \t]{0,8}".prop_map(|s| serde_json::json!(s).to_string()),
        ];
        let value = leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|v| format!("[{}]", v.join(","))),
                prop::collection::vec(("[a-z]{0,3}", inner), 0..4).prop_map(|kv| {
                    let fields: Vec<String> = kv
                        .iter()
                        .map(|(k, v)| format!("{}:{v}", serde_json::json!(k)))
                        .collect();
                    format!("{{{}}}", fields.join(","))
                }),
            ]
        });
        let object = prop::collection::vec(("[a-z]{1,3}", value), 0..5).prop_map(|kv| {
            let fields: Vec<String> = kv
                .iter()
                .map(|(k, v)| format!("{} : {v}", serde_json::json!(k)))
                .collect();
            format!(" {{{}}} ", fields.join(" ,"))
        });
        (
            object,
            prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
        )
            .prop_map(|(text, edits)| {
                let mut b = text.into_bytes();
                for (at, byte) in edits {
                    let i = at.index(b.len());
                    if byte % 3 == 0 {
                        b.remove(i);
                    } else {
                        b[i] = byte % 128;
                    }
                }
                b
            })
    }

    proptest! {
        #[test]
        fn newlines_are_where_memchr_finds_them(
            data in prop::collection::vec(prop_oneof![Just(b'\n'), Just(b'a'), any::<u8>()], 0..300),
        ) {
            let ours: Vec<usize> = Newlines::new(&data).collect();
            let theirs: Vec<usize> = memchr::memchr_iter(b'\n', &data).collect();
            prop_assert_eq!(ours, theirs);
        }
    }

    /// Records the top-level fields a line reports.
    #[derive(Default)]
    struct Fields(Vec<((usize, usize), (usize, usize))>);

    impl Visit for Fields {
        fn field(&mut self, key: (usize, usize), value: (usize, usize)) {
            self.0.push((key, value));
        }
    }

    /// The (key, value) spans of the top-level fields of `line`, which must be recognised as
    /// an object.
    fn fields_of(line: &[u8]) -> Vec<((usize, usize), (usize, usize))> {
        let mut f = Fields::default();
        assert_eq!(
            classify_with(line, &mut f),
            Line::Object,
            "{}",
            String::from_utf8_lossy(line)
        );
        f.0
    }

    /// The inline string check reads sixteen bytes, or the line's last sixteen shifted: a
    /// string's end is found, with its field's span, at every distance from the line's end and
    /// for lines shorter than sixteen bytes; a special byte anywhere in it is never missed.
    #[test]
    fn strings_are_found_at_every_distance_from_the_end_of_the_line() {
        for pad in 0..20 {
            for len in 0..40 {
                let text = "x".repeat(len);
                let line = format!("{{\"{}\":\"{text}\"}}", "k".repeat(pad + 1));
                let value = (pad + 5, line.len() - 1);
                assert_eq!(
                    fields_of(line.as_bytes()),
                    vec![((2, pad + 3), value)],
                    "{line}"
                );
                assert_eq!(&line[value.0..value.1], format!("\"{text}\""));
                for at in 0..len {
                    for special in [b'"', b'\\', 0x01, b'\n'] {
                        let mut bad = line.clone().into_bytes();
                        bad[value.0 + 1 + at] = special;
                        agrees(&bad);
                        if special != b'\\' {
                            assert_eq!(classify(&bad), Line::Doubt, "{:?}", bad);
                        }
                    }
                }
                // An escape in the string goes the long way and still ends where it should.
                if len >= 2 {
                    let mut esc = line.clone().into_bytes();
                    esc[value.0 + 1 + len - 2] = b'\\';
                    esc[value.0 + 1 + len - 1] = b'n';
                    assert_eq!(fields_of(&esc), vec![((2, pad + 3), value)]);
                }
            }
        }
    }

    /// Nested values are read to their closing bracket, whatever they hold; only top-level
    /// fields are reported; nesting is recognised up to [`MAX_DEPTH`] open brackets.
    #[test]
    fn nested_values_are_read_to_their_closing_bracket() {
        let line = r#"{"a":[],"b":{},"c":[{}],"d":{"a":{"a":[1,"x",true,null,-0.5]}}, "e" : [ 1 , { "k" : "v" } ] ,"f":"}"}"#;
        let fields: Vec<(&str, &str)> = fields_of(line.as_bytes())
            .into_iter()
            .map(|((k0, k1), (v0, v1))| (&line[k0..k1], &line[v0..v1]))
            .collect();
        assert_eq!(
            fields,
            [
                ("a", "[]"),
                ("b", "{}"),
                ("c", "[{}]"),
                ("d", r#"{"a":{"a":[1,"x",true,null,-0.5]}}"#),
                ("e", r#"[ 1 , { "k" : "v" } ]"#),
                ("f", r#""}""#),
            ]
        );
        for bad in [
            r#"{"a":[1,]}"#,
            r#"{"a":{"b":1,}}"#,
            r#"{"a":{"b"}}"#,
            r#"{"a":[1}"#,
            r#"{"a":{"b":1]}"#,
            r#"{"a":[[1]}"#,
            r#"{"a":{1:2}}"#,
        ] {
            assert_eq!(classify(bad.as_bytes()), Line::Doubt, "{bad}");
            agrees(bad.as_bytes());
        }
        // The top-level object is one of the open brackets.
        for (inner, want) in [(MAX_DEPTH - 1, Line::Object), (MAX_DEPTH, Line::Doubt)] {
            let line = format!("{{\"a\":{}{}}}", "[".repeat(inner), "]".repeat(inner));
            assert_eq!(classify(line.as_bytes()), want, "{inner} arrays inside");
            agrees(line.as_bytes());
        }
    }

    /// Numbers of every length at every distance from the end, and the SWAR digit test on
    /// every byte value.
    #[test]
    fn numbers_end_at_their_last_digit() {
        for b in 0..=255u8 {
            let x = u64::from_le_bytes([b'5', b'5', b, b'5', b'5', b'5', b'5', b'5']);
            let want = if b.is_ascii_digit() { 0 } else { 0x80 << 16 };
            assert_eq!(non_digits(x), want, "byte {b:#x}");
        }
        for pad in 0..12 {
            for len in 1..30 {
                let digits: String = (0..len).map(|k| char::from(b'1' + (k % 9) as u8)).collect();
                for number in [digits.clone(), format!("-{digits}"), format!("{digits}.25")] {
                    let line = format!("{{\"{}\":{number},\"b\":1}}", "k".repeat(pad + 1));
                    let (v0, v1) = fields_of(line.as_bytes())[0].1;
                    assert_eq!(&line[v0..v1], number, "{line}");
                }
            }
        }
    }

    #[test]
    fn plain_runs_stop_at_the_first_special_byte() {
        for special in [b'"', b'\\', 0u8, 0x1f, b'\n'] {
            for at in 0..20 {
                let mut s = vec![b'a'; 20];
                s[at] = special;
                if at + 1 < 20 {
                    s[at + 1] = b'"';
                }
                assert_eq!(plain_run(&s), at, "{special:#x} at {at}");
            }
        }
        assert_eq!(plain_run(b"abc\xc3\xa9 \x7f~ xyzxyzxyzxyz"), 21);
        // Every position in a long run, for the sixteen- and eight-byte steps and the tail.
        for len in 0..70 {
            for at in 0..len {
                for special in [b'"', b'\\', 0x01, 0x1f] {
                    let mut s: Vec<u8> = (0..len)
                        .map(|k| 0x20 + (k as u8).wrapping_mul(7) % 0x5f)
                        .collect();
                    for b in s.iter_mut() {
                        if *b == b'"' || *b == b'\\' {
                            *b = b'a';
                        }
                    }
                    s[at] = special;
                    assert_eq!(plain_run(&s), at, "len {len}, {special:#x} at {at}");
                }
            }
            let s = vec![0xe9u8; len];
            assert_eq!(plain_run(&s), len);
        }
        assert_eq!(plain_run(b""), 0);
    }

    /// The generator is not vacuous: many of its lines are objects the fast path recognises,
    /// and many are broken.
    #[test]
    fn the_generator_makes_both_kinds_of_line() {
        use proptest::strategy::ValueTree;
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let (mut objects, mut broken) = (0, 0);
        for _ in 0..1000 {
            let line = jsonish().new_tree(&mut runner).unwrap().current();
            match classify(&line) {
                Line::Object => objects += 1,
                _ if reference(&line).is_err() => broken += 1,
                _ => {}
            }
        }
        assert!(
            objects > 200 && broken > 200,
            "{objects} objects, {broken} broken"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]
        #[test]
        fn never_accepts_what_serde_rejects(line in jsonish()) {
            if std::str::from_utf8(&line).is_ok() {
                agrees(&line);
            }
        }

        #[test]
        fn never_accepts_random_bytes_serde_rejects(line in prop::collection::vec(any::<u8>(), 0..40)) {
            if std::str::from_utf8(&line).is_ok() {
                agrees(&line);
            }
        }
    }
}
