//! The projected byte path: `ndjson.read → filter / select … → ndjson.write` without building
//! a `serde_json::Value` per record. It owns the scanner that finds a line's top-level fields
//! in its raw bytes, the evaluation of `filter` and `select` on those bytes, the writing of the
//! result as the value path would print it, and the accounts of those stages.
//!
//! # Same output as the value path, byte for byte
//!
//! The value path parses each line into a `Value` (objects keep their keys sorted, the last of
//! two equal keys wins), applies each stage, and prints the result with `serde_json`. This path
//! prints the same bytes:
//!
//! - One walk over the line both checks it as `ndjson.read` does (`ndjson::classify_with`, the
//!   same recogniser the exec byte path uses, with UTF-8 and the length cap checked first) and
//!   records each top-level key and the byte span of its value. Nested objects and arrays are
//!   checked but never parsed, unless a stage outputs them.
//! - A `filter` looks up its field (the last of equal keys) and compares the raw value: a string
//!   without escapes is compared as bytes, anything else is parsed alone (a small value) and
//!   compared with the value path's own function.
//! - The output is written field by field, in sorted key order, one field per key. A value is
//!   copied when its bytes are what `serde_json` would print (a string without a backslash, an
//!   integer of up to 18 digits not starting with `-0`, `true`, `false`, `null`); any other
//!   value (floats, escapes, objects, arrays) is parsed alone and printed by `serde_json`.
//! - Anything the walk is unsure of sends the line down the value path, whole: what the check
//!   leaves to `serde_json` (an exponent, a surrogate escape, deep nesting, a line that is not
//!   an object), a key with a backslash (its decoded form could be a field's name), an integer
//!   of 19 digits or more anywhere in the line (the value path refuses those outside 64 bits),
//!   a stage that fails on the record (its error message shows the record). That path is the
//!   value path's code, so errors, dead letters and counts are the same.
//!
//! A property test (`tests::the_fast_path_prints_what_the_value_path_prints`) holds the fast
//! path to the value path's output on random and adversarial records, and `tests/projected.rs`
//! compares whole runs of both paths (output, accounts, errors and their line numbers).
//!
//! # Parallelism
//!
//! With `parallelism = N` on the `ndjson.read`, the file is read by N readers, each over a
//! byte range of it cut at line boundaries (`source::ranges`), each running the stages on its
//! own lines; one writer writes their blocks. Output lines then interleave by block, as the
//! value path's parallel stages interleave them.

use std::sync::Arc;

use serde_json::Value;

use super::kinds::{self, FilterOp, SelectMissing};
use super::live_map::MapLogic;
use crate::dead_letter::OnError;
use crate::metrics::{InstanceMetrics, Shape};
use crate::operator::{Chain, Emit, Halt, Local, StepCounts, StepInfo};
use crate::runtime::{Cx, Head, Pull};
use crate::source::{Chunk, NdjsonBlockHead};

/// One stage of the projected path: the logic of a `filter` or `select` (never `words`).
pub(crate) type ProjectOp = MapLogic;

/// Whether this path can run the stage exactly as the value path does: `filter` and `select`,
/// but not a `select` that names a field twice with `missing = "null"`, which sets it to null
/// the second time (an oddity left to the value path), nor `words`.
pub(crate) fn projectable(op: &ProjectOp) -> bool {
    match op {
        MapLogic::Filter { .. } => true,
        MapLogic::Select { fields, missing } => {
            let mut sorted = fields.clone();
            sorted.sort();
            sorted.dedup();
            sorted.len() == fields.len() || *missing != SelectMissing::Null
        }
        MapLogic::Words { .. } => false,
    }
}

/// A stage of the path with its name, policy and counts.
struct Op {
    name: Arc<str>,
    policy: Arc<OnError>,
    counts: Arc<StepCounts>,
    local: Local,
    logic: ProjectOp,
    /// A `select`'s fields sorted and deduplicated, each with `"name":` as `serde_json` prints
    /// it (empty for a `filter`).
    sorted: Vec<(String, Vec<u8>)>,
}

/// A field of the record being projected: its key and value, as spans of the line or as names
/// of a `select`.
#[derive(Debug, Clone, Copy)]
struct Field {
    key: Key,
    val: Val,
}

#[derive(Debug, Clone, Copy)]
enum Key {
    /// `line[a..b]`: the key's bytes inside its quotes (no backslash in them).
    Raw(usize, usize),
    /// Field `f` of the `sorted` list of op `op` (a `select`).
    Named(usize, usize),
}

#[derive(Debug, Clone, Copy)]
enum Val {
    /// `line[a..b]`: the value's bytes.
    Raw(usize, usize),
    /// `null`, set by `select` with `missing = "null"`.
    Null,
}

/// The head of the projected path: one part of the file (or the whole file), its lines checked
/// as `ndjson.read` checks them, then each stage applied on the raw bytes. Its blocks hold the
/// output lines.
pub(crate) struct ProjectHead {
    inner: NdjsonBlockHead,
    proj: Projector,
    pulled: Vec<Chunk>,
}

/// The stages of the path on one line's bytes.
struct Projector {
    ops: Vec<Op>,
    /// The current record's fields (reused).
    fields: Vec<Field>,
    scratch: Vec<Field>,
}

/// The counts of one stage of the path, shared by the head (which counts) and the marker step
/// (which shows them in the report).
pub(crate) struct OpCounts {
    pub name: Arc<str>,
    pub policy: Arc<OnError>,
    pub counts: Arc<StepCounts>,
    pub op: ProjectOp,
}

impl ProjectHead {
    pub(crate) fn new(inner: NdjsonBlockHead, ops: &[OpCounts]) -> Self {
        ProjectHead {
            inner,
            proj: Projector::new(ops),
            pulled: Vec::new(),
        }
    }

    /// Checks each line of the block `c` as `ndjson.read` does (UTF-8, the length cap, one
    /// JSON object or blank) and projects it into `out`; counts into `n`.
    fn project(
        &mut self,
        cx: &Cx,
        c: &Chunk,
        out: &mut Vec<u8>,
        n: &mut Lines,
    ) -> Result<(), Halt> {
        let max_line = self.inner.max_line();
        // Most blocks are valid UTF-8 as a whole: only a block that is not is checked by line.
        let utf8 = std::str::from_utf8(&c.data).is_ok();
        let data = c.data.strip_suffix(b"\n").unwrap_or(&c.data);
        // The lines, found with memchr (a slice's `split` looks at one byte at a time).
        let mut start = 0;
        let ends = memchr::memchr_iter(b'\n', data).chain(std::iter::once(data.len()));
        let lines = ends.map(|end| {
            let line = &data[start..end];
            start = end + 1;
            line
        });
        for (rel, raw) in (c.first_line..).zip(lines) {
            let line = raw.strip_suffix(b"\r").unwrap_or(raw);
            let bad = if !utf8 && std::str::from_utf8(raw).is_err() {
                Some(if line.len() > max_line {
                    crate::ndjson::line_too_long(max_line)
                } else {
                    crate::ndjson::serde_object(raw)
                        .err()
                        .unwrap_or_else(|| "invalid UTF-8".to_string())
                })
            } else if line.len() > max_line {
                Some(crate::ndjson::line_too_long(max_line))
            } else {
                None
            };
            if let Some(message) = bad {
                self.inner.reject(cx, message, line, c.line_number(rel))?;
                n.rejected += 1;
                continue;
            }
            let mark = out.len();
            let end = match self.proj.fast(line, out) {
                Fast::Unsure => {
                    out.truncate(mark);
                    self.slow(cx, c, rel, line, out)?
                }
                done => done,
            };
            match end {
                Fast::Out => {
                    n.records += 1;
                    n.out += 1;
                }
                Fast::Dropped => n.records += 1,
                Fast::Blank => n.blank += 1,
                Fast::Rejected => n.rejected += 1,
                Fast::Unsure => unreachable!("the value path decides"),
            }
        }
        Ok(())
    }
}

/// Keeps the one record a step emitted.
struct One(Option<Value>);

impl Emit<Value> for One {
    fn emit(&mut self, rec: Value) -> Result<(), Halt> {
        self.0 = Some(rec);
        Ok(())
    }
}

/// What became of one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fast {
    /// Written to the output.
    Out,
    /// Dropped by a stage (filtered, skipped or dead-lettered there; counted).
    Dropped,
    /// Blank: not a record.
    Blank,
    /// Refused by the source (counted by its policy).
    Rejected,
    /// The fast path is unsure: nothing counted, the value path decides.
    Unsure,
}

/// A block's lines by what became of them.
#[derive(Debug, Default)]
struct Lines {
    /// Records the source passed on (not blank, not refused).
    records: u64,
    /// Records written.
    out: u64,
    blank: u64,
    /// Lines the source refused (by its policy): not records read.
    rejected: u64,
}

/// The top-level fields of a line, gathered while it is checked (see `ndjson::Visit`).
struct Spans<'a> {
    line: &'a [u8],
    fields: &'a mut Vec<Field>,
    unsure: bool,
}

impl crate::ndjson::Visit for Spans<'_> {
    const LONG_INTEGERS: bool = true;

    #[inline(always)]
    fn field(&mut self, (k0, k1): (usize, usize), (v0, v1): (usize, usize)) {
        // An escaped key may decode to a field's name.
        self.unsure |= memchr::memchr(b'\\', &self.line[k0..k1]).is_some();
        self.fields.push(Field {
            key: Key::Raw(k0, k1),
            val: Val::Raw(v0, v1),
        });
    }

    #[inline(always)]
    fn long_integer(&mut self) {
        self.unsure = true;
    }
}

impl Projector {
    fn new(ops: &[OpCounts]) -> Self {
        let ops = ops
            .iter()
            .map(|o| Op {
                name: Arc::clone(&o.name),
                policy: Arc::clone(&o.policy),
                counts: Arc::clone(&o.counts),
                local: Local::default(),
                logic: o.op.clone(),
                sorted: match &o.op {
                    MapLogic::Select { fields, .. } => {
                        let mut sorted: Vec<String> = fields.clone();
                        sorted.sort();
                        sorted.dedup();
                        sorted
                            .into_iter()
                            .map(|f| {
                                let mut k = serde_json::to_vec(&f).expect("a string prints");
                                k.push(b':');
                                (f, k)
                            })
                            .collect()
                    }
                    _ => Vec::new(),
                },
            })
            .collect();
        Projector {
            ops,
            fields: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// The line (without its newline) checked and taken through every stage on its bytes:
    /// [`Fast::Out`] with its output line written, [`Fast::Dropped`] when a filter dropped it
    /// (counted), [`Fast::Blank`], or [`Fast::Unsure`] (nothing counted: the value path
    /// decides, and says what is wrong with a line that is not a JSON object).
    #[inline]
    fn fast(&mut self, line: &[u8], out: &mut Vec<u8>) -> Fast {
        self.fields.clear();
        let mut spans = Spans {
            line,
            fields: &mut self.fields,
            unsure: false,
        };
        match crate::ndjson::classify_with(line, &mut spans) {
            crate::ndjson::Line::Object if !spans.unsure => {}
            crate::ndjson::Line::Blank => return Fast::Blank,
            _ => return Fast::Unsure,
        }
        self.project_fields(line, out).unwrap_or(Fast::Unsure)
    }

    /// The stages on the fields of a valid line, and its output.
    #[inline]
    fn project_fields(&mut self, line: &[u8], out: &mut Vec<u8>) -> Option<Fast> {
        let mut selected = false;
        for i in 0..self.ops.len() {
            match &self.ops[i].logic {
                MapLogic::Filter { field, op, value } => {
                    let got = lookup(line, &self.ops, &self.fields, field.as_bytes());
                    if !filter_raw(line, got, field, *op, value)? {
                        self.ops[i].local.filtered += 1;
                        return Some(Fast::Dropped);
                    }
                }
                MapLogic::Select { missing, .. } => {
                    self.scratch.clear();
                    for (f, (name, _)) in self.ops[i].sorted.iter().enumerate() {
                        let val = match lookup(line, &self.ops, &self.fields, name.as_bytes()) {
                            Some(v) => v,
                            None => match missing {
                                SelectMissing::Omit => continue,
                                SelectMissing::Null => Val::Null,
                                // The error shows the record: the value path says it.
                                SelectMissing::Error => return None,
                            },
                        };
                        self.scratch.push(Field {
                            key: Key::Named(i, f),
                            val,
                        });
                    }
                    std::mem::swap(&mut self.fields, &mut self.scratch);
                    selected = true;
                }
                MapLogic::Words { .. } => unreachable!("not projectable"),
            }
        }
        if !selected {
            // The whole record, as the value path prints it: sorted keys, the last of equal
            // keys (a stable sort keeps their order).
            self.fields.sort_by(|a, b| {
                key_bytes(line, &self.ops, a.key).cmp(key_bytes(line, &self.ops, b.key))
            });
            let fields = &mut self.fields;
            let mut w = 0;
            for r in 0..fields.len() {
                if w > 0
                    && key_bytes(line, &self.ops, fields[w - 1].key)
                        == key_bytes(line, &self.ops, fields[r].key)
                {
                    fields[w - 1] = fields[r];
                } else {
                    fields[w] = fields[r];
                    w += 1;
                }
            }
            fields.truncate(w);
        }
        out.push(b'{');
        for (n, f) in self.fields.iter().enumerate() {
            if n > 0 {
                out.push(b',');
            }
            match f.key {
                Key::Raw(a, b) => {
                    out.push(b'"');
                    out.extend_from_slice(&line[a..b]);
                    out.extend_from_slice(b"\":");
                }
                Key::Named(op, i) => out.extend_from_slice(&self.ops[op].sorted[i].1),
            }
            match f.val {
                Val::Null => out.extend_from_slice(b"null"),
                Val::Raw(a, b) => write_value(&line[a..b], out),
            }
        }
        out.extend_from_slice(b"}\n");
        Some(Fast::Out)
    }
}

impl ProjectHead {
    /// The line through the value path's code: parsed (a line it refuses meets the source's
    /// policy), each stage applied with its policy, printed by `serde_json`. The records out.
    #[cold]
    fn slow(
        &mut self,
        cx: &Cx,
        c: &Chunk,
        rel: u64,
        line: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Fast, Halt> {
        let mut rec = match crate::ndjson::parse_object(line) {
            Ok(Value::Null) => return Ok(Fast::Blank),
            Ok(v) => v,
            Err(message) => {
                self.inner.reject(cx, message, line, c.line_number(rel))?;
                return Ok(Fast::Rejected);
            }
        };
        for op in &mut self.proj.ops {
            // The value path's own step: what passes comes back in `one`.
            let mut one = One(None);
            super::live_map::apply(
                &op.logic,
                &op.name,
                &op.policy,
                &mut op.local,
                rec,
                &mut one,
            )?;
            match one.0 {
                Some(v) => rec = v,
                None => return Ok(Fast::Dropped),
            }
        }
        serde_json::to_writer(&mut *out, &rec).expect("a Value prints to a Vec");
        out.push(b'\n');
        Ok(Fast::Out)
    }

    /// Adds the stages' counts since the last call to their shared counts.
    fn flush_counts(&mut self) {
        use crate::sync::Ordering::Relaxed;
        for op in &mut self.proj.ops {
            let l = std::mem::take(&mut op.local);
            for (n, c) in [
                (l.filtered, &op.counts.filtered),
                (l.skipped, &op.counts.skipped),
                (l.dead_lettered, &op.counts.dead_lettered),
            ] {
                if n > 0 {
                    c.fetch_add(n, Relaxed);
                }
            }
        }
    }
}

impl Head<Chunk> for ProjectHead {
    fn counts_input(&self) -> bool {
        true
    }

    fn pull(&mut self, cx: &Cx, buf: &mut Vec<Chunk>, flush_at: Option<u64>) -> Result<Pull, Halt> {
        let mut pulled = std::mem::take(&mut self.pulled);
        let result = self.inner.pull_raw(cx, &mut pulled, flush_at);
        let mut made = 0u64;
        let mut n = Lines::default();
        for c in pulled.drain(..) {
            let mut data = Vec::with_capacity(c.data.len() / 2);
            let before = n.out;
            self.project(cx, &c, &mut data, &mut n)?;
            if n.out > before {
                made += 1;
                buf.push(Chunk {
                    first_line: c.first_line,
                    data,
                    records: n.out - before,
                    origin: c.origin.clone(),
                });
            }
        }
        let (checked, out_records, not_read) = (n.records, n.out, n.blank + n.rejected);
        self.pulled = pulled;
        self.flush_counts();
        // The chain after this head counts one record per block pushed, the channel one per
        // block sent: both count records (see `Chunk::records`).
        InstanceMetrics::add(&cx.metrics.chain_in, checked - made);
        InstanceMetrics::add(&cx.metrics.records_out, out_records - made);
        // Blank and refused lines are not records read (as on the value path).
        cx.metrics
            .records_in
            .fetch_sub(not_read, crate::sync::Ordering::Relaxed);
        result
    }

    fn state_support(&self) -> crate::checkpoint::StateSupport {
        self.inner.state_support()
    }
    fn snapshot(
        &mut self,
        cx: &Cx,
        state: &mut crate::checkpoint::state::InstanceState,
    ) -> Result<(), Halt> {
        self.inner.snapshot(cx, state)
    }
    fn restore(
        &mut self,
        cx: &Cx,
        state: &crate::checkpoint::state::InstanceState,
    ) -> Result<(), Halt> {
        self.inner.restore(cx, state)
    }
}

/// The bytes of a key.
#[inline]
fn key_bytes<'a>(line: &'a [u8], ops: &'a [Op], key: Key) -> &'a [u8] {
    match key {
        Key::Raw(a, b) => &line[a..b],
        Key::Named(op, i) => ops[op].sorted[i].0.as_bytes(),
    }
}

/// The value of the last field named `name`.
#[inline]
fn lookup(line: &[u8], ops: &[Op], fields: &[Field], name: &[u8]) -> Option<Val> {
    fields
        .iter()
        .rev()
        .find(|f| key_bytes(line, ops, f.key) == name)
        .map(|f| f.val)
}

/// `filter` on a raw value: `None` when the value path must decide (the record fails the
/// test, whose message shows the record).
#[inline]
fn filter_raw(
    line: &[u8],
    got: Option<Val>,
    field: &str,
    op: FilterOp,
    value: &Value,
) -> Option<bool> {
    let raw = match got {
        None => return kinds::filter_got(None, field, op, value).ok(),
        Some(Val::Null) => b"null".as_slice(),
        Some(Val::Raw(a, b)) => &line[a..b],
    };
    match (op, value) {
        (FilterOp::Exists, _) => Some(true),
        (FilterOp::Eq | FilterOp::Ne, Value::String(s))
            if raw[0] == b'"' && memchr::memchr(b'\\', raw).is_none() =>
        {
            Some((&raw[1..raw.len() - 1] == s.as_bytes()) == (op == FilterOp::Eq))
        }
        (FilterOp::Eq | FilterOp::Ne, Value::String(_)) if raw[0] != b'"' => {
            // Another type: never equal.
            Some(op == FilterOp::Ne)
        }
        _ => {
            let v: Value = serde_json::from_slice(raw).ok()?;
            kinds::filter_got(Some(&v), field, op, value).ok()
        }
    }
}

/// Writes a raw value as `serde_json` prints it.
#[inline]
fn write_value(raw: &[u8], out: &mut Vec<u8>) {
    let plain = match raw[0] {
        b'"' => memchr::memchr(b'\\', raw).is_none(),
        b't' | b'f' | b'n' => true,
        b'-' | b'0'..=b'9' => {
            let digits = raw.strip_prefix(b"-").unwrap_or(raw);
            digits.len() <= 18
                && digits.iter().all(u8::is_ascii_digit)
                && !(raw[0] == b'-' && digits[0] == b'0')
        }
        _ => false,
    };
    if plain {
        out.extend_from_slice(raw);
    } else {
        let v: Value = serde_json::from_slice(raw).expect("a checked line's value parses");
        serde_json::to_writer(&mut *out, &v).expect("a Value prints to a Vec");
    }
}

/// A stage of the projected path in the chain after its head: passes the head's blocks on and
/// shows the stage's counts (which the head keeps) in the report.
pub(crate) struct Counted<C> {
    prev: C,
    name: Arc<str>,
    shape: Shape,
    counts: Arc<StepCounts>,
}

impl<C: Clone> Clone for Counted<C> {
    fn clone(&self) -> Self {
        Counted {
            prev: self.prev.clone(),
            name: Arc::clone(&self.name),
            shape: self.shape,
            counts: Arc::clone(&self.counts),
        }
    }
}

impl<C> Counted<C> {
    pub(crate) fn new(prev: C, name: Arc<str>, shape: Shape, counts: Arc<StepCounts>) -> Self {
        Counted {
            prev,
            name,
            shape,
            counts,
        }
    }
}

impl<C> crate::operator::sealed::Sealed for Counted<C> {}

impl<In, C: Chain<In, Out = Chunk>> Chain<In> for Counted<C> {
    type Out = Chunk;
    crate::operator::forward_state!();

    fn begin_batch(&mut self, records: usize) {
        self.prev.begin_batch(records);
    }

    fn end_batch(&mut self) {
        self.prev.end_batch();
    }

    fn steps(&self, steps: &mut Vec<StepInfo>) {
        self.prev.steps(steps);
        steps.push(StepInfo {
            name: Arc::clone(&self.name),
            shape: self.shape,
            counts: Arc::clone(&self.counts),
            counted_in: false,
        });
    }

    #[inline]
    fn push<E: Emit<Chunk>>(&mut self, item: In, out: &mut E) -> Result<(), Halt> {
        self.prev.push(item, out)
    }

    fn names(&self, names: &mut Vec<Arc<str>>) {
        self.prev.names(names);
        names.push(Arc::clone(&self.name));
    }

    fn rename_last(&mut self, name: Arc<str>) -> bool {
        self.name = name;
        true
    }
}

/// Blocks read by the projected path (each part reads its range in blocks of this size).
const BLOCK_BYTES: usize = 256 * 1024;

/// Builds the projected path when the pipeline is exactly `ndjson.read → (filter | select)* →
/// ndjson.write` (to a file), linear, each stage read by the next only, the middle stages on
/// the source's parallelism, fixed (not reloadable), none `ordered`, and every dead-letter target an
/// `ndjson.write` to a file read by no stage. `None`: build the value path.
pub(super) fn build(
    spec: &super::parse::PipelineSpec,
    reloadable: bool,
) -> Option<crate::Pipeline> {
    // Order across readers is the value path's (`ordered = true`, `Stream::ordered`).
    if reloadable || spec.stages.iter().any(|s| s.ordered) {
        return None;
    }
    let line = super::build::StraightLine::of(spec, |source| source.parallelism)?;
    let parallelism = line.stages[0].parallelism;
    let mut ops = Vec::new();
    for m in line.middle() {
        let op = MapLogic::of(&m.params).filter(projectable)?;
        ops.push((m, op));
    }
    let p = crate::Pipeline::with_options(spec.options.clone());
    let handles = line.dead_letters(&p);
    let policy = |s| super::build::policy_of(s, &handles);
    let counts: Arc<Vec<OpCounts>> = Arc::new(
        ops.iter()
            .map(|(m, op)| OpCounts {
                name: Arc::from(m.name.as_str()),
                policy: Arc::new(policy(m)),
                counts: Arc::new(StepCounts::default()),
                op: op.clone(),
            })
            .collect(),
    );
    let source_policy = policy(line.stages[0]);
    // N readers over byte ranges of a regular file; one reader for stdin, a pipe, or a run
    // with checkpoints (a part cannot be replayed).
    let regular = std::fs::metadata(line.input).is_ok_and(|m| m.is_file());
    let parts = if regular && spec.checkpoint.is_none() {
        parallelism
    } else {
        1
    };
    let (path, max_line) = (line.input.to_path_buf(), line.max_line);
    let heads = Arc::clone(&counts);
    let mut s = p
        .source_stage_parts("blocks.read", parts, move |stage, part, parts| {
            let input = if parts == 1 {
                crate::source::Input::open(stage, &path)?.with_max_line(max_line)
            } else {
                crate::source::Input::part(stage, &path, max_line, part, parts)?
            };
            let reader = crate::source::ChunkHead::new(Arc::clone(stage), input, BLOCK_BYTES);
            let inner = NdjsonBlockHead::new(reader).with_policy(source_policy.clone());
            Ok(Box::new(ProjectHead::new(inner, &heads)) as Box<dyn Head<Chunk>>)
        })
        .name(&line.stages[0].name)
        .boxed();
    for c in counts.iter() {
        let shape = match c.op {
            MapLogic::Filter { .. } => Shape::Filtering,
            _ => Shape::OneToOne,
        };
        let shared = Arc::clone(&c.counts);
        s = s
            .step("op", move |prev, name| {
                Counted::new(prev, name, shape, shared)
            })
            .name(&c.name)
            .boxed();
    }
    super::stages::write_blocks(s, &line.stages[line.stages.len() - 1].name, line.output);
    Some(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What the value path makes of `line` through `ops`: `Ok(Some(bytes))` printed,
    /// `Ok(None)` filtered out, `Err(())` an error (the line or a stage fails).
    fn reference(line: &[u8], ops: &[ProjectOp]) -> Result<Option<Vec<u8>>, ()> {
        let mut rec = crate::ndjson::parse_object(line).map_err(|_| ())?;
        for op in ops {
            match op {
                ProjectOp::Filter { field, op, value } => {
                    if !kinds::filter(&rec, field, *op, value).map_err(|_| ())? {
                        return Ok(None);
                    }
                }
                ProjectOp::Select { fields, missing } => {
                    rec = kinds::select(rec, fields, *missing).map_err(|_| ())?;
                }
                ProjectOp::Words { .. } => unreachable!("not projectable"),
            }
        }
        let mut out = serde_json::to_vec(&rec).unwrap();
        out.push(b'\n');
        Ok(Some(out))
    }

    fn projector(ops: &[ProjectOp]) -> Projector {
        let counts: Vec<OpCounts> = ops
            .iter()
            .enumerate()
            .map(|(i, op)| OpCounts {
                name: Arc::from(format!("op{i}")),
                policy: Arc::new(OnError::Fail),
                counts: Arc::new(StepCounts::default()),
                op: op.clone(),
            })
            .collect();
        Projector::new(&counts)
    }

    /// Checks the fast path against the reference; whether it decided (did not fall back).
    fn agrees(line: &[u8], ops: &[ProjectOp]) -> bool {
        let want = reference(line, ops);
        let mut p = projector(ops);
        let mut out = Vec::new();
        let got = p.fast(line, &mut out);
        let shown = String::from_utf8_lossy(line);
        match (got, &want) {
            (Fast::Unsure, _) => return false,
            (_, Err(())) => {
                panic!("fast path decided a line the value path fails: {shown} {ops:?}")
            }
            (Fast::Out, Ok(Some(w))) => assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(w),
                "{shown} {ops:?}"
            ),
            (Fast::Dropped, Ok(None)) => assert!(out.is_empty()),
            (g, w) => panic!("fast {g:?}, value path {w:?}: {shown} {ops:?}"),
        }
        true
    }

    fn purchase() -> ProjectOp {
        ProjectOp::Filter {
            field: "kind".into(),
            op: FilterOp::Eq,
            value: Value::String("purchase".into()),
        }
    }

    fn pick(fields: &[&str], missing: SelectMissing) -> ProjectOp {
        ProjectOp::Select {
            fields: fields.iter().map(|f| f.to_string()).collect(),
            missing,
        }
    }

    #[test]
    fn common_records_are_projected_without_the_value_path() {
        let ops = [
            purchase(),
            pick(&["user", "amount", "id"], SelectMissing::Omit),
        ];
        for line in [
            &br#"{"id":1,"kind":"purchase","user":"u1","amount":12.5,"tags":["a"],"geo":{"kind":"x"}}"#[..],
            br#"{"kind":"view","id":2}"#,
            br#" { "kind" : "purchase" , "id" : -3 , "user" : "caf\u00e9" } "#,
            br#"{"kind":"purchase","id":1,"kind":"view"}"#,
            br#"{"kind":"view","id":1,"kind":"purchase","user":"\"q\"","amount":-0.5}"#,
            br#"{}"#,
        ] {
            assert!(agrees(line, &ops), "{}", String::from_utf8_lossy(line));
        }
        // No select: the whole record, keys sorted, the last of equal keys kept.
        assert!(agrees(
            br#"{"z":1,"a":[1, 2],"m":{"b":1,"a":2},"a":"x"}"#,
            &[]
        ));
    }

    #[test]
    fn what_the_scanner_is_unsure_of_goes_to_the_value_path() {
        let ops = [purchase()];
        for line in [
            // An escaped key may be the field's name.
            &br#"{"ki\u006ed":"purchase"}"#[..],
            // 19 digits may be outside 64 bits (the value path refuses 2^64).
            br#"{"kind":"purchase","n":18446744073709551616}"#,
            br#"{"kind":"purchase","n":[1,{"m":99999999999999999999}]}"#,
            // Exponents are left to serde_json by the check (they may be out of range).
            br#"{"kind":"purchase","amount":1e2}"#,
        ] {
            assert!(!agrees(line, &ops), "{}", String::from_utf8_lossy(line));
        }
        // A failing stage (no field to compare): its message shows the record.
        let lt = ProjectOp::Filter {
            field: "amount".into(),
            op: FilterOp::Lt,
            value: serde_json::json!(3),
        };
        assert!(!agrees(br#"{"id":1}"#, &[lt]));
        assert!(!agrees(
            br#"{"id":1}"#,
            &[pick(&["x"], SelectMissing::Error)]
        ));
    }

    const KEYS: [&str; 6] = ["kind", "id", "user", "a", "é", "k\"q"];

    /// A JSON text for one value, from plain to adversarial (escapes, unicode, big and odd
    /// numbers, nested objects that reuse the top level's keys, white space).
    fn value(depth: u32) -> BoxedStrategy<String> {
        let leaf = prop_oneof![
            Just("\"purchase\"".to_string()),
            Just("\"pur\\u0063hase\"".to_string()),
            Just("\"view\"".to_string()),
            Just("\"caf\u{e9} \\\"q\\\" \\n \\/ \\ud83d\\ude00\"".to_string()),
            Just("\"\"".to_string()),
            Just("true".to_string()),
            Just("null".to_string()),
            Just("-0".to_string()),
            Just("-0.0".to_string()),
            Just("1.50".to_string()),
            Just("1e5".to_string()),
            Just("1E-7".to_string()),
            Just("12345678901234567890".to_string()),
            Just("9223372036854775807".to_string()),
            Just("-9223372036854775808".to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| f.to_string()),
            (0u32..1000).prop_map(|n| n.to_string()),
        ];
        if depth == 0 {
            return leaf.boxed();
        }
        prop_oneof![
            4 => leaf,
            1 => prop::collection::vec(value(depth - 1), 0..3).prop_map(|v| format!("[{}]", v.join(" , "))),
            1 => object(depth - 1),
        ]
        .boxed()
    }

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            8 => prop::sample::select(KEYS.to_vec()).prop_map(|k| serde_json::to_string(k).unwrap()),
            1 => Just("\"ki\\u006ed\"".to_string()),
        ]
    }

    fn object(depth: u32) -> BoxedStrategy<String> {
        (
            prop::collection::vec((key(), value(depth)), 0..6),
            prop::bool::ANY,
        )
            .prop_map(|(fields, spaced)| {
                let sep = if spaced { " , " } else { "," };
                let colon = if spaced { " : " } else { ":" };
                let body: Vec<String> = fields
                    .into_iter()
                    .map(|(k, v)| format!("{k}{colon}{v}"))
                    .collect();
                format!("{{{}}}", body.join(sep))
            })
            .boxed()
    }

    fn op() -> impl Strategy<Value = ProjectOp> {
        let field = prop::sample::select(KEYS.to_vec()).prop_map(str::to_string);
        let filter = (
            field.clone(),
            prop::sample::select(vec![
                FilterOp::Eq,
                FilterOp::Ne,
                FilterOp::Lt,
                FilterOp::Ge,
                FilterOp::Exists,
                FilterOp::Contains,
            ]),
            prop::sample::select(vec![
                serde_json::json!("purchase"),
                serde_json::json!(""),
                serde_json::json!(1.5),
                serde_json::json!(0),
                serde_json::json!(null),
                serde_json::json!(true),
            ]),
        )
            .prop_map(|(field, op, value)| ProjectOp::Filter { field, op, value });
        let select = (
            prop::collection::vec(field, 0..4),
            prop::sample::select(vec![
                SelectMissing::Omit,
                SelectMissing::Null,
                SelectMissing::Error,
            ]),
        )
            .prop_map(|(fields, missing)| ProjectOp::Select { fields, missing })
            .prop_filter("supported", projectable);
        prop_oneof![filter, select]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]
        #[test]
        fn the_fast_path_prints_what_the_value_path_prints(
            line in object(2),
            ops in prop::collection::vec(op(), 0..4),
        ) {
            agrees(line.as_bytes(), &ops);
        }
    }

    /// The generator is not so adversarial that the fast path never decides.
    #[test]
    fn the_generator_exercises_the_fast_path() {
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let (mut decided, mut total) = (0, 0);
        for _ in 0..2000 {
            let line = object(2).new_tree(&mut runner).unwrap().current();
            total += 1;
            decided += usize::from(agrees(line.as_bytes(), &[purchase()]));
        }
        assert!(decided * 4 > total, "{decided} of {total}");
    }
}
