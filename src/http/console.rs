//! The web console's files: the built assets of `web/` (`web/dist/`, committed), embedded in
//! the binary, with their content types; and the page that asks for the token.
//!
//! The console is a single page at `/` (its views are `#/jobs`, `#/jobs/{id}`, `#/editor`), so
//! the server knows two kinds of path only: `/` (its `index.html`) and `/assets/{file}`. Both
//! need the token like every other request (the cookie the first `?token=` sets is what the
//! page's own requests carry). A `GET /` without a valid token is answered `401` with
//! [`TOKEN_PAGE`], a form that asks for the token and loads `/?token=…`: it holds no data and
//! calls no API.
//!
//! Vite writes fixed file names (`web/vite.config.js`), so every build replaces the same files
//! (which `include_bytes!` tracks: a rebuilt asset rebuilds the crate) and the answers say
//! `Cache-Control: no-cache`.

use include_dir::{include_dir, Dir};

static DIST: Dir<'_> = include_dir!("$CARGO_MANIFEST_DIR/web/dist");

/// An embedded file by its path under `web/dist/` (`index.html`, `assets/index.js`).
pub(super) fn file(path: &str) -> Option<&'static [u8]> {
    DIST.get_file(path).map(|f| f.contents())
}

/// The content type of a built asset, by its extension (the types Vite writes).
pub(super) fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("json") => "application/json",
        Some("woff2") => "font/woff2",
        _ => "application/octet-stream",
    }
}

/// The console's content security policy: its own scripts and styles only (React Flow sets
/// style attributes, hence `'unsafe-inline'` for styles alone), its own API, never framed.
pub(super) const CSP: &str = "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// What `GET /` answers without a valid token (`401`): a form asking for it.
pub(super) const TOKEN_PAGE: &str = r#"<!doctype html>
<html lang="en">
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>millrace: token required</title>
<style>
body { font: 15px/1.5 system-ui, sans-serif; margin: 0; display: grid; place-items: center; min-height: 100vh; background: #f4f5f7; color: #1d2330; }
main { background: #fff; padding: 2rem 2.5rem; border-radius: 8px; box-shadow: 0 1px 4px #0002; max-width: 32rem; }
h1 { font-size: 1.3rem; margin: 0 0 .5rem; }
input { font: inherit; width: 100%; box-sizing: border-box; padding: .45rem .6rem; margin: .5rem 0 1rem; border: 1px solid #aab; border-radius: 4px; }
button { font: inherit; padding: .4rem 1.2rem; border: 0; border-radius: 4px; background: #2457c5; color: #fff; cursor: pointer; }
code { background: #eef; padding: 0 .25rem; border-radius: 3px; }
</style>
<main id="token-prompt">
<h1>millrace console</h1>
<p>This server needs its token. Open the URL that <code>millrace serve</code> printed
(<code>http://127.0.0.1:PORT/?token=…</code>), or paste the token here.</p>
<form method="get" action="/">
<label for="token">Token</label>
<input id="token" name="token" autocomplete="off" autofocus required minlength="8">
<button type="submit">Open the console</button>
</form>
</main>
</html>
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_page_is_embedded_and_names_its_assets() {
        let index =
            std::str::from_utf8(file("index.html").expect("web/dist/index.html")).expect("UTF-8");
        assert!(index.contains("<div id=\"root\">"), "{index}");
        // Every asset the page loads is embedded.
        let mut rest = index;
        let mut assets = 0;
        while let Some(i) = rest.find("/assets/") {
            let tail = &rest[i + 1..];
            let end = tail.find('"').expect("a quoted path");
            assert!(
                file(&tail[..end]).is_some(),
                "{} is not embedded",
                &tail[..end]
            );
            assets += 1;
            rest = &tail[end..];
        }
        assert!(assets >= 1, "the page loads no asset: {index}");
        assert_eq!(
            content_type("assets/index.js"),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(content_type("index.html"), "text/html; charset=utf-8");
        assert_eq!(content_type("x.bin"), "application/octet-stream");
    }
}
