//! The sinks that end a [`Stream`], and the [`Sink`] handle that names them.

use std::cell::RefCell;
use std::fmt;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use crate::sync::Mutex;

use super::graph::{Builder, MakeTail};
use super::{Out, Stream};
use crate::error::BoxError;
use crate::operator::Chain;
use crate::runtime::Cx;
use crate::sink::{
    open_output, CollectTail, Collected, DirWriteTail, ForEachTail, Target, WriteTail,
};

/// A sink that ends a stream. Its only use is to [`name`](Sink::name) it; dropping it is fine.
pub struct Sink {
    b: Rc<RefCell<Builder>>,
    stage: usize,
}

impl fmt::Debug for Sink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.b.borrow();
        // After the run the builder is empty: the sink has no stage to show.
        let stage = b.stages.get(self.stage).map(|s| s.name());
        f.debug_struct("Sink").field("stage", &stage).finish()
    }
}

impl Sink {
    /// Renames the sink (by default its kind: `for_each`, `ndjson.write`, ...). Names must be
    /// unique within a pipeline.
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// p.source("n", 0..3u32).for_each(|_| {}).name("drop");
    /// assert_eq!(p.stage_names(), vec!["n+drop"]);
    /// ```
    pub fn name(self, name: &str) -> Self {
        let mut b = self.b.borrow_mut();
        // A sink renamed after its pipeline ran has nothing left to rename.
        if let Some(old) = b.stages.get_mut(self.stage).map(|s| s.sink.take()) {
            let new = b.rename(old.as_deref(), name);
            b.stages[self.stage].sink = Some(new);
        }
        drop(b);
        self
    }
}

impl<I: Send + 'static, C: Chain<I>> Stream<I, C> {
    /// Calls `f` for each record, on one thread, in arrival order. Fused into this stage when it
    /// has one instance.
    ///
    /// # Examples
    ///
    /// ```
    /// let (tx, rx) = std::sync::mpsc::channel();
    /// let p = millrace::Pipeline::new();
    /// p.source("n", 1..=3u32).for_each(move |x| tx.send(x).unwrap());
    /// p.run().unwrap();
    /// assert_eq!(rx.iter().collect::<Vec<_>>(), vec![1, 2, 3]);
    /// ```
    pub fn for_each<F>(self, f: F) -> Sink
    where
        F: FnMut(Out<I, C>) + Send + 'static,
    {
        let mut f = f;
        self.try_for_each(move |x| {
            f(x);
            Ok::<(), BoxError>(())
        })
    }

    /// A fallible [`for_each`](Stream::for_each): an `Err` fails the run naming the sink.
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// p.source("n", 1..=3u32)
    ///     .try_for_each(|x| if x < 3 { Ok(()) } else { Err("three") })
    ///     .name("check");
    /// assert_eq!(p.run().unwrap_err().stage(), Some("check"));
    /// ```
    pub fn try_for_each<X, F>(self, f: F) -> Sink
    where
        X: Into<BoxError> + 'static,
        F: FnMut(Out<I, C>) -> Result<(), X> + Send + 'static,
    {
        if self.parallelism > 1 {
            return self.new_stage().try_for_each(f);
        }
        let name = self.default_name("for_each");
        let mut f = Some(f);
        self.sink(
            name,
            Box::new(move |names, _| {
                let f = f.take().expect("a for_each sink has one instance");
                let sink = names.sink.clone().expect("a sink stage has a sink name");
                Ok(Box::new(move |cx: &Cx| Ok(ForEachTail::new(cx, f, sink))) as MakeTail<_>)
            }),
        )
    }

    /// Collects every record into memory; the returned handle yields them after the run.
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// let out = p.source("n", 1..=3u32).collect();
    /// p.run().unwrap();
    /// assert_eq!(out.take(), vec![1, 2, 3]);
    /// ```
    pub fn collect(self) -> Collected<Out<I, C>> {
        let items = Arc::new(Mutex::new(crate::sink::first_buffer()));
        let handle = Collected {
            items: Arc::clone(&items),
        };
        let name = self.default_name("collect");
        self.sink(
            name,
            Box::new(move |_, _| {
                let items = Arc::clone(&items);
                Ok(Box::new(move |cx: &Cx| Ok(CollectTail::new(cx, items))) as MakeTail<_>)
            }),
        );
        handle
    }

    /// Writes each record, formatted by `format` (which returns how many records it wrote), to
    /// a file (`-` for stdout), in a sink of kind `kind`.
    pub(crate) fn write_with<F>(self, kind: &str, path: &Path, format: F) -> Sink
    where
        F: FnMut(&mut dyn std::io::Write, &Out<I, C>) -> std::io::Result<u64> + Send + 'static,
    {
        if self.parallelism > 1 {
            return self.new_stage().write_with(kind, path, format);
        }
        let name = self.default_name(kind);
        let path = path.to_path_buf();
        let mut format = Some(format);
        self.sink(
            name,
            Box::new(move |names, _| {
                let sink = names.sink.clone().expect("a sink stage has a sink name");
                let shown = path.display().to_string();
                let format = format.take().expect("a writer sink has one instance");
                // Opened when the instance is made: a file through the run's file system
                // (the checkpoint options' hidden `fs`, known once the run starts).
                let path = path.clone();
                Ok(Box::new(move |cx: &Cx| {
                    let opts = cx.run.checkpoint_opts.lock().clone();
                    let fs = crate::checkpoint::run_fs(opts.as_ref());
                    let (out, target) = open_output(&sink, &path, &fs)?;
                    Ok(WriteTail::new(cx, out, target, shown, sink, format))
                }) as MakeTail<_>)
            }),
        )
    }

    /// Writes each record as a line of text to a file (`-` for stdout). A closed stdout ends
    /// the run quietly.
    ///
    /// # Examples
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("out.txt");
    /// let p = millrace::Pipeline::new();
    /// p.source("n", 1..=2u32).write_lines(&path);
    /// p.run().unwrap();
    /// assert_eq!(std::fs::read_to_string(&path).unwrap(), "1\n2\n");
    /// ```
    pub fn write_lines(self, path: impl AsRef<Path>) -> Sink
    where
        Out<I, C>: std::fmt::Display,
    {
        self.write_with("lines.write", path.as_ref(), |w, x| {
            write!(w, "{x}").map(|()| 1)
        })
    }

    /// Writes each record as one line of JSON to a file (`-` for stdout).
    ///
    /// # Examples
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("out.ndjson");
    /// let p = millrace::Pipeline::new();
    /// p.source("n", vec![("a", 1u32)]).write_ndjson(&path);
    /// p.run().unwrap();
    /// assert_eq!(std::fs::read_to_string(&path).unwrap(), "[\"a\",1]\n");
    /// ```
    pub fn write_ndjson(self, path: impl AsRef<Path>) -> Sink
    where
        Out<I, C>: serde::Serialize,
    {
        self.write_with("ndjson.write", path.as_ref(), |w, x| {
            serde_json::to_writer(&mut *w, x)
                .map(|()| 1)
                .map_err(std::io::Error::from)
        })
    }

    /// Writes each record, formatted by `format`, into part files `part-<instance>-<seq>.<ext>`
    /// of the directory `dir`, one writer per instance of this stage, in a sink of kind
    /// `kind` (see [`write_ndjson_dir`](Stream::write_ndjson_dir)).
    pub(crate) fn write_dir_with<F>(
        self,
        kind: &str,
        dir: &Path,
        ext: &'static str,
        format: F,
    ) -> Sink
    where
        F: FnMut(&mut dyn std::io::Write, &Out<I, C>) -> std::io::Result<u64>
            + Clone
            + Send
            + 'static,
    {
        let name = self.default_name(kind);
        let dir = dir.to_path_buf();
        self.sink(
            name,
            Box::new(move |names, _| {
                let sink = names.sink.clone().expect("a sink stage has a sink name");
                let (dir, format) = (dir.clone(), format.clone());
                Ok(
                    Box::new(move |cx: &Cx| Ok(DirWriteTail::new(cx, &dir, ext, sink, format)?))
                        as MakeTail<_>,
                )
            }),
        )
    }

    /// Writes each record as one line of JSON into part files of the directory `dir`
    /// (created if missing): each instance of this stage writes its own parts,
    /// `part-<instance:05>-<seq:06>.ndjson`.
    ///
    /// With checkpoints this sink is exactly once: a part is written under a hidden
    /// in-progress name, pre-committed at each checkpoint's barrier and renamed to its final
    /// name when the checkpoint completes; a resumed run deletes what was written after the
    /// checkpoint. Without checkpoints each instance writes one part, named when it finishes.
    /// A directory holding parts of an earlier run is refused (empty it first, or resume).
    ///
    /// # Examples
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// let out = dir.path().join("out");
    /// let p = millrace::Pipeline::new();
    /// p.source("n", vec![1u32, 2]).write_ndjson_dir(&out);
    /// p.run().unwrap();
    /// let part = std::fs::read_to_string(out.join("part-00000-000000.ndjson")).unwrap();
    /// assert_eq!(part, "1\n2\n");
    /// ```
    pub fn write_ndjson_dir(self, dir: impl AsRef<Path>) -> Sink
    where
        Out<I, C>: serde::Serialize,
    {
        self.write_dir_with("ndjson.write", dir.as_ref(), "ndjson", |w, x| {
            serde_json::to_writer(&mut *w, x)
                .map(|()| 1)
                .map_err(std::io::Error::from)
        })
    }

    /// Writes each record as a line of text into part files `part-<instance:05>-<seq:06>.txt`
    /// of the directory `dir`; as [`write_ndjson_dir`](Stream::write_ndjson_dir) otherwise.
    ///
    /// # Examples
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// let out = dir.path().join("out");
    /// let p = millrace::Pipeline::new();
    /// p.source("n", 1..=2u32).write_lines_dir(&out);
    /// p.run().unwrap();
    /// let part = std::fs::read_to_string(out.join("part-00000-000000.txt")).unwrap();
    /// assert_eq!(part, "1\n2\n");
    /// ```
    pub fn write_lines_dir(self, dir: impl AsRef<Path>) -> Sink
    where
        Out<I, C>: std::fmt::Display,
    {
        self.write_dir_with("lines.write", dir.as_ref(), "txt", |w, x| {
            write!(w, "{x}").map(|()| 1)
        })
    }

    /// Closes the stage into a sink named `name` (renamable through the returned handle).
    fn sink<T>(self, name: Arc<str>, tails: super::graph::TailFactory<T>) -> Sink
    where
        T: crate::runtime::Tail<Out<I, C>> + 'static,
    {
        if self.ordered && self.parallelism > 1 {
            // The order exists only where the instances' outputs merge.
            return self.new_stage().sink(name, tails);
        }
        let b = Rc::clone(&self.b);
        let stage = self.close(Some(name), tails);
        Sink { b, stage }
    }
}

impl<I: Send + 'static, C: Chain<I>> Stream<I, C> {
    /// Writes each record, formatted by `format`, to the writer `w` (shown as `<writer>` in
    /// errors), in a sink of kind `kind`.
    fn write_to_with<W, F>(self, kind: &str, w: W, format: F) -> Sink
    where
        W: std::io::Write + Send + 'static,
        F: FnMut(&mut dyn std::io::Write, &Out<I, C>) -> std::io::Result<u64> + Send + 'static,
    {
        if self.parallelism > 1 {
            return self.new_stage().write_to_with(kind, w, format);
        }
        let name = self.default_name(kind);
        let mut parts = Some((w, format));
        self.sink(
            name,
            Box::new(move |names, _| {
                let sink = names.sink.clone().expect("a sink stage has a sink name");
                let (w, format) = parts.take().expect("a writer sink has one instance");
                let out = crate::sink::Output::Stream(Box::new(w));
                let out = std::io::BufWriter::with_capacity(256 * 1024, out);
                let target = Target::Stream(
                    "a writer cannot be rolled back: write to a file or a directory for exactly-once",
                );
                Ok(Box::new(move |cx: &Cx| {
                    Ok(WriteTail::new(
                        cx,
                        out,
                        target,
                        "<writer>".into(),
                        sink,
                        format,
                    ))
                }) as MakeTail<_>)
            }),
        )
    }

    /// Writes each record as a line of text to any writer, through a 256 KiB buffer, in a sink
    /// of kind `lines.write`. A write error fails the run with an [`Error::Io`](crate::Error::Io)
    /// naming the sink and `<writer>`; records are written in order and at most once, so what
    /// reached the writer before the error is a prefix of the stream. As for a file,
    /// `BrokenPipe` is a normal end (the reader went away): the sink stops, and so do its
    /// producers.
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// p.source("n", 1..=3u32).write_lines_to(std::io::sink()).name("out");
    /// assert_eq!(p.run().unwrap().stage("out").unwrap().records_out, 3);
    /// ```
    pub fn write_lines_to(self, w: impl std::io::Write + Send + 'static) -> Sink
    where
        Out<I, C>: std::fmt::Display,
    {
        self.write_to_with("lines.write", w, |w, x| write!(w, "{x}").map(|()| 1))
    }

    /// Writes each record as one line of JSON to any writer, in a sink of kind `ndjson.write`;
    /// errors as for [`write_lines_to`](Stream::write_lines_to).
    ///
    /// # Examples
    ///
    /// ```
    /// let p = millrace::Pipeline::new();
    /// p.source("n", vec![1u32, 2]).write_ndjson_to(std::io::sink()).name("out");
    /// assert_eq!(p.run().unwrap().stage("out").unwrap().records_out, 2);
    /// ```
    pub fn write_ndjson_to(self, w: impl std::io::Write + Send + 'static) -> Sink
    where
        Out<I, C>: serde::Serialize,
    {
        self.write_to_with("ndjson.write", w, |w, x| {
            serde_json::to_writer(&mut *w, x)
                .map(|()| 1)
                .map_err(std::io::Error::from)
        })
    }
}
