//! Every task a node spawns, tracked by kind.
//!
//! [`spawn`] is `tokio::spawn` with a guard that counts the task while it lives, per kind
//! (`locus_tasks{kind}` on `/metrics`), whether it ends, panics or is aborted. A leak
//! (watches that never end, trip actors piling up) shows on a dashboard, and shutdown
//! reports what was still running ([`live`]). Long-lived node tasks (membership,
//! hand-off, replication, shards) are also held by their owners and joined.
//!
//! A [`Scope`] groups every task one node spawns, so that a process running several
//! nodes (the cluster harness) can kill one: [`Scope::run`] runs the node inside it,
//! [`spawn`] passes the scope on to each task it spawns, and [`ScopeLayer`] passes it
//! on to gRPC handlers (tonic runs connections on tasks of its own). [`Scope::kill`]
//! aborts them all, as `kill -9` would end the process; [`Scope::freeze`] stops polling
//! them until [`Scope::thaw`], as SIGSTOP and SIGCONT would (timers run on meanwhile, so
//! a thawed node wakes up late, in the middle of whatever it was doing).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use tokio::task::{AbortHandle, JoinHandle};

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
    let counted = async move {
        let _guard = guard;
        fut.await
    };
    match Scope::current() {
        None => tokio::spawn(counted),
        Some(scope) => scope.spawn_counted(counted),
    }
}

tokio::task_local! {
    static SCOPE: Option<Scope>;
}

/// The tasks of one node (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct Scope {
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
    /// Every task of the scope logs inside this span (the node's name, in the harness).
    span: tracing::Span,
    gate: Arc<Gate>,
}

/// Whether a scope's tasks may run; the tasks that found it shut wait here.
#[derive(Default)]
struct Gate {
    frozen: AtomicBool,
    parked: Mutex<Vec<Waker>>,
}

impl Gate {
    /// True if the caller may run now; otherwise its waker is kept for [`Gate::open`].
    fn pass(&self, cx: &Context<'_>) -> bool {
        if !self.frozen.load(Ordering::Acquire) {
            return true;
        }
        let mut parked = self.parked.lock().expect("gate lock");
        if !self.frozen.load(Ordering::Acquire) {
            return true;
        }
        // Once per task: a frozen task woken again and again (a socket it reads) would
        // otherwise park a waker per wake-up.
        if !parked.iter().any(|w| w.will_wake(cx.waker())) {
            parked.push(cx.waker().clone());
        }
        false
    }

    fn open(&self) {
        let parked = {
            let mut p = self.parked.lock().expect("gate lock");
            self.frozen.store(false, Ordering::Release);
            std::mem::take(&mut *p)
        };
        parked.into_iter().for_each(Waker::wake);
    }
}

pin_project_lite::pin_project! {
    /// A future of a scope: not polled while the scope is frozen.
    pub struct Gated<F> {
        #[pin]
        inner: F,
        gate: Option<Arc<Gate>>,
    }
}

impl<F: Future> Future for Gated<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        if let Some(g) = this.gate
            && !g.pass(cx)
        {
            return Poll::Pending;
        }
        this.inner.poll(cx)
    }
}

impl Scope {
    pub fn new(span: tracing::Span) -> Scope {
        Scope { tasks: Arc::default(), span, gate: Arc::default() }
    }

    /// Stops polling every task of the scope (SIGSTOP): they stay where they are, their
    /// timers and sockets too, until [`Scope::thaw`].
    pub fn freeze(&self) {
        self.gate.frozen.store(true, Ordering::Release);
    }

    /// Lets the scope's tasks run again (SIGCONT).
    pub fn thaw(&self) {
        self.gate.open();
    }

    /// The scope the calling task runs in, if any.
    pub fn current() -> Option<Scope> {
        SCOPE.try_with(|s| s.clone()).ok().flatten()
    }

    /// Runs `fut` inside this scope: what it spawns through [`spawn`] belongs to it.
    pub fn run<F: Future>(&self, fut: F) -> impl Future<Output = F::Output> + use<F> {
        let gated = Gated { inner: fut, gate: Some(self.gate.clone()) };
        SCOPE.scope(Some(self.clone()), tracing::Instrument::instrument(gated, self.span.clone()))
    }

    /// Spawns `fut` as a task of `kind` in this scope (from outside it, too).
    pub fn spawn<F>(&self, kind: &'static str, fut: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let guard = Live::enter(kind);
        self.spawn_counted(async move {
            let _guard = guard;
            fut.await
        })
    }

    fn spawn_counted<F>(&self, fut: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let h = tokio::spawn(self.run(fut));
        self.add(h.abort_handle());
        h
    }

    fn add(&self, h: AbortHandle) {
        let mut t = self.tasks.lock().expect("scope lock");
        if t.len() >= 64 && t.len().is_power_of_two() {
            t.retain(|h| !h.is_finished());
        }
        t.push(h);
    }

    /// Aborts every task of the scope (and any it spawns meanwhile, as they start).
    pub fn kill(&self) {
        for _ in 0..8 {
            let tasks = std::mem::take(&mut *self.tasks.lock().expect("scope lock"));
            if tasks.is_empty() {
                return;
            }
            for h in tasks {
                h.abort();
            }
        }
    }
}

/// Runs each gRPC request of a server inside the scope it was made with.
#[derive(Clone)]
pub struct ScopeLayer(pub Option<Scope>);

impl<S> tower_layer::Layer<S> for ScopeLayer {
    type Service = Scoped<S>;

    fn layer(&self, inner: S) -> Scoped<S> {
        Scoped { inner, scope: self.0.clone() }
    }
}

/// See [`ScopeLayer`].
#[derive(Clone)]
pub struct Scoped<S> {
    inner: S,
    scope: Option<Scope>,
}

impl<S, R> tonic::codegen::Service<R> for Scoped<S>
where
    S: tonic::codegen::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        tracing::instrument::Instrumented<tokio::task::futures::TaskLocalFuture<Option<Scope>, Gated<S::Future>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        // No allocation: outside the harness this sets the scope to `None` per poll.
        let span = self.scope.as_ref().map_or_else(tracing::Span::none, |s| s.span.clone());
        let gated = Gated { inner: self.inner.call(req), gate: self.scope.as_ref().map(|s| s.gate.clone()) };
        tracing::Instrument::instrument(SCOPE.scope(self.scope.clone(), gated), span)
    }
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

    #[tokio::test(start_paused = true)]
    async fn a_frozen_scope_runs_nothing_until_thawed_then_catches_up() {
        let scope = Scope::new(tracing::Span::none());
        let ticks = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let t = ticks.clone();
        let h = tokio::spawn(scope.run(async move {
            drop(spawn("test_ticker", async move {
                loop {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    t.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }));
        h.await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(55)).await;
        assert_eq!(ticks.load(Ordering::Relaxed), 5);
        scope.freeze();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(ticks.load(Ordering::Relaxed), 5, "a frozen task ran");
        scope.thaw();
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        // Its overdue sleep ends at once (a thawed process finds its timers expired).
        assert_eq!(ticks.load(Ordering::Relaxed), 6);
        scope.kill();
    }
}
