//! The TOML layer's record operations that can meet a bad record: `filter`, `select` and
//! `words` as a [`LiveMap`] step, fused like the fixed operators, with the stage's error policy
//! (`on_error`). A reloadable step loads its version of the parameters once per batch from a
//! [`Versioned`] cell (`Chain::begin_batch`); a fixed one keeps its parameters. The policy is
//! fixed for the run (a reload that changes it needs a restart).

use std::sync::Arc;

use serde_json::Value;

use super::kinds::{self, FilterOp, Kind, SelectMissing};
use crate::dead_letter::{Bad, OnError};
use crate::error::Error;
use crate::metrics::Shape;
use crate::operator::{Acc, Chain, Emit, Halt, Local, StepInfo};
use crate::versioned::Versioned;

/// A built-in record operation whose parameters can be reloaded.
#[derive(Debug, Clone)]
pub(crate) enum MapLogic {
    Filter {
        field: String,
        op: FilterOp,
        value: Value,
    },
    Select {
        fields: Vec<String>,
        missing: SelectMissing,
    },
    Words {
        field: String,
        lowercase: bool,
    },
}

impl MapLogic {
    /// The logic of a reloadable built-in kind.
    pub(crate) fn of(kind: &Kind) -> Option<MapLogic> {
        Some(match kind {
            Kind::Filter { field, op, value } => MapLogic::Filter {
                field: field.clone(),
                op: *op,
                value: value.clone(),
            },
            Kind::Select { fields, missing } => MapLogic::Select {
                fields: fields.clone(),
                missing: *missing,
            },
            Kind::Words { field, lowercase } => MapLogic::Words {
                field: field.clone(),
                lowercase: *lowercase,
            },
            _ => return None,
        })
    }

    fn shape(&self) -> Shape {
        match self {
            MapLogic::Filter { .. } => Shape::Filtering,
            MapLogic::Select { .. } => Shape::OneToOne,
            MapLogic::Words { .. } => Shape::OneToMany,
        }
    }
}

/// A `filter`, `select` or `words` step of a fused chain. A reloadable one loads its version in
/// [`Chain::begin_batch`], so every record of a batch meets the same version, and counts the
/// batch's records for that version.
pub(crate) struct LiveMap<C> {
    prev: C,
    name: Arc<str>,
    /// `None`: fixed parameters (`current` never changes).
    logic: Option<Arc<Versioned<MapLogic>>>,
    current: Option<crate::sync::Arc<MapLogic>>,
    shape: Shape,
    policy: Arc<OnError>,
    acc: Acc,
}

impl<C: Clone> Clone for LiveMap<C> {
    fn clone(&self) -> Self {
        LiveMap {
            prev: self.prev.clone(),
            name: Arc::clone(&self.name),
            logic: self.logic.clone(),
            current: if self.logic.is_some() {
                None
            } else {
                self.current.clone()
            },
            shape: self.shape,
            policy: Arc::clone(&self.policy),
            acc: self.acc.clone(),
        }
    }
}

impl<C> LiveMap<C> {
    /// A reloadable step.
    pub(super) fn new(
        prev: C,
        name: Arc<str>,
        logic: Arc<Versioned<MapLogic>>,
        policy: OnError,
    ) -> Self {
        let shape = logic.load().1.shape();
        LiveMap {
            prev,
            name,
            logic: Some(logic),
            current: None,
            shape,
            policy: Arc::new(policy),
            acc: Acc::new(),
        }
    }

    /// A step whose parameters never change.
    pub(super) fn fixed(prev: C, name: Arc<str>, logic: MapLogic, policy: OnError) -> Self {
        LiveMap {
            prev,
            name,
            shape: logic.shape(),
            logic: None,
            current: Some(crate::sync::Arc::new(logic)),
            policy: Arc::new(policy),
            acc: Acc::new(),
        }
    }
}

struct LiveEmit<'a, E> {
    logic: &'a MapLogic,
    name: &'a Arc<str>,
    policy: &'a OnError,
    acc: &'a mut Local,
    out: &'a mut E,
}

/// Applies the stage `name`'s `logic` to `rec` with its policy, as a step of the value path
/// does: what passes is emitted to `out`; a dropped or bad record is counted into `acc`.
pub(super) fn apply<E: Emit<Value>>(
    logic: &MapLogic,
    name: &Arc<str>,
    policy: &OnError,
    acc: &mut Local,
    rec: Value,
    out: &mut E,
) -> Result<(), Halt> {
    LiveEmit {
        logic,
        name,
        policy,
        acc,
        out,
    }
    .emit(rec)
}

impl<E> LiveEmit<'_, E> {
    /// Applies the policy to a bad record.
    #[cold]
    fn reject(&mut self, rec: Value, message: String) -> Result<(), Halt> {
        let name = self.name;
        let r = self.policy.reject(
            name,
            message,
            || Bad::Record(rec),
            None,
            None,
            |m| Error::Operator {
                stage: name.to_string(),
                source: m.into(),
            },
        )?;
        Acc::count(self.acc, r);
        Ok(())
    }
}

impl<E: Emit<Value>> Emit<Value> for LiveEmit<'_, E> {
    #[inline]
    fn emit(&mut self, rec: Value) -> Result<(), Halt> {
        match self.logic {
            MapLogic::Filter { field, op, value } => match kinds::filter(&rec, field, *op, value) {
                Ok(true) => self.out.emit(rec)?,
                Ok(false) => self.acc.filtered += 1,
                Err(m) => {
                    let m = format!("{m}: {rec}");
                    self.reject(rec, m)?
                }
            },
            MapLogic::Select { fields, missing } => match kinds::select(rec, fields, *missing) {
                Ok(v) => self.out.emit(v)?,
                Err((rec, m)) => {
                    let m = format!("{m}: {rec}");
                    self.reject(rec, m)?
                }
            },
            MapLogic::Words { field, lowercase } => match kinds::words(&rec, field, *lowercase) {
                Ok(words) => {
                    for w in words {
                        self.acc.out += 1;
                        self.out.emit(w)?;
                    }
                }
                Err(m) => self.reject(rec, m)?,
            },
        }
        Ok(())
    }
}

impl<C> crate::operator::sealed::Sealed for LiveMap<C> {}

impl<In, C: Chain<In, Out = Value>> Chain<In> for LiveMap<C> {
    type Out = Value;
    // Stateless itself (a reload swaps logic, not state): the steps before it may not be.
    crate::operator::forward_state!();

    fn begin_batch(&mut self, records: usize) {
        self.prev.begin_batch(records);
        if let Some(logic) = &self.logic {
            let (version, current) = logic.load();
            logic.count(version, records as u64);
            self.current = Some(current);
        }
    }

    fn end_batch(&mut self) {
        self.prev.end_batch();
        self.acc.flush();
    }

    fn steps(&self, steps: &mut Vec<StepInfo>) {
        self.prev.steps(steps);
        steps.push(self.acc.info(&self.name, self.shape));
    }

    #[inline]
    fn push<E: Emit<Value>>(&mut self, item: In, out: &mut E) -> Result<(), Halt> {
        if self.current.is_none() {
            // Driven without batches: one version from here on until the next batch.
            self.current = self.logic.as_ref().map(|l| l.load().1);
        }
        let logic = self.current.as_ref().expect("loaded above");
        self.prev.push(
            item,
            &mut LiveEmit {
                logic,
                name: &self.name,
                policy: &self.policy,
                acc: &mut self.acc.local,
                out,
            },
        )
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

/// `ndjson.read` at `parallelism > 1`: the step that parses blocks of lines (read on one
/// thread) into JSON objects on each instance. Its account counts lines: `in` = lines,
/// `filtered` = blank lines, `skipped` / `dead_lettered` = lines that are not JSON objects
/// (by the stage's policy; letters carry the line as `raw` with the file and line), `out` =
/// records.
pub(crate) struct ParseChunks<C> {
    prev: C,
    name: Arc<str>,
    path: Arc<str>,
    policy: Arc<OnError>,
    /// The stage's `max_line_bytes`: a longer line is a bad line.
    max_line: usize,
    acc: Acc,
}

impl<C: Clone> Clone for ParseChunks<C> {
    fn clone(&self) -> Self {
        ParseChunks {
            prev: self.prev.clone(),
            name: Arc::clone(&self.name),
            path: Arc::clone(&self.path),
            policy: Arc::clone(&self.policy),
            max_line: self.max_line,
            acc: self.acc.clone(),
        }
    }
}

impl<C> ParseChunks<C> {
    pub(super) fn new(
        prev: C,
        name: Arc<str>,
        path: Arc<str>,
        policy: OnError,
        max_line: usize,
    ) -> Self {
        ParseChunks {
            prev,
            name,
            path,
            policy: Arc::new(policy),
            max_line,
            acc: Acc::new(),
        }
    }
}

struct ParseEmit<'a, E> {
    name: &'a Arc<str>,
    path: &'a str,
    policy: &'a OnError,
    max_line: usize,
    acc: &'a mut Local,
    out: &'a mut E,
}

impl<E: Emit<Value>> Emit<crate::source::Chunk> for ParseEmit<'_, E> {
    fn emit(&mut self, chunk: crate::source::Chunk) -> Result<(), Halt> {
        for (line, text) in chunk.lines() {
            self.acc.records_in += 1;
            match crate::ndjson::parse_line(text, self.max_line) {
                Ok(Value::Null) => self.acc.filtered += 1,
                Ok(v) => self.out.emit(v)?,
                Err(message) => {
                    let (name, path) = (self.name, self.path);
                    let r = self.policy.reject(
                        name,
                        message,
                        || Bad::Raw(String::from_utf8_lossy(text).into_owned()),
                        Some(path),
                        Some(chunk.line_number(line)),
                        |message| Error::Record {
                            stage: name.to_string(),
                            location: crate::Location {
                                path: path.to_string(),
                                line: chunk.line_number(line),
                            },
                            message,
                        },
                    )?;
                    Acc::count(self.acc, r);
                }
            }
        }
        Ok(())
    }
}

impl<C> crate::operator::sealed::Sealed for ParseChunks<C> {}

impl<In, C: Chain<In, Out = crate::source::Chunk>> Chain<In> for ParseChunks<C> {
    type Out = Value;
    crate::operator::forward_state!();

    fn begin_batch(&mut self, records: usize) {
        self.prev.begin_batch(records);
    }

    fn end_batch(&mut self) {
        self.prev.end_batch();
        self.acc.flush();
    }

    fn steps(&self, steps: &mut Vec<StepInfo>) {
        self.prev.steps(steps);
        let mut info = self.acc.info(&self.name, Shape::Filtering);
        info.counted_in = true;
        steps.push(info);
    }

    #[inline]
    fn push<E: Emit<Value>>(&mut self, item: In, out: &mut E) -> Result<(), Halt> {
        self.prev.push(
            item,
            &mut ParseEmit {
                name: &self.name,
                path: &self.path,
                policy: &self.policy,
                max_line: self.max_line,
                acc: &mut self.acc.local,
                out,
            },
        )
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
