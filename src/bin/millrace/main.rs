//! The `millrace` command: run, validate and draw TOML pipelines.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use std::net::SocketAddr;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use crossbeam_channel::RecvTimeoutError;
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
        } => {
            if watch && (serve.is_some() || progress == Some(Progress::Json)) {
                eprintln!("error: --watch cannot be combined with --serve or --progress json yet");
                return ExitCode::from(2);
            }
            let progress = match (quiet, progress) {
                (true, _) => Progress::None,
                (false, Some(p)) => p,
                (false, None) if std::io::stderr().is_terminal() => Progress::Bar,
                (false, None) => Progress::None,
            };
            if progress == Progress::Json || serve.is_some() {
                run_on_engine(pipeline, quiet, progress, serve, access)
            } else {
                let watch = watch.then(|| Duration::from_millis(debounce_ms));
                run(pipeline, quiet, progress == Progress::Bar, watch)
            }
        }
        Command::Serve {
            listen,
            access,
            max_body,
            max_connections,
        } => serve(listen, access, max_body, max_connections),
        Command::Validate { pipeline } => {
            match PipelineSpec::from_file(&pipeline).and_then(|s| s.build().map(|_| s)) {
                Ok(spec) => {
                    println!("{}: ok ({} stages)", pipeline.display(), spec.stages.len());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&Error::from(e)),
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

fn run(path: PathBuf, quiet: bool, show_progress: bool, watch: Option<Duration>) -> ExitCode {
    let spec = match PipelineSpec::from_file(&path) {
        Ok(s) => s,
        Err(e) => return fail(&Error::from(e)),
    };
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
        Ok(report) => {
            if !quiet {
                eprintln!("{report}");
                if let Some(r) = &reload {
                    print_reloads(r);
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
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
    path: PathBuf,
    quiet: bool,
    progress: Progress,
    serve: Option<SocketAddr>,
    access: Access,
) -> ExitCode {
    let spec = match PipelineSpec::from_file(&path).and_then(|s| s.build().map(|_| s)) {
        Ok(s) => s,
        Err(e) => return fail(&Error::from(e)),
    };
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
