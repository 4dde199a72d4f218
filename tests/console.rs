//! What the web console asks of the server, over real TCP: the page and its assets behind the
//! token (and the page that asks for it), `POST /validate` with every error of a pipeline,
//! `GET /kinds` with every built-in kind, and a job's stage graph and live per-stage metrics
//! in `GET /jobs/{id}` and its event stream. The browser's own tests are `web/tests/` (run by
//! `.ci/browser`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use millrace::http::{serve, ServeOptions};
use millrace::job::{Engine, EngineOptions};
use serde_json::{json, Value};

const TOKEN: &str = "console-test-token-42";
const PATIENCE: Duration = Duration::from_secs(20);

struct Response {
    status: u16,
    head: String,
    body: String,
}

fn send(addr: SocketAddr, method: &str, path: &str, headers: &str, body: &str) -> Response {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n{headers}Content-Length: {}\r\n\r\n{body}",
        addr.port(),
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let status = raw.split_whitespace().nth(1).unwrap().parse().unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    Response {
        status,
        head: head.to_ascii_lowercase(),
        body: body.to_string(),
    }
}

fn auth() -> String {
    format!("Authorization: Bearer {TOKEN}\r\n")
}

fn get(addr: SocketAddr, path: &str) -> Response {
    send(addr, "GET", path, &auth(), "")
}

fn post_toml(addr: SocketAddr, path: &str, body: &str) -> Response {
    let h = format!("{}Content-Type: application/toml\r\n", auth());
    send(addr, "POST", path, &h, body)
}

fn json_of(r: &Response) -> Value {
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.body))
}

fn server() -> (Arc<Engine>, millrace::http::Server) {
    let mut eo = EngineOptions::default();
    eo.progress_interval = Duration::from_millis(20);
    let engine = Arc::new(Engine::with_options(eo));
    let mut so = ServeOptions::new("127.0.0.1:0".parse().unwrap());
    so.token = Some(TOKEN.into());
    so.base_dir = std::env::current_dir().unwrap();
    let server = serve(Arc::clone(&engine), so).unwrap();
    (engine, server)
}

#[test]
fn the_page_and_its_assets_need_the_token() {
    let (_engine, server) = server();
    let addr = server.addr();

    // Without the token: `/` is the page that asks for it, and nothing else answers.
    let r = send(addr, "GET", "/", "", "");
    assert_eq!(r.status, 401);
    assert!(r.head.contains("content-type: text/html"), "{}", r.head);
    assert!(r.body.contains("id=\"token-prompt\""), "{}", r.body);
    assert!(r.body.contains("<form method=\"get\" action=\"/\">"));
    assert!(!r.body.contains("<script"), "the prompt runs no script");
    let wrong = send(addr, "GET", "/?token=not-the-token", "", "");
    assert_eq!(wrong.status, 401);
    assert!(wrong.body.contains("token-prompt"));
    assert!(!wrong.head.contains("set-cookie"));
    for path in [
        "/assets/index.js",
        "/jobs",
        "/kinds",
        "/plugins/nodes",
        "/metrics",
    ] {
        let r = send(addr, "GET", path, "", "");
        assert_eq!(r.status, 401, "{path}: {}", r.body);
        assert!(r.head.contains("content-type: application/json"), "{path}");
    }
    let r = send(
        addr,
        "POST",
        "/validate",
        "Content-Type: application/toml\r\n",
        "",
    );
    assert_eq!(r.status, 401);

    // With it once in the URL: the page, and a cookie that opens everything else.
    let r = send(addr, "GET", &format!("/?token={TOKEN}"), "", "");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.head.contains("content-type: text/html; charset=utf-8"));
    assert!(r
        .head
        .contains("content-security-policy: default-src 'self'"));
    assert!(r.head.contains("x-content-type-options: nosniff"));
    assert!(r.head.contains("cache-control: no-cache"));
    assert!(r.body.contains("<div id=\"root\">"), "{}", r.body);
    let cookie = r
        .head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .expect("a cookie")
        .split(';')
        .next()
        .unwrap()
        .to_string();
    // The cookie's name is lower-cased with the head: send it as the server set it.
    let cookie = format!(
        "Cookie: {}\r\n",
        cookie.replace(&TOKEN.to_lowercase(), TOKEN)
    );
    let js = send(addr, "GET", "/assets/index.js", &cookie, "");
    assert_eq!(js.status, 200);
    assert!(
        js.head
            .contains("content-type: text/javascript; charset=utf-8"),
        "{}",
        js.head
    );
    assert!(!js.body.is_empty());
    let css = get(addr, "/assets/index.css");
    assert_eq!(css.status, 200);
    assert!(css.head.contains("content-type: text/css; charset=utf-8"));
    let missing = get(addr, "/assets/nope.js");
    assert_eq!(missing.status, 404);
    assert_eq!(
        json_of(&missing)["error"].as_str(),
        Some("no such asset: nope.js")
    );
    assert_eq!(get(addr, "/assets/../Cargo.toml").status, 404);
    assert_eq!(
        send(addr, "DELETE", "/assets/index.js", &auth(), "").status,
        405
    );
}

/// A pipeline with five mistakes in four stages: each is reported, with its stage, its
/// parameter and its line, in the order the checks run (the first is `from_str`'s error).
#[test]
fn validate_reports_every_error() {
    let (_engine, server) = server();
    let addr = server.addr();
    let text = r#"
[stages.read]
kind = "lines.read"
path = "examples/data/millrace.txt"
max_line_bytes = 0

[stages.words]
kind = "words"
input = "read"
field = 3
lowercase = "yes"

[stages.top]
kind = "limit"
input = "words"
n = -1

[stages.out]
kind = "ndjson.write"
input = "nowhere"
path = "/dev/null"
"#;
    let r = post_toml(addr, "/validate?name=broken", text);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = json_of(&r);
    assert_eq!(v["ok"], json!(false));
    let got: Vec<(Value, Value, Value, Value, Value)> = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["stage"].clone(),
                e["param"].clone(),
                e["line"].clone(),
                e["kind"].clone(),
                e["message"].clone(),
            )
        })
        .collect();
    let want = vec![
        (
            json!("read"),
            json!("max_line_bytes"),
            json!(5),
            json!("BadValue"),
            json!("parameter `max_line_bytes`: expected an integer from 1 to 1073741824, found the integer 0"),
        ),
        (
            json!("top"),
            json!("n"),
            json!(16),
            json!("BadValue"),
            json!("parameter `n`: expected an integer of at least 0, found the integer -1"),
        ),
        (
            json!("words"),
            json!("field"),
            json!(10),
            json!("BadValue"),
            json!("parameter `field`: expected a string, found the integer 3"),
        ),
        (
            json!("words"),
            json!("lowercase"),
            json!(11),
            json!("BadValue"),
            json!("parameter `lowercase`: expected a boolean, found the string \"yes\""),
        ),
        (
            json!("out"),
            json!("input"),
            json!(20),
            json!("UnknownInput"),
            json!("unknown input `nowhere` (stages: out, read, top, words)"),
        ),
    ];
    assert_eq!(got, want, "{}", r.body);
    // The first is the error a submit reports.
    let submit = post_toml(addr, "/jobs?name=broken", text);
    assert_eq!(submit.status, 400);
    assert_eq!(
        json_of(&submit)["error"].as_str(),
        Some(
            format!(
                "{}/broken.toml:5: stage `read`: parameter `max_line_bytes`: expected an integer from 1 to 1073741824, found the integer 0",
                std::env::current_dir().unwrap().display()
            )
            .as_str()
        )
    );

    // A missing required parameter hides nothing else of its stage's that is known.
    let r = post_toml(
        addr,
        "/validate",
        "[stages.a]\nkind = \"lines.read\"\nzz = 1\n\n[stages.b]\nkind = \"count\"\ninput = \"a\"\n",
    );
    let v = json_of(&r);
    let errs: Vec<(&str, &str)> = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["stage"].as_str().unwrap(), e["param"].as_str().unwrap()))
        .collect();
    assert_eq!(errs, [("a", "path"), ("b", "key")], "{}", r.body);

    // A good pipeline: no errors, and its graph.
    let ok = post_toml(
        addr,
        "/validate",
        &std::fs::read_to_string("examples/wordcount.toml")
            .unwrap()
            .replace("data/millrace.txt", "examples/data/millrace.txt"),
    );
    let v = json_of(&ok);
    assert_eq!(v["ok"], json!(true), "{}", ok.body);
    assert_eq!(v["errors"], json!([]));
    assert_eq!(v["graph"]["stages"].as_array().map(Vec::len), Some(5));

    // Syntax: one error, with its line.
    let v = json_of(&post_toml(addr, "/validate", "[stages.a]\nkind = \n"));
    assert_eq!(v["errors"].as_array().map(Vec::len), Some(1));
    assert_eq!(v["errors"][0]["kind"], json!("Syntax"));
    assert_eq!(v["errors"][0]["line"], json!(2));
    assert_eq!(v["errors"][0]["stage"], json!("a"));
    // A body that is not TOML's type is refused before it is read, like a submit.
    let r = send(
        addr,
        "POST",
        "/validate",
        &format!("{}Content-Type: text/plain\r\n", auth()),
        "x",
    );
    assert_eq!(r.status, 415);
}

/// Late and dead-letter edges are in the graph as such; a graph's errors are reported too.
#[test]
fn validate_wiring_and_graph_edges() {
    let (_engine, server) = server();
    let addr = server.addr();
    let text = r#"
[stages.read]
kind = "ndjson.read"
path = "examples/data/millrace.txt"
on_error = "dead_letter"
dead_letter = "bad"

[stages.bad]
kind = "ndjson.write"
path = "/dev/null"

[stages.win]
kind = "window"
input = "read"
time_field = "ts"
tumbling = "10s"
aggregate = { n = "count" }
late = "latecomers"

[stages.latecomers]
kind = "ndjson.write"
path = "/dev/null"

[stages.out]
kind = "ndjson.write"
input = "win"
path = "/dev/null"
"#;
    let v = json_of(&post_toml(addr, "/validate", text));
    assert_eq!(v["ok"], json!(true), "{v}");
    let mut edges: Vec<(String, String, String)> = v["graph"]["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["from"].as_str().unwrap().into(),
                e["to"].as_str().unwrap().into(),
                e["type"].as_str().unwrap().into(),
            )
        })
        .collect();
    edges.sort();
    let e = |a: &str, b: &str, t: &str| (a.to_string(), b.to_string(), t.to_string());
    assert_eq!(
        edges,
        [
            e("read", "bad", "dead_letter"),
            e("read", "win", "data"),
            e("win", "latecomers", "late"),
            e("win", "out", "data"),
        ]
    );
    let cycle = "[stages.a]\nkind = \"lines.read\"\npath = \"Cargo.toml\"\n\n[stages.b]\nkind = \"words\"\ninput = \"c\"\n\n[stages.c]\nkind = \"words\"\ninput = \"b\"\n\n[stages.d]\nkind = \"ndjson.write\"\ninput = \"a\"\npath = \"/dev/null\"\n";
    let v = json_of(&post_toml(addr, "/validate", cycle));
    assert_eq!(v["errors"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["errors"][0]["kind"], json!("Cycle"));
    assert_eq!(v["errors"][0]["param"], json!("input"));
    assert_eq!(
        v["errors"][0]["message"],
        json!("cycle in the stage graph: b -> c -> b")
    );
}

/// `GET /kinds` lists every built-in kind with its parameters (the list is checked against
/// the parser in `src/config/palette.rs`).
#[test]
fn kinds_lists_every_built_in_kind() {
    let (_engine, server) = server();
    let v = json_of(&get(server.addr(), "/kinds"));
    let kinds: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kind"].as_str().unwrap())
        .collect();
    let want: Vec<&str> = millrace::config::KINDS.iter().map(|(k, _)| *k).collect();
    assert_eq!(kinds, want);
    let filter = v
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kind"] == "filter")
        .unwrap();
    assert_eq!(filter["category"], json!("transform"));
    assert_eq!(filter["params"]["op"]["required"], json!(true));
    assert_eq!(
        filter["params"]["op"]["enum"],
        json!(["eq", "ne", "lt", "le", "gt", "ge", "exists", "contains"])
    );
    assert_eq!(filter["params"]["parallelism"]["min"], json!(1));
    assert_eq!(filter["params"]["parallelism"]["max"], json!(1024));
    let sink = v
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kind"] == "ndjson.write")
        .unwrap();
    assert_eq!(sink["sink"], json!(true));
    assert!(
        sink["params"].get("parallelism").is_none(),
        "a sink runs on one thread"
    );
    assert!(sink["params"].get("on_error").is_none());
}

/// A running job's JSON has its stage graph, and its events carry per-stage metrics that
/// change while it runs, with the input queue's fill.
#[test]
fn a_job_carries_its_graph_and_live_metrics() {
    let (engine, server) = server();
    let addr = server.addr();
    // A slow consumer: `exec` of a shell loop that sleeps between lines, one record a batch,
    // so the job runs long enough for several progress events and its input queue fills.
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("lines.txt");
    std::fs::write(&input, "a line\n".repeat(2000)).unwrap();
    let head = format!(
        "name = \"slow\"\n[options]\nbatch_size = 1\n\n[stages.read]\nkind = \"lines.read\"\npath = {:?}\n",
        input.display().to_string()
    );
    let text = head
        + r#"

[stages.slow]
kind = "exec"
input = "read"
command = ["sh", "-c", "while read -r l; do sleep 0.005; echo '{}'; done"]

[stages.out]
kind = "ndjson.write"
input = "slow"
path = "/dev/null"
"#;
    let r = post_toml(addr, "/jobs?name=slow", &text);
    assert_eq!(r.status, 201, "{}", r.body);
    let id = json_of(&r)["id"].as_u64().unwrap();
    let job = json_of(&get(addr, &format!("/jobs/{id}")));
    let stages: Vec<(&str, &str, u64)> = job["graph"]["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap(),
                s["kind"].as_str().unwrap(),
                s["parallelism"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        stages,
        [
            ("read", "lines.read", 1),
            ("slow", "exec", 1),
            ("out", "ndjson.write", 1)
        ]
    );
    // The event stream: progress events whose `slow` counts grow.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    write!(
        s,
        "GET /jobs/{id}/events HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n{}\r\n",
        addr.port(),
        auth()
    )
    .unwrap();
    let mut seen: Vec<u64> = Vec::new();
    let mut queue_capacity = 0;
    let mut buf = String::new();
    let mut chunk = [0u8; 8192];
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        let n = s.read(&mut chunk).unwrap();
        if n == 0 {
            break;
        }
        buf.push_str(&String::from_utf8_lossy(&chunk[..n]));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) else {
                continue;
            };
            let e: Value = serde_json::from_str(data).unwrap();
            if e["event"] != "progress" {
                continue;
            }
            // Records per TOML stage are its account's; threads' times and queues are the
            // run-time stage's that includes it (`slow+out`: the sink fuses with it).
            for a in e["report"]["accounts"].as_array().unwrap() {
                if a["stage"] == "slow" {
                    seen.push(a["records_out"].as_u64().unwrap());
                }
            }
            for row in e["report"]["stages"].as_array().unwrap() {
                if row["stage"]
                    .as_str()
                    .unwrap()
                    .split('+')
                    .any(|p| p == "slow")
                {
                    queue_capacity = queue_capacity.max(row["queue_capacity"].as_u64().unwrap());
                }
            }
        }
        if seen.windows(2).any(|w| w[1] > w[0]) && queue_capacity > 0 {
            break;
        }
    }
    assert!(
        seen.windows(2).any(|w| w[1] > w[0]),
        "the slow stage's output did not grow between events: {seen:?}"
    );
    assert!(
        queue_capacity > 0,
        "no queue capacity for a stage that reads a channel"
    );
    engine.cancel(millrace::job::JobId(id));
    let end = engine.wait(millrace::job::JobId(id)).unwrap();
    assert_eq!(end.status, millrace::job::JobStatus::Cancelled);
    // A cancelled job keeps what it did: the snapshot taken as it ended.
    let job = json_of(&get(addr, &format!("/jobs/{id}")));
    assert_eq!(job["status"], json!("cancelled"));
    let read = job["report"]["records_read"].as_u64().expect("a report");
    assert!(
        read >= *seen.last().unwrap(),
        "{read} records read, {seen:?} out of `slow`"
    );
}
