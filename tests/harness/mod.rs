//! The in-process cluster harness: N Locus nodes in this test process, on the
//! in-process network (`locus::memnet`), in paused tokio time.
//!
//! Each node is the production node (`locus::node::run_on`) with its own sled store and
//! driver log in a temporary directory; gossip, heartbeats and every gRPC call between
//! nodes (forwards, scatter parts, hand-off, replication) travel over `MemNet`, where
//! links can be cut. A killed node's tasks are aborted at once (its `tasks::Scope`) and
//! it is detached from the network; its directory stays, so a restart reads back what it
//! had written, as after `kill -9`. Time is virtual (`start_paused`) and the wall clock
//! follows it (`locus::clock::simulate`): failure detection, leases, offer timeouts and
//! trip TTLs take no real time.
//!
//! Scenarios are lists of [`Op`]s run by [`Sim::run`]; a [`Model`] records what the
//! cluster acknowledged and the checks read it back.

#![allow(dead_code)]

pub mod model;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use locus::memnet::MemNet;
use locus::node::Net;
use locus::pb;
use locus::pb::cluster_client::ClusterClient;
use locus::pb::dispatch_client::DispatchClient;
use locus::pb::locations_client::LocationsClient;
use locus::pb::trips_client::TripsClient;
use locus::tasks::Scope;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

pub use model::Model;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    cfg: locus::config::NodeConfig,
}

struct Running {
    scope: Scope,
    task: JoinHandle<anyhow::Result<()>>,
    stop: Option<oneshot::Sender<()>>,
}

struct Slot {
    dir: tempfile::TempDir,
    gossip: SocketAddr,
    grpc: SocketAddr,
    run: Option<Running>,
    /// Restarts so far (a restarted node must come back later than it died).
    boots: u32,
    /// Stopped (SIGSTOP): running, but clients do not pick it.
    frozen: bool,
}

/// One step of a scenario.
#[derive(Clone, Debug)]
pub enum Op {
    /// Start node i (joining every other prepared node).
    Start(usize),
    /// `kill -9` node i.
    Kill(usize),
    /// Start a killed node again on its old directory.
    Restart(usize),
    /// Node i leaves gracefully (SIGTERM: hands its partitions over first).
    Leave(usize),
    /// `locus admin drain` node i, then stop it.
    Drain(usize),
    /// SIGSTOP node i while matches through it are in flight: its tasks stop where they
    /// are, its links stay up. Clients stop picking it.
    Freeze(usize),
    /// SIGCONT: node i runs on from where it stopped; the matches in flight end and are
    /// recorded.
    Thaw(usize),
    /// Cut every link between the two sides.
    Partition(Vec<usize>, Vec<usize>),
    Heal,
    /// Let virtual time pass.
    Wait(Duration),
    /// Wait until the listed nodes agree on a ring of exactly them, each serves (holds its
    /// quorum lease), every partition is owned once, and (with replicas) has an in-sync
    /// replica.
    Converge(Vec<usize>),
    /// n fixes for drivers of the fleet, through random live nodes.
    SendFixes(usize),
    /// Book n trips; match about half of them, and put half of those on board.
    Trips(usize),
    /// Every check of [`Model`] against the listed nodes.
    Check(Vec<usize>),
}

/// The cluster under test.
pub struct Sim {
    pub net: MemNet,
    client: SocketAddr,
    slots: Vec<Slot>,
    extra: Vec<String>,
    pub model: Model,
    rng: u64,
    /// The last kill or heal (see [`Sim::random`]).
    last_kill: Option<tokio::time::Instant>,
    _client_inbox: tokio::sync::mpsc::Receiver<Vec<u8>>,
}

fn gossip(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 0, 1, i as u8 + 1], 7946))
}

fn grpc(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 0, 1, i as u8 + 1], 7400))
}

impl Sim {
    /// Prepares `n` nodes (none started) with extra node flags; `seed` drives every
    /// random choice. Call inside `#[tokio::test(flavor = "current_thread", start_paused = true)]`.
    pub fn new(n: usize, extra: &[&str], seed: u64) -> Sim {
        locus::clock::simulate();
        init_logs();
        let net = MemNet::new();
        let client = SocketAddr::from(([10, 0, 9, 1], 1));
        let (_, inbox) = net.endpoint(client);
        let slots = (0..n)
            .map(|i| Slot {
                dir: tempfile::tempdir().unwrap(),
                gossip: gossip(i),
                grpc: grpc(i),
                run: None,
                boots: 0,
                frozen: false,
            })
            .collect();
        Sim {
            net,
            client,
            slots,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            model: Model::new(),
            // splitmix64 of the seed: neighbouring seeds start far apart (never 0).
            rng: splitmix(seed) | 1,
            last_kill: None,
            _client_inbox: inbox,
        }
    }

    /// Hand-off and replication calls go straight to the peer's `Handoff`
    /// (`handoff::MemPeerLink`) instead of over gRPC.
    pub fn direct_links(self) -> Sim {
        self.net.set_direct_links(true);
        self
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn running(&self) -> Vec<usize> {
        (0..self.slots.len()).filter(|i| self.slots[*i].run.is_some()).collect()
    }

    /// A pseudo-random number (xorshift), for choices that must replay from the seed.
    pub fn rand(&mut self, below: usize) -> usize {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng % below.max(1) as u64) as usize
    }

    pub fn start(&mut self, i: usize) {
        assert!(self.slots[i].run.is_none(), "n{i} runs already");
        let s = &mut self.slots[i];
        s.boots += 1;
        let mut args: Vec<String> = vec![
            "locus-node".into(),
            "--node-name".into(),
            format!("n{i}"),
            "--gossip-addr".into(),
            s.gossip.to_string(),
            "--grpc-addr".into(),
            s.grpc.to_string(),
            "--http-addr".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            s.dir.path().display().to_string(),
            "--shards".into(),
            "2".into(),
        ];
        let seeds: Vec<String> = (0..self.slots.len()).filter(|j| *j != i).map(|j| gossip(j).to_string()).collect();
        if !seeds.is_empty() {
            args.push("--join".into());
            args.push(seeds.join(","));
        }
        args.extend(self.extra.iter().cloned());
        let cfg = Args::try_parse_from(&args).unwrap_or_else(|e| panic!("node flags {args:?}: {e}")).cfg;
        let scope = Scope::new(tracing::info_span!("node", n = i));
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let net = Net::Mem(self.net.clone());
        let task = tokio::spawn(scope.run(locus::node::run_on(
            cfg,
            net,
            async move {
                let _ = stop_rx.await;
            },
            |_, _| {},
        )));
        self.slots[i].run = Some(Running { scope, task, stop: Some(stop_tx) });
    }

    /// `kill -9`: every task of the node ends now, its links are gone.
    pub async fn kill(&mut self, i: usize) {
        let r = self.slots[i].run.take().expect("running");
        self.net.detach(self.slots[i].gossip);
        r.scope.kill();
        r.task.abort();
        let _ = r.task.await;
        // Let aborted tasks and broken connections drop what they hold (the sled lock).
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
    }

    /// Starts a killed node again on its directory; retries while the dead instance
    /// still holds the store's lock.
    pub async fn restart(&mut self, i: usize) {
        for attempt in 0..50 {
            self.start(i);
            tokio::time::sleep(Duration::from_millis(20)).await;
            let r = self.slots[i].run.as_ref().unwrap();
            if !r.task.is_finished() {
                return;
            }
            let r = self.slots[i].run.take().unwrap();
            let err = r.task.await.unwrap().err().map(|e| format!("{e:#}")).unwrap_or_default();
            assert!(err.contains("lock") || err.contains("Resource temporarily"), "restart of n{i}: {err}");
            tokio::time::sleep(Duration::from_millis(10 * attempt)).await;
        }
        panic!("n{i} could not restart: its store stayed locked");
    }

    /// Graceful stop (SIGTERM): waits for the node to hand over and exit.
    pub async fn leave(&mut self, i: usize) {
        let mut r = self.slots[i].run.take().expect("running");
        let _ = r.stop.take().unwrap().send(());
        match tokio::time::timeout(Duration::from_secs(120), &mut r.task).await {
            Ok(res) => res.unwrap().unwrap_or_else(|e| panic!("n{i} stopped with {e:#}")),
            Err(_) => panic!("n{i} did not stop within 120 s"),
        }
        self.net.detach(self.slots[i].gossip);
        r.scope.kill();
    }

    pub async fn drain(&mut self, i: usize) {
        let r = self.admin(i).drain(pb::DrainRequest { timeout_ms: 60_000 }).await;
        let r = r.unwrap_or_else(|s| panic!("drain n{i}: {s:?}")).into_inner();
        assert!(r.drained, "n{i} not drained: {r:?}");
        self.leave(i).await;
    }

    pub fn partition(&self, a: &[usize], b: &[usize]) {
        for x in a {
            for y in b {
                self.net.cut(gossip(*x), gossip(*y));
            }
        }
    }

    pub fn heal(&self) {
        self.net.heal();
    }

    pub fn channel(&self, i: usize) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.slots[i].grpc))
            .unwrap()
            .connect_timeout(Duration::from_secs(1))
            .connect_with_connector_lazy(self.net.connector(self.client))
    }

    pub fn locations(&self, i: usize) -> LocationsClient<Channel> {
        LocationsClient::new(self.channel(i))
    }

    pub fn trips(&self, i: usize) -> TripsClient<Channel> {
        TripsClient::new(self.channel(i))
    }

    pub fn dispatch(&self, i: usize) -> DispatchClient<Channel> {
        DispatchClient::new(self.channel(i))
    }

    pub fn admin(&self, i: usize) -> ClusterClient<Channel> {
        ClusterClient::new(self.channel(i))
    }

    /// A running node picked at random (never a frozen one: a client would time out on
    /// it and go elsewhere).
    pub fn any(&mut self) -> usize {
        let r: Vec<usize> = self.running().into_iter().filter(|i| !self.slots[*i].frozen).collect();
        r[self.rand(r.len())]
    }

    pub fn freeze(&mut self, i: usize) {
        self.slots[i].run.as_ref().expect("running").scope.freeze();
        self.slots[i].frozen = true;
    }

    pub fn thaw(&mut self, i: usize) {
        self.slots[i].run.as_ref().expect("running").scope.thaw();
        self.slots[i].frozen = false;
    }

    /// See [`Op::Converge`]. Panics after `within` of virtual time.
    pub async fn converge(&self, nodes: &[usize], within: Duration) -> Duration {
        let t0 = tokio::time::Instant::now();
        let mut want: Vec<String> = nodes.iter().map(|i| format!("n{i}")).collect();
        want.sort();
        let replicas = self.extra.windows(2).any(|w| w[0] == "--replicas" && w[1] != "0");
        let mut last = String::new();
        while t0.elapsed() < within {
            match self.settled(nodes, &want, replicas).await {
                Ok(()) => return t0.elapsed(),
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no convergence on {want:?} within {within:?}; last: {last}");
    }

    async fn settled(&self, nodes: &[usize], want: &[String], replicas: bool) -> Result<(), String> {
        let mut sums = Vec::new();
        for &i in nodes {
            let m = self.admin(i).members(pb::MembersRequest {}).await.map_err(|e| format!("n{i}: {e}"))?;
            let m = m.into_inner();
            let mut ring: Vec<String> = m.members.iter().filter(|x| x.in_ring).map(|x| x.name.clone()).collect();
            ring.sort();
            if ring != want {
                return Err(format!("n{i} sees ring {ring:?}"));
            }
            // A member that left or died is known as down (a scatter would wait for it).
            let lingering: Vec<&str> = m
                .members
                .iter()
                .filter(|x| !x.in_ring && x.liveness != pb::Liveness::Down as i32)
                .map(|x| x.name.as_str())
                .collect();
            if !lingering.is_empty() {
                return Err(format!("n{i} still counts {lingering:?} alive"));
            }
            sums.push(m.ring_checksum);
        }
        if !sums.windows(2).all(|w| w[0] == w[1]) {
            return Err(format!("checksums differ: {sums:x?}"));
        }
        let mut owned: HashMap<u32, Vec<(usize, u64)>> = HashMap::new();
        let mut copies: HashMap<(u32, u64), usize> = HashMap::new();
        for &i in nodes {
            let r = self.admin(i).partitions(pb::PartitionsRequest {}).await.map_err(|e| format!("n{i}: {e}"))?;
            let r = r.into_inner();
            if !r.serving {
                return Err(format!("n{i} does not serve (no quorum lease yet)"));
            }
            for row in r.rows {
                match row.state.as_str() {
                    "owned" => owned.entry(row.partition).or_default().push((i, row.epoch)),
                    "replica" if row.in_sync => *copies.entry((row.partition, row.epoch)).or_default() += 1,
                    "replica" | "parked" => {}
                    other => return Err(format!("n{i}: p{} is {other}", row.partition)),
                }
            }
        }
        for p in 0..locus::keys::PARTITIONS as u32 {
            match owned.get(&p).map(Vec::as_slice) {
                Some([(_, e)]) => {
                    if replicas && nodes.len() > 1 && !copies.contains_key(&(p, *e)) {
                        return Err(format!("p{p} has no in-sync replica"));
                    }
                }
                Some(more) => return Err(format!("p{p} owned by {more:?}")),
                None => return Err(format!("p{p} owned by none")),
            }
        }
        Ok(())
    }

    /// Runs the ops in order; `Check` asserts the model against the cluster.
    pub async fn run(&mut self, ops: &[Op]) {
        for (k, op) in ops.iter().enumerate() {
            let t = tokio::time::Instant::now();
            eprintln!("[sim] step {k}: {op:?}");
            self.step(op, &format!("step {k} ({op:?})")).await;
            eprintln!("[sim] step {k} done in {:?} virtual", t.elapsed());
        }
        eprintln!("[sim] {} operations ok, {} refused (retryable)", self.model.ok, self.model.failed);
    }

    pub async fn step(&mut self, op: &Op, stage: &str) {
        match op {
            Op::Start(i) => self.start(*i),
            Op::Kill(i) => {
                self.kill(*i).await;
                self.last_kill = Some(tokio::time::Instant::now());
                self.model.crashed(tokio::time::Instant::now());
            }
            Op::Restart(i) => self.restart(*i).await,
            Op::Leave(i) => self.leave(*i).await,
            Op::Drain(i) => self.drain(*i).await,
            Op::Freeze(i) => {
                let mut model = std::mem::take(&mut self.model);
                model.matches_in_flight(self, *i, 6, stage).await;
                self.model = model;
                self.freeze(*i);
                // What it acknowledged just before may not have reached its replicas.
                self.model.crashed(tokio::time::Instant::now());
            }
            Op::Thaw(i) => {
                self.thaw(*i);
                self.last_kill = Some(tokio::time::Instant::now());
                self.model.settle_in_flight(stage).await;
            }
            Op::Partition(a, b) => {
                eprintln!("[sim] partition at {:?}", tokio::time::Instant::now());
                self.partition(a, b)
            }
            Op::Heal => {
                self.heal();
                self.last_kill = Some(tokio::time::Instant::now());
            }
            Op::Wait(d) => tokio::time::sleep(*d).await,
            Op::Converge(nodes) => {
                self.converge(nodes, Duration::from_secs(120)).await;
            }
            Op::SendFixes(n) => {
                let mut model = std::mem::take(&mut self.model);
                model.send_fixes(self, *n, stage).await;
                self.model = model;
            }
            Op::Trips(n) => {
                let mut model = std::mem::take(&mut self.model);
                model.trips(self, *n, stage).await;
                self.model = model;
            }
            Op::Check(nodes) => {
                let model = std::mem::take(&mut self.model);
                model.check(self, nodes, stage).await;
                self.model = model;
            }
        }
    }
}

impl Sim {
    /// A seeded random sequence of `steps` operations on a cluster that starts with
    /// three nodes: load, joins, leaves, drains, kills, restarts, freezes (some shorter
    /// than failure detection, some longer) and one-node partitions, never more than one
    /// node lost at once. After every disruption the
    /// cluster must converge and pass every check.
    pub async fn random(&mut self, steps: usize) {
        use Op::*;
        self.run(&[Start(0), Start(1), Start(2), Converge(vec![0, 1, 2])]).await;
        for k in 0..steps {
            let running = self.running();
            let stopped: Vec<usize> = (0..self.len()).filter(|i| !running.contains(i)).collect();
            let mut ops = vec![SendFixes(60), Trips(6)];
            match self.rand(7) {
                0 if !stopped.is_empty() => ops.push(Restart(stopped[self.rand(stopped.len())])),
                1 if running.len() > 3 => ops.push(Leave(running[self.rand(running.len())])),
                2 if running.len() > 3 => ops.push(Drain(running[self.rand(running.len())])),
                3 | 5 if running.len() >= 3 => {
                    // A crashed member counts in the quorum base until the others have
                    // confirmed it gone and BASE_FORGET passed (a node cut off meanwhile
                    // confirms only after the heal): a crash before then may leave no
                    // majority (by design), so space crashes (and freezes, which look
                    // the same to the others) from crashes and heals.
                    let forget = locus::handoff::BASE_FORGET + Duration::from_secs(5);
                    let since = self.last_kill.map_or(forget, |t| t.elapsed());
                    if since < forget {
                        ops.push(Wait(forget - since));
                    }
                    let victim = running[self.rand(running.len())];
                    if self.rand(2) == 0 {
                        ops.push(Kill(victim));
                    } else {
                        let stopped = Duration::from_secs(2 + self.rand(14) as u64);
                        ops.extend([Freeze(victim), Wait(stopped), SendFixes(30), Thaw(victim)]);
                    }
                }
                4 if running.len() >= 3 => {
                    let cut = running[self.rand(running.len())];
                    let rest: Vec<usize> = running.iter().copied().filter(|i| *i != cut).collect();
                    ops.extend([
                        Wait(Duration::from_secs(6)),
                        Partition(vec![cut], rest),
                        Wait(Duration::from_secs(12)),
                    ]);
                    ops.extend([SendFixes(30), Heal]);
                }
                _ => ops.push(Wait(Duration::from_secs(1 + self.rand(5) as u64))),
            }
            for op in ops {
                let stage = format!("random step {k} ({op:?})");
                eprintln!("[sim] {stage}");
                self.step(&op, &stage).await;
            }
            let now = self.running();
            let stage = format!("random step {k} settled on {now:?}");
            self.step(&Converge(now.clone()), &stage).await;
            self.step(&Check(now), &stage).await;
        }
        eprintln!("[sim] {} operations ok, {} refused (retryable)", self.model.ok, self.model.failed);
    }
}

fn init_logs() {
    // LOCUS_TEST_LOG=info,locus::handoff=debug (say) to see the nodes' logs.
    if let Ok(f) = std::env::var("LOCUS_TEST_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(f).with_test_writer().try_init();
    }
}

fn splitmix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
