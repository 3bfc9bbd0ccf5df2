//! The fix stream's replay, shared by the history tests on node processes and the
//! in-process scenarios: a cursor, the request that resumes from it, and the check that
//! a replay from the earliest cursor has every acknowledged fix exactly once.

use std::collections::HashMap;
use std::time::Duration;

use locus::pb;
use tokio_stream::StreamExt;

/// Partition → the last (epoch, seq) read.
pub type Cursor = HashMap<u32, (u64, u64)>;

/// A subscription resuming after `cursor` (partitions not in it: from the earliest or
/// from now on).
pub fn request(cursor: &Cursor, earliest: bool) -> pb::SubscribeFixesRequest {
    pb::SubscribeFixesRequest {
        after: cursor.iter().map(|(p, (e, s))| pb::HistoryPosition { partition: *p, epoch: *e, seq: *s }).collect(),
        start: if earliest { pb::StartAt::Earliest } else { pb::StartAt::Latest } as i32,
        ..Default::default()
    }
}

/// Applies a batch: fixes into `seen` (counting repeats), positions into the cursor;
/// checks that each partition's positions only grow.
pub fn take(b: pb::FixBatch, cursor: &mut Cursor, seen: &mut HashMap<(String, i64), u32>) {
    for f in &b.fixes {
        let p = f.position.unwrap();
        if let Some(c) = cursor.get(&p.partition) {
            assert!((p.epoch, p.seq) > *c, "partition {} went back: {:?} after {c:?}", p.partition, p);
        }
        *seen.entry((f.driver_id.clone(), f.timestamp_ms)).or_default() += 1;
    }
    for p in b.positions {
        let c = cursor.entry(p.partition).or_insert((p.epoch, p.seq));
        assert!((p.epoch, p.seq) >= *c, "cursor of {} went back", p.partition);
        *c = (p.epoch, p.seq);
    }
}

/// Reads `replay` (a subscription from the earliest cursor) until 3 s pass without a
/// batch; checks that nothing came twice and that every fix of `want` came.
pub async fn assert_replay_holds<'a>(
    mut replay: tonic::Streaming<pb::FixBatch>,
    want: impl IntoIterator<Item = &'a (String, i64)>,
) {
    let (mut cursor, mut seen) = (Cursor::new(), HashMap::new());
    while let Ok(Some(b)) = tokio::time::timeout(Duration::from_secs(3), replay.next()).await {
        take(b.unwrap(), &mut cursor, &mut seen);
    }
    let repeated: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(repeated.is_empty(), "replayed more than once: {repeated:?}");
    let (mut wanted, mut missing) = (0, Vec::new());
    for k in want {
        wanted += 1;
        if !seen.contains_key(k) {
            missing.push(k);
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {wanted} fixes not in the replay, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
}
