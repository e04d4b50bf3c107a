//! What the store itself serves and absorbs: ranged GETs, and PUTs of chunk-sized objects,
//! straight from a Rust S3 client through the same latency proxy the subjects use, with a fixed
//! number in flight. These are the ceilings the cold-read and store-durable write rows are held
//! against (a server cannot read faster than its store answers, nor upload faster than it
//! stores).

use crate::moto;
use crate::process::cpu_seconds;
use anyhow::{Context, Result};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Objects the GET ceilings read from: enough that GETs rarely repeat.
const OBJECTS: u64 = 16;
const PREFIX: &str = "ceiling";
/// Where the PUT ceiling's objects go (deleted after each measurement).
const PUT_PREFIX: &str = "ceiling-puts";

/// One ceiling: `in_flight` ranged GETs of `get_bytes` kept going for the whole time.
#[derive(Debug, Clone, Serialize)]
pub struct Ceiling {
    pub get_bytes: u64,
    pub in_flight: usize,
    pub seconds: f64,
    pub gets: u64,
    pub gets_per_sec: f64,
    pub mib_per_sec: f64,
}

/// A client of `bucket` at `endpoint` (the proxy), with the objects the ceilings read.
pub struct StoreProbe {
    store: Arc<dyn ObjectStore>,
    runtime: tokio::runtime::Runtime,
    /// Size of the objects the GET ceilings read (0 until [`StoreProbe::new`] uploads them).
    object_bytes: u64,
}

/// One PUT ceiling: `in_flight` PUTs of `put_bytes` kept going for the whole time.
#[derive(Debug, Clone, Serialize)]
pub struct PutCeiling {
    pub put_bytes: u64,
    pub in_flight: usize,
    pub seconds: f64,
    pub puts: u64,
    pub mib_per_sec: f64,
}

/// One ceiling measurement of a repeat and the CPU it took.
#[derive(Debug, Clone, Serialize)]
pub struct Measured<T> {
    pub repeat: usize,
    pub ceiling: T,
    pub moto_cpu_seconds: f64,
    /// The benchmark's own CPU seconds: the S3 client and the latency proxy its requests pass
    /// through.
    pub client_cpu_seconds: f64,
}

impl<T> Measured<T> {
    /// Runs `measure` (a ceiling of repeat `repeat`) and notes the CPU moto (`moto_pid`) and
    /// this process spent on it.
    pub fn run(
        repeat: usize,
        moto_pid: Option<u32>,
        measure: impl FnOnce() -> Result<T>,
    ) -> Result<Measured<T>> {
        let own = Some(std::process::id());
        let (moto_before, client_before) = (cpu_seconds(moto_pid), cpu_seconds(own));
        let ceiling = measure()?;
        Ok(Measured {
            repeat,
            ceiling,
            moto_cpu_seconds: cpu_seconds(moto_pid) - moto_before,
            client_cpu_seconds: cpu_seconds(own) - client_before,
        })
    }
}

impl StoreProbe {
    /// A probe with the objects the GET ceilings read, each `object_bytes` long. Make them
    /// the size of the subject's objects: moto reads a whole object to answer a range of it,
    /// so the same GET costs it more from a larger object (S3's cost does not grow so).
    pub fn new(endpoint: &str, bucket: &str, object_bytes: u64) -> Result<StoreProbe> {
        let mut probe = StoreProbe::connect(endpoint, bucket)?;
        probe.object_bytes = object_bytes;
        probe.runtime.block_on(probe.upload())?;
        Ok(probe)
    }

    /// A probe that uploads nothing until asked (for PUT ceilings).
    pub fn connect(endpoint: &str, bucket: &str) -> Result<StoreProbe> {
        let store = moto::client(endpoint, bucket)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("the store ceiling's runtime")?;
        Ok(StoreProbe {
            store,
            runtime,
            object_bytes: 0,
        })
    }

    /// `in_flight` loops of PUTs of `put_bytes` (incompressible, new keys) for `time`; the
    /// objects are deleted afterwards, outside the clock.
    pub fn measure_puts(
        &self,
        put_bytes: u64,
        in_flight: usize,
        time: Duration,
    ) -> Result<PutCeiling> {
        let body = PutPayload::from(random_bytes(put_bytes, 0x5DEE_CE66_D1CE_4E5B));
        let puts = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let deadline = started + time;
        let result: Result<()> = self.runtime.block_on(async {
            let loops: Vec<_> = (0..in_flight)
                .map(|lane| {
                    let store = Arc::clone(&self.store);
                    let puts = Arc::clone(&puts);
                    let body = body.clone();
                    tokio::spawn(async move {
                        let mut n = 0u64;
                        while Instant::now() < deadline {
                            let key = Path::from(format!("{PUT_PREFIX}/{lane:02}-{n:06}"));
                            store.put(&key, body.clone()).await?;
                            puts.fetch_add(1, Ordering::Relaxed);
                            n += 1;
                        }
                        Ok::<(), anyhow::Error>(())
                    })
                })
                .collect();
            for l in loops {
                l.await.context("a PUT loop")??;
            }
            Ok(())
        });
        let seconds = started.elapsed().as_secs_f64();
        result?;
        self.runtime.block_on(self.delete_under(PUT_PREFIX))?;
        let puts = puts.load(Ordering::Relaxed);
        Ok(PutCeiling {
            put_bytes,
            in_flight,
            seconds,
            puts,
            mib_per_sec: (puts * put_bytes) as f64 / seconds / f64::from(1 << 20),
        })
    }

    /// Deletes every object under `prefix` (e.g. a subject's disk between two runs).
    pub fn delete_prefix(&self, prefix: &str) -> Result<()> {
        self.runtime.block_on(self.delete_under(prefix))
    }

    async fn delete_under(&self, prefix: &str) -> Result<()> {
        use futures::{StreamExt, TryStreamExt};
        let prefix = Path::from(prefix);
        let locations = self
            .store
            .list(Some(&prefix))
            .map_ok(|meta| meta.location)
            .boxed();
        let _: Vec<Path> = self
            .store
            .delete_stream(locations)
            .try_collect()
            .await
            .with_context(|| format!("deleting {prefix}"))?;
        Ok(())
    }

    async fn upload(&self) -> Result<()> {
        for i in 0..OBJECTS {
            let body = random_bytes(self.object_bytes, 0x2545_F491_4F6C_DD1D ^ i);
            self.store
                .put(&object(i), PutPayload::from(body))
                .await
                .context("uploading the ceiling's objects")?;
        }
        Ok(())
    }

    /// `in_flight` loops of ranged GETs of `get_bytes` at aligned random offsets for `time`.
    pub fn measure(&self, get_bytes: u64, in_flight: usize, time: Duration) -> Result<Ceiling> {
        self.measure_from(0, get_bytes, in_flight, time)
    }

    /// As [`StoreProbe::measure`], the ranges starting `skip` bytes into the objects: GETs
    /// shaped like a reader's that skips a header (moto copies a range that is not the whole
    /// object; a whole-object range it hands back as is, which flatters the ceiling).
    pub fn measure_from(
        &self,
        skip: u64,
        get_bytes: u64,
        in_flight: usize,
        time: Duration,
    ) -> Result<Ceiling> {
        let gets = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let deadline = started + time;
        anyhow::ensure!(
            get_bytes > 0 && self.object_bytes >= skip + get_bytes,
            "GETs of {get_bytes} bytes {skip} bytes into objects of {}",
            self.object_bytes
        );
        let slots = (self.object_bytes - skip) / get_bytes;
        let result: Result<()> = self.runtime.block_on(async {
            let loops: Vec<_> = (0..in_flight as u64)
                .map(|seed| {
                    let store = Arc::clone(&self.store);
                    let gets = Arc::clone(&gets);
                    tokio::spawn(async move {
                        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                        while Instant::now() < deadline {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            let start = skip + (x % slots) * get_bytes;
                            let bytes = store
                                .get_range(&object((x >> 32) % OBJECTS), start..start + get_bytes)
                                .await?;
                            anyhow::ensure!(bytes.len() as u64 == get_bytes, "short GET");
                            gets.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(())
                    })
                })
                .collect();
            for l in loops {
                l.await.context("a GET loop")??;
            }
            Ok(())
        });
        result?;
        let seconds = started.elapsed().as_secs_f64();
        let gets = gets.load(Ordering::Relaxed);
        Ok(Ceiling {
            get_bytes,
            in_flight,
            seconds,
            gets,
            gets_per_sec: gets as f64 / seconds,
            mib_per_sec: (gets * get_bytes) as f64 / seconds / f64::from(1 << 20),
        })
    }
}

/// `len` incompressible bytes (xorshift from `seed`).
fn random_bytes(len: u64, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len.div_ceil(8))
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .take(len as usize)
        .collect()
}

fn object(i: u64) -> Path {
    Path::from(format!("{PREFIX}/{i:02}"))
}
