//! An example native millrace plugin: `upper` upper-cases a string field.
//!
//! It is written twice, to show both kinds of node: by default (`abi = "lines"`) as a
//! [`LineNode`], which reads each record's NDJSON bytes in place and copies them to its output
//! with only the field's string changed (no `Value` is built: an ASCII string is upper-cased
//! byte by byte, anything else through `serde_json` for that one string); with
//! `abi = "values"` as a [`Node`] over `serde_json::Value`s, as ABI 1 plugins are written.
//! Both emit the same records (the byte path keeps the record's key order and spacing; the
//! value path re-serialises them).

use millrace_plugin::log::{debug, error, info, trace, warn};
use millrace_plugin::{export_plugin, AnyNode, LineNode, LineWriter, Lines, Node, Value};

fn chatter(n: usize) {
    trace!("{n} records (trace)");
    debug!("{n} records (debug)");
    info!("{n} records (info)");
    warn!("{n} records (warn)");
    error!("{n} records (error)");
}

/// The value path: records as `Value`s.
struct Upper {
    field: String,
    chatty: bool,
}

impl Node for Upper {
    fn process(&mut self, mut batch: Vec<Value>, out: &mut Vec<Value>) -> Result<(), String> {
        if self.chatty {
            chatter(batch.len());
        }
        for record in &mut batch {
            if let Some(Value::String(s)) = record.get_mut(&self.field) {
                *s = s.to_uppercase();
            }
        }
        out.append(&mut batch);
        Ok(())
    }
}

/// The line path: records as their NDJSON bytes.
struct UpperLines {
    /// The field's name as JSON text (`"name"`), to find it without decoding keys.
    key: Vec<u8>,
    field: String,
    chatty: bool,
}

impl LineNode for UpperLines {
    fn process(&mut self, batch: &Lines<'_>, out: &mut LineWriter<'_>) -> Result<(), String> {
        if self.chatty {
            chatter(batch.len());
        }
        for (i, record) in batch.iter().enumerate() {
            let span = json::string_member(record, &self.key, &self.field)
                .map_err(|e| format!("input record {}: {e}", i + 1))?;
            match span {
                None => out.push(record),
                Some((start, end)) => out.push_with(|buf| {
                    // The record copied at once, then the string upper-cased in place when it
                    // is plain ASCII (the usual case); otherwise copied in three pieces. The
                    // string is tested in the input, not in the copy: reading bytes just
                    // written stalls on store forwarding.
                    let inner = &record[start + 1..end - 1];
                    if inner.is_ascii() && !inner.contains(&b'\\') {
                        let base = buf.len();
                        buf.extend_from_slice(record);
                        buf[base + start + 1..base + end - 1].make_ascii_uppercase();
                        return Ok(());
                    }
                    buf.extend_from_slice(&record[..start]);
                    json::upper_string(&record[start..end], buf)?;
                    buf.extend_from_slice(&record[end..]);
                    Ok::<(), String>(())
                })?,
            }
        }
        Ok(())
    }
}

/// Just enough JSON to find one top-level member of an object without parsing the rest (the
/// host hands over only valid JSON objects; anything unexpected is an error, not a guess).
mod json {
    use millrace_plugin::serde_json;

    type Scan<T> = Result<T, &'static str>;

    #[inline]
    fn ws(s: &[u8], mut i: usize) -> usize {
        while i < s.len() && matches!(s[i], b' ' | b'\t' | b'\n' | b'\r') {
            i += 1;
        }
        i
    }

    /// The end of the string starting at `s[i] == '"'` (after its closing quote): eight bytes
    /// at a time to the next quote or backslash, then byte by byte.
    #[inline]
    fn string_end(s: &[u8], mut i: usize) -> Scan<usize> {
        const ONES: u64 = 0x0101_0101_0101_0101;
        const HIGHS: u64 = 0x8080_8080_8080_8080;
        // The high bit of each byte of `x` equal to `b`; the lowest one is exact.
        let equal = |x: u64, b: u8| {
            let v = x ^ (ONES * u64::from(b));
            v.wrapping_sub(ONES) & !v & HIGHS
        };
        i += 1;
        loop {
            while let Some(word) = s.get(i..i + 8) {
                let x = u64::from_le_bytes(word.try_into().expect("eight bytes"));
                let special = equal(x, b'"') | equal(x, b'\\');
                if special != 0 {
                    i += (special.trailing_zeros() / 8) as usize;
                    break;
                }
                i += 8;
            }
            match s.get(i) {
                Some(b'"') => return Ok(i + 1),
                Some(b'\\') => i += 2,
                Some(_) => i += 1,
                None => return Err("unterminated string"),
            }
        }
    }

    /// The end of the value starting at `s[i]`.
    #[inline]
    fn value_end(s: &[u8], i: usize) -> Scan<usize> {
        match s.get(i) {
            Some(b'"') => string_end(s, i),
            Some(b'{' | b'[') => {
                let mut depth = 0usize;
                let mut j = i;
                while j < s.len() {
                    match s[j] {
                        b'"' => {
                            j = string_end(s, j)?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                return Ok(j + 1);
                            }
                        }
                        _ => {}
                    }
                    j += 1;
                }
                Err("unterminated value")
            }
            Some(_) => {
                let mut j = i + 1;
                while j < s.len() && !matches!(s[j], b',' | b'}' | b']' | b' ' | b'\t' | b'\r') {
                    j += 1;
                }
                Ok(j)
            }
            None => Err("missing value"),
        }
    }

    /// Whether the key `k` (JSON text, with its quotes) is `field`, whose JSON text is `key`.
    #[inline]
    fn is_key(k: &[u8], key: &[u8], field: &str) -> bool {
        if k == key {
            return true;
        }
        // A key with escapes is compared decoded.
        k.contains(&b'\\') && serde_json::from_slice::<String>(k).is_ok_and(|k| k == field)
    }

    /// The byte range of the string value (with its quotes) of the last top-level member
    /// named `field` (`key` is its JSON text, `"field"`), if it is a string.
    pub(super) fn string_member(s: &[u8], key: &[u8], field: &str) -> Scan<Option<(usize, usize)>> {
        let mut i = ws(s, 0);
        if s.get(i) != Some(&b'{') {
            return Err("not a JSON object");
        }
        let mut found = None;
        i = ws(s, i + 1);
        if s.get(i) == Some(&b'}') {
            return Ok(None);
        }
        loop {
            if s.get(i) != Some(&b'"') {
                return Err("expected a key");
            }
            let k_end = string_end(s, i)?;
            let is_field = is_key(&s[i..k_end], key, field);
            i = ws(s, k_end);
            if s.get(i) != Some(&b':') {
                return Err("expected `:`");
            }
            i = ws(s, i + 1);
            let v_end = value_end(s, i)?;
            if is_field {
                found = (s[i] == b'"').then_some((i, v_end));
            }
            i = ws(s, v_end);
            match s.get(i) {
                Some(b',') => i = ws(s, i + 1),
                Some(b'}') => return Ok(found),
                _ => return Err("expected `,` or `}`"),
            }
        }
    }

    /// Appends the JSON string `quoted` upper-cased (as `str::to_uppercase` does).
    #[inline]
    pub(super) fn upper_string(quoted: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        let inner = &quoted[1..quoted.len() - 1];
        if inner.is_ascii() && !inner.contains(&b'\\') {
            let start = out.len();
            out.extend_from_slice(quoted);
            out[start..].make_ascii_uppercase();
            return Ok(());
        }
        let s: String = serde_json::from_slice(quoted).map_err(|e| e.to_string())?;
        serde_json::to_writer(out, &s.to_uppercase()).map_err(|e| e.to_string())
    }
}

fn create(node: &str, params: &Value) -> Result<AnyNode, String> {
    let field = params["field"].as_str().unwrap_or_default().to_string();
    let chatty = params["chatty"].as_bool().unwrap_or(false);
    match (node, params["abi"].as_str().unwrap_or("lines")) {
        ("upper", "values") => Ok(AnyNode::values(Upper { field, chatty })),
        ("upper", _) => Ok(AnyNode::lines(UpperLines {
            key: millrace_plugin::serde_json::to_vec(&field).map_err(|e| e.to_string())?,
            field,
            chatty,
        })),
        (other, _) => Err(format!("casefold has no node `{other}`")),
    }
}

export_plugin!(name = "casefold", engine = ">=0.1, <0.2", create = create);
