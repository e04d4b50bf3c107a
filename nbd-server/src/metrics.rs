//! Prometheus metrics: per-export request counters and latency histograms kept by the
//! transmission phase, plus each device's own gauges (journal, cache, block map), served as the
//! Prometheus text format on `GET /metrics` by a deliberately tiny HTTP/1.1 responder — behind
//! a bearer token when the server has one ([`MetricsToken`]).

use crate::exports::Exports;
use crate::proto::*;
use crate::secret::{SecretError, read_secret};
use engine::device::MetricKind;
use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Commands counted separately, by their wire value, with their label.
const COMMANDS: [(u16, &str); 7] = [
    (CMD_READ, "read"),
    (CMD_WRITE, "write"),
    (CMD_FLUSH, "flush"),
    (CMD_TRIM, "trim"),
    (CMD_WRITE_ZEROES, "write_zeroes"),
    (CMD_BLOCK_STATUS, "block_status"),
    (CMD_CACHE, "cache"),
];

/// Upper bounds of the latency histogram buckets, in seconds (50 µs to 10 s).
const BUCKETS: [f64; 14] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 10.0,
];

#[derive(Default)]
struct CommandMetrics {
    requests: AtomicU64,
    errors: AtomicU64,
    /// Payload bytes of reads and writes (the request's length).
    bytes: AtomicU64,
    nanos: AtomicU64,
    /// Requests per bucket (not cumulative; summed when rendered).
    buckets: [AtomicU64; BUCKETS.len() + 1],
}

/// Counters of one export, updated once per answered request.
#[derive(Default)]
pub struct RequestMetrics {
    commands: [CommandMetrics; COMMANDS.len()],
}

impl RequestMetrics {
    /// Records one answered request. Unknown commands are not counted.
    pub fn record(&self, command: u16, length: u64, elapsed: Duration, ok: bool) {
        let Some(i) = COMMANDS.iter().position(|(c, _)| *c == command) else {
            return;
        };
        let m = &self.commands[i];
        m.requests.fetch_add(1, Ordering::Relaxed);
        if !ok {
            m.errors.fetch_add(1, Ordering::Relaxed);
        }
        if command == CMD_READ || command == CMD_WRITE {
            m.bytes.fetch_add(length, Ordering::Relaxed);
        }
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        m.nanos.fetch_add(nanos, Ordering::Relaxed);
        let secs = elapsed.as_secs_f64();
        let bucket = BUCKETS
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(BUCKETS.len());
        m.buckets[bucket].fetch_add(1, Ordering::Relaxed);
    }
}

/// Writes one `# HELP`/`# TYPE` header.
fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The whole exposition: request metrics of every export, then each device's own.
pub async fn render(exports: &Exports) -> String {
    let mut out = String::new();
    let per_command =
        |out: &mut String, name: &str, help: &str, value: &dyn Fn(&CommandMetrics) -> u64| {
            header(out, name, "counter", help);
            for export in exports.all().iter() {
                for (i, (_, label)) in COMMANDS.iter().enumerate() {
                    let _ = writeln!(
                        out,
                        "{name}{{export=\"{}\",command=\"{label}\"}} {}",
                        export.name,
                        value(&export.metrics.commands[i])
                    );
                }
            }
        };
    per_command(
        &mut out,
        "bucketdisk_requests_total",
        "NBD requests answered.",
        &|m| m.requests.load(Ordering::Relaxed),
    );
    per_command(
        &mut out,
        "bucketdisk_request_errors_total",
        "NBD requests answered with an error.",
        &|m| m.errors.load(Ordering::Relaxed),
    );
    per_command(
        &mut out,
        "bucketdisk_request_bytes_total",
        "Bytes read or written by NBD requests.",
        &|m| m.bytes.load(Ordering::Relaxed),
    );
    let name = "bucketdisk_request_duration_seconds";
    header(
        &mut out,
        name,
        "histogram",
        "Time from a request being read to its reply being queued.",
    );
    for export in exports.all().iter() {
        for (i, (_, label)) in COMMANDS.iter().enumerate() {
            let m = &export.metrics.commands[i];
            let labels = format!("export=\"{}\",command=\"{label}\"", export.name);
            let mut cumulative = 0u64;
            for (b, le) in BUCKETS.iter().enumerate() {
                cumulative += m.buckets[b].load(Ordering::Relaxed);
                let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
            }
            cumulative += m.buckets[BUCKETS.len()].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}");
            let secs = m.nanos.load(Ordering::Relaxed) as f64 / 1e9;
            let _ = writeln!(out, "{name}_sum{{{labels}}} {secs}");
            let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
        }
    }
    // Device metrics: grouped by name so each gets one header, whatever the export order.
    let mut devices = Vec::new();
    for export in exports.all().iter() {
        devices.push((export.name.clone(), export.device.metrics().await));
    }
    let mut names: Vec<(&str, &str, MetricKind)> = Vec::new();
    for (_, metrics) in &devices {
        for m in metrics {
            if !names.iter().any(|(n, _, _)| *n == m.name) {
                names.push((m.name, m.help, m.kind));
            }
        }
    }
    for (name, help, kind) in names {
        let kind = match kind {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
        };
        header(&mut out, name, kind, help);
        for (export, metrics) in &devices {
            for m in metrics.iter().filter(|m| m.name == name) {
                let _ = writeln!(out, "{name}{{export=\"{export}\"}} {}", m.value);
            }
        }
    }
    out
}

/// Largest HTTP request head read before answering.
const MAX_REQUEST_HEAD: usize = 8192;
/// A scraper that does not finish sending its request in this long is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Answers `GET /metrics` on `listener` until `shutdown` fires.
/// The bearer token a scrape must present (`Authorization: Bearer TOKEN`).
pub struct MetricsToken(Vec<u8>);

impl std::fmt::Debug for MetricsToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MetricsToken(..)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error("{0}: the token must be one line of printable characters without spaces")]
    Malformed(PathBuf),
}

impl MetricsToken {
    /// The token in `path` (an owner-only file; surrounding whitespace is ignored).
    pub fn from_file(path: &Path) -> Result<MetricsToken, TokenError> {
        let bytes = read_secret(path)?;
        let token = bytes.trim_ascii();
        if token.is_empty() || !token.iter().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::Malformed(path.to_path_buf()));
        }
        Ok(MetricsToken(token.to_vec()))
    }

    /// Whether a request head carries this token (compared in constant time).
    fn admits(&self, head: &[u8]) -> bool {
        let presented = head
            .split(|&b| b == b'\n')
            .filter_map(|line| {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let colon = line.iter().position(|&b| b == b':')?;
                let (name, value) = line.split_at(colon);
                name.eq_ignore_ascii_case(b"authorization")
                    .then(|| value[1..].trim_ascii())
            })
            .find_map(|value| {
                (value.len() > 7 && value[..7].eq_ignore_ascii_case(b"bearer "))
                    .then(|| value[7..].trim_ascii())
            });
        presented.is_some_and(|p| {
            p.len() == self.0.len() && p.iter().zip(&self.0).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0
        })
    }
}

pub async fn serve(
    listener: TcpListener,
    exports: Arc<Exports>,
    token: Option<Arc<MetricsToken>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|&s| s) => return,
        };
        match accepted {
            Ok((stream, _)) => {
                let exports = Arc::clone(&exports);
                let token = token.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, &exports, token.as_deref()).await {
                        tracing::debug!("metrics request failed: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("metrics accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads one request head and answers it; the connection is then closed.
async fn answer(
    mut stream: TcpStream,
    exports: &Exports,
    token: Option<&MetricsToken>,
) -> io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let read_head = async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            if head.len() >= MAX_REQUEST_HEAD {
                return Err(io::Error::other("request head too large"));
            }
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Err(io::Error::other("connection closed mid-request"));
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok(())
    };
    tokio::time::timeout(REQUEST_TIMEOUT, read_head)
        .await
        .map_err(|_| io::Error::other("request timed out"))??;
    let request_line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = request_line.split(|&b| b == b' ');
    let (method, path) = (parts.next(), parts.next());
    let admitted = token.is_none_or(|t| t.admits(&head));
    let (status, challenge, body) = match (method, path) {
        (Some(b"GET"), Some(b"/metrics")) if !admitted => (
            "401 Unauthorized",
            "WWW-Authenticate: Bearer realm=\"bucketdisk\"\r\n",
            "a bearer token is required (Authorization: Bearer TOKEN)\n".to_string(),
        ),
        (Some(b"GET"), Some(b"/metrics")) => ("200 OK", "", render(exports).await),
        (Some(b"GET"), _) => ("404 Not Found", "", "metrics are at /metrics\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "",
            "only GET is supported\n".to_string(),
        ),
    };
    let content_type = if status.starts_with("200") {
        "text/plain; version=0.0.4; charset=utf-8"
    } else {
        "text/plain"
    };
    let response = format!(
        "HTTP/1.1 {status}\r\n{challenge}Content-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_admits_only_requests_that_carry_it() {
        let token = MetricsToken(b"s3cr3t-Token".to_vec());
        let head = |auth: &str| format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{auth}\r\n\r\n");
        assert!(token.admits(head("Authorization: Bearer s3cr3t-Token").as_bytes()));
        assert!(token.admits(head("authorization:   bearer s3cr3t-Token  ").as_bytes()));
        for wrong in [
            "",
            "Authorization: Bearer s3cr3t-Toke",
            "Authorization: Bearer s3cr3t-Token2",
            "Authorization: Basic s3cr3t-Token",
            "X-Authorization: Bearer s3cr3t-Token",
            "Authorization: Bearer",
        ] {
            assert!(!token.admits(head(wrong).as_bytes()), "{wrong:?}");
        }
    }

    #[test]
    fn requests_land_in_their_buckets() {
        let m = RequestMetrics::default();
        m.record(CMD_READ, 4096, Duration::from_micros(70), true);
        m.record(CMD_READ, 4096, Duration::from_secs(20), false);
        m.record(0xffff, 1, Duration::from_micros(1), true);
        let read = &m.commands[0];
        assert_eq!(read.requests.load(Ordering::Relaxed), 2);
        assert_eq!(read.errors.load(Ordering::Relaxed), 1);
        assert_eq!(read.bytes.load(Ordering::Relaxed), 8192);
        assert_eq!(read.buckets[1].load(Ordering::Relaxed), 1, "70 µs ≤ 100 µs");
        assert_eq!(
            read.buckets[BUCKETS.len()].load(Ordering::Relaxed),
            1,
            "20 s is past the last bucket"
        );
        let total: u64 = m
            .commands
            .iter()
            .map(|c| c.requests.load(Ordering::Relaxed))
            .sum();
        assert_eq!(total, 2, "unknown commands are not counted");
    }
}
