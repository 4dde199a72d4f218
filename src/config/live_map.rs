//! The TOML layer's reloadable record operations: `filter`, `select` and `words` as a
//! [`LiveMap`] step, fused like the fixed operators, that loads its version of the parameters
//! once per batch from a [`Versioned`] cell (`Chain::begin_batch`).

use std::sync::Arc;

use serde_json::Value;

use super::kinds::{self, FilterOp, Kind};
use crate::error::Error;
use crate::operator::{Chain, Emit, Halt};
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
            Kind::Select { fields } => MapLogic::Select {
                fields: fields.clone(),
            },
            Kind::Words { field, lowercase } => MapLogic::Words {
                field: field.clone(),
                lowercase: *lowercase,
            },
            _ => return None,
        })
    }
}

/// A reloadable `filter`, `select` or `words` step of a fused chain: it loads its version in
/// [`Chain::begin_batch`], so every record of a batch meets the same version, and counts the
/// batch's records for that version.
pub(crate) struct LiveMap<C> {
    prev: C,
    name: Arc<str>,
    logic: Arc<Versioned<MapLogic>>,
    current: Option<crate::sync::Arc<MapLogic>>,
}

impl<C: Clone> Clone for LiveMap<C> {
    fn clone(&self) -> Self {
        LiveMap {
            prev: self.prev.clone(),
            name: Arc::clone(&self.name),
            logic: Arc::clone(&self.logic),
            current: None,
        }
    }
}

impl<C> LiveMap<C> {
    pub(super) fn new(prev: C, name: Arc<str>, logic: Arc<Versioned<MapLogic>>) -> Self {
        LiveMap {
            prev,
            name,
            logic,
            current: None,
        }
    }
}

struct LiveEmit<'a, E> {
    logic: &'a MapLogic,
    name: &'a str,
    out: &'a mut E,
}

impl<E: Emit<Value>> Emit<Value> for LiveEmit<'_, E> {
    #[inline]
    fn emit(&mut self, rec: Value) -> Result<(), Halt> {
        match self.logic {
            MapLogic::Filter { field, op, value } => {
                if kinds::filter(&rec, field, *op, value) {
                    self.out.emit(rec)?;
                }
            }
            MapLogic::Select { fields } => self.out.emit(kinds::select(rec, fields))?,
            MapLogic::Words { field, lowercase } => {
                let words = kinds::words(&rec, field, *lowercase).map_err(|e| {
                    Halt::Failed(Error::Operator {
                        stage: self.name.to_string(),
                        source: e.into(),
                    })
                })?;
                for w in words {
                    self.out.emit(w)?;
                }
            }
        }
        Ok(())
    }
}

impl<C> crate::operator::sealed::Sealed for LiveMap<C> {}

impl<In, C: Chain<In, Out = Value>> Chain<In> for LiveMap<C> {
    type Out = Value;

    fn begin_batch(&mut self, records: usize) {
        self.prev.begin_batch(records);
        let (version, logic) = self.logic.load();
        self.logic.count(version, records as u64);
        self.current = Some(logic);
    }

    #[inline]
    fn push<E: Emit<Value>>(&mut self, item: In, out: &mut E) -> Result<(), Halt> {
        if self.current.is_none() {
            // Driven without batches: one version from here on until the next batch.
            self.current = Some(self.logic.load().1);
        }
        let logic = self.current.as_ref().expect("loaded above");
        self.prev.push(
            item,
            &mut LiveEmit {
                logic,
                name: &self.name,
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
