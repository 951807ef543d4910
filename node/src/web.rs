//! The status page (`cairn node run --web ADDR`, or `web = "ADDR"` in node.toml): one
//! HTML page, its script and its style, compiled into the binary, and one JSON endpoint,
//! `/api/v1/status`, with the facts `cairn status` and `cairn report` show (computed by
//! the same code: `facts` is what the node hands in). The page polls it every few
//! seconds, so it stays live with no server push.
//!
//! Served by axum on the node's tokio runtime. Loopback by default; any other address
//! needs `web_token` in node.toml, and then every request must carry it (the page takes
//! it from its own URL, `?token=...`, and sends it as `Authorization: Bearer`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use thiserror::Error;

const INDEX_HTML: &str = include_str!("web/index.html");
const PAGE_JS: &str = include_str!("web/page.js");
const PAGE_CSS: &str = include_str!("web/page.css");
/// A token shorter than this is refused: it would be guessed.
pub const WEB_TOKEN_BYTES_MIN: usize = 16;

#[derive(Debug, Error)]
pub enum WebError {
    #[error("the status page at {addr} is not on a loopback address: set web_token in node.toml (at least {WEB_TOKEN_BYTES_MIN} characters) to serve it there")]
    NeedsToken { addr: SocketAddr },
    #[error("web_token in node.toml is shorter than {WEB_TOKEN_BYTES_MIN} characters")]
    ShortToken,
    #[error("cannot listen for the status page on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The facts the page shows, as JSON; may block (it asks the node's loop).
pub type Facts = Arc<dyn Fn() -> Result<serde_json::Value, String> + Send + Sync>;

/// Refuses what must not be served: a non-loopback address without a token, a short
/// token.
pub fn check(addr: SocketAddr, token: Option<&str>) -> Result<(), WebError> {
    match token {
        Some(t) if t.len() < WEB_TOKEN_BYTES_MIN => Err(WebError::ShortToken),
        None if !addr.ip().is_loopback() => Err(WebError::NeedsToken { addr }),
        _ => Ok(()),
    }
}

#[derive(Clone)]
struct Shared {
    token: Option<Arc<str>>,
    facts: Facts,
}

/// Binds `addr` now (so a taken port fails the start) and serves the page on `runtime`
/// until the process exits. Returns the bound address.
pub fn serve(
    runtime: &tokio::runtime::Runtime,
    addr: SocketAddr,
    token: Option<String>,
    facts: Facts,
) -> Result<SocketAddr, WebError> {
    check(addr, token.as_deref())?;
    let bind = |source| WebError::Bind { addr, source };
    let listener = std::net::TcpListener::bind(addr).map_err(bind)?;
    listener.set_nonblocking(true).map_err(bind)?;
    let bound = listener.local_addr().map_err(bind)?;
    let shared = Shared {
        token: token.map(Arc::from),
        facts,
    };
    let app = Router::new()
        .route("/", get(index))
        .route(
            "/page.js",
            get(|| async { asset("text/javascript", PAGE_JS) }),
        )
        .route("/page.css", get(|| async { asset("text/css", PAGE_CSS) }))
        .route("/api/v1/status", get(status))
        .with_state(shared);
    let _enter = runtime.enter();
    let listener = tokio::net::TcpListener::from_std(listener).map_err(bind)?;
    runtime.spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("the status page stopped: {e}");
        }
    });
    Ok(bound)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

#[derive(serde::Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// Whether a request carries the token (always, when none is set).
fn allowed(shared: &Shared, headers: &HeaderMap, query: &TokenQuery) -> bool {
    let Some(token) = &shared.token else {
        return true;
    };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let given = bearer.or(query.token.as_deref()).unwrap_or("");
    // Compared in full whatever the first difference, so timing says nothing.
    let (a, b) = (given.as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

const REFUSED: &str =
    "this status page needs its token: open it as /?token=TOKEN (web_token in node.toml)\n";

async fn index(
    State(shared): State<Shared>,
    headers: HeaderMap,
    Query(query): Query<TokenQuery>,
) -> Response {
    if !allowed(&shared, &headers, &query) {
        return (StatusCode::UNAUTHORIZED, REFUSED).into_response();
    }
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        INDEX_HTML,
    )
        .into_response()
}

async fn status(
    State(shared): State<Shared>,
    headers: HeaderMap,
    Query(query): Query<TokenQuery>,
) -> Response {
    if !allowed(&shared, &headers, &query) {
        return (StatusCode::UNAUTHORIZED, REFUSED).into_response();
    }
    let facts = shared.facts.clone();
    match tokio::task::spawn_blocking(move || facts()).await {
        Ok(Ok(value)) => ([(header::CACHE_CONTROL, "no-store")], axum::Json(value)).into_response(),
        Ok(Err(why)) => (StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "the status could not be taken",
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_loopback_needs_a_long_token() {
        let loopback: SocketAddr = "127.0.0.1:7421".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:7421".parse().unwrap();
        assert!(check(loopback, None).is_ok());
        assert!(check("[::1]:7421".parse().unwrap(), None).is_ok());
        let e = check(any, None).unwrap_err().to_string();
        assert_eq!(e, "the status page at 0.0.0.0:7421 is not on a loopback address: set web_token in node.toml (at least 16 characters) to serve it there");
        assert!(matches!(
            check(any, Some("short")),
            Err(WebError::ShortToken)
        ));
        assert!(check(any, Some("a-token-long-enough")).is_ok());
    }

    #[test]
    fn the_token_is_needed_in_a_header_or_the_query() {
        let shared = Shared {
            token: Some(Arc::from("a-token-long-enough")),
            facts: Arc::new(|| Ok(serde_json::Value::Null)),
        };
        let none = TokenQuery { token: None };
        let mut headers = HeaderMap::new();
        assert!(!allowed(&shared, &headers, &none));
        let right = TokenQuery {
            token: Some("a-token-long-enough".into()),
        };
        assert!(allowed(&shared, &headers, &right));
        let wrong = TokenQuery {
            token: Some("a-token-long-enougH".into()),
        };
        assert!(!allowed(&shared, &headers, &wrong));
        headers.insert(
            header::AUTHORIZATION,
            "Bearer a-token-long-enough".parse().unwrap(),
        );
        assert!(allowed(&shared, &headers, &none));
        let open = Shared {
            token: None,
            ..shared
        };
        assert!(allowed(&open, &HeaderMap::new(), &none));
    }
}
