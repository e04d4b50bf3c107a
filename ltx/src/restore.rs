//! Restore planning: which LTX files rebuild a database at a TXID or a point in time.
//!
//! Start from the latest snapshot (level 9) at or before the target, then repeatedly take, from
//! any lower level, the file that continues the history furthest without passing the target.
//! Fewest files wins; a gap in the history is an error, never a silently older database.

use crate::error::{Error, Result};
use crate::naming::SNAPSHOT_LEVEL;

/// One LTX file in a replica listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LtxFile {
    pub level: u8,
    pub min_txid: u64,
    pub max_txid: u64,
    pub size: u64,
    /// When the file's last transaction was written, in milliseconds since the Unix epoch
    /// (the header timestamp, or the object's creation time).
    pub created_at_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreTarget {
    /// Everything in the replica.
    Latest,
    /// The database as of this transaction.
    Txid(u64),
    /// The database as of the last transaction written strictly before this time (ms).
    Timestamp(i64),
}

impl RestoreTarget {
    fn admits(&self, f: &LtxFile) -> bool {
        match *self {
            RestoreTarget::Latest => true,
            RestoreTarget::Txid(t) => f.max_txid <= t,
            RestoreTarget::Timestamp(ts) => f.created_at_ms < ts,
        }
    }
}

/// Orders candidates: reaches further, then starts earlier, then higher level (bigger, fewer
/// files), then older.
fn better(candidate: &LtxFile, than: &LtxFile) -> bool {
    (
        candidate.max_txid,
        std::cmp::Reverse(candidate.min_txid),
        candidate.level,
        std::cmp::Reverse(candidate.created_at_ms),
    ) > (
        than.max_txid,
        std::cmp::Reverse(than.min_txid),
        than.level,
        std::cmp::Reverse(than.created_at_ms),
    )
}

/// Plans a restore over `files` (any order, any levels). The plan is ordered oldest to newest
/// and starts with a snapshot (a file whose min TXID is 1).
pub fn plan_restore(files: &[LtxFile], target: RestoreTarget) -> Result<Vec<LtxFile>> {
    if let RestoreTarget::Txid(0) = target {
        return Err(Error::Restore(
            "TXID 0 is before the first transaction".into(),
        ));
    }
    let mut plan: Vec<LtxFile> = Vec::new();
    let snapshot = files
        .iter()
        .filter(|f| f.level == SNAPSHOT_LEVEL && f.min_txid == 1 && target.admits(f))
        .fold(None::<&LtxFile>, |best, f| match best {
            Some(b) if !better(f, b) => Some(b),
            _ => Some(f),
        });
    let mut reached = 0u64;
    if let Some(s) = snapshot {
        plan.push(*s);
        reached = s.max_txid;
    }
    let done = |reached: u64| matches!(target, RestoreTarget::Txid(t) if reached >= t);
    while !done(reached) {
        let next = files
            .iter()
            .filter(|f| f.level < SNAPSHOT_LEVEL && target.admits(f))
            .filter(|f| f.min_txid <= reached + 1 && f.max_txid > reached)
            .fold(None::<&LtxFile>, |best, f| match best {
                Some(b) if !better(f, b) => Some(b),
                _ => Some(f),
            });
        let Some(next) = next else { break };
        plan.push(*next);
        reached = next.max_txid;
    }

    let first_gap = files
        .iter()
        .filter(|f| f.level < SNAPSHOT_LEVEL && target.admits(f) && f.min_txid > reached + 1)
        .map(|f| f.min_txid)
        .min();
    // With files beyond the point the plan reached, the history has a hole.
    let unreachable = |message: String| match first_gap {
        Some(_) => Error::HistoryGap(message),
        None => Error::Restore(message),
    };
    if plan.is_empty() {
        return Err(unreachable(match first_gap {
            Some(min) => format!(
                "no snapshot and no file starting at TXID 1 (the oldest file starts at {min:016x})"
            ),
            None => "no LTX files at or before the target".into(),
        }));
    }
    match target {
        RestoreTarget::Txid(t) if reached < t => Err(unreachable(format!(
            "TXID {t:016x} is not available: the history reaches {reached:016x}{}",
            first_gap
                .map(|g| format!(", then a gap until {g:016x}"))
                .unwrap_or_default()
        ))),
        RestoreTarget::Latest if first_gap.is_some() => Err(unreachable(format!(
            "gap in the history: files reach {reached:016x}, the next starts at {:016x}",
            first_gap.unwrap_or_default()
        ))),
        _ => Ok(plan),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(level: u8, min: u64, max: u64) -> LtxFile {
        LtxFile {
            level,
            min_txid: min,
            max_txid: max,
            size: 100,
            created_at_ms: max as i64 * 1000,
        }
    }

    /// The shape of testdata/ltx/replica: L0 1..7, L1 {1,2,3-4,5-6,7}, L2 {1,2-4,5-7}, L9 {1,1-4,1-7}.
    fn listing() -> Vec<LtxFile> {
        let mut v: Vec<LtxFile> = (1..=7).map(|t| f(0, t, t)).collect();
        v.extend([f(1, 1, 1), f(1, 2, 2), f(1, 3, 4), f(1, 5, 6), f(1, 7, 7)]);
        v.extend([f(2, 1, 1), f(2, 2, 4), f(2, 5, 7)]);
        v.extend([f(9, 1, 1), f(9, 1, 4), f(9, 1, 7)]);
        v
    }

    fn ranges(plan: &[LtxFile]) -> Vec<(u8, u64, u64)> {
        plan.iter()
            .map(|f| (f.level, f.min_txid, f.max_txid))
            .collect()
    }

    #[test]
    fn latest_uses_the_newest_snapshot_alone() {
        let plan = plan_restore(&listing(), RestoreTarget::Latest).expect("plan");
        assert_eq!(ranges(&plan), vec![(9, 1, 7)]);
    }

    #[test]
    fn point_in_time_by_txid_takes_the_fewest_files() {
        let plan = plan_restore(&listing(), RestoreTarget::Txid(6)).expect("plan");
        assert_eq!(ranges(&plan), vec![(9, 1, 4), (1, 5, 6)]);
        let plan = plan_restore(&listing(), RestoreTarget::Txid(3)).expect("plan");
        assert_eq!(ranges(&plan), vec![(9, 1, 1), (1, 2, 2), (0, 3, 3)]);
    }

    #[test]
    fn point_in_time_by_timestamp() {
        // Files written before t=5.5 s: everything with max TXID ≤ 5.
        let plan = plan_restore(&listing(), RestoreTarget::Timestamp(5_500)).expect("plan");
        assert_eq!(plan.last().map(|f| f.max_txid), Some(5));
        assert_eq!(plan[0].level, 9);
    }

    #[test]
    fn without_snapshots_the_chain_starts_at_one() {
        let files: Vec<LtxFile> = listing().into_iter().filter(|f| f.level < 9).collect();
        let plan = plan_restore(&files, RestoreTarget::Latest).expect("plan");
        assert_eq!(ranges(&plan), vec![(2, 1, 1), (2, 2, 4), (2, 5, 7)]);
    }

    #[test]
    fn gaps_are_errors() {
        let files = vec![f(9, 1, 2), f(0, 3, 3), f(0, 5, 5)];
        let err = plan_restore(&files, RestoreTarget::Latest).expect_err("gap");
        assert!(err.to_string().contains("gap"), "{err}");
        let err = plan_restore(&files, RestoreTarget::Txid(5)).expect_err("gap");
        assert!(err.to_string().contains("not available"), "{err}");
        assert!(plan_restore(&files, RestoreTarget::Txid(3)).is_ok());
        assert!(plan_restore(&[f(0, 2, 3)], RestoreTarget::Latest).is_err());
        assert!(plan_restore(&[], RestoreTarget::Latest).is_err());
    }

    /// A hole (files beyond it) is told apart from a history that just ends, which a reader
    /// that listed while files were being folded lists again for.
    #[test]
    fn holes_are_told_apart_from_an_end() {
        let files = vec![f(9, 1, 2), f(0, 3, 3), f(0, 5, 5)];
        for target in [RestoreTarget::Latest, RestoreTarget::Txid(5)] {
            let err = plan_restore(&files, target).expect_err("hole");
            assert!(matches!(err, Error::HistoryGap(_)), "{err:?}");
        }
        let gap_before_all = plan_restore(&[f(0, 2, 3)], RestoreTarget::Latest);
        assert!(matches!(gap_before_all, Err(Error::HistoryGap(_))));
        for (files, target) in [
            (vec![f(9, 1, 2)], RestoreTarget::Txid(7)),
            (vec![], RestoreTarget::Latest),
            (files.clone(), RestoreTarget::Txid(0)),
        ] {
            let err = plan_restore(&files, target).expect_err("no plan");
            assert!(matches!(err, Error::Restore(_)), "{err:?}");
        }
    }
}
