//! Who may talk to the job server: the token (header, cookie or a one-time `?token=`), the
//! `Host` and `Origin` checks against DNS rebinding and cross-site requests, and the content
//! types a `POST` may carry (a browser sends a cross-site `text/plain` or form POST without a
//! preflight; it cannot send `application/toml` or `application/json` that way).

use std::io::Read;
use std::net::{IpAddr, SocketAddr};

use crate::Error;

/// The cookie that holds the token for a browser page (and its `EventSource`).
pub(super) const COOKIE: &str = "millrace_token";

/// Bytes of randomness in a generated token (hex-encoded: twice as many characters).
const TOKEN_BYTES: usize = 24;

/// A fresh token from the operating system's random number generator.
///
/// Read from `/dev/urandom` (the kernel's CSPRNG, never blocking once the system has booted):
/// the engine runs on Linux and Unix only, and this needs no new crate.
pub(super) fn generate_token() -> Result<String, Error> {
    const PATH: &str = "/dev/urandom";
    let mut bytes = [0u8; TOKEN_BYTES];
    std::fs::File::open(PATH)
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|source| Error::Random { path: PATH, source })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Checks a token given by the user: it travels in a header, a cookie and a URL, so it is made
/// of the characters none of those needs to escape.
pub(super) fn check_token(token: &str) -> Result<(), Error> {
    if token.len() < 8 {
        return Err(Error::InvalidToken {
            reason: "shorter than 8 characters",
        });
    }
    if token.len() > 1024 {
        return Err(Error::InvalidToken {
            reason: "longer than 1024 characters",
        });
    }
    if !token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
    {
        return Err(Error::InvalidToken {
            reason: "only ASCII letters, digits and `-._~` are allowed",
        });
    }
    Ok(())
}

/// `a == b` in time that depends on their lengths only, not on where they differ.
pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keeps the optimizer from turning the fold into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

/// How a request proved it knows the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Proof {
    /// `Authorization: Bearer TOKEN` or the cookie.
    Held,
    /// `?token=TOKEN` in the URL of a `GET`: the answer sets the cookie.
    Query,
}

/// The request's parts that the checks look at.
#[derive(Debug, Default)]
pub(super) struct Credentials<'a> {
    pub(super) authorization: Option<&'a str>,
    pub(super) cookie: Option<&'a str>,
    pub(super) query_token: Option<&'a str>,
}

/// `Some` if the request carries the token, in any of its accepted forms.
pub(super) fn authenticate(token: &str, c: &Credentials<'_>) -> Option<Proof> {
    let want = token.as_bytes();
    let bearer = c.authorization.and_then(|v| {
        let (scheme, rest) = v.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
    });
    let cookie = c.cookie.and_then(|v| {
        v.split(';')
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| *k == COOKIE)
            .map(|(_, v)| v.trim())
    });
    // Every form present is compared (no early exit on the first that fails).
    let held = [bearer, cookie]
        .into_iter()
        .flatten()
        .fold(false, |ok, t| constant_time_eq(t.as_bytes(), want) | ok);
    if held {
        return Some(Proof::Held);
    }
    match c.query_token {
        Some(t) if constant_time_eq(t.as_bytes(), want) => Some(Proof::Query),
        _ => None,
    }
}

/// The `Set-Cookie` value that hands the token to a browser page.
pub(super) fn set_cookie(token: &str) -> String {
    format!("{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/")
}

/// The `Host` values the server answers to: its own address and the loopback names with its
/// port, and every extra name (`--allow-host`) with its port. Lowercase.
pub(super) fn allowed_hosts(listen: SocketAddr, extra: &[String]) -> Vec<String> {
    let port = listen.port();
    let own = match listen.ip() {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("[{ip}]"),
    };
    let mut names: Vec<String> = vec![own, "localhost".into(), "127.0.0.1".into(), "[::1]".into()];
    names.extend(extra.iter().map(|n| n.to_ascii_lowercase()));
    let mut hosts = Vec::new();
    for n in names {
        hosts.push(format!("{n}:{port}"));
        if port == 80 {
            hosts.push(n); // the default port may be left out
        }
    }
    hosts.sort();
    hosts.dedup();
    hosts
}

/// Whether a `Host` header names this server.
pub(super) fn host_allowed(allowed: &[String], host: &str) -> bool {
    let host = host.trim().to_ascii_lowercase();
    allowed.contains(&host)
}

/// Whether an `Origin` header is the server's own origin, `http://` and the request's `Host`
/// (already checked against [`host_allowed`]).
pub(super) fn origin_allowed(origin: &str, host: &str) -> bool {
    let origin = origin.trim();
    let Some(rest) = origin
        .get(..7)
        .filter(|scheme| scheme.eq_ignore_ascii_case("http://"))
        .map(|_| &origin[7..])
    else {
        return false; // `null`, another scheme
    };
    rest.eq_ignore_ascii_case(host.trim())
}

/// Whether a `POST` body's `Content-Type` is one the server reads: `application/toml` or
/// `application/json`, with any parameters (`; charset=utf-8`).
pub(super) fn body_type(content_type: Option<&str>) -> Option<BodyType> {
    let essence = content_type?.split(';').next()?.trim();
    if essence.eq_ignore_ascii_case("application/toml") {
        Some(BodyType::Toml)
    } else if essence.eq_ignore_ascii_case("application/json") {
        Some(BodyType::Json)
    } else {
        None
    }
}

/// What a `POST /jobs` body is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BodyType {
    /// A TOML pipeline file.
    Toml,
    /// The same document as JSON.
    Json,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn tokens() {
        let t = generate_token().unwrap();
        assert_eq!(t.len(), 2 * TOKEN_BYTES);
        assert_ne!(t, generate_token().unwrap());
        check_token(&t).unwrap();
        assert!(check_token("short").is_err());
        assert!(check_token("has space in it").is_err());
        assert!(check_token("semi;colon;here").is_err());
        let c = |a, k, q| Credentials {
            authorization: a,
            cookie: k,
            query_token: q,
        };
        let good = "s3cret-token";
        assert_eq!(
            authenticate(good, &c(Some("Bearer s3cret-token"), None, None)),
            Some(Proof::Held)
        );
        assert_eq!(
            authenticate(good, &c(Some("bearer  s3cret-token "), None, None)),
            Some(Proof::Held)
        );
        assert_eq!(
            authenticate(
                good,
                &c(None, Some("a=b; millrace_token=s3cret-token"), None)
            ),
            Some(Proof::Held)
        );
        assert_eq!(
            authenticate(good, &c(None, None, Some("s3cret-token"))),
            Some(Proof::Query)
        );
        assert_eq!(
            authenticate(good, &c(Some("Basic s3cret-token"), None, None)),
            None
        );
        assert_eq!(
            authenticate(good, &c(Some("Bearer s3cret-tokeN"), None, None)),
            None
        );
        assert_eq!(authenticate(good, &c(None, None, None)), None);
    }

    #[test]
    fn hosts_and_origins() {
        let allowed = allowed_hosts("127.0.0.1:7870".parse().unwrap(), &["Box.lan".into()]);
        for ok in [
            "127.0.0.1:7870",
            "LOCALHOST:7870",
            "[::1]:7870",
            "box.lan:7870",
        ] {
            assert!(host_allowed(&allowed, ok), "{ok}");
        }
        for no in ["127.0.0.1", "evil.com:7870", "localhost:80", "box.lan"] {
            assert!(!host_allowed(&allowed, no), "{no}");
        }
        assert!(origin_allowed("http://localhost:7870", "localhost:7870"));
        assert!(!origin_allowed("http://evil.com", "localhost:7870"));
        assert!(!origin_allowed("null", "localhost:7870"));
        assert!(!origin_allowed("https://localhost:7870", "localhost:7870"));
        assert_eq!(body_type(Some("application/toml")), Some(BodyType::Toml));
        assert_eq!(
            body_type(Some("Application/JSON; charset=utf-8")),
            Some(BodyType::Json)
        );
        assert_eq!(body_type(Some("text/plain")), None);
        assert_eq!(body_type(None), None);
    }
}
