//! The HTTP job server, with a real (minimal, std-only) HTTP client over TCP. One test
//! function that runs every scenario in turn, so that the thread count of this binary is the
//! test's own. Every wait is on the event itself (a channel, the server's connection count, a
//! response) with a deadline; nothing sleeps to synchronize.
// A test drives the engine from outside with std's threads and atomics: the `crate::sync`
// rule (clippy.toml) is for the engine's own code.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use millrace::http::{serve, ServeOptions, Server, SHUTDOWN_BOUND};
use millrace::job::{Engine, EngineOptions, JobId, JobStatus};
use serde_json::Value;

/// A generous deadline for anything that should happen "at once".
const PATIENCE: Duration = Duration::from_secs(20);
const TOKEN: &str = "test-token-0123456789";

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Waits until `cond` holds, or panics after `within` (checking every few milliseconds: the
/// condition is the event itself, not a stand-in for it).
fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A response: status, head (lowercase), body.
struct Response {
    status: u16,
    head: String,
    body: String,
}

/// Sends `request` as is on a fresh connection and reads the whole response.
fn raw(addr: SocketAddr, request: &[u8]) -> Response {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.write_all(request).unwrap();
    read_response(&mut s)
}

fn read_response(s: &mut TcpStream) -> Response {
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let status = raw
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no status in {raw:?}"))
        .parse()
        .unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    Response {
        status,
        head: head.to_ascii_lowercase(),
        body: body.to_string(),
    }
}

/// A request with the given extra header lines (each ending in `\r\n`).
fn request(method: &str, path: &str, headers: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The headers of a well-behaved client: our Host, the token, a TOML body type.
fn good(addr: SocketAddr) -> String {
    format!(
        "Host: 127.0.0.1:{}\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/toml\r\n",
        addr.port()
    )
}

/// One well-behaved request; returns the status and the body.
fn call(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let r = raw(addr, &request(method, path, &good(addr), body));
    (r.status, r.body)
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

fn options() -> ServeOptions {
    let mut so = ServeOptions::new("127.0.0.1:0".parse().unwrap());
    so.token = Some(TOKEN.into());
    so.base_dir = std::env::current_dir().unwrap();
    so
}

fn engine() -> Arc<Engine> {
    let mut eo = EngineOptions::default();
    eo.progress_interval = Duration::from_millis(10);
    Arc::new(Engine::with_options(eo))
}

/// Shuts the server down on another thread and returns how long it took; panics if it takes
/// longer than `within` (the thread is then left behind: the test has failed anyway).
fn timed_shutdown(server: Server, within: Duration) -> Duration {
    let (tx, rx) = mpsc::channel();
    let t = std::thread::spawn(move || {
        let t0 = Instant::now();
        server.shutdown();
        let _ = tx.send(t0.elapsed());
    });
    let took = rx
        .recv_timeout(within)
        .unwrap_or_else(|_| panic!("the server's shutdown took longer than {within:?}"));
    t.join().unwrap();
    took
}

/// Sets a small receive buffer on a client socket, so that a client that does not read stops
/// the server's writes after a few KiB instead of after the kernel's tens of MiB.
fn small_receive_buffer(s: &TcpStream) {
    let size: libc::c_int = 4096;
    // SAFETY: a valid socket, and a pointer to a c_int with its size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
}

/// An SSE client: the `(id, event)` pairs it read, up to `max` events or the end of the stream.
/// Sends on `first` once it has read its first event.
fn sse(
    addr: SocketAddr,
    job: JobId,
    max: usize,
    first: Option<mpsc::Sender<()>>,
) -> Vec<(u64, String, Value)> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    // As an EventSource would ask (keep-alive is HTTP/1.1's default): the server still closes
    // the stream after the final event.
    write!(
        s,
        "GET /jobs/{job}/events HTTP/1.1\r\nHost: localhost:{}\r\nAuthorization: Bearer {TOKEN}\r\nAccept: text/event-stream\r\n\r\n",
        addr.port()
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
    let mut first = first;
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
            if let Some(tx) = first.take() {
                let _ = tx.send(());
            }
        }
    }
    out // dropping the stream disconnects
}

#[test]
fn http_server() {
    let before = thread_count();
    end_to_end();
    token();
    origin_and_host();
    content_type();
    slow_request();
    huge_head();
    connection_cap();
    idle_connections();
    stuck_readers_time_out();
    shutdown_whatever_clients_do();
    delete_answers_from_the_cancel();
    accept_backs_off_when_out_of_files();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut now = thread_count();
    while now > before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        now = thread_count();
    }
    assert_eq!(
        now, before,
        "threads left after the servers and engines shut down"
    );
}

fn end_to_end() {
    let engine = engine();
    let mut so = options();
    so.max_body = 4096;
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
    assert_eq!(call(addr, "DELETE", "/jobs/999", "").0, 404);
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
    // The bundled textops nodes declare that they hold no state (checkpoints accept them).
    assert_eq!(case["stateless"], serde_json::json!(true), "{body}");

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

    // Several SSE clients connect and disconnect while the job runs. The long readers say
    // when they are streaming, and the cancel comes only after that.
    let (streaming, started) = mpsc::channel();
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let tx = streaming.clone();
            std::thread::spawn(move || sse(addr, id, usize::MAX, Some(tx)))
        })
        .collect();
    drop(streaming);
    for _ in 0..3 {
        let early = sse(addr, id, 2, None); // reads two events, then disconnects
        assert_eq!(early.len(), 2);
    }
    for _ in 0..3 {
        started
            .recv_timeout(PATIENCE)
            .expect("every reader streams events");
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

    let (status, body) = call(addr, "DELETE", &format!("/jobs/{id}"), "");
    assert_eq!(status, 202, "{body}");
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
    let (status, body) = call(addr, "DELETE", &format!("/jobs/{id}"), "");
    assert_eq!(status, 409);
    assert!(body.contains("already ended (cancelled)"), "{body}");
    // A client arriving after the end gets the final event at once.
    let after = sse(addr, id, usize::MAX, None);
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].1, "cancelled");

    let (status, body) = call(addr, "GET", "/jobs", "");
    assert_eq!(status, 200);
    assert_eq!(json(&body).as_array().unwrap().len(), 1);

    // The same pipeline as JSON.
    let doc = serde_json::json!({
        "stages": {
            "read": {"kind": "lines.read", "path": "/dev/null"},
            "out": {"kind": "ndjson.write", "input": "read", "path": "/dev/null"},
        }
    });
    let mut headers = good(addr).replace("application/toml", "application/json");
    headers.push_str("X-Test: json\r\n");
    let r = raw(addr, &request("POST", "/jobs", &headers, &doc.to_string()));
    assert_eq!(r.status, 201, "{}", r.body);
    let id = JobId(json(&r.body)["id"].as_u64().unwrap());
    assert_eq!(engine.wait(id).unwrap().status, JobStatus::Succeeded);
    // Its report carries `checkpoints`: null, since it has no [checkpoint] table.
    let (status, body) = call(addr, "GET", &format!("/jobs/{id}"), "");
    assert_eq!(status, 200);
    let report = &json(&body)["report"];
    assert!(report.get("checkpoints").is_some(), "{body}");
    assert_eq!(report["checkpoints"], Value::Null, "{body}");
    // A bad [checkpoint] table is refused at submission, at its line.
    let (status, body) = call(
        addr,
        "POST",
        "/jobs",
        "[checkpoint]\ndir = \"cp\"\ninterval = \"often\"\n\n[stages.read]\nkind = \"lines.read\"\npath = \"/dev/null\"\n\n[stages.out]\nkind = \"ndjson.write\"\ninput = \"read\"\npath = \"/dev/null\"\n",
    );
    assert_eq!(status, 400, "{body}");
    let e = json(&body)["error"].as_str().unwrap().to_string();
    assert!(e.contains(":3: [checkpoint] interval"), "{e}");

    server.shutdown();
    engine.shutdown(Duration::from_secs(5)).unwrap();
}

/// 401 without the token or with a wrong one; `/health` needs none; a browser presents it
/// once in the URL and then holds it in a cookie, which an event stream can use.
fn token() {
    let engine = engine();
    let server = serve(Arc::clone(&engine), options()).unwrap();
    let addr = server.addr();
    assert_eq!(server.token(), TOKEN);
    // A token the server makes itself, or none that travels badly.
    let own = serve(
        Arc::clone(&engine),
        ServeOptions::new("127.0.0.1:0".parse().unwrap()),
    )
    .unwrap();
    assert_eq!(own.token().len(), 48);
    assert!(
        own.url().ends_with(&format!("/?token={}", own.token())),
        "{}",
        own.url()
    );
    own.shutdown();
    for bad in [
        "short",
        "has space in it",
        "semi;colon;cookie",
        "per%cent-encoded",
    ] {
        let mut so = options();
        so.token = Some(bad.into());
        let err = serve(Arc::clone(&engine), so).unwrap_err();
        assert!(
            matches!(err, millrace::Error::InvalidToken { .. }),
            "{bad}: {err:?}"
        );
        assert!(err.to_string().starts_with("invalid token: "), "{err}");
    }
    assert_eq!(
        server.url(),
        format!("http://127.0.0.1:{}/?token={TOKEN}", addr.port())
    );
    let host = format!("Host: 127.0.0.1:{}\r\n", addr.port());

    let r = raw(addr, &request("GET", "/jobs", &host, ""));
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.head.contains("www-authenticate: bearer"), "{}", r.head);
    let wrong = format!("{host}Authorization: Bearer {}x\r\n", TOKEN);
    assert_eq!(raw(addr, &request("GET", "/jobs", &wrong, "")).status, 401);
    let prefix = format!(
        "{host}Authorization: Bearer {}\r\n",
        &TOKEN[..TOKEN.len() - 1]
    );
    assert_eq!(raw(addr, &request("GET", "/jobs", &prefix, "")).status, 401);
    let basic = format!("{host}Authorization: Basic {TOKEN}\r\n");
    assert_eq!(raw(addr, &request("GET", "/jobs", &basic, "")).status, 401);
    let post = format!("{host}Content-Type: application/toml\r\n");
    assert_eq!(raw(addr, &request("POST", "/jobs", &post, "")).status, 401);
    assert_eq!(
        raw(addr, &request("DELETE", "/jobs/1", &host, "")).status,
        401
    );
    assert_eq!(
        raw(addr, &request("GET", "/metrics", &host, "")).status,
        401
    );
    let r = raw(addr, &request("GET", "/health", &host, ""));
    assert_eq!(
        (r.status, json(&r.body)["status"].as_str()),
        (200, Some("ok"))
    );
    assert!(!r.head.contains("set-cookie"), "{}", r.head);

    // The cookie flow: `?token=` once, then the cookie.
    let r = raw(
        addr,
        &request("GET", &format!("/?token={TOKEN}"), &host, ""),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let cookie_line = r
        .head
        .lines()
        .find(|l| l.starts_with("set-cookie:"))
        .unwrap_or_else(|| panic!("no cookie: {}", r.head));
    for part in ["httponly", "samesite=strict", "path=/"] {
        assert!(cookie_line.contains(part), "{cookie_line}");
    }
    let cookie = format!("millrace_token={TOKEN}");
    assert!(
        cookie_line.contains(&cookie.to_ascii_lowercase()),
        "{cookie_line}"
    );
    let with_cookie = format!("{host}Cookie: theme=dark; {cookie}\r\n");
    let r = raw(addr, &request("GET", "/jobs", &with_cookie, ""));
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(!r.head.contains("set-cookie"), "{}", r.head);
    let bad_cookie = format!("{host}Cookie: millrace_token=nope-nope-nope\r\n");
    assert_eq!(
        raw(addr, &request("GET", "/jobs", &bad_cookie, "")).status,
        401
    );
    assert_eq!(
        raw(addr, &request("GET", "/?token=nope-nope-nope", &host, "")).status,
        401
    );
    // The URL's token is for a page to load: a POST must hold it.
    let r = raw(
        addr,
        &request("POST", &format!("/jobs?token={TOKEN}"), &post, ""),
    );
    assert_eq!(r.status, 401);

    // An event stream authenticated by the cookie alone, as an EventSource would be.
    let id = engine
        .submit("quick", || {
            let p = millrace::Pipeline::new();
            p.source("n", 0..10u64).for_each(|_| {});
            Ok(p)
        })
        .unwrap();
    engine.wait(id).unwrap();
    let r = raw(
        addr,
        format!("GET /jobs/{id}/events HTTP/1.1\r\n{with_cookie}Accept: text/event-stream\r\n\r\n")
            .as_bytes(),
    );
    assert_eq!(r.status, 200);
    assert!(r.body.contains("event: finished"), "{}", r.body);

    server.shutdown();
    engine.shutdown(Duration::from_secs(5)).unwrap();
}

/// 403 for a foreign `Origin` or `Host`; the server's own, the loopback names and an allowed
/// name pass.
fn origin_and_host() {
    let engine = engine();
    let mut so = options();
    so.allow_hosts = vec!["millrace.test".into()];
    let server = serve(Arc::clone(&engine), so).unwrap();
    let addr = server.addr();
    let port = addr.port();
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    let get = |headers: String| raw(addr, &request("GET", "/jobs", &headers, "")).status;

    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("LocalHost:{port}"),
        format!("[::1]:{port}"),
        format!("millrace.test:{port}"),
    ] {
        assert_eq!(get(format!("Host: {host}\r\n{auth}")), 200, "{host}");
        assert_eq!(
            get(format!("Host: {host}\r\nOrigin: http://{host}\r\n{auth}")),
            200,
            "{host}"
        );
    }
    // DNS rebinding: a foreign name that resolves to 127.0.0.1.
    for host in [
        format!("evil.example:{port}"),
        "localhost".to_string(),
        format!("localhost:{}", port.wrapping_add(1)),
        format!("millrace.test.evil.example:{port}"),
    ] {
        assert_eq!(get(format!("Host: {host}\r\n{auth}")), 403, "{host}");
    }
    let r = raw(
        addr,
        &request(
            "GET",
            "/health",
            &format!("Host: evil.example:{port}\r\n"),
            "",
        ),
    );
    assert_eq!(r.status, 403);
    assert!(r.body.contains("--allow-host"), "{}", r.body);
    assert_eq!(get(auth.clone()), 400, "no Host at all");
    // A cross-site page.
    let host = format!("Host: 127.0.0.1:{port}\r\n");
    for origin in [
        "http://evil.example".to_string(),
        "null".to_string(),
        format!("https://127.0.0.1:{port}"),
        format!("http://localhost:{port}"), // another origin than the Host's
    ] {
        assert_eq!(
            get(format!("{host}Origin: {origin}\r\n{auth}")),
            403,
            "{origin}"
        );
    }
    let cross_post =
        format!("{host}Origin: http://evil.example\r\n{auth}Content-Type: application/toml\r\n");
    let r = raw(addr, &request("POST", "/jobs", &cross_post, "[stages]\n"));
    assert_eq!(r.status, 403);
    assert!(engine.list().is_empty());

    server.shutdown();
    engine.shutdown(Duration::from_secs(5)).unwrap();
}

/// 415 for a POST that is not TOML or JSON (what a cross-site form or `text/plain` POST sends).
fn content_type() {
    let engine = engine();
    let server = serve(Arc::clone(&engine), options()).unwrap();
    let addr = server.addr();
    let base = format!(
        "Host: 127.0.0.1:{}\r\nAuthorization: Bearer {TOKEN}\r\n",
        addr.port()
    );
    let pipeline = "[stages.read]\nkind = \"lines.read\"\npath = \"/dev/null\"\n\n[stages.out]\nkind = \"ndjson.write\"\ninput = \"read\"\npath = \"/dev/null\"\n";
    for ct in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        Some("application/tomlx"),
        None,
    ] {
        let headers = match ct {
            Some(ct) => format!("{base}Content-Type: {ct}\r\n"),
            None => base.clone(),
        };
        let r = raw(addr, &request("POST", "/jobs", &headers, pipeline));
        assert_eq!(r.status, 415, "{ct:?}: {}", r.body);
        assert!(r.body.contains("application/toml"), "{}", r.body);
    }
    assert!(engine.list().is_empty(), "nothing was submitted");
    let headers = format!("{base}Content-Type: application/toml; charset=utf-8\r\n");
    let r = raw(addr, &request("POST", "/jobs", &headers, pipeline));
    assert_eq!(r.status, 201, "{}", r.body);
    let id = JobId(json(&r.body)["id"].as_u64().unwrap());
    engine.wait(id).unwrap();
    server.shutdown();
    engine.shutdown(Duration::from_secs(5)).unwrap();
}

/// 408 for a client that sends its request a byte at a time: the deadline is for the whole
/// request, not for each read.
fn slow_request() {
    let engine = engine();
    let mut so = options();
    so.request_timeout = Duration::from_millis(500);
    let server = serve(Arc::clone(&engine), so).unwrap();
    let addr = server.addr();
    for body in [false, true] {
        let mut s = TcpStream::connect(addr).unwrap();
        let req = if body {
            // The head at once, then a body that trickles.
            let head = request("POST", "/jobs", &good(addr), &"#".repeat(1000));
            let (head, rest) = head.split_at(head.len() - 1000);
            s.write_all(head).unwrap();
            rest.to_vec()
        } else {
            request("GET", "/jobs", &good(addr), "")
        };
        // One byte every 50 ms, each well inside any per-read timeout; the answer is read
        // between bytes.
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let t0 = Instant::now();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        let mut sent = 0;
        let status = loop {
            assert!(
                t0.elapsed() < PATIENCE,
                "no answer to a request trickling for {PATIENCE:?}"
            );
            if sent < req.len() && s.write_all(&req[sent..=sent]).is_ok() {
                sent += 1;
            }
            match s.read(&mut buf) {
                Ok(0) => break String::from_utf8_lossy(&got).into_owned(),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("{e}"),
            }
        };
        assert!(status.starts_with("HTTP/1.1 408"), "{status}");
        assert!(sent < req.len(), "the server waited for the whole request");
    }
    server.shutdown();
    engine.shutdown(Duration::from_secs(5)).unwrap();
}

/// 431 for a head over 16 KiB, and the client can read it (the rest it sent is drained, not
/// reset).
fn huge_head() {
    let engine = engine();
    let server = serve(Arc::clone(&engine), options()).unwrap();
    let addr = server.addr();
    let mut headers = good(addr);
    for i in 0..1000 {
        headers.push_str(&format!("X-Filler-{i}: {}\r\n", "y".repeat(60)));
    }
    let r = raw(addr, &request("GET", "/jobs", &headers, ""));
    assert_eq!(r.status, 431, "{}", r.body);
    let one_line = format!("{}X-Big: {}\r\n", good(addr), "z".repeat(40_000));
    assert_eq!(
        raw(addr, &request("GET", "/jobs", &one_line, "")).status,
        431
    );
    // A head that stops short is a bad request, not a large one.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.write_all(b"GET /jobs HTTP/1.1\r\nHost: x\r\n").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_response(&mut s).status, 400);
    server.shutdown();
    engine.shutdown(Duration::from_secs(5)).unwrap();
}

/// Over the connection cap: 503 at once; once connections end, there is room again.
fn connection_cap() {
    let engine = engine();
    let mut so = options();
    so.max_connections = 2;
    let server = serve(Arc::clone(&engine), so).unwrap();
    let addr = server.addr();
    let idle: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
    wait_until("two connections", PATIENCE, || server.connections() == 2);
    let t0 = Instant::now();
    let r = raw(addr, &request("GET", "/health", &good(addr), ""));
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("too many connections"), "{}", r.body);
    // "At once": long before the idle clients' request deadline would free a place.
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    drop(idle);
    wait_until("the idle connections to end", PATIENCE, || {
        server.connections() == 0
    });
    assert_eq!(call(addr, "GET", "/health", "").0, 200);
    server.shutdown();
    engine.shutdown(Duration::from_secs(5)).unwrap();
}

/// 200 idle connections do not keep a normal request from being answered.
fn idle_connections() {
    let engine = engine();
    let mut so = options();
    so.max_connections = 300;
    let server = serve(Arc::clone(&engine), so).unwrap();
    let addr = server.addr();
    let idle: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    wait_until("200 connections", PATIENCE, || server.connections() >= 200);
    let (status, body) = call(addr, "GET", "/jobs", "");
    assert_eq!((status, body.as_str()), (200, "[]"));
    // Shutdown ends the idle connections at once (not at their request deadline).
    let took = timed_shutdown(server, SHUTDOWN_BOUND + PATIENCE);
    assert!(took <= SHUTDOWN_BOUND, "shutdown took {took:?}");
    drop(idle);
    engine.shutdown(Duration::from_secs(5)).unwrap();
}

/// A job whose final event is 16 MiB (its error message): an event stream of it cannot be
/// written to a client that does not read.
fn huge_failed_job(engine: &Engine) -> JobId {
    let id = engine
        .submit("huge", || Err(millrace::Error::Build("x".repeat(16 << 20))))
        .unwrap();
    assert_eq!(engine.wait(id).unwrap().status, JobStatus::Failed);
    id
}

/// Opens the event stream of `id` and reads its first bytes, so that the server is writing
/// the (huge) event, then stops reading.
fn stuck_reader(addr: SocketAddr, id: JobId) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    small_receive_buffer(&s);
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.write_all(&request(
        "GET",
        &format!("/jobs/{id}/events"),
        &good(addr),
        "",
    ))
    .unwrap();
    read_until(&mut s, b"data: ");
    s
}

/// Reads until `marker` has arrived: the server is past computing its answer and writing it.
fn read_until(s: &mut TcpStream, marker: &[u8]) {
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(marker) {
        s.read_exact(&mut byte).unwrap();
        got.push(byte[0]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"), "{got:?}");
}

/// A client that never reads its event stream is dropped after the write timeout; the server
/// answers others meanwhile.
fn stuck_readers_time_out() {
    let engine = engine();
    let mut so = options();
    so.write_timeout = Duration::from_millis(300);
    let server = serve(Arc::clone(&engine), so).unwrap();
    let addr = server.addr();
    let id = huge_failed_job(&engine);
    let stuck: Vec<TcpStream> = (0..3).map(|_| stuck_reader(addr, id)).collect();
    assert_eq!(call(addr, "GET", "/health", "").0, 200);
    assert_eq!(call(addr, "GET", "/metrics", "").0, 200);
    wait_until(
        "the server to give up on the clients that do not read",
        PATIENCE,
        || server.connections() == 0,
    );
    drop(stuck);
    server.shutdown();
    engine.shutdown(Duration::from_secs(5)).unwrap();
}

/// Shutdown completes within its bound with clients stuck in every way: event streams and a
/// response nobody reads, a request trickling in, connections that never send.
fn shutdown_whatever_clients_do() {
    let engine = engine();
    let mut so = options();
    so.write_timeout = Duration::from_secs(3600);
    so.request_timeout = Duration::from_secs(3600);
    let server = serve(Arc::clone(&engine), so).unwrap();
    let addr = server.addr();
    let id = huge_failed_job(&engine);
    let mut stuck: Vec<TcpStream> = (0..3).map(|_| stuck_reader(addr, id)).collect();
    // A response nobody reads: the job list holds the 16 MiB error too.
    let mut s = TcpStream::connect(addr).unwrap();
    small_receive_buffer(&s);
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.write_all(&request("GET", "/jobs", &good(addr), ""))
        .unwrap();
    read_until(&mut s, b"xxxxxxxx");
    stuck.push(s);
    // Half a request, and nothing.
    let mut half = TcpStream::connect(addr).unwrap();
    half.write_all(b"GET /jobs HTTP/1.1\r\nHost: ").unwrap();
    stuck.push(half);
    stuck.extend((0..5).map(|_| TcpStream::connect(addr).unwrap()));
    wait_until("every client to be connected", PATIENCE, || {
        server.connections() == stuck.len()
    });
    // The others are still served.
    assert_eq!(call(addr, "GET", "/health", "").0, 200);
    let took = timed_shutdown(server, SHUTDOWN_BOUND + PATIENCE);
    assert!(took <= SHUTDOWN_BOUND, "shutdown took {took:?}");
    drop(stuck);
    engine.shutdown(Duration::from_secs(5)).unwrap();
}

/// `DELETE` answers from what the cancel found. The interleaving the old code got wrong (the
/// job ending between a status read and the cancel) cannot be forced from outside; what can:
/// a job cancelled before it runs is `202` and ends cancelled, and an ended job is `409` with
/// its status.
fn delete_answers_from_the_cancel() {
    let engine = engine();
    let server = serve(Arc::clone(&engine), options()).unwrap();
    let addr = server.addr();
    let (release, gate) = mpsc::channel::<()>();
    let id = engine
        .submit("gated", move || {
            let _ = gate.recv();
            let p = millrace::Pipeline::new();
            p.source("n", 0..10u64).for_each(|_| {});
            Ok(p)
        })
        .unwrap();
    let (status, body) = call(addr, "DELETE", &format!("/jobs/{id}"), "");
    assert_eq!(status, 202, "{body}");
    assert_eq!(json(&body)["cancelling"], true);
    release.send(()).unwrap();
    assert_eq!(engine.wait(id).unwrap().status, JobStatus::Cancelled);

    let done = engine
        .submit("done", || {
            let p = millrace::Pipeline::new();
            p.source("n", 0..10u64).for_each(|_| {});
            Ok(p)
        })
        .unwrap();
    assert_eq!(engine.wait(done).unwrap().status, JobStatus::Succeeded);
    let (status, body) = call(addr, "DELETE", &format!("/jobs/{done}"), "");
    assert_eq!(status, 409);
    assert!(body.contains("already ended (succeeded)"), "{body}");
    // Many jobs racing their own end against a DELETE: every answer agrees with the job's
    // fate (202 only while it had not ended).
    for _ in 0..50 {
        let id = engine
            .submit("racing", || {
                let p = millrace::Pipeline::new();
                p.source("n", 0..100u64).for_each(|_| {});
                Ok(p)
            })
            .unwrap();
        let (status, body) = call(addr, "DELETE", &format!("/jobs/{id}"), "");
        let end = engine.wait(id).unwrap().status;
        match status {
            202 => assert!(
                matches!(end, JobStatus::Cancelled | JobStatus::Succeeded),
                "{end:?}"
            ),
            409 => assert!(body.contains(end.as_str()), "{body} vs {end:?}"),
            _ => panic!("{status} {body}"),
        }
    }
    server.shutdown();
    engine.shutdown(Duration::from_secs(5)).unwrap();
}

/// Restores the process's limit on open files, and closes the files that filled it, however
/// the scenario ends.
struct FilesExhausted {
    limit: libc::rlimit,
    filler: Vec<std::fs::File>,
}

impl Drop for FilesExhausted {
    fn drop(&mut self) {
        self.filler.clear();
        // SAFETY: a valid rlimit, the one read before.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &self.limit) };
    }
}

/// The CPU time a thread of this process has used, in clock ticks, from its already open
/// `/proc/self/task/TID/stat` (opening a file is impossible once the files are exhausted).
fn cpu_ticks(stat: &mut std::fs::File) -> u64 {
    use std::io::Seek;
    stat.rewind().unwrap();
    let mut text = String::new();
    stat.read_to_string(&mut text).unwrap();
    let fields: Vec<&str> = text.rsplit_once(") ").unwrap().1.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// When `accept` fails (`EMFILE`: the process has no file descriptor left) the accepting thread
/// pauses instead of retrying at once, and shutdown still completes within its bound (its
/// wake-up connection cannot be made then).
fn accept_backs_off_when_out_of_files() {
    let engine = engine();
    let mut so = options();
    so.request_timeout = Duration::from_secs(3600);
    // No request before: an ended connection's socket, freed when the next one is accepted,
    // would leave a descriptor to spare.
    let server = serve(Arc::clone(&engine), so).unwrap();
    let addr = server.addr();
    let find = || {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|t| {
                std::fs::read_to_string(t.join("comm"))
                    .is_ok_and(|c| c.trim_end() == "millrace-http")
            })
    };
    wait_until("the accepting thread to start", PATIENCE, || {
        find().is_some()
    });
    let tid = find().unwrap();
    let mut stat = std::fs::File::open(tid.join("stat")).unwrap();
    let mut syscall = std::fs::File::open(tid.join("syscall")).unwrap();
    // accept4 and accept, by number (as /proc/TID/syscall shows them).
    let accepts = [libc::SYS_accept4.to_string(), libc::SYS_accept.to_string()];
    let mut in_accept = || {
        use std::io::Seek;
        let mut now = String::new();
        syscall.rewind().unwrap();
        syscall.read_to_string(&mut now).unwrap();
        let number = now.split(' ').next().unwrap_or("");
        accepts.iter().any(|a| a == number)
    };
    wait_until(
        "the accepting thread to wait in accept()",
        PATIENCE,
        &mut in_accept,
    );

    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid pointer to an rlimit.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    let highest = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .unwrap();
    let mut exhausted = FilesExhausted {
        limit,
        filler: Vec::new(),
    };
    let low = libc::rlimit {
        rlim_cur: highest + 64,
        rlim_max: limit.rlim_max,
    };
    // SAFETY: a valid rlimit, below the hard limit.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &low) }, 0);
    while let Ok(f) = std::fs::File::open("/dev/null") {
        exhausted.filler.push(f);
    }
    // Room for one client and the server's copy of its socket (its accept holds a descriptor
    // for it already): the accepting thread serves it, and its next `accept` finds no
    // descriptor left, and keeps finding none.
    exhausted.filler.truncate(exhausted.filler.len() - 2);
    let served = TcpStream::connect(addr).unwrap();
    wait_until("the connection to be served", PATIENCE, || {
        server.connections() == 1
    });
    // Blocked in accept, it would have a descriptor to spare.
    wait_until("the accepting thread to leave accept()", PATIENCE, || {
        !in_accept()
    });
    // A measurement over a fixed window, not a synchronization: a thread retrying at once
    // uses most of a core in it, one that backs off almost nothing.
    let window = Duration::from_millis(500);
    let t0 = cpu_ticks(&mut stat);
    std::thread::sleep(window);
    let used = cpu_ticks(&mut stat) - t0;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    assert!(
        used * 5 < per_second * window.as_millis() as u64 / 1000,
        "the accepting thread used {used} ticks (of {per_second}/s) in {window:?} without files"
    );
    let took = timed_shutdown(server, SHUTDOWN_BOUND + PATIENCE);
    assert!(took <= SHUTDOWN_BOUND, "shutdown took {took:?}");
    drop(exhausted);
    drop(served);
    engine.shutdown(Duration::from_secs(5)).unwrap();
}
