//! Random batches of puts and deletes against a plain in-memory model: lookups, runs and the
//! per-chunk live accounting must always agree with it.

use blockmap::{BlockLocation, BlockMap, MapChange};
use proptest::prelude::*;
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
enum Op {
    Put { block: u64, length: u32 },
    Delete { first: u64, count: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u64..64, 1u32..5000).prop_map(|(block, length)| Op::Put { block, length }),
        1 => (0u64..64, 0u64..20).prop_map(|(first, count)| Op::Delete { first, count }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn matches_the_model(batches in prop::collection::vec(prop::collection::vec(op(), 1..12), 1..10)) {
        let mut map = BlockMap::in_memory().expect("map");
        let mut model: BTreeMap<u64, BlockLocation> = BTreeMap::new();
        for (i, batch) in batches.iter().enumerate() {
            let chunk = i as u64 + 1;
            let mut offset = 0u64;
            let mut changes = Vec::new();
            for op in batch {
                match *op {
                    Op::Put { block, length } => {
                        let location = BlockLocation { chunk, offset, length, checksum: block as u32 };
                        offset += u64::from(length);
                        model.insert(block, location);
                        changes.push(MapChange::Put { block, location });
                    }
                    Op::Delete { first, count } => {
                        model.retain(|b, _| !(first..first + count).contains(b));
                        changes.push(MapChange::Delete { first, count });
                    }
                }
            }
            map.apply(&[(chunk, offset.max(1))], &changes).expect("apply");
        }
        let all = map.range(0, 1 << 20).expect("range");
        prop_assert_eq!(all, model.iter().map(|(b, l)| (*b, *l)).collect::<Vec<_>>());
        for chunk in 1..=batches.len() as u64 {
            let stats = map.chunk(chunk).expect("chunk").expect("registered");
            let live: Vec<&BlockLocation> = model.values().filter(|l| l.chunk == chunk).collect();
            prop_assert_eq!(stats.live_blocks, live.len() as u64);
            prop_assert_eq!(stats.live_bytes, live.iter().map(|l| u64::from(l.length)).sum::<u64>());
        }
        let runs = map.allocated_runs(0, 1 << 20).expect("runs");
        prop_assert_eq!(runs.iter().map(|(_, n)| n).sum::<u64>(), model.len() as u64);
    }
}
