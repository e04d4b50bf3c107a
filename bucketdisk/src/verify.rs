//! `bucketdisk verify`: checks a volume against the store and says what is damaged.

use crate::key_args::KeyArgs;
use crate::store_args::{StoreArgs, file_engine, new_runtime, object_store};
use anyhow::{Context, Result, bail};
use bucketdisk::units::format_size;
use clap::Args;
use engine::object_volume::{StateReport, VerifyOptions, VerifyReport};

/// Damaged blocks printed per state in the human report (`--json` lists up to 10,000).
const SHOWN: usize = 20;

#[derive(Args)]
pub(crate) struct VerifyArgs {
    /// The volume to check.
    pub(crate) volume: String,
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// (Needed by --deep on an encrypted volume, which opens every block.)
    #[command(flatten)]
    pub(crate) key: KeyArgs,
    /// Check every checkpoint's state too, not only the latest.
    #[arg(long)]
    pub(crate) checkpoints: bool,
    /// Read every referenced block back from the store and check its CRC (otherwise the map and
    /// the chunks' presence and sizes are checked).
    #[arg(long)]
    pub(crate) deep: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn verify(args: VerifyArgs) -> Result<()> {
    engine::validate_volume_name(&args.volume)?;
    if file_engine(&args.store) {
        bail!("verify needs the object engine (--engine object)");
    }
    let location = object_store(&args.store)?;
    let options = VerifyOptions {
        deep: args.deep,
        checkpoints: args.checkpoints,
        key: args.key.key()?,
    };
    let bar = crate::progress::bar(if args.deep {
        "reading chunks"
    } else {
        "checking chunks"
    });
    let report = new_runtime()?
        .block_on(engine::object_volume::verify(
            location.store,
            &location.prefix,
            location.layout,
            &args.volume,
            options,
            |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            },
        ))
        .with_context(|| format!("verifying volume {}", args.volume))?;
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    if report.is_damaged() {
        let lost: u64 = report.states.iter().map(|s| s.damaged_total).sum();
        let map: usize = report.states.iter().map(|s| s.map_problems.len()).sum();
        bail!(
            "volume {} is damaged: {lost} block(s) lost or damaged, {map} block map problem(s)",
            report.volume
        );
    }
    Ok(())
}

fn print_report(report: &VerifyReport) {
    let how = if report.deep {
        "map, chunks and every block's CRC"
    } else {
        "map and chunks (--deep also reads every block)"
    };
    println!("volume {}: checked {how}", report.volume);
    for state in &report.states {
        print_state(state);
    }
    if report.orphaned_chunks.is_empty() {
        println!("orphaned chunks: none");
    } else {
        println!(
            "orphaned chunks: {} ({}; garbage collection deletes them)",
            report.orphaned_chunks.len(),
            format_size(report.orphaned_bytes)
        );
        for orphan in report.orphaned_chunks.iter().take(SHOWN) {
            println!("  {} ({} bytes)", orphan.chunk, orphan.bytes);
        }
    }
}

fn print_state(state: &StateReport) {
    let verdict = if state.is_damaged() { "DAMAGED" } else { "ok" };
    let read = if state.blocks_read > 0 {
        format!(", {} read back", state.blocks_read)
    } else {
        String::new()
    };
    println!(
        "{} (map TXID {}): {verdict} — {} in {}{read}",
        state.state,
        state.txid,
        counted(state.blocks, "block"),
        counted(state.chunks, "chunk")
    );
    for problem in &state.map_problems {
        println!("  block map: {problem}");
    }
    for chunk in &state.missing_chunks {
        println!("  missing chunk {chunk}");
    }
    for block in state.damaged_blocks.iter().take(SHOWN) {
        println!(
            "  block at byte {} (chunk {}): {}",
            block.offset, block.chunk, block.problem
        );
    }
    if state.damaged_total > SHOWN as u64 {
        println!(
            "  … {} more damaged blocks (--json lists them)",
            state.damaged_total - SHOWN as u64
        );
    }
}

/// `1 block`, `2 blocks`.
fn counted(n: u64, what: &str) -> String {
    match n {
        1 => format!("1 {what}"),
        n => format!("{n} {what}s"),
    }
}
