//! A cluster of real node processes on loopback with pinned ports (a restarted node keeps
//! its gossip address, its identity on the ring).

use std::time::{Duration, Instant};

use locus::pb;
use locus::pb::cluster_client::ClusterClient;
use tonic::transport::Channel;

use super::NodeProc;

/// A free loopback port (TCP and UDP), released for the node to bind. Picked below the
/// kernel's ephemeral range (Linux: 32768–60999), where outgoing connections and
/// `bind(0)` take theirs: a pinned port from that range could be taken by another
/// test's connection before the node binds it. Each test process walks from its own
/// random point, so concurrent tests rarely try the same ports.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    if NEXT.load(Ordering::Relaxed) == u32::MAX {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
        let seed = std::process::id().wrapping_mul(7_919).wrapping_add(nanos);
        let _ = NEXT.compare_exchange(u32::MAX, seed % SPAN, Ordering::Relaxed, Ordering::Relaxed);
    }
    loop {
        let p = (LOW + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() && std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok()
        {
            return p;
        }
    }
}

/// N nodes with pinned ports (a restart keeps its identity), all joining node 0.
pub struct TestCluster {
    pub dirs: Vec<tempfile::TempDir>,
    pub args: Vec<Vec<String>>,
    pub nodes: Vec<Option<NodeProc>>,
}

impl TestCluster {
    pub fn start(n: usize) -> TestCluster {
        Self::start_with(n, &[])
    }

    /// Like `start`, with extra flags for every node.
    pub fn start_with(n: usize, extra: &[&str]) -> TestCluster {
        Self::start_some(n, n, extra)
    }

    /// Prepares `total` nodes (all joining n0) and launches the first `running`; the
    /// others are started later with [`launch`](Self::launch).
    pub fn start_some(total: usize, running: usize, extra: &[&str]) -> TestCluster {
        let n = total;
        let gossip: Vec<String> = (0..n).map(|_| format!("127.0.0.1:{}", free_port())).collect();
        let mut c = TestCluster { dirs: Vec::new(), args: Vec::new(), nodes: Vec::new() };
        for (i, g) in gossip.iter().enumerate() {
            let mut a = vec![
                "--node-name".to_string(),
                format!("n{i}"),
                "--gossip-addr".into(),
                g.clone(),
                "--grpc-addr".into(),
                format!("127.0.0.1:{}", free_port()),
                "--shards".into(),
                "2".into(),
            ];
            a.extend(extra.iter().map(|s| s.to_string()));
            if i > 0 {
                a.extend(["--join".to_string(), gossip[0].clone()]);
            }
            c.args.push(a);
            c.dirs.push(tempfile::tempdir().unwrap());
            c.nodes.push(None);
            if i < running {
                c.launch(i);
            }
        }
        c
    }

    pub fn launch(&mut self, i: usize) {
        let args: Vec<&str> = self.args[i].iter().map(String::as_str).collect();
        self.nodes[i] = Some(NodeProc::start(self.dirs[i].path(), &args));
    }

    pub fn node(&self, i: usize) -> &NodeProc {
        self.nodes[i].as_ref().expect("running")
    }

    pub async fn client(
        &self,
        i: usize,
    ) -> locus::pb::locations_client::LocationsClient<locus::auth::layer::AuthChannel> {
        self.node(i).client().await
    }

    pub async fn admin(&self, i: usize) -> ClusterClient<Channel> {
        ClusterClient::connect(self.node(i).grpc.clone()).await.unwrap()
    }

    /// Waits until every running node routes by the same ring of exactly `want` nodes
    /// (by name) and reports it, and is ready (`/readyz`: every partition it owns is
    /// handed over to it); returns how long that took.
    pub async fn converge(&self, want: &[&str], within: Duration) -> Duration {
        let running: Vec<usize> = (0..self.nodes.len()).filter(|i| self.nodes[*i].is_some()).collect();
        self.converge_on(&running, want, within).await
    }

    /// Every partition a node owns has an in-sync replica (at its epoch) on each of its
    /// replica targets: claims and trip events are acknowledged only then.
    pub async fn replicas_in_sync(&self, running: &[usize]) -> Result<(), String> {
        let mut rows = Vec::new();
        for &i in running {
            let mut a = ClusterClient::connect(self.node(i).grpc.clone()).await.map_err(|e| e.to_string())?;
            let r = a.partitions(pb::PartitionsRequest {}).await.map_err(|e| e.to_string())?.into_inner();
            rows.extend(r.rows.into_iter().map(|row| (r.node.clone(), row)));
        }
        let synced: std::collections::HashSet<(&str, u32, u64)> = rows
            .iter()
            .filter(|(_, r)| r.state == "replica" && r.in_sync)
            .map(|(n, r)| (n.as_str(), r.partition, r.epoch))
            .collect();
        let mut missing = 0;
        let mut some = Vec::new();
        for (owner, r) in rows.iter().filter(|(_, r)| r.state == "owned") {
            for p in r.peers.iter().filter(|p| !synced.contains(&(p.as_str(), r.partition, r.epoch))) {
                missing += 1;
                if some.len() < 3 {
                    // What the target holds of it instead, for the failure message.
                    let held: Vec<String> = rows
                        .iter()
                        .filter(|(n, x)| n == p && x.partition == r.partition)
                        .map(|(_, x)| format!("{} e{} in_sync={} of {:?}", x.state, x.epoch, x.in_sync, x.peers))
                        .collect();
                    some.push(format!("p{} e{} of {owner} on {p}: {held:?}", r.partition, r.epoch));
                }
            }
        }
        if missing == 0 { Ok(()) } else { Err(format!("{missing} replicas not in sync, e.g. {some:?}")) }
    }

    /// [`converge`](Self::converge) as seen by some of the running nodes only.
    pub async fn converge_on(&self, running: &[usize], want: &[&str], within: Duration) -> Duration {
        self.converge_inner(running, want, within, true).await
    }

    /// One ring, every node ready; replicas not waited for (failure detection timing).
    pub async fn converge_ring(&self, want: &[&str], within: Duration) -> Duration {
        let running: Vec<usize> = (0..self.nodes.len()).filter(|i| self.nodes[*i].is_some()).collect();
        self.converge_inner(&running, want, within, false).await
    }

    async fn converge_inner(&self, running: &[usize], want: &[&str], within: Duration, replicas: bool) -> Duration {
        let t0 = Instant::now();
        let running = running.to_vec();
        let mut last = String::new();
        while t0.elapsed() < within {
            last.clear();
            let mut sums = Vec::new();
            let mut ok = true;
            for &i in &running {
                let Ok(mut a) = ClusterClient::connect(self.node(i).grpc.clone()).await else {
                    ok = false;
                    last += "connect failed ";
                    break;
                };
                let Ok(m) = a.members(pb::MembersRequest {}).await else {
                    ok = false;
                    last += "members failed ";
                    break;
                };
                let m = m.into_inner();
                let mut ring: Vec<&str> = m.members.iter().filter(|x| x.in_ring).map(|x| x.name.as_str()).collect();
                ring.sort();
                let reported = m.members.iter().filter(|x| x.in_ring).all(|x| x.ring_checksum == m.ring_checksum);
                last += &format!("[{}: ring {ring:?} {:x} reported-agree {reported}] ", m.node, m.ring_checksum);
                ok &= ring == want && reported;
                sums.push(m.ring_checksum);
            }
            if ok && sums.windows(2).all(|w| w[0] == w[1]) {
                let mut ready = true;
                for &i in &running {
                    let r = locus::sim::http_get(&self.node(i).http, "/readyz").await;
                    ready &= matches!(r, Ok((200, _)));
                }
                if !ready {
                    last += "not all ready";
                } else if !replicas {
                    return t0.elapsed();
                } else {
                    match self.replicas_in_sync(&running).await {
                        Ok(()) => return t0.elapsed(),
                        Err(why) => last += &why,
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no convergence on {want:?} within {within:?}; last: {last}");
    }
}
