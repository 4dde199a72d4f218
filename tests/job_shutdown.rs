//! Engine shutdown leaves no thread behind. Alone in its test binary, so that the thread count
//! of the process is this test's own.

use std::time::{Duration, Instant};

use millrace::job::{Engine, EngineOptions, JobStatus};
use millrace::{Error, Pipeline};

/// Processes whose parent is this one.
fn child_processes() -> usize {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("stat")).ok())
        .filter(|stat| {
            // pid (comm) state ppid ...: the command may contain spaces, so split after ')'.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                == Some(me.as_str())
        })
        .count()
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Polls `cond` until it holds; fails after ten seconds.
fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn fast_progress() -> EngineOptions {
    let mut o = EngineOptions::default();
    o.progress_interval = Duration::from_millis(5);
    o
}

fn small_job(n: u64) -> impl FnOnce() -> Result<Pipeline, Error> + Send + 'static {
    move || {
        let p = Pipeline::new();
        p.source("n", 0..n).for_each(|_| {});
        Ok(p)
    }
}

/// Seed scenario 3: a job whose output drains slowly when shutdown comes; shutdown cancels it
/// and joins every thread; none is left, and no job can be submitted afterwards.
#[test]
fn shutdown_joins_every_thread_even_with_a_slow_sink() {
    let before = thread_count();
    let engine = Engine::with_options(fast_progress());
    for i in 0..3 {
        engine
            .submit(&format!("slow{i}"), || {
                let p = Pipeline::new();
                p.source("n", 0u64..)
                    .rebalance(2)
                    .map(|x| x + 1)
                    .for_each(|_| std::thread::sleep(Duration::from_millis(1)));
                Ok(p)
            })
            .unwrap();
    }
    // A job whose exec stage's child reads its input and then sleeps: shutdown must kill and
    // reap it.
    let text = format!(
        "[stages.read]\nkind = \"lines.read\"\npath = {:?}\n\n[stages.child]\nkind = \"exec\"\ninput = \"read\"\ncommand = [\"sh\", \"-c\", \"cat > /dev/null; exec sleep 60\"]\n\n[stages.out]\nkind = \"ndjson.write\"\ninput = \"child\"\npath = \"/dev/null\"\n",
        concat!(env!("CARGO_MANIFEST_DIR"), "/examples/data/millrace.txt")
    );
    let spec = millrace::config::PipelineSpec::from_str(&text, "/tmp/sleepy.toml").unwrap();
    engine.submit_toml(spec).unwrap();
    // Wait for what is asserted, not for a time: the child and the threads start on their own
    // schedule. The deadline only bounds a failure.
    wait_until("the exec stage's child to run", || child_processes() == 1);
    wait_until(
        "three jobs of five threads, one with an exec stage (its job, stage and stderr threads at least) and the ticker to run",
        || thread_count() > before + 3 * 5 + 2,
    );
    assert_eq!(child_processes(), 1, "the exec stage's child is running");
    let t0 = Instant::now();
    engine.shutdown(Duration::from_secs(10)).unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5), "shutdown was prompt");
    assert_eq!(engine.threads(), 0);
    for info in engine.list() {
        assert_eq!(info.status, JobStatus::Cancelled);
    }
    assert!(matches!(
        engine.submit("late", small_job(1)),
        Err(Error::ShuttingDown)
    ));
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut now = thread_count();
    while now > before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        now = thread_count();
    }
    assert_eq!(now, before, "threads left after shutdown");
    assert_eq!(child_processes(), 0, "child processes left after shutdown");
}
