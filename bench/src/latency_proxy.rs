//! An object-store latency injector: a TCP proxy on 127.0.0.1 in front of an S3 server (moto)
//! that holds back the first byte of every HTTP response by a fixed delay, and counts what
//! passes through it.
//!
//! Every S3-backed subject talks to the store through the same proxy, so each sees the same
//! added time-to-first-byte per request, whatever its HTTP client. Moto itself reports nothing,
//! so the proxy is also where object-store requests and bytes are counted.
//!
//! It does not parse HTTP beyond two things, which is enough for the clients used here (AWS
//! SDKs, boto3, libcurl: HTTP/1.1 with keep-alive, no pipelining):
//! - a request starts when the client sends bytes while no request is outstanding on the
//!   connection; its method is the first word of those bytes;
//! - a response starts with the first upstream bytes after a request started. Those bytes are
//!   delayed; the rest of the response streams through. An interim `HTTP/1.1 100 Continue`
//!   (sent before a PUT body) passes undelayed and does not end the request.

use anyhow::{Context, Result};
use serde::Serialize;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

const BUFFER: usize = 256 << 10;

/// Counters of everything that went through the proxy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Traffic {
    pub requests: u64,
    pub gets: u64,
    pub puts: u64,
    pub heads: u64,
    pub posts: u64,
    pub deletes: u64,
    /// Bytes the clients sent (request lines, headers and bodies).
    pub request_bytes: u64,
    /// Bytes the store sent back (status lines, headers and bodies).
    pub response_bytes: u64,
}

impl Traffic {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &Traffic) -> Traffic {
        Traffic {
            requests: self.requests - earlier.requests,
            gets: self.gets - earlier.gets,
            puts: self.puts - earlier.puts,
            heads: self.heads - earlier.heads,
            posts: self.posts - earlier.posts,
            deletes: self.deletes - earlier.deletes,
            request_bytes: self.request_bytes - earlier.request_bytes,
            response_bytes: self.response_bytes - earlier.response_bytes,
        }
    }
}

#[derive(Default)]
struct Shared {
    delay_us: AtomicU64,
    requests: AtomicU64,
    gets: AtomicU64,
    puts: AtomicU64,
    heads: AtomicU64,
    posts: AtomicU64,
    deletes: AtomicU64,
    request_bytes: AtomicU64,
    response_bytes: AtomicU64,
    /// When recording: every request's start and the moment its response began.
    spans: Mutex<Option<Vec<RequestSpan>>>,
}

/// One request as the proxy saw it: sent by the client at `start`, its response's first byte
/// passed on at `end` (after the added delay).
#[derive(Debug, Clone)]
pub struct RequestSpan {
    pub start: Instant,
    pub end: Instant,
    /// The request line and any Range header, e.g. `GET /bucket/key bytes=0-99`.
    pub what: String,
}

/// `METHOD PATH` of a request's first bytes, and its Range header if they hold it.
fn describe_request(first_bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&first_bytes[..first_bytes.len().min(4096)]);
    let mut lines = text.split("\r\n");
    let line = lines.next().unwrap_or_default();
    let mut what: String = line.split(' ').take(2).collect::<Vec<_>>().join(" ");
    if let Some(range) = lines.find_map(|l| {
        l.split_once(':')
            .filter(|(k, _)| k.eq_ignore_ascii_case("range"))
            .map(|(_, v)| v.trim().to_string())
    }) {
        what.push(' ');
        what.push_str(&range);
    }
    what
}

/// How many store round trips a set of requests took one after another: requests whose
/// lifetimes overlap (directly or through others) count as one round trip, so a critical path
/// of N dependent requests shows N, however many ran beside each of them.
pub fn round_trips(spans: &[RequestSpan]) -> usize {
    let mut sorted: Vec<&RequestSpan> = spans.iter().collect();
    sorted.sort_by_key(|s| s.start);
    let mut rounds = 0;
    let mut busy_until: Option<Instant> = None;
    for s in sorted {
        match busy_until {
            Some(until) if s.start < until => busy_until = Some(until.max(s.end)),
            _ => {
                rounds += 1;
                busy_until = Some(s.end);
            }
        }
    }
    rounds
}

impl Shared {
    fn count_request(&self, first_bytes: &[u8]) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let counter = match first_bytes.split(|&b| b == b' ').next() {
            Some(b"GET") => &self.gets,
            Some(b"PUT") => &self.puts,
            Some(b"HEAD") => &self.heads,
            Some(b"POST") => &self.posts,
            Some(b"DELETE") => &self.deletes,
            _ => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn delay(&self) -> Duration {
        Duration::from_micros(self.delay_us.load(Ordering::Relaxed))
    }
}

/// A running proxy. Dropping it stops it (and every connection through it).
pub struct LatencyProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    // Owns the accept loop and every relay task; dropped last.
    runtime: Option<tokio::runtime::Runtime>,
}

impl LatencyProxy {
    /// Listens on a free 127.0.0.1 port and relays every connection to `upstream`, delaying
    /// each response's first byte by `delay`.
    pub fn start(upstream: SocketAddr, delay: Duration) -> Result<LatencyProxy> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("latency-proxy")
            .enable_all()
            .build()
            .context("starting the latency proxy's runtime")?;
        let shared = Arc::new(Shared::default());
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .context("binding the latency proxy")?;
        let addr = listener
            .local_addr()
            .context("reading the proxy's address")?;
        let proxy = LatencyProxy {
            addr,
            shared: Arc::clone(&shared),
            runtime: Some(runtime),
        };
        proxy.set_delay(delay);
        if let Some(rt) = &proxy.runtime {
            rt.spawn(accept_loop(listener, upstream, shared));
        }
        Ok(proxy)
    }

    /// Where clients connect, e.g. `http://127.0.0.1:PORT` as their endpoint.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// Changes the delay for responses that start from now on.
    pub fn set_delay(&self, delay: Duration) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.shared.delay_us.store(us, Ordering::Relaxed);
    }

    /// Starts keeping a [`RequestSpan`] for every request from now on (dropping any kept).
    pub fn start_recording(&self) {
        *lock(&self.shared.spans) = Some(Vec::new());
    }

    /// Stops recording and returns the spans of the requests whose response has begun.
    pub fn take_recording(&self) -> Vec<RequestSpan> {
        lock(&self.shared.spans).take().unwrap_or_default()
    }

    /// Totals since the proxy started; subtract two snapshots with [`Traffic::since`].
    pub fn traffic(&self) -> Traffic {
        let s = &self.shared;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Traffic {
            requests: get(&s.requests),
            gets: get(&s.gets),
            puts: get(&s.puts),
            heads: get(&s.heads),
            posts: get(&s.posts),
            deletes: get(&s.deletes),
            request_bytes: get(&s.request_bytes),
            response_bytes: get(&s.response_bytes),
        }
    }
}

impl Drop for LatencyProxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of file descriptors or similar: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            // A failed relay is the client's or the store's problem to report; the proxy just
            // closes both sides, as a network would.
            let _ = relay(client, upstream, shared).await;
        });
    }
}

/// Whether the connection has a request without a response yet. Shared by both directions.
#[derive(Default)]
struct Turn {
    awaiting_response: AtomicBool,
    /// When the request awaiting its response was sent, and what it was (kept only while
    /// recording).
    started: Mutex<Option<(Instant, String)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The data is a plain record; a panicked holder cannot leave it half-written.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn relay(client: TcpStream, upstream: SocketAddr, shared: Arc<Shared>) -> Result<()> {
    let server = TcpStream::connect(upstream)
        .await
        .context("connecting upstream")?;
    // Small requests and headers must not wait for Nagle: the delay is the only one we want.
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let turn = Arc::new(Turn::default());
    let up = requests(
        client_read,
        server_write,
        Arc::clone(&shared),
        Arc::clone(&turn),
    );
    let down = responses(server_read, client_write, shared, turn);
    let (a, b) = tokio::join!(up, down);
    a.and(b)
}

/// Client → store: notes where requests start.
async fn requests(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: Arc<Shared>,
    turn: Arc<Turn>,
) -> Result<()> {
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        if !turn.awaiting_response.swap(true, Ordering::SeqCst) {
            shared.count_request(&buf[..n]);
            if lock(&shared.spans).is_some() {
                *lock(&turn.started) = Some((Instant::now(), describe_request(&buf[..n])));
            }
        }
        shared.request_bytes.fetch_add(n as u64, Ordering::Relaxed);
        to.write_all(&buf[..n]).await?;
    }
}

/// Store → client: delays the first bytes of each response.
async fn responses(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: Arc<Shared>,
    turn: Arc<Turn>,
) -> Result<()> {
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        let chunk = &buf[..n];
        let interim = chunk.starts_with(b"HTTP/1.1 100 ");
        if !interim && turn.awaiting_response.swap(false, Ordering::SeqCst) {
            let delay = shared.delay();
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if let Some((start, what)) = lock(&turn.started).take()
                && let Some(spans) = lock(&shared.spans).as_mut()
            {
                spans.push(RequestSpan {
                    start,
                    end: Instant::now(),
                    what,
                });
            }
        }
        shared.response_bytes.fetch_add(n as u64, Ordering::Relaxed);
        to.write_all(chunk).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};

    /// A tiny keep-alive HTTP server: answers every request with `body`, forever.
    fn http_server(body: &'static [u8]) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                std::thread::spawn(move || serve_connection(conn, body));
            }
        });
        addr
    }

    fn serve_connection(conn: std::net::TcpStream, body: &[u8]) {
        let mut writer = conn.try_clone().expect("clone");
        let mut reader = BufReader::new(conn);
        loop {
            // Read one request: lines up to the blank one (the test sends no bodies).
            let mut saw_any = false;
            loop {
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                if line == "\r\n" && saw_any {
                    break;
                }
                saw_any = true;
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: keep-alive\r\n\r\n",
                body.len()
            );
            if writer.write_all(head.as_bytes()).is_err() || writer.write_all(body).is_err() {
                return;
            }
        }
    }

    /// Sends one GET on `conn` and reads the whole response; returns it and the time taken.
    fn get(conn: &mut std::net::TcpStream, body_len: usize) -> (Vec<u8>, Duration) {
        let start = Instant::now();
        conn.write_all(b"GET /bucket/key HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("send");
        let mut response = Vec::new();
        let mut byte = [0u8; 1];
        while !response.ends_with(b"\r\n\r\n") {
            conn.read_exact(&mut byte).expect("header byte");
            response.push(byte[0]);
        }
        let mut body = vec![0u8; body_len];
        conn.read_exact(&mut body).expect("body");
        response.extend_from_slice(&body);
        (response, start.elapsed())
    }

    #[test]
    fn delays_every_response_and_passes_bytes_unchanged() {
        let body: &'static [u8] = b"0123456789abcdef-the-object-body";
        let server = http_server(body);
        let delay = Duration::from_millis(60);
        let proxy = LatencyProxy::start(server, delay).expect("proxy");

        let mut direct = std::net::TcpStream::connect(server).expect("connect direct");
        let (expected, _) = get(&mut direct, body.len());

        let mut conn = std::net::TcpStream::connect(proxy.addr()).expect("connect proxy");
        conn.set_nodelay(true).expect("nodelay");
        for _ in 0..3 {
            let (response, took) = get(&mut conn, body.len());
            assert_eq!(response, expected, "bytes through the proxy differ");
            assert!(
                took >= delay,
                "a request on a kept-alive connection took {took:?}"
            );
            assert!(
                took < delay * 4,
                "a request took {took:?}: delayed more than once?"
            );
        }
        let t = proxy.traffic();
        assert_eq!((t.requests, t.gets), (3, 3));
        assert_eq!(t.response_bytes, 3 * expected.len() as u64);

        proxy.set_delay(Duration::ZERO);
        let (_, took) = get(&mut conn, body.len());
        assert!(took < delay, "with no delay a request took {took:?}");
        assert_eq!(proxy.traffic().since(&t).requests, 1);
    }

    /// A PUT with `Expect: 100-continue`: the interim response passes undelayed, the final
    /// one is delayed, and it all counts as one request.
    #[test]
    fn interim_continue_is_not_delayed_and_not_a_new_request() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let server = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            let Ok((conn, _)) = listener.accept() else {
                return;
            };
            let mut writer = conn.try_clone().expect("clone");
            let mut reader = BufReader::new(conn);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let _ = writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
            let mut body = [0u8; 5];
            let _ = reader.read_exact(&mut body);
            let _ = writer.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        });
        let delay = Duration::from_millis(80);
        let proxy = LatencyProxy::start(server, delay).expect("proxy");
        let mut conn = std::net::TcpStream::connect(proxy.addr()).expect("connect");
        let start = Instant::now();
        conn.write_all(b"PUT /b/k HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
            .expect("headers");
        let mut interim = [0u8; 25];
        conn.read_exact(&mut interim).expect("100 Continue");
        assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
        assert!(start.elapsed() < delay, "the interim response was delayed");
        conn.write_all(b"hello").expect("body");
        let mut fin = [0u8; 38];
        conn.read_exact(&mut fin).expect("final response");
        assert!(fin.starts_with(b"HTTP/1.1 200 OK"));
        assert!(
            start.elapsed() >= delay,
            "the final response was not delayed"
        );
        let t = proxy.traffic();
        assert_eq!((t.requests, t.puts), (1, 1));
    }

    #[test]
    fn overlapping_requests_are_one_round_trip() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let span = |a, b| RequestSpan {
            start: ms(a),
            end: ms(b),
            what: String::new(),
        };
        assert_eq!(round_trips(&[]), 0);
        // Two in parallel, then one that starts after both: two round trips.
        assert_eq!(round_trips(&[span(0, 20), span(1, 21), span(25, 45)]), 2);
        // A chain of overlaps is one busy period.
        assert_eq!(round_trips(&[span(10, 30), span(0, 20), span(25, 45)]), 1);
        // Three dependent requests one after another: three.
        assert_eq!(round_trips(&[span(0, 20), span(20, 40), span(40, 60)]), 3);
    }
}
