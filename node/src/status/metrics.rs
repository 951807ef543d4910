//! A small HTTP server for Prometheus: `GET /metrics` (or HEAD) answers
//! `render_prometheus` of a fresh status, anything else 404 or 405. Plain std threads: an
//! accept thread and one thread per scrape, bounded in number, request size and time.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{render_prometheus, NodeStatus};

/// The request line and headers of a scrape; Prometheus sends a few hundred bytes.
pub const METRICS_REQUEST_BYTES_MAX: usize = 8 << 10;
/// Scrapes answered at once; one more is refused (a 503, or a reset connection).
pub const METRICS_CONNECTIONS_MAX: usize = 8;
/// The whole request must arrive within this, however slowly it trickles in.
pub const METRICS_REQUEST_TIMEOUT_MS: u64 = 5_000;
pub const METRICS_WRITE_TIMEOUT_MS: u64 = 10_000;

/// Serves `GET /metrics` (and HEAD) on `addr` with `render_prometheus(&source())`, on a
/// thread of its own; anything else gets 404 or 405. Returns the bound address (useful
/// with port 0) and the accept thread, which runs for the life of the process.
pub fn serve_metrics(
    addr: SocketAddr,
    source: impl Fn() -> NodeStatus + Send + Sync + 'static,
) -> io::Result<(SocketAddr, JoinHandle<()>)> {
    serve_metrics_with(
        addr,
        Arc::new(source),
        Duration::from_millis(METRICS_REQUEST_TIMEOUT_MS),
    )
}

type Source = Arc<dyn Fn() -> NodeStatus + Send + Sync>;

fn serve_metrics_with(
    addr: SocketAddr,
    source: Source,
    request_timeout: Duration,
) -> io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    let n_active = Arc::new(AtomicUsize::new(0));
    let thread = std::thread::Builder::new()
        .name("cairn-metrics".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else {
                    // Out of descriptors, most likely: let scrapes finish.
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                };
                if n_active.fetch_add(1, Ordering::SeqCst) >= METRICS_CONNECTIONS_MAX {
                    n_active.fetch_sub(1, Ordering::SeqCst);
                    // Never block the accept loop on a client: the 503 goes out if the
                    // socket takes it at once, and closing over an unread request may
                    // reset the connection instead. Either way the scrape fails fast.
                    let _ = stream.set_nonblocking(true);
                    let _ = respond(
                        &mut stream,
                        "503 Service Unavailable",
                        "text/plain",
                        b"busy\n",
                        true,
                    );
                    let _ = stream.shutdown(Shutdown::Write);
                    continue;
                }
                let active = ActiveScrape(n_active.clone());
                let source = source.clone();
                let spawned = std::thread::Builder::new()
                    .name("cairn-metrics-conn".into())
                    .spawn(move || {
                        let _active = active;
                        answer(stream, &*source, request_timeout);
                    });
                // A thread that could not start drops its connection; the scraper retries.
                drop(spawned);
            }
        })?;
    Ok((bound, thread))
}

struct ActiveScrape(Arc<AtomicUsize>);

impl Drop for ActiveScrape {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

enum Head {
    Complete(Vec<u8>),
    TooLarge,
    /// Timed out, closed early, or failed: nobody to answer.
    Gone,
}

/// Reads up to the blank line that ends the request head, within the size and time bound.
fn read_head(stream: &mut TcpStream, request_timeout: Duration) -> Head {
    let deadline = Instant::now() + request_timeout;
    let mut head = Vec::new();
    let mut buffer = [0u8; 1024];
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() || stream.set_read_timeout(Some(remaining)).is_err() {
            return Head::Gone;
        }
        let n_read = match stream.read(&mut buffer) {
            Ok(0) => return Head::Gone,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Head::Gone,
        };
        head.extend_from_slice(&buffer[..n_read]);
        if let Some(end) = find_head_end(&head) {
            head.truncate(end);
            return Head::Complete(head);
        }
        if head.len() >= METRICS_REQUEST_BYTES_MAX {
            return Head::TooLarge;
        }
    }
}

fn find_head_end(bytes: &[u8]) -> Option<usize> {
    let crlf = bytes.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = bytes.windows(2).position(|w| w == b"\n\n");
    crlf.into_iter().chain(lf).min()
}

fn answer(
    mut stream: TcpStream,
    source: &(dyn Fn() -> NodeStatus + Send + Sync),
    request_timeout: Duration,
) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(METRICS_WRITE_TIMEOUT_MS)));
    let head = match read_head(&mut stream, request_timeout) {
        Head::Complete(head) => head,
        Head::TooLarge => {
            let body = format!("request head over {METRICS_REQUEST_BYTES_MAX} bytes\n");
            let _ = respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                body.as_bytes(),
                true,
            );
            return close_gently(stream);
        }
        Head::Gone => return,
    };
    let head = String::from_utf8_lossy(&head);
    let mut parts = head.lines().next().unwrap_or("").split(' ');
    let (method, target, protocol) = (parts.next(), parts.next(), parts.next());
    let result = match (method, target, protocol) {
        (Some(method), Some(target), Some(protocol))
            if protocol.starts_with("HTTP/") && parts.next().is_none() =>
        {
            let path = target.split('?').next().unwrap_or("");
            match (method, path) {
                ("GET" | "HEAD", "/metrics") => {
                    let body = render_prometheus(&source());
                    respond(
                        &mut stream,
                        "200 OK",
                        "text/plain; version=0.0.4; charset=utf-8",
                        body.as_bytes(),
                        method == "GET",
                    )
                }
                (_, "/metrics") => respond(
                    &mut stream,
                    "405 Method Not Allowed",
                    "text/plain",
                    b"only GET and HEAD\n",
                    true,
                ),
                _ => respond(
                    &mut stream,
                    "404 Not Found",
                    "text/plain",
                    b"cairn serves metrics at /metrics\n",
                    true,
                ),
            }
        }
        _ => respond(
            &mut stream,
            "400 Bad Request",
            "text/plain",
            b"not an HTTP request\n",
            true,
        ),
    };
    if result.is_ok() {
        close_gently(stream);
    }
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &[u8],
    with_body: bool,
) -> io::Result<()> {
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if status.starts_with("405") {
        response.push_str("Allow: GET, HEAD\r\n");
    }
    response.push_str("\r\n");
    let mut response = response.into_bytes();
    if with_body {
        response.extend_from_slice(body);
    }
    stream.write_all(&response)?;
    stream.flush()
}

/// Closing a TCP socket with unread input resets the connection, and the reset can destroy
/// the response before the client reads it; so say we are done, then drain a little.
fn close_gently(mut stream: TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut sink = [0u8; 4096];
    let mut n_drained = 0;
    while n_drained < 16 * METRICS_REQUEST_BYTES_MAX {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(n) => n_drained += n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::tests::sample;

    fn http(addr: SocketAddr, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(request).unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).unwrap();
        String::from_utf8(response).unwrap()
    }

    #[test]
    fn metrics_server_answers_a_real_scrape() {
        let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let (addr, _thread) = serve_metrics(loopback, sample).unwrap();
        assert!(addr.ip().is_loopback() && addr.port() != 0);

        let response = http(
            addr,
            b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n",
        );
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"));
        assert!(head.contains(&format!("Content-Length: {}\r\n", body.len())));
        assert_eq!(body, render_prometheus(&sample()));

        let response = http(addr, b"HEAD /metrics?x=1 HTTP/1.0\n\n");
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(response.ends_with("\r\n\r\n"), "HEAD has no body");

        let response = http(addr, b"GET / HTTP/1.1\r\n\r\n");
        assert!(
            response.starts_with("HTTP/1.1 404 Not Found\r\n"),
            "{response}"
        );
        let response = http(addr, b"GET /metricsx HTTP/1.1\r\n\r\n");
        assert!(
            response.starts_with("HTTP/1.1 404 Not Found\r\n"),
            "{response}"
        );
        let response = http(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert!(
            response.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{response}"
        );
        assert!(response.contains("Allow: GET, HEAD\r\n"));
        let response = http(addr, b"hello\r\n\r\n");
        assert!(
            response.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{response}"
        );

        let mut huge = b"GET /metrics HTTP/1.1\r\n".to_vec();
        huge.extend(std::iter::repeat_n(b'x', METRICS_REQUEST_BYTES_MAX + 100));
        let response = http(addr, &huge);
        assert!(response.starts_with("HTTP/1.1 431 "), "{response}");

        // The server is still there after all that.
        let response = http(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"));
    }

    #[test]
    fn metrics_server_drops_a_request_that_never_finishes() {
        let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let (addr, _thread) =
            serve_metrics_with(loopback, Arc::new(sample), Duration::from_millis(200)).unwrap();
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let started = Instant::now();
        stream.write_all(b"GET /metr").unwrap();
        // Trickling bytes does not keep the connection past the request timeout.
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(50));
            let _ = stream.write_all(b"i");
        }
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response);
        assert!(
            response.is_empty(),
            "{}",
            String::from_utf8_lossy(&response)
        );
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(200) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
    }

    #[test]
    fn scrapes_beyond_the_limit_get_busy() {
        let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let (addr, _thread) =
            serve_metrics_with(loopback, Arc::new(sample), Duration::from_secs(10)).unwrap();
        // Idle connections hold every slot until their request times out.
        let idle: Vec<TcpStream> = (0..METRICS_CONNECTIONS_MAX)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut stream = TcpStream::connect(addr).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\n\r\n");
            let mut response = Vec::new();
            let refused = match stream.read_to_end(&mut response) {
                Ok(_) => response.starts_with(b"HTTP/1.1 503 "),
                Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
            };
            if refused {
                break;
            }
            // The accept thread may not have counted every idle connection yet.
            let response = String::from_utf8_lossy(&response);
            assert!(Instant::now() < deadline, "never busy: {response}");
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(idle);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !http(addr, b"GET /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200 ") {
            assert!(Instant::now() < deadline, "slots never freed");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
