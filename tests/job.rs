//! The engine: many jobs, progress streams, cancellation, shutdown, and the races a job table
//! invites as tests — two cleanups of one job, a subscriber arriving as its job ends, and a job
//! submitted while the engine shuts down.
// A test drives the engine from outside with std's threads and atomics: the `crate::sync`
// rule (clippy.toml) is for the engine's own code.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use millrace::job::{
    Engine, EngineOptions, Event, JobStatus, ProgressHub, Received, RecvTimeoutError,
};
use millrace::{Error, Pipeline};

fn fast_progress() -> EngineOptions {
    let mut o = EngineOptions::default();
    o.progress_interval = Duration::from_millis(5);
    o
}

fn small_job(n: u64) -> impl FnOnce() -> Result<Pipeline, Error> + Send + 'static {
    move || {
        let p = Pipeline::new();
        p.source("n", 0..n).map(|x| x * 2).for_each(|_| {});
        Ok(p)
    }
}

fn endless() -> impl FnOnce() -> Result<Pipeline, Error> + Send + 'static {
    || {
        let p = Pipeline::new();
        p.source("forever", 0u64..).for_each(|_| {});
        Ok(p)
    }
}

/// Every event of a subscription until its end.
fn drain(sub: &millrace::job::Subscription<Event>) -> Vec<Received<Event>> {
    std::iter::from_fn(|| sub.recv()).collect()
}

fn kinds(events: &[Received<Event>]) -> Vec<&'static str> {
    events
        .iter()
        .map(|r| match r {
            Received::Event(e) => e.kind(),
            Received::Lagged(_) => "lagged",
        })
        .collect()
}

#[test]
fn jobs_run_report_and_end_with_a_final_event() {
    let engine = Engine::with_options(fast_progress());
    let (a, sub) = engine.submit_watched("a", small_job(1_000)).unwrap();
    let info = engine.wait(a).unwrap();
    assert_eq!(info.status, JobStatus::Succeeded);
    assert_eq!(info.report.unwrap().records_read(), 1_000);
    let events = drain(&sub);
    assert_eq!(
        kinds(&events[..1]),
        vec!["started"],
        "watched from the start"
    );
    let last = events.last().unwrap();
    match last {
        Received::Event(Event::Finished { report, .. }) => assert_eq!(report.records_read(), 1_000),
        other => panic!("expected the final event last, got {other:?}"),
    }
    // A subscriber to an ended job gets its final event and nothing else.
    let late = engine.subscribe(a).unwrap();
    assert_eq!(kinds(&drain(&late)), vec!["finished"]);
    engine.shutdown(Duration::from_secs(5)).unwrap();
}

#[test]
fn a_long_job_streams_progress_then_is_cancelled() {
    let engine = Engine::with_options(fast_progress());
    let id = engine.submit("forever", endless()).unwrap();
    let sub = engine.subscribe(id).unwrap();
    // Progress events arrive while it runs, with live metrics.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut read = 0;
    while read == 0 {
        assert!(Instant::now() < deadline, "no progress event");
        if let Ok(Received::Event(Event::Progress { report, .. })) =
            sub.recv_timeout(Duration::from_millis(100))
        {
            read = report.records_read();
        }
    }
    assert!(read > 0);
    assert_eq!(engine.status(id).unwrap().status, JobStatus::Running);
    assert!(engine.cancel(id));
    let info = engine.wait(id).unwrap();
    assert_eq!(info.status, JobStatus::Cancelled);
    let rest = drain(&sub);
    assert!(matches!(
        rest.last(),
        Some(Received::Event(Event::Cancelled { .. }))
    ));
    assert!(!engine.cancel(id), "an ended job cannot be cancelled again");
    engine.shutdown(Duration::from_secs(5)).unwrap();
}

#[test]
fn failures_name_the_stage() {
    let engine = Engine::new();
    let id = engine
        .submit("bad", || {
            let p = Pipeline::new();
            p.source("n", 0..10u32)
                .try_map(|x| if x == 5 { Err("five") } else { Ok(x) })
                .name("picky")
                .for_each(|_| {});
            Ok(p)
        })
        .unwrap();
    let sub = engine.subscribe(id).unwrap();
    let info = engine.wait(id).unwrap();
    assert_eq!(info.status, JobStatus::Failed);
    assert!(info.error.unwrap().contains("picky"));
    match drain(&sub).last() {
        Some(Received::Event(Event::Failed { stage, .. })) => {
            assert_eq!(stage.as_deref(), Some("picky"))
        }
        other => panic!("{other:?}"),
    }
    // A builder that fails or panics is a failed job, not a dead engine.
    let e = engine
        .submit("no", || Err(Error::Build("nope".into())))
        .unwrap();
    assert_eq!(engine.wait(e).unwrap().status, JobStatus::Failed);
    let p = engine.submit("panics", || panic!("boom")).unwrap();
    let info = engine.wait(p).unwrap();
    assert_eq!(info.status, JobStatus::Failed);
    assert!(info.error.unwrap().contains("boom"));
}

#[test]
fn remove_returns_the_job_once_and_never_a_running_one() {
    let engine = Engine::new();
    let done = engine.submit("done", small_job(10)).unwrap();
    engine.wait(done).unwrap();
    let running = engine.submit("running", endless()).unwrap();
    assert!(
        engine.remove(running).is_none(),
        "a running job is not removed"
    );
    assert_eq!(engine.remove(done).unwrap().id, done);
    assert!(engine.remove(done).is_none(), "a second cleanup is a no-op");
    assert!(engine.status(done).is_none());
    engine.cancel(running);
    engine.wait(running).unwrap();
    assert!(engine.remove(running).is_some());
    assert!(engine.list().is_empty());
}

/// Seed scenario 1: rapid creation and deletion of jobs while subscribers connect.
#[test]
fn rapid_create_and_delete_while_subscribers_connect() {
    let engine = Arc::new(Engine::with_options(fast_progress()));
    let removed = Arc::new(AtomicU64::new(0));
    let finals = Arc::new(AtomicU64::new(0));
    let submitted = Arc::new(AtomicU64::new(0));
    std::thread::scope(|s| {
        // Submitters.
        for t in 0..3 {
            let (engine, submitted) = (Arc::clone(&engine), Arc::clone(&submitted));
            s.spawn(move || {
                for i in 0..30 {
                    engine
                        .submit(&format!("j{t}-{i}"), small_job(100 + i))
                        .unwrap();
                    submitted.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        // Subscribers that connect to whatever exists, read to the end, and leave.
        for _ in 0..3 {
            let (engine, finals) = (Arc::clone(&engine), Arc::clone(&finals));
            s.spawn(move || {
                for _ in 0..60 {
                    for info in engine.list() {
                        if let Some(sub) = engine.subscribe(info.id) {
                            if let Some(Received::Event(e)) = drain(&sub).last() {
                                assert!(e.is_final(), "the stream ends with the final event");
                                finals.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            });
        }
        // Two cleaners racing each other on every ended job.
        for _ in 0..2 {
            let (engine, removed) = (Arc::clone(&engine), Arc::clone(&removed));
            s.spawn(move || {
                for _ in 0..200 {
                    for info in engine.list() {
                        if engine.remove(info.id).is_some() {
                            removed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
        }
    });
    for info in engine.list() {
        engine.wait(info.id);
        if engine.remove(info.id).is_some() {
            removed.fetch_add(1, Ordering::Relaxed);
        }
    }
    assert_eq!(
        removed.load(Ordering::Relaxed),
        submitted.load(Ordering::Relaxed),
        "every job removed exactly once"
    );
    assert!(finals.load(Ordering::Relaxed) > 0);
    engine.shutdown(Duration::from_secs(5)).unwrap();
}

/// Seed scenario 2: two subscribers; the first leaving must not break the second.
#[test]
fn one_subscriber_leaving_does_not_affect_another() {
    let engine = Engine::with_options(fast_progress());
    let id = engine.submit("forever", endless()).unwrap();
    let first = engine.subscribe(id).unwrap();
    let second = engine.subscribe(id).unwrap();
    assert!(matches!(first.recv(), Some(Received::Event(_))));
    drop(first);
    // The second still gets progress, then the final event.
    let mut progress = 0;
    while progress < 3 {
        if let Some(Received::Event(Event::Progress { .. })) = second.recv() {
            progress += 1;
        }
    }
    engine.cancel(id);
    let rest = drain(&second);
    assert!(matches!(
        rest.last(),
        Some(Received::Event(Event::Cancelled { .. }))
    ));
}

/// A subscriber that never reads loses its oldest events, is told how many, and still gets the
/// final event; the job is not slowed down and other subscribers lose nothing.
#[test]
fn a_slow_subscriber_loses_old_events_and_is_told() {
    let mut opts = fast_progress();
    opts.progress_interval = Duration::from_millis(1);
    opts.subscriber_capacity = 4;
    let engine = Engine::with_options(opts);
    let id = engine.submit("forever", endless()).unwrap();
    let slow = engine.subscribe(id).unwrap();
    // Not a sleep: a second subscriber, subscribed after the slow one, reads until it has seen
    // 16 events published (received or reported lost). Each was published to the slow one too,
    // whose queue holds 4, so the slow one has lost at least 12 by then, whatever the timing.
    let reader = engine.subscribe(id).unwrap();
    let mut published = 0u64;
    while published < 16 {
        match reader.recv() {
            Some(Received::Event(_)) => published += 1,
            Some(Received::Lagged(n)) => published += n,
            None => panic!("the job ended early"),
        }
    }
    engine.cancel(id);
    engine.wait(id).unwrap();
    let events = drain(&slow);
    assert!(
        events.len() <= 5,
        "at most the capacity, plus the lag notice: {}",
        events.len()
    );
    match events.first() {
        Some(Received::Lagged(n)) => assert!(*n > 10, "lost {n}"),
        other => panic!("expected a lag notice first, got {other:?}"),
    }
    assert!(matches!(
        events.last(),
        Some(Received::Event(Event::Cancelled { .. }))
    ));
}

#[test]
fn toml_jobs_run_on_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.ndjson");
    let text = format!(
        "[stages.read]\nkind = \"lines.read\"\npath = {:?}\n\n[stages.out]\nkind = \"ndjson.write\"\ninput = \"read\"\npath = {:?}\n",
        std::fs::canonicalize("Cargo.toml").unwrap().display().to_string(),
        out.display().to_string()
    );
    let spec = millrace::config::PipelineSpec::from_str(&text, dir.path().join("p.toml")).unwrap();
    let engine = Engine::new();
    let id = engine.submit_toml(spec).unwrap();
    let info = engine.wait(id).unwrap();
    assert_eq!(info.status, JobStatus::Succeeded, "{:?}", info.error);
    assert_eq!(info.name, "p");
    let lines = std::fs::read_to_string(&out).unwrap().lines().count();
    assert_eq!(lines as u64, info.report.unwrap().records_read());
}

/// `recv_timeout` tells "nothing yet" from "nothing ever again".
#[test]
fn recv_timeout_tells_a_timeout_from_the_end_of_the_stream() {
    let hub = ProgressHub::new(4);
    let sub = hub.subscribe();
    let wait = Duration::from_millis(10);
    assert_eq!(sub.recv_timeout(wait), Err(RecvTimeoutError::Timeout));
    hub.publish(1);
    assert_eq!(sub.recv_timeout(wait), Ok(Received::Event(1)));
    hub.close(2);
    assert_eq!(sub.recv_timeout(wait), Ok(Received::Event(2)));
    assert_eq!(sub.recv_timeout(wait), Err(RecvTimeoutError::Closed));
    // A subscriber that arrives after the end gets the closing event, then the end.
    let late = hub.subscribe();
    assert_eq!(late.recv_timeout(wait), Ok(Received::Event(2)));
    assert_eq!(late.recv_timeout(wait), Err(RecvTimeoutError::Closed));
}
