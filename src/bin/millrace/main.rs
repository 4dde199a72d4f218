//! The `millrace` command: run (and resume), validate and draw TOML pipelines, inspect
//! checkpoint directories.

mod spark;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use std::net::SocketAddr;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use crossbeam_channel::RecvTimeoutError;
use millrace::checkpoint::store::Listing;
use millrace::checkpoint::Start;
use millrace::config::{PipelineSpec, KINDS};
use millrace::http::{self, ServeOptions};
use millrace::job::{Engine, JobStatus, Received};
use millrace::{CancelHandle, Error};

/// Records in the TOML layer are small JSON maps: allocation dominates parsing, and mimalloc
/// halves its cost against the system allocator (see docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A blocking, backpressured dataflow engine for NDJSON pipelines written in TOML.
#[derive(Parser)]
#[command(name = "millrace", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Progress {
    Bar,
    Json,
    None,
}

#[derive(Subcommand)]
enum Command {
    /// Runs a pipeline file.
    Run {
        /// The pipeline file (TOML).
        pipeline: PathBuf,
        /// No progress and no summary table on stderr.
        #[arg(short, long)]
        quiet: bool,
        /// Progress on stderr: a live line (default on a terminal), one JSON event per line
        /// (for other tools), or none.
        #[arg(long, value_enum)]
        progress: Option<Progress>,
        /// Also serve live status over HTTP at this address while the pipeline runs.
        #[arg(long, value_name = "ADDR")]
        serve: Option<SocketAddr>,
        #[command(flatten)]
        access: Access,
        /// Reload the pipeline while it runs whenever its file or a plugin's files change
        /// (stage parameters, plugin libraries and programs; topology changes are refused).
        #[arg(long)]
        watch: bool,
        /// With --watch: wait until the files have been quiet this long before reloading.
        #[arg(long, value_name = "MS", default_value_t = 200)]
        debounce_ms: u64,
        /// Continue an unfinished run from the newest checkpoint in the [checkpoint] table's
        /// dir that verifies (a torn or corrupt one is reported and skipped); start from the
        /// beginning when there is none.
        #[arg(long, conflicts_with = "fresh")]
        resume: bool,
        /// Discard the checkpoints in the [checkpoint] table's dir and start from the beginning.
        #[arg(long)]
        fresh: bool,
    },
    /// Serves the job API over HTTP: submit, watch (Server-Sent Events), cancel, metrics.
    Serve {
        /// The address to listen on.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7870")]
        listen: SocketAddr,
        #[command(flatten)]
        access: Access,
        /// The largest pipeline file accepted, in bytes.
        #[arg(long, default_value_t = 1 << 20)]
        max_body: usize,
        /// The most connections served at once (more get 503).
        #[arg(long, value_name = "N", default_value_t = 256)]
        max_connections: usize,
    },
    /// Checks a pipeline file without running it.
    Validate {
        /// The pipeline file (TOML).
        pipeline: PathBuf,
    },
    /// Prints a pipeline's stage graph as Graphviz DOT.
    Graph {
        /// The pipeline file (TOML).
        pipeline: PathBuf,
    },
    /// Lists the built-in stage kinds.
    Kinds,
    /// Runs a pipeline on Apache Spark through spark-submit (docs/spark.md): stateless stages
    /// as millrace inside each partition, keyed stages on Spark's shuffle.
    Spark(spark::SparkArgs),
    /// Runs a range of a pipeline's stages between stdin and stdout (what each Spark partition
    /// runs): the first reads `--input` on stdin, the last writes NDJSON to stdout.
    Segment {
        /// The pipeline file (TOML).
        pipeline: PathBuf,
        /// The stages, in order, comma-separated (empty: records in, records out).
        #[arg(long, value_name = "A,B,..", default_value = "")]
        stages: String,
        /// What stdin holds: `lines` (as lines.read reads them) or `ndjson`.
        #[arg(long, value_name = "FORMAT", default_value = "ndjson")]
        input: String,
        /// Relative paths in the pipeline resolve against this directory (default: the
        /// file's), when it exists.
        #[arg(long, value_name = "DIR")]
        base: Option<PathBuf>,
    },
    /// Inspects a checkpoint directory (the [checkpoint] table's dir).
    Checkpoint {
        #[command(subcommand)]
        command: CheckpointCommand,
    },
    /// Plugins found on the search path (--dir, then MILLRACE_PLUGIN_PATH, then the user's).
    Plugins {
        #[command(subcommand)]
        command: PluginsCommand,
    },
}

/// Who may use the job server (`serve`, `run --serve`).
#[derive(clap::Args)]
struct Access {
    /// Allow a non-loopback address (the token is then the only protection).
    #[arg(long)]
    allow_remote: bool,
    /// The token every request must present (Authorization: Bearer TOKEN); default: the
    /// environment's MILLRACE_TOKEN, or a random one printed at start.
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
    /// Also accept this host name in the Host header (with the server's port); repeatable.
    #[arg(long = "allow-host", value_name = "NAME")]
    allow_hosts: Vec<String>,
}

#[derive(Subcommand)]
enum CheckpointCommand {
    /// A table of the checkpoints in DIR: id, time, size, and complete or why not.
    List {
        /// The checkpoint directory.
        dir: PathBuf,
    },
    /// Verifies every checkpoint in DIR (checksums, key-group coverage, source positions,
    /// pre-committed sink files) and prints every problem. Exit code 0 when there is none, 1
    /// when there is one, 2 when DIR cannot be read.
    Verify {
        /// The checkpoint directory.
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum PluginsCommand {
    /// A table of the plugins found, or (--json) the node palette with every parameter spec.
    List {
        /// The node palette as JSON, for a visual editor.
        #[arg(long)]
        json: bool,
        /// Directories searched first.
        #[arg(long = "dir", value_name = "DIR")]
        dirs: Vec<PathBuf>,
    },
    /// Everything one plugin's manifest declares, and the sandbox it gets on this kernel.
    Inspect {
        /// The plugin's name.
        name: String,
        /// Directories searched first.
        #[arg(long = "dir", value_name = "DIR")]
        dirs: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("warn,plugin=trace,millrace::reload=info"),
    )
    .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            pipeline,
            quiet,
            progress,
            serve,
            access,
            watch,
            debounce_ms,
            resume,
            fresh,
        } => {
            if watch && (serve.is_some() || progress == Some(Progress::Json)) {
                eprintln!("error: --watch cannot be combined with --serve or --progress json yet");
                return ExitCode::from(2);
            }
            let start = match (resume, fresh) {
                (true, _) => Some(Start::Resume),
                (_, true) => Some(Start::Fresh),
                _ => None,
            };
            let progress = match (quiet, progress) {
                (true, _) => Progress::None,
                (false, Some(p)) => p,
                (false, None) if std::io::stderr().is_terminal() => Progress::Bar,
                (false, None) => Progress::None,
            };
            let spec = match read_spec(&pipeline, start) {
                Ok(s) => s,
                Err(code) => return code,
            };
            if watch && spec.checkpoint.is_some() {
                eprintln!(
                    "error: {}: --watch cannot be combined with a [checkpoint] table yet (a reload would change stages under checkpoints that record them): remove one",
                    pipeline.display()
                );
                return ExitCode::from(2);
            }
            if progress == Progress::Json || serve.is_some() {
                run_on_engine(spec, quiet, progress, serve, access)
            } else {
                let watch = watch.then(|| Duration::from_millis(debounce_ms));
                run(spec, quiet, progress == Progress::Bar, watch)
            }
        }
        Command::Serve {
            listen,
            access,
            max_body,
            max_connections,
        } => serve(listen, access, max_body, max_connections),
        // Every error of the file, one a line (as `POST /validate` answers them).
        Command::Validate { pipeline } => {
            match PipelineSpec::validate_file(&pipeline)
                .and_then(|s| s.build().map(|_| s).map_err(|e| vec![e]))
            {
                Ok(spec) => {
                    println!("{}: ok ({} stages)", pipeline.display(), spec.stages.len());
                    ExitCode::SUCCESS
                }
                Err(errors) => {
                    let mut code = ExitCode::FAILURE;
                    for e in errors {
                        code = fail(&Error::from(e));
                    }
                    code
                }
            }
        }
        Command::Graph { pipeline } => match PipelineSpec::from_file(&pipeline) {
            Ok(spec) => {
                print!("{}", spec.to_dot());
                ExitCode::SUCCESS
            }
            Err(e) => fail(&Error::from(e)),
        },
        Command::Plugins { command } => plugins(command),
        Command::Spark(args) => spark::spark(args),
        Command::Segment {
            pipeline,
            stages,
            input,
            base,
        } => spark::segment(&pipeline, &stages, &input, base.as_deref()),
        Command::Checkpoint { command } => checkpoint(command),
        Command::Kinds => {
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            for (kind, about) in KINDS {
                let _ = writeln!(out, "{kind:<14} {about}");
            }
            ExitCode::SUCCESS
        }
    }
}

fn plugins(command: PluginsCommand) -> ExitCode {
    use millrace::plugin::{search_path, PluginKind, PluginRegistry};
    use millrace::sandbox;
    use std::io::Write as _;
    // A closed stdout (`| head`) ends the listing quietly.
    let mut out = std::io::stdout().lock();
    match command {
        PluginsCommand::List { json, dirs } => {
            let reg = PluginRegistry::discover(&search_path(&dirs));
            if json {
                let _ = writeln!(out, "{}", reg.palette_json());
            } else {
                let _ = writeln!(
                    out,
                    "{:<16} {:<9} {:<8} {:<28} {:<18} dir",
                    "plugin", "version", "kind", "nodes", "permissions"
                );
                for p in reg.plugins() {
                    let m = &p.manifest;
                    let nodes: Vec<&str> = m.nodes.iter().map(|n| n.name.as_str()).collect();
                    let _ = writeln!(
                        out,
                        "{:<16} {:<9} {:<8} {:<28} {:<18} {}",
                        m.name,
                        m.version,
                        format!("{:?}", m.kind).to_lowercase(),
                        nodes.join(","),
                        if m.permissions.is_empty() {
                            "-".to_string()
                        } else {
                            m.permissions.join(",")
                        },
                        p.dir.display()
                    );
                }
            }
            for (manifest, why) in &reg.broken {
                eprintln!("warning: {}: {why}", manifest.display());
            }
            ExitCode::SUCCESS
        }
        PluginsCommand::Inspect { name, dirs } => {
            let reg = PluginRegistry::discover(&search_path(&dirs));
            let Some(p) = reg.get(&name) else {
                eprintln!("error: no plugin `{name}` on the search path");
                return ExitCode::from(2);
            };
            let m = &p.manifest;
            let _ = writeln!(
                out,
                "{} {} ({:?} plugin) in {}",
                m.name,
                m.version,
                m.kind,
                p.dir.display()
            );
            let _ = writeln!(out, "  {}", m.description);
            let _ = writeln!(
                out,
                "  authors: {}; license: {}",
                m.authors.join(", "),
                m.license.as_deref().unwrap_or("-")
            );
            let _ = writeln!(out, "  engine: {}; entry: {:?}", m.engine, m.entry);
            let _ = writeln!(
                out,
                "  permissions: {}",
                if m.permissions.is_empty() {
                    "none".to_string()
                } else {
                    m.permissions.join(", ")
                }
            );
            match m.kind {
                PluginKind::Native => {
                    let _ = writeln!(out, "  sandbox: {}", sandbox::NATIVE_NOT_SANDBOXED);
                }
                PluginKind::Process => {
                    let _ = writeln!(out, "  sandbox:");
                    let lines =
                        sandbox::describe_process(&m.limits, &m.permissions, sandbox::support());
                    for l in lines {
                        let _ = writeln!(out, "    {l}");
                    }
                }
            }
            for n in &m.nodes {
                let _ = writeln!(out, "  node {}.{}: {}", m.name, n.name, n.description);
                let _ = writeln!(out, "    takes: {}; emits: {}", n.takes, n.emits);
                for (k, s) in &n.params {
                    let mut extra = Vec::new();
                    if s.required {
                        extra.push("required".to_string());
                    }
                    if let Some(d) = &s.default {
                        extra.push(format!("default {d}"));
                    }
                    if let Some(e) = &s.one_of {
                        extra.push(format!(
                            "one of {}",
                            e.iter()
                                .map(|v| v.to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ));
                    }
                    if let Some(v) = s.min {
                        extra.push(format!("min {v}"));
                    }
                    if let Some(v) = s.max {
                        extra.push(format!("max {v}"));
                    }
                    let _ = writeln!(
                        out,
                        "    {k}: {} ({}) {}",
                        s.ty_name(),
                        extra.join(", "),
                        s.description
                    );
                }
            }
            ExitCode::SUCCESS
        }
    }
}

/// Prints the error; exit code 2 for a pipeline that does not validate or a bad invocation, 1
/// for a run that failed or was refused when it started (a checkpoint directory needing
/// --resume or --fresh, a stage that cannot be checkpointed).
fn fail(e: &Error) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(match e {
        Error::Config(_)
        | Error::Build(_)
        | Error::NotLoopback { .. }
        | Error::InvalidToken { .. } => 2,
        _ => 1,
    })
}

/// Reads the pipeline file and applies `--resume` / `--fresh` to its `[checkpoint]` table
/// (either flag without one is a usage error).
fn read_spec(path: &Path, start: Option<Start>) -> Result<PipelineSpec, ExitCode> {
    let mut spec = PipelineSpec::from_file(path).map_err(|e| fail(&Error::from(e)))?;
    if let Some(start) = start {
        match spec.checkpoint.as_mut() {
            Some(c) => c.start = start,
            None => {
                eprintln!(
                    "error: {}: --{} needs a [checkpoint] table in the pipeline file (with its dir)",
                    path.display(),
                    if start == Start::Resume { "resume" } else { "fresh" }
                );
                return Err(ExitCode::from(2));
            }
        }
    }
    Ok(spec)
}

fn run(spec: PipelineSpec, quiet: bool, show_progress: bool, watch: Option<Duration>) -> ExitCode {
    let built = match watch {
        None => spec.build().map(|p| (p, None)),
        Some(_) => spec.build_reloadable().map(|(p, r)| (p, Some(r))),
    };
    let (pipeline, reload) = match built {
        Ok(b) => b,
        Err(e) => return fail(&Error::from(e)),
    };
    let watcher = match (&reload, watch) {
        (Some(r), Some(debounce)) => match r.watch(debounce) {
            Ok(w) => Some(w),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
        },
        _ => None,
    };
    let handle = pipeline.cancel_handle();
    let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(0);
    // The binary is not the engine's crate (its `crate::sync` is out of reach) and its progress
    // line is part of no engine protocol: a std scoped thread.
    #[allow(clippy::disallowed_methods)]
    let result = std::thread::scope(|s| {
        if show_progress {
            s.spawn(|| progress(&handle, &done_rx));
        }
        let r = pipeline.run();
        drop(done_tx);
        r
    });
    drop(watcher);
    match result {
        Ok(report) if report.already_completed.is_some() => {
            if !quiet {
                let at = report.already_completed.filter(|&ms| ms > 0);
                eprintln!(
                    "nothing to resume: the run of this checkpoint directory completed{} (run it again with --fresh)",
                    at.map(|ms| format!(" at {} UTC", utc(ms))).unwrap_or_default()
                );
            }
            ExitCode::SUCCESS
        }
        Ok(report) => {
            if !quiet {
                eprintln!("{report}");
                print_checkpoints(&millrace::job::report_json(&report)["checkpoints"]);
                if let Some(r) = &reload {
                    print_reloads(r);
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

/// The checkpoint part of the run report (from the report's JSON `checkpoints`, as jobs show
/// it): counts, last id, bytes, the longest alignment, and what a resume used and skipped.
fn print_checkpoints(c: &serde_json::Value) {
    if c.is_null() {
        return;
    }
    let n = |k: &str| c[k].as_u64().unwrap_or(0);
    if let Some(from) = c["resumed_from"].as_u64() {
        let skipped = c["skipped"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        let reasons: Vec<String> = skipped
            .iter()
            .map(|s| format!("{}: {}", s["id"], s["reason"].as_str().unwrap_or("?")))
            .collect();
        if reasons.is_empty() {
            eprintln!("resumed from checkpoint {from}");
        } else {
            eprintln!(
                "resumed from checkpoint {from} (skipped {}: {})",
                reasons.len(),
                reasons.join("; ")
            );
        }
    }
    let last = c["last_completed"]
        .as_u64()
        .map_or("none".to_string(), |id| id.to_string());
    let slowest = c["slowest_alignment"]
        .as_str()
        .map(|s| format!(" ({s})"))
        .unwrap_or_default();
    eprintln!(
        "checkpoints: {} completed, {} failed, last {last}, {} written, max alignment {} ms{slowest}",
        n("completed"),
        n("failed"),
        bytes(n("bytes")),
        n("max_alignment_ms"),
    );
}

/// A byte count for people: `812 B`, `4.1 KiB`, `12.0 MiB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `checkpoint list` and `checkpoint verify`.
fn checkpoint(command: CheckpointCommand) -> ExitCode {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match command {
        CheckpointCommand::List { dir } => {
            let listed = match list_checkpoints(&dir) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("error: {}: {e}", dir.display());
                    return ExitCode::from(2);
                }
            };
            // The stdin spool's size is what a resumed run's stdin is appended to: a user who
            // re-pipes the rest of the input starts it after that many bytes.
            match millrace::checkpoint::spool::spooled_len(&dir) {
                Ok(None) => {}
                Ok(Some(n)) => {
                    let _ = writeln!(
                        out,
                        "stdin spool: {n} bytes ({})",
                        millrace::checkpoint::spool::SPOOL_FILE
                    );
                }
                Err(e) => {
                    let _ = writeln!(out, "stdin spool: not readable: {e}");
                }
            }
            if let Ok(ms) =
                std::fs::read_to_string(dir.join(millrace::checkpoint::store::COMPLETED))
            {
                let at = ms.trim().parse().map(utc).unwrap_or_else(|_| "?".into());
                let _ = writeln!(out, "the run completed at {at} UTC");
            }
            if listed.is_empty() {
                let _ = writeln!(out, "no checkpoints in {}", dir.display());
                return ExitCode::SUCCESS;
            }
            let _ = writeln!(
                out,
                "{:>10}  {:<20}  {:>10}  status",
                "id", "created (UTC)", "size"
            );
            for l in &listed {
                let _ = writeln!(
                    out,
                    "{:>10}  {:<20}  {:>10}  {}",
                    l.id,
                    l.created_ms.map_or("-".to_string(), utc),
                    bytes(l.bytes),
                    l.problem
                        .as_deref()
                        .map_or("complete".to_string(), |p| format!("not complete: {p}"))
                );
            }
            ExitCode::SUCCESS
        }
        CheckpointCommand::Verify { dir } => match verify_checkpoints(&dir) {
            Err(e) => {
                eprintln!("error: {}: {e}", dir.display());
                ExitCode::from(2)
            }
            Ok((checked, problems)) if problems.is_empty() => {
                let _ = writeln!(
                    out,
                    "{}: ok ({checked} checkpoints, no problems)",
                    dir.display()
                );
                ExitCode::SUCCESS
            }
            Ok((checked, problems)) => {
                for p in &problems {
                    let _ = writeln!(out, "{}: {p}", dir.display());
                }
                let _ = writeln!(
                    out,
                    "{}: {} problem{} in {checked} checkpoints",
                    dir.display(),
                    problems.len(),
                    if problems.len() == 1 { "" } else { "s" }
                );
                ExitCode::from(1)
            }
        },
    }
}

/// Every checkpoint in `dir`, each verified.
fn list_checkpoints(dir: &Path) -> Result<Vec<Listing>, Error> {
    millrace::checkpoint::verify::list(dir)
}

/// How many checkpoints `dir` holds, and every problem found in them.
fn verify_checkpoints(dir: &Path) -> Result<(usize, Vec<String>), Error> {
    // One pass: `verify` lists (and so checks) every checkpoint itself.
    let v = millrace::checkpoint::verify::verify(dir)?;
    let mut problems: Vec<String> = v.problems.iter().map(ToString::to_string).collect();
    if let Some(Err(e)) = v.spool {
        problems.push(format!("stdin spool: {e}"));
    }
    Ok((v.checkpoints, problems))
}

/// Milliseconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS` (UTC).
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The reload part of the run report: every reload, and the records each version processed.
fn print_reloads(r: &millrace::config::ReloadHandle) {
    let events = r.events();
    eprintln!(
        "reloads: {} ({} refused)",
        events.len(),
        events.iter().filter(|e| e.error.is_some()).count()
    );
    for e in &events {
        eprintln!("  {e}");
    }
    for (stage, counts) in r.records_per_version() {
        let per: Vec<String> = counts.iter().map(|(v, n)| format!("v{v}: {n}")).collect();
        eprintln!("  stage `{stage}` records per version: {}", per.join(", "));
    }
}

fn serve_options(listen: SocketAddr, access: Access) -> ServeOptions {
    let mut o = ServeOptions::new(listen);
    o.allow_remote = access.allow_remote;
    o.token = access.token.or_else(|| {
        std::env::var("MILLRACE_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
    });
    o.allow_hosts = access.allow_hosts;
    o.base_dir = std::env::current_dir().unwrap_or_default();
    o
}

/// Starts the server and says where to open it (as Jupyter does, with the token in the URL),
/// with a warning when other machines can reach it.
fn start_server(engine: &Arc<Engine>, opts: ServeOptions) -> Result<http::Server, Error> {
    let server = http::serve(Arc::clone(engine), opts)?;
    eprintln!("serving on {}", server.url());
    if !server.addr().ip().is_loopback() {
        eprintln!(
            "warning: listening on {}, which other machines can reach: the token is the only protection (whoever has it can run commands as you)",
            server.addr()
        );
    }
    Ok(server)
}

/// Runs the pipeline as a job of an engine: progress events as JSON lines, and/or live status
/// over HTTP while it runs.
fn run_on_engine(
    spec: PipelineSpec,
    quiet: bool,
    progress: Progress,
    serve: Option<SocketAddr>,
    access: Access,
) -> ExitCode {
    // Build once here so that a bad pipeline is reported (exit 2) before anything starts.
    if let Err(e) = spec.build() {
        return fail(&Error::from(e));
    }
    let engine = Arc::new(Engine::new());
    let server = match serve {
        None => None,
        Some(addr) => match start_server(&engine, serve_options(addr, access)) {
            Ok(s) => Some(s),
            Err(e) => return fail(&e),
        },
    };
    let (id, events) = match engine.submit_toml_watched(spec) {
        Ok(watched) => watched,
        Err(e) => return fail(&e),
    };
    while let Some(r) = events.recv() {
        if progress == Progress::Json {
            let line = match r {
                Received::Event(e) => e.to_json(),
                Received::Lagged(n) => serde_json::json!({"event": "lagged", "missed": n}),
            };
            eprintln!("{line}");
        }
    }
    let info = engine.wait(id).expect("the job exists");
    if let Some(s) = server {
        s.shutdown();
    }
    let _ = engine.shutdown(Duration::from_secs(10));
    match info.status {
        JobStatus::Succeeded => {
            if !quiet && progress != Progress::Json {
                if let Some(report) = info.report {
                    eprintln!("{report}");
                    print_checkpoints(&millrace::job::report_json(&report)["checkpoints"]);
                }
            }
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!(
                "error: {}",
                info.error.unwrap_or_else(|| "run cancelled".into())
            );
            ExitCode::from(1)
        }
    }
}

/// Serves the job API until the process is stopped.
fn serve(listen: SocketAddr, access: Access, max_body: usize, max_connections: usize) -> ExitCode {
    let engine = Arc::new(Engine::new());
    let mut opts = serve_options(listen, access);
    opts.max_body = max_body;
    opts.max_connections = max_connections;
    match start_server(&engine, opts) {
        Ok(_server) => loop {
            std::thread::park();
        },
        Err(e) => fail(&e),
    }
}

/// A live line on stderr: records read, rate and elapsed time; until `done` disconnects.
fn progress(handle: &CancelHandle, done: &crossbeam_channel::Receiver<()>) {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    loop {
        let snap = handle.snapshot();
        let secs = snap.elapsed.as_secs_f64().max(1e-9);
        let read = snap.records_read();
        bar.set_message(format!(
            "{read} records read, {:.0} records/s",
            read as f64 / secs
        ));
        bar.tick();
        if done.recv_timeout(Duration::from_millis(100)) != Err(RecvTimeoutError::Timeout) {
            break;
        }
    }
    bar.finish_and_clear();
}
