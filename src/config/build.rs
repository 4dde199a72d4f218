//! Turning a validated [`PipelineSpec`] into a runnable [`Pipeline`] over JSON records.
//!
//! Consecutive stateless stages with one consumer and the same parallelism fuse into one chain;
//! a change of parallelism rebalances; a stage read by several others fans out; a stage with
//! several inputs merges them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};

use super::kinds::{self, Kind};
use super::live_map::MapLogic;
use super::parse::{PipelineSpec, PolicySpec, StageSpec};
use super::stages;
use super::window_kind::{LatePolicy, WindowParams};
use super::{ConfigError, ConfigErrorKind};
use crate::operator::Boxed;
use crate::versioned::Versioned;
use crate::window::{WindowOutput, WindowSpec};
use crate::{Pipeline, Stream};

type JsonStream = Stream<Value, Boxed<Value, Value>>;

impl PipelineSpec {
    /// Builds the typed pipeline. Files are opened when it runs.
    pub fn build(&self) -> Result<Pipeline, ConfigError> {
        self.build_with(None)
    }

    /// Builds the pipeline with its reloadable stages (see [`crate::versioned`]) reading their
    /// logic from versioned cells, returned by stage name.
    pub(crate) fn build_live(&self) -> Result<(Pipeline, LiveStages), ConfigError> {
        let mut live = LiveStages::new();
        let p = self.build_with(Some(&mut live))?;
        Ok((p, live))
    }

    fn build_with(&self, live: Option<&mut LiveStages>) -> Result<Pipeline, ConfigError> {
        for st in &self.stages {
            if let Kind::LinesRead { path, .. } | Kind::NdjsonRead { path, .. } = &st.params {
                if kinds::many_files(path) {
                    return Err(ConfigError::new(
                        &self.file,
                        Some(st.line),
                        Some(&st.name),
                        ConfigErrorKind::BadValue,
                        format!(
                            "`path` {} is a directory, a glob or a URL: a run on one machine reads one local file (or stdin); `millrace spark` reads these (docs/spark.md)",
                            path.display()
                        ),
                    ));
                }
            }
        }
        let p = self.build_stages(live)?;
        if let Some(opts) = &self.checkpoint {
            // Every stage of the file, by its name: a resume matches stages by name and
            // refuses a stateful one whose fingerprint changed.
            for st in &self.stages {
                set_stage_fingerprint(&p, &st.name, &st.fingerprint);
            }
            apply_checkpoints(&p, opts.clone());
        }
        Ok(p)
    }

    fn build_stages(&self, mut live: Option<&mut LiveStages>) -> Result<Pipeline, ConfigError> {
        if let Some(p) = self.build_byte_path(live.as_deref_mut()) {
            return Ok(p);
        }
        if let Some(p) = super::project::build(self, live.is_some()) {
            return Ok(p);
        }
        let p = Pipeline::with_options(self.options.clone());
        // One dead-letter stream per stage named in a `dead_letter`, made before any stage
        // that sends to it; the stage itself reads the letters as JSON objects.
        let mut handles: HashMap<&str, crate::DeadLetters> = HashMap::new();
        let mut letters: HashMap<&str, JsonStream> = HashMap::new();
        for st in self.stages.iter().filter(|s| s.dead_letter_target) {
            let (h, s) = p.dead_letters(&format!("{}.letters", st.name));
            handles.insert(&st.name, h);
            letters.insert(
                &st.name,
                s.map(|l: crate::DeadLetter| l.to_json())
                    .name(&format!("{}.letters.json", st.name))
                    .into_head()
                    .boxed(),
            );
        }
        let mut consumers: HashMap<&str, usize> = HashMap::new();
        for s in &self.stages {
            // A window's late stage reads its late output, not its results.
            for i in s.inputs.iter().filter(|i| s.late_of.as_ref() != Some(*i)) {
                *consumers.entry(i.as_str()).or_default() += 1;
            }
        }
        let mut outputs: HashMap<&str, Vec<JsonStream>> = HashMap::new();
        let mut lates: HashMap<&str, JsonStream> = HashMap::new();
        for st in &self.stages {
            let input = match &st.late_of {
                Some(w) => Some(
                    lates
                        .remove(w.as_str())
                        .expect("a window is built before its late stage"),
                ),
                None if st.dead_letter_target => letters.remove(st.name.as_str()),
                None => {
                    let mut inputs = st.inputs.iter().map(|i| {
                        outputs
                            .get_mut(i.as_str())
                            .and_then(Vec::pop)
                            .expect("inputs are built first, one stream per consumer")
                    });
                    inputs
                        .next()
                        .map(|first| inputs.fold(first, |a, b| a.union(b).boxed()))
                }
            };
            let err = |m: String| {
                ConfigError::new(
                    &self.file,
                    Some(st.line),
                    Some(&st.name),
                    ConfigErrorKind::Wiring,
                    m,
                )
            };
            let mut late = None;
            let policy = policy_of(st, &handles);
            let readers = self.checkpoint.is_none();
            let out = build_stage(
                &p,
                st,
                input,
                &mut late,
                live.as_deref_mut(),
                policy,
                readers,
            )?;
            if let Some(l) = late {
                lates.insert(&st.name, l);
            }
            let n = consumers.get(st.name.as_str()).copied().unwrap_or(0);
            match (out, n) {
                (None, 0) => {}
                (None, _) => return Err(err(format!("a `{}` stage is a sink; nothing can read from it", st.kind))),
                (Some(_), 0) => {
                    return Err(err(format!(
                        "the output of this `{}` stage is not used: add a stage with input = {:?} (e.g. an ndjson.write)",
                        st.kind, st.name
                    )))
                }
                (Some(s), 1) => {
                    outputs.insert(&st.name, vec![s]);
                }
                (Some(s), n) => {
                    outputs.insert(&st.name, s.split(n).into_iter().map(Stream::boxed).collect());
                }
            }
        }
        Ok(p)
    }
}

impl PipelineSpec {
    /// The byte path: a pipeline that is exactly `ndjson.read → m → … → m → ndjson.write`, each
    /// `m` an `exec` stage or a native plugin node, every stage on one instance, moves blocks of
    /// checked NDJSON lines and never builds values. Output lines are the child's or the node's
    /// bytes (blank lines and `\r` dropped, every line checked), not re-serialised.
    fn build_byte_path(&self, live: Option<&mut LiveStages>) -> Option<Pipeline> {
        // Only the source may have a policy (its bad lines are cut out of the blocks); exec
        // stages with a policy run on records.
        let line = StraightLine::of(self, |_| 1)?;
        let (st, middle) = (&line.stages, line.middle());
        if middle.is_empty()
            || st[1..].iter().any(|s| s.on_error != PolicySpec::Fail)
            || !middle.iter().all(|s| byte_path_stage(&s.params))
        {
            return None;
        }
        let (path, max_line_bytes, out) = (line.input, &line.max_line, line.output);
        let p = Pipeline::with_options(self.options.clone());
        let handles = line.dead_letters(&p);
        let policy = policy_of(st[0], &handles);
        let mut s =
            stages::ndjson_blocks(&p, &st[0].name, path, BLOCK_BYTES, *max_line_bytes, policy)
                .boxed();
        let mut live = live;
        #[cfg(feature = "plugin")]
        let live_set = live.is_some();
        for m in middle {
            s = match (&m.params, live.as_deref_mut()) {
                (Kind::Exec(spec), None) => stages::exec(s, &m.name, (**spec).clone(), 1).boxed(),
                (Kind::Exec(spec), Some(l)) => {
                    let v = Versioned::new((**spec).clone());
                    l.insert(m.name.clone(), LiveStage::Exec(Arc::clone(&v)));
                    stages::exec_live(s, &m.name, v, 1).boxed()
                }
                #[cfg(feature = "plugin")]
                (Kind::Native(spec), live) => {
                    let v = Versioned::new((**spec).clone());
                    if let Some(l) = live {
                        l.insert(m.name.clone(), LiveStage::Native(Arc::clone(&v)));
                    }
                    stages::native(s, &m.name, v, live_set, 1).boxed()
                }
                _ => unreachable!("checked above"),
            };
        }
        stages::write_blocks(s, &st[st.len() - 1].name, out);
        Some(p)
    }
}

/// A pipeline that is a straight line `ndjson.read → … → ndjson.write` (to a file or stdout),
/// each stage read by the next only, with dead-letter stages beside it that are each an
/// `ndjson.write` to a file read by no stage: the shape of both byte paths.
pub(super) struct StraightLine<'a> {
    /// The line's stages, source first.
    pub stages: Vec<&'a StageSpec>,
    pub targets: Vec<&'a StageSpec>,
    pub input: &'a std::path::Path,
    pub max_line: usize,
    pub output: &'a std::path::Path,
}

impl<'a> StraightLine<'a> {
    /// The line of `spec` (`None`: it is not one, or `byte_path = false`), where every stage
    /// after the source runs `parallelism(source)` instances (a stage that does not declare
    /// its parallelism takes its input's).
    pub(super) fn of(
        spec: &'a PipelineSpec,
        parallelism: impl Fn(&StageSpec) -> usize,
    ) -> Option<Self> {
        let (targets, st): (Vec<&StageSpec>, Vec<&StageSpec>) =
            spec.stages.iter().partition(|s| s.dead_letter_target);
        if !spec.byte_path
            || st.len() < 2
            || targets
                .iter()
                .any(|t| !matches!(t.params, Kind::NdjsonWrite { dir: false, .. }))
            || spec
                .stages
                .iter()
                .any(|s| targets.iter().any(|t| s.inputs.contains(&t.name)))
        {
            return None;
        }
        let (
            Kind::NdjsonRead {
                path,
                max_line_bytes,
            },
            Kind::NdjsonWrite {
                path: out,
                dir: false,
            },
        ) = (&st[0].params, &st[st.len() - 1].params)
        else {
            return None;
        };
        let n = parallelism(st[0]);
        let last = st.len() - 1;
        let linear = st.iter().enumerate().all(|(i, s)| {
            s.late_of.is_none()
                && if i == 0 {
                    s.inputs.is_empty() && s.parallelism == n
                } else {
                    // The sink is one writer whatever its input's parallelism.
                    s.inputs.len() == 1
                        && s.inputs[0] == st[i - 1].name
                        && (!s.explicit_parallelism
                            || s.parallelism == if i == last { 1 } else { n })
                }
        });
        let read_once = st
            .iter()
            .all(|s| st.iter().filter(|t| t.inputs.contains(&s.name)).count() <= 1);
        (linear && read_once).then_some(StraightLine {
            stages: st,
            targets,
            input: path,
            max_line: *max_line_bytes,
            output: out,
        })
    }

    /// The stages between the source and the sink.
    pub(super) fn middle(&self) -> &[&'a StageSpec] {
        &self.stages[1..self.stages.len() - 1]
    }

    /// Adds each dead-letter stage to `p` (its letters written as JSON objects): their handles
    /// by stage name.
    pub(super) fn dead_letters(&self, p: &Pipeline) -> HashMap<&'a str, crate::DeadLetters> {
        let mut handles = HashMap::new();
        for t in &self.targets {
            let Kind::NdjsonWrite { path, .. } = &t.params else {
                unreachable!("checked by StraightLine::of")
            };
            let (h, letters) = p.dead_letters(&format!("{}.letters", t.name));
            letters
                .map(|l: crate::DeadLetter| l.to_json())
                .name(&format!("{}.letters.json", t.name))
                .write_ndjson(path)
                .name(&t.name);
            handles.insert(t.name.as_str(), h);
        }
        handles
    }
}

/// A stage's error policy, its dead letters going to the stage `handles` names.
pub(super) fn policy_of(
    st: &StageSpec,
    handles: &HashMap<&str, crate::DeadLetters>,
) -> crate::OnError {
    match &st.on_error {
        PolicySpec::Fail => crate::OnError::Fail,
        PolicySpec::Skip => crate::OnError::Skip,
        PolicySpec::DeadLetter(t) => crate::OnError::DeadLetter(
            handles
                .get(t.as_str())
                .cloned()
                .expect("validation checks every dead_letter names a stage"),
        ),
    }
}

/// Whether a stage between `ndjson.read` and `ndjson.write` can take the byte path's blocks.
fn byte_path_stage(kind: &Kind) -> bool {
    match kind {
        Kind::Exec(_) => true,
        #[cfg(feature = "plugin")]
        Kind::Native(_) => true,
        _ => false,
    }
}

/// Turns checkpointing on with the `[checkpoint]` table's options.
fn apply_checkpoints(p: &Pipeline, opts: crate::checkpoint::CheckpointOptions) {
    p.checkpoints(opts);
}

/// Records a stage's fingerprint for the checkpoint manifest.
fn set_stage_fingerprint(p: &Pipeline, stage: &str, fingerprint: &str) {
    p.set_stage_fingerprint(stage, fingerprint);
}

/// Blocks read by `ndjson.read` on the byte path.
const BLOCK_BYTES: usize = 256 * 1024;

/// Adapts the input's parallelism to a stateless stage's: fuse when equal (or unspecified),
/// else rebalance; `ordered = true` makes the stage it runs in keep input order.
fn with_parallelism(s: JsonStream, st: &StageSpec) -> JsonStream {
    let n = st.parallelism;
    let s = if !st.explicit_parallelism || s.current_parallelism() == n {
        s
    } else if s.is_fresh_channel_stage() {
        s.parallelism(n)
    } else {
        s.rebalance(n).boxed()
    };
    with_order(s, st)
}

/// The stream, ordered if the stage says `ordered = true`.
fn with_order(s: JsonStream, st: &StageSpec) -> JsonStream {
    if st.ordered {
        s.ordered()
    } else {
        s
    }
}

/// A reloadable stage's versioned logic.
pub(crate) enum LiveStage {
    /// `filter`, `select`, `words`.
    Map(Arc<Versioned<MapLogic>>),
    /// `exec` and process plugin nodes.
    Exec(Arc<Versioned<crate::exec::ExecSpec>>),
    /// Native plugin nodes.
    #[cfg(feature = "plugin")]
    Native(Arc<Versioned<crate::plugin::native::NativeSpec>>),
    /// Window stages: the parameters that leave their state as it is.
    Window(Arc<Versioned<crate::window::WindowLive>>),
}

/// The reloadable stages of a pipeline, by name.
pub(crate) type LiveStages = std::collections::BTreeMap<String, LiveStage>;

/// A reloadable stage, if `live` is set and the stage's kind can reload; the input back
/// (boxed: a stream is large) when it cannot.
fn build_live_stage(
    st: &StageSpec,
    input: JsonStream,
    live: &mut LiveStages,
    policy: &crate::OnError,
) -> Result<Option<JsonStream>, Box<JsonStream>> {
    let name = st.name.as_str();
    let par = st.parallelism;
    Ok(Some(match &st.params {
        Kind::Exec(spec) => {
            let mut spec = (**spec).clone();
            spec.on_error = policy.clone();
            let v = Versioned::new(spec);
            live.insert(st.name.clone(), LiveStage::Exec(Arc::clone(&v)));
            stages::exec_live(input, name, v, par).boxed()
        }
        #[cfg(feature = "plugin")]
        Kind::Native(spec) => {
            let v = Versioned::new((**spec).clone());
            live.insert(st.name.clone(), LiveStage::Native(Arc::clone(&v)));
            stages::native(input, name, v, true, par).boxed()
        }
        other => match MapLogic::of(other) {
            Some(logic) => {
                let v = Versioned::new(logic);
                live.insert(st.name.clone(), LiveStage::Map(Arc::clone(&v)));
                stages::live_map(with_parallelism(input, st), name, v, policy.clone()).boxed()
            }
            None => return Err(Box::new(input)),
        },
    }))
}

/// Builds one stage on `input`. `readers`: a file source with parallelism N may run N readers
/// over parts of its file (false when the run is checkpointed).
fn build_stage(
    p: &Pipeline,
    st: &StageSpec,
    input: Option<JsonStream>,
    late: &mut Option<JsonStream>,
    live: Option<&mut LiveStages>,
    policy: crate::OnError,
    readers: bool,
) -> Result<Option<JsonStream>, ConfigError> {
    let name = st.name.as_str();
    let mut live = live;
    let input = match (input, live.as_deref_mut()) {
        (Some(s), Some(live)) => match build_live_stage(st, s, live, &policy) {
            Ok(out) => return Ok(out),
            Err(s) => Some(*s),
        },
        (input, _) => input,
    };
    Ok(match (&st.params, input) {
        (
            Kind::LinesRead {
                path,
                max_line_bytes,
            },
            None,
        ) => {
            // N readers over parts of a regular file (each line whole in one part); one
            // reader dealing to N instances for stdin, a pipe, input order (`ordered`) or a
            // checkpointed run (a part cannot be replayed).
            let regular = std::fs::metadata(path).is_ok_and(|m| m.is_file());
            if st.parallelism > 1 && regular && readers && !st.ordered {
                let s = stages::lines(p, name, path, *max_line_bytes, policy, st.parallelism);
                return Ok(Some(s.boxed()));
            }
            let s = stages::lines(p, name, path, *max_line_bytes, policy, 1);
            Some(if st.parallelism > 1 {
                with_order(s.rebalance(st.parallelism).boxed(), st)
            } else {
                s.boxed()
            })
        }
        (
            Kind::NdjsonRead {
                path,
                max_line_bytes,
            },
            None,
        ) => {
            let max_line = *max_line_bytes;
            if st.parallelism > 1 {
                // Parsing is the expensive part: read blocks of lines on one thread (a memcpy),
                // parse them on N.
                let chunks =
                    stages::chunks(p, &format!("{name}.lines"), path, CHUNK_BYTES, max_line);
                let shown: Arc<str> = Arc::from(path.display().to_string());
                let chunks = chunks.rebalance(st.parallelism);
                let chunks = if st.ordered { chunks.ordered() } else { chunks };
                Some(
                    chunks
                        .step("parse", move |prev, op| {
                            super::live_map::ParseChunks::new(prev, op, shown, policy, max_line)
                        })
                        .name(name)
                        .into_head()
                        .boxed(),
                )
            } else {
                Some(stages::ndjson_objects(p, name, path, max_line, policy).boxed())
            }
        }
        (_, None) => unreachable!("validation gives every non-source stage an input"),
        (Kind::LinesRead { .. } | Kind::NdjsonRead { .. }, Some(_)) => {
            unreachable!("sources have no input")
        }
        (k @ (Kind::Words { .. } | Kind::Filter { .. } | Kind::Select { .. }), Some(s)) => {
            let logic = MapLogic::of(k).expect("a record operation");
            Some(stages::record_op(with_parallelism(s, st), name, logic, policy).boxed())
        }
        (Kind::Limit { n }, Some(s)) => Some(with_parallelism(s, st).limit(*n).name(name).boxed()),
        (Kind::Count { key }, Some(s)) => {
            let k = key.clone();
            let k2 = key.clone();
            let counted = s
                .key_by(move |rec: &Value| {
                    let v = rec.get(&k).cloned().unwrap_or(Value::Null);
                    KeyValue(v)
                })
                .name(&format!("{name}.key"))
                .parallelism(st.parallelism)
                .checkpointed()
                .count()
                .name(name)
                .map(move |(KeyValue(v), n)| {
                    let mut m = Map::with_capacity(2);
                    m.insert(k2.clone(), v);
                    m.insert("count".into(), Value::from(n));
                    Value::Object(m)
                })
                .name(&format!("{name}.emit"));
            let key = key.clone();
            Some(
                counted
                    .checkpointed_sort_by(move |a: &Value, b: &Value| {
                        let count = |v: &Value| v.get("count").and_then(Value::as_u64).unwrap_or(0);
                        count(b).cmp(&count(a)).then_with(|| {
                            kinds::cmp_values(
                                a.get(&key).unwrap_or(&Value::Null),
                                b.get(&key).unwrap_or(&Value::Null),
                            )
                        })
                    })
                    .name(&format!("{name}.sort"))
                    .boxed(),
            )
        }
        (Kind::Window(w), Some(s)) => Some(build_window(s, st, w, late, live, policy)),
        (Kind::Exec(spec), Some(s)) => {
            let mut spec = (**spec).clone();
            spec.on_error = policy;
            Some(stages::exec(s, name, spec, st.parallelism).boxed())
        }
        #[cfg(feature = "plugin")]
        (Kind::Native(spec), Some(s)) => Some(
            stages::native(
                s,
                name,
                Versioned::new((**spec).clone()),
                false,
                st.parallelism,
            )
            .boxed(),
        ),
        (Kind::NdjsonWrite { path, dir: false }, Some(s)) => {
            s.write_ndjson(path).name(name);
            None
        }
        (Kind::NdjsonWrite { path, dir: true }, Some(s)) => {
            s.write_ndjson_dir(path).name(name);
            None
        }
    })
}

/// A `window` stage: keyed by `key_field` (null when absent), windowed on the input's watermarks,
/// results as JSON objects; late records dropped, failing the run, or routed to `late`.
fn build_window(
    s: JsonStream,
    st: &StageSpec,
    w: &WindowParams,
    late: &mut Option<JsonStream>,
    live: Option<&mut LiveStages>,
    policy: crate::OnError,
) -> JsonStream {
    let name = st.name.as_str();
    // The parsed policy says fail or skip; a dead-letter one has its handle only now.
    let mut w = w.clone();
    if policy.is_dead_letter() {
        w.on_error = policy;
    }
    let w = &w;
    let key_field = w.key_field.clone();
    let ms = |v: i64| Duration::from_millis(v.max(0) as u64);
    let mut spec = WindowSpec::new(w.assigner, w.event_time())
        .max_out_of_orderness(ms(w.max_out_of_orderness))
        .allowed_lateness(ms(w.allowed_lateness))
        .on_error(w.on_error.clone());
    if let Some(live) = live {
        let v = Versioned::new(w.live());
        live.insert(st.name.clone(), LiveStage::Window(Arc::clone(&v)));
        spec.live = Some(v);
    }
    let windowed = s
        .key_by(move |rec: &Value| {
            KeyValue(
                key_field
                    .as_ref()
                    .and_then(|k| rec.get(k).cloned())
                    .unwrap_or(Value::Null),
            )
        })
        .name(&format!("{name}.key"))
        .parallelism(st.parallelism)
        .checkpointed()
        .window(spec, w.aggregate())
        .name(name);
    let params = Arc::new(w.clone());
    let json = format!("{name}.json");
    match &w.late {
        LatePolicy::Drop => windowed
            .results()
            .map(move |r| params.result_json(r))
            .name(&json)
            .into_head()
            .boxed(),
        LatePolicy::Error => {
            let stage = name.to_string();
            windowed
                .outputs()
                .try_map(move |o| match o {
                    WindowOutput::Result(r) => Ok(params.result_json(r)),
                    WindowOutput::Late { key, time, record } => Err(format!(
                        "window `{stage}`: a record at {} ms (key {}) arrived after every window it belongs to was closed (late = \"error\"): {record}",
                        time.0, key.0
                    )),
                })
                .name(&json)
                .into_head()
                .boxed()
        }
        LatePolicy::Stage(_) => {
            let (results, late_records) = windowed.with_late();
            *late = Some(
                late_records
                    .map(|l| l.record)
                    .name(&format!("{name}.late"))
                    .into_head()
                    .boxed(),
            );
            results
                .map(move |r| params.result_json(r))
                .name(&json)
                .into_head()
                .boxed()
        }
    }
}

/// Bytes per block when `ndjson.read` parses on several threads: small enough that a channel of
/// them stays well under a megabyte, large enough to make the hop free.
const CHUNK_BYTES: usize = 64 * 1024;

/// A JSON value used as a grouping key: hashed and compared by its canonical text.
/// Serde (as the value itself), so that keyed state is checkpointed.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub(crate) struct KeyValue(pub Value);

impl PartialEq for KeyValue {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
impl Eq for KeyValue {}
impl std::hash::Hash for KeyValue {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        match &self.0 {
            Value::String(s) => {
                3u8.hash(h);
                s.hash(h)
            }
            other => other.to_string().hash(h),
        }
    }
}
