//! The job server: a small blocking HTTP/1.1 server (std only, no async runtime) in front of an
//! [`Engine`].
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /` | the web console (`console`: `web/dist/` embedded); without the token, `401` and a page that asks for it |
//! | `GET /assets/{file}` | the console's script and style sheet |
//! | `GET /health` | `{"status": "ok"}` (the only request that needs no token) |
//! | `GET /jobs` | every job as JSON (with its stage graph, when it is a TOML pipeline's) |
//! | `GET /jobs/{id}` | one job as JSON |
//! | `GET /jobs/{id}/events` | its progress stream as Server-Sent Events, ending with the final event |
//! | `POST /jobs` | submit a pipeline (the body, `application/toml` or `application/json`; `?name=` optional): `201 {"id": n}` |
//! | `POST /validate` | check a pipeline without running it: `{"ok", "errors": [{"stage", "param", "line", "kind", "message"}], "graph"}`, every error |
//! | `DELETE /jobs/{id}` | cancel it: `202`; `409` if it had ended; `404` unknown |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /kinds` | the built-in kinds with their parameter specs (the editor's palette) |
//! | `GET /plugins/nodes` | the plugin node palette: every node type with its parameter specs |
//!
//! Errors are 4xx/5xx with `{"error": "..."}`. Every response closes its connection (no
//! keep-alive), so an event stream ends, for any client, when the job's final event has been
//! sent.
//!
//! This module owns the connection handling and the routes; `console` (private) owns the
//! console's embedded files and the token page; `auth` (private) owns who
//! may ask: the token (`Authorization: Bearer`, or a cookie set after a one-time `?token=`),
//! the `Host` and `Origin` checks and the accepted body types; `limits` (private) owns what no
//! client can exceed: the connection cap, the request and write deadlines, and ending every
//! connection at shutdown. `docs/engine.md` ("Security") says what each protects against.
//!
//! One thread accepts connections; each connection is served on a thread of its own, tracked
//! and joined. [`Server::shutdown`] (or dropping the server) stops accepting, shuts every
//! connection's socket down (which ends any read or write a client holds up) and joins every
//! thread, within [`SHUTDOWN_BOUND`] whatever the clients do. tiny_http was tried first and
//! dropped: its worker threads are detached and outlive the server by up to 5 s, and an event
//! stream could not close its connection.

mod auth;
mod console;
mod limits;

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::job::{CancelOutcome, Engine, JobId, JobStatus, Received, RecvTimeoutError};
use crate::sync::thread::{self, JoinHandle};
use crate::sync::{AtomicBool, Ordering};
use crate::Error;

use auth::{BodyType, Credentials, Proof};
use limits::{Backoff, Connections, DeadlineReader};

/// How long [`Server::shutdown`] may take, whatever the clients do: stopping the accepting
/// thread (at once, or after a pause that follows a failed `accept`), shutting every socket down (at once), event
/// streams noticing (within 100 ms) and the requests being handled finishing their own work.
pub const SHUTDOWN_BOUND: Duration = Duration::from_secs(2);

/// Where and how to serve.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServeOptions {
    /// The address to listen on (port 0 picks a free one).
    pub listen: SocketAddr,
    /// Allow a non-loopback address (off by default: the API can submit and cancel jobs, and
    /// the token is then the only protection).
    pub allow_remote: bool,
    /// The token every request but `GET /health` must present; `None` generates a random one
    /// (see [`Server::token`]). Letters, digits and `-._~`, at least 8 of them.
    pub token: Option<String>,
    /// Host names (without port) accepted in the `Host` header besides the listen address,
    /// `localhost`, `127.0.0.1` and `[::1]` (each with the server's port).
    pub allow_hosts: Vec<String>,
    /// The most connections served at once (default 256); one more gets `503` at once.
    pub max_connections: usize,
    /// The time a client has to send its whole request, head and body (default 10 s); `408`
    /// after it.
    pub request_timeout: Duration,
    /// The time a client has to take each response, and each event of an event stream
    /// (default 10 s); the connection is closed after it.
    pub write_timeout: Duration,
    /// The largest request body accepted (default 1 MiB).
    pub max_body: usize,
    /// Directory that relative paths in submitted pipelines resolve against (default: the
    /// current directory), a `[checkpoint]` table's `dir` among them. `millrace serve` sets
    /// it to its working directory.
    pub base_dir: std::path::PathBuf,
    /// Directories searched for plugins before the standard search path (`GET /plugins/nodes`).
    pub plugin_dirs: Vec<std::path::PathBuf>,
}

impl ServeOptions {
    /// Loopback-only options for `listen`, with a generated token.
    pub fn new(listen: SocketAddr) -> Self {
        ServeOptions {
            listen,
            allow_remote: false,
            token: None,
            allow_hosts: Vec::new(),
            max_connections: 256,
            request_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            max_body: 1 << 20,
            base_dir: std::path::PathBuf::from("."),
            plugin_dirs: Vec::new(),
        }
    }
}

/// A running HTTP server. Dropping it shuts it down.
pub struct Server {
    addr: SocketAddr,
    listener: Arc<TcpListener>,
    token: String,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    connections: Arc<Connections>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("addr", &self.addr).finish()
    }
}

/// The longest request head (request line and headers) accepted; `431` beyond.
pub(crate) const MAX_HEAD: usize = 16 * 1024;

/// Starts serving `engine`.
pub fn serve(engine: Arc<Engine>, opts: ServeOptions) -> Result<Server, Error> {
    if !opts.listen.ip().is_loopback() && !opts.allow_remote {
        return Err(Error::NotLoopback { addr: opts.listen });
    }
    let token = match &opts.token {
        Some(t) => {
            auth::check_token(t)?;
            t.clone()
        }
        None => auth::generate_token()?,
    };
    let listen = |source| Error::Listen {
        addr: opts.listen,
        source,
    };
    let listener = Arc::new(TcpListener::bind(opts.listen).map_err(listen)?);
    let addr = listener.local_addr().map_err(listen)?;
    let stop = Arc::new(AtomicBool::new(false));
    let connections = Arc::new(Connections::new(opts.max_connections.max(1)));
    let ctx = Arc::new(Ctx {
        engine,
        hosts: auth::allowed_hosts(addr, &opts.allow_hosts),
        opts,
        token: token.clone(),
        stop: Arc::clone(&stop),
    });
    let conns = Arc::clone(&connections);
    let accepting = Arc::clone(&listener);
    let acceptor = thread::Builder::new()
        .name("millrace-http".into())
        .spawn(move || accept_loop(&accepting, &ctx, &conns))
        .map_err(|source| Error::Spawn {
            what: "the HTTP thread".into(),
            stage: None,
            source,
        })?;
    Ok(Server {
        addr,
        listener,
        token,
        stop,
        acceptor: Some(acceptor),
        connections,
    })
}

/// Accepts connections until shutdown: each on a thread of its own, up to the cap; over it, a
/// `503` at once.
fn accept_loop(listener: &TcpListener, ctx: &Arc<Ctx>, conns: &Connections) {
    let mut backoff = Backoff::default();
    loop {
        let accepted = listener.accept();
        if ctx.stop.load(Ordering::Acquire) {
            break;
        }
        let stream = match accepted {
            Ok((stream, _)) => {
                backoff.succeeded();
                stream
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => continue,
            Err(e) => {
                // `EMFILE` and its kind do not go away by retrying at once.
                let pause = backoff.failed();
                log::warn!("cannot accept a connection: {e} (retrying in {pause:?})");
                std::thread::sleep(pause);
                continue;
            }
        };
        if !conns.reap() {
            let busy = error(
                503,
                &format!(
                    "too many connections (at most {} at once)",
                    ctx.opts.max_connections
                ),
            );
            limits::refuse(stream, &busy.render());
            continue;
        }
        let socket = match stream.try_clone() {
            Ok(s) => s,
            Err(e) => {
                log::warn!("cannot serve a connection: {e}");
                continue;
            }
        };
        let c = Arc::clone(ctx);
        let spawned = thread::Builder::new()
            .name("millrace-http-conn".into())
            .spawn(move || c.serve_connection(stream));
        match spawned {
            Ok(t) => conns.add(t, socket),
            Err(e) => {
                log::warn!("cannot serve a connection: {e}");
                limits::refuse(socket, &error(503, "cannot serve now").render());
            }
        }
    }
}

impl Server {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The token requests must present (the one given, or the one generated).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The address to open in a browser, `http://127.0.0.1:PORT/?token=TOKEN` (a loopback
    /// address when the server listens on every address).
    pub fn url(&self) -> String {
        format!("http://{}/?token={}", own_authority(self.addr), self.token)
    }

    /// How many connections are being served now.
    pub fn connections(&self) -> usize {
        self.connections.count()
    }

    /// Stops accepting, ends every connection and event stream and joins every thread of the
    /// server, within [`SHUTDOWN_BOUND`].
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(a) = self.acceptor.take() {
            // Wake the blocking accept: shutting the listening socket down makes it fail at
            // once (Linux), which needs no file descriptor (a process out of them cannot open
            // a wake-up connection); elsewhere, a connection of our own.
            #[cfg(target_os = "linux")]
            {
                use std::os::fd::AsRawFd;
                // SAFETY: shutdown(2) on a socket this server owns and keeps open until the
                // accepting thread is joined; it takes no pointers.
                unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RD) };
            }
            #[cfg(not(target_os = "linux"))]
            {
                let wake: SocketAddr = own_authority(self.addr).parse().unwrap_or(self.addr);
                let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
            }
            let _ = a.join();
        }
        self.connections.close_all();
    }
}

/// `ip:port` of the server as a client on this machine reaches it (loopback for an
/// unspecified address).
fn own_authority(addr: SocketAddr) -> String {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => format!("{}:{}", Ipv4Addr::LOCALHOST, addr.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => {
            format!("[{}]:{}", Ipv6Addr::LOCALHOST, addr.port())
        }
        _ => addr.to_string(),
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
    token: String,
    /// The `Host` values accepted.
    hosts: Vec<String>,
    stop: Arc<AtomicBool>,
}

/// A response: status, content type, extra headers, body.
#[derive(Debug)]
struct Reply {
    status: u16,
    content_type: &'static str,
    headers: Vec<(&'static str, String)>,
    /// Text made for the request, or an embedded asset (not copied).
    body: std::borrow::Cow<'static, [u8]>,
}

impl Reply {
    fn new(status: u16, content_type: &'static str, body: String) -> Self {
        Reply {
            status,
            content_type,
            headers: Vec::new(),
            body: body.into_bytes().into(),
        }
    }

    /// A page or asset of the console: no caching (the file names are fixed), no sniffing,
    /// and the console's content security policy.
    fn page(status: u16, content_type: &'static str, body: &'static [u8]) -> Self {
        Reply {
            status,
            content_type,
            headers: vec![
                ("Cache-Control", "no-cache".into()),
                ("X-Content-Type-Options", "nosniff".into()),
                ("Content-Security-Policy", console::CSP.into()),
            ],
            body: body.into(),
        }
    }

    /// The body as text (lossy), for messages and tests.
    #[cfg(test)]
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn with(mut self, name: &'static str, value: String) -> Self {
        self.headers.push((name, value));
        self
    }

    /// The response as sent.
    fn render(&self) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(&self.body);
        out
    }
}

fn json_reply(status: u16, body: &Value) -> Reply {
    Reply::new(status, "application/json", body.to_string())
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
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// The answer to `DELETE /jobs/{id}`, from what the cancel itself found.
fn cancel_reply(id: JobId, outcome: CancelOutcome) -> Reply {
    match outcome {
        CancelOutcome::Requested => json_reply(202, &json!({ "id": id.0, "cancelling": true })),
        CancelOutcome::Ended(status) => error(
            409,
            &format!("job {id} has already ended ({})", status.as_str()),
        ),
        CancelOutcome::Unknown => error(404, &format!("no job {id}")),
    }
}

/// A request read in full and allowed in.
struct Request {
    method: String,
    path: String,
    query: String,
    /// How it presented the token (`None` for `GET /health`, which needs none).
    proof: Option<Proof>,
    body_type: Option<BodyType>,
    body: Vec<u8>,
}

/// The request head as sent: the request line's parts and the headers (names lowercase).
struct Head {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
}

impl Head {
    /// The value of a header that may appear once; `Err` if it appears more than once.
    fn one(&self, name: &str) -> Result<Option<&str>, Reply> {
        let mut values = self
            .headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str());
        let first = values.next();
        if values.next().is_some() {
            return Err(error(400, &format!("more than one {name} header")));
        }
        Ok(first)
    }
}

/// What the bytes received so far say of the head: `Some(end)` when it is complete (the body
/// starts at `end`), `None` when more is needed, `431` when it is, or cannot but be, longer
/// than [`MAX_HEAD`].
fn head_of(buf: &[u8]) -> Result<Option<usize>, Reply> {
    match head_end(buf) {
        Some(end) if end <= MAX_HEAD => Ok(Some(end)),
        None if buf.len() <= MAX_HEAD => Ok(None),
        _ => Err(error(
            431,
            &format!("the request head is larger than {MAX_HEAD} bytes"),
        )),
    }
}

fn incomplete_head() -> Reply {
    error(400, "the request head is incomplete")
}

/// A parsed and admitted request head, waiting for its body.
struct RequestHead {
    head: Head,
    path: String,
    query: String,
    proof: Option<Proof>,
    body_type: Option<BodyType>,
    /// The body's length (its `Content-Length`), at most the server's `max_body`.
    length: usize,
}

impl RequestHead {
    /// Parses a complete head (`raw` ends with its blank line), admits it, and checks the
    /// body's framing: `400` malformed, `411` chunked, `413` longer than `max_body`, and
    /// whatever `admit` refuses (`400`, `401`, `403`, `415`).
    fn parse(
        raw: &[u8],
        max_body: usize,
        admit: impl FnOnce(&Head, &str, &str) -> Result<(Option<Proof>, Option<BodyType>), Reply>,
    ) -> Result<Self, Reply> {
        let head = parse_head(raw)?;
        let (path, query) = head
            .target
            .split_once('?')
            .map(|(p, q)| (p.to_string(), q.to_string()))
            .unwrap_or_else(|| (head.target.clone(), String::new()));
        let (proof, body_type) = admit(&head, &path, &query)?;

        let length = match head.one("content-length")? {
            None => 0,
            Some(v) => v
                .trim()
                .parse::<usize>()
                .map_err(|_| error(400, "malformed Content-Length"))?,
        };
        if head.one("transfer-encoding")?.is_some() {
            return Err(error(411, "send the body with a Content-Length"));
        }
        if length > max_body {
            return Err(error(
                413,
                &format!("the body is larger than {max_body} bytes"),
            ));
        }
        Ok(RequestHead {
            head,
            path,
            query,
            proof,
            body_type,
            length,
        })
    }

    /// The request, given what arrived of the body (at most `length` bytes are kept).
    fn with_body(self, mut body: Vec<u8>) -> Result<Request, Reply> {
        if body.len() < self.length {
            return Err(error(400, "the body is shorter than its Content-Length"));
        }
        body.truncate(self.length);
        Ok(Request {
            method: self.head.method,
            path: self.path,
            query: self.query,
            proof: self.proof,
            body_type: self.body_type,
            body,
        })
    }
}

/// A request as the server would parse it from `bytes`, everything the client sent before
/// closing: the same steps as [`Ctx::read_request`] with `admit` in the server's place and a
/// slice for the socket (so no `408`). `Err(None)`: nothing was sent. Looks at no more than
/// [`MAX_HEAD`] bytes of head and copies no more than `max_body` of body.
fn parse_request(
    bytes: &[u8],
    max_body: usize,
    admit: impl FnOnce(&Head, &str, &str) -> Result<(Option<Proof>, Option<BodyType>), Reply>,
) -> Result<Request, Option<Reply>> {
    if bytes.is_empty() {
        return Err(None);
    }
    // The server reads up to 4 KiB past a head that has not ended; a slice needs no buffer.
    let seen = &bytes[..bytes.len().min(MAX_HEAD + 4096)];
    let Some(end) = head_of(seen).map_err(Some)? else {
        return Err(Some(incomplete_head()));
    };
    let head = RequestHead::parse(&bytes[..end], max_body, admit).map_err(Some)?;
    let body = &bytes[end..];
    let body = &body[..body.len().min(head.length)];
    head.with_body(body.to_vec()).map_err(Some)
}

/// What the fuzz target sees of a parsed request (the types above are private).
#[derive(Debug)]
pub(crate) struct ParsedRequest {
    /// The request line's method.
    pub method: String,
    /// The target's path.
    pub path: String,
    /// The target's query (after `?`).
    pub query: String,
    /// The headers' total size, names and values.
    pub header_bytes: usize,
    /// The body.
    pub body: Vec<u8>,
}

/// [`parse_request`] with an `admit` that lets every host, origin and token in and checks only
/// what is pure parsing: headers that may appear once (`400`) and a `POST`'s body type
/// (`415`). `Err((status, message))` is the reply's; `Err(None)` as [`parse_request`].
pub(crate) fn parse_request_for_fuzzing(
    bytes: &[u8],
    max_body: usize,
) -> Result<ParsedRequest, Option<(u16, String)>> {
    let admit = |head: &Head, _: &str, _: &str| {
        for name in ["host", "origin", "authorization", "cookie"] {
            head.one(name)?;
        }
        let body_type = if head.method == "POST" {
            match auth::body_type(head.one("content-type")?) {
                Some(t) => Some(t),
                None => return Err(error(415, "unsupported body type")),
            }
        } else {
            None
        };
        Ok((None, body_type))
    };
    let mut header_bytes = 0;
    let req = parse_request(bytes, max_body, |head: &Head, p: &str, q: &str| {
        header_bytes = head.headers.iter().map(|(n, v)| n.len() + v.len()).sum();
        admit(head, p, q)
    })
    .map_err(|e| e.map(|r| (r.status, String::from_utf8_lossy(&r.body).into_owned())))?;
    Ok(ParsedRequest {
        method: req.method,
        path: req.path,
        query: req.query,
        header_bytes,
        body: req.body,
    })
}

/// The default request body limit, for the fuzz target.
pub(crate) const DEFAULT_MAX_BODY: usize = 1 << 20;

/// Where the head ends (after its blank line), if it has.
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = memchr::memmem::find(buf, b"\r\n\r\n").map(|i| i + 4);
    let lf = memchr::memmem::find(buf, b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl Ctx {
    fn serve_connection(&self, stream: TcpStream) {
        if self.stop.load(Ordering::Acquire) {
            return; // the shutdown's own wake-up connection
        }
        let deadline = Instant::now() + self.opts.request_timeout;
        match self.read_request(&stream, deadline) {
            Ok(req) => self.answer(&stream, req),
            Err(Some(reply)) => {
                self.send(&stream, &reply);
                limits::linger_close(&stream);
            }
            Err(None) => {} // closed before it sent anything
        }
        let _ = stream.shutdown(Shutdown::Both);
    }

    /// Writes a whole response within the write timeout.
    fn send(&self, w: &TcpStream, reply: &Reply) {
        let deadline = Instant::now() + self.opts.write_timeout;
        let _ = limits::write_all_by(w, &reply.render(), deadline);
    }

    fn answer(&self, stream: &TcpStream, req: Request) {
        let cookie = (req.proof == Some(Proof::Query)).then(|| auth::set_cookie(&self.token));
        let parts: Vec<&str> = req.path.trim_matches('/').split('/').collect();
        if let ("GET", ["jobs", id, "events"]) = (req.method.as_str(), parts.as_slice()) {
            match id.parse().map(JobId) {
                Ok(id) => return self.events(stream, id, cookie),
                Err(_) => {
                    return self.send(stream, &error(400, &format!("not a job id: {id:?}")));
                }
            }
        }
        let mut reply = self.route(&req, &parts);
        if let Some(c) = cookie {
            reply.headers.push(("Set-Cookie", c));
        }
        self.send(stream, &reply);
    }

    /// Reads the head, decides whether the request may come in (`Host`, `Origin`, token,
    /// body type, size), then reads the body; all by `deadline`. `Err(None)`: the client
    /// closed without a word. The parsing is [`parse_request`]'s, which reads from a slice.
    fn read_request(
        &self,
        stream: &TcpStream,
        deadline: Instant,
    ) -> Result<Request, Option<Reply>> {
        let mut r = DeadlineReader::new(stream, deadline);
        let late = || error(408, "the request did not arrive in time");
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 4096];
        let end = loop {
            if let Some(end) = head_of(&buf).map_err(Some)? {
                break end;
            }
            match r.read(&mut chunk) {
                Ok(0) if buf.is_empty() => return Err(None),
                Ok(0) => return Err(Some(incomplete_head())),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if limits::timed_out(&e) => return Err(Some(late())),
                Err(e) => return Err(Some(error(400, &format!("cannot read the request: {e}")))),
            }
        };
        let mut body = buf.split_off(end);
        let head = RequestHead::parse(&buf, self.opts.max_body, |h, p, q| self.admit(h, p, q))
            .map_err(Some)?;
        let length = head.length;
        if body.len() < length {
            let mut rest = (&mut r).take((length - body.len()) as u64);
            match rest.read_to_end(&mut body) {
                Ok(_) => {}
                Err(e) if limits::timed_out(&e) => return Err(Some(late())),
                Err(e) => return Err(Some(error(400, &format!("cannot read the body: {e}")))),
            }
        }
        head.with_body(body).map_err(Some)
    }

    /// The checks a request passes before its body is read: `Host` (`403`), `Origin` (`403`),
    /// the token (`401`; `GET /health` needs none) and a `POST`'s body type (`415`).
    fn admit(
        &self,
        head: &Head,
        path: &str,
        query: &str,
    ) -> Result<(Option<Proof>, Option<BodyType>), Reply> {
        let Some(host) = head.one("host")? else {
            return Err(error(400, "the request has no Host header"));
        };
        if !auth::host_allowed(&self.hosts, host) {
            return Err(error(
                403,
                &format!("Host {host:?} is not this server's (allow a name with --allow-host)"),
            ));
        }
        if let Some(origin) = head.one("origin")? {
            if !auth::origin_allowed(origin, host) {
                return Err(error(
                    403,
                    &format!("requests from another origin ({origin}) are refused"),
                ));
            }
        }
        let get = head.method == "GET";
        let proof = if get && path == "/health" {
            None
        } else {
            let query_token = get
                .then(|| query.split('&').find_map(|kv| kv.strip_prefix("token=")))
                .flatten();
            let creds = Credentials {
                authorization: head.one("authorization")?,
                cookie: head.one("cookie")?,
                query_token,
            };
            match auth::authenticate(&self.token, &creds) {
                Some(p) => Some(p),
                // A browser opening the console without its token: a page that asks for it
                // (and shows nothing else).
                None if get && path == "/" => {
                    return Err(Reply::page(
                        401,
                        "text/html; charset=utf-8",
                        console::TOKEN_PAGE.as_bytes(),
                    )
                    .with("WWW-Authenticate", "Bearer realm=\"millrace\"".into()))
                }
                None => {
                    return Err(error(
                        401,
                        "a valid token is required (Authorization: Bearer TOKEN)",
                    )
                    .with("WWW-Authenticate", "Bearer realm=\"millrace\"".into()))
                }
            }
        };
        let body_type =
            if head.method == "POST" {
                match auth::body_type(head.one("content-type")?) {
                    Some(t) => Some(t),
                    None => return Err(error(
                        415,
                        "send the pipeline as Content-Type: application/toml (or application/json)",
                    )),
                }
            } else {
                None
            };
        Ok((proof, body_type))
    }

    fn route(&self, req: &Request, parts: &[&str]) -> Reply {
        let job = |id: &str| {
            id.parse()
                .map(JobId)
                .map_err(|_| error(400, &format!("not a job id: {id:?}")))
        };
        match (req.method.as_str(), parts) {
            ("GET", [""]) => match console::file("index.html") {
                Some(page) => Reply::page(200, "text/html; charset=utf-8", page),
                None => error(500, "the console's page is not in this build"),
            },
            ("GET", ["assets", name]) => {
                let path = format!("assets/{name}");
                match console::file(&path) {
                    Some(body) => Reply::page(200, console::content_type(&path), body),
                    None => error(404, &format!("no such asset: {name}")),
                }
            }
            ("GET", ["kinds"]) => json_reply(200, &crate::config::kinds_json()),
            ("POST", ["validate"]) => self.validate(req),
            ("GET", ["health"]) => json_reply(200, &json!({ "status": "ok" })),
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
                Ok(id) => cancel_reply(id, self.engine.try_cancel(id)),
                Err(r) => r,
            },
            ("GET", ["metrics"]) => Reply::new(200, "text/plain; version=0.0.4", self.metrics()),
            ("GET", ["plugins", "nodes"]) => {
                let dirs = crate::plugin::search_path(&self.opts.plugin_dirs);
                json_reply(
                    200,
                    &crate::plugin::PluginRegistry::discover(&dirs).palette_json(),
                )
            }
            (
                _,
                [""]
                | ["health"]
                | ["jobs"]
                | ["jobs", _]
                | ["jobs", _, "events"]
                | ["metrics"]
                | ["kinds"]
                | ["validate"]
                | ["assets", _]
                | ["plugins", "nodes"],
            ) => error(
                405,
                &format!("{} is not allowed on {}", req.method, req.path),
            ),
            _ => error(404, &format!("no such endpoint: {}", req.path)),
        }
    }

    /// A submitted pipeline's text: the body, or (`application/json`) its TOML rendering.
    fn pipeline_text(req: &Request) -> Result<std::borrow::Cow<'_, str>, Reply> {
        let Ok(text) = std::str::from_utf8(&req.body) else {
            return Err(error(400, "the body is not UTF-8"));
        };
        match req.body_type {
            Some(BodyType::Json) => serde_json::from_str::<toml::Value>(text)
                .map_err(|e| e.to_string())
                .and_then(|v| toml::to_string(&v).map_err(|e| e.to_string()))
                .map(std::borrow::Cow::Owned)
                .map_err(|e| error(400, &format!("not a pipeline document: {e}"))),
            _ => Ok(std::borrow::Cow::Borrowed(text)),
        }
    }

    /// The file a submitted pipeline is named as (`?name=`, else `submitted`), in the base
    /// directory its relative paths resolve against.
    fn submitted_file(&self, req: &Request) -> std::path::PathBuf {
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
        self.opts.base_dir.join(format!("{name}.toml"))
    }

    /// `POST /validate`: every error of the pipeline, each with its stage, parameter and line
    /// (`200` either way; `400` only for a body that is no text). A pipeline that parses is
    /// also built (as `POST /jobs` does before it runs one), so that its wiring is checked.
    fn validate(&self, req: &Request) -> Reply {
        let text = match Self::pipeline_text(req) {
            Ok(t) => t,
            Err(r) => return r,
        };
        let file = self.submitted_file(req);
        let errors = match crate::config::PipelineSpec::validate_str(&text, &file) {
            Ok(spec) => match spec.build() {
                Ok(_) => {
                    return json_reply(
                        200,
                        &json!({ "ok": true, "errors": [], "graph": spec.graph_json() }),
                    )
                }
                Err(e) => vec![e],
            },
            Err(errors) => errors,
        };
        let errors: Vec<Value> = errors
            .iter()
            .map(|e| {
                json!({
                    "stage": e.stage(),
                    "param": e.param(),
                    "line": e.line,
                    "kind": format!("{:?}", e.kind()),
                    "message": e.message,
                })
            })
            .collect();
        json_reply(200, &json!({ "ok": false, "errors": errors }))
    }

    fn submit(&self, req: &Request) -> Reply {
        let text = match Self::pipeline_text(req) {
            Ok(t) => t,
            Err(r) => return r,
        };
        let file = self.submitted_file(req);
        let spec = match crate::config::PipelineSpec::from_str(&text, &file) {
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

    /// Streams a job's events as Server-Sent Events until its final event, the client leaving
    /// or not taking an event within the write timeout, or shutdown; then closes the
    /// connection.
    fn events(&self, w: &TcpStream, id: JobId, cookie: Option<String>) {
        let Some(sub) = self.engine.subscribe(id) else {
            return self.send(w, &error(404, &format!("no job {id}")));
        };
        let mut head = String::from(
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n",
        );
        if let Some(c) = cookie {
            head.push_str(&format!("Set-Cookie: {c}\r\n"));
        }
        head.push_str("\r\n");
        let write =
            |bytes: &[u8]| limits::write_all_by(w, bytes, Instant::now() + self.opts.write_timeout);
        if write(head.as_bytes()).is_err() {
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
            if write(text.as_bytes()).is_err() {
                break; // the client left or stopped reading; dropping `sub` unsubscribes
            }
        }
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

/// Parses a request head: the request line and the headers.
fn parse_head(raw: &[u8]) -> Result<Head, Reply> {
    let text = std::str::from_utf8(raw).map_err(|_| error(400, "the request head is not UTF-8"))?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let line = lines.next().unwrap_or("");
    let mut words = line.split_whitespace();
    let (Some(method), Some(target), Some(version), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Err(error(400, "malformed request line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(error(400, &format!("unsupported protocol {version}")));
    }
    let mut headers = Vec::new();
    for h in lines.take_while(|l| !l.is_empty()) {
        let Some((name, value)) = h.split_once(':') else {
            return Err(error(400, &format!("malformed header: {h:?}")));
        };
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    Ok(Head {
        method: method.to_string(),
        target: target.to_string(),
        headers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The answer is the cancel's own: a job that ended before the cancel is a conflict, never
    /// "cancelling".
    #[test]
    fn delete_answers_from_the_cancel() {
        let id = JobId(7);
        assert_eq!(cancel_reply(id, CancelOutcome::Requested).status, 202);
        let ended = cancel_reply(id, CancelOutcome::Ended(JobStatus::Succeeded));
        assert_eq!(ended.status, 409);
        assert!(ended.text().contains("succeeded"), "{}", ended.text());
        assert_eq!(cancel_reply(id, CancelOutcome::Unknown).status, 404);
    }

    #[test]
    fn heads() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nbody"), Some(27));
        assert_eq!(head_end(b"GET / HTTP/1.1\nHost: x\n\nbody"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
        let h = parse_head(b"GET /a?b HTTP/1.1\r\nHost: x\r\nX-A:  1 \r\n\r\n").unwrap();
        assert_eq!((h.method.as_str(), h.target.as_str()), ("GET", "/a?b"));
        assert_eq!(h.one("x-a").unwrap(), Some("1"));
        let two = parse_head(b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n").unwrap();
        assert_eq!(two.one("host").err().map(|r| r.status), Some(400));
        assert!(parse_head(b"GET / SPDY\r\n\r\n").is_err());
    }

    /// The slice parser answers as the socket reader does (the statuses of docs/engine.md).
    #[test]
    fn requests_from_a_slice() {
        let status = |b: &[u8]| {
            parse_request_for_fuzzing(b, 100)
                .err()
                .map(|e| e.map(|e| e.0))
        };
        let post = |extra: &str, body: &str| {
            format!("POST /jobs?x=1 HTTP/1.1\r\nHost: a\r\n{extra}\r\n{body}").into_bytes()
        };
        assert_eq!(status(b""), Some(None));
        assert_eq!(status(b"GET / HTTP/1.1\r\nHost: a\r\n"), Some(Some(400)));
        let r = parse_request_for_fuzzing(
            &post(
                "Content-Type: application/toml\r\nContent-Length: 3\r\n",
                "abcdef",
            ),
            100,
        )
        .unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), r.query.as_str()),
            ("POST", "/jobs", "x=1")
        );
        assert_eq!(r.body, b"abc");
        assert_eq!(
            status(&post("Content-Length: 3\r\n", "abc")),
            Some(Some(415))
        );
        let toml = "Content-Type: application/toml\r\n";
        let cl = |n: &str| post(&format!("{toml}Content-Length: {n}\r\n"), "abc");
        assert_eq!(status(&cl("101")), Some(Some(413)));
        assert_eq!(status(&cl("-1")), Some(Some(400)));
        assert_eq!(status(&cl("4")), Some(Some(400)));
        let chunked = post(&format!("{toml}Transfer-Encoding: chunked\r\n"), "");
        assert_eq!(status(&chunked), Some(Some(411)));
        let mut long = b"GET / HTTP/1.1\r\nHost: a\r\nX: ".to_vec();
        long.resize(MAX_HEAD - 4, b'x');
        long.extend_from_slice(b"\r\n\r\n");
        assert!(parse_request_for_fuzzing(&long, 100).is_ok());
        long.insert(20, b'x');
        assert_eq!(status(&long), Some(Some(431)));
    }
}
