//! Every task a node spawns, tracked by kind.
//!
//! [`spawn`] is `tokio::spawn` with a guard that counts the task while it lives, per kind
//! (`locus_tasks{kind}` on `/metrics`), whether it ends, panics or is aborted. A leak
//! (watches that never end, trip actors piling up) shows on a dashboard, and shutdown
//! reports what was still running ([`live`]). Long-lived node tasks (membership,
//! hand-off, replication, shards) are also held by their owners and joined.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Mutex;

use tokio::task::JoinHandle;

static LIVE: Mutex<BTreeMap<&'static str, i64>> = Mutex::new(BTreeMap::new());

/// Counts one live task of `kind` until dropped.
struct Live(&'static str);

impl Live {
    fn enter(kind: &'static str) -> Live {
        let mut m = LIVE.lock().expect("tasks lock");
        let n = m.entry(kind).or_insert(0);
        *n += 1;
        metrics::gauge!("locus_tasks", "kind" => kind).set(*n as f64);
        Live(kind)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        let mut m = LIVE.lock().expect("tasks lock");
        let n = m.entry(self.0).or_insert(1);
        *n -= 1;
        metrics::gauge!("locus_tasks", "kind" => self.0).set(*n as f64);
    }
}

/// Spawns `fut` as a task of `kind`, counted while it lives.
pub fn spawn<F>(kind: &'static str, fut: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let guard = Live::enter(kind);
    tokio::spawn(async move {
        let _guard = guard;
        fut.await
    })
}

/// Tasks alive now, by kind (kinds with none left out).
pub fn live() -> BTreeMap<&'static str, i64> {
    LIVE.lock().expect("tasks lock").iter().filter(|(_, n)| **n > 0).map(|(k, n)| (*k, *n)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_a_task_until_it_ends_or_is_aborted() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let h = spawn("test_waiting", async move {
            let _ = rx.await;
        });
        assert_eq!(live().get("test_waiting"), Some(&1));
        tx.send(()).unwrap();
        h.await.unwrap();
        assert_eq!(live().get("test_waiting"), None);
        let h = spawn("test_aborted", std::future::pending::<()>());
        assert_eq!(live().get("test_aborted"), Some(&1));
        h.abort();
        let _ = h.await;
        assert_eq!(live().get("test_aborted"), None);
    }
}
