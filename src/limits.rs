//! Limits on what one client can hold open: a counted set of slots per kind (watches,
//! event subscriptions), taken when a stream opens and given back when it ends.
//!
//! A full set answers `RESOURCE_EXHAUSTED` naming the limit and the flag that sets it,
//! and is counted in `locus_limit_refused_total{limit}`; `locus_open{kind}` shows use.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tonic::Status;

/// At most `max` things of one kind open at once on this node.
#[derive(Debug)]
pub struct Slots {
    kind: &'static str,
    flag: &'static str,
    max: usize,
    used: AtomicUsize,
}

/// One slot, given back on drop.
#[derive(Debug)]
pub struct Slot(Arc<Slots>);

impl Drop for Slot {
    fn drop(&mut self) {
        let n = self.0.used.fetch_sub(1, Ordering::AcqRel) - 1;
        metrics::gauge!("locus_open", "kind" => self.0.kind).set(n as f64);
    }
}

impl Slots {
    pub fn new(kind: &'static str, flag: &'static str, max: usize) -> Arc<Slots> {
        Arc::new(Slots { kind, flag, max, used: AtomicUsize::new(0) })
    }

    /// A slot, or `RESOURCE_EXHAUSTED` when all `max` are taken.
    pub fn take(self: &Arc<Self>) -> Result<Slot, Status> {
        let mut n = self.used.load(Ordering::Acquire);
        loop {
            if n >= self.max {
                metrics::counter!("locus_limit_refused_total", "limit" => self.kind).increment(1);
                return Err(Status::resource_exhausted(format!(
                    "this node has {} {} open, its limit ({}): retry later or through another node",
                    self.max, self.kind, self.flag
                )));
            }
            match self.used.compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(now) => n = now,
            }
        }
        metrics::gauge!("locus_open", "kind" => self.kind).set((n + 1) as f64);
        Ok(Slot(self.clone()))
    }

    pub fn in_use(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

/// `stream`, holding `slot` until it ends or is dropped.
pub fn holding<S: tokio_stream::Stream + Send + 'static>(
    stream: S,
    slot: Slot,
) -> impl tokio_stream::Stream<Item = S::Item> + Send + 'static {
    use tokio_stream::StreamExt;
    stream.map(move |x| {
        let _held = &slot;
        x
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_taken_up_to_the_limit_and_given_back_on_drop() {
        let s = Slots::new("watches", "--max-watches", 2);
        let a = s.take().unwrap();
        let _b = s.take().unwrap();
        let e = s.take().unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("--max-watches"), "{e:?}");
        drop(a);
        assert_eq!(s.in_use(), 1);
        let _c = s.take().unwrap();
        assert_eq!(s.in_use(), 2);
    }
}
