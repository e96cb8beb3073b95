//! The web console's files, embedded in droverd: one HTML page, its script and styles, and the
//! vendored xterm.js (`web/vendor/xterm`, fetched by `scripts/vendor-xterm.sh`). Nothing is
//! fetched at run time. The page holds no data: everything it shows comes from the JSON API
//! with the bearer token the user logs in with, so roles apply exactly as for the CLI.

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// Only scripts and styles from droverd itself; xterm.js sets inline styles (its renderer adds
/// `<style>` elements), scripts stay strict. The console's WebSocket is same-origin.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
    img-src 'self' data:; connect-src 'self'; font-src 'self'; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'";

/// (name under `/ui/`, content type, bytes).
const FILES: &[(&str, &str, &[u8])] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../web/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_bytes!("../web/app.css"),
    ),
    (
        "xterm.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../web/vendor/xterm/xterm.js"),
    ),
    (
        "xterm.css",
        "text/css; charset=utf-8",
        include_bytes!("../web/vendor/xterm/xterm.css"),
    ),
];

const INDEX: &[u8] = include_bytes!("../web/index.html");

fn answer(content_type: &'static str, body: &'static [u8]) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // The files change with droverd; a browser must not keep an old script beside a new API.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// `GET /`: the page.
pub async fn index() -> Response {
    answer("text/html; charset=utf-8", INDEX)
}

/// `GET /ui/{file}`: a script or style sheet of the page.
pub async fn file(Path(name): Path<String>) -> Response {
    match FILES.iter().find(|(n, _, _)| *n == name) {
        Some((_, ct, body)) => answer(ct, body),
        None => (StatusCode::NOT_FOUND, "no such file").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file the page names is served, and nothing it names is fetched from elsewhere.
    #[test]
    fn the_page_names_only_embedded_files() {
        let page = std::str::from_utf8(INDEX).unwrap();
        let mut named = 0;
        for attr in ["src=\"", "href=\""] {
            for part in page.split(attr).skip(1) {
                let url = part.split('"').next().unwrap();
                if url.starts_with('#') {
                    continue; // a link within the page
                }
                let name = url
                    .strip_prefix("/ui/")
                    .unwrap_or_else(|| panic!("{url} is not an embedded file"));
                assert!(FILES.iter().any(|(n, _, _)| *n == name), "{url}");
                named += 1;
            }
        }
        assert_eq!(
            named,
            FILES.len(),
            "every embedded file is used by the page"
        );
    }
}
