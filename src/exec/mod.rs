//! The `exec` stage: records go to an external process as NDJSON on its stdin and come back as
//! NDJSON on its stdout, following the Unix rules the seeds learned the hard way:
//!
//! - one thread writes stdin, the stage's own thread reads stdout line by line (never the whole
//!   output), one thread drains stderr into the log (a full stderr pipe would block the child)
//!   and keeps its last lines for error messages;
//! - the parent's copies of the pipe ends are closed (std does it; stdin is closed at end of
//!   input, which is how the child learns the input ended);
//! - every child is waited for and its exit status checked: non-zero is a stage error carrying
//!   the last stderr lines;
//! - when the child stops reading (EPIPE), or downstream stops early, that is a normal stop;
//!   a child silent on stdout for longer than `timeout` since it last wrote a line or was last
//!   given input is killed with its process group and reported; an over-long or invalid line
//!   is an error naming the line;
//! - the environment is scrubbed to an allowlist plus what the stage sets, and the child runs
//!   in a process group of its own so that it and its children can be killed together;
//! - `limits` (and a process plugin's Landlock and seccomp sandbox) are applied in the child
//!   by [`crate::sandbox`]; a child killed at its CPU limit, or failing under an address-space
//!   limit, is reported with that limit.

pub(crate) mod live;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::channel::InputHead;
use crate::error::{Error, Location};
use crate::operator::Halt;
use crate::runtime::{Cx, Head, Pull};
use crate::source::Chunk;
use crate::sync::thread::{self, JoinHandle};
use crate::sync::{AtomicBool, AtomicU64, Mutex, Ordering};

/// Environment variables a child inherits (all others are removed).
const ENV_ALLOWLIST: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER"];
/// Stderr lines kept for an error message.
const STDERR_TAIL: usize = 20;

/// What an `exec` stage runs.
#[derive(Debug, Clone)]
pub(crate) struct ExecSpec {
    /// The program and its arguments.
    pub command: Vec<String>,
    /// Variables set for the child, on top of the allowlist.
    pub env: Vec<(String, String)>,
    /// Its working directory.
    pub cwd: Option<PathBuf>,
    /// Longest the child may stay silent on stdout while it has input or work.
    pub timeout: Option<Duration>,
    /// Longest stdout line accepted.
    pub max_line_bytes: usize,
    /// Resource limits set in the child.
    pub limits: crate::sandbox::Limits,
    /// A process plugin's permissions (Landlock, seccomp); `None` for a plain `exec` stage.
    pub sandbox: Option<crate::sandbox::Policy>,
    /// The plugin whose node this stage runs: stderr is logged under `plugin::<name>` (else
    /// under `plugin::<stage>`).
    pub plugin: Option<String>,
    /// The stage's `log_level`: stderr lines above it are not logged (still kept for errors).
    pub log_level: log::LevelFilter,
    /// For a version of a reloadable process plugin: the private copy of the plugin's
    /// directory it runs from (removed with the last holder).
    pub plugin_copy: Option<Arc<PluginCopy>>,
}

/// A private copy of a process plugin's directory: the code of one version, immune to edits of
/// the original (a process reads its program from disk when it starts, which may be long after
/// its version was built). It lives in a private directory of its own (0700, an unpredictable
/// name: see [`crate::private_dir`]), removed when the last version using it is gone.
#[derive(Debug)]
pub(crate) struct PluginCopy {
    _private: crate::private_dir::PrivateDir,
}

/// Bounds on a plugin directory copied for a version.
const COPY_LIMITS: crate::private_dir::CopyLimits = crate::private_dir::CopyLimits {
    files: 1000,
    bytes: 256 << 20,
};

impl ExecSpec {
    /// For a process plugin's stage: the same spec running from a fresh private copy of the
    /// plugin's directory (its command, working directory and sandbox rewritten to the copy).
    /// A plain `exec` stage is returned as it is.
    pub(crate) fn snapshot_plugin(&self) -> Result<ExecSpec, String> {
        let Some(policy) = &self.sandbox else {
            return Ok(self.clone());
        };
        let src = policy.plugin_dir.clone();
        let name = self.plugin.as_deref().unwrap_or("plugin");
        let private = crate::private_dir::PrivateDir::new("millrace-plugin-")
            .map_err(|e| format!("cannot copy plugin `{name}` from {}: {e}", src.display()))?;
        // `<private>/<name>`: the copy keeps the plugin's name for its working directory.
        let dst = private.path().join(name);
        let copy = PluginCopy { _private: private };
        crate::private_dir::copy_dir(&src, &dst, COPY_LIMITS).map_err(|e| {
            format!(
                "cannot copy plugin `{name}` from {} to {}: {e}",
                src.display(),
                dst.display()
            )
        })?;
        let mut s = self.clone();
        let moved = |p: &Path| match p.strip_prefix(&src) {
            Ok(rest) => dst.join(rest),
            Err(_) => p.to_path_buf(),
        };
        s.cwd = s.cwd.as_deref().map(moved);
        for arg in &mut s.command {
            if Path::new(arg.as_str()).is_absolute() {
                *arg = moved(Path::new(arg.as_str())).display().to_string();
            }
        }
        if let Some(p) = &mut s.sandbox {
            p.plugin_dir = dst;
        }
        s.plugin_copy = Some(Arc::new(copy));
        Ok(s)
    }
}

impl ExecSpec {
    fn shown(&self) -> String {
        self.command.join(" ")
    }
}

/// How an exec stage's records travel to and from the child: as values (parsed and
/// serialised) or as blocks of NDJSON lines (bytes, checked but never parsed; the byte path).
pub(crate) trait Wire: Send + Sized + 'static {
    /// Records in a batch, for the metrics.
    fn records(batch: &[Self]) -> u64;
    /// Writes the batch to the child as NDJSON lines, draining it.
    fn write_batch<W: Write>(w: &mut W, batch: &mut Vec<Self>) -> std::io::Result<()>;
}

impl Wire for Value {
    fn records(batch: &[Self]) -> u64 {
        batch.len() as u64
    }

    fn write_batch<W: Write>(w: &mut W, batch: &mut Vec<Self>) -> std::io::Result<()> {
        for v in batch.drain(..) {
            serde_json::to_writer(&mut *w, &v).map_err(std::io::Error::from)?;
            w.write_all(b"\n")?;
        }
        Ok(())
    }
}

impl Wire for Chunk {
    fn records(batch: &[Self]) -> u64 {
        batch.iter().map(|c| c.records).sum()
    }

    fn write_batch<W: Write>(w: &mut W, batch: &mut Vec<Self>) -> std::io::Result<()> {
        for c in batch.drain(..) {
            w.write_all(&c.data)?;
        }
        Ok(())
    }
}

/// The head of an `exec` stage instance: starts the child on first pull, reads its stdout.
pub(crate) struct ExecHead<T> {
    name: Arc<str>,
    spec: Arc<ExecSpec>,
    input: Option<InputHead<T>>,
    running: Option<Running>,
}

struct Running {
    child: Child,
    stdout: BufReader<ChildStdout>,
    writer: Option<JoinHandle<Result<(), Error>>>,
    stderr: Option<JoinHandle<()>>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    /// Tells the writer to stop.
    stop: Arc<AtomicBool>,
    /// When the writer last wrote input (run clock, ms): a child waiting for input is not
    /// silent, only one that has input and says nothing.
    fed_at: Arc<AtomicU64>,
    line: u64,
    raw: Vec<u8>,
    /// When stdout last produced a line (run clock, ms).
    heard: u64,
    exited: bool,
}

impl<T: Wire> ExecHead<T> {
    pub(crate) fn new(name: Arc<str>, input: InputHead<T>, spec: Arc<ExecSpec>) -> Self {
        ExecHead {
            name,
            spec,
            input: Some(input),
            running: None,
        }
    }

    fn error(&self, message: String) -> Halt {
        Halt::Failed(Error::Operator {
            stage: self.name.to_string(),
            source: message.into(),
        })
    }

    /// Starts the child now rather than at the first pull (a reload starts the new version's
    /// child while the old one finishes).
    pub(crate) fn start_now(&mut self, cx: &Cx) -> Result<(), Halt> {
        if self.running.is_none() {
            self.start(cx)?;
        }
        Ok(())
    }

    fn start(&mut self, cx: &Cx) -> Result<(), Halt> {
        let spec = &self.spec;
        let mut cmd = Command::new(&spec.command[0]);
        cmd.args(&spec.command[1..])
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        for k in ENV_ALLOWLIST {
            if let Some(v) = std::env::var_os(k) {
                cmd.env(k, v);
            }
        }
        for (k, v) in &spec.env {
            cmd.env(k, v);
        }
        if let Some(dir) = &spec.cwd {
            cmd.current_dir(dir);
        }
        let sandboxed = self.sandbox(&mut cmd)?;
        let mut child = cmd.spawn().map_err(|e| {
            let within = if sandboxed { " in its sandbox" } else { "" };
            self.error(format!("cannot start `{}`{within}: {e}", spec.shown()))
        })?;
        drop(cmd); // closes the Landlock ruleset the hook held
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        grow_pipe(&stdin);
        grow_pipe(&stdout);
        let stderr = child.stderr.take().expect("piped");

        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL)));
        let target = format!("plugin::{}", spec.plugin.as_deref().unwrap_or(&self.name));
        let prefix = match spec.plugin {
            Some(_) => format!("[{}] ", self.name),
            None => String::new(),
        };
        let level = spec.log_level;
        let t = Arc::clone(&tail);
        let stderr = thread::Builder::new()
            .name(format!("millrace:{}:stderr", self.name))
            .spawn(move || drain_stderr(stderr, &target, &prefix, level, &t))
            .map_err(|e| self.error(format!("cannot start a stderr thread: {e}")))?;

        let stop = Arc::new(AtomicBool::new(false));
        let fed_at = Arc::new(AtomicU64::new(cx.run.now_ms()));
        let input = self.input.take().expect("started once");
        let wcx = cx.clone_for_thread();
        let s = Arc::clone(&stop);
        let fed = Arc::clone(&fed_at);
        let name = Arc::clone(&self.name);
        let writer = thread::Builder::new()
            .name(format!("millrace:{}:stdin", self.name))
            .spawn(move || write_stdin(&wcx, input, stdin, &s, &fed, &name));
        let writer = match writer {
            Ok(w) => w,
            Err(e) => {
                kill_group(&mut child);
                let _ = child.wait();
                let _ = stderr.join();
                return Err(self.error(format!("cannot start a stdin thread: {e}")));
            }
        };
        self.running = Some(Running {
            child,
            stdout: BufReader::with_capacity(64 * 1024, stdout),
            writer: Some(writer),
            stderr: Some(stderr),
            stderr_tail: tail,
            stop,
            fed_at,
            line: 0,
            raw: Vec::new(),
            heard: cx.run.now_ms(),
            exited: false,
        });
        Ok(())
    }

    /// Prepares the child's limits and sandbox in this process and installs the hook that
    /// applies them after `fork`; warns about features this kernel lacks. Returns whether a hook
    /// was installed.
    fn sandbox(&self, cmd: &mut Command) -> Result<bool, Halt> {
        let spec = &self.spec;
        if spec.limits.is_empty() && spec.sandbox.is_none() {
            return Ok(false);
        }
        let path = spec
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.into())
            .or_else(|| std::env::var_os("PATH"));
        let setup = crate::sandbox::ChildSetup::prepare(
            &spec.limits,
            spec.sandbox.as_ref(),
            &spec.command[0],
            path.as_ref(),
            spec.cwd.as_deref(),
            crate::sandbox::support(),
        )
        .map_err(|e| self.error(format!("cannot prepare the sandbox: {e}")))?;
        for m in &setup.missing {
            log::warn!("stage `{}`: {m}", self.name);
        }
        if setup.is_empty() {
            return Ok(false);
        }
        let hook = Arc::new(setup).hook();
        // SAFETY: the hook runs in the forked child before exec and only makes
        // async-signal-safe system calls on data prepared here (see ChildSetup::apply_in_child).
        unsafe {
            cmd.pre_exec(hook);
        }
        Ok(true)
    }

    /// Why a failed child failed, with its limits where they explain it.
    fn failure(&self, status: std::process::ExitStatus) -> String {
        use std::os::unix::process::ExitStatusExt;
        let limits = &self.spec.limits;
        if let Some(n) = limits.cpu_seconds {
            match status.signal() {
                Some(libc::SIGXCPU) => {
                    return format!("exceeded its CPU limit (cpu_seconds = {n}): killed by SIGXCPU")
                }
                Some(libc::SIGKILL) => {
                    return format!("exceeded its CPU limit (cpu_seconds = {n}): killed by SIGKILL")
                }
                _ => {}
            }
        }
        let how = match status.code() {
            Some(c) => format!("exited with status {c}"),
            None => format!("was killed ({status})"),
        };
        match limits.address_space {
            Some(b) => format!(
                "{how} (limits: address_space = {})",
                crate::sandbox::show_size(b)
            ),
            None => how,
        }
    }

    /// Stdout ended: join the threads, wait for the child, check its status.
    fn finish(&mut self) -> Result<(), Halt> {
        let shown = self.spec.shown();
        let r = self.running.as_mut().expect("running");
        // Stdout ended: whatever input is left, the child will not answer it.
        r.stop.store(true, Ordering::Release);
        let written = r.writer.take().map(|w| w.join());
        let status = r.child.wait();
        r.exited = true;
        if let Some(s) = r.stderr.take() {
            let _ = s.join();
        }
        let tail: Vec<String> = r.stderr_tail.lock().iter().cloned().collect();
        let status = status.map_err(|e| self.error(format!("cannot wait for `{shown}`: {e}")))?;
        if !status.success() {
            let how = self.failure(status);
            let stderr = if tail.is_empty() {
                String::new()
            } else {
                format!("; last stderr lines:\n  {}", tail.join("\n  "))
            };
            return Err(self.error(format!("`{shown}` {how}{stderr}")));
        }
        match written {
            Some(Ok(Err(e))) => Err(Halt::Failed(e)),
            Some(Err(_)) => Err(self.error("the stdin thread panicked".into())),
            _ => Ok(()),
        }
    }

    /// Kills the child (and its process group) after a failure.
    fn abort(&mut self) {
        if let Some(r) = self.running.as_mut() {
            kill_group(&mut r.child);
        }
    }
}

impl<T: Wire> ExecHead<T> {
    /// Waits, in slices, until stdout has bytes to read (`Ok(None)`), watching cancellation,
    /// the silence timeout and the flush deadline: `Ok(Some(Pull::Idle))` when records are
    /// held (`holding`) or the tail's flush is due.
    fn wait_output(
        &mut self,
        cx: &Cx,
        holding: bool,
        flush_at: Option<u64>,
    ) -> Result<Option<Pull>, Halt> {
        let timeout = self.spec.timeout;
        loop {
            let r = self.running.as_mut().expect("started");
            if !r.stdout.buffer().is_empty() {
                return Ok(None);
            }
            if cx.run.is_cancelled() {
                return Err(Halt::Done);
            }
            if crate::source::poll_readable(r.stdout.get_ref(), 100) {
                return Ok(None);
            }
            if let Some(t) = timeout {
                let active = r.heard.max(r.fed_at.load(Ordering::Acquire));
                if cx.run.now_ms().saturating_sub(active) > t.as_millis() as u64 {
                    let shown = self.spec.shown();
                    self.abort();
                    return Err(self.error(format!(
                        "`{shown}` was silent for longer than its timeout ({t:?}): killed"
                    )));
                }
            }
            if holding || flush_at.is_some_and(|at| cx.clock_ms() >= at) {
                return Ok(Some(Pull::Idle));
            }
        }
    }

    fn stdout_error(&self, e: std::io::Error) -> Halt {
        Halt::Failed(Error::Io {
            stage: self.name.to_string(),
            path: format!("{} (stdout)", self.spec.shown()),
            source: e,
        })
    }

    /// A bad stdout line: kill the child, name the line.
    fn bad_line(&mut self, line: u64, message: String) -> Halt {
        self.abort();
        Halt::Failed(Error::Record {
            stage: self.name.to_string(),
            location: Location {
                path: format!("`{}` stdout", self.spec.shown()),
                line,
            },
            message,
        })
    }
}

impl Head<Value> for ExecHead<Value> {
    fn counts_input(&self) -> bool {
        true // records in are counted by the writer; out are the child's records
    }

    fn pull(&mut self, cx: &Cx, buf: &mut Vec<Value>, flush_at: Option<u64>) -> Result<Pull, Halt> {
        if self.running.is_none() {
            self.start(cx)?;
        }
        let cap = cx.batch_size();
        let max = self.spec.max_line_bytes;
        while buf.len() < cap {
            if self.running.as_ref().expect("started").exited {
                return Ok(Pull::End);
            }
            if let Some(p) = self.wait_output(cx, !buf.is_empty(), flush_at)? {
                return Ok(p);
            }
            let r = self.running.as_mut().expect("started");
            let n = crate::source::read_line_bounded(&mut r.stdout, max + 1, &mut r.raw);
            let n = n.map_err(|e| self.stdout_error(e))?;
            let r = self.running.as_mut().expect("started");
            r.heard = cx.run.now_ms();
            if n == 0 {
                self.finish()?;
                return Ok(Pull::End);
            }
            r.line += 1;
            let line = r.line;
            if n > max {
                return Err(self.bad_line(line, format!("line longer than max_line_bytes ({max})")));
            }
            match crate::ndjson::parse_object(&r.raw) {
                Ok(Value::Null) => {}
                Ok(v) => buf.push(v),
                Err(message) => return Err(self.bad_line(line, message)),
            }
        }
        Ok(Pull::Data)
    }
}

/// Blocks of stdout handed on at about this size (a pipe read gives at most 64 KiB).
const BLOCK_BYTES: usize = 256 * 1024;

impl Head<Chunk> for ExecHead<Chunk> {
    fn counts_input(&self) -> bool {
        true // records in are counted by the writer; out are the child's records
    }

    /// The byte path: reads what stdout has, cuts it after the last whole line, checks every
    /// line (a JSON object, not longer than `max_line_bytes`) and hands the block on unparsed.
    fn pull(&mut self, cx: &Cx, buf: &mut Vec<Chunk>, flush_at: Option<u64>) -> Result<Pull, Halt> {
        if self.running.is_none() {
            self.start(cx)?;
        }
        let max = self.spec.max_line_bytes;
        loop {
            if self.running.as_ref().expect("started").exited {
                return Ok(Pull::End);
            }
            if let Some(p) = self.wait_output(cx, false, flush_at)? {
                return Ok(p);
            }
            let r = self.running.as_mut().expect("started");
            let eof = loop {
                let got = match r.stdout.fill_buf() {
                    Ok(b) => b,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(self.stdout_error(e)),
                };
                if got.is_empty() {
                    break true;
                }
                let n = got.len();
                r.raw.extend_from_slice(got);
                r.stdout.consume(n);
                // Take more while it is there, up to a block.
                if r.raw.len() >= BLOCK_BYTES
                    || !crate::source::poll_readable(r.stdout.get_ref(), 0)
                {
                    break false;
                }
            };
            r.heard = cx.run.now_ms();
            let cut = if eof {
                r.raw.len()
            } else {
                match memchr::memrchr(b'\n', &r.raw) {
                    Some(i) => i + 1,
                    None if r.raw.len() > max => {
                        let line = r.line + 1;
                        return Err(
                            self.bad_line(line, format!("line longer than max_line_bytes ({max})"))
                        );
                    }
                    None => continue,
                }
            };
            let rest = r.raw.split_off(cut);
            let mut data = std::mem::replace(&mut r.raw, rest);
            let first_line = r.line + 1;
            r.line += memchr::memchr_iter(b'\n', &data).count() as u64;
            // `max` counts the newline, as on the value path.
            let checked = crate::ndjson::check_block(&mut data, first_line, max.saturating_sub(1));
            let records = match checked {
                Ok(n) => n,
                Err(bad) => {
                    let message = if bad.message.starts_with("line longer") {
                        format!("line longer than max_line_bytes ({max})")
                    } else {
                        bad.message
                    };
                    return Err(self.bad_line(bad.line, message));
                }
            };
            if records > 0 {
                // The channel counts one record per block: add the rest (see Chunk::records).
                crate::metrics::InstanceMetrics::add(&cx.metrics.records_out, records - 1);
                buf.push(Chunk {
                    first_line,
                    data,
                    records,
                });
            }
            if eof {
                self.finish()?;
                return Ok(Pull::End);
            }
            if !buf.is_empty() {
                // Idle, not Data: the tail sends each block at once instead of gathering a
                // batch of `batch_size` blocks (which would hold up to 256 MiB).
                return Ok(Pull::Idle);
            }
        }
    }
}

impl<T> Drop for ExecHead<T> {
    /// However the stage ends (early stop, failure, cancel, panic): stop the writer, kill and
    /// reap the child, join every thread. Nothing outlives the stage.
    fn drop(&mut self) {
        let Some(r) = self.running.as_mut() else {
            return;
        };
        r.stop.store(true, Ordering::Release);
        if !r.exited {
            kill_group(&mut r.child);
            let _ = r.child.wait();
        }
        if let Some(w) = r.writer.take() {
            let _ = w.join();
        }
        if let Some(s) = r.stderr.take() {
            let _ = s.join();
        }
    }
}

/// Pipe capacity asked for on the child's stdin and stdout: 1 MiB (Linux's default maximum
/// for unprivileged processes) instead of 64 KiB means fewer, larger reads and writes and fewer
/// context switches between the engine and the child.
const PIPE_BYTES: libc::c_int = 1 << 20;

/// Grows a pipe's buffer where the platform allows; failure only costs speed.
fn grow_pipe(fd: &impl std::os::fd::AsRawFd) {
    #[cfg(target_os = "linux")]
    // SAFETY: fcntl(F_SETPIPE_SZ) on a pipe descriptor we own; no memory is passed. An error
    // (EPERM above the limit, EBUSY) leaves the pipe as it was.
    unsafe {
        libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = fd;
}

fn kill_group(child: &mut Child) {
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill(2) with a negative pid signals the process group the child leads (it was
    // started with process_group(0)); no memory is involved. A group already gone is ESRCH.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
    let _ = child.kill();
}

/// The stdin thread: input batches as NDJSON lines, flushed after each batch; end of input
/// closes stdin. A child that stops reading (EPIPE) is a normal stop: the input is dropped,
/// which stops the stages upstream.
fn write_stdin<T: Wire>(
    cx: &Cx,
    mut input: InputHead<T>,
    stdin: std::process::ChildStdin,
    stop: &AtomicBool,
    fed_at: &AtomicU64,
    name: &str,
) -> Result<(), Error> {
    let mut w = BufWriter::with_capacity(64 * 1024, stdin);
    let mut batch = Vec::new();
    let io = |e: std::io::Error| Error::Io {
        stage: name.to_string(),
        path: "stdin of the child".into(),
        source: e,
    };
    loop {
        if stop.load(Ordering::Acquire) {
            return Ok(());
        }
        // Wake up at least every 100 ms to see `stop`.
        let pull = match input.pull(cx, &mut batch, Some(cx.run.now_ms() + 100)) {
            Ok(p) => p,
            Err(_) => return Ok(()), // cancelled or failing: the run reports it
        };
        if !batch.is_empty() {
            crate::metrics::InstanceMetrics::add(&cx.metrics.records_in, T::records(&batch));
            crate::metrics::InstanceMetrics::add(&cx.metrics.batches_in, 1);
        }
        let flushed = T::write_batch(&mut w, &mut batch).and_then(|()| w.flush());
        fed_at.fetch_max(cx.run.now_ms(), Ordering::AcqRel);
        match flushed {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(io(e)),
        }
        if pull == Pull::End {
            return Ok(()); // dropping `w` closes the child's stdin
        }
    }
}

/// The stderr thread: every line to the log under `target`, at the level it starts with
/// (see [`stderr_level`]) when that is within the stage's `level`; the last few lines kept.
fn drain_stderr(
    stderr: std::process::ChildStderr,
    target: &str,
    prefix: &str,
    level: log::LevelFilter,
    tail: &Mutex<VecDeque<String>>,
) {
    let mut r = BufReader::new(stderr);
    let mut raw = Vec::new();
    loop {
        // Bounded: an endless line is cut into 64 KiB pieces.
        match crate::source::read_line_bounded(&mut r, 64 * 1024, &mut raw) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let line = String::from_utf8_lossy(&raw).trim_end().to_string();
                let at = stderr_level(&line);
                if at <= level {
                    log::log!(target: target, at, "{prefix}{line}");
                }
                let mut t = tail.lock();
                if t.len() == STDERR_TAIL {
                    t.pop_front();
                }
                t.push_back(line);
            }
        }
    }
}

/// The level a stderr line announces: `ERROR`, `WARN`/`WARNING`, `INFO`, `DEBUG` or `TRACE`
/// at its start (optionally in brackets, then `:`, `]` or a space), as Python's `logging` and
/// most loggers write it; anything else is a warning.
pub(crate) fn stderr_level(line: &str) -> log::Level {
    let word = line.strip_prefix('[').unwrap_or(line);
    let end = word.find([':', ']', ' ']).unwrap_or(word.len());
    match &word[..end] {
        "ERROR" | "CRITICAL" | "FATAL" => log::Level::Error,
        "WARN" | "WARNING" => log::Level::Warn,
        "INFO" => log::Level::Info,
        "DEBUG" => log::Level::Debug,
        "TRACE" => log::Level::Trace,
        _ => log::Level::Warn,
    }
}

#[cfg(test)]
mod tests {
    use super::stderr_level;
    use log::Level;

    #[test]
    fn stderr_lines_announce_their_level() {
        for (line, want) in [
            ("ERROR: boom", Level::Error),
            ("CRITICAL:root:boom", Level::Error),
            ("WARNING:root:careful", Level::Warn),
            ("[WARN] careful", Level::Warn),
            ("INFO:plugin:hello", Level::Info),
            ("[DEBUG] detail", Level::Debug),
            ("TRACE x", Level::Trace),
            ("Traceback (most recent call last):", Level::Warn),
            ("information", Level::Warn),
            ("", Level::Warn),
        ] {
            assert_eq!(stderr_level(line), want, "{line:?}");
        }
    }
}
