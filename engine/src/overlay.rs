//! Journaled writes that are not in object storage yet, by block, so reads see them at once and
//! the uploader knows what to pack. Whole-block zeroing is kept as ranges, so trimming a whole
//! 100 GiB disk is one entry, not 1.6 million.
//!
//! Every change carries its journal sequence number. A block's content is: zeros if the newest
//! zero range covering it is newer than all of its edits' base, else the stored base; then the
//! block's own edits newer than that range, in order. Once the uploader has stored everything
//! up to seq S in the block map, [`Overlay::drop_through`] forgets it.

use crate::journal::JournalData;
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};
use std::io;

/// Where an edit's bytes are: in memory, or in the journal (read back when needed, so that a
/// large backlog of unuploaded writes costs disk, not memory).
#[derive(Debug, Clone)]
pub enum Payload {
    Memory(Bytes),
    Journal(JournalData),
}

impl Payload {
    fn copy_to(&self, out: &mut [u8]) -> io::Result<()> {
        match self {
            Payload::Memory(bytes) => {
                out.copy_from_slice(&bytes[..out.len()]);
                Ok(())
            }
            Payload::Journal(data) => data.read(out),
        }
    }

    fn skip(&self, n: usize) -> Payload {
        match self {
            Payload::Memory(bytes) => Payload::Memory(bytes.slice(n..)),
            Payload::Journal(data) => Payload::Journal(data.skip(n as u64)),
        }
    }
}

#[derive(Debug, Clone)]
enum Edit {
    Data {
        seq: u64,
        at: u32,
        len: u32,
        payload: Payload,
    },
    Zero {
        seq: u64,
        at: u32,
        len: u32,
    },
}

impl Edit {
    fn seq(&self) -> u64 {
        match self {
            Edit::Data { seq, .. } | Edit::Zero { seq, .. } => *seq,
        }
    }

    fn covers_whole(&self, block_size: u32) -> bool {
        match self {
            Edit::Data { at, len, .. } => *at == 0 && *len == block_size,
            Edit::Zero { at, len, .. } => *at == 0 && *len == block_size,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ZeroRange {
    first: u64,
    end: u64,
    seq: u64,
}

pub struct Overlay {
    block_size: u32,
    blocks: BTreeMap<u64, Vec<Edit>>,
    zeros: Vec<ZeroRange>,
    /// Every block with edits, keyed by the seq of its oldest edit: the blocks an upload
    /// through seq `p` must store are exactly the entries up to `p`, so an upload step can be
    /// bounded by counting entries instead of scanning the whole overlay.
    by_first_seq: BTreeSet<(u64, u64)>,
    /// Bytes of data edits held (superseded ones included: they are still in the journal).
    data_bytes: u64,
}

/// What the uploader must store for everything up to a sequence number.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PendingWork {
    /// Blocks with edits to materialise and pack.
    pub blocks: Vec<u64>,
    /// Whole-block ranges `[first, end)` whose map rows must be deleted.
    pub zero_ranges: Vec<(u64, u64)>,
}

impl Overlay {
    pub fn new(block_size: u32) -> Self {
        Overlay {
            block_size,
            blocks: BTreeMap::new(),
            zeros: Vec::new(),
            by_first_seq: BTreeSet::new(),
            data_bytes: 0,
        }
    }

    /// Records a write of `data` at byte `offset`.
    pub fn write(&mut self, seq: u64, offset: u64, data: Bytes) {
        let len = data.len() as u64;
        self.write_payload(seq, offset, len, Payload::Memory(data));
    }

    /// Records a write of `len` bytes at `offset` whose data is in the journal.
    pub fn write_journaled(&mut self, seq: u64, offset: u64, len: u64, data: JournalData) {
        self.write_payload(seq, offset, len, Payload::Journal(data));
    }

    fn write_payload(&mut self, seq: u64, offset: u64, len: u64, payload: Payload) {
        let bs = u64::from(self.block_size);
        let mut pos = 0u64;
        while pos < len {
            let abs = offset + pos;
            let (block, at) = (abs / bs, abs % bs);
            let n = (bs - at).min(len - pos);
            self.push(
                block,
                Edit::Data {
                    seq,
                    at: at as u32,
                    len: n as u32,
                    payload: payload.skip(pos as usize),
                },
            );
            pos += n;
        }
    }

    /// Records that `[offset, offset+length)` reads as zeros.
    pub fn zero(&mut self, seq: u64, offset: u64, length: u64) {
        let bs = u64::from(self.block_size);
        let end = offset + length;
        let first_whole = offset.div_ceil(bs);
        let end_whole = end / bs;
        if first_whole < end_whole {
            // Edits inside the range stay until they are uploaded: an upload that stops before
            // this range's seq must still store them (prefix consistency, I1).
            self.zeros.push(ZeroRange {
                first: first_whole,
                end: end_whole,
                seq,
            });
        }
        let mut partial = |from: u64, to: u64| {
            if from < to {
                let block = from / bs;
                let at = (from % bs) as u32;
                self.push(
                    block,
                    Edit::Zero {
                        seq,
                        at,
                        len: (to - from) as u32,
                    },
                );
            }
        };
        if first_whole >= end_whole {
            // Within one block, or spanning a boundary without a whole block.
            let split = (offset / bs + 1) * bs;
            partial(offset, end.min(split));
            partial(split.max(offset), end);
        } else {
            partial(offset, first_whole * bs);
            partial(end_whole * bs, end);
        }
    }

    /// Edits arrive in seq order (the caller appends to the journal and to the overlay under
    /// one lock), so each block's list is sorted by seq. Superseded edits are kept until they
    /// are uploaded, for the same reason as in [`Overlay::zero`].
    fn push(&mut self, block: u64, edit: Edit) {
        if let Edit::Data { len, .. } = &edit {
            self.data_bytes += u64::from(*len);
        }
        let edits = self.blocks.entry(block).or_default();
        if edits.is_empty() {
            self.by_first_seq.insert((edit.seq(), block));
        }
        edits.push(edit);
    }

    /// Newest zero range covering `block` with seq ≤ `through`.
    fn zeroed_at(&self, block: u64, through: u64) -> Option<u64> {
        self.zeros
            .iter()
            .filter(|z| z.first <= block && block < z.end && z.seq <= through)
            .map(|z| z.seq)
            .max()
    }

    /// Whether the overlay knows anything about `block`.
    pub fn touches(&self, block: u64) -> bool {
        self.blocks.contains_key(&block) || self.zeroed_at(block, u64::MAX).is_some()
    }

    /// How to build the block as of `through`: `None` if untouched, else whether to start from
    /// zeros (`true`) or from the stored base, and the edits to apply on top, in order.
    fn plan(&self, block: u64, through: u64) -> Option<(bool, Vec<&Edit>)> {
        let zero_seq = self.zeroed_at(block, through);
        let edits: Vec<&Edit> = self
            .blocks
            .get(&block)
            .map(|e| {
                e.iter()
                    .filter(|e| e.seq() <= through && zero_seq.is_none_or(|z| e.seq() > z))
                    .collect()
            })
            .unwrap_or_default();
        if zero_seq.is_none() && edits.is_empty() {
            return None;
        }
        match edits.iter().rposition(|e| e.covers_whole(self.block_size)) {
            Some(last_whole) => Some((true, edits[last_whole..].to_vec())),
            None => Some((zero_seq.is_some(), edits)),
        }
    }

    /// What the overlay says about a block now: `None` if untouched, `Some(false)` if it reads
    /// as zeros without any data, `Some(true)` if it has data.
    pub fn state(&self, block: u64) -> Option<bool> {
        self.plan(block, u64::MAX).map(|(from_zeros, edits)| {
            !from_zeros || edits.iter().any(|e| matches!(e, Edit::Data { .. }))
        })
    }

    /// Whether building the block as of `through` needs its stored content.
    pub fn needs_base(&self, block: u64, through: u64) -> bool {
        matches!(self.plan(block, through), Some((false, _)))
    }

    /// The block's current content, or `None` if the overlay never touched it. `base` supplies
    /// the stored content and is called only when edits do not cover the whole block.
    pub fn materialize(
        &self,
        block: u64,
        base: impl FnOnce() -> io::Result<Vec<u8>>,
    ) -> io::Result<Option<Vec<u8>>> {
        self.materialize_through(block, u64::MAX, base)
    }

    /// The block's content as of journal position `through` (changes with a larger seq are
    /// left out), so an upload stores exactly a prefix of the write history.
    pub fn materialize_through(
        &self,
        block: u64,
        through: u64,
        base: impl FnOnce() -> io::Result<Vec<u8>>,
    ) -> io::Result<Option<Vec<u8>>> {
        let Some((from_zeros, edits)) = self.plan(block, through) else {
            return Ok(None);
        };
        let mut data = if from_zeros {
            vec![0u8; self.block_size as usize]
        } else {
            base()?
        };
        for edit in edits {
            match edit {
                Edit::Data {
                    at, len, payload, ..
                } => payload.copy_to(&mut data[*at as usize..(*at + *len) as usize])?,
                Edit::Zero { at, len, .. } => data[*at as usize..(*at + *len) as usize].fill(0),
            }
        }
        Ok(Some(data))
    }

    /// Everything recorded with seq ≤ `through`, for one upload; blocks in ascending order.
    pub fn pending_through(&self, through: u64) -> PendingWork {
        let mut blocks: Vec<u64> = self
            .by_first_seq
            .iter()
            .take_while(|&&(seq, _)| seq <= through)
            .map(|&(_, block)| block)
            .collect();
        blocks.sort_unstable();
        PendingWork {
            blocks,
            zero_ranges: self
                .zeros
                .iter()
                .filter(|z| z.seq <= through)
                .map(|z| (z.first, z.end))
                .collect(),
        }
    }

    /// How far one bounded upload step may go: the largest seq ≤ `through` such that at most
    /// `max_blocks` blocks have edits up to it. Every edit of those blocks up to that seq is
    /// folded into one stored version per block. A single change touching more blocks than
    /// that (one large write) still makes a step of its own, so a step always makes progress.
    /// Whole-block zero ranges do not count: they are map deletions, not stored data.
    pub fn step_end(&self, through: u64, max_blocks: usize) -> u64 {
        let Some(&(first, _)) = self.by_first_seq.first() else {
            return through;
        };
        match self.by_first_seq.iter().nth(max_blocks) {
            Some(&(seq, _)) if seq <= through => seq.saturating_sub(1).max(first).min(through),
            _ => through,
        }
    }

    /// Forgets what is now stored (seq ≤ `through`).
    pub fn drop_through(&mut self, through: u64) {
        self.zeros.retain(|z| z.seq > through);
        let stored: Vec<(u64, u64)> = self
            .by_first_seq
            .iter()
            .take_while(|&&(seq, _)| seq <= through)
            .copied()
            .collect();
        for key in stored {
            self.by_first_seq.remove(&key);
            let block = key.1;
            let Some(edits) = self.blocks.get_mut(&block) else {
                continue;
            };
            let keep_from = edits.partition_point(|e| e.seq() <= through);
            for e in edits.drain(..keep_from) {
                if let Edit::Data { len, .. } = e {
                    self.data_bytes -= u64::from(len);
                }
            }
            match edits.first() {
                Some(next) => {
                    self.by_first_seq.insert((next.seq(), block));
                }
                None => {
                    self.blocks.remove(&block);
                }
            }
        }
    }

    /// Blocks with edits waiting for upload.
    #[cfg(test)]
    pub fn dirty_blocks(&self) -> usize {
        self.by_first_seq.len()
    }

    /// Bytes of data held (for back-pressure).
    pub fn data_bytes(&self) -> usize {
        self.data_bytes as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BS: u32 = 512;

    #[derive(Debug, Clone)]
    enum Op {
        Write(u64, Vec<u8>),
        Zero(u64, u64),
        Upload,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..8000, prop::collection::vec(any::<u8>(), 1..1500)).prop_map(|(o, d)| Op::Write(o, d)),
            2 => (0u64..8000, 1u64..3000).prop_map(|(o, l)| Op::Zero(o, l)),
            1 => Just(Op::Upload),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        /// The overlay over a "stored" image always reads like a plain byte array that received
        /// the same operations; uploading (store what is pending, drop it) changes nothing.
        #[test]
        fn reads_match_a_flat_model(ops in prop::collection::vec(op(), 1..40)) {
            let size = 12_000usize;
            let mut model = vec![0xAAu8; size];
            let mut stored = model.clone();
            let mut overlay = Overlay::new(BS);
            let mut seq = 0u64;
            for op in ops {
                seq += 1;
                match &op {
                    Op::Write(..) | Op::Zero(..) => apply(&op, seq, &mut model, &mut overlay),
                    Op::Upload => {
                        let work = overlay.pending_through(seq);
                        for (first, end) in &work.zero_ranges {
                            for b in *first..*end {
                                let s = (b as usize * BS as usize).min(size);
                                let e = ((b + 1) as usize * BS as usize).min(size);
                                stored[s..e].fill(0);
                            }
                        }
                        for b in &work.blocks {
                            let s = *b as usize * BS as usize;
                            let e = (s + BS as usize).min(size);
                            let mut base = vec![0u8; BS as usize];
                            base[..e - s].copy_from_slice(&stored[s..e]);
                            let data = overlay.materialize(*b, || Ok(base)).expect("materialize").expect("dirty");
                            stored[s..e].copy_from_slice(&data[..e - s]);
                        }
                        overlay.drop_through(seq);
                    }
                }
            }
            for b in 0..(size as u64).div_ceil(u64::from(BS)) {
                let s = b as usize * BS as usize;
                let e = (s + BS as usize).min(size);
                let mut base = vec![0u8; BS as usize];
                base[..e - s].copy_from_slice(&stored[s..e]);
                let got = overlay.materialize(b, || Ok(base.clone())).expect("read").unwrap_or(base);
                prop_assert_eq!(&got[..e - s], &model[s..e], "block {}", b);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        /// Uploading through any earlier seq stores exactly the image as of that seq (a prefix
        /// of the history, invariant I1), and after dropping it reads still show the latest data.
        #[test]
        fn uploads_through_a_seq_store_that_prefix(
            ops in prop::collection::vec(op(), 1..40),
            cut in 0usize..40,
        ) {
            let size = 12_000usize;
            let mut model = vec![0xAAu8; size];
            let mut history = vec![model.clone()];
            let mut overlay = Overlay::new(BS);
            let mut seq = 0u64;
            for op in ops {
                seq += 1;
                match &op {
                    Op::Write(..) | Op::Zero(..) => apply(&op, seq, &mut model, &mut overlay),
                    Op::Upload => {}
                }
                history.push(model.clone());
            }
            let through = (cut as u64).min(seq);
            let mut stored = history[0].clone();
            let work = overlay.pending_through(through);
            for (first, end) in &work.zero_ranges {
                for b in *first..*end {
                    let s = (b as usize * BS as usize).min(size);
                    let e = ((b + 1) as usize * BS as usize).min(size);
                    stored[s..e].fill(0);
                }
            }
            let before_blocks = stored.clone();
            for b in &work.blocks {
                let s = *b as usize * BS as usize;
                let e = (s + BS as usize).min(size);
                let mut base = vec![0u8; BS as usize];
                base[..e - s].copy_from_slice(&before_blocks[s..e]);
                prop_assert_eq!(overlay.needs_base(*b, through), overlay.materialize_through(*b, through, unreachable_base).is_err());
                if let Some(data) = overlay.materialize_through(*b, through, || Ok(base)).expect("materialize") {
                    stored[s..e].copy_from_slice(&data[..e - s]);
                }
            }
            prop_assert_eq!(&stored, &history[through as usize], "stored image as of seq {}", through);
            overlay.drop_through(through);
            for b in 0..(size as u64).div_ceil(u64::from(BS)) {
                let s = b as usize * BS as usize;
                let e = (s + BS as usize).min(size);
                let mut base = vec![0u8; BS as usize];
                base[..e - s].copy_from_slice(&stored[s..e]);
                let got = overlay.materialize(b, || Ok(base.clone())).expect("read").unwrap_or(base);
                prop_assert_eq!(&got[..e - s], &model[s..e], "block {}", b);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        /// Bounded steps: each step stores at most `max` blocks (unless one change alone
        /// touches more), always makes progress, and steps taken one after another store the
        /// same image as one upload of everything. The index and byte count stay exact.
        #[test]
        fn bounded_steps_store_the_same_prefix(
            ops in prop::collection::vec(op(), 1..60),
            max in 1usize..6,
        ) {
            let size = 12_000usize;
            let mut model = vec![0xAAu8; size];
            let mut stored = model.clone();
            let mut overlay = Overlay::new(BS);
            let mut seq = 0u64;
            let mut uploaded = 0u64;
            for op in ops {
                seq += 1;
                match &op {
                    Op::Write(..) | Op::Zero(..) => apply(&op, seq, &mut model, &mut overlay),
                    Op::Upload => {
                        while uploaded < seq {
                            let end = overlay.step_end(seq, max);
                            prop_assert!(end > uploaded, "a step makes progress");
                            let work = overlay.pending_through(end);
                            if work.blocks.len() > max {
                                // Only when the step's first change alone spans more blocks.
                                let first = overlay.by_first_seq.first().map(|k| k.0);
                                prop_assert_eq!(Some(end), first);
                            }
                            store(&overlay, &work, end, &mut stored, size);
                            overlay.drop_through(end);
                            uploaded = end;
                        }
                    }
                }
                let bytes: u64 = overlay.blocks.values().flatten().map(|e| match e {
                    Edit::Data { len, .. } => u64::from(*len),
                    Edit::Zero { .. } => 0,
                }).sum();
                prop_assert_eq!(bytes, overlay.data_bytes);
                let index: BTreeSet<(u64, u64)> = overlay.blocks.iter().map(|(b, e)| (e[0].seq(), *b)).collect();
                prop_assert_eq!(&index, &overlay.by_first_seq);
            }
            for b in 0..(size as u64).div_ceil(u64::from(BS)) {
                let s = b as usize * BS as usize;
                let e = (s + BS as usize).min(size);
                let mut base = vec![0u8; BS as usize];
                base[..e - s].copy_from_slice(&stored[s..e]);
                let got = overlay.materialize(b, || Ok(base.clone())).expect("read").unwrap_or(base);
                prop_assert_eq!(&got[..e - s], &model[s..e], "block {}", b);
            }
        }
    }

    /// Applies one upload of `work` (as of `through`) to a flat image of the store.
    fn store(overlay: &Overlay, work: &PendingWork, through: u64, stored: &mut [u8], size: usize) {
        for (first, end) in &work.zero_ranges {
            for b in *first..*end {
                let s = (b as usize * BS as usize).min(size);
                let e = ((b + 1) as usize * BS as usize).min(size);
                stored[s..e].fill(0);
            }
        }
        let before = stored.to_vec();
        for b in &work.blocks {
            let s = *b as usize * BS as usize;
            let e = (s + BS as usize).min(size);
            let mut base = vec![0u8; BS as usize];
            base[..e - s].copy_from_slice(&before[s..e]);
            if let Some(data) = overlay
                .materialize_through(*b, through, || Ok(base))
                .expect("materialize")
            {
                stored[s..e].copy_from_slice(&data[..e - s]);
            }
        }
    }

    #[test]
    fn a_step_folds_rewrites_and_stops_at_the_block_bound() {
        let mut o = Overlay::new(BS);
        // Blocks 0..4 rewritten ten times, then blocks 10..20 once each.
        let mut seq = 0;
        for _ in 0..10 {
            for b in 0..4u64 {
                seq += 1;
                o.write(seq, b * u64::from(BS), Bytes::from(vec![seq as u8; 16]));
            }
        }
        let hot_end = seq;
        for b in 10..20u64 {
            seq += 1;
            o.write(seq, b * u64::from(BS), Bytes::from(vec![1u8; 16]));
        }
        // Four blocks fit: the step covers all forty rewrites of the hot blocks.
        let end = o.step_end(seq, 4);
        assert_eq!(end, hot_end);
        assert_eq!(o.pending_through(end).blocks, vec![0, 1, 2, 3]);
        assert_eq!(o.step_end(seq, 14), seq, "everything fits");
        o.drop_through(end);
        assert_eq!(o.dirty_blocks(), 10);
        assert_eq!(o.data_bytes(), 160);
    }

    #[test]
    fn trimming_a_whole_disk_is_one_entry() {
        let mut o = Overlay::new(65536);
        o.write(1, 4096, Bytes::from_static(b"data"));
        o.zero(2, 0, 100 << 30);
        assert_eq!(o.zeros.len(), 1);
        assert_eq!(
            o.materialize(12345, unreachable_base).expect("read"),
            Some(vec![0u8; 65536])
        );
        assert_eq!(
            o.pending_through(2).zero_ranges,
            vec![(0, (100 << 30) / 65536)]
        );
        o.drop_through(2);
        assert!(!o.touches(0));
        assert!(o.blocks.is_empty());
    }

    /// Applies a write or a zeroing to the flat model and the overlay alike.
    fn apply(op: &Op, seq: u64, model: &mut [u8], overlay: &mut Overlay) {
        let size = model.len();
        match op {
            Op::Write(o, d) => {
                let o = *o as usize;
                let n = d.len().min(size - o);
                model[o..o + n].copy_from_slice(&d[..n]);
                overlay.write(seq, o as u64, Bytes::from(d[..n].to_vec()));
            }
            Op::Zero(o, l) => {
                let (o, l) = (*o as usize, (*l as usize).min(size - *o as usize));
                model[o..o + l].fill(0);
                overlay.zero(seq, o as u64, l as u64);
            }
            Op::Upload => {}
        }
    }

    fn unreachable_base() -> io::Result<Vec<u8>> {
        Err(io::Error::other("the base must not be needed"))
    }
}
