//! Group commit for the sled store (claims and trips): callers wait for one shared
//! `flush` instead of each calling `flush_async`.
//!
//! sled 0.34's `flush_async` can deadlock when several futures await it at once
//! (spacejam/sled#1308, #1241): exactly what concurrent `Match` calls do. So one thread
//! owns flushing: it takes every waiter queued so far, runs one blocking `flush`, and
//! answers them all. Under load one fsync covers many writes; idle, a write waits for
//! one flush.
//!
//! Under the simulated clock ([`crate::clock::simulated`]) a flush runs in
//! `spawn_blocking` instead, where the paused clock waits for it: a flush on a thread
//! the runtime cannot see would let virtual time leap past every timeout meanwhile.

use std::sync::mpsc as std_mpsc;

use tokio::sync::oneshot;

type Waiter = oneshot::Sender<Result<(), String>>;

/// A handle to the flusher thread; cheap to clone.
#[derive(Clone)]
pub struct Durable {
    tx: std_mpsc::Sender<Waiter>,
    /// Set under the simulated clock: flush in `spawn_blocking`.
    inline: Option<sled::Db>,
}

impl Durable {
    /// Starts the flusher thread for `db` (it exits when every handle is dropped).
    pub fn start(db: sled::Db) -> Durable {
        let (tx, rx) = std_mpsc::channel::<Waiter>();
        if crate::clock::simulated() {
            return Durable { tx, inline: Some(db) };
        }
        std::thread::Builder::new()
            .name("sled-flusher".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut waiters = vec![first];
                    waiters.extend(rx.try_iter());
                    let r = db.flush().map(|_| ()).map_err(|e| e.to_string());
                    metrics::counter!("locus_store_flushes_total").increment(1);
                    for w in waiters {
                        let _ = w.send(r.clone());
                    }
                }
            })
            .expect("spawn the sled flusher thread");
        Durable { tx, inline: None }
    }

    /// Resolves once everything written before the call is on disk.
    pub async fn flush(&self) -> Result<(), String> {
        if let Some(db) = &self.inline {
            let db = db.clone();
            let r = tokio::task::spawn_blocking(move || db.flush().map(|_| ()).map_err(|e| e.to_string()));
            return r.await.map_err(|e| e.to_string())?;
        }
        let (tx, rx) = oneshot::channel();
        self.tx.send(tx).map_err(|_| "the flusher stopped".to_string())?;
        rx.await.map_err(|_| "the flusher stopped".to_string())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_flushes_all_complete() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let d = Durable::start(db.clone());
        let mut set = tokio::task::JoinSet::new();
        for i in 0..200u32 {
            let (db, d) = (db.clone(), d.clone());
            set.spawn(async move {
                db.insert(i.to_be_bytes(), vec![1]).unwrap();
                d.flush().await
            });
        }
        let all = tokio::time::timeout(std::time::Duration::from_secs(20), async {
            while let Some(r) = set.join_next().await {
                r.unwrap().unwrap();
            }
        })
        .await;
        assert!(all.is_ok(), "a flush never completed");
        assert_eq!(db.len(), 200);
    }
}
