//! The HTTP status server, with a real (minimal, std-only) HTTP client over TCP. One test
//! function, so that the thread count of this binary is the test's own.
// A test drives the engine from outside with std's threads and atomics: the `crate::sync`
// rule (clippy.toml) is for the engine's own code.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use millrace::http::{serve, ServeOptions};
use millrace::job::{Engine, EngineOptions, JobId, JobStatus};
use serde_json::Value;

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// One request with `Connection: close`; returns the status and the body.
fn call(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let status = raw.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// An SSE client: the `(id, event)` pairs it read, up to `max` events or the end of the stream.
fn sse(addr: SocketAddr, job: JobId, max: usize) -> Vec<(u64, String, Value)> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // As an EventSource would ask (keep-alive is HTTP/1.1's default): the server still closes
    // the stream after the final event.
    write!(
        s,
        "GET /jobs/{job}/events HTTP/1.1\r\nHost: test\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
        if line.to_ascii_lowercase().starts_with("content-type") {
            assert!(line.contains("text/event-stream"), "{line}");
        }
    }
    let (mut out, mut id, mut event) = (Vec::new(), 0, String::new());
    while out.len() < max {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            break; // the server closed the stream
        }
        let l = line.trim_end();
        if let Some(v) = l.strip_prefix("id: ") {
            id = v.parse().unwrap();
        } else if let Some(v) = l.strip_prefix("event: ") {
            event = v.to_string();
        } else if let Some(v) = l.strip_prefix("data: ") {
            out.push((id, event.clone(), json(v)));
        }
    }
    out // dropping the stream disconnects
}

#[test]
fn http_api_end_to_end() {
    let before = thread_count();
    let mut eo = EngineOptions::default();
    eo.progress_interval = Duration::from_millis(10);
    let engine = Arc::new(Engine::with_options(eo));
    let mut so = ServeOptions::new("127.0.0.1:0".parse().unwrap());
    so.max_body = 4096;
    so.base_dir = std::env::current_dir().unwrap();
    so.plugin_dirs = vec![std::env::current_dir().unwrap().join("plugins")];
    let server = serve(Arc::clone(&engine), so).unwrap();
    let addr = server.addr();

    // Refused: a non-loopback address without the explicit flag.
    let err = serve(
        Arc::clone(&engine),
        ServeOptions::new("0.0.0.0:0".parse().unwrap()),
    )
    .unwrap_err();
    assert!(
        matches!(&err, millrace::Error::NotLoopback { addr } if addr.ip().is_unspecified()),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "refusing to listen on 0.0.0.0:0: not a loopback address (allow it explicitly: --allow-remote)"
    );

    // Bad requests get 4xx with a JSON error.
    let (status, body) = call(addr, "GET", "/nope", "");
    assert_eq!(status, 404);
    assert!(json(&body)["error"].as_str().unwrap().contains("/nope"));
    assert_eq!(call(addr, "GET", "/jobs/abc", "").0, 400);
    assert_eq!(call(addr, "GET", "/jobs/999", "").0, 404);
    assert_eq!(call(addr, "PUT", "/jobs", "").0, 405);
    let (status, body) = call(addr, "POST", "/jobs", "[stages.x]\nkind = \"frobnicate\"\n");
    assert_eq!(status, 400);
    assert!(
        json(&body)["error"]
            .as_str()
            .unwrap()
            .contains(":2: stage `x`"),
        "{body}"
    );
    assert_eq!(call(addr, "POST", "/jobs", &"#".repeat(5000)).0, 413);
    let (status, body) = call(addr, "GET", "/plugins/nodes", "");
    assert_eq!(status, 200);
    let palette = json(&body);
    let case = palette
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["kind"] == "textops.case")
        .unwrap_or_else(|| panic!("{body}"));
    assert_eq!(
        case["params"]["mode"]["enum"],
        serde_json::json!(["upper", "lower", "title"])
    );

    // Submit a pipeline that runs until cancelled: it reads a FIFO that a thread keeps
    // feeding until the reader goes away.
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("feed");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let feed = fifo.clone();
    let feeder = std::thread::spawn(move || {
        let mut f = std::fs::OpenOptions::new().write(true).open(feed).unwrap();
        // Ends with EPIPE once the job is cancelled and closes its end.
        while f.write_all(b"{\"x\": 1}\n").is_ok() {}
    });
    let endless = format!(
        "[stages.read]\nkind = \"lines.read\"\npath = {:?}\n\n[stages.out]\nkind = \"ndjson.write\"\ninput = \"read\"\npath = \"/dev/null\"\n",
        fifo.display().to_string()
    );
    let endless = endless.as_str();
    let (status, body) = call(addr, "POST", "/jobs?name=zeros", endless);
    assert_eq!(status, 201, "{body}");
    let id = JobId(json(&body)["id"].as_u64().unwrap());
    let (status, body) = call(addr, "GET", &format!("/jobs/{id}"), "");
    assert_eq!(status, 200);
    assert_eq!(json(&body)["name"], "zeros");
    assert_eq!(json(&body)["status"], "running");

    // Several SSE clients connect and disconnect while the job runs.
    let readers: Vec<_> = (0..3)
        .map(|_| std::thread::spawn(move || sse(addr, id, usize::MAX)))
        .collect();
    for _ in 0..3 {
        let early = sse(addr, id, 2); // reads two events, then disconnects
        assert_eq!(early.len(), 2);
    }
    let t0 = Instant::now();
    while engine.subscribe(id).is_some() && t0.elapsed() < Duration::from_millis(300) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, _) = call(addr, "GET", "/metrics", "");
    assert_eq!(status, 200);
    let (_, metrics) = call(addr, "GET", "/metrics", "");
    assert!(
        metrics.contains("millrace_jobs{status=\"running\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "millrace_stage_records_in_total{{job=\"{id}\",stage=\"read+out\",instance=\"0\"}}"
        )),
        "{metrics}"
    );

    let (status, _) = call(addr, "DELETE", &format!("/jobs/{id}"), "");
    assert_eq!(status, 202);
    for r in readers {
        let events = r.join().unwrap();
        let ids: Vec<u64> = events.iter().map(|e| e.0).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "in order: {ids:?}");
        let kinds: Vec<&str> = events.iter().map(|e| e.1.as_str()).collect();
        assert_eq!(kinds.last(), Some(&"cancelled"), "{kinds:?}");
        assert!(kinds.contains(&"progress"), "{kinds:?}");
        assert_eq!(events.last().unwrap().2["job"], id.0);
    }
    assert_eq!(engine.wait(id).unwrap().status, JobStatus::Cancelled);
    feeder.join().unwrap();
    assert_eq!(call(addr, "DELETE", &format!("/jobs/{id}"), "").0, 409);
    // A client arriving after the end gets the final event at once.
    let after = sse(addr, id, usize::MAX);
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].1, "cancelled");

    let (status, body) = call(addr, "GET", "/jobs", "");
    assert_eq!(status, 200);
    assert_eq!(json(&body).as_array().unwrap().len(), 1);

    server.shutdown();
    engine.shutdown(Duration::from_secs(5)).unwrap();
    drop(engine);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut now = thread_count();
    while now > before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        now = thread_count();
    }
    assert_eq!(
        now, before,
        "threads left after the server and engine shut down"
    );
}
