//! Watches that follow their key across moves and failovers.
//!
//! `WatchDriver` and `WatchTrip` run on the key's owner. When the key's partition moves
//! (a node joins, leaves or is drained) the owner ends its watchers with `moved`; when
//! the owner dies, the relayed stream breaks. The node the client called hides both: it
//! opens the watch again wherever the key lives now and resumes after the last item it
//! delivered, so the client's stream goes on. A re-opened watch starts with the key's
//! current state, which is sent on only when it is newer than what the client has (a
//! driver's newer fix; a trip's higher version, marked `state_changed` when its state
//! differs from the last one delivered). A trip carries the time of every state it
//! entered, so no state change is lost across a move.
//!
//! Only the node the client called follows (hop 0); a forwarded watch ends on the owner
//! as before and the entry node re-opens it. The stream still ends for good when the key
//! is removed or expires, when the client lags, when the entry node shuts down, or when
//! the key has no reachable owner for [`FOLLOW_BUDGET`] (`UNAVAILABLE`, `moved`).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

use super::locations::BoxStream;
use super::{END_KEY, with_meta};
use crate::actors::WatchEnd;

/// How long a followed watch may find no owner to re-open on before it ends.
pub const FOLLOW_BUDGET: Duration = Duration::from_secs(30);
/// A watch that ran at least this long before it ended is re-opened at once; a shorter
/// one waits a growing backoff first, so a key bouncing between nodes cannot spin.
const SETTLED: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

pub type Opening<T> = Pin<Box<dyn Future<Output = Result<BoxStream<T>, Status>> + Send>>;

/// One kind of keyed watch, as its entry node follows it.
pub trait Resume: Send + 'static {
    type Item: Send + 'static;
    /// Opens the watch on the key's owner now (here or forwarded); every open starts
    /// with the key's current state.
    fn open(&mut self) -> Opening<Self::Item>;
    /// Whether to deliver `item` (and adjusts it); `fresh` marks the first item of an
    /// open, the current state, delivered only when it is newer than the last delivered.
    fn pass(&mut self, item: &mut Self::Item, fresh: bool) -> bool;
}

/// Whether a watch that ended with `end` (`None`: the stream just stopped) may be
/// re-opened: the key moved, its owner is unreachable or lost quorum, or its owner
/// shut down (its partitions move). Removal, expiry, lag and bad requests are final.
pub fn resumable(end: Option<&Status>) -> bool {
    let Some(s) = end else { return true };
    let final_end = s.metadata().get(END_KEY).and_then(|v| v.to_str().ok()).is_some_and(|r| {
        r == WatchEnd::Removed.as_str() || r == WatchEnd::Expired.as_str() || r == WatchEnd::Lagged.as_str()
    });
    // A busy owner (`RESOURCE_EXHAUSTED` without `lagged`: its mailbox is full, as while a
    // partition is being installed) is worth trying again too.
    !final_end
        && matches!(
            s.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded | Code::ResourceExhausted
        )
}

fn shutting_down() -> Status {
    with_meta(Status::unavailable("node shutting down"), END_KEY, WatchEnd::ShuttingDown.as_str())
}

/// The client's stream: `first` (already open), then every re-open after a move, until
/// a final end. Stops when the client goes away.
pub fn follow<R: Resume>(
    mut r: R,
    first: BoxStream<R::Item>,
    mut shutdown: watch::Receiver<bool>,
) -> BoxStream<R::Item> {
    let (tx, rx) = mpsc::channel(16);
    crate::tasks::spawn("follow_watch", async move {
        let mut s = first;
        let mut backoff = BACKOFF_MIN;
        // Since when the key has had no owner that kept a watch open (the budget's start).
        let mut lost: Option<Instant> = None;
        loop {
            let opened = Instant::now();
            let mut fresh = true;
            let mut delivered = false;
            let end = loop {
                tokio::select! {
                    item = s.next() => match item {
                        Some(Ok(mut x)) => {
                            let deliver = r.pass(&mut x, fresh);
                            fresh = false;
                            delivered |= deliver;
                            if deliver && tx.send(Ok(x)).await.is_err() {
                                return;
                            }
                        }
                        Some(Err(e)) => break Some(e),
                        None => break None,
                    },
                    _ = tx.closed() => return,
                    _ = super::stopped(&mut shutdown) => {
                        let _ = tx.send(Err(shutting_down())).await;
                        return;
                    }
                }
            };
            if *shutdown.borrow() {
                let _ = tx.send(Err(end.unwrap_or_else(shutting_down))).await;
                return;
            }
            if !resumable(end.as_ref()) {
                let _ = tx.send(Err(end.unwrap_or_else(shutting_down))).await;
                return;
            }
            if opened.elapsed() >= SETTLED || delivered {
                backoff = BACKOFF_MIN;
                lost = None;
            }
            // Find the key's owner again, within the budget (a watch that opens and ends
            // at once does not restart it).
            let lost = *lost.get_or_insert_with(Instant::now);
            let mut at_once = opened.elapsed() >= SETTLED;
            s = loop {
                if !std::mem::take(&mut at_once) {
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = tx.closed() => return,
                        _ = super::stopped(&mut shutdown) => {
                            let _ = tx.send(Err(shutting_down())).await;
                            return;
                        }
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
                match r.open().await {
                    Ok(s) => break s,
                    Err(e) if resumable(Some(&e)) && lost.elapsed() < FOLLOW_BUDGET => {
                        tracing::debug!(error = %e, "a followed watch found no owner yet");
                    }
                    Err(e) => {
                        let e = if e.code() == Code::Unavailable {
                            with_meta(e, END_KEY, WatchEnd::Moved.as_str())
                        } else {
                            e
                        };
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            };
            metrics::counter!("locus_watch_follows_total").increment(1);
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_ends_are_followed() {
        assert!(resumable(None));
        assert!(resumable(Some(&with_meta(Status::unavailable("x"), END_KEY, "moved"))));
        assert!(resumable(Some(&with_meta(Status::unavailable("x"), END_KEY, "shutting_down"))));
        assert!(resumable(Some(&Status::unknown("h2 protocol error"))));
        assert!(!resumable(Some(&with_meta(Status::not_found("x"), END_KEY, "removed"))));
        assert!(!resumable(Some(&with_meta(Status::resource_exhausted("x"), END_KEY, "lagged"))));
        assert!(resumable(Some(&Status::resource_exhausted("the owner's mailbox is full"))));
        assert!(!resumable(Some(&Status::not_found("trip expired"))));
        assert!(!resumable(Some(&Status::invalid_argument("driver_id"))));
    }
}
