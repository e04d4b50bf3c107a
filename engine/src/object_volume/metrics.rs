//! The volume's metrics for the Prometheus endpoint: its counters and a snapshot of its stats
//! as [`DeviceMetric`]s (the protocol layer formats and labels them).

use super::{Shared, VolumeStats};
use crate::device::{DeviceMetric, MetricKind};
use std::sync::atomic::Ordering;

/// Every metric of the volume, from its live counters and `stats` (read just before).
pub(super) fn describe(shared: &Shared, stats: &VolumeStats) -> Vec<DeviceMetric> {
    let block_size = shared.meta.block_size as f64;
    let store = shared.store_counts.counts();
    let metric = |name, kind, help, value: f64| DeviceMetric {
        name,
        help,
        kind,
        value,
    };
    use MetricKind::{Counter, Gauge};
    let mut metrics = vec![
        metric(
            "bucketdisk_volume_size_bytes",
            Gauge,
            "Size of the virtual disk.",
            shared.size() as f64,
        ),
        metric(
            "bucketdisk_allocated_bytes",
            Gauge,
            "Bytes of blocks in use (stored in chunks), uncompressed.",
            stats.allocated_blocks as f64 * block_size,
        ),
        metric(
            "bucketdisk_stored_bytes",
            Gauge,
            "Bytes the blocks in use take in object storage (compressed).",
            stats.allocated_stored_bytes as f64,
        ),
        metric(
            "bucketdisk_chunks",
            Gauge,
            "Chunk objects the block map knows.",
            stats.chunks as f64,
        ),
        metric(
            "bucketdisk_map_txid",
            Gauge,
            "Latest block-map transaction ID.",
            stats.map_txid as f64,
        ),
        metric(
            "bucketdisk_journal_bytes",
            Gauge,
            "Bytes of records in the local journal.",
            stats.journal_bytes as f64,
        ),
        metric(
            "bucketdisk_dirty_bytes",
            Gauge,
            "Written bytes waiting for upload (writes wait beyond --journal-limit).",
            stats.dirty_bytes as f64,
        ),
        metric(
            "bucketdisk_upload_lag_records",
            Gauge,
            "Journal records written but not yet in object storage.",
            stats
                .journal_next_seq
                .saturating_sub(1)
                .saturating_sub(stats.uploaded_seq) as f64,
        ),
        metric(
            "bucketdisk_cached_bytes",
            Gauge,
            "Bytes of blocks in the local cache.",
            stats.cached_blocks as f64 * block_size,
        ),
        metric(
            "bucketdisk_cache_hits_total",
            Counter,
            "Block pieces of reads answered from the local cache.",
            shared.reads.counters.cache_hits.load(Ordering::Relaxed) as f64,
        ),
        metric(
            "bucketdisk_store_block_fetches_total",
            Counter,
            "Blocks fetched from object storage (cache misses, readahead, hydration).",
            shared.reads.counters.store_fetches.load(Ordering::Relaxed) as f64,
        ),
        metric(
            "bucketdisk_store_block_gets_total",
            Counter,
            "Ranged GETs of blocks (neighbouring blocks of one chunk come in one).",
            shared.reads.counters.store_gets.load(Ordering::Relaxed) as f64,
        ),
        metric(
            "bucketdisk_store_damaged_block_refetches_total",
            Counter,
            "Blocks fetched again because they arrived from the store damaged (bad checksum).",
            shared
                .reads
                .counters
                .damaged_refetches
                .load(Ordering::Relaxed) as f64,
        ),
        metric(
            "bucketdisk_store_retries_total",
            Counter,
            "Object-store requests tried again after a transient failure (whole process).",
            stores::retry::retried() as f64,
        ),
        metric(
            "bucketdisk_readahead_cancelled_blocks_total",
            Counter,
            "Blocks readahead planned and dropped because their reader moved elsewhere.",
            shared
                .reads
                .counters
                .readahead_cancelled
                .load(Ordering::Relaxed) as f64,
        ),
        metric(
            "bucketdisk_store_get_requests_total",
            Counter,
            "GET requests to object storage.",
            store.get_requests as f64,
        ),
        metric(
            "bucketdisk_store_put_requests_total",
            Counter,
            "PUT requests to object storage.",
            store.put_requests as f64,
        ),
        metric(
            "bucketdisk_store_list_requests_total",
            Counter,
            "LIST requests to object storage.",
            store.list_requests as f64,
        ),
        metric(
            "bucketdisk_store_delete_requests_total",
            Counter,
            "Objects deleted from object storage.",
            store.delete_requests as f64,
        ),
        metric(
            "bucketdisk_store_read_bytes_total",
            Counter,
            "Bytes received from object storage.",
            store.bytes_read as f64,
        ),
        metric(
            "bucketdisk_store_written_bytes_total",
            Counter,
            "Bytes sent to object storage.",
            store.bytes_written as f64,
        ),
        metric(
            "bucketdisk_uploads_total",
            Counter,
            "Uploads committed (chunks PUT, one block-map transaction each).",
            stats.uploads as f64,
        ),
        metric(
            "bucketdisk_upload_journal_bytes_total",
            Counter,
            "Written bytes the uploads stored (its rate is the upload throughput).",
            stats.uploaded_journal_bytes as f64,
        ),
        metric(
            "bucketdisk_upload_blocks_total",
            Counter,
            "Blocks the uploads stored (rewrites of a block between uploads count once).",
            stats.uploaded_blocks as f64,
        ),
        metric(
            "bucketdisk_upload_chunk_bytes_total",
            Counter,
            "Bytes of chunks the uploads PUT (compressed).",
            stats.uploaded_chunk_bytes as f64,
        ),
        metric(
            "bucketdisk_upload_lag_seconds",
            Gauge,
            "How long the oldest write not yet in object storage has waited.",
            shared.uploads.health.lag_millis.load(Ordering::Relaxed) as f64 / 1000.0,
        ),
        metric(
            "bucketdisk_upload_lag_allowed_seconds",
            Gauge,
            "How far the store may lag now (--max-upload-lag under overwrite-heavy load, else --sync-interval).",
            shared
                .uploads
                .health
                .allowed_lag_millis
                .load(Ordering::Relaxed) as f64
                / 1000.0,
        ),
        metric(
            "bucketdisk_write_wait_seconds_total",
            Counter,
            "Time writers spent waiting for room in the journal (back-pressure).",
            shared.uploads.health.wait_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        ),
        metric(
            "bucketdisk_write_waits_total",
            Counter,
            "Writes that waited for room in the journal.",
            shared.uploads.health.waits.load(Ordering::Relaxed) as f64,
        ),
        metric(
            "bucketdisk_chunk_bytes",
            Gauge,
            "Bytes of all chunks in object storage, dead ones awaiting deletion included.",
            stats.chunk_bytes as f64,
        ),
        metric(
            "bucketdisk_chunks_rewritten_total",
            Counter,
            "Sparse chunks whose live blocks garbage collection moved.",
            stats.chunks_rewritten as f64,
        ),
        metric(
            "bucketdisk_chunks_deleted_total",
            Counter,
            "Dead chunks garbage collection deleted.",
            stats.chunks_deleted as f64,
        ),
    ];
    if shared.config.hydrate {
        let total = shared.size().div_ceil(shared.meta.block_size as u64);
        let scanned = shared
            .reads
            .counters
            .hydration_scanned
            .load(Ordering::Relaxed);
        metrics.push(metric(
            "bucketdisk_hydration_progress_ratio",
            Gauge,
            "Fraction of the disk --hydrate has pulled into the cache (1: done).",
            scanned as f64 / total.max(1) as f64,
        ));
    }
    metrics
}
