//! A volume on a store that misbehaves by a seeded schedule (`stores::chaos`): 10 % of requests
//! fail, time out, stall, come back damaged or lose their reply, and there is an outage. A
//! random workload of writes, flushes and reads checks every read against a model of the disk
//! as it goes — right bytes, or an error only while the store is down, never wrong bytes — and
//! at the end the volume, read from the store alone (fresh cache), holds exactly what was
//! written.

use bytes::Bytes;
use engine::BlockDevice;
use engine::object_volume::{ObjectVolume, VolumeConfig};
use object_store::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use stores::chaos::{FaultKind, FaultPlan, SplitMix64};

mod common;
use common::{Fixture, MIB, read, try_read};

const BLOCK: u32 = 65536;
const SIZE: u64 = 32 * MIB;

fn config(f: &Fixture, local: &str) -> VolumeConfig {
    let mut c = f.config(local);
    // Small, so reads go to the store: 16 blocks.
    c.cache_bytes = MIB;
    c.sync_interval = Duration::from_millis(100);
    // Long enough to ride out the outage below, as a server's default does.
    c.stall_timeout = Duration::from_secs(60);
    c
}

#[derive(Debug, Default)]
struct Tally {
    writes: u64,
    flushes: u64,
    reads: u64,
    read_errors: u64,
    /// Read errors away from the outage (and the retries it leaves running just after it).
    read_errors_outside_outage: u64,
    longest: Duration,
}

/// Writes, flushes and reads at random for `length`, each read checked against `model`.
/// `outage` is when the store is down, from `started`.
async fn workload(
    v: &ObjectVolume,
    model: &mut [u8],
    seed: u64,
    length: Duration,
    started: Instant,
    outage: (Duration, Duration),
) -> Tally {
    let mut draws = SplitMix64(seed);
    let mut tally = Tally::default();
    let (down, up) = (outage.0, outage.0 + outage.1 + Duration::from_secs(3));
    while started.elapsed() < length {
        let offset = draws.below(SIZE / 4096) * 4096;
        let len = ((draws.below(16) + 1) * 4096).min(SIZE - offset) as usize;
        let op_started = Instant::now();
        match draws.below(10) {
            0..=4 => {
                let fill = draws.draw();
                let data: Vec<u8> = (0..len)
                    .map(|i| (fill.wrapping_add(i as u64 * 0x9e37) >> 13) as u8)
                    .collect();
                match v.write(offset, Bytes::from(data.clone()), false).await {
                    Ok(()) => {
                        model[offset as usize..offset as usize + len].copy_from_slice(&data);
                        tally.writes += 1;
                    }
                    // Not acknowledged: the model cannot say what the disk holds there now.
                    Err(e) => panic!("a write failed under store faults: {e}"),
                }
            }
            5 => {
                v.flush()
                    .await
                    .expect("a flush fails only on the local journal");
                tally.flushes += 1;
            }
            _ => {
                tally.reads += 1;
                match try_read(v, offset, len as u32).await {
                    Ok(got) => {
                        assert!(
                            got == model[offset as usize..offset as usize + len],
                            "wrong bytes read at {offset} (+{len})"
                        );
                    }
                    Err(e) => {
                        tally.read_errors += 1;
                        let at = op_started.duration_since(started);
                        if !(down..up).contains(&at) && !(down..up).contains(&started.elapsed()) {
                            tally.read_errors_outside_outage += 1;
                            eprintln!("read error outside the outage: {e}");
                        }
                    }
                }
            }
        }
        tally.longest = tally.longest.max(op_started.elapsed());
    }
    tally
}

/// Every block of the volume, read from the store alone (an empty cache and journal).
async fn assert_store_holds(f: &Fixture, model: &[u8], local: &str) {
    let v = f.open(f.config(local)).await;
    for offset in (0..SIZE).step_by(BLOCK as usize) {
        let got = read(&v, offset, BLOCK).await;
        assert!(
            got == model[offset as usize..(offset + u64::from(BLOCK)) as usize],
            "block at {offset} differs from what was written"
        );
    }
    v.close().await.expect("close");
}

async fn ten_percent_faults_and_an_outage(f: Fixture) {
    let outage = (Duration::from_secs(12), Duration::from_secs(5));
    let mut plan = FaultPlan {
        seed: 16,
        stall: Duration::from_millis(300),
        timeout: Duration::from_millis(600),
        outage: Some(outage),
        ..FaultPlan::default().with_rate(0.10)
    };
    // PUTs are few here (an upload every 100 ms): more of them are hit, and a lost reply —
    // the one fault only a PUT meets — weighs five times the others among them (a kind listed
    // twice is picked twice as often), so that every kind is met in every run.
    plan.rates[2] = 0.5;
    plan.kinds.extend([FaultKind::LostReply; 4]);
    let started = Instant::now();
    let (store, chaos) = stores::url::with_faults(Arc::clone(&f.store), plan);
    let v = ObjectVolume::open(
        store,
        &Path::from(""),
        f.layout,
        "disk",
        config(&f, "served"),
    )
    .await
    .expect("open under faults");
    let mut model = vec![0u8; SIZE as usize];
    let tally = workload(&v, &mut model, 7, Duration::from_secs(25), started, outage).await;
    v.close().await.expect("close uploads everything");
    let counts = chaos.counts();
    eprintln!(
        "{tally:?}\ninjected: {counts}, retried {}",
        stores::retry::retried()
    );
    assert!(tally.reads > 100 && tally.flushes > 20, "{tally:?}");
    // Retries, refetches of damaged blocks and fresh lookups absorb every fault but the outage.
    assert_eq!(tally.read_errors_outside_outage, 0, "{tally:?}");
    for kind in FaultKind::ALL {
        let n = counts
            .by_kind
            .iter()
            .find(|(k, _)| *k == kind)
            .map_or(0, |(_, n)| *n);
        assert!(n > 0, "no {} fault was injected: {counts}", kind.name());
    }
    assert!(counts.outage_failures > 0, "{counts}");
    assert_store_holds(&f, &model, "fresh").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_on_a_faulty_directory_store_loses_nothing_and_never_reads_wrong_bytes() {
    ten_percent_faults_and_an_outage(Fixture::new(SIZE, BLOCK).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_on_faulty_s3_loses_nothing_and_never_reads_wrong_bytes() {
    ten_percent_faults_and_an_outage(Fixture::on_s3(SIZE, BLOCK).await).await;
}
