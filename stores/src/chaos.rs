//! Store faults by a seeded schedule, for fault runs (`serve --inject-faults PLAN`) and tests.
//!
//! Each request draws from a generator seeded by the plan: with the plan's rate for its kind
//! (GET, HEAD, PUT, LIST, DELETE, other) it gets one fault, picked among those that can happen
//! to it — an error answer (500, 503, S3's SlowDown), a timeout (no answer for a while, then an
//! error), a stall (a late answer), and for a GET a body closed midway, cut short without an
//! error, or with one bit flipped, and for a PUT a lost reply (stored, but the caller is told
//! it failed). An outage window fails every request. What it injected is counted by kind.
//!
//! The same seed gives the same sequence of draws; which request meets which draw depends on
//! the order requests arrive in, which concurrency makes vary from run to run.
//!
//! Bits are flipped only in objects whose key contains [`FaultPlan::flip_in`] (chunks by
//! default): chunk blocks carry checksums the reader verifies, whereas a JSON object or a
//! page read from a block-map file carries none a reader could check — a flipped bit there is
//! what TLS and the store's own checksums guard against, not bucketdisk.

use crate::forward::{Around, Request, Wrapped};
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::{self, BoxStream};
use object_store::path::Path;
use object_store::{GetResult, GetResultPayload, PutResult, Result};
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The store inside, with faults injected by a [`FaultPlan`].
pub type ChaosStore = Wrapped<Chaos>;

/// One kind of injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// `500 Internal Server Error`.
    InternalError,
    /// `503 Service Unavailable`.
    Unavailable,
    /// S3's `503 SlowDown`: too many requests.
    SlowDown,
    /// No answer for [`FaultPlan::timeout`], then a timeout error (the request was not applied).
    Timeout,
    /// The answer comes [`FaultPlan::stall`] late, and is right.
    Stall,
    /// A GET whose body stops halfway with a connection error.
    ClosedMidBody,
    /// A GET whose body stops halfway as if it were complete.
    TruncatedBody,
    /// A GET whose body has one bit flipped.
    FlippedBit,
    /// A PUT that was stored, answered with an error.
    LostReply,
}

impl FaultKind {
    pub const ALL: [FaultKind; 9] = [
        FaultKind::InternalError,
        FaultKind::Unavailable,
        FaultKind::SlowDown,
        FaultKind::Timeout,
        FaultKind::Stall,
        FaultKind::ClosedMidBody,
        FaultKind::TruncatedBody,
        FaultKind::FlippedBit,
        FaultKind::LostReply,
    ];

    /// The kind's name in a plan and in reports.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::InternalError => "500",
            FaultKind::Unavailable => "503",
            FaultKind::SlowDown => "slowdown",
            FaultKind::Timeout => "timeout",
            FaultKind::Stall => "stall",
            FaultKind::ClosedMidBody => "close",
            FaultKind::TruncatedBody => "truncate",
            FaultKind::FlippedBit => "flip",
            FaultKind::LostReply => "lost-reply",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|k| *k == self).unwrap_or(0)
    }

    /// Applied to the store's answer rather than instead of the request.
    fn on_answer(self) -> bool {
        matches!(
            self,
            FaultKind::ClosedMidBody
                | FaultKind::TruncatedBody
                | FaultKind::FlippedBit
                | FaultKind::LostReply
        )
    }
}

/// Requests grouped as a plan gives them rates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Get,
    Head,
    Put,
    List,
    Delete,
    /// Multipart steps, copies, renames.
    Other,
}

impl RequestKind {
    const ALL: [RequestKind; 6] = [
        RequestKind::Get,
        RequestKind::Head,
        RequestKind::Put,
        RequestKind::List,
        RequestKind::Delete,
        RequestKind::Other,
    ];

    fn name(self) -> &'static str {
        match self {
            RequestKind::Get => "get",
            RequestKind::Head => "head",
            RequestKind::Put => "put",
            RequestKind::List => "list",
            RequestKind::Delete => "delete",
            RequestKind::Other => "other",
        }
    }

    fn of(request: &Request<'_>) -> RequestKind {
        match request {
            Request::Get { head: true, .. } => RequestKind::Head,
            Request::Get { .. } => RequestKind::Get,
            Request::Put { .. } => RequestKind::Put,
            Request::List { .. } => RequestKind::List,
            Request::Delete => RequestKind::Delete,
            _ => RequestKind::Other,
        }
    }
}

/// What to inject: `seed=N,rate=R[,rate.KIND=R…][,kinds=K/K/…][,stall=D][,timeout=D]
/// [,outage=START+LENGTH][,flip-in=TEXT][,limit=N]`, e.g. `seed=7,rate=0.1,outage=60s+30s`. Durations
/// take `ms`, `s` or `m`; KIND is get, head, put, list, delete or other; fault kinds are named
/// as [`FaultKind::name`] says (all of them by default).
#[derive(Debug, Clone, PartialEq)]
pub struct FaultPlan {
    pub seed: u64,
    /// Share of requests of each [`RequestKind`] that get a fault, in `RequestKind::ALL` order.
    pub rates: [f64; 6],
    pub kinds: Vec<FaultKind>,
    pub stall: Duration,
    pub timeout: Duration,
    /// Every request fails from this long after the store was wrapped, for the second length.
    pub outage: Option<(Duration, Duration)>,
    /// Bits are flipped only in bodies of objects whose key contains this.
    pub flip_in: String,
    /// At most this many faults in all (the outage aside): a test can damage exactly one
    /// answer and see what a second request does.
    pub limit: Option<u64>,
}

impl Default for FaultPlan {
    fn default() -> Self {
        FaultPlan {
            seed: 1,
            rates: [0.0; 6],
            kinds: FaultKind::ALL.to_vec(),
            stall: Duration::from_secs(2),
            timeout: Duration::from_secs(5),
            outage: None,
            flip_in: "chunks/".into(),
            limit: None,
        }
    }
}

impl FaultPlan {
    /// The same rate for every kind of request.
    pub fn with_rate(mut self, rate: f64) -> Self {
        self.rates = [rate; 6];
        self
    }

    fn rate(&self, kind: RequestKind) -> f64 {
        self.rates[RequestKind::ALL
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(0)]
    }
}

fn parse_duration(text: &str) -> Option<Duration> {
    let (number, unit) = text.split_at(text.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = number.parse().ok().filter(|n: &f64| *n >= 0.0)?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

impl FromStr for FaultPlan {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        let mut plan = FaultPlan::default();
        for item in text.split(',').filter(|i| !i.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| format!("{item:?}: expected KEY=VALUE"))?;
            let bad = || format!("{key}={value:?}: not a valid value");
            let rate = || {
                value
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| format!("{key}={value:?}: a rate is between 0 and 1"))
            };
            match key {
                "seed" => plan.seed = value.parse().map_err(|_| bad())?,
                "rate" => plan.rates = [rate()?; 6],
                "stall" => plan.stall = parse_duration(value).ok_or_else(bad)?,
                "timeout" => plan.timeout = parse_duration(value).ok_or_else(bad)?,
                "flip-in" => plan.flip_in = value.to_string(),
                "limit" => plan.limit = Some(value.parse().map_err(|_| bad())?),
                "outage" => {
                    let (start, length) = value.split_once('+').ok_or_else(bad)?;
                    plan.outage = Some((
                        parse_duration(start).ok_or_else(bad)?,
                        parse_duration(length).ok_or_else(bad)?,
                    ));
                }
                "kinds" => {
                    plan.kinds = value
                        .split('/')
                        .map(|name| {
                            FaultKind::ALL
                                .into_iter()
                                .find(|k| k.name() == name)
                                .ok_or_else(|| format!("unknown fault kind {name:?}"))
                        })
                        .collect::<std::result::Result<_, _>>()?;
                }
                _ => {
                    let kind = key
                        .strip_prefix("rate.")
                        .and_then(|k| RequestKind::ALL.into_iter().find(|r| r.name() == k))
                        .ok_or_else(|| format!("unknown setting {key:?}"))?;
                    let at = RequestKind::ALL
                        .iter()
                        .position(|k| *k == kind)
                        .unwrap_or(0);
                    plan.rates[at] = rate()?;
                }
            }
        }
        Ok(plan)
    }
}

/// What a [`ChaosStore`] injected so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultCounts {
    pub requests: u64,
    /// Requests failed by the outage window.
    pub outage_failures: u64,
    /// Faults by kind, in [`FaultKind::ALL`] order.
    pub by_kind: Vec<(FaultKind, u64)>,
}

impl FaultCounts {
    pub fn injected(&self) -> u64 {
        self.by_kind.iter().map(|(_, n)| n).sum()
    }
}

/// One line: `requests=N outage=N 500=N 503=N …` (parsed by the fault-run report).
impl fmt::Display for FaultCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "requests={} outage={}",
            self.requests, self.outage_failures
        )?;
        for (kind, n) in &self.by_kind {
            write!(f, " {}={n}", kind.name())?;
        }
        Ok(())
    }
}

/// The schedule's state: the generator, faults decided for answers still to come, counters.
#[derive(Debug)]
pub struct Chaos {
    plan: FaultPlan,
    started: Instant,
    /// SplitMix64: the state only ever advances by a constant, so it is one atomic add.
    draws: AtomicU64,
    /// Faults decided before a request went out, to apply to its answer (by key).
    on_answer: Mutex<HashMap<Path, Vec<FaultKind>>>,
    requests: AtomicU64,
    outage_failures: AtomicU64,
    injected: [AtomicU64; 9],
    /// Faults picked so far, against [`FaultPlan::limit`].
    picked: AtomicU64,
}

const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64's output function.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// SplitMix64: the fault schedule's generator, and seeded workloads' (fault tests, the crash
/// soak), so a run repeats with its seed.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn draw(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GAMMA);
        mix(self.0)
    }

    /// A draw in `0..n` (0 for `n` = 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.draw() % n.max(1)
    }
}

impl Chaos {
    pub fn new(plan: FaultPlan) -> Chaos {
        Chaos {
            draws: AtomicU64::new(plan.seed),
            plan,
            started: Instant::now(),
            on_answer: Mutex::default(),
            requests: AtomicU64::new(0),
            outage_failures: AtomicU64::new(0),
            injected: Default::default(),
            picked: AtomicU64::new(0),
        }
    }

    pub fn plan(&self) -> &FaultPlan {
        &self.plan
    }

    pub fn counts(&self) -> FaultCounts {
        FaultCounts {
            requests: self.requests.load(Ordering::Relaxed),
            outage_failures: self.outage_failures.load(Ordering::Relaxed),
            by_kind: FaultKind::ALL
                .iter()
                .map(|k| (*k, self.injected[k.index()].load(Ordering::Relaxed)))
                .collect(),
        }
    }

    fn draw(&self) -> u64 {
        mix(self
            .draws
            .fetch_add(GAMMA, Ordering::Relaxed)
            .wrapping_add(GAMMA))
    }

    /// A draw in [0, 1).
    fn uniform(&self) -> f64 {
        (self.draw() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn in_outage(&self) -> bool {
        self.plan.outage.is_some_and(|(start, length)| {
            let now = self.started.elapsed();
            now >= start && now < start + length
        })
    }

    fn count(&self, kind: FaultKind) {
        self.injected[kind.index()].fetch_add(1, Ordering::Relaxed);
        tracing::debug!("injected store fault: {}", kind.name());
    }

    /// The fault this request gets, if any.
    fn pick(&self, kind: RequestKind, location: Option<&Path>) -> Option<FaultKind> {
        let rate = self.plan.rate(kind);
        if rate <= 0.0 || self.uniform() >= rate {
            return None;
        }
        let fits = |fault: &FaultKind| match fault {
            FaultKind::ClosedMidBody | FaultKind::TruncatedBody => kind == RequestKind::Get,
            FaultKind::FlippedBit => {
                kind == RequestKind::Get
                    && location.is_some_and(|l| l.as_ref().contains(self.plan.flip_in.as_str()))
            }
            FaultKind::LostReply => kind == RequestKind::Put,
            _ => true,
        };
        let candidates: Vec<FaultKind> = self.plan.kinds.iter().copied().filter(fits).collect();
        if candidates.is_empty() {
            return None;
        }
        let fault = candidates[(self.draw() % candidates.len() as u64) as usize];
        let picked = self.picked.fetch_add(1, Ordering::Relaxed);
        self.plan
            .limit
            .is_none_or(|limit| picked < limit)
            .then_some(fault)
    }

    fn take_answer_fault(&self, location: &Path) -> Option<FaultKind> {
        let mut pending = self.on_answer.lock().unwrap_or_else(|e| e.into_inner());
        let faults = pending.get_mut(location)?;
        let fault = faults.pop();
        if faults.is_empty() {
            pending.remove(location);
        }
        fault
    }

    /// The GET's answer with its body damaged as `fault` says.
    fn damage(&self, fault: FaultKind, got: GetResult) -> GetResult {
        let length = got.range.end.saturating_sub(got.range.start);
        let GetResult {
            payload,
            meta,
            range,
            attributes,
            extensions,
        } = got;
        let body = GetResult {
            payload,
            meta: meta.clone(),
            range: range.clone(),
            attributes: Default::default(),
            extensions: Default::default(),
        }
        .into_stream();
        let body = match fault {
            FaultKind::FlippedBit => {
                let at = self.draw() % length.max(1);
                let bit = (self.draw() % 8) as u8;
                flip_bit(body, at, bit)
            }
            FaultKind::ClosedMidBody => cut(body, length / 2, true),
            _ => cut(body, length / 2, false),
        };
        GetResult {
            payload: GetResultPayload::Stream(body),
            meta,
            range,
            attributes,
            extensions,
        }
    }
}

/// `body`'s first `keep` bytes, then its end — or an error, as a closed connection gives.
fn cut(
    body: BoxStream<'static, Result<Bytes>>,
    keep: u64,
    then_error: bool,
) -> BoxStream<'static, Result<Bytes>> {
    let kept = stream::unfold((body, 0u64), move |(mut body, sent)| async move {
        if sent >= keep {
            return None;
        }
        match body.next().await? {
            Ok(mut bytes) => {
                bytes.truncate((keep - sent).min(bytes.len() as u64) as usize);
                let sent = sent + bytes.len() as u64;
                Some((Ok(bytes), (body, sent)))
            }
            Err(e) => Some((Err(e), (body, keep))),
        }
    });
    if !then_error {
        return kept.boxed();
    }
    let closed = stream::once(async {
        Err(object_store::Error::Generic {
            store: "chaos",
            source: "injected fault: connection closed mid-body".into(),
        })
    });
    kept.chain(closed).boxed()
}

/// `body` with bit `bit` of its byte at `at` flipped.
fn flip_bit(
    body: BoxStream<'static, Result<Bytes>>,
    at: u64,
    bit: u8,
) -> BoxStream<'static, Result<Bytes>> {
    body.scan(0u64, move |start, part| {
        let part = part.map(|bytes| {
            let end = *start + bytes.len() as u64;
            let out = if (*start..end).contains(&at) {
                let mut owned = BytesMut::from(&bytes[..]);
                owned[(at - *start) as usize] ^= 1 << bit;
                owned.freeze()
            } else {
                bytes
            };
            *start = end;
            out
        });
        futures::future::ready(Some(part))
    })
    .boxed()
}

fn injected_error(what: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "chaos",
        source: format!("injected fault: {what}").into(),
    }
}

#[async_trait]
impl Around for Chaos {
    const NAME: &'static str = "ChaosStore";

    async fn before(&self, request: Request<'_>) -> Result<()> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if self.in_outage() {
            self.outage_failures.fetch_add(1, Ordering::Relaxed);
            return Err(injected_error("outage: the store does not answer"));
        }
        let location = match request {
            Request::Get { location, .. } | Request::Put { location, .. } => Some(location),
            _ => None,
        };
        let Some(fault) = self.pick(RequestKind::of(&request), location) else {
            return Ok(());
        };
        if fault.on_answer() {
            if let Some(location) = location {
                self.on_answer
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(location.clone())
                    .or_default()
                    .push(fault);
            }
            return Ok(());
        }
        self.count(fault);
        match fault {
            FaultKind::InternalError => Err(injected_error("500 Internal Server Error")),
            FaultKind::Unavailable => Err(injected_error("503 Service Unavailable")),
            FaultKind::SlowDown => Err(injected_error(
                "503 SlowDown: please reduce your request rate",
            )),
            FaultKind::Timeout => {
                tokio::time::sleep(self.plan.timeout).await;
                Err(injected_error(&format!(
                    "no answer within {:?} (timed out)",
                    self.plan.timeout
                )))
            }
            _ => {
                tokio::time::sleep(self.plan.stall).await;
                Ok(())
            }
        }
    }

    fn got(&self, location: &Path, head: bool, result: Result<GetResult>) -> Result<GetResult> {
        if head {
            return result;
        }
        let Some(fault) = self.take_answer_fault(location) else {
            return result;
        };
        match result {
            Ok(got) if got.range.end > got.range.start => {
                self.count(fault);
                Ok(self.damage(fault, got))
            }
            other => other,
        }
    }

    fn put_answered(&self, location: &Path, result: Result<PutResult>) -> Result<PutResult> {
        match (self.take_answer_fault(location), result) {
            (Some(fault), Ok(_)) => {
                self.count(fault);
                Err(injected_error(
                    "the reply to a PUT that was stored was lost",
                ))
            }
            (_, result) => result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;
    use object_store::{ObjectStore, ObjectStoreExt};
    use std::sync::Arc;

    #[test]
    fn plans_parse_and_bad_ones_say_why() {
        let plan: FaultPlan =
            "seed=7,rate=0.1,rate.put=0.5,kinds=503/flip,stall=250ms,outage=1m+30s"
                .parse()
                .expect("plan");
        assert_eq!(plan.seed, 7);
        assert_eq!(plan.rate(RequestKind::Get), 0.1);
        assert_eq!(plan.rate(RequestKind::Put), 0.5);
        assert_eq!(plan.kinds, [FaultKind::Unavailable, FaultKind::FlippedBit]);
        assert_eq!(plan.stall, Duration::from_millis(250));
        assert_eq!(
            plan.outage,
            Some((Duration::from_secs(60), Duration::from_secs(30)))
        );
        assert_eq!(
            "rate=1,limit=3".parse::<FaultPlan>().map(|p| p.limit),
            Ok(Some(3))
        );
        for bad in [
            "limit=-1",
            "rate=2",
            "kinds=404",
            "outage=5s",
            "nonsense=1",
            "seed",
            "stall=5",
        ] {
            assert!(bad.parse::<FaultPlan>().is_err(), "{bad} accepted");
        }
    }

    fn store(plan: FaultPlan) -> (Arc<dyn ObjectStore>, ChaosStore) {
        let inner: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let chaos = ChaosStore::with(Arc::clone(&inner), Chaos::new(plan));
        (inner, chaos)
    }

    fn only(kind: FaultKind) -> FaultPlan {
        FaultPlan {
            kinds: vec![kind],
            ..FaultPlan::default().with_rate(1.0)
        }
    }

    #[tokio::test]
    async fn a_limit_stops_the_faults() -> Result<()> {
        let key = Path::from("v/chunks/1");
        let (inner, chaos) = store(FaultPlan {
            limit: Some(2),
            ..only(FaultKind::Unavailable)
        });
        inner.put(&key, Bytes::from_static(b"x").into()).await?;
        assert!(chaos.get(&key).await.is_err());
        assert!(chaos.get(&key).await.is_err());
        for _ in 0..5 {
            assert_eq!(chaos.get(&key).await?.bytes().await?, "x");
        }
        assert_eq!(chaos.counts().injected(), 2);
        Ok(())
    }

    #[tokio::test]
    async fn every_answer_fault_does_what_it_says() -> Result<()> {
        let key = Path::from("v/chunks/1");
        let body = Bytes::from(vec![0u8; 1000]);
        let (inner, lost) = store(only(FaultKind::LostReply));
        assert!(lost.put(&key, body.clone().into()).await.is_err());
        assert_eq!(inner.get(&key).await?.bytes().await?, body, "but stored");

        for kind in [
            FaultKind::FlippedBit,
            FaultKind::TruncatedBody,
            FaultKind::ClosedMidBody,
        ] {
            let (inner, chaos) = store(only(kind));
            inner.put(&key, body.clone().into()).await?;
            let got = chaos.get(&key).await?.bytes().await;
            match kind {
                FaultKind::FlippedBit => {
                    let got = got?;
                    let flipped: u32 = got.iter().map(|b| b.count_ones()).sum();
                    assert_eq!(flipped, 1, "one bit");
                }
                FaultKind::TruncatedBody => assert_eq!(got?.len(), 500),
                _ => assert!(got.is_err()),
            }
            assert_eq!(chaos.counts().injected(), 1, "{kind:?}");
        }
        Ok(())
    }

    #[tokio::test]
    async fn bits_are_flipped_only_where_the_plan_says() -> Result<()> {
        let (inner, chaos) = store(only(FaultKind::FlippedBit));
        let key = Path::from("v/volume.json");
        inner.put(&key, vec![7u8; 100].into()).await?;
        assert_eq!(chaos.get(&key).await?.bytes().await?, vec![7u8; 100]);
        assert_eq!(chaos.counts().injected(), 0);
        Ok(())
    }

    #[tokio::test]
    async fn the_rate_is_kept_and_a_seed_repeats_its_schedule() -> Result<()> {
        let plan = FaultPlan {
            kinds: vec![FaultKind::Unavailable],
            ..FaultPlan::default().with_rate(0.1)
        };
        let outcomes = |chaos: ChaosStore| async move {
            let mut failed = Vec::new();
            for i in 0..2000 {
                failed.push(
                    chaos
                        .put(&Path::from(format!("k{i}")), vec![1u8].into())
                        .await
                        .is_err(),
                );
            }
            (failed, chaos.counts())
        };
        let (first, counts) = outcomes(store(plan.clone()).1).await;
        let (second, _) = outcomes(store(plan).1).await;
        assert_eq!(first, second, "same seed, same schedule");
        let n = counts.injected();
        assert!((150..250).contains(&n), "{n} of 2000 at 10 %");
        assert_eq!(counts.requests, 2000);
        Ok(())
    }

    #[tokio::test]
    async fn an_outage_fails_everything_for_its_length() -> Result<()> {
        let plan = FaultPlan {
            outage: Some((Duration::ZERO, Duration::from_millis(300))),
            ..FaultPlan::default()
        };
        let (_, chaos) = store(plan);
        assert!(chaos.put(&Path::from("a"), vec![1u8].into()).await.is_err());
        tokio::time::sleep(Duration::from_millis(350)).await;
        chaos.put(&Path::from("a"), vec![1u8].into()).await?;
        assert_eq!(chaos.counts().outage_failures, 1);
        Ok(())
    }
}
