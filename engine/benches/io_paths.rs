//! Local I/O paths for the block cache and the write journal: is io_uring worth it?
//!
//! For each of the engine's local I/O patterns, at 1 and 32 concurrent requests:
//!
//! - `inline`: `pread`/`pwrite`/`write`/`fdatasync` on the calling tokio worker;
//! - `engine today` (journal only; for the cache it is `inline`): appends up to 64 KiB inline,
//!   larger appends and every fdatasync through the blocking pool;
//! - `spawn_blocking`: the same calls through tokio's blocking pool (what the engine does for
//!   large I/O and for syncs today);
//! - `uring thread`: one io_uring driven by a dedicated thread; requests reach it through a
//!   channel (plus an eventfd wake-up only when the thread is asleep), completions come back
//!   through a tokio oneshot: how an async engine would actually use a ring;
//! - `uring batch`: a plain thread that owns a ring and submits 1 or 32 operations per
//!   `io_uring_enter`, waiting for all of them (no hand-off at all: the best io_uring can do).
//!
//! All but `uring batch` run as N client tasks on a multi-thread tokio runtime with 2 workers. At
//! N = 32 each client yields before every request (a request arriving), so latency includes the
//! time a request waits for a worker; at N = 1 the client loops tightly.
//!
//! Patterns: a 4 KiB `pread` at a random 4 KiB-aligned offset inside a random 64 KiB slot of a
//! 2 GiB cache file that is entirely in the page cache; a 64 KiB `pwrite` of a whole random slot;
//! appends of 4 KiB and of 1 MiB records to an `O_APPEND` journal file with `fdatasync` after
//! every 32nd append (the append latency excludes the sync, reported on its own).
//!
//! `cargo bench -p engine --bench io_paths`; results in bench/results/io-uring-2026-11-26.md.
//! `IO_PATHS_SECS` sets the measured seconds per cell (default 1.0), `IO_PATHS_ROUNDS` the number
//! of rounds (default 3; medians are reported), `IO_PATHS_CACHE_MIB` the cache file size (default
//! 2048). Without `--bench` (a test run) it does a short smoke pass.

use io_uring::{IoUring, opcode, squeue, types};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

const PAGE: u64 = 4 << 10;
const SLOT: u64 = 64 << 10;
const PAGES_PER_SLOT: u64 = SLOT / PAGE;
/// fdatasync after every this many journal appends.
const SYNC_EVERY: u64 = 32;
/// The journal file is cut back to empty once this large, right after a sync (the engine rotates
/// 64 MiB segments). This keeps a cell's memory to pages freed and reused at once: on this VM a
/// page the guest has not touched lately costs a host fault (~2 ms per fresh MiB), which would
/// otherwise charge whichever path ran first.
const JOURNAL_ROTATE_BYTES: u64 = 64 << 20;
const RING_ENTRIES: u32 = 64;
const WARMUP: Duration = Duration::from_millis(300);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pattern {
    CacheHit,
    CacheFill,
    Journal(usize),
}

impl Pattern {
    fn name(self) -> String {
        match self {
            Pattern::CacheHit => "cache hit, 4 KiB pread".into(),
            Pattern::CacheFill => "cache fill, 64 KiB pwrite".into(),
            Pattern::Journal(n) if n >= 1 << 20 => format!("journal, {} MiB append", n >> 20),
            Pattern::Journal(n) => format!("journal, {} KiB append", n >> 10),
        }
    }

    fn buf_len(self) -> usize {
        match self {
            Pattern::CacheHit => PAGE as usize,
            Pattern::CacheFill => SLOT as usize,
            Pattern::Journal(n) => n,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Inline,
    /// What the engine does today: small appends and cache I/O inline, appends over 64 KiB and
    /// every fdatasync through the blocking pool.
    Engine,
    Blocking,
    RingThread,
    RingBatch,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Inline => "inline",
            Mode::Engine => "engine today",
            Mode::Blocking => "spawn_blocking",
            Mode::RingThread => "uring thread",
            Mode::RingBatch => "uring batch",
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Io {
    Read(u64),
    Write(u64),
    Append,
    Sync,
}

/// splitmix64: a tiny, good-enough generator for offsets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// One cell's target: the file, the pattern and the clock.
struct Target {
    file: Arc<File>,
    pattern: Pattern,
    slots: u64,
    measure_from: Instant,
    end: Instant,
    appends: AtomicU64,
}

impl Target {
    fn pick(&self, rng: &mut Rng) -> Io {
        let slot = rng.next() % self.slots;
        match self.pattern {
            Pattern::CacheHit => Io::Read(slot * SLOT + (rng.next() % PAGES_PER_SLOT) * PAGE),
            Pattern::CacheFill => Io::Write(slot * SLOT),
            Pattern::Journal(_) => Io::Append,
        }
    }

    /// Counts one append; true when it is the one that must be followed by an fdatasync.
    fn sync_due(&self) -> bool {
        matches!(self.pattern, Pattern::Journal(_))
            && self.appends.fetch_add(1, Ordering::Relaxed) % SYNC_EVERY == SYNC_EVERY - 1
    }

    /// After a sync: rotate the journal if it is full (untimed, on the calling thread).
    fn maybe_rotate(&self) {
        let len = self.file.metadata().expect("journal stat").len();
        if len >= JOURNAL_ROTATE_BYTES {
            self.file.set_len(0).expect("journal rotate");
        }
    }
}

#[derive(Default)]
struct Samples {
    /// Latency of each measured operation, in nanoseconds.
    lat: Vec<u64>,
    /// Latency of each measured fdatasync, in nanoseconds.
    sync: Vec<u64>,
    /// Operations done, warm-up included (for CPU time per operation).
    all_ops: u64,
    /// io-wq worker threads alive at the end.
    io_wq: usize,
    last: Option<Instant>,
}

impl Samples {
    fn merge(&mut self, other: Samples) {
        self.lat.extend(other.lat);
        self.sync.extend(other.sync);
        self.all_ops += other.all_ops;
        self.io_wq = self.io_wq.max(other.io_wq);
        self.last = self.last.max(other.last);
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn exec(file: &File, io: Io, buf: &mut [u8]) {
    match io {
        Io::Read(at) => file.read_exact_at(buf, at),
        Io::Write(at) => file.write_all_at(buf, at),
        Io::Append => {
            let mut f = file;
            f.write_all(buf)
        }
        Io::Sync => file.sync_data(),
    }
    .unwrap_or_else(|e| panic!("{io:?}: {e}"));
}

fn sqe(io: Io, fd: RawFd, buf: &mut [u8]) -> squeue::Entry {
    let fd = types::Fd(fd);
    let len = u32::try_from(buf.len()).expect("buffer too large");
    match io {
        Io::Read(at) => opcode::Read::new(fd, buf.as_mut_ptr(), len)
            .offset(at)
            .build(),
        Io::Write(at) => opcode::Write::new(fd, buf.as_ptr(), len).offset(at).build(),
        // -1: the file position, as write(2) does; O_APPEND puts it at the end.
        Io::Append => opcode::Write::new(fd, buf.as_ptr(), len)
            .offset(u64::MAX)
            .build(),
        Io::Sync => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
    }
}

fn check(io: Io, res: i32, len: usize) {
    if res < 0 {
        panic!("{io:?}: {}", io::Error::from_raw_os_error(-res));
    }
    let want = if matches!(io, Io::Sync) { 0 } else { len };
    assert_eq!(res as usize, want, "{io:?}: short transfer");
}

fn new_ring() -> io::Result<IoUring> {
    IoUring::builder()
        .setup_coop_taskrun()
        .setup_single_issuer()
        .build(RING_ENTRIES)
        .or_else(|_| IoUring::new(RING_ENTRIES))
}

/// io_uring_enter, retried on EINTR.
fn enter(ring: &IoUring, want: usize) {
    loop {
        match ring.submit_and_wait(want) {
            Ok(_) => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("io_uring_enter: {e}"),
        }
    }
}

fn wake(efd: RawFd) {
    let one = 1u64;
    // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
    let n = unsafe { libc::write(efd, (&raw const one).cast(), 8) };
    assert_eq!(n, 8, "eventfd write: {}", io::Error::last_os_error());
}

struct Req {
    io: Io,
    fd: RawFd,
    buf: Vec<u8>,
    reply: oneshot::Sender<(i32, Vec<u8>)>,
}

/// A ring owned by a dedicated thread: requests come in through a channel, completions go back
/// through oneshots. The thread sleeps in io_uring_enter; a pending read on an eventfd wakes it,
/// and submitters write that eventfd only when the thread has said it is about to sleep.
struct RingThread {
    tx: Option<mpsc::Sender<Req>>,
    asleep: Arc<AtomicBool>,
    efd: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl RingThread {
    fn start() -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let efd = Arc::new(unsafe { OwnedFd::from_raw_fd(raw) });
        let asleep = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = {
            let asleep = Arc::clone(&asleep);
            let efd = Arc::clone(&efd);
            std::thread::Builder::new()
                .name("uring".into())
                .spawn(move || {
                    // Created here: a single-issuer ring belongs to the thread that made it.
                    let ring = match new_ring() {
                        Ok(ring) => {
                            let _ = ready_tx.send(Ok(()));
                            ring
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    ring_loop(ring, &rx, &asleep, efd.as_raw_fd());
                })?
        };
        ready_rx.recv().map_err(io::Error::other)??;
        Ok(RingThread {
            tx: Some(tx),
            asleep,
            efd,
            thread: Some(thread),
        })
    }

    async fn submit(&self, io: Io, fd: RawFd, buf: Vec<u8>) -> (i32, Vec<u8>) {
        let (reply, rx) = oneshot::channel();
        let req = Req { io, fd, buf, reply };
        let tx = self.tx.as_ref().expect("ring thread stopped");
        tx.send(req).expect("ring thread gone");
        if self.asleep.swap(false, Ordering::SeqCst) {
            wake(self.efd.as_raw_fd());
        }
        rx.await.expect("ring thread dropped a request")
    }
}

impl Drop for RingThread {
    fn drop(&mut self) {
        self.tx = None;
        wake(self.efd.as_raw_fd());
        if let Some(thread) = self.thread.take() {
            thread.join().expect("ring thread panicked");
        }
    }
}

fn enqueue(ring: &mut IoUring, slots: &mut Vec<Option<Req>>, free: &mut Vec<usize>, mut req: Req) {
    let idx = free.pop().unwrap_or_else(|| {
        slots.push(None);
        slots.len() - 1
    });
    let entry = sqe(req.io, req.fd, &mut req.buf).user_data(idx as u64);
    // The Vec's heap buffer stays put when `req` moves into its slot.
    slots[idx] = Some(req);
    // SAFETY: the buffer lives in `slots` until its completion is reaped.
    while unsafe { ring.submission().push(&entry) }.is_err() {
        enter(ring, 0);
    }
}

fn ring_loop(mut ring: IoUring, rx: &mpsc::Receiver<Req>, asleep: &AtomicBool, efd: RawFd) {
    const WAKE: u64 = u64::MAX;
    let mut counter = [0u8; 8];
    let mut slots: Vec<Option<Req>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut inflight = 0usize;
    let mut wake_armed = false;
    let mut closed = false;

    let mut done: Vec<(u64, i32)> = Vec::with_capacity(RING_ENTRIES as usize * 2);

    loop {
        if !wake_armed && !closed {
            let entry = opcode::Read::new(types::Fd(efd), counter.as_mut_ptr(), 8)
                .build()
                .user_data(WAKE);
            // SAFETY: `counter` outlives the read: the loop only ends once it has completed.
            while unsafe { ring.submission().push(&entry) }.is_err() {
                enter(&ring, 0);
            }
            wake_armed = true;
        }
        let mut got = 0usize;
        loop {
            match rx.try_recv() {
                Ok(req) => {
                    enqueue(&mut ring, &mut slots, &mut free, req);
                    inflight += 1;
                    got += 1;
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        if closed && inflight == 0 {
            if !wake_armed {
                return;
            }
            // Complete our own pending eventfd read: `counter` must outlive it.
            wake(efd);
        }
        if got == 0 {
            // About to sleep: say so, then look once more so that no request is stranded.
            asleep.store(true, Ordering::SeqCst);
            match rx.try_recv() {
                Ok(req) => {
                    enqueue(&mut ring, &mut slots, &mut free, req);
                    inflight += 1;
                    got = 1;
                }
                Err(mpsc::TryRecvError::Disconnected) => closed = true,
                Err(mpsc::TryRecvError::Empty) => {}
            }
        }
        enter(&ring, usize::from(got == 0));
        done.clear();
        done.extend(ring.completion().map(|c| (c.user_data(), c.result())));
        for &(user_data, res) in &done {
            if user_data == WAKE {
                wake_armed = false;
                continue;
            }
            let idx = user_data as usize;
            let req = slots[idx].take().expect("completion for an empty slot");
            free.push(idx);
            inflight -= 1;
            let _ = req.reply.send((res, req.buf));
        }
    }
}

async fn perform(
    mode: Mode,
    file: &Arc<File>,
    ring: Option<&RingThread>,
    io: Io,
    mut buf: Vec<u8>,
) -> Vec<u8> {
    match mode {
        Mode::Inline => {
            exec(file, io, &mut buf);
            buf
        }
        Mode::Engine if matches!(io, Io::Read(_) | Io::Write(_)) => {
            exec(file, io, &mut buf);
            buf
        }
        Mode::Engine if matches!(io, Io::Append) && buf.len() <= 64 << 10 => {
            exec(file, io, &mut buf);
            buf
        }
        Mode::Engine | Mode::Blocking => {
            let file = Arc::clone(file);
            tokio::task::spawn_blocking(move || {
                exec(&file, io, &mut buf);
                buf
            })
            .await
            .expect("blocking task panicked")
        }
        Mode::RingThread => {
            let len = buf.len();
            let ring = ring.expect("no ring thread");
            let (res, buf) = ring.submit(io, file.as_raw_fd(), buf).await;
            check(io, res, len);
            buf
        }
        Mode::RingBatch => unreachable!("uring batch runs on a plain thread"),
    }
}

async fn client(
    t: Arc<Target>,
    mode: Mode,
    ring: Option<Arc<RingThread>>,
    seed: u64,
    yield_first: bool,
) -> Samples {
    let mut buf = vec![0xa5u8; t.pattern.buf_len()];
    let mut rng = Rng(seed);
    let mut s = Samples::default();
    loop {
        let t0 = Instant::now();
        if t0 >= t.end {
            return s;
        }
        if yield_first {
            tokio::task::yield_now().await;
        }
        let io = t.pick(&mut rng);
        buf = perform(mode, &t.file, ring.as_deref(), io, buf).await;
        let t1 = Instant::now();
        s.all_ops += 1;
        let measured = t0 >= t.measure_from;
        if measured {
            s.lat.push(nanos(t1 - t0));
            s.last = Some(t1);
        }
        if t.sync_due() {
            buf = perform(mode, &t.file, ring.as_deref(), Io::Sync, buf).await;
            let t2 = Instant::now();
            if measured {
                s.sync.push(nanos(t2 - t1));
                s.last = Some(t2);
            }
            t.maybe_rotate();
        }
    }
}

fn run_async(t: Arc<Target>, mode: Mode, clients: usize) -> Samples {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let ring =
        (mode == Mode::RingThread).then(|| Arc::new(RingThread::start().expect("io_uring setup")));
    let samples = rt.block_on(async {
        let tasks: Vec<_> = (0..clients)
            .map(|i| {
                let t = Arc::clone(&t);
                let ring = ring.clone();
                tokio::spawn(client(t, mode, ring, 0x1234 + i as u64, clients > 1))
            })
            .collect();
        let mut all = Samples::default();
        for task in tasks {
            all.merge(task.await.expect("client panicked"));
        }
        all
    });
    let mut samples = samples;
    samples.io_wq = io_wq_threads();
    drop(ring);
    rt.shutdown_timeout(Duration::from_secs(10));
    samples
}

/// The calling thread owns a ring and submits `depth` operations per io_uring_enter, waiting
/// for all of them; every operation of a batch is charged the batch's time.
fn run_batch(t: &Target, depth: usize) -> Samples {
    let mut ring = new_ring().expect("io_uring setup");
    let len = t.pattern.buf_len();
    let mut bufs = vec![vec![0xa5u8; len]; depth];
    let mut ios = vec![Io::Sync; depth];
    let fd = t.file.as_raw_fd();
    let mut rng = Rng(0x1234);
    let mut s = Samples::default();
    let reap = |ring: &mut IoUring, ios: &[Io], want: usize| {
        let mut got = 0;
        while got < want {
            for c in ring.completion() {
                let io = ios[c.user_data() as usize];
                check(io, c.result(), len);
                got += 1;
            }
            if got < want {
                enter(ring, want - got);
            }
        }
    };
    loop {
        let t0 = Instant::now();
        if t0 >= t.end {
            s.io_wq = io_wq_threads();
            return s;
        }
        let mut sync = false;
        for (i, (io, buf)) in ios.iter_mut().zip(bufs.iter_mut()).enumerate() {
            *io = t.pick(&mut rng);
            sync |= t.sync_due();
            let entry = sqe(*io, fd, buf).user_data(i as u64);
            // SAFETY: the buffers live in `bufs` until the batch is reaped below.
            unsafe { ring.submission().push(&entry) }.expect("submission queue full");
        }
        enter(&ring, depth);
        reap(&mut ring, &ios, depth);
        let t1 = Instant::now();
        s.all_ops += depth as u64;
        let measured = t0 >= t.measure_from;
        if measured {
            s.lat.extend(std::iter::repeat_n(nanos(t1 - t0), depth));
            s.last = Some(t1);
        }
        if sync {
            ios[0] = Io::Sync;
            let entry = sqe(Io::Sync, fd, &mut bufs[0]).user_data(0);
            // SAFETY: an fsync has no buffer.
            unsafe { ring.submission().push(&entry) }.expect("submission queue full");
            enter(&ring, 1);
            reap(&mut ring, &ios[..1], 1);
            let t2 = Instant::now();
            if measured {
                s.sync.push(nanos(t2 - t1));
                s.last = Some(t2);
            }
            t.maybe_rotate();
        }
    }
}

/// io_uring's kernel worker threads (io-wq) in this process: operations the ring could not
/// complete inline were punted to them.
fn io_wq_threads() -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.starts_with("iou-wrk"))
        .count()
}

fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Fraction of the file's pages resident in the page cache (mincore).
fn resident(file: &File, len: u64) -> f64 {
    let len = len as usize;
    // SAFETY: a read-only shared mapping of a file we hold open, unmapped before returning;
    // mincore writes one byte per page into a vector of that size.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        if p == libc::MAP_FAILED {
            return f64::NAN;
        }
        let pages = len.div_ceil(PAGE as usize);
        let mut vec = vec![0u8; pages];
        let rc = libc::mincore(p, len, vec.as_mut_ptr());
        libc::munmap(p, len);
        if rc != 0 {
            return f64::NAN;
        }
        vec.iter().filter(|&&b| b & 1 == 1).count() as f64 / pages as f64
    }
}

fn fs_name(path: &Path) -> String {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: statfs fills the struct it is given from a NUL-terminated path.
    let kind = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        if libc::statfs(c.as_ptr(), &mut st) != 0 {
            return "unknown".into();
        }
        st.f_type
    };
    match kind {
        0xef53 => "ext4".into(),
        0x0102_1994 => "tmpfs".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683e => "btrfs".into(),
        0x794c_7630 => "overlayfs".into(),
        other => format!("0x{other:x}"),
    }
}

fn pct(sorted: &[u64], p: usize) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)] as f64
}

#[derive(Clone, Copy)]
struct Row {
    ops_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    sync_p50_ms: Option<f64>,
    cpu_us_per_op: f64,
    io_wq: usize,
}

fn run_cell(
    file: Arc<File>,
    pattern: Pattern,
    slots: u64,
    mode: Mode,
    clients: usize,
    secs: f64,
) -> Row {
    let start = Instant::now();
    let t = Arc::new(Target {
        file,
        pattern,
        slots,
        measure_from: start + WARMUP,
        end: start + WARMUP + Duration::from_secs_f64(secs),
        appends: AtomicU64::new(0),
    });
    let cpu0 = cpu_time();
    let mut s = if mode == Mode::RingBatch {
        // A thread of its own, so that its io-wq workers (per submitting thread) die with it.
        std::thread::scope(|scope| {
            scope
                .spawn(|| run_batch(&t, clients))
                .join()
                .expect("batch thread panicked")
        })
    } else {
        run_async(Arc::clone(&t), mode, clients)
    };
    let cpu = cpu_time() - cpu0;
    let elapsed = s
        .last
        .map_or(f64::NAN, |l| (l - t.measure_from).as_secs_f64());
    s.lat.sort_unstable();
    s.sync.sort_unstable();
    Row {
        ops_per_sec: s.lat.len() as f64 / elapsed,
        p50_us: pct(&s.lat, 50) / 1e3,
        p99_us: pct(&s.lat, 99) / 1e3,
        sync_p50_ms: (!s.sync.is_empty()).then(|| pct(&s.sync, 50) / 1e6),
        cpu_us_per_op: cpu.as_secs_f64() * 1e6 / s.all_ops.max(1) as f64,
        io_wq: s.io_wq,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn env_f64(name: &str) -> Option<f64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let secs = env_f64("IO_PATHS_SECS").unwrap_or(if bench { 1.0 } else { 0.02 });
    let rounds = env_f64("IO_PATHS_ROUNDS").unwrap_or(if bench { 3.0 } else { 1.0 }) as usize;
    let cache_mib = env_f64("IO_PATHS_CACHE_MIB").unwrap_or(if bench { 2048.0 } else { 16.0 });
    let cache_bytes = (cache_mib as u64) << 20;
    let slots = cache_bytes / SLOT;

    let tmp = Path::new("/tmp");
    let dir = tempfile::Builder::new()
        .prefix("io_paths")
        .tempdir_in(tmp)
        .expect("temp dir");
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "io_paths: kernel {}, /tmp on {}, {} CPUs, cache file {} MiB",
        kernel.trim(),
        fs_name(tmp),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cache_bytes >> 20,
    );
    println!(
        "{rounds} rounds (path order rotated each round) of {secs:.1} s per cell after {} ms \
         warm-up; fdatasync every {SYNC_EVERY} appends",
        WARMUP.as_millis(),
    );

    let uring = match IoUring::new(8) {
        Ok(_) => true,
        Err(e) => {
            println!(
                "io_uring_setup failed: {e} (errno {:?}); io_uring paths skipped",
                e.raw_os_error()
            );
            false
        }
    };

    // The cache file: sparse at 2 GiB, then every slot written and synced so that every read
    // is a page-cache hit on clean pages.
    let cache_path = dir.path().join("blocks.cache");
    let cache = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&cache_path)
        .expect("cache file");
    cache.set_len(cache_bytes).expect("set_len");
    let fill_start = Instant::now();
    let mut chunk = vec![0u8; 1 << 20];
    let mut rng = Rng(7);
    for (i, at) in (0..cache_bytes).step_by(chunk.len()).enumerate() {
        for (j, w) in chunk.chunks_exact_mut(8).enumerate() {
            if j % 512 == 0 {
                w.copy_from_slice(&rng.next().to_le_bytes());
            } else {
                w.copy_from_slice(&(i as u64).to_le_bytes());
            }
        }
        cache.write_all_at(&chunk, at).expect("fill cache");
    }
    cache.sync_data().expect("sync cache");
    println!(
        "cache file filled and synced in {:.1} s; resident in page cache: {:.1} %",
        fill_start.elapsed().as_secs_f64(),
        resident(&cache, cache_bytes) * 100.0
    );
    let cache = Arc::new(cache);

    let modes_for = |pattern: Pattern| -> Vec<Mode> {
        let mut modes = vec![Mode::Inline];
        if matches!(pattern, Pattern::Journal(_)) {
            modes.push(Mode::Engine);
        }
        modes.push(Mode::Blocking);
        if uring {
            modes.extend([Mode::RingThread, Mode::RingBatch]);
        }
        modes
    };
    let patterns = [
        Pattern::CacheHit,
        Pattern::CacheFill,
        Pattern::Journal(4 << 10),
        Pattern::Journal(1 << 20),
    ];
    let cells: Vec<(Pattern, usize)> = patterns
        .iter()
        .flat_map(|&p| [(p, 1usize), (p, 32)])
        .collect();
    // results[cell][mode] holds one Row per round.
    let mut results: Vec<Vec<Vec<Row>>> = cells
        .iter()
        .map(|&(p, _)| vec![Vec::new(); modes_for(p).len()])
        .collect();
    for round in 0..rounds {
        let run_start = Instant::now();
        for (c, &(pattern, clients)) in cells.iter().enumerate() {
            let modes = modes_for(pattern);
            for k in 0..modes.len() {
                let m = (k + round) % modes.len();
                let journal_path = dir.path().join("journal.log");
                let file = match pattern {
                    Pattern::Journal(_) => Arc::new(
                        OpenOptions::new()
                            .create_new(true)
                            .append(true)
                            .custom_flags(libc::O_CLOEXEC)
                            .open(&journal_path)
                            .expect("journal file"),
                    ),
                    _ => Arc::clone(&cache),
                };
                let row = run_cell(file, pattern, slots, modes[m], clients, secs);
                results[c][m].push(row);
                // Keep one cell's writeback out of the next cell's numbers.
                match pattern {
                    Pattern::Journal(_) => {
                        let _ = std::fs::remove_file(&journal_path);
                    }
                    _ => cache.sync_data().expect("sync cache"),
                }
            }
        }
        println!(
            "round {} done in {:.1} s",
            round + 1,
            run_start.elapsed().as_secs_f64()
        );
    }

    println!();
    println!(
        "Medians over rounds; ops/s range is min–max over rounds. Latency: request start to \
         completion (append latency excludes its fdatasync). CPU: whole process (user + system, \
         io-wq workers included) per operation, warm-up included."
    );
    println!();
    println!(
        "| pattern | QD | path | ops/s | ops/s range | vs inline | p50 µs | p99 µs | fdatasync p50 ms | CPU µs/op | io-wq threads |"
    );
    println!("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (c, &(pattern, clients)) in cells.iter().enumerate() {
        let inline_ops = median(results[c][0].iter().map(|r| r.ops_per_sec).collect());
        for (m, mode) in modes_for(pattern).iter().enumerate() {
            let rows = &results[c][m];
            let med = |f: &dyn Fn(&Row) -> f64| median(rows.iter().map(f).collect());
            let ops = med(&|r| r.ops_per_sec);
            let lo = rows
                .iter()
                .map(|r| r.ops_per_sec)
                .fold(f64::INFINITY, f64::min);
            let hi = rows.iter().map(|r| r.ops_per_sec).fold(0.0, f64::max);
            let sync = med(&|r| r.sync_p50_ms.unwrap_or(f64::NAN));
            let io_wq = rows.iter().map(|r| r.io_wq).max().unwrap_or(0);
            println!(
                "| {} | {} | {} | {:.0} | {:.0}–{:.0} | {:.2}× | {:.1} | {:.1} | {} | {:.2} | {} |",
                pattern.name(),
                clients,
                mode.name(),
                ops,
                lo,
                hi,
                ops / inline_ops,
                med(&|r| r.p50_us),
                med(&|r| r.p99_us),
                if sync.is_nan() {
                    String::new()
                } else {
                    format!("{sync:.2}")
                },
                med(&|r| r.cpu_us_per_op),
                if matches!(mode, Mode::RingThread | Mode::RingBatch) {
                    io_wq.to_string()
                } else {
                    String::new()
                },
            );
        }
    }
    println!();
    println!(
        "cache file resident in page cache at the end: {:.1} %",
        resident(&cache, cache_bytes) * 100.0
    );
}
