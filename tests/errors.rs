//! Which error each failure produces: the variant, its source and the message a user reads.

use std::error::Error as _;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use millrace::http::{serve, ServeOptions};
use millrace::job::{Engine, JobStatus};
use millrace::{Error, Pipeline};

/// A port already in use is an I/O failure of the listener, not an invalid pipeline.
#[test]
fn a_busy_port_is_a_listen_error_with_the_io_error_as_source() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let engine = Arc::new(Engine::new());
    let err = serve(engine, ServeOptions::new(addr)).unwrap_err();
    assert!(
        matches!(&err, Error::Listen { addr: a, source } if *a == addr && source.kind() == std::io::ErrorKind::AddrInUse),
        "{err:?}"
    );
    let io = err
        .source()
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .unwrap_or_else(|| panic!("no io::Error source: {err:?}"));
    assert_eq!(io.kind(), std::io::ErrorKind::AddrInUse, "{err}");
    let msg = err.to_string();
    assert!(!msg.contains("invalid pipeline"), "{msg}");
    assert!(
        msg.starts_with(&format!("cannot listen on {addr}: ")),
        "{msg}"
    );
    assert_eq!(err.stage(), None);
}

/// A shutdown whose deadline passes names the jobs still running.
#[test]
fn a_shutdown_past_its_deadline_names_the_running_jobs() {
    let engine = Engine::new();
    // A builder cannot be interrupted: it holds the job until it returns, here until the test
    // lets it go (after the assertions), not after a time that a loaded machine could outlast.
    let (release, held) = std::sync::mpsc::channel::<()>();
    let slow = engine
        .submit("slow", move || {
            let _ = held.recv();
            Ok(Pipeline::new())
        })
        .unwrap();
    let err = engine.shutdown(Duration::from_millis(50)).unwrap_err();
    match &err {
        Error::ShutdownTimeout { deadline, running } => {
            assert_eq!(*deadline, Duration::from_millis(50));
            assert_eq!(running, &[slow.0]);
        }
        other => panic!("expected a shutdown timeout, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        format!("shutdown deadline passed with jobs still running: {slow}")
    );
    // Once the builder returns, with time enough, it completes.
    drop(release);
    engine.shutdown(Duration::from_secs(20)).unwrap();
}

/// A builder closure that panics fails its job with the panic message, not "invalid pipeline".
#[test]
fn a_builder_that_panics_fails_its_job_with_the_panic() {
    let engine = Engine::new();
    let id = engine.submit("panics", || panic!("boom")).unwrap();
    let info = engine.wait(id).unwrap();
    assert_eq!(info.status, JobStatus::Failed);
    assert_eq!(
        info.error.as_deref(),
        Some("job `panics` panicked while building: boom")
    );
    engine.shutdown(Duration::from_secs(10)).unwrap();
    assert!(matches!(
        engine.submit("after", || Ok(Pipeline::new())),
        Err(Error::ShuttingDown)
    ));
}

/// Set in the child process of `a_thread_that_cannot_be_spawned_is_a_spawn_error`.
const SPAWN_CHILD: &str = "MILLRACE_TEST_SPAWN_CHILD";

/// Thread spawn failures are `Error::Spawn` with the `io::Error` as source. Provoked in a child
/// process (this test binary again) whose address space is capped just above what it uses, so
/// that no new thread stack can be mapped.
#[test]
fn a_thread_that_cannot_be_spawned_is_a_spawn_error() {
    if std::env::var_os(SPAWN_CHILD).is_some() {
        return spawn_child();
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_thread_that_cannot_be_spawned_is_a_spawn_error",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(SPAWN_CHILD, "1")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("spawn errors checked"),
        "{stdout}\n{stderr}"
    );
}

fn spawn_child() {
    let engine = Arc::new(Engine::new());
    let p = Pipeline::new();
    p.source("numbers", 0..10u64).for_each(|_| {});
    // Cap the address space 1 MiB above its current size: a 2 MiB thread stack cannot fit.
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let vm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let cap = (vm_kib + 1024) * 1024;
    let limit = libc::rlimit {
        rlim_cur: cap,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit for this process.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) }, 0);

    let run = p.run();
    let job = engine.submit("j", || Ok(Pipeline::new()));
    let http = serve(
        Arc::clone(&engine),
        ServeOptions::new("127.0.0.1:0".parse().unwrap()),
    );

    let off = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: as above.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &off) }, 0);

    // The source fuses with its sink: one stage, `numbers+for_each`.
    let err = run.unwrap_err();
    assert!(
        matches!(&err, Error::Spawn { stage: Some(s), .. } if s == "numbers+for_each"),
        "{err:?}"
    );
    assert_eq!(err.stage(), Some("numbers+for_each"));
    assert!(
        err.to_string()
            .starts_with("cannot spawn a thread for stage `numbers+for_each`: "),
        "{err}"
    );
    assert!(
        err.source().is_some_and(|s| s.is::<std::io::Error>()),
        "{err:?}"
    );
    let err = job.unwrap_err();
    assert!(
        matches!(&err, Error::Spawn { what, stage: None, .. } if what == "a thread for job `j`"),
        "{err:?}"
    );
    let err = http.unwrap_err();
    assert!(
        matches!(&err, Error::Spawn { what, stage: None, .. } if what == "the HTTP thread"),
        "{err:?}"
    );
    println!("spawn errors checked");
}
