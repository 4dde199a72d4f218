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

use crate::config::parse_object;
use serde_json::Value;

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

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// Classifies one line (UTF-8 is the caller's to check).
pub(crate) fn classify(line: &[u8]) -> Line {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Line::Blank;
    }
    let mut p = Parser { s: line, i: 0 };
    p.ws();
    if p.peek() != Some(b'{') {
        return Line::Doubt;
    }
    match p.value(0) {
        Some(()) => {
            p.ws();
            if p.i == line.len() {
                Line::Object
            } else {
                Line::Doubt
            }
        }
        None => Line::Doubt,
    }
}

/// A recursive-descent recogniser; `None` means "not sure" (never "valid" by mistake).
struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    #[inline]
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    #[inline]
    fn ws(&mut self) {
        while self.i < self.s.len() && is_ws(self.s[self.i]) {
            self.i += 1;
        }
    }

    #[inline]
    fn eat(&mut self, b: u8) -> Option<()> {
        if self.peek() == Some(b) {
            self.i += 1;
            Some(())
        } else {
            None
        }
    }

    fn value(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        match self.peek()? {
            b'{' => {
                self.i += 1;
                self.ws();
                if self.eat(b'}').is_some() {
                    return Some(());
                }
                loop {
                    self.ws();
                    self.string()?;
                    self.ws();
                    self.eat(b':')?;
                    self.ws();
                    self.value(depth + 1)?;
                    self.ws();
                    match self.peek()? {
                        b',' => self.i += 1,
                        b'}' => {
                            self.i += 1;
                            return Some(());
                        }
                        _ => return None,
                    }
                }
            }
            b'[' => {
                self.i += 1;
                self.ws();
                if self.eat(b']').is_some() {
                    return Some(());
                }
                loop {
                    self.ws();
                    self.value(depth + 1)?;
                    self.ws();
                    match self.peek()? {
                        b',' => self.i += 1,
                        b']' => {
                            self.i += 1;
                            return Some(());
                        }
                        _ => return None,
                    }
                }
            }
            b'"' => self.string(),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        if self.s[self.i..].starts_with(word) {
            self.i += word.len();
            Some(())
        } else {
            None
        }
    }

    fn string(&mut self) -> Option<()> {
        self.eat(b'"')?;
        loop {
            let rest = &self.s[self.i..];
            let plain = rest
                .iter()
                .position(|&b| !STRING_PLAIN[b as usize])
                .unwrap_or(rest.len());
            self.i += plain;
            match self.peek()? {
                b'"' => {
                    self.i += 1;
                    return Some(());
                }
                b'\\' => {
                    self.i += 1;
                    match self.peek()? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.i += 1,
                        b'u' => {
                            let hex = self.s.get(self.i + 1..self.i + 5)?;
                            if !hex.iter().all(u8::is_ascii_hexdigit) {
                                return None;
                            }
                            // Surrogates must pair up: leave that to serde_json.
                            if matches!(hex[0], b'd' | b'D') && !matches!(hex[1], b'0'..=b'7') {
                                return None;
                            }
                            self.i += 5;
                        }
                        _ => return None,
                    }
                }
                _ => return None, // a control character
            }
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
            self.i += 1;
        }
        self.i - start
    }

    fn number(&mut self) -> Option<()> {
        let _ = self.eat(b'-');
        match self.peek()? {
            b'0' => self.i += 1,
            b'1'..=b'9' => {
                if self.digits() > MAX_DIGITS {
                    return None;
                }
            }
            _ => return None,
        }
        if self.eat(b'.').is_some() {
            let n = self.digits();
            if n == 0 || n > MAX_DIGITS {
                return None;
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            return None; // exponents can overflow: serde_json decides
        }
        Some(())
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
/// line is longer than `max_line` bytes. Returns the number of records.
pub(crate) fn check_block(
    data: &mut Vec<u8>,
    first_line: u64,
    max_line: usize,
) -> Result<u64, BadLine> {
    if let Err(e) = std::str::from_utf8(data) {
        let at = e.valid_up_to();
        let line = first_line + memchr::memchr_iter(b'\n', &data[..at]).count() as u64;
        let start = memchr::memrchr(b'\n', &data[..at]).map_or(0, |i| i + 1);
        let end = memchr::memchr(b'\n', &data[at..]).map_or(data.len(), |i| at + i);
        let message = match parse_object(&data[start..end]) {
            Err(m) => m,
            Ok(_) => "invalid UTF-8".to_string(),
        };
        return Err(BadLine { line, message });
    }
    let mut records = 0u64;
    let mut compact = false;
    let mut line_no = first_line;
    let mut start = 0;
    while start < data.len() {
        let end = memchr::memchr(b'\n', &data[start..]).map_or(data.len(), |i| start + i);
        let line = &data[start..end];
        if line.len() > max_line {
            return Err(BadLine {
                line: line_no,
                message: format!("line longer than {max_line} bytes"),
            });
        }
        let verdict = match classify(line) {
            Line::Doubt => match parse_object(line) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The reference: what the value path accepts as a record.
    fn reference(line: &[u8]) -> Result<bool, ()> {
        match parse_object(line) {
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

        let mut b = b"{\"a\":1}\n{\"long\":\"xxxxxxxxxxxxxxxxxxxx\"}\n".to_vec();
        let e = check_block(&mut b, 1, 20).unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("longer than 20 bytes"));

        let mut b = b"{\"a\":1}\n{\"b\":2}\n".to_vec();
        let before = b.clone();
        assert_eq!(check_block(&mut b, 1, 100).unwrap(), 2);
        assert_eq!(b, before, "a clean block is passed on untouched");
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
