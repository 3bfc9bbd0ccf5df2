//! Driver history: every accepted fix, per partition, for `--history-retention`.
//!
//! A shard appends each fix it accepts to a flat buffer ([`codec::push_raw`]: no
//! allocation per fix; this module knows nothing of drivers, only of the entry); the persister takes the buffers with the shard's commit and
//! writes one compact block per partition into the [`HistoryStore`], numbering the
//! fixes: a fix's [`Pos`] is the ownership epoch its partition was served at when it
//! was written, then a sequence number that only grows within the partition. Blocks go
//! to the partition's replicas with the driver records, and a partition's history moves
//! with it in a hand-off, so positions are the same on every node that holds them. What
//! a pull leaves out (beyond `--history-pull-mib`), and what a replica made late lacks,
//! is copied as whole segment files ([`HistoryStore::segments_before`] on the holder,
//! [`HistoryStore::prepend`] here, newest first) by `handoff`.
//!
//! Positions order a partition's fixes (epoch first): a consumer that keeps the last
//! position it saw per partition resumes exactly after it, on any node, after moves and
//! restarts. If an owner dies with fixes its replicas never got, the promoted replica
//! writes at a higher epoch: a consumer that saw the lost fixes resumes after them
//! without skipping the new ones.
//!
//! Readers: `Locations.GetHistory` (one driver, by server time) and `Fixes.Subscribe`
//! (every fix, from a cursor), in `api::history`.

pub mod codec;
mod store;
#[cfg(test)]
mod tests;

pub use codec::{HistFix, Raw, RawEvent};
pub use store::{
    Behind, EXPORT_MAX, HistEvent, HistoryConfig, HistoryError, HistoryStore, MAX_COPIED_SEGMENT, Page, read_range,
};

/// A fix's position in its partition's history.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pos {
    /// The ownership epoch of the partition when the fix was written.
    pub epoch: u64,
    /// Grows by one per fix within the partition, across epochs.
    pub seq: u64,
}

impl std::fmt::Display for Pos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.epoch, self.seq)
    }
}
