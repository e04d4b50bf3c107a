//! The cold boot after a fill: the store's block map must hold every block written, and a
//! server started on the same store with an empty cache directory must answer the first read
//! and pass fio's `--verify_only` replay of the fill over three sample regions.

use super::Ctx;
use super::fill::{BLOCK_BYTES, Plan, WRITE_BYTES, fio_args};
use super::fio_job::{self, Outcome};
use super::server::{self, LogProblems, ServeSpec, Server, Stopped, Store};
use crate::nbd_client::NbdClient;
use crate::process::check_interrupted;
use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

/// fio's verify header starts with this magic (u16, little-endian).
const FIO_HEADER_MAGIC: [u8; 2] = [0xca, 0xac];

/// One region read back by fio `--verify_only` after the cold boot.
#[derive(Debug, Clone, Serialize)]
pub struct Region {
    pub name: &'static str,
    pub offset: u64,
    pub bytes: u64,
    pub command: String,
    pub fio: Outcome,
}

/// The cold boot from the store after the fill.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ColdCheck {
    /// `bucketdisk info --json` after the clean stop.
    pub info: Option<serde_json::Value>,
    pub info_error: Option<String>,
    pub allocated_blocks: Option<u64>,
    pub expected_blocks: u64,
    pub server_command: String,
    /// Process start → the port accepted a connection, → the first 4 KiB read answered.
    pub listening_ms: Option<f64>,
    pub first_read_ms: Option<f64>,
    /// Block 0 starts with fio's verify header (a cheap check before fio runs).
    pub first_block_has_fio_header: Option<bool>,
    pub regions: Vec<Region>,
    pub stop: Stopped,
    pub log: LogProblems,
    /// Why the check stopped early, if it did.
    pub error: Option<String>,
}

impl ColdCheck {
    pub fn blocks_present(&self) -> bool {
        self.allocated_blocks == Some(self.expected_blocks)
    }

    pub fn regions_verified(&self) -> usize {
        self.regions.iter().filter(|r| r.fio.ok).count()
    }
}

/// After the clean stop: the store's map must hold every block; a server on an empty cache
/// must answer, and fio's verification must pass on three regions. Failures are results.
pub fn check(ctx: &Ctx, plan: &Plan, store: &Store, dir: &Path) -> ColdCheck {
    let mut check = ColdCheck {
        expected_blocks: plan.blocks(),
        ..ColdCheck::default()
    };
    match server::info(&ctx.bin, store, &dir.join("info-scratch")) {
        Ok(info) => {
            check.allocated_blocks = info
                .get("allocated_blocks")
                .and_then(serde_json::Value::as_u64);
            check.info = Some(info);
        }
        Err(e) => check.info_error = Some(format!("{e:#}")),
    }
    if let Err(e) = cold_boot(ctx, plan, store, dir, &mut check) {
        eprintln!("sustained: [{}] cold boot: {e:#}", plan.part);
        check.error = Some(format!("{e:#}"));
    }
    check
}

fn cold_boot(
    ctx: &Ctx,
    plan: &Plan,
    store: &Store,
    dir: &Path,
    check: &mut ColdCheck,
) -> Result<()> {
    let cache = dir.join("cold-cache");
    if cache.exists() {
        bail!(
            "the cold boot's cache directory {} is not empty",
            cache.display()
        );
    }
    let log = ctx.logs.join(format!("{}-cold-serve.log", plan.part));
    let spec = ServeSpec {
        bin: &ctx.bin,
        store,
        cache: &cache,
        size: plan.fill_bytes,
        extra: &[],
        log: &log,
    };
    let mut server = Server::spawn(&spec)?;
    check.server_command = server.command_line.clone();
    let stream = connect(&mut server)?;
    check.listening_ms = Some(server.spawned.elapsed().as_secs_f64() * 1000.0);
    let mut client = NbdClient::handshake(stream).context("NBD handshake")?;
    let block0 = client.read(0, WRITE_BYTES as u32)?;
    check.first_read_ms = Some(server.spawned.elapsed().as_secs_f64() * 1000.0);
    check.first_block_has_fio_header = Some(block0.starts_with(&FIO_HEADER_MAGIC));
    client.disconnect()?;
    for (name, offset, bytes) in regions(plan.fill_bytes, plan.verify_region_bytes) {
        check_interrupted()?;
        server.ensure_running()?;
        let args = fio_args(&server.uri(), offset, bytes, true, None);
        let fio = fio_job::Running::spawn(&args, dir, &format!("verify-{name}"))?.finish()?;
        eprintln!(
            "sustained: [{}] cold boot: verify {name} ({} MiB at {} MiB): {}",
            plan.part,
            bytes >> 20,
            offset >> 20,
            fio.verdict()
        );
        check.regions.push(Region {
            name,
            offset,
            bytes,
            command: fio_job::describe(&args),
            fio,
        });
    }
    check.stop = server.stop(Duration::from_secs(600))?;
    check.log = LogProblems::scan(&log);
    Ok(())
}

/// Connects as soon as the server listens (the clock runs from its spawn).
fn connect(server: &mut Server) -> Result<TcpStream> {
    loop {
        match TcpStream::connect(server.nbd) {
            Ok(s) => return Ok(s),
            Err(e) => {
                if server.spawned.elapsed() > Duration::from_secs(60) {
                    bail!("the cold server never listened on {}: {e}", server.nbd);
                }
                server.ensure_running()?;
                std::thread::sleep(Duration::from_micros(500));
            }
        }
    }
}

/// Start, middle and end of the filled range, each `region` bytes (less if the fill is small),
/// on block boundaries.
pub fn regions(fill: u64, region: u64) -> Vec<(&'static str, u64, u64)> {
    let region = region.min(fill / 3) / BLOCK_BYTES * BLOCK_BYTES;
    let region = region.max(BLOCK_BYTES).min(fill);
    let middle = (fill / 2).saturating_sub(region / 2) / BLOCK_BYTES * BLOCK_BYTES;
    let end = (fill - region) / BLOCK_BYTES * BLOCK_BYTES;
    vec![
        ("start", 0, region),
        ("middle", middle, region),
        ("end", end, region),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_cover_start_middle_end() {
        let g = 1u64 << 30;
        let r = regions(100 * g, 256 << 20);
        assert_eq!(r[0], ("start", 0, 256 << 20));
        assert_eq!(r[1].1 + r[1].2 / 2, 50 * g);
        assert_eq!(r[2].1 + r[2].2, 100 * g);
        // A small fill: regions shrink to a third of it, still whole blocks.
        let r = regions(3 << 20, 256 << 20);
        assert!(
            r.iter()
                .all(|(_, o, b)| o % BLOCK_BYTES == 0 && *b == 1 << 20)
        );
        assert_eq!(r[2].1 + r[2].2, 3 << 20);
    }
}
