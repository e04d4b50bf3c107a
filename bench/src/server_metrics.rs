//! The server's Prometheus endpoint (`bucketdisk serve --metrics ADDR`), scraped over plain
//! HTTP/1.1 and parsed just enough: one value per series, summed over label sets on request.

use anyhow::{Context, Result, ensure};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A scrape must not hang the sampling loop: during a store stall the server may be slow to
/// render its gauges, and a missed sample is better than a frozen clock.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const READ_TIMEOUT: Duration = Duration::from_secs(4);

/// One series: `name{labels} value`.
#[derive(Debug, Clone)]
struct Series {
    name: String,
    labels: String,
    value: f64,
}

/// Every series of one scrape.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    series: Vec<Series>,
}

impl Scrape {
    /// The sum over every series named `name` (all label sets: one export here), or `None` if
    /// the server does not export it (the metric set changes as the engine does).
    pub fn get(&self, name: &str) -> Option<f64> {
        self.sum(name, |_| true)
    }

    /// The sum over the series named `name` whose labels contain `label` (e.g.
    /// `command="write"`).
    pub fn labeled(&self, name: &str, label: &str) -> Option<f64> {
        self.sum(name, |labels| labels.contains(label))
    }

    fn sum(&self, name: &str, keep: impl Fn(&str) -> bool) -> Option<f64> {
        let mut found = None;
        for s in self
            .series
            .iter()
            .filter(|s| s.name == name && keep(&s.labels))
        {
            *found.get_or_insert(0.0) += s.value;
        }
        found
    }
}

/// `GET /metrics` from `addr`.
pub fn scrape(addr: SocketAddr) -> Result<Scrape> {
    let mut stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .with_context(|| format!("connecting to the metrics endpoint {addr}"))?;
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    stream.set_write_timeout(Some(READ_TIMEOUT))?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .context("sending the metrics request")?;
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .with_context(|| format!("reading metrics from {addr}"))?;
    ensure!(
        reply.starts_with("HTTP/1.1 200"),
        "metrics endpoint answered {}",
        reply.lines().next().unwrap_or_default()
    );
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .context("metrics reply has no body")?;
    Ok(parse(body))
}

/// Parses the Prometheus text format; comment lines and lines it cannot read are skipped.
pub fn parse(text: &str) -> Scrape {
    let series = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (key, value) = l.trim().rsplit_once(char::is_whitespace)?;
            let value: f64 = value.parse().ok()?;
            let (name, labels) = match key.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (key, ""),
            };
            Some(Series {
                name: name.trim().to_string(),
                labels: labels.to_string(),
                value,
            })
        })
        .collect();
    Scrape { series }
}

/// Calls a function every `period` in a thread, on a fixed clock (tick k at k × period after
/// the start; ticks missed while a call overran are skipped, not crowded in), until
/// [`Sampler::finish`]. A thread, so a scrape that hangs on a stalled server delays only the
/// samples, never the part's own timing (fio, the stall).
pub struct Sampler<T: Send + 'static> {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<T>>>,
    thread: Option<JoinHandle<()>>,
}

impl<T: Send + 'static> Sampler<T> {
    /// `sample(tick, seconds since start)`.
    pub fn start(
        period: Duration,
        mut sample: impl FnMut(u64, f64) -> T + Send + 'static,
    ) -> Sampler<T> {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, samples) = (Arc::clone(&stop), Arc::clone(&samples));
            std::thread::spawn(move || {
                let start = Instant::now();
                let mut tick = 0u64;
                loop {
                    let due = start + period.mul_f64(tick as f64);
                    while Instant::now() < due {
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        let left = due.saturating_duration_since(Instant::now());
                        std::thread::sleep(left.min(Duration::from_millis(50)));
                    }
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let value = sample(tick, start.elapsed().as_secs_f64());
                    samples
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(value);
                    let elapsed = start.elapsed().as_secs_f64() / period.as_secs_f64();
                    tick = (tick + 1).max(elapsed.floor() as u64 + 1);
                }
            })
        };
        Sampler {
            stop,
            samples,
            thread: Some(thread),
        }
    }

    /// Stops sampling (after a call in progress) and returns every sample, oldest first.
    pub fn finish(mut self) -> Vec<T> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.samples.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl<T: Send + 'static> Drop for Sampler<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_series_and_filters_labels() {
        let text = "# HELP bucketdisk_dirty_bytes x\n# TYPE bucketdisk_dirty_bytes gauge\n\
            bucketdisk_dirty_bytes{export=\"disk\"} 4096\n\
            bucketdisk_request_bytes_total{export=\"disk\",command=\"read\"} 10\n\
            bucketdisk_request_bytes_total{export=\"disk\",command=\"write\"} 1.5e3\n\
            bucketdisk_plain 7\n";
        let s = parse(text);
        assert_eq!(s.get("bucketdisk_dirty_bytes"), Some(4096.0));
        assert_eq!(s.get("bucketdisk_request_bytes_total"), Some(1510.0));
        assert_eq!(
            s.labeled("bucketdisk_request_bytes_total", "command=\"write\""),
            Some(1500.0)
        );
        assert_eq!(s.get("bucketdisk_plain"), Some(7.0));
        assert_eq!(s.get("bucketdisk_missing"), None);
    }

    #[test]
    fn sampler_ticks_on_its_clock() {
        let sampler = Sampler::start(Duration::from_millis(20), |tick, _| tick);
        std::thread::sleep(Duration::from_millis(110));
        let ticks = sampler.finish();
        assert!(ticks.len() >= 4, "{ticks:?}");
        assert_eq!(&ticks[..3], &[0, 1, 2]);
    }
}
