//! `millrace spark` and `millrace segment`: a pipeline on Apache Spark (`docs/spark.md`).
//!
//! `spark` plans the pipeline (`millrace::config::spark`), writes the plan and the driver
//! program (`integrations/spark/millrace_spark.py`, built into this binary) to a private
//! temporary directory, and runs `spark-submit` on them, shipping this binary and the pipeline
//! file to the executors. `segment` is what each partition runs: a range of the pipeline's
//! stages between stdin and stdout.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use millrace::config::spark::{segment_toml, JobFiles, SegmentInput, SparkPlan};
use millrace::config::PipelineSpec;
use millrace::Error;

/// `millrace spark`'s arguments: the plan's pipeline and what spark-submit is told.
#[derive(clap::Args)]
pub(crate) struct SparkArgs {
    /// The pipeline file (TOML).
    pub(crate) pipeline: PathBuf,
    /// Spark's master URL: `local[N]` to try it on this machine, `spark://HOST:PORT` for a
    /// standalone cluster, `yarn`, ...
    #[arg(long, default_value = "local[2]")]
    pub(crate) master: String,
    /// The directory the job writes (one part file per partition); must not exist.
    #[arg(long, value_name = "DIR")]
    pub(crate) output: Option<PathBuf>,
    /// The fewest partitions the input is split into, and the partitions of each shuffle.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub(crate) partitions: usize,
    /// A Spark property for spark-submit (`--conf k=v`); repeatable.
    #[arg(long, value_name = "K=V")]
    pub(crate) conf: Vec<String>,
    /// Prints the plan (segments, shuffles, partition counts) and runs nothing.
    #[arg(long)]
    pub(crate) explain: bool,
    /// The millrace binary at this path on every worker, instead of shipping this one.
    #[arg(long, value_name = "PATH")]
    pub(crate) binary: Option<PathBuf>,
    /// The spark-submit to run (default: PATH, then SPARK_HOME, then pyspark's).
    #[arg(long, value_name = "PATH")]
    pub(crate) spark_submit: Option<PathBuf>,
}

/// Runs `stages` of `pipeline` between stdin (`input`) and stdout; relative paths in the file
/// resolve against `base` (default: the file's directory).
pub(crate) fn segment(pipeline: &Path, stages: &str, input: &str, base: Option<&Path>) -> ExitCode {
    let Some(input) = SegmentInput::parse(input) else {
        eprintln!("error: --input is `lines` or `ndjson`, not `{input}`");
        return ExitCode::from(2);
    };
    let text = match std::fs::read_to_string(pipeline) {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "error: {}: cannot read the pipeline file: {e}",
                pipeline.display()
            );
            return ExitCode::from(2);
        }
    };
    let stages: Vec<String> = stages
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    let seg = match segment_toml(&text, pipeline, &stages, input) {
        Ok(s) => s,
        Err(e) => return super::fail(&Error::from(e)),
    };
    // Errors name the pipeline file; relative paths resolve against `base`.
    let name = pipeline.file_name().unwrap_or(pipeline.as_os_str());
    let anchor = match base {
        Some(b) if b.is_dir() => b.join(name),
        _ => pipeline.to_path_buf(),
    };
    match PipelineSpec::from_str(&seg, &anchor) {
        Ok(spec) => super::run(spec, false, false, None),
        Err(e) => super::fail(&Error::from(e)),
    }
}

/// `millrace spark`.
pub(crate) fn spark(a: SparkArgs) -> ExitCode {
    let spec = match PipelineSpec::from_file(&a.pipeline) {
        Ok(s) => s,
        Err(e) => return super::fail(&Error::from(e)),
    };
    let plan = match SparkPlan::new(&spec) {
        Ok(p) => p,
        Err(e) => return super::fail(&Error::from(e)),
    };
    let partitions = a.partitions.max(1);
    if a.explain {
        print!("{}", plan.explain(partitions));
        return ExitCode::SUCCESS;
    }
    let Some(output) = a.output else {
        eprintln!("error: --output DIR is required (the directory of part files the job writes)");
        return ExitCode::from(2);
    };
    if output.exists() {
        eprintln!(
            "error: --output {}: exists; Spark writes a new directory (remove it or choose another)",
            output.display()
        );
        return ExitCode::from(2);
    }
    let submit = match find_spark_submit(a.spark_submit.as_deref()) {
        Ok(s) => s,
        Err(why) => {
            eprintln!("error: {why}");
            return ExitCode::from(2);
        }
    };
    let pipeline = match std::fs::canonicalize(&a.pipeline) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {}: {e}", a.pipeline.display());
            return ExitCode::from(2);
        }
    };
    let output = match std::path::absolute(&output) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: --output {}: {e}", output.display());
            return ExitCode::from(2);
        }
    };
    let exe = match a.binary.clone().map_or_else(std::env::current_exe, Ok) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: cannot find this program's own path: {e} (give --binary)");
            return ExitCode::from(2);
        }
    };
    let job = match JobFiles::write(&plan) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: cannot write the plan and the driver program: {e}");
            return ExitCode::from(1);
        }
    };
    let base = pipeline.parent().unwrap_or(Path::new("/"));
    let mut cmd = Command::new(&submit);
    cmd.arg("--master").arg(&a.master);
    cmd.arg("--name").arg(format!("millrace:{}", plan.name));
    // Spark's INFO lines would bury the job's own output; a user's setting wins.
    if !a.conf.iter().any(|c| c.starts_with("spark.log.level=")) {
        cmd.arg("--conf").arg("spark.log.level=WARN");
    }
    for c in &a.conf {
        cmd.arg("--conf").arg(c);
    }
    // The binary goes to the executors unless the user named one that every worker has.
    let mut files = vec![pipeline.display().to_string()];
    if a.binary.is_none() {
        files.push(exe.display().to_string());
    }
    cmd.arg("--files").arg(files.join(","));
    cmd.arg(job.driver());
    cmd.arg("--plan").arg(job.plan());
    cmd.arg("--output").arg(&output);
    cmd.arg("--partitions").arg(partitions.to_string());
    cmd.arg("--pipeline").arg(file_name(&pipeline));
    cmd.arg("--base").arg(base);
    match &a.binary {
        Some(b) => cmd.arg("--binary-path").arg(b),
        None => cmd.arg("--binary-name").arg(file_name(&exe)),
    };
    cmd.stdin(Stdio::null());
    log::info!("running {cmd:?}");
    // spark-submit's output is the job's: passed through as it comes.
    let status = match cmd.status() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot run {}: {e}", submit.display());
            return ExitCode::from(1);
        }
    };
    drop(job);
    if status.success() {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "error: the Spark job failed ({status}); its output is above, and nothing was committed to {} unless Spark says so",
            output.display()
        );
        ExitCode::from(1)
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `spark-submit`: the one given, on `PATH`, under `SPARK_HOME`, or in an installed pyspark.
fn find_spark_submit(given: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(g) = given {
        return Ok(g.to_path_buf());
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let c = dir.join("spark-submit");
            if c.is_file() {
                return Ok(c);
            }
        }
    }
    if let Some(home) = std::env::var_os("SPARK_HOME") {
        let c = Path::new(&home).join("bin/spark-submit");
        if c.is_file() {
            return Ok(c);
        }
    }
    let python = std::env::var_os("PYSPARK_PYTHON").unwrap_or_else(|| "python3".into());
    let out = Command::new(&python)
        .args([
            "-c",
            "import os, pyspark; print(os.path.dirname(pyspark.__file__))",
        ])
        .stderr(Stdio::null())
        .output();
    if let Ok(out) = out {
        if out.status.success() {
            let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
            let c = Path::new(&dir).join("bin/spark-submit");
            if c.is_file() {
                return Ok(c);
            }
        }
    }
    Err("no spark-submit: not on PATH, not under SPARK_HOME, and no pyspark for python3 (`pip install pyspark`, or --spark-submit PATH)".into())
}
