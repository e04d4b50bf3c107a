//! `crash-soak`: rounds of writes with FLUSH, trims and zeroing through NBD, each ended by a
//! SIGKILL of the server at a random moment — some rounds with the whole cache directory
//! deleted after the kill, some with store faults injected — on moto. Each round starts by
//! checking the disk the previous one left: every flushed write must read back, and the disk
//! must be a prefix of the acknowledged history (the state after some request at or past the
//! last acknowledged FLUSH, with nothing after it and nothing from before it missing).
//!
//! Requests go one at a time, so the history has one order: request `n` was sent only after
//! request `n - 1` was answered. Every written 4 KiB block carries its request number and its
//! offset, so a read tells which write it holds; zeroed and trimmed blocks read as zeros.
//!
//! The check: each block's content allows the cuts (request numbers) where the history leaves
//! the block in that state; a valid cut must be allowed by every block, at or after the last
//! acknowledged FLUSH, and at or before the last request sent. None at all: not a prefix. Only
//! cuts before the FLUSH: flushed writes lost. Rounds that delete the cache directory run with
//! `--durability remote` (a FLUSH waits for the store), since the journal is what they delete,
//! and FLUSH once before their workload: the state they start from was replayed from the last
//! round's journal, durable only there until then.

use crate::nbd_client::NbdClient;
use crate::process::{ServerProcess, check_interrupted, free_loopback_port};
use crate::run_info::RunInfo;
use crate::store_subjects::{self, Env};
use crate::workspace::{Places, bucketdisk_binary, workspace_root};
use anyhow::{Context, Result, bail};
use nbd_server::proto;
use serde::Serialize;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use stores::chaos::SplitMix64;

const BLOCK: u64 = 4096;
const MAGIC: u32 = 0xb0c4_d15c;
const PREFIX: &str = "crash-soak";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// How long to run rounds for.
    #[arg(long, default_value_t = 20)]
    minutes: u64,
    /// Stop after this many rounds, even with time left.
    #[arg(long)]
    rounds: Option<u64>,
    /// The region of the disk the workload uses, in MiB (read back whole after every crash).
    #[arg(long, default_value_t = 64)]
    region_mib: u64,
    /// Seed of the workload and of the rounds' choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[command(flatten)]
    places: Places,
}

/// What a block holds after a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Content {
    Zeros,
    /// Written by request `n`.
    Written(u64),
}

/// The content a write of request `seq` puts in the block at `offset`.
fn block_data(seq: u64, offset: u64) -> Vec<u8> {
    let mut data = Vec::with_capacity(BLOCK as usize);
    data.extend_from_slice(&MAGIC.to_le_bytes());
    data.extend_from_slice(&seq.to_le_bytes());
    data.extend_from_slice(&offset.to_le_bytes());
    let mut x = seq.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ offset;
    while data.len() < BLOCK as usize {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(BLOCK as usize);
    data
}

/// What a block read back holds: a known content, or bytes no request wrote there.
fn identify(data: &[u8], offset: u64) -> Option<Content> {
    if data.iter().all(|&b| b == 0) {
        return Some(Content::Zeros);
    }
    let seq = u64::from_le_bytes(data.get(4..12)?.try_into().ok()?);
    (data == block_data(seq, offset).as_slice()).then_some(Content::Written(seq))
}

/// Every block's history since the last check: `(request, content)`, oldest first; the first
/// entry is the state the last check found (request 0 for a block never written).
#[derive(Default)]
struct History {
    blocks: HashMap<u64, Vec<(u64, Content)>>,
}

impl History {
    fn record(&mut self, block: u64, seq: u64, content: Content) {
        self.blocks
            .entry(block)
            .or_insert_with(|| vec![(0, Content::Zeros)])
            .push((seq, content));
    }
}

/// What one check found.
#[derive(Debug, Default, Clone, Serialize)]
struct Check {
    /// Blocks whose flushed write (or zeroing) had to be there.
    flushed_blocks_checked: u64,
    /// Blocks holding bytes no request wrote there.
    wrong_blocks: u64,
    /// Blocks holding a state the history never had (an older write lost).
    impossible_blocks: u64,
    /// No cut at or after the last FLUSH fits every block.
    flushed_writes_lost: bool,
    /// No cut fits every block at all.
    not_a_prefix: bool,
    /// The cut found (request number), if any.
    cut: Option<u64>,
    /// A few blocks that hold less than their flushed state, for the log.
    examples: Vec<String>,
}

impl Check {
    fn failed(&self) -> bool {
        self.wrong_blocks > 0
            || self.impossible_blocks > 0
            || self.flushed_writes_lost
            || self.not_a_prefix
    }
}

/// Checks `read` (the region, block by block) against `history`, where `flushed` is the last
/// acknowledged FLUSH and `sent` the last request sent; then makes what was read the history's
/// new starting state.
fn check(history: &mut History, read: &[Content], wrong: u64, flushed: u64, sent: u64) -> Check {
    let mut result = Check {
        wrong_blocks: wrong,
        ..Check::default()
    };
    // Blocks the history does not know were never written: zeros.
    result.impossible_blocks = read
        .iter()
        .enumerate()
        .filter(|(block, content)| {
            **content != Content::Zeros && !history.blocks.contains_key(&(*block as u64))
        })
        .count() as u64;
    // Allowed cuts per known block, as a difference array over 0..=sent.
    let low = 0u64;
    let span = (sent - low + 2) as usize;
    let mut allowed = vec![0i64; span];
    let mut touched = 0i64;
    for (&block, entries) in &history.blocks {
        let Some(&found) = read.get(block as usize) else {
            continue;
        };
        touched += 1;
        let last_flushed = entries
            .iter()
            .rev()
            .find(|(seq, _)| *seq <= flushed)
            .map_or(0, |(seq, _)| *seq);
        if last_flushed > 0 {
            result.flushed_blocks_checked += 1;
        }
        let mut matched = false;
        for (i, (seq, content)) in entries.iter().enumerate() {
            if *content != found {
                continue;
            }
            matched = true;
            let until = entries.get(i + 1).map_or(sent, |(next, _)| next - 1);
            allowed[(*seq - low) as usize] += 1;
            allowed[(until - low + 1) as usize] -= 1;
        }
        if !matched {
            result.impossible_blocks += 1;
        }
        // For the log: a block that holds something older than its flushed state.
        let holds = entries.iter().rposition(|(_, content)| *content == found);
        let flushed_at = entries.iter().rposition(|(seq, _)| *seq <= flushed);
        if let (Some(holds), Some(flushed_at)) = (holds, flushed_at)
            && holds < flushed_at
            && result.examples.len() < 5
        {
            result.examples.push(format!(
                "block {block} holds {:?} (request {}), flushed state {:?} (request {})",
                entries[holds].1, entries[holds].0, entries[flushed_at].1, entries[flushed_at].0
            ));
        }
    }
    let mut running = 0i64;
    let mut best = None;
    let mut any = false;
    for (at, delta) in allowed.iter().enumerate().take(span - 1) {
        running += delta;
        if running == touched {
            any = true;
            if at as u64 + low >= flushed {
                best = Some(at as u64 + low);
            }
        }
    }
    result.not_a_prefix = !any;
    result.flushed_writes_lost = any && best.is_none();
    result.cut = best;
    // Start again from what is there.
    history.blocks.clear();
    for (block, content) in read.iter().enumerate() {
        if *content != Content::Zeros {
            history.blocks.insert(block as u64, vec![(0, *content)]);
        }
    }
    result
}

/// How one round went.
#[derive(Debug, Clone, Serialize)]
struct Round {
    round: u64,
    faults: bool,
    cache_deleted: bool,
    requests_acknowledged: u64,
    flushes_acknowledged: u64,
    /// Milliseconds of workload before the kill.
    killed_after_ms: u64,
    /// The check of the disk this round left (made at the next start).
    check: Check,
}

#[derive(Debug, Serialize)]
struct Report {
    #[serde(flatten)]
    run: RunInfo,
    region_mib: u64,
    seed: u64,
    server_command: String,
    rounds: Vec<Round>,
    totals: Totals,
}

#[derive(Debug, Default, Serialize)]
struct Totals {
    rounds: u64,
    rounds_with_faults: u64,
    rounds_with_cache_deleted: u64,
    requests_acknowledged: u64,
    flushes_acknowledged: u64,
    flushed_blocks_checked: u64,
    failed_rounds: u64,
    wrong_blocks: u64,
    flushed_writes_lost: u64,
    not_a_prefix: u64,
}

/// One server start, on the soak's volume.
fn serve(
    env: &Env,
    cache: &Path,
    log: &Path,
    extra: &[String],
) -> Result<(ServerProcess, SocketAddr)> {
    let port = free_loopback_port()?;
    let mut cmd = store_subjects::bucketdisk_s3_at(env, PREFIX, port, cache);
    cmd.args(extra).env("BUCKETDISK_LOG", "info");
    let mut server = ServerProcess::spawn("bucketdisk", cmd, log)?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    server.wait_until_serving(addr, Duration::from_secs(60))?;
    Ok((server, addr))
}

fn connect(addr: SocketAddr) -> Result<NbdClient> {
    NbdClient::handshake(TcpStream::connect(addr).context("connecting")?)
}

/// The region as contents (one per block) and the count of blocks holding bytes nobody wrote.
fn read_region(client: &mut NbdClient, region: u64) -> Result<(Vec<Content>, u64)> {
    let step = 1u64 << 20;
    let ranges: Vec<(u64, u32)> = (0..region)
        .step_by(step as usize)
        .map(|o| (o, step as u32))
        .collect();
    let mut contents = Vec::with_capacity((region / BLOCK) as usize);
    let mut wrong = 0;
    for (i, data) in client.read_many(&ranges, 8)?.into_iter().enumerate() {
        for (j, block) in data.chunks(BLOCK as usize).enumerate() {
            let offset = ranges[i].0 + j as u64 * BLOCK;
            match identify(block, offset) {
                Some(content) => contents.push(content),
                None => {
                    wrong += 1;
                    eprintln!("crash-soak: the block at {offset} holds bytes no request wrote");
                    contents.push(Content::Zeros);
                }
            }
        }
    }
    Ok((contents, wrong))
}

/// Requests until the connection dies (the kill): returns (acknowledged, flushes, last FLUSH
/// acknowledged, last request sent).
fn workload(
    client: &mut NbdClient,
    history: &mut History,
    draws: &mut SplitMix64,
    next_seq: &mut u64,
    region: u64,
) -> (u64, u64, u64, u64) {
    let (mut acked, mut flushes, mut flushed) = (0, 0, *next_seq - 1);
    let blocks = region / BLOCK;
    loop {
        let seq = *next_seq;
        *next_seq += 1;
        let first = draws.below(blocks);
        let count = (draws.below(16) + 1).min(blocks - first);
        let (offset, length) = (first * BLOCK, (count * BLOCK) as u32);
        let kind = draws.below(10);
        let (command, payload, content) = match kind {
            0..=5 => {
                let mut payload = Vec::with_capacity(length as usize);
                for b in 0..count {
                    payload.extend(block_data(seq, offset + b * BLOCK));
                }
                (proto::CMD_WRITE, payload, Some(Content::Written(seq)))
            }
            6 => (proto::CMD_TRIM, Vec::new(), Some(Content::Zeros)),
            7 => (proto::CMD_WRITE_ZEROES, Vec::new(), Some(Content::Zeros)),
            _ => (proto::CMD_FLUSH, Vec::new(), None),
        };
        // Recorded before it is sent: a request the kill interrupts may have been applied.
        if let Some(content) = content {
            for b in first..first + count {
                history.record(b, seq, content);
            }
        }
        let (offset, length) = if command == proto::CMD_FLUSH {
            (0, 0)
        } else {
            (offset, length)
        };
        match client.request(command, offset, length, &payload) {
            Ok(0) => {
                acked += 1;
                if command == proto::CMD_FLUSH {
                    flushes += 1;
                    flushed = seq;
                }
            }
            // An error answer: the request may or may not have happened (it stays recorded);
            // the connection goes on.
            Ok(_) => {}
            Err(_) => return (acked, flushes, flushed, seq),
        }
    }
}

pub fn run(args: Args, command: String) -> Result<()> {
    let workspace = workspace_root();
    let bin = bucketdisk_binary(args.places.bucketdisk.as_deref(), &workspace)?;
    let tmp = args.places.scratch("bucketdisk-crash-soak-")?;
    let mut run = RunInfo::begin(command, &bin, &workspace, tmp.path())?;
    let (env, _moto, _proxy) = Env::on_moto(bin, tmp.path())?;
    let cache = tmp.path().join("cache");
    let log = tmp.path().join("server.log");
    let region = args.region_mib << 20;
    let mut draws = SplitMix64(args.seed);
    let mut history = History::default();
    let mut next_seq = 1u64;
    let mut rounds: Vec<Round> = Vec::new();
    let mut pending: Option<(u64, bool, bool, u64, u64, u64, u64)> = None;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.minutes * 60);
    let mut round = 0u64;
    let mut server_command = String::new();
    loop {
        check_interrupted()?;
        let last = Instant::now() >= deadline || args.rounds.is_some_and(|n| round >= n);
        round += 1;
        let faults = !last && draws.below(10) < 3;
        let delete_cache = !last && draws.below(10) < 2;
        let mut extra: Vec<String> = Vec::new();
        if delete_cache {
            extra.extend(["--durability".into(), "remote".into()]);
        }
        if faults {
            extra.extend([
                "--inject-faults".into(),
                format!("seed={round},rate=0.05,stall=500ms,timeout=1s"),
            ]);
        }
        let (server, addr) = serve(&env, &cache, &log, &extra)
            .with_context(|| format!("round {round}: starting the server"))?;
        if server_command.is_empty() {
            server_command = "bucketdisk serve --store s3://BUCKET/crash-soak --cache-dir CACHE \
                              --listen 127.0.0.1:PORT --size 100G [--durability remote] \
                              [--inject-faults seed=ROUND,rate=0.05,stall=500ms,timeout=1s]"
                .into();
        }
        let mut client = connect(addr).with_context(|| format!("round {round}: connecting"))?;
        // The previous round's crash, checked.
        let (contents, wrong) = read_region(&mut client, region)
            .with_context(|| format!("round {round}: reading the region back"))?;
        let sent = next_seq - 1;
        if let Some((n, faults, cache_deleted, acked, flushes, flushed, ms)) = pending.take() {
            let result = check(&mut history, &contents, wrong, flushed, sent);
            eprintln!(
                "crash-soak: round {n} (faults {faults}, cache deleted {cache_deleted}): \
                 {acked} requests, {flushes} flushes, killed after {ms} ms → {} flushed blocks \
                 checked, cut {:?}{}",
                result.flushed_blocks_checked,
                result.cut,
                if result.failed() { " FAILED" } else { "" }
            );
            for example in &result.examples {
                eprintln!("crash-soak:   {example}");
            }
            rounds.push(Round {
                round: n,
                faults,
                cache_deleted,
                requests_acknowledged: acked,
                flushes_acknowledged: flushes,
                killed_after_ms: ms,
                check: result,
            });
        } else {
            check(&mut history, &contents, wrong, sent, sent);
        }
        if last {
            let _ = client.disconnect();
            server.stop_within(Duration::from_secs(300))?;
            break;
        }
        if delete_cache {
            // What this server replayed from the last round's journal is durable only there,
            // and this round deletes the journal: a FLUSH (`--durability remote`) first makes
            // the state the round starts from durable in the store.
            let answer = client
                .request(proto::CMD_FLUSH, 0, 0, &[])
                .with_context(|| format!("round {round}: the first FLUSH"))?;
            if answer != 0 {
                bail!("round {round}: the first FLUSH failed (NBD error {answer})");
            }
        }
        // The kill, at a random moment of the workload.
        let kill_after = Duration::from_millis(300 + draws.below(4000));
        let pid = server.pid().context("server pid")?;
        let killed = Arc::new(AtomicBool::new(false));
        let killer = {
            let killed = Arc::clone(&killed);
            std::thread::spawn(move || {
                std::thread::sleep(kill_after);
                // SAFETY: kill(2) of the child this suite started; no memory is involved.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                killed.store(true, Ordering::Relaxed);
            })
        };
        let work_started = Instant::now();
        let (acked, flushes, flushed, _) =
            workload(&mut client, &mut history, &mut draws, &mut next_seq, region);
        let ms = work_started.elapsed().as_millis() as u64;
        let _ = killer.join();
        if !killed.load(Ordering::Relaxed) {
            bail!("round {round}: the connection failed before the kill");
        }
        let _ = server.kill();
        if delete_cache {
            std::fs::remove_dir_all(&cache)
                .with_context(|| format!("deleting {}", cache.display()))?;
        }
        pending = Some((round, faults, delete_cache, acked, flushes, flushed, ms));
    }
    run.finish();
    let mut totals = Totals::default();
    for r in &rounds {
        totals.rounds += 1;
        totals.rounds_with_faults += u64::from(r.faults);
        totals.rounds_with_cache_deleted += u64::from(r.cache_deleted);
        totals.requests_acknowledged += r.requests_acknowledged;
        totals.flushes_acknowledged += r.flushes_acknowledged;
        totals.flushed_blocks_checked += r.check.flushed_blocks_checked;
        totals.failed_rounds += u64::from(r.check.failed());
        totals.wrong_blocks += r.check.wrong_blocks;
        totals.flushed_writes_lost += u64::from(r.check.flushed_writes_lost);
        totals.not_a_prefix += u64::from(r.check.not_a_prefix);
    }
    let report = Report {
        run,
        region_mib: args.region_mib,
        seed: args.seed,
        server_command,
        rounds,
        totals,
    };
    let out_dir = args.places.out_dir(&workspace);
    let stem = report.run.stem("crash-soak");
    let md = markdown(&report);
    crate::report::write_md_json(&out_dir, &stem, &md, &report)?;
    print!("{md}");
    if report.totals.failed_rounds > 0 {
        bail!(
            "{} round(s) failed their check",
            report.totals.failed_rounds
        );
    }
    Ok(())
}

fn markdown(r: &Report) -> String {
    let mut md = String::new();
    r.run.header(
        &mut md,
        "crash soak: kill -9 at random moments, every flushed write checked",
        &[("bucketdisk", r.run.tools.bucketdisk_line())],
    );
    let t = &r.totals;
    let _ = writeln!(
        md,
        "A 100 GiB volume on moto; the first {} MiB are the workload's region. A round starts the \
         server, reads the region back and checks it against the history of the previous round \
         (below), then sends requests one at a time — 60 % writes of 1–16 stamped 4 KiB blocks, \
         10 % trims, 10 % write-zeroes, 20 % FLUSH — until the server is killed (SIGKILL) \
         0.3–4.3 s in. 30 % of rounds run with store faults injected (5 % of requests: errors, \
         timeouts, stalls, damaged bodies, lost PUT replies); 20 % delete the whole cache \
         directory after the kill and run with `--durability remote` (FLUSH waits for the \
         store, since the journal is what they delete), starting with a FLUSH so that the \
         state they start from — replayed from the last round's journal — is in the store. The check: every block must hold a \
         state the history gives it, and one cut of the history — at or after the last \
         acknowledged FLUSH — must fit every block at once (the disk is a prefix of the \
         acknowledged history and holds every flushed write). Seed {}.\n\n\
         Server: `{}`\n",
        r.region_mib, r.seed, r.server_command
    );
    let _ = writeln!(md, "| | |\n|---|---|");
    for (what, value) in [
        ("rounds (each ended by kill -9)", t.rounds),
        ("… with store faults", t.rounds_with_faults),
        (
            "… with the cache directory deleted",
            t.rounds_with_cache_deleted,
        ),
        ("requests acknowledged", t.requests_acknowledged),
        ("FLUSHes acknowledged", t.flushes_acknowledged),
        ("flushed blocks checked", t.flushed_blocks_checked),
        ("blocks with bytes nobody wrote", t.wrong_blocks),
        ("rounds that lost a flushed write", t.flushed_writes_lost),
        ("rounds whose disk was not a prefix", t.not_a_prefix),
        ("failed rounds", t.failed_rounds),
    ] {
        let _ = writeln!(md, "| {what} | {value} |");
    }
    let _ = writeln!(md);
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks 0 and 1: request 1 writes 0, request 2 writes 1, request 3 is a FLUSH, request 4
    /// writes 0 again (unflushed), request 5 zeroes 1 (unflushed, in flight at the kill).
    fn history() -> History {
        let mut h = History::default();
        h.record(0, 1, Content::Written(1));
        h.record(1, 2, Content::Written(2));
        h.record(0, 4, Content::Written(4));
        h.record(1, 5, Content::Zeros);
        h
    }

    fn checked(read: &[Content]) -> Check {
        check(&mut history(), read, 0, 3, 5)
    }

    #[test]
    fn every_prefix_at_or_after_the_flush_passes() {
        use Content::*;
        for read in [
            [Written(1), Written(2)],
            [Written(4), Written(2)],
            [Written(4), Zeros],
        ] {
            let c = checked(&read);
            assert!(!c.failed(), "{read:?}: {c:?}");
            assert_eq!(c.flushed_blocks_checked, 2);
        }
    }

    #[test]
    fn a_lost_flushed_write_fails() {
        let c = checked(&[Content::Written(1), Content::Zeros][..]);
        // Block 1 zero: only before request 2 or after request 5; with block 0 at request 1
        // (cuts 1..=3), only cut 1 fits — before the FLUSH.
        assert!(c.flushed_writes_lost && c.failed(), "{c:?}");
    }

    #[test]
    fn a_state_that_is_no_prefix_fails() {
        // Block 1 zeroed (request 5) while block 0 still holds request 1 (overwritten by 4).
        let mut h = History::default();
        h.record(0, 4, Content::Written(4));
        h.record(1, 5, Content::Written(5));
        let c = check(&mut h, &[Content::Zeros, Content::Written(5)], 0, 0, 5);
        assert!(c.not_a_prefix, "{c:?}");
    }

    #[test]
    fn bytes_nobody_wrote_are_found() {
        let data = block_data(7, 4096);
        assert_eq!(identify(&data, 4096), Some(Content::Written(7)));
        assert_eq!(identify(&data, 8192), None, "another block's data");
        let mut flipped = data.clone();
        flipped[100] ^= 1;
        assert_eq!(identify(&flipped, 4096), None);
        assert_eq!(identify(&[0u8; 4096], 0), Some(Content::Zeros));
        let c = check(&mut History::default(), &[Content::Written(3)], 0, 0, 5);
        assert_eq!(c.impossible_blocks, 1, "a write the history never had");
    }
}
