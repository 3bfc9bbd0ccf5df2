//! Scripted membership tests over the in-process network, in virtual time.

use super::*;
use crate::memnet::MemNet;
use rand::SeedableRng;

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, i as u8 + 1], 7946))
}

fn config(i: usize, seeds: Vec<SocketAddr>) -> MembershipConfig {
    MembershipConfig {
        gossip_addr: addr(i),
        seeds,
        name: format!("n{i}"),
        grpc: SocketAddr::from(([10, 0, 0, i as u8 + 1], 7400)),
        http: SocketAddr::from(([10, 0, 0, i as u8 + 1], 7480)),
        vnodes: 64,
        ring_debounce: Duration::from_millis(300),
        leave_wait: Duration::from_secs(5),
        suspect_to_down: Duration::from_secs(2),
        probe_period: Duration::from_millis(500),
        rebroadcast_every: Duration::from_secs(5),
    }
}

/// The operations a scenario is made of.
enum Op {
    /// Start node i, joining through the given seeds.
    Start(usize, Vec<usize>),
    /// Kill node i (no goodbye).
    Kill(usize),
    /// Cut node i off from every other node.
    Isolate(usize),
    Heal,
    /// Node i leaves gracefully.
    Leave(usize),
    /// Within the deadline, every node listed sees a ring of exactly these members, with
    /// equal checksums, and knows every member's metadata.
    Converge(Vec<usize>, Duration),
    /// Every listed node sees node `who` with an incarnation above `above`.
    IncarnationAbove {
        who: usize,
        above: u64,
        seen_by: Vec<usize>,
    },
}

struct Harness {
    net: MemNet,
    nodes: Vec<Option<Membership>>,
    boots: u64,
}

impl Harness {
    fn new(n: usize) -> Harness {
        Harness { net: MemNet::new(), nodes: (0..n).map(|_| None).collect(), boots: 1_000 }
    }

    fn view(&self, i: usize) -> Arc<ClusterView> {
        self.nodes[i].as_ref().expect("running").view.borrow().clone()
    }

    async fn run(&mut self, ops: Vec<Op>) {
        for op in ops {
            match op {
                Op::Start(i, seeds) => {
                    let (t, inbox) = self.net.endpoint(addr(i));
                    self.boots += 1_000;
                    let rng = StdRng::seed_from_u64(i as u64 + self.boots);
                    let cfg = config(i, seeds.into_iter().map(addr).collect());
                    self.nodes[i] = Some(spawn_with(cfg, t, inbox, rng, self.boots));
                }
                Op::Kill(i) => {
                    self.net.detach(addr(i));
                    self.nodes[i] = None;
                }
                Op::Isolate(i) => {
                    let all: Vec<SocketAddr> = (0..self.nodes.len()).map(addr).collect();
                    self.net.isolate(addr(i), &all);
                }
                Op::Heal => self.net.heal(),
                Op::Leave(i) => {
                    let m = self.nodes[i].take().expect("running");
                    let t0 = Instant::now();
                    m.leave().await;
                    assert!(
                        t0.elapsed() < Duration::from_secs(5),
                        "leave waited for its deadline: peers never dropped it"
                    );
                    self.net.detach(addr(i));
                }
                Op::Converge(who, within) => {
                    let t0 = Instant::now();
                    let want: Vec<SocketAddr> = {
                        let mut w: Vec<SocketAddr> = who.iter().map(|i| addr(*i)).collect();
                        w.sort_by_key(crate::ring::addr_bytes);
                        w
                    };
                    loop {
                        let views: Vec<_> = who.iter().map(|i| self.view(*i)).collect();
                        let ok = views.iter().all(|v| {
                            v.ring.members() == want
                                && v.ring.checksum() == views[0].ring.checksum()
                                && want.iter().all(|a| v.meta(a).is_some_and(|m| m.ring_checksum == v.ring.checksum()))
                        });
                        if ok {
                            break;
                        }
                        if t0.elapsed() > within {
                            let seen: Vec<_> = views.iter().map(|v| v.ring.members().to_vec()).collect();
                            panic!("no convergence on {want:?} within {within:?}: rings {seen:?}");
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                Op::IncarnationAbove { who, above, seen_by } => {
                    for i in seen_by {
                        let v = self.view(i);
                        let inc = v.member(&addr(who)).map(|m| m.incarnation).unwrap_or(0);
                        assert!(inc > above, "node {i} sees node {who} at incarnation {inc}, not above {above}");
                    }
                }
            }
        }
    }
}

/// Nodes 0, 1 and 2, joining through node 0, converged.
fn three_nodes() -> Vec<Op> {
    vec![
        Op::Start(0, vec![]),
        Op::Start(1, vec![0]),
        Op::Start(2, vec![0]),
        Op::Converge(vec![0, 1, 2], Duration::from_secs(5)),
    ]
}

#[tokio::test(start_paused = true)]
async fn three_nodes_converge_and_a_late_joiner_learns_all_metadata() {
    let mut h = Harness::new(4);
    h.run(vec![
        Op::Start(0, vec![]),
        Op::Start(1, vec![0]),
        Op::Start(2, vec![0, 1]),
        Op::Converge(vec![0, 1, 2], Duration::from_secs(5)),
    ])
    .await;
    // Long after the first broadcasts stopped circulating, a fourth node joins through
    // one seed and still learns everybody's name and addresses.
    tokio::time::sleep(Duration::from_secs(60)).await;
    h.run(vec![Op::Start(3, vec![2]), Op::Converge(vec![0, 1, 2, 3], Duration::from_secs(5))]).await;
    let v = h.view(3);
    for i in 0..4 {
        let m = v.meta(&addr(i)).expect("metadata");
        assert_eq!(m.name, format!("n{i}"));
        assert_eq!(m.state, NodeState::Active);
    }
}

#[tokio::test(start_paused = true)]
async fn a_killed_node_leaves_the_ring_within_five_seconds_and_rejoins_after_restart() {
    let mut h = Harness::new(3);
    h.run(three_nodes()).await;
    let old = h.view(0).member(&addr(2)).expect("member").incarnation;
    // The deadline is the assertion: detection within 5 s (virtual time).
    h.run(vec![Op::Kill(2), Op::Converge(vec![0, 1], Duration::from_secs(5))]).await;
    h.run(vec![
        Op::Start(2, vec![0, 1]),
        Op::Converge(vec![0, 1, 2], Duration::from_secs(10)),
        Op::IncarnationAbove { who: 2, above: old, seen_by: vec![0, 1] },
    ])
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_partition_heals_by_itself() {
    let mut h = Harness::new(3);
    h.run(three_nodes()).await;
    h.run(vec![
        Op::Isolate(0),
        // Each side goes on alone: the majority without 0, and 0 by itself.
        Op::Converge(vec![1, 2], Duration::from_secs(10)),
        Op::Converge(vec![0], Duration::from_secs(10)),
        Op::Heal,
        Op::Converge(vec![0, 1, 2], Duration::from_secs(20)),
    ])
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_leaving_node_is_dropped_before_it_exits() {
    let mut h = Harness::new(3);
    h.run(three_nodes()).await;
    h.run(vec![
        Op::Leave(2),
        // Already converged: the peers dropped it while it was still answering.
        Op::Converge(vec![0, 1], Duration::ZERO),
    ])
    .await;
}

/// A joiner's metadata reaches every member well before the periodic rebroadcast (5 s),
/// whatever the random choices of gossip targets: members compare ring checksums for
/// their quorum lease and must not lag each other by seconds.
#[tokio::test(start_paused = true)]
async fn every_member_learns_a_joiner_within_a_second() {
    for trial in 0..12u64 {
        let mut h = Harness::new(4);
        h.boots = 7_000 + trial * 131;
        h.run(three_nodes()).await;
        // Past the first broadcasts' circulation: only the join's own messages count.
        tokio::time::sleep(Duration::from_secs(20)).await;
        h.run(vec![Op::Start(3, vec![trial as usize % 3]), Op::Converge(vec![0, 1, 2, 3], Duration::from_secs(1))])
            .await;
    }
}
