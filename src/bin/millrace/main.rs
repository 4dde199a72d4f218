//! The `millrace` command: run, validate and draw TOML pipelines.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Parser, Subcommand};
use millrace::config::{PipelineSpec, KINDS};
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

#[derive(Subcommand)]
enum Command {
    /// Runs a pipeline file.
    Run {
        /// The pipeline file (TOML).
        pipeline: PathBuf,
        /// No progress line and no summary table on stderr.
        #[arg(short, long)]
        quiet: bool,
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
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run { pipeline, quiet } => run(pipeline, quiet),
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
        Command::Kinds => {
            for (kind, about) in KINDS {
                println!("{kind:<14} {about}");
            }
            ExitCode::SUCCESS
        }
    }
}

fn fail(e: &Error) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(match e {
        Error::Config(_) | Error::Build(_) => 2,
        _ => 1,
    })
}

fn run(path: PathBuf, quiet: bool) -> ExitCode {
    let spec = match PipelineSpec::from_file(&path) {
        Ok(s) => s,
        Err(e) => return fail(&Error::from(e)),
    };
    let pipeline = match spec.build() {
        Ok(p) => p,
        Err(e) => return fail(&Error::from(e)),
    };
    let handle = pipeline.cancel_handle();
    let done = AtomicBool::new(false);
    let show_progress = !quiet && std::io::stderr().is_terminal();
    let result = std::thread::scope(|s| {
        if show_progress {
            s.spawn(|| progress(&handle, &done));
        }
        let r = pipeline.run();
        done.store(true, Ordering::Release);
        r
    });
    match result {
        Ok(report) => {
            if !quiet {
                eprintln!("{report}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

/// A live line on stderr: records read, rate and elapsed time.
fn progress(handle: &CancelHandle, done: &AtomicBool) {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    while !done.load(Ordering::Acquire) {
        let snap = handle.snapshot();
        let secs = snap.elapsed.as_secs_f64().max(1e-9);
        let read = snap.records_read();
        bar.set_message(format!(
            "{read} records read, {:.0} records/s",
            read as f64 / secs
        ));
        bar.tick();
        std::thread::sleep(Duration::from_millis(100));
    }
    bar.finish_and_clear();
}
