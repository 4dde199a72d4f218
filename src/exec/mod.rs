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
//!   an over-long or invalid line is an error naming the line;
//! - `timeout` bounds how long a child that *owes* output may stay silent: it owes output once
//!   it has been handed input since its last whole stdout line, once its input has ended, and
//!   while it has written part of a line. The clock starts when it starts owing and restarts
//!   whenever it writes to stdout; input handed to it meanwhile does not restart it (a hung
//!   child is killed also while upstream trickles records into its pipe), and a child that has
//!   answered everything it was given is waiting for input and never times out;
//! - at the end of stdout the stage waits (cancellably, and within `timeout`) for the child to
//!   exit, then kills what is left of its process group (a background grandchild holding
//!   stderr or stdin open) before reaping it, so that every join that follows ends;
//! - an input that closes without its end markers (a protocol breach upstream) fails the run
//!   with an error naming the stage, never passes for the end of the input;
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
    /// Longest the child may stay silent on stdout while it owes output (see the module
    /// documentation for when it does).
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
    /// What to do with a stdout line that is not a JSON object or is longer than
    /// `max_line_bytes` (the stage's `on_error`; the letter's `raw` is the line — its first
    /// `max_line_bytes` bytes when too long — and `line` its number in stdout). A non-zero exit
    /// and a timeout still fail the stage.
    pub on_error: crate::dead_letter::OnError,
    /// Why the stage cannot be checkpointed (a process plugin node whose manifest does not
    /// declare `stateless = true`); `None` for a plain `exec` stage and stateless nodes.
    pub checkpoint_refusal: Option<String>,
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

    /// Whether the stage can be checkpointed: an `exec` stage and a stateless plugin node hold
    /// no state (after a resume the child starts afresh on the records after the checkpoint);
    /// a node whose manifest does not say `stateless = true` is refused.
    pub(crate) fn state_support(&self) -> crate::checkpoint::StateSupport {
        match &self.checkpoint_refusal {
            None => crate::checkpoint::StateSupport::Stateless,
            Some(why) => crate::checkpoint::StateSupport::Unsupported(why.clone()),
        }
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
    /// Tells the stderr thread to stop once its pipe has nothing more to read: set when the
    /// child and its group are gone, so that a process that left the group and holds stderr
    /// open cannot hold up the stage.
    stderr_stop: Arc<AtomicBool>,
    /// What the writer has handed to the child.
    feed: Arc<Feed>,
    /// `feed.handed` when stdout last completed a line: batches handed after it are unanswered.
    answered: u64,
    /// Since when (run clock, ms) the child has owed output without writing any; `None` until
    /// a check finds it owing (see [`Running::silent_for`]).
    owing_since: Option<u64>,
    line: u64,
    /// The line being read (value path) or the bytes after the last whole line (byte path).
    raw: Vec<u8>,
    /// Value path: the rest of an over-long line that the error policy already took is being
    /// read and dropped (in pieces of at most `max_line_bytes`, so memory stays bounded).
    skipping: bool,
    exited: bool,
}

/// What the stdin writer tells the stage's thread about the child's input.
struct Feed {
    /// Non-empty batches handed to the child (written into its stdin pipe) so far.
    handed: AtomicU64,
    /// The writer is done: the child's stdin is closed (end of input, or the child stopped
    /// reading) or about to be.
    closed: AtomicBool,
}

/// Sets [`Feed::closed`] when the writer ends, however it ends.
struct ClosesFeed<'a>(&'a Feed);

impl Drop for ClosesFeed<'_> {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::Release);
    }
}

impl Running {
    /// Whether the child owes output: it was handed input since its last whole line, its input
    /// has ended, or it has written part of a line.
    fn owes(&self) -> bool {
        self.feed.handed.load(Ordering::Acquire) > self.answered
            || self.feed.closed.load(Ordering::Acquire)
            || !self.raw.is_empty()
    }

    /// How long (ms) the child has owed output without writing any, checked at `now`: the clock
    /// starts at the first check that finds it owing (checks run every 100 ms at most while the
    /// stage waits for output) and stops when it owes nothing.
    fn silent_for(&mut self, now: u64) -> u64 {
        if !self.owes() {
            self.owing_since = None;
            return 0;
        }
        now.saturating_sub(*self.owing_since.get_or_insert(now))
    }

    /// The child wrote to stdout: its silence clock restarts; a whole line (`line`) answers the
    /// input handed so far.
    fn heard(&mut self, line: bool) {
        if line {
            self.answered = self.feed.handed.load(Ordering::Acquire);
        }
        self.owing_since = None;
    }
}

/// A fault switch for the tests: makes the spawn of a helper thread fail on this thread, and
/// records the pid of the last child started on it.
#[cfg(test)]
pub(crate) mod fault {
    use std::cell::Cell;

    std::thread_local! {
        /// The helper whose spawn fails: `"stderr"` or `"stdin"`.
        pub(crate) static FAIL_SPAWN: Cell<Option<&'static str>> = const { Cell::new(None) };
        /// The pid of the last child started on this thread.
        pub(crate) static LAST_PID: Cell<u32> = const { Cell::new(0) };
    }
}

/// Spawns one of the stage's helper threads (`which`: `"stderr"` or `"stdin"`).
fn spawn_helper<F, T>(name: String, which: &'static str, f: F) -> std::io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    #[cfg(test)]
    if fault::FAIL_SPAWN.with(|w| w.get()) == Some(which) {
        return Err(std::io::Error::other(format!(
            "{which} spawn failed (test fault)"
        )));
    }
    let _ = which;
    thread::Builder::new().name(name).spawn(f)
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
        #[cfg(test)]
        fault::LAST_PID.with(|p| p.set(child.id()));
        // From here on every failure kills and reaps the child (and joins what was started):
        // nothing started here outlives a failed start.
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
        let stderr_stop = Arc::new(AtomicBool::new(false));
        let quiet = Arc::clone(&stderr_stop);
        let stderr = spawn_helper(
            format!("millrace:{}:stderr", self.name),
            "stderr",
            move || drain_stderr(stderr, &quiet, &target, &prefix, level, &t),
        );
        let stderr = match stderr {
            Ok(h) => h,
            Err(e) => {
                kill_group(&mut child);
                let _ = child.wait();
                return Err(self.error(format!("cannot start a stderr thread: {e}")));
            }
        };

        let stop = Arc::new(AtomicBool::new(false));
        let feed = Arc::new(Feed {
            handed: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        });
        let input = self.input.take().expect("started once");
        let wcx = cx.clone_for_thread();
        let s = Arc::clone(&stop);
        let f = Arc::clone(&feed);
        let name = Arc::clone(&self.name);
        let writer = spawn_helper(
            format!("millrace:{}:stdin", self.name),
            "stdin",
            move || write_stdin(&wcx, input, stdin, &s, &f, &name),
        );
        let writer = match writer {
            Ok(w) => w,
            Err(e) => {
                kill_group(&mut child);
                let _ = child.wait();
                stderr_stop.store(true, Ordering::Release);
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
            stderr_stop,
            feed,
            answered: 0,
            owing_since: None,
            line: 0,
            raw: Vec::new(),
            skipping: false,
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

    /// Stdout ended: wait for the child to exit, end the rest of its process group, reap it,
    /// join the threads, check its status.
    ///
    /// The child is waited for without reaping it, so that its pid still names its process
    /// group (a pid is not reused while it is a zombie): killing the group after the leader
    /// exited can then never hit another process's group. Killing it ends any background
    /// grandchild that holds stdin or stderr open, so the joins that follow end too. The wait
    /// watches cancellation and, with `timeout`, gives the child that long to exit.
    fn finish(&mut self, cx: &Cx) -> Result<(), Halt> {
        let shown = self.spec.shown();
        let timeout = self.spec.timeout;
        let r = self.running.as_mut().expect("running");
        // Stdout ended: whatever input is left, the child will not answer it.
        r.stop.store(true, Ordering::Release);
        let ended_at = cx.run.now_ms();
        let mut nap = 1;
        while !exited_unreaped(&r.child) {
            if cx.run.is_cancelled() {
                return Err(Halt::Done); // the drop kills and reaps it
            }
            if let Some(t) = timeout {
                if cx.run.now_ms().saturating_sub(ended_at) > t.as_millis() as u64 {
                    self.abort();
                    return Err(self.error(format!(
                        "`{shown}` closed its stdout but did not exit within its timeout \
                         ({t:?}): killed"
                    )));
                }
            }
            std::thread::sleep(Duration::from_millis(nap));
            nap = (nap * 2).min(50);
        }
        kill_group(&mut r.child);
        let status = r.child.wait();
        r.exited = true;
        let written = r.writer.take().map(|w| w.join());
        r.stderr_stop.store(true, Ordering::Release);
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
                if r.silent_for(cx.run.now_ms()) > t.as_millis() as u64 {
                    let shown = self.spec.shown();
                    self.abort();
                    return Err(self.error(format!(
                        "`{shown}` was silent for longer than its timeout ({t:?}) while it \
                         owed output: killed"
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

    fn state_support(&self) -> crate::checkpoint::StateSupport {
        self.spec.state_support()
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
            let got = take_line(&mut r.stdout, max + 1, &mut r.raw);
            let got = got.map_err(|e| self.stdout_error(e))?;
            let r = self.running.as_mut().expect("started");
            match got {
                // Part of a line: wait for the rest (watching the timeout and cancellation).
                Got::More => {
                    r.heard(false);
                    if r.skipping {
                        r.raw.clear();
                    }
                    continue;
                }
                Got::Eof if r.raw.is_empty() => {
                    self.finish(cx)?;
                    return Ok(Pull::End);
                }
                Got::Line | Got::Eof => r.heard(true),
            }
            if r.skipping {
                // More of the over-long line already rejected: drop it, up to its newline.
                r.skipping = !r.raw.ends_with(b"\n");
                r.raw.clear();
                continue;
            }
            r.line += 1;
            let line = r.line;
            let fail = self.spec.on_error == crate::dead_letter::OnError::Fail;
            if r.raw.len() > max {
                let message = format!("line longer than max_line_bytes ({max})");
                if fail {
                    return Err(self.bad_line(line, message));
                }
                // The letter carries the line's first `max` bytes; the rest is dropped as it
                // arrives.
                r.skipping = !r.raw.ends_with(b"\n");
                r.raw.truncate(max);
                self.reject_line(cx, line, message)?;
                continue;
            }
            match crate::ndjson::parse_object(&r.raw) {
                Ok(Value::Null) => {}
                Ok(v) => buf.push(v),
                Err(message) if fail => return Err(self.bad_line(line, message)),
                Err(message) => self.reject_line(cx, line, message)?,
            }
            self.running.as_mut().expect("started").raw.clear();
        }
        Ok(Pull::Data)
    }
}

impl ExecHead<Value> {
    /// Applies the stage's (skip or dead-letter) policy to the stdout line `line` held in
    /// `raw`, which it clears: the letter carries the line as `raw` text with its number.
    fn reject_line(&mut self, cx: &Cx, line: u64, message: String) -> Result<(), Halt> {
        let r = self.running.as_mut().expect("started");
        let text = r.raw.strip_suffix(b"\n").unwrap_or(&r.raw);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        let raw = String::from_utf8_lossy(text).into_owned();
        r.raw.clear();
        let rejected = self.spec.on_error.reject(
            &self.name,
            message,
            || crate::dead_letter::Bad::Raw(raw),
            None,
            Some(line),
            |m| Error::Operator {
                stage: self.name.to_string(),
                source: m.into(),
            },
        )?;
        let counter = match rejected {
            crate::dead_letter::Rejected::Skipped => &cx.metrics.skipped,
            crate::dead_letter::Rejected::DeadLettered => &cx.metrics.dead_lettered,
        };
        crate::metrics::InstanceMetrics::add(counter, 1);
        Ok(())
    }
}

/// Blocks of stdout handed on at about this size (a pipe read gives at most 64 KiB).
const BLOCK_BYTES: usize = 256 * 1024;

impl Head<Chunk> for ExecHead<Chunk> {
    fn counts_input(&self) -> bool {
        true // records in are counted by the writer; out are the child's records
    }

    fn state_support(&self) -> crate::checkpoint::StateSupport {
        self.spec.state_support()
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
            r.heard(eof || memchr::memchr(b'\n', &r.raw).is_some());
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
                // And so does the chain after this head (the accounts count records).
                crate::metrics::InstanceMetrics::add(&cx.metrics.chain_in, records - 1);
                buf.push(Chunk {
                    origin: None,
                    first_line,
                    data,
                    records,
                });
            }
            if eof {
                self.finish(cx)?;
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
        r.stderr_stop.store(true, Ordering::Release);
        if let Some(s) = r.stderr.take() {
            let _ = s.join();
        }
    }
}

/// What [`take_line`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Got {
    /// `raw` holds a whole line (with its newline), or `limit` bytes of one.
    Line,
    /// `raw` holds part of a line; the rest is not written yet.
    More,
    /// Stdout ended; `raw` holds the last line (without a newline), if there was one.
    Eof,
}

/// Moves what `r` holds up to and including the next newline into `raw` (at most `limit` bytes
/// in all), reading from the pipe at most once, so that it never blocks once the pipe was
/// readable: a child that writes part of a line and hangs is still seen by the timeout and by
/// cancellation.
fn take_line(r: &mut impl BufRead, limit: usize, raw: &mut Vec<u8>) -> std::io::Result<Got> {
    let buf = loop {
        match r.fill_buf() {
            Ok(b) => break b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    };
    if buf.is_empty() {
        return Ok(Got::Eof);
    }
    let room = &buf[..buf.len().min(limit.saturating_sub(raw.len()))];
    let (n, got) = match memchr::memchr(b'\n', room) {
        Some(i) => (i + 1, Got::Line),
        None if raw.len() + room.len() >= limit => (room.len(), Got::Line),
        None => (room.len(), Got::More),
    };
    raw.extend_from_slice(&room[..n]);
    r.consume(n);
    Ok(got)
}

/// Whether the child has exited, without reaping it (its pid keeps naming its process group
/// until it is reaped). An error (there is no such child) counts as exited: the wait that
/// follows reports it.
fn exited_unreaped(child: &Child) -> bool {
    // SAFETY: an all-zero siginfo_t is a valid value of this plain C struct.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waitid(2) on our own child's pid with a valid pointer to `info`, which lives
        // across the call; WNOWAIT leaves the child waitable (std's `wait` reaps it later).
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                child.id() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        if rc == 0 {
            // SAFETY: waitid succeeded, so `info` is initialised; with WNOHANG and no child
            // that changed state, si_pid is 0 (the struct was zeroed).
            return unsafe { info.si_pid() } != 0;
        }
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return true;
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
    feed: &Feed,
    name: &str,
) -> Result<(), Error> {
    // Declared before `w`: marks the input closed after `w` (the child's stdin) is dropped.
    let _closes = ClosesFeed(feed);
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
            Err(Halt::Failed(e)) if !stop.load(Ordering::Acquire) => {
                // The input closed abnormally (without its end markers): the input is
                // truncated, so the run fails at once rather than the child seeing a clean
                // end of input (the stage's thread sees the cancel and kills the child).
                cx.run.fail(e);
                return Ok(());
            }
            Err(_) => return Ok(()), // cancelled, failing or told to stop
        };
        if !batch.is_empty() {
            crate::metrics::InstanceMetrics::add(&cx.metrics.records_in, T::records(&batch));
            crate::metrics::InstanceMetrics::add(&cx.metrics.batches_in, 1);
            // The child owes an answer from now on; counted before the write, which blocks
            // while the pipe is full (a hung child owes output all the same). A wake-up
            // without input is not input.
            feed.handed.fetch_add(1, Ordering::AcqRel);
        }
        let flushed = T::write_batch(&mut w, &mut batch).and_then(|()| w.flush());
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
    stop: &AtomicBool,
    target: &str,
    prefix: &str,
    level: log::LevelFilter,
    tail: &Mutex<VecDeque<String>>,
) {
    // Non-blocking reads between polls, so that `stop` is seen even while a process outside
    // the child's group holds the pipe open (or has written half a line).
    let blocking = !set_nonblocking(&stderr);
    let mut r = BufReader::new(stderr);
    let mut raw = Vec::new();
    let mut stopping: Option<std::time::Instant> = None;
    loop {
        if stopping.is_none() && stop.load(Ordering::Acquire) {
            stopping = Some(std::time::Instant::now());
        }
        // Told to stop: what is already in the pipe is read, for at most a second.
        if stopping.is_some_and(|t| t.elapsed() > Duration::from_secs(1)) {
            break;
        }
        if blocking && !crate::source::poll_readable(r.get_ref(), 100) {
            if stopping.is_some() {
                break;
            }
            continue;
        }
        // Bounded: an endless line is cut into 64 KiB pieces.
        match take_line(&mut r, 64 * 1024, &mut raw) {
            Ok(Got::Line) => {
                stderr_line(&raw, target, prefix, level, tail);
                raw.clear();
            }
            Ok(Got::More) => {}
            Ok(Got::Eof) => break,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if stopping.is_some() {
                    break;
                }
                crate::source::poll_readable(r.get_ref(), 100);
            }
            Err(_) => break,
        }
    }
    if !raw.is_empty() {
        stderr_line(&raw, target, prefix, level, tail);
    }
}

/// One stderr line: to the log (within the stage's level) and to the kept tail.
fn stderr_line(
    raw: &[u8],
    target: &str,
    prefix: &str,
    level: log::LevelFilter,
    tail: &Mutex<VecDeque<String>>,
) {
    let line = String::from_utf8_lossy(raw).trim_end().to_string();
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

/// Makes reads of `fd` non-blocking; whether that worked. Only for a pipe end the engine
/// alone holds (the flag belongs to the open file, shared by every descriptor of it).
fn set_nonblocking(fd: &impl std::os::fd::AsRawFd) -> bool {
    let fd = fd.as_raw_fd();
    // SAFETY: fcntl(F_GETFL / F_SETFL) on a descriptor we own; no memory is passed.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
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
    use super::*;
    use crate::channel::Message;
    use crate::metrics::InstanceMetrics;
    use crate::runtime::{RunShared, Worker};
    use crate::{Options, RunReport};
    use crossbeam_channel::bounded;
    use log::Level;
    use serde_json::json;

    fn spec(command: &[&str]) -> ExecSpec {
        ExecSpec {
            command: command.iter().map(|c| c.to_string()).collect(),
            env: Vec::new(),
            cwd: None,
            timeout: None,
            max_line_bytes: 1 << 20,
            on_error: Default::default(),
            limits: Default::default(),
            sandbox: None,
            plugin: None,
            log_level: log::LevelFilter::Off,
            plugin_copy: None,
            checkpoint_refusal: None,
        }
    }

    /// An input from two upstream instances that gets a batch, then one end marker, then
    /// closes: a truncated input (the other instance went away without ending).
    fn truncated_input() -> InputHead<Value> {
        let (tx, rx) = bounded(4);
        let (recycle, _recycled) = bounded(4);
        let input = InputHead::new(rx, 2, recycle, None);
        let batch = vec![json!({"i": 1}), json!({"i": 2})];
        tx.send(Message::Data { from: 0, batch }).unwrap();
        tx.send(Message::End { from: 0 }).unwrap();
        input
    }

    /// Runs the head `make` builds on `input` as the only worker of a run (stage `child`),
    /// pulling to the end of its output; the run's result.
    fn run_head<H>(input: InputHead<Value>, make: H) -> crate::Result<RunReport>
    where
        H: FnOnce(InputHead<Value>) -> Box<dyn Head<Value>> + Send + 'static,
    {
        let shared = RunShared::new(Options::default());
        let worker = Worker {
            stage: "child".into(),
            instance: 0,
            source: false,
            dead_letter_side: false,
            support: Vec::new(),
            body: Box::new(move |cx: &Cx| {
                let mut head = make(input);
                let mut buf = Vec::new();
                loop {
                    let pulled = head.pull(cx, &mut buf, None)?;
                    buf.clear();
                    if pulled == Pull::End {
                        return Ok(());
                    }
                }
            }),
        };
        crate::runtime::run(shared, vec![worker])
    }

    fn assert_truncation_error(got: crate::Result<RunReport>) {
        match got {
            Err(e @ Error::Protocol { .. }) => {
                assert_eq!(e.stage(), Some("child"), "{e}");
                assert!(
                    e.to_string()
                        .contains("input closed after 1 of 2 end-of-stream markers"),
                    "{e}"
                );
            }
            other => panic!("a truncated input must fail the run, got {other:?}"),
        }
    }

    /// An exec stage whose input closes after 1 of its 2 end markers fails the run with an
    /// error naming the stage, not a clean end of input (`cat` would end cleanly).
    #[test]
    fn an_exec_input_closed_early_fails_the_run() {
        let got = run_head(truncated_input(), |input| {
            Box::new(ExecHead::new(
                "child".into(),
                input,
                Arc::new(spec(&["cat"])),
            ))
        });
        assert_truncation_error(got);
    }

    /// The same for a reloadable exec stage (its dispatcher reads the input).
    #[test]
    fn a_reloadable_exec_input_closed_early_fails_the_run() {
        let got = run_head(truncated_input(), |input| {
            let spec = crate::versioned::Versioned::new(spec(&["cat"]));
            Box::new(live::ReloadExecHead::new("child".into(), input, spec))
        });
        assert_truncation_error(got);
    }

    /// Whether process `pid` is gone (reaped: a zombie still has its /proc entry), waiting
    /// for it up to 5 s.
    fn gone(pid: u32) -> bool {
        let proc = format!("/proc/{pid}");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while Path::new(&proc).exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        !Path::new(&proc).exists()
    }

    /// A helper thread that cannot be started after the child was: the start fails, naming
    /// the thread, and the child is killed and reaped (no zombie, no orphan).
    #[test]
    fn a_failed_helper_spawn_kills_and_reaps_the_child() {
        for which in ["stderr", "stdin"] {
            let (_tx, rx) = bounded(1);
            let (recycle, _recycled) = bounded(1);
            let input = InputHead::<Value>::new(rx, 1, recycle, None);
            let mut head = ExecHead::new("child".into(), input, Arc::new(spec(&["sleep", "30"])));
            let cx = Cx {
                run: RunShared::new(Options::default()),
                stage: "child".into(),
                instance: 0,
                source: false,
                metrics: Arc::new(InstanceMetrics::default()),
            };
            fault::FAIL_SPAWN.with(|f| f.set(Some(which)));
            let started = head.start_now(&cx);
            fault::FAIL_SPAWN.with(|f| f.set(None));
            match started {
                Err(Halt::Failed(e)) => assert!(
                    e.to_string()
                        .contains(&format!("cannot start a {which} thread")),
                    "{e}"
                ),
                other => panic!("the start must fail, got {other:?}"),
            }
            let pid = fault::LAST_PID.with(|p| p.get());
            assert_ne!(pid, 0, "the child was started");
            assert!(
                gone(pid),
                "child {pid} left behind by a failed {which} spawn"
            );
        }
    }

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
