//! The stages of the TOML kinds that are not plain typed-API calls: sources of blocks and JSON
//! objects, `exec` and plugin stages (fixed or reloadable), reloadable record operations, and the
//! byte path's sink. Each is built on one of the stream builder's hooks (`source_stage`,
//! `line_source`, `head_stage`, `step`, `write_with`), so that the core knows nothing of exec,
//! plugins or reloading.

use std::path::Path;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::live_map::{LiveMap, MapLogic};
use crate::exec::live::ReloadExecHead;
use crate::exec::{ExecHead, ExecSpec};
use crate::operator::Chain;
#[cfg(feature = "plugin")]
use crate::plugin::native::{NativeHead, NativeItem, NativeSpec};
use crate::runtime::Head;
use crate::source::{parse_text, BlockInput, Chunk, ChunkHead, Input, NdjsonBlockHead};
use crate::stream::Fresh;
use crate::versioned::Versioned;
use crate::{OnError, Pipeline, Sink, Stream};

/// `lines.read`: each line as `{"line": ...}`; a line that is not UTF-8 meets `on_error`. With
/// `parts > 1`, that many readers each read their part of the (regular) file.
pub(super) fn lines(
    p: &Pipeline,
    name: &str,
    path: &Path,
    max_line: usize,
    on_error: OnError,
    parts: usize,
) -> Fresh<Value> {
    let parse = |l: &[u8], _| {
        parse_text(l).map(|o| {
            o.map(|line| {
                let mut m = Map::with_capacity(1);
                m.insert("line".into(), Value::String(line));
                Value::Object(m)
            })
        })
    };
    if parts > 1 {
        p.line_source_parts("lines.read", path, max_line, parse, on_error, parts)
            .name(name)
    } else {
        p.line_source_with("lines.read", path, max_line, parse, on_error)
            .name(name)
    }
}

/// `ndjson.read`: one JSON object per non-blank line; a line that is not one meets `on_error`.
pub(super) fn ndjson_objects(
    p: &Pipeline,
    name: &str,
    path: &Path,
    max_line: usize,
    on_error: OnError,
) -> Fresh<Value> {
    p.line_source_with(
        "ndjson.read",
        path,
        max_line,
        |l, _| crate::ndjson::parse_object(l).map(|v| if v.is_null() { None } else { Some(v) }),
        on_error,
    )
    .name(name)
}

/// Blocks of whole lines (about `size` bytes each, one per message), each made into the
/// stage's head by `wrap`.
fn blocks(
    p: &Pipeline,
    name: &str,
    path: &Path,
    size: usize,
    max_line: usize,
    wrap: fn(ChunkHead) -> Box<dyn Head<Chunk>>,
) -> Fresh<Chunk> {
    let path = path.to_path_buf();
    p.source_stage("blocks.read", move |stage| {
        let input = Input::open(stage, &path)?.with_max_line(max_line);
        Ok(wrap(ChunkHead::new(Arc::clone(stage), input, size)))
    })
    .name(name)
}

/// Blocks of whole lines, for parsing on other threads.
pub(super) fn chunks(
    p: &Pipeline,
    name: &str,
    path: &Path,
    size: usize,
    max_line: usize,
) -> Fresh<Chunk> {
    blocks(p, name, path, size, max_line, |h| {
        Box::new(crate::source::LinesOf(h))
    })
}

/// `ndjson.read` on the byte path: blocks of whole lines, every line checked to be a JSON
/// object (blank lines dropped), never parsed into values.
pub(super) fn ndjson_blocks(
    p: &Pipeline,
    name: &str,
    path: &Path,
    size: usize,
    max_line: usize,
    on_error: OnError,
) -> Fresh<Chunk> {
    let path = path.to_path_buf();
    p.source_stage("blocks.read", move |stage| {
        let input = Input::open(stage, &path)?.with_max_line(max_line);
        Ok(Box::new(
            NdjsonBlockHead::new(ChunkHead::new(Arc::clone(stage), input, size))
                .with_policy(on_error),
        ) as Box<dyn Head<Chunk>>)
    })
    .name(name)
}

/// `ndjson.write` on the byte path: checked blocks of lines written as they are.
///
/// Always a stage of its own: every stage that makes blocks then ends in a channel, which
/// counts a block as one record, and corrects its count by `records - 1` (see
/// [`Chunk::records`]); this sink counts the block's records.
pub(super) fn write_blocks<I, C>(s: Stream<I, C>, name: &str, path: &Path) -> Sink
where
    I: Send + 'static,
    C: Chain<I, Out = Chunk>,
{
    s.head_stage(None, 1, |_, input| {
        Box::new(BlockInput(input)) as Box<dyn Head<Chunk>>
    })
    .write_with("ndjson.write", path, |w, c: &Chunk| {
        // Checked blocks end in a newline; the writer adds it back.
        let data = c.data.strip_suffix(b"\n").unwrap_or(&c.data);
        w.write_all(data).map(|()| c.records)
    })
    .name(name)
}

/// An `exec` stage (or process plugin node) of `parallelism` instances, one child process each,
/// on records or (parallelism 1) on the byte path's blocks.
pub(super) fn exec<I, C, T>(
    s: Stream<I, C>,
    name: &str,
    spec: ExecSpec,
    parallelism: usize,
) -> Fresh<T>
where
    I: Send + 'static,
    C: Chain<I, Out = T>,
    T: crate::exec::Wire,
    ExecHead<T>: Head<T>,
{
    let spec = Arc::new(spec);
    s.head_stage(Some("exec"), parallelism, move |op, input| {
        Box::new(ExecHead::new(Arc::clone(op), input, Arc::clone(&spec))) as Box<dyn Head<T>>
    })
    .name(name)
}

/// A reloadable `exec` stage: one child per version (see [`crate::versioned`]).
pub(super) fn exec_live<I, C, T>(
    s: Stream<I, C>,
    name: &str,
    spec: Arc<Versioned<ExecSpec>>,
    parallelism: usize,
) -> Fresh<T>
where
    I: Send + 'static,
    C: Chain<I, Out = T>,
    T: crate::exec::Wire,
    ExecHead<T>: Head<T>,
{
    s.head_stage(Some("exec"), parallelism, move |op, input| {
        Box::new(ReloadExecHead::new(
            Arc::clone(op),
            input,
            Arc::clone(&spec),
        )) as Box<dyn Head<T>>
    })
    .name(name)
}

/// A stage running a native plugin's node (one node instance per stage instance), on records or
/// (parallelism 1) on the byte path's blocks; `live`: the spec may be replaced between batches
/// (hot reload).
#[cfg(feature = "plugin")]
pub(super) fn native<I, C, T>(
    s: Stream<I, C>,
    name: &str,
    spec: Arc<Versioned<NativeSpec>>,
    live: bool,
    parallelism: usize,
) -> Fresh<T>
where
    I: Send + 'static,
    C: Chain<I, Out = T>,
    T: NativeItem,
{
    s.head_stage(Some("native"), parallelism, move |op, input| {
        Box::new(NativeHead::new(
            Arc::clone(op),
            input,
            Arc::clone(&spec),
            live,
        )) as Box<dyn Head<T>>
    })
    .name(name)
}

/// A reloadable `filter`, `select` or `words` step, fused like the fixed ones; it loads its
/// version once per batch.
pub(super) fn live_map<I, C>(
    s: Stream<I, C>,
    name: &str,
    logic: Arc<Versioned<MapLogic>>,
    on_error: OnError,
) -> Stream<I, LiveMap<C>>
where
    I: Send + 'static,
    C: Chain<I, Out = Value>,
{
    s.step("live", |prev, op| LiveMap::new(prev, op, logic, on_error))
        .name(name)
}

/// A fixed `filter`, `select` or `words` step with its error policy.
pub(super) fn record_op<I, C>(
    s: Stream<I, C>,
    name: &str,
    logic: MapLogic,
    on_error: OnError,
) -> Stream<I, LiveMap<C>>
where
    I: Send + 'static,
    C: Chain<I, Out = Value>,
{
    s.step("op", |prev, op| LiveMap::fixed(prev, op, logic, on_error))
        .name(name)
}
