//! Crashes and lost local disks (docs/ARCHITECTURE.md, invariants I1 and I2), through the NBD
//! contract only, so the same checks hold for every engine.
//!
//! A verifying writer (a thread with its own NBD connection, one request at a time) writes
//! self-checking 4 KiB records to random blocks of the first 64 MiB: each names its block and a
//! global write sequence number, carries filler derived from both and ends in a CRC-32. It
//! FLUSHes every few writes and sets FUA on some, and remembers, per write, whether it was sent,
//! answered, or made durable by a FUA reply or a later FLUSH reply.
//!
//! - `kill9_loses_no_acknowledged_write` (I2): SIGKILL at a random moment, restart on the same
//!   store and local directory, and every block holds the last durable write to it or a later
//!   write really sent there (or zeros if nothing durable was written there). Repeated, each round
//!   continuing the same disk.
//! - `lost_cache_restart_is_a_prefix_of_acknowledged_writes` (I1): SIGKILL, delete the whole local
//!   directory, restart from the store alone: there is a position p in the write history such
//!   that every block holds exactly the last write to it at or before p.
//!
//! After each verification the verifier FLUSHes, so what it read is durable and becomes the
//! starting state of the next round: a later round may not go back behind it.
//!
//! Seeds are random unless `BUCKETDISK_CRASH_SEED` is set, and printed in every failure message.
//! `BUCKETDISK_CRASH_ROUNDS` sets the number of kill -9 rounds (default 20),
//! `BUCKETDISK_TEST_ENGINE` passes `--engine` to the server.
//!
//! ext4 after a lost local disk is `ext4_survives_losing_the_local_disk` in ext4_end_to_end.rs.

mod common;
use common::nbd_client::{NbdClient, nbd_errno};
use common::*;
use std::fmt::Write as _;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Record size: one record per 4 KiB block of the region.
const BLOCK: usize = 4096;
/// The region written and verified: the first 64 MiB.
const REGION_BLOCKS: u64 = 16384;
/// A FLUSH after every this many writes of a session.
const FLUSH_EVERY: usize = 8;
/// About one write in this many carries FUA.
const FUA_ONE_IN: u64 = 5;
/// Verification reads this much per request.
const READ_CHUNK: usize = 1 << 20;
const MAGIC: &[u8; 8] = b"BDCRASH2";

// ---------------------------------------------------------------------------------------------
// Records

fn crc32(data: &[u8]) -> u32 {
    static TABLE: OnceLock<[u32; 256]> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, entry) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *entry = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| {
        table[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// The record of write `seq` to `block`: magic, block, seq, filler, CRC-32 of all before it.
fn record(block: u64, seq: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(BLOCK);
    r.extend_from_slice(MAGIC);
    r.extend_from_slice(&block.to_le_bytes());
    r.extend_from_slice(&seq.to_le_bytes());
    r.extend_from_slice(&pattern(
        BLOCK - 28,
        seq.wrapping_mul(REGION_BLOCKS) ^ block,
    ));
    let crc = crc32(&r);
    r.extend_from_slice(&crc.to_le_bytes());
    r
}

/// The seq of the record `data` holds for `block`, 0 for zeros, or what is wrong with it.
fn parse(block: u64, data: &[u8]) -> Result<u64, String> {
    if data.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    let (body, crc) = data.split_at(BLOCK - 4);
    let preview = format!("{:02x?}", &data[..32]);
    if &body[..8] != MAGIC {
        return Err(format!("neither zeros nor a record (starts {preview})"));
    }
    if crc32(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
        return Err(format!(
            "a record with a bad CRC (torn or corrupt; starts {preview})"
        ));
    }
    let owner = u64::from_le_bytes(body[8..16].try_into().expect("8 bytes"));
    let seq = u64::from_le_bytes(body[16..24].try_into().expect("8 bytes"));
    if owner != block {
        return Err(format!(
            "the record of block {owner} (seq {seq}): misplaced data"
        ));
    }
    if data != record(block, seq) {
        return Err(format!("a record of seq {seq} with the wrong filler"));
    }
    Ok(seq)
}

// ---------------------------------------------------------------------------------------------
// The writer

#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    /// Sent (or being sent) when the connection died: it may or may not have landed.
    InFlight,
    /// Answered, not yet covered by a FLUSH.
    Answered,
    /// Answered with FUA, or answered before a FLUSH that returned.
    Durable,
}

struct Write {
    seq: u64,
    block: u64,
    state: State,
    answered: Option<Instant>,
}

struct Session {
    writes: Vec<Write>,
    /// Why the session ended (normally: the server was killed).
    ended_by: String,
    /// An NBD error reply: the server refused a request while it was up, a failure.
    error_reply: Option<String>,
}

/// Writes records at random blocks, one request at a time, until the connection fails (or
/// `limit` passes).
fn run_writer(endpoint: Endpoint, seed: u64, first_seq: u64, limit: Duration) -> Session {
    let mut session = Session {
        writes: Vec::new(),
        ended_by: String::new(),
        error_reply: None,
    };
    let mut client = match NbdClient::connect(&endpoint, "") {
        Ok(c) => c,
        Err(e) => {
            session.ended_by = format!("connect: {e}");
            return session;
        }
    };
    let can_fua = client.transmission_flags() & common::nbd_client::TFLAG_SEND_FUA != 0;
    let mut rng = Rng(seed | 1);
    let mut seq = first_seq;
    let mut unflushed = 0; // first write not covered by a returned FLUSH
    let start = Instant::now();
    let fail = |session: &mut Session, e: std::io::Error| {
        if nbd_errno(&e).is_some() {
            session.error_reply = Some(e.to_string());
        }
        session.ended_by = e.to_string();
    };
    loop {
        if start.elapsed() > limit {
            session.ended_by = format!("ran for {limit:?} and the server was still up");
            return session;
        }
        let block = rng.below(REGION_BLOCKS);
        let fua = can_fua && rng.below(FUA_ONE_IN) == 0;
        let data = record(block, seq);
        session.writes.push(Write {
            seq,
            block,
            state: State::InFlight,
            answered: None,
        });
        if let Err(e) = client.write(block * BLOCK as u64, &data, fua) {
            fail(&mut session, e);
            return session;
        }
        let w = session.writes.last_mut().expect("just pushed");
        w.state = if fua { State::Durable } else { State::Answered };
        w.answered = Some(Instant::now());
        seq += 1;
        if session.writes.len() % FLUSH_EVERY == 0 {
            if let Err(e) = client.flush() {
                fail(&mut session, e);
                return session;
            }
            for w in &mut session.writes[unflushed..] {
                w.state = State::Durable;
            }
            unflushed = session.writes.len();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What the disk may hold

/// The expected state of the region: per block, a verified base (the seq read back and
/// flushed after the previous round, 0 for zeros) and the writes sent since.
struct Model {
    seed: u64,
    base: Vec<u64>,
    since: Vec<Vec<(u64, State)>>,
    next_seq: u64,
}

impl Model {
    fn new(seed: u64) -> Model {
        Model {
            seed,
            base: vec![0; REGION_BLOCKS as usize],
            since: vec![Vec::new(); REGION_BLOCKS as usize],
            next_seq: 1,
        }
    }

    fn add(&mut self, session: &Session) {
        for w in &session.writes {
            assert!(w.seq >= self.next_seq, "seqs must grow");
            self.since[w.block as usize].push((w.seq, w.state));
            self.next_seq = w.seq + 1;
        }
    }

    /// The history of `block` for a failure message.
    fn history(&self, block: u64) -> String {
        let mut s = format!("base {}", self.base[block as usize]);
        for (seq, state) in &self.since[block as usize] {
            let _ = write!(s, ", {seq} {state:?}");
        }
        s
    }

    /// I2: each block holds its last durable write (the base counts as durable) or a later
    /// write sent to it.
    fn check_durable(&self, observed: &[u64]) -> Vec<String> {
        let mut failures = Vec::new();
        for (b, &found) in observed.iter().enumerate() {
            let candidates: Vec<(u64, State)> = std::iter::once((self.base[b], State::Durable))
                .chain(self.since[b].iter().copied())
                .collect();
            let last_durable = candidates
                .iter()
                .rposition(|(_, s)| *s == State::Durable)
                .expect("the base is durable");
            let expected = candidates[last_durable].0;
            if candidates[last_durable..].iter().any(|(s, _)| *s == found) {
                continue;
            }
            let why = if found == 0 {
                "zeros: an acknowledged write was lost"
            } else if candidates.iter().any(|(s, _)| *s == found) {
                "an older write: an acknowledged write was lost"
            } else {
                "never written to this block"
            };
            failures.push(format!(
                "block {b}: expected seq >= {expected} (last acknowledged), found seq {found} \
                 ({why}); history: {}",
                self.history(b as u64)
            ));
        }
        failures
    }

    /// I1: p is the largest seq found; each block holds the last write to it at or before p. A
    /// write in flight when a server died may not have landed, so the write before it is also
    /// allowed then.
    fn check_prefix(&self, observed: &[u64]) -> (u64, Vec<String>) {
        let p = observed.iter().copied().max().unwrap_or(0);
        let mut failures = Vec::new();
        for (b, &found) in observed.iter().enumerate() {
            let candidates: Vec<(u64, State)> = std::iter::once((self.base[b], State::Durable))
                .chain(self.since[b].iter().copied().filter(|(s, _)| *s <= p))
                .collect();
            let mut allowed = Vec::new();
            for (seq, state) in candidates.iter().rev() {
                allowed.push(*seq);
                if *state != State::InFlight {
                    break;
                }
            }
            if !allowed.contains(&found) {
                failures.push(format!(
                    "block {b}: expected seq {} (its last write at or before p = {p}), found \
                     seq {found}; history: {}",
                    allowed
                        .iter()
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(" or "),
                    self.history(b as u64)
                ));
            }
        }
        (p, failures)
    }

    /// What was read back (and then flushed) is the starting point of the next round.
    fn rebase(&mut self, observed: &[u64]) {
        self.base.copy_from_slice(observed);
        for h in &mut self.since {
            h.clear();
        }
    }

    fn fail(&self, round: usize, what: &str, failures: &[String]) -> ! {
        panic!(
            "seed {seed} (rerun with BUCKETDISK_CRASH_SEED={seed}), round {round}: {what}: \
             {n} blocks wrong; the first ones:\n{}",
            failures
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n"),
            seed = self.seed,
            n = failures.len(),
        );
    }
}

/// Reads the region back, FLUSHes (so what was read is durable) and disconnects. Returns the
/// seq found in each block, or the blocks that hold neither zeros nor their own record.
fn read_region(server: &Server) -> Result<Vec<u64>, Vec<String>> {
    let mut client = NbdClient::connect(&server.endpoint, "")
        .unwrap_or_else(|e| panic!("connect the verifier: {e}\n{}", server.log_text()));
    let mut observed = Vec::with_capacity(REGION_BLOCKS as usize);
    let mut bad = Vec::new();
    let total = REGION_BLOCKS as usize * BLOCK;
    for offset in (0..total).step_by(READ_CHUNK) {
        let data = client
            .read(offset as u64, READ_CHUNK.min(total - offset))
            .unwrap_or_else(|e| panic!("verifier READ at {offset}: {e}"));
        for (i, block_data) in data.chunks(BLOCK).enumerate() {
            let block = (offset / BLOCK + i) as u64;
            match parse(block, block_data) {
                Ok(seq) => observed.push(seq),
                Err(e) => {
                    bad.push(format!("block {block}: {e}"));
                    observed.push(0);
                }
            }
        }
    }
    client
        .flush()
        .unwrap_or_else(|e| panic!("verifier FLUSH: {e}"));
    let _ = client.disconnect();
    if bad.is_empty() {
        Ok(observed)
    } else {
        Err(bad)
    }
}

// ---------------------------------------------------------------------------------------------
// Setup

fn seed() -> u64 {
    match std::env::var("BUCKETDISK_CRASH_SEED") {
        Ok(s) => s.parse().expect("BUCKETDISK_CRASH_SEED must be a number"),
        Err(_) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock");
            (now.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32)) | 1
        }
    }
}

fn server(sync_interval: &str) -> Server {
    let mut extra_args = vec!["--sync-interval".to_string(), sync_interval.to_string()];
    if let Ok(engine) = std::env::var("BUCKETDISK_TEST_ENGINE") {
        extra_args.extend(["--engine".to_string(), engine]);
    }
    Server::start_with(ServerOptions {
        size: "1G",
        extra_args,
        ..ServerOptions::default()
    })
}

fn spawn_writer(server: &Server, seed: u64, first_seq: u64) -> std::thread::JoinHandle<Session> {
    let endpoint = server.endpoint.clone();
    std::thread::spawn(move || run_writer(endpoint, seed, first_seq, Duration::from_secs(120)))
}

fn join_writer(model: &Model, round: usize, writer: std::thread::JoinHandle<Session>) -> Session {
    let session = writer.join().expect("writer thread panicked");
    if let Some(e) = &session.error_reply {
        panic!(
            "seed {seed} (rerun with BUCKETDISK_CRASH_SEED={seed}), round {round}: the server \
             answered a request with an error before it was killed: {e}",
            seed = model.seed
        );
    }
    session
}

fn count(session: &Session, state: State) -> usize {
    session.writes.iter().filter(|w| w.state == state).count()
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn kill9_loses_no_acknowledged_write() {
    let seed = seed();
    let rounds: usize = std::env::var("BUCKETDISK_CRASH_ROUNDS")
        .ok()
        .map(|r| r.parse().expect("BUCKETDISK_CRASH_ROUNDS must be a number"))
        .unwrap_or(20);
    println!("seed {seed}, {rounds} rounds");
    let test_start = Instant::now();
    let mut server = server("200ms");
    let mut model = Model::new(seed);
    let mut rng = Rng(seed);
    let mut durable_total = 0;
    for round in 0..rounds {
        let writer = spawn_writer(&server, rng.next(), model.next_seq);
        let kill_after = Duration::from_millis(10 + rng.below(391));
        std::thread::sleep(kill_after);
        server.kill();
        let session = join_writer(&model, round, writer);
        model.add(&session);
        durable_total += count(&session, State::Durable);

        server.spawn();
        let observed = read_region(&server)
            .unwrap_or_else(|bad| model.fail(round, "garbage after kill -9", &bad));
        let failures = model.check_durable(&observed);
        if !failures.is_empty() {
            model.fail(round, "acknowledged writes lost after kill -9", &failures);
        }
        let blocks_written = observed.iter().filter(|&&s| s != 0).count();
        println!(
            "round {round}: killed after {kill_after:?}: {} writes sent, {} durable, {} \
             answered, {} in flight ({}); verified, {blocks_written} blocks hold records",
            session.writes.len(),
            count(&session, State::Durable),
            count(&session, State::Answered),
            count(&session, State::InFlight),
            session.ended_by,
        );
        model.rebase(&observed);
    }
    assert!(
        rounds == 0 || durable_total > 0,
        "seed {seed}: in {rounds} rounds no write was ever acknowledged: the test proved nothing"
    );
    println!("{rounds} rounds in {:.1?}", test_start.elapsed());
}

#[test]
fn lost_cache_restart_is_a_prefix_of_acknowledged_writes() {
    let seed = seed();
    println!("seed {seed}");
    let test_start = Instant::now();
    let mut server = server("100ms");
    let mut model = Model::new(seed);
    let mut rng = Rng(seed ^ 0x10c4_1d15);
    for round in 0..3 {
        let first_seq = model.next_seq;
        let writer = spawn_writer(&server, rng.next(), first_seq);
        let run_for = Duration::from_millis(2000 + rng.below(1000));
        std::thread::sleep(run_for);
        server.kill();
        let killed_at = Instant::now();
        let session = join_writer(&model, round, writer);
        model.add(&session);

        std::fs::remove_dir_all(server.cache_dir()).unwrap_or_else(|e| {
            assert!(
                e.kind() == std::io::ErrorKind::NotFound,
                "delete the local directory: {e}"
            )
        });
        server.spawn();
        let observed = read_region(&server)
            .unwrap_or_else(|bad| model.fail(round, "garbage after losing the local disk", &bad));
        let (p, failures) = model.check_prefix(&observed);
        if !failures.is_empty() {
            model.fail(
                round,
                &format!("not a prefix of the write history (p = {p})"),
                &failures,
            );
        }
        // How far behind the store was: writes of this round answered after p, and how long
        // before the kill p was answered.
        let lost = session
            .writes
            .iter()
            .filter(|w| w.seq > p && w.state != State::InFlight)
            .count();
        let lag = session
            .writes
            .iter()
            .find(|w| w.seq == p)
            .and_then(|w| w.answered)
            .map(|t| format!("{:.0?}", killed_at - t))
            .unwrap_or_else(|| "n/a".into());
        println!(
            "round {round}: killed after {run_for:?}: {} writes sent (seqs {first_seq}..), {} \
             durable locally; the store alone held everything up to seq {p}: {lost} answered \
             writes lost, p answered {lag} before the kill",
            session.writes.len(),
            count(&session, State::Durable),
        );
        assert!(
            session.writes.len() > 100,
            "seed {seed}, round {round}: the writer managed only {} writes in {run_for:?} \
             ({})",
            session.writes.len(),
            session.ended_by
        );
        assert!(
            p > 0,
            "seed {seed}, round {round}: after {run_for:?} of writes with 100 ms uploads, the \
             store alone holds none of them"
        );
        model.rebase(&observed);
    }
    println!("3 rounds in {:.1?}", test_start.elapsed());
}

/// The checks themselves, on made-up histories: they must reject what the tests exist to catch.
#[test]
fn verifier_rejects_lost_misplaced_torn_and_out_of_order_writes() {
    // Records.
    assert_eq!(parse(7, &[0u8; BLOCK]), Ok(0));
    assert_eq!(parse(7, &record(7, 42)), Ok(42));
    assert!(parse(7, &record(8, 42)).unwrap_err().contains("misplaced"));
    let mut flipped = record(7, 42);
    flipped[1000] ^= 1;
    assert!(parse(7, &flipped).unwrap_err().contains("bad CRC"));
    let mut torn = record(7, 42);
    torn[BLOCK / 2..].copy_from_slice(&record(7, 43)[BLOCK / 2..]);
    assert!(parse(7, &torn).is_err(), "a torn record must not pass");

    let state = |pairs: &[(usize, u64)]| {
        let mut v = vec![0u64; REGION_BLOCKS as usize];
        for &(b, s) in pairs {
            v[b] = s;
        }
        v
    };

    // I2: block 0 got 1 (durable), 5 (answered), 9 (in flight); block 1 got 2 (answered).
    let mut m = Model::new(0);
    m.since[0] = vec![
        (1, State::Durable),
        (5, State::Answered),
        (9, State::InFlight),
    ];
    m.since[1] = vec![(2, State::Answered)];
    m.next_seq = 10;
    for found in [1, 5, 9] {
        assert!(m.check_durable(&state(&[(0, found)])).is_empty(), "{found}");
    }
    assert_eq!(
        m.check_durable(&state(&[])).len(),
        1,
        "durable write 1 lost"
    );
    assert_eq!(
        m.check_durable(&state(&[(0, 7)])).len(),
        1,
        "7 never written there"
    );
    assert_eq!(
        m.check_durable(&state(&[(0, 5), (2, 2)])).len(),
        1,
        "2 written to block 1"
    );
    // After a verified round, the base is durable: going back behind it is a loss.
    m.rebase(&state(&[(0, 5)]));
    assert_eq!(m.check_durable(&state(&[(0, 1)])).len(), 1);
    assert_eq!(m.check_durable(&state(&[])).len(), 1);

    // I1: writes 1 (block 0), 2 (block 1), 3 (block 0), all answered.
    let mut m = Model::new(0);
    m.since[0] = vec![(1, State::Answered), (3, State::Answered)];
    m.since[1] = vec![(2, State::Answered)];
    for ok in [
        state(&[]),
        state(&[(0, 1)]),
        state(&[(0, 1), (1, 2)]),
        state(&[(0, 3), (1, 2)]),
    ] {
        assert!(m.check_prefix(&ok).1.is_empty(), "{:?}", &ok[..2]);
    }
    let (p, failures) = m.check_prefix(&state(&[(0, 3)]));
    assert_eq!((p, failures.len()), (3, 1), "write 2 missing below p = 3");
    let (p, failures) = m.check_prefix(&state(&[(0, 1), (1, 2), (5, 0)]));
    assert_eq!((p, failures.len()), (2, 0));
    assert_eq!(
        m.check_prefix(&state(&[(1, 2)])).1.len(),
        1,
        "write 1 missing"
    );
    // A write in flight when the server died may be missing below p.
    m.since[1] = vec![(2, State::InFlight)];
    assert!(m.check_prefix(&state(&[(0, 3)])).1.is_empty());
}
