//! Benchmark driver: `cargo run -p bench --release -- <suite> [options]`.
//!
//! Modules, one job each: `subjects` (bucketdisk and its peers, started and stopped),
//! `process` (child-process guards), `fio` (workloads, running fio, parsing its JSON), `stats`
//! (medians and ranges), `machine` (hardware and tool versions), `report` (markdown + JSON),
//! `volume` (the test volume), `synthetic` (volumes whose block map is built directly),
//! `nbd_client` (a minimal NBD client for timing), `store_watch` (counting store PUTs),
//! `fuse_loop` (an export as a loop device), `moto` (an S3 server), `latency_proxy` (added
//! store latency and request counts), `store_subjects` (the subjects of `quick`/`full`),
//! `compare_report` and `plots` (their results), `progress` (what is running), `store_ceiling` (what
//! the store itself serves), `server_metrics` (scraping a server's Prometheus endpoint) and `suites`
//! (one module per suite).

mod choose;
mod compare_report;
mod cpu_account;
mod fio;
mod fuse_loop;
mod latency_proxy;
mod machine;
mod moto;
mod nbd_client;
mod plots;
mod process;
mod progress;
mod report;
mod run_info;
mod server_metrics;
mod stats;
mod store_ceiling;
mod store_subjects;
mod store_watch;
mod subjects;
mod suites;
mod synthetic;
mod units;
mod volume;
mod workspace;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "bench", about = "Benchmarks bucketdisk against its peers")]
struct Cli {
    #[command(subcommand)]
    suite: Suite,
}

#[derive(Subcommand)]
enum Suite {
    /// fio 4k random and 1M sequential through the NBD engine: bucketdisk (local-file volume)
    /// vs qemu-nbd vs nbdkit on the same file.
    NbdLocal(suites::nbd_local::Args),
    /// The block map: cold open from object storage with injected latency, hydration, lookups,
    /// sustained updates; litestream restore as the peer.
    Blockmap(suites::blockmap::Args),
    /// The object-storage engine: cold boot at 20 ms store latency, warm fio against the
    /// local-file volume and qemu-nbd, cold reads from the store, sustained writes with
    /// uploads, store requests per GiB, peak memory.
    Engine(suites::engine::Args),
    /// bucketdisk (local store; S3 cold and warm) vs qemu-nbd, nbdkit file, s3backer and
    /// nbdkit S3 behind one latency proxy at 20 ms; seven fio workloads; ~5 minutes.
    Quick(suites::compare::Args),
    /// As `quick` at 0, 20 and 50 ms, 3 repeats, a 1 GiB region; under 30 minutes.
    Full(suites::compare::Args),
    /// Long loads: a sparse fill of a large volume on S3 (with and without a store stall),
    /// then a cold boot that checks every block; store space and write amplification under
    /// random overwrites; what garbage collection costs the foreground.
    Sustained(suites::sustained::Args),
    /// Reads with nothing cached on S3 (moto behind a latency proxy): a 1M sequential pass and
    /// 4k random reads of bucketdisk, nbdkit's S3 plugin and s3backer, against the store's own
    /// GET ceilings measured in the same run.
    Cold(suites::cold::Args),
    /// Start → first verified read of a 100 GiB disk with a fully written block map, empty
    /// cache, moto behind 20 ms, in four states (clean stop, killed during writes, after 1,000
    /// uploads, snapshot far behind), with s3backer in the same run.
    Boot(suites::boot::Args),
    /// 1M sequential writes ending in fsync over 4 GiB: every local subject, bucketdisk on
    /// moto (until uploaded, and with --durability remote) against moto's PUT ceiling.
    Writes(suites::writes::Args),
    /// Checkpoint create (served volume) and restore (stopped volume) of a 100 GiB disk with
    /// 1, 10 and 100 GiB written, moto behind 20 ms, and the first read after the restore.
    Lifecycle(suites::lifecycle::Args),
    /// fio verify with FLUSH through a server whose store requests fail (10 % injected faults
    /// and a 30 s outage by default), a read-back through the faults, then verify-only on a
    /// clean server: nothing acknowledged lost, no wrong bytes read, no hang, resumed by itself.
    Faults(suites::faults::Args),
    /// Rounds of writes with FLUSH, trims and zeroing, each ended by kill -9 of the server
    /// (some with the cache directory deleted, some with store faults); every flushed write
    /// and the prefix property checked after each (`scripts/crash-soak.sh`).
    CrashSoak(suites::crash_soak::Args),
    /// `bucketdisk verify` on moto: peak memory and time on a 100 GiB map, and `--deep`'s
    /// read rate against the store's GET ceiling measured in the same run.
    Verify(suites::verify::Args),
    /// Encrypted volumes against plain ones (object engine, local-directory store and moto):
    /// 1M writes until sealed and stored, and 1M reads with a cold cache.
    Encryption(suites::encryption::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    process::catch_interrupts();
    let command = format!(
        "cargo run -p bench --release -- {}",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    let result = match cli.suite {
        Suite::NbdLocal(args) => suites::nbd_local::run(args, command),
        Suite::Blockmap(args) => suites::blockmap::run(args, command),
        Suite::Engine(args) => suites::engine::run(args, command),
        Suite::Quick(args) => suites::compare::run(suites::compare::Profile::Quick, args, command),
        Suite::Full(args) => suites::compare::run(suites::compare::Profile::Full, args, command),
        Suite::Sustained(args) => suites::sustained::run(args, command),
        Suite::Cold(args) => suites::cold::run(args, command),
        Suite::Boot(args) => suites::boot::run(args, command),
        Suite::Writes(args) => suites::writes::run(args, command),
        Suite::Lifecycle(args) => suites::lifecycle::run(args, command),
        Suite::Faults(args) => suites::faults::run(args, command),
        Suite::CrashSoak(args) => suites::crash_soak::run(args, command),
        Suite::Verify(args) => suites::verify::run(args, command),
        Suite::Encryption(args) => suites::encryption::run(args, command),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
