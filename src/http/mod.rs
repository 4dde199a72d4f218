//! Live status over HTTP: a small blocking HTTP/1.1 server (std only, no async runtime) in front
//! of an [`Engine`].
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /jobs` | every job as JSON |
//! | `GET /jobs/{id}` | one job as JSON |
//! | `GET /jobs/{id}/events` | its progress stream as Server-Sent Events, ending with the final event |
//! | `POST /jobs` | submit a TOML pipeline (the body; `?name=` optional): `201 {"id": n}` |
//! | `DELETE /jobs/{id}` | cancel it: `202` |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /plugins/nodes` | the plugin node palette: every node type with its parameter specs |
//!
//! Errors are 4xx/5xx with `{"error": "..."}`. The server listens on loopback unless told
//! otherwise explicitly; request heads and bodies are limited in size and a client that sends
//! nothing for 5 s is dropped. Every response closes its connection (no keep-alive), so an
//! event stream ends, for any client, when the job's final event has been sent.
//!
//! One thread accepts connections; each connection is served on a thread of its own, tracked
//! and joined. `Server::shutdown` (or dropping the server) stops accepting, ends every event
//! stream and joins every thread. tiny_http was tried first and dropped: its worker threads are
//! detached and outlive the server by up to 5 s, and an event stream could not close its
//! connection.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::job::{Engine, JobId, JobStatus, Received, RecvTimeoutError};
use crate::sync::thread::{self, JoinHandle};
use crate::sync::{AtomicBool, Mutex, Ordering};
use crate::Error;

/// Where and how to serve.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServeOptions {
    /// The address to listen on (port 0 picks a free one).
    pub listen: SocketAddr,
    /// Allow a non-loopback address (off by default: the API can submit and cancel jobs).
    pub allow_remote: bool,
    /// The largest request body accepted (default 1 MiB).
    pub max_body: usize,
    /// Directory that relative paths in submitted pipelines resolve against (default: the
    /// current directory).
    pub base_dir: std::path::PathBuf,
    /// Directories searched for plugins before the standard search path (`GET /plugins/nodes`).
    pub plugin_dirs: Vec<std::path::PathBuf>,
}

impl ServeOptions {
    /// Loopback-only options for `listen`.
    pub fn new(listen: SocketAddr) -> Self {
        ServeOptions {
            listen,
            allow_remote: false,
            max_body: 1 << 20,
            base_dir: std::path::PathBuf::from("."),
            plugin_dirs: Vec::new(),
        }
    }
}

/// A running HTTP server. Dropping it shuts it down.
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("addr", &self.addr).finish()
    }
}

/// The longest request head (request line and headers) accepted.
const MAX_HEAD: usize = 16 * 1024;
/// How long a client may stay silent while sending a request.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts serving `engine`.
pub fn serve(engine: Arc<Engine>, opts: ServeOptions) -> Result<Server, Error> {
    if !opts.listen.ip().is_loopback() && !opts.allow_remote {
        return Err(Error::NotLoopback { addr: opts.listen });
    }
    let listen = |source| Error::Listen {
        addr: opts.listen,
        source,
    };
    let listener = TcpListener::bind(opts.listen).map_err(listen)?;
    let addr = listener.local_addr().map_err(listen)?;
    let stop = Arc::new(AtomicBool::new(false));
    let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::new(Mutex::new(Vec::new()));
    let ctx = Arc::new(Ctx {
        engine,
        opts,
        stop: Arc::clone(&stop),
    });
    let conns = Arc::clone(&connections);
    let acceptor = thread::Builder::new()
        .name("millrace-http".into())
        .spawn(move || {
            for stream in listener.incoming() {
                if ctx.stop.load(Ordering::Acquire) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let c = Arc::clone(&ctx);
                let spawned = thread::Builder::new()
                    .name("millrace-http-conn".into())
                    .spawn(move || c.serve_connection(stream));
                let mut all = conns.lock();
                // Join the connections that have ended; keep the rest.
                let (done, live): (Vec<_>, Vec<_>) = all.drain(..).partition(|t| t.is_finished());
                *all = live;
                match spawned {
                    Ok(t) => all.push(t),
                    Err(e) => log::warn!("cannot serve a connection: {e}"),
                }
                drop(all);
                for t in done {
                    let _ = t.join();
                }
            }
        })
        .map_err(|source| Error::Spawn {
            what: "the HTTP thread".into(),
            stage: None,
            source,
        })?;
    Ok(Server {
        addr,
        stop,
        acceptor: Some(acceptor),
        connections,
    })
}

impl Server {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, ends every event stream and joins every thread of the server.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(a) = self.acceptor.take() {
            // Wake the blocking accept with a connection of our own.
            let _ = TcpStream::connect(self.addr);
            let _ = a.join();
        }
        let all: Vec<_> = self.connections.lock().drain(..).collect();
        for t in all {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

struct Ctx {
    engine: Arc<Engine>,
    opts: ServeOptions,
    stop: Arc<AtomicBool>,
}

/// A response: status, content type, body.
struct Reply {
    status: u16,
    content_type: &'static str,
    body: String,
}

fn json_reply(status: u16, body: &Value) -> Reply {
    Reply {
        status,
        content_type: "application/json",
        body: body.to_string(),
    }
}

fn error(status: u16, message: &str) -> Reply {
    json_reply(status, &json!({ "error": message }))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

fn write_reply(w: &mut TcpStream, r: &Reply) {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len()
    );
    let _ = w
        .write_all(head.as_bytes())
        .and_then(|()| w.write_all(r.body.as_bytes()))
        .and_then(|()| w.flush());
}

/// A parsed request.
struct Request {
    method: String,
    path: String,
    query: String,
    body: Vec<u8>,
}

impl Ctx {
    fn serve_connection(&self, stream: TcpStream) {
        if self.stop.load(Ordering::Acquire) {
            return; // the shutdown's own wake-up connection
        }
        let _ = stream.set_read_timeout(Some(CLIENT_TIMEOUT));
        let mut out = match stream.try_clone() {
            Ok(s) => s,
            Err(_) => return,
        };
        let req = match self.read_request(&stream) {
            Ok(r) => r,
            Err(reply) => return write_reply(&mut out, &reply),
        };
        let parts: Vec<&str> = req.path.trim_matches('/').split('/').collect();
        if let ("GET", ["jobs", id, "events"]) = (req.method.as_str(), parts.as_slice()) {
            match id.parse().map(JobId) {
                Ok(id) => return self.events(out, id),
                Err(_) => {
                    return write_reply(&mut out, &error(400, &format!("not a job id: {id:?}")))
                }
            }
        }
        let reply = self.route(&req, &parts);
        write_reply(&mut out, &reply);
    }

    fn read_request(&self, stream: &TcpStream) -> Result<Request, Reply> {
        let mut r = BufReader::new(stream.take(MAX_HEAD as u64));
        let mut line = String::new();
        let read = |r: &mut BufReader<_>, line: &mut String| -> Result<usize, Reply> {
            line.clear();
            match r.read_line(line) {
                Ok(n) => Ok(n),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    Err(error(408, "the request did not arrive in time"))
                }
                Err(e) => Err(error(400, &format!("cannot read the request: {e}"))),
            }
        };
        read(&mut r, &mut line)?;
        let mut words = line.split_whitespace();
        let (Some(method), Some(target), Some(version)) =
            (words.next(), words.next(), words.next())
        else {
            return Err(error(400, "malformed request line"));
        };
        if !version.starts_with("HTTP/1.") {
            return Err(error(400, &format!("unsupported protocol {version}")));
        }
        let (method, target) = (method.to_string(), target.to_string());
        let mut length: Option<usize> = None;
        loop {
            if read(&mut r, &mut line)? == 0 {
                return Err(error(431, "the request head is too large or incomplete"));
            }
            let h = line.trim_end();
            if h.is_empty() {
                break;
            }
            let Some((name, value)) = h.split_once(':') else {
                return Err(error(400, &format!("malformed header: {h:?}")));
            };
            if name.trim().eq_ignore_ascii_case("content-length") {
                length = Some(
                    value
                        .trim()
                        .parse()
                        .map_err(|_| error(400, "malformed Content-Length"))?,
                );
            } else if name.trim().eq_ignore_ascii_case("transfer-encoding") {
                return Err(error(411, "send the body with a Content-Length"));
            }
        }
        let limit = self.opts.max_body;
        let length = length.unwrap_or(0);
        if length > limit {
            // Read (a bounded part of) what the client is sending, so that closing the
            // connection does not reset it before it reads the answer.
            let want = length.min(1 << 20) as u64;
            let buffered = r.buffer().len() as u64;
            let inner = r.into_inner().into_inner();
            let _ = std::io::copy(
                &mut inner.take(want.saturating_sub(buffered)),
                &mut std::io::sink(),
            );
            return Err(error(
                413,
                &format!("the body is larger than {limit} bytes"),
            ));
        }
        // What the head reader buffered is the start of the body.
        let mut body = r.buffer().to_vec();
        let inner = r.into_inner().into_inner();
        if body.len() < length {
            let mut rest = inner.take((length - body.len()) as u64);
            rest.read_to_end(&mut body)
                .map_err(|e| error(400, &format!("cannot read the body: {e}")))?;
        }
        if body.len() < length {
            return Err(error(400, "the body is shorter than its Content-Length"));
        }
        body.truncate(length);
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        Ok(Request {
            method,
            path: path.to_string(),
            query: query.to_string(),
            body,
        })
    }

    fn route(&self, req: &Request, parts: &[&str]) -> Reply {
        let job = |id: &str| {
            id.parse()
                .map(JobId)
                .map_err(|_| error(400, &format!("not a job id: {id:?}")))
        };
        match (req.method.as_str(), parts) {
            ("GET", ["jobs"]) => {
                let jobs: Vec<Value> = self.engine.list().iter().map(|j| j.to_json()).collect();
                json_reply(200, &Value::Array(jobs))
            }
            ("POST", ["jobs"]) => self.submit(req),
            ("GET", ["jobs", id]) => match job(id) {
                Ok(id) => match self.engine.status(id) {
                    Some(info) => json_reply(200, &info.to_json()),
                    None => error(404, &format!("no job {id}")),
                },
                Err(r) => r,
            },
            ("DELETE", ["jobs", id]) => match job(id) {
                Ok(id) => match self.engine.status(id) {
                    None => error(404, &format!("no job {id}")),
                    Some(info) if info.status != JobStatus::Running => error(
                        409,
                        &format!("job {id} has already ended ({})", info.status.as_str()),
                    ),
                    Some(_) => {
                        self.engine.cancel(id);
                        json_reply(202, &json!({ "id": id.0, "cancelling": true }))
                    }
                },
                Err(r) => r,
            },
            ("GET", ["metrics"]) => Reply {
                status: 200,
                content_type: "text/plain; version=0.0.4",
                body: self.metrics(),
            },
            ("GET", ["plugins", "nodes"]) => {
                let dirs = crate::plugin::search_path(&self.opts.plugin_dirs);
                json_reply(
                    200,
                    &crate::plugin::PluginRegistry::discover(&dirs).palette_json(),
                )
            }
            (
                _,
                ["jobs"] | ["jobs", _] | ["jobs", _, "events"] | ["metrics"] | ["plugins", "nodes"],
            ) => error(
                405,
                &format!("{} is not allowed on {}", req.method, req.path),
            ),
            _ => error(404, &format!("no such endpoint: {}", req.path)),
        }
    }

    fn submit(&self, req: &Request) -> Reply {
        let Ok(text) = std::str::from_utf8(&req.body) else {
            return error(400, "the body is not UTF-8");
        };
        let name = req
            .query
            .split('&')
            .find_map(|kv| kv.strip_prefix("name="))
            .filter(|n| {
                !n.is_empty()
                    && n.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            })
            .unwrap_or("submitted");
        let file = self.opts.base_dir.join(format!("{name}.toml"));
        let spec = match crate::config::PipelineSpec::from_str(text, &file) {
            Ok(s) => s,
            Err(e) => return error(400, &e.to_string()),
        };
        if let Err(e) = spec.build() {
            return error(400, &e.to_string());
        }
        match self.engine.submit_toml(spec) {
            Ok(id) => json_reply(201, &json!({ "id": id.0 })),
            Err(Error::ShuttingDown) => error(503, "the engine is shutting down"),
            Err(e) => error(500, &e.to_string()),
        }
    }

    /// Streams a job's events as Server-Sent Events until its final event, the client leaving,
    /// or shutdown; then closes the connection.
    fn events(&self, mut w: TcpStream, id: JobId) {
        let Some(sub) = self.engine.subscribe(id) else {
            return write_reply(&mut w, &error(404, &format!("no job {id}")));
        };
        let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n";
        if w.write_all(head.as_bytes())
            .and_then(|()| w.flush())
            .is_err()
        {
            return;
        }
        let mut seq = 0u64;
        let mut quiet = Duration::ZERO;
        while !self.stop.load(Ordering::Acquire) {
            let text = match sub.recv_timeout(Duration::from_millis(100)) {
                Ok(Received::Event(e)) => {
                    seq += 1;
                    format!("id: {seq}\nevent: {}\ndata: {}\n\n", e.kind(), e.to_json())
                }
                Ok(Received::Lagged(n)) => {
                    format!("event: lagged\ndata: {}\n\n", json!({ "missed": n }))
                }
                Err(RecvTimeoutError::Closed) => break, // the final event was sent
                Err(RecvTimeoutError::Timeout) => {
                    quiet += Duration::from_millis(100);
                    if quiet < Duration::from_secs(15) {
                        continue;
                    }
                    ": keep-alive\n\n".to_string()
                }
            };
            quiet = Duration::ZERO;
            if w.write_all(text.as_bytes())
                .and_then(|()| w.flush())
                .is_err()
            {
                break; // the client left; dropping `sub` unsubscribes
            }
        }
        let _ = w.shutdown(std::net::Shutdown::Both);
    }
    /// Jobs by status, and per running job the counters of every stage instance.
    fn metrics(&self) -> String {
        use std::fmt::Write as _;
        let jobs = self.engine.list();
        let mut out = String::new();
        out.push_str(
            "# HELP millrace_jobs Jobs the engine knows, by status.\n# TYPE millrace_jobs gauge\n",
        );
        for status in [
            JobStatus::Running,
            JobStatus::Succeeded,
            JobStatus::Failed,
            JobStatus::Cancelled,
        ] {
            let n = jobs.iter().filter(|j| j.status == status).count();
            let _ = writeln!(out, "millrace_jobs{{status=\"{}\"}} {n}", status.as_str());
        }
        type Series = (&'static str, &'static str, fn(&crate::StageMetrics) -> u64);
        let series: [Series; 4] = [
            (
                "millrace_stage_records_in_total",
                "Records into a stage instance.",
                |s| s.records_in,
            ),
            (
                "millrace_stage_records_out_total",
                "Records out of a stage instance.",
                |s| s.records_out,
            ),
            (
                "millrace_stage_late_records_total",
                "Records too late for every window.",
                |s| s.late,
            ),
            (
                "millrace_stage_open_windows",
                "Windows a window stage holds.",
                |s| s.open_windows,
            ),
        ];
        for (name, help, get) in series {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for j in &jobs {
                let Some(report) = &j.report else { continue };
                for s in &report.stages {
                    let _ = writeln!(
                        out,
                        "{name}{{job=\"{}\",stage=\"{}\",instance=\"{}\"}} {}",
                        j.id,
                        s.stage.replace('\\', "\\\\").replace('"', "\\\""),
                        s.instance,
                        get(s)
                    );
                }
            }
        }
        out
    }
}
