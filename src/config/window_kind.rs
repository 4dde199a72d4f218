//! The `window` stage kind of the TOML layer: its parameters (checked with line numbers), the
//! event time and aggregates it reads from JSON records, and the JSON form of its results.

use serde_json::{Map, Number, Value};
use toml::Spanned;

use super::build::KeyValue;
use super::kinds::Params;
use super::{ConfigError, ConfigErrorKind};
use crate::describe::kind_of;
use crate::time::{parse_duration_ms, parse_rfc3339_ms, Timestamp};
use crate::window::{
    Aggregate, Assigner, EventTime, OnError, Session, Sliding, TimeError, Tumbling, WindowResult,
};

/// Where a window stage sends records too late for every window they belong to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LatePolicy {
    /// Dropped and counted in the report (the default).
    Drop,
    /// The run fails, naming the record.
    Error,
    /// Sent to the named stage.
    Stage(String),
}

/// One named output of a window: what it computes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum JsonAgg {
    Count,
    Sum(String),
    Min(String),
    Max(String),
    Mean(String),
}

impl JsonAgg {
    fn field(&self) -> Option<&str> {
        match self {
            JsonAgg::Count => None,
            JsonAgg::Sum(f) | JsonAgg::Min(f) | JsonAgg::Max(f) | JsonAgg::Mean(f) => Some(f),
        }
    }
}

/// A validated `window` stage.
#[derive(Debug, Clone)]
pub(crate) struct WindowParams {
    pub time_field: String,
    pub key_field: Option<String>,
    pub assigner: Assigner,
    pub max_out_of_orderness: i64,
    pub allowed_lateness: i64,
    pub outputs: Vec<(String, JsonAgg)>,
    pub late: LatePolicy,
    pub on_error: OnError,
}

/// Names a result object uses for itself; outputs may not take them.
const RESERVED: &[&str] = &["key", "window_start", "window_end", "update", "replaces"];

impl WindowParams {
    /// The parameters a reload may change in place.
    pub(crate) fn live(&self) -> crate::window::WindowLive {
        crate::window::WindowLive {
            allowed_lateness: self.allowed_lateness,
            on_error: self.on_error.clone(),
        }
    }

    /// Why `new` cannot replace `self` in a running window, if it cannot: anything but
    /// `allowed_lateness` and `on_error` shapes the open windows.
    pub(crate) fn incompatible(&self, new: &WindowParams) -> Option<String> {
        let mut same = new.clone();
        same.allowed_lateness = self.allowed_lateness;
        same.on_error = self.on_error.clone();
        (format!("{self:?}") != format!("{same:?}")).then(|| {
            "only `allowed_lateness` and `on_error` can change while a window runs (its open \
             windows belong to its other parameters)"
                .to_string()
        })
    }

    pub(crate) fn parse(p: &mut Params<'_>) -> Result<Self, ConfigError> {
        let time_field = p.required_str("time_field")?;
        let key_field = p.opt_str("key_field")?;
        let assigner = parse_assigner(p)?;
        let max_out_of_orderness = p.opt_duration("max_out_of_orderness")?.unwrap_or(0);
        let allowed_lateness = p.opt_duration("allowed_lateness")?.unwrap_or(0);
        let outputs = parse_outputs(p)?;
        let late = match p.opt_str("late")?.as_deref() {
            None | Some("drop") => LatePolicy::Drop,
            Some("error") => LatePolicy::Error,
            Some("") => {
                return Err(p.error_at(
                    "late",
                    ConfigErrorKind::BadValue,
                    "parameter `late`: expected \"drop\", \"error\" or a stage name".into(),
                ))
            }
            Some(stage) => LatePolicy::Stage(stage.to_string()),
        };
        // `on_error` is read with every stage's parameters (parse.rs) and set after this.
        let on_error = OnError::Fail;
        Ok(WindowParams {
            time_field,
            key_field,
            assigner,
            max_out_of_orderness,
            allowed_lateness,
            outputs,
            late,
            on_error,
        })
    }

    /// How the stage reads a record's time (and checks the fields its aggregates read).
    pub(crate) fn event_time(&self) -> JsonTime {
        let mut numeric: Vec<String> = self
            .outputs
            .iter()
            .filter_map(|(_, a)| a.field().map(str::to_string))
            .collect();
        numeric.sort();
        numeric.dedup();
        JsonTime {
            time_field: self.time_field.clone().into(),
            numeric: numeric.into(),
        }
    }

    /// The aggregate computing every output.
    pub(crate) fn aggregate(&self) -> JsonAggs {
        JsonAggs {
            outputs: self.outputs.iter().map(|(_, a)| a.clone()).collect(),
        }
    }

    /// A result as `{"key", "window_start", "window_end", <outputs>...}`, plus `"update": true`
    /// when it supersedes an earlier result and `"replaces"` for merged session windows.
    pub(crate) fn result_json(&self, r: WindowResult<KeyValue, Vec<Value>>) -> Value {
        let mut m = Map::with_capacity(self.outputs.len() + 4);
        m.insert("key".into(), r.key.0);
        m.insert("window_start".into(), Value::from(r.window.start.0));
        m.insert("window_end".into(), Value::from(r.window.end.0));
        for ((name, _), v) in self.outputs.iter().zip(r.value) {
            m.insert(name.clone(), v);
        }
        if r.update {
            m.insert("update".into(), Value::Bool(true));
        }
        if !r.replaces.is_empty() {
            let ws = r
                .replaces
                .iter()
                .map(|w| Value::from(vec![w.start.0, w.end.0]))
                .collect();
            m.insert("replaces".into(), Value::Array(ws));
        }
        Value::Object(m)
    }
}

fn parse_assigner(p: &mut Params<'_>) -> Result<Assigner, ConfigError> {
    let tumbling = p.opt_duration("tumbling")?;
    let sliding = p.opt_table("sliding")?;
    let session = p.opt_table("session")?;
    let given = [tumbling.is_some(), sliding.is_some(), session.is_some()];
    if given.iter().filter(|g| **g).count() != 1 {
        let err = "exactly one of `tumbling = \"10s\"`, `sliding = { size = \"10s\", slide = \"5s\" }` or `session = { gap = \"30s\" }`";
        return Err(if given.iter().any(|g| *g) {
            let key = if sliding.is_some() {
                "sliding"
            } else {
                "session"
            };
            p.error_at(
                key,
                ConfigErrorKind::BadValue,
                format!("expected {err}, found several"),
            )
        } else {
            p.missing("tumbling", err)
        });
    }
    let bad = |p: &Params<'_>, key: &str, e: crate::window::AssignerError| {
        p.error_at(
            key,
            ConfigErrorKind::BadValue,
            format!("parameter `{key}`: {e}"),
        )
    };
    if let Some(size) = tumbling {
        return Tumbling::new(size, 0)
            .map(Assigner::Tumbling)
            .map_err(|e| bad(p, "tumbling", e));
    }
    if let Some(t) = sliding {
        let size = p.table_duration("sliding", &t, "size")?;
        let slide = p.table_duration("sliding", &t, "slide")?;
        p.table_only("sliding", &t, &["size", "slide"])?;
        return Sliding::new(size, slide, 0)
            .map(Assigner::Sliding)
            .map_err(|e| bad(p, "sliding", e));
    }
    let t = session.expect("one of the three is set");
    let gap = p.table_duration("session", &t, "gap")?;
    p.table_only("session", &t, &["gap"])?;
    Session::new(gap)
        .map(Assigner::Session)
        .map_err(|e| bad(p, "session", e))
}

fn parse_outputs(p: &mut Params<'_>) -> Result<Vec<(String, JsonAgg)>, ConfigError> {
    let expected = "a table of outputs such as { n = \"count\", total = \"sum(amount)\" }";
    let Some(t) = p.opt_table("aggregate")? else {
        return Err(p.missing("aggregate", expected));
    };
    if t.is_empty() {
        return Err(p.error_at(
            "aggregate",
            ConfigErrorKind::BadValue,
            format!("parameter `aggregate`: expected {expected}, found an empty table"),
        ));
    }
    let mut out = Vec::with_capacity(t.len());
    for (name, spec) in &t {
        if RESERVED.contains(&name.as_str()) {
            return Err(p.error_at(
                "aggregate",
                ConfigErrorKind::BadValue,
                format!(
                    "aggregate output `{name}`: the name is taken by the result itself ({})",
                    RESERVED.join(", ")
                ),
            ));
        }
        let toml::Value::String(text) = spec else {
            return Err(p.error_at(
                "aggregate",
                ConfigErrorKind::BadValue,
                format!(
                    "aggregate output `{name}`: expected \"count\", \"sum(<field>)\", \"min(<field>)\", \"max(<field>)\" or \"mean(<field>)\", found {}",
                    crate::describe::describe_toml(spec)
                ),
            ));
        };
        let agg = parse_agg(text).ok_or_else(|| {
            p.error_at(
                "aggregate",
                ConfigErrorKind::BadValue,
                format!("aggregate output `{name}`: expected \"count\", \"sum(<field>)\", \"min(<field>)\", \"max(<field>)\" or \"mean(<field>)\", found {text:?}"),
            )
        })?;
        out.push((name.clone(), agg));
    }
    Ok(out)
}

fn parse_agg(text: &str) -> Option<JsonAgg> {
    let text = text.trim();
    if text == "count" {
        return Some(JsonAgg::Count);
    }
    let (func, rest) = text.split_once('(')?;
    let field = rest.strip_suffix(')')?.trim();
    if field.is_empty() {
        return None;
    }
    let field = field.to_string();
    Some(match func.trim() {
        "sum" => JsonAgg::Sum(field),
        "min" => JsonAgg::Min(field),
        "max" => JsonAgg::Max(field),
        "mean" => JsonAgg::Mean(field),
        _ => return None,
    })
}

/// Reads the event time of a JSON record: an integer of milliseconds or an RFC 3339 string.
/// Also checks that every field an aggregate reads is a number, so that a bad record is
/// reported (or skipped) by the stage's error policy rather than silently ignored.
#[derive(Clone)]
pub(crate) struct JsonTime {
    time_field: std::sync::Arc<str>,
    numeric: std::sync::Arc<[String]>,
}

impl EventTime<Value> for JsonTime {
    fn record_json(&self, rec: &Value) -> Option<Value> {
        Some(rec.clone())
    }

    fn time(&self, rec: &Value) -> Result<Timestamp, TimeError> {
        let field = &*self.time_field;
        let t = match rec.get(field) {
            Some(Value::Number(n)) => match n.as_i64() {
                Some(ms) => ms,
                None => return Err(bad(rec, format!("time field `{field}` is {n}: expected integer milliseconds"))),
            },
            Some(Value::String(s)) => parse_rfc3339_ms(s).map_err(|e| bad(rec, format!("time field `{field}`: {e}")))?,
            Some(other) => {
                return Err(bad(
                    rec,
                    format!("time field `{field}` is {}: expected integer milliseconds or an RFC 3339 string", kind_of(other)),
                ))
            }
            None => return Err(bad(rec, format!("no time field `{field}`"))),
        };
        for f in self.numeric.iter() {
            match rec.get(f) {
                Some(Value::Number(_)) => {}
                Some(other) => {
                    return Err(bad(
                        rec,
                        format!("field `{f}` is {}: expected a number", kind_of(other)),
                    ))
                }
                None => return Err(bad(rec, format!("no field `{f}` to aggregate"))),
            }
        }
        Ok(Timestamp(t))
    }
}

/// A reason with the record it is about (shortened).
fn bad(rec: &Value, why: String) -> TimeError {
    let mut text = rec.to_string();
    if text.len() > 200 {
        let mut cut = 200;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    TimeError::new(format!("{why} in {text}"))
}

/// Every output of a window stage over JSON records.
pub(crate) struct JsonAggs {
    outputs: Vec<JsonAgg>,
}

/// The running state of one output (serde: checkpointed with its window).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) enum Acc {
    Count(u64),
    /// The sum, and whether every value added was an integer (then it prints as one).
    Sum(f64, bool),
    /// The extreme so far, and whether every value was an integer.
    Min(Option<f64>, bool),
    Max(Option<f64>, bool),
    Mean(f64, u64),
}

fn number(rec: &Value, field: &str) -> Option<(f64, bool)> {
    let n = rec.get(field)?.as_number()?;
    Some((n.as_f64()?, n.is_i64() || n.is_u64()))
}

fn to_json(x: f64, integral: bool) -> Value {
    if integral && x.fract() == 0.0 && x.abs() < 9.0e15 {
        Value::from(x as i64)
    } else {
        Number::from_f64(x).map_or(Value::Null, Value::Number)
    }
}

impl Aggregate<Value> for JsonAggs {
    type Acc = Vec<Acc>;
    type Out = Vec<Value>;

    fn create(&self) -> Vec<Acc> {
        self.outputs
            .iter()
            .map(|o| match o {
                JsonAgg::Count => Acc::Count(0),
                JsonAgg::Sum(_) => Acc::Sum(0.0, true),
                JsonAgg::Min(_) => Acc::Min(None, true),
                JsonAgg::Max(_) => Acc::Max(None, true),
                JsonAgg::Mean(_) => Acc::Mean(0.0, 0),
            })
            .collect()
    }

    fn add(&self, acc: &mut Vec<Acc>, rec: &Value) {
        for (a, o) in acc.iter_mut().zip(&self.outputs) {
            // The event-time check has made sure every aggregated field is a number.
            let v = o.field().and_then(|f| number(rec, f));
            match (a, v) {
                (Acc::Count(n), _) => *n += 1,
                (Acc::Sum(s, int), Some((x, i))) => {
                    *s += x;
                    *int &= i;
                }
                (Acc::Min(m, int), Some((x, i))) => {
                    *m = Some(m.map_or(x, |m| m.min(x)));
                    *int &= i;
                }
                (Acc::Max(m, int), Some((x, i))) => {
                    *m = Some(m.map_or(x, |m| m.max(x)));
                    *int &= i;
                }
                (Acc::Mean(s, n), Some((x, _))) => {
                    *s += x;
                    *n += 1;
                }
                (_, None) => {}
            }
        }
    }

    fn merge(&self, acc: &mut Vec<Acc>, other: Vec<Acc>) {
        for (a, b) in acc.iter_mut().zip(other) {
            match (a, b) {
                (Acc::Count(n), Acc::Count(m)) => *n += m,
                (Acc::Sum(s, i), Acc::Sum(t, j)) => {
                    *s += t;
                    *i &= j;
                }
                (Acc::Min(m, i), Acc::Min(o, j)) => {
                    *m = pick_opt(*m, o, f64::min);
                    *i &= j;
                }
                (Acc::Max(m, i), Acc::Max(o, j)) => {
                    *m = pick_opt(*m, o, f64::max);
                    *i &= j;
                }
                (Acc::Mean(s, n), Acc::Mean(t, k)) => {
                    *s += t;
                    *n += k;
                }
                _ => unreachable!("accumulators of one aggregate line up"),
            }
        }
    }

    fn result(&self, acc: &Vec<Acc>) -> Vec<Value> {
        acc.iter()
            .map(|a| match *a {
                Acc::Count(n) => Value::from(n),
                Acc::Sum(s, int) => to_json(s, int),
                Acc::Min(m, int) | Acc::Max(m, int) => m.map_or(Value::Null, |x| to_json(x, int)),
                Acc::Mean(s, n) if n > 0 => to_json(s / n as f64, false),
                Acc::Mean(..) => Value::Null,
            })
            .collect()
    }
}

fn pick_opt(a: Option<f64>, b: Option<f64>, pick: fn(f64, f64) -> f64) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(pick(x, y)),
        (x, y) => x.or(y),
    }
}

/// The params helpers the window kind needs (durations and sub-tables).
impl Params<'_> {
    /// A duration string (`"10s"`), in milliseconds.
    pub(crate) fn opt_duration(&mut self, key: &'static str) -> Result<Option<i64>, ConfigError> {
        match self.get(key).map(Spanned::get_ref) {
            None => Ok(None),
            Some(toml::Value::String(s)) => parse_duration_ms(s).map(Some).map_err(|e| {
                self.error_at(
                    key,
                    ConfigErrorKind::BadValue,
                    format!("parameter `{key}`: {e}"),
                )
            }),
            Some(other) => Err(self.wrong(key, "a duration such as \"10s\"", other)),
        }
    }

    /// A sub-table.
    pub(crate) fn opt_table(
        &mut self,
        key: &'static str,
    ) -> Result<Option<toml::Table>, ConfigError> {
        match self.get(key).map(Spanned::get_ref) {
            None => Ok(None),
            Some(toml::Value::Table(t)) => Ok(Some(t.clone())),
            Some(other) => Err(self.wrong(key, "a table", other)),
        }
    }

    /// A required duration inside sub-table `key`.
    fn table_duration(&self, key: &str, t: &toml::Table, field: &str) -> Result<i64, ConfigError> {
        match t.get(field) {
            Some(toml::Value::String(s)) => parse_duration_ms(s).map_err(|e| {
                self.error_at(
                    key,
                    ConfigErrorKind::BadValue,
                    format!("parameter `{key}.{field}`: {e}"),
                )
            }),
            Some(other) => Err(self.error_at(
                key,
                ConfigErrorKind::BadValue,
                format!(
                    "parameter `{key}.{field}`: expected a duration such as \"10s\", found {}",
                    crate::describe::describe_toml(other)
                ),
            )),
            None => Err(self.error_at(
                key,
                ConfigErrorKind::MissingParameter,
                format!("parameter `{key}`: missing `{field}` (a duration such as \"10s\")"),
            )),
        }
    }

    /// Rejects unknown keys in sub-table `key`.
    fn table_only(&self, key: &str, t: &toml::Table, known: &[&str]) -> Result<(), ConfigError> {
        match t.keys().find(|k| !known.contains(&k.as_str())) {
            None => Ok(()),
            Some(k) => Err(self.error_at(
                key,
                ConfigErrorKind::UnknownParameter,
                format!(
                    "parameter `{key}`: unknown key `{k}` (known: {})",
                    known.join(", ")
                ),
            )),
        }
    }
}
