//! `locus admin`: the operator's view of a cluster through any node's `Cluster` service.
//! `members`, `lookup KEY`, `ring`, `partitions`, `drain NODE` and `leave`, as an
//! aligned table or `--json`.

use std::time::Duration;

use crate::auth::layer::{AuthChannel, client_endpoint, client_tls};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::pb;
use crate::pb::cluster_client::ClusterClient;

/// Prints a line; a closed pipe (`| head`) ends the command quietly.
fn emit(s: &str) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    if let Err(e) = writeln!(o, "{s}") {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        panic!("writing to stdout: {e}");
    }
}

macro_rules! out {
    ($($t:tt)*) => { emit(&format!($($t)*)) };
}

#[derive(Args, Clone, Debug)]
pub struct AdminConfig {
    /// gRPC address of any node.
    #[arg(long, env = "LOCUS_ADDR", default_value = "http://127.0.0.1:7400", global = true)]
    pub addr: String,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: AdminCmd,
}

#[derive(Subcommand, Clone, Debug)]
pub enum AdminCmd {
    /// Every member with its state and the ring checksum it reports.
    Members,
    /// The owner and successors of a key.
    Lookup {
        key: String,
        #[arg(long, default_value_t = 3)]
        successors: u32,
    },
    /// The ring: checksum, virtual nodes and each member's share of the key space.
    Ring,
    /// Make the node leave the cluster gracefully and exit.
    Leave,
    /// Every partition on every member: owner, epoch, replicas, state (owned, incoming,
    /// outgoing, parked, replica), drivers, trips, claims, replica lag; then a summary.
    Partitions {
        /// Only the summary.
        #[arg(long)]
        summary: bool,
    },
    /// Move every partition off NODE (by name); it stays up, serving nothing, and is
    /// then safe to stop. Exits non-zero if the hand-off did not finish in time.
    Drain {
        node: String,
        #[arg(long, default_value = "60s", value_parser = crate::config::parse_duration)]
        timeout: Duration,
    },
}

fn liveness(v: i32) -> &'static str {
    match pb::Liveness::try_from(v) {
        Ok(pb::Liveness::Alive) => "alive",
        Ok(pb::Liveness::Suspect) => "suspect",
        Ok(pb::Liveness::Down) => "down",
        _ => "?",
    }
}

fn state(v: i32) -> &'static str {
    match pb::NodeState::try_from(v) {
        Ok(pb::NodeState::Joining) => "joining",
        Ok(pb::NodeState::Active) => "active",
        Ok(pb::NodeState::Leaving) => "leaving",
        _ => "unknown",
    }
}

/// Renders rows as columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<width$}", width = w[i])).collect();
        s.join("  ").trim_end().to_string()
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push('\n');
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

fn member_json(m: &pb::Member) -> serde_json::Value {
    json!({
        "name": m.name, "grpc_addr": m.grpc_addr, "gossip_addr": m.gossip_addr, "http_addr": m.http_addr,
        "liveness": liveness(m.liveness), "state": state(m.state), "incarnation": m.incarnation,
        "ring_checksum": format!("{:016x}", m.ring_checksum), "in_ring": m.in_ring, "is_self": m.is_self,
    })
}

/// Runs one admin command and prints its answer.
pub async fn run(cfg: AdminConfig) -> anyhow::Result<()> {
    let ch = client_endpoint(&cfg.addr)?.connect_timeout(Duration::from_secs(3)).connect().await?;
    let mut c = ClusterClient::new(AuthChannel::client(ch));
    match cfg.cmd {
        AdminCmd::Members => {
            let r = c.members(pb::MembersRequest {}).await?.into_inner();
            if cfg.json {
                let ms: Vec<_> = r.members.iter().map(member_json).collect();
                let v = json!({"node": r.node, "ring_checksum": format!("{:016x}", r.ring_checksum), "members": ms});
                out!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let agree = r.members.iter().filter(|m| m.in_ring).all(|m| m.ring_checksum == r.ring_checksum);
            out!(
                "asked {}; its ring {:016x}; {}",
                r.node,
                r.ring_checksum,
                if agree { "every ring member agrees" } else { "ring members DISAGREE (changing?)" }
            );
            let rows: Vec<Vec<String>> = r
                .members
                .iter()
                .map(|m| {
                    vec![
                        format!("{}{}", m.name, if m.is_self { " *" } else { "" }),
                        liveness(m.liveness).into(),
                        state(m.state).into(),
                        if m.in_ring { "yes" } else { "no" }.into(),
                        m.grpc_addr.clone(),
                        m.gossip_addr.clone(),
                        m.http_addr.clone(),
                        m.incarnation.to_string(),
                        format!("{:016x}", m.ring_checksum),
                    ]
                })
                .collect();
            let h = ["NAME", "LIVENESS", "STATE", "RING", "GRPC", "GOSSIP", "HTTP", "INCARNATION", "CHECKSUM"];
            out!("{}", table(&h, &rows));
        }
        AdminCmd::Lookup { key, successors } => {
            let r = c.lookup(pb::LookupRequest { key, successors }).await?.into_inner();
            if cfg.json {
                let v = json!({
                    "key": r.key, "partition": r.partition,
                    "owner": r.owner.as_ref().map(member_json),
                    "successors": r.successors.iter().map(member_json).collect::<Vec<_>>(),
                    "ring_checksum": format!("{:016x}", r.ring_checksum),
                });
                out!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            out!("key {:?} -> partition {} (ring {:016x})", r.key, r.partition, r.ring_checksum);
            let rows: Vec<Vec<String>> = r
                .successors
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let role = if i == 0 { "owner".to_string() } else { format!("successor {i}") };
                    vec![role, m.name.clone(), m.grpc_addr.clone(), m.gossip_addr.clone()]
                })
                .collect();
            out!("{}", table(&["ROLE", "NAME", "GRPC", "GOSSIP"], &rows));
        }
        AdminCmd::Ring => {
            let r = c.ring_info(pb::RingInfoRequest {}).await?.into_inner();
            if cfg.json {
                let ms: Vec<_> = r
                    .members
                    .iter()
                    .map(|m| {
                        json!({"name": m.name, "gossip_addr": m.gossip_addr, "grpc_addr": m.grpc_addr,
                                     "vnodes": m.vnodes, "partitions": m.partitions, "share": m.share})
                    })
                    .collect();
                let v = json!({"checksum": format!("{:016x}", r.checksum), "vnodes_per_member": r.vnodes_per_member,
                               "partitions": r.partitions, "members": ms});
                out!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            out!(
                "ring {:016x}: {} members, {} virtual nodes each, {} partitions",
                r.checksum,
                r.members.len(),
                r.vnodes_per_member,
                r.partitions
            );
            let rows: Vec<Vec<String>> = r
                .members
                .iter()
                .map(|m| {
                    vec![
                        m.name.clone(),
                        m.gossip_addr.clone(),
                        m.grpc_addr.clone(),
                        m.vnodes.to_string(),
                        m.partitions.to_string(),
                        format!("{:.1}%", m.share * 100.0),
                    ]
                })
                .collect();
            out!("{}", table(&["NAME", "GOSSIP", "GRPC", "VNODES", "PARTITIONS", "SHARE"], &rows));
        }
        AdminCmd::Partitions { summary } => partitions(&mut c, cfg.json, summary).await?,
        AdminCmd::Drain { node, timeout } => {
            let members = c.members(pb::MembersRequest {}).await?.into_inner().members;
            let Some(m) = members.iter().find(|m| m.name == node) else {
                anyhow::bail!("no member named {node:?} (see `locus admin members`)");
            };
            let mut n = connect(&m.grpc_addr).await?;
            let mut req = tonic::Request::new(pb::DrainRequest { timeout_ms: timeout.as_millis() as u32 });
            req.set_timeout(timeout + Duration::from_secs(5));
            let r = n.drain(req).await?.into_inner();
            if cfg.json {
                let v = json!({"node": r.node, "drained": r.drained, "active": r.active, "lent": r.lent,
                               "parked": r.parked, "elapsed_ms": r.elapsed_ms});
                out!("{}", serde_json::to_string_pretty(&v)?);
            } else if r.drained {
                out!("{} drained in {} ms: it holds no partition; safe to stop", r.node, r.elapsed_ms);
            } else {
                out!("{} NOT drained after {} ms: still {} active, {} lent", r.node, r.elapsed_ms, r.active, r.lent);
            }
            if !r.drained {
                anyhow::bail!("drain of {} did not finish", r.node);
            }
        }
        AdminCmd::Leave => {
            let r = c.leave(pb::LeaveRequest {}).await?.into_inner();
            if cfg.json {
                out!("{}", json!({"leaving": r.node}));
            } else {
                out!("{} is leaving the cluster and will exit", r.node);
            }
        }
    }
    Ok(())
}

async fn connect(grpc: &str) -> anyhow::Result<ClusterClient<AuthChannel>> {
    // The same scheme as the node first asked (TLS clusters are TLS throughout).
    let scheme = if client_tls() { "https" } else { "http" };
    let ch = client_endpoint(&format!("{scheme}://{grpc}"))?.connect_timeout(Duration::from_secs(3)).connect().await?;
    Ok(ClusterClient::new(AuthChannel::client(ch)))
}

/// `admin partitions`: asks every live member for its partitions and merges them.
async fn partitions(c: &mut ClusterClient<AuthChannel>, as_json: bool, only_summary: bool) -> anyhow::Result<()> {
    let members = c.members(pb::MembersRequest {}).await?.into_inner().members;
    let mut answers = Vec::new();
    let mut silent = Vec::new();
    for m in members.iter().filter(|m| m.liveness != pb::Liveness::Down as i32 && !m.grpc_addr.is_empty()) {
        let got = async {
            let mut n = connect(&m.grpc_addr).await?;
            let mut req = tonic::Request::new(pb::PartitionsRequest {});
            req.set_timeout(Duration::from_secs(5));
            anyhow::Ok(n.partitions(req).await?.into_inner())
        };
        match got.await {
            Ok(r) => answers.push(r),
            Err(_) => silent.push(m.name.clone()),
        }
    }
    let mut rows: Vec<(&str, &pb::PartitionRow)> =
        answers.iter().flat_map(|a| a.rows.iter().map(move |r| (a.node.as_str(), r))).collect();
    rows.sort_by(|a, b| a.1.partition.cmp(&b.1.partition).then(a.0.cmp(b.0)));
    let lag: std::collections::HashMap<(&str, &str), &pb::ReplicaLag> =
        answers.iter().flat_map(|a| a.lag.iter().map(move |l| ((a.node.as_str(), l.peer.as_str()), l))).collect();
    let lag_of = |node: &str, r: &pb::PartitionRow| {
        r.peers.iter().filter_map(|p| lag.get(&(node, p.as_str())).map(|l| l.lag_ms)).max()
    };
    // The summary.
    let count = |s: &str| rows.iter().filter(|r| r.1.state == s).count();
    let mut owned_by: std::collections::BTreeMap<&str, usize> = Default::default();
    let owners: std::collections::HashMap<u32, (&str, u64, usize)> = rows
        .iter()
        .filter(|r| r.1.state == "owned")
        .map(|r| (r.1.partition, (r.0, r.1.epoch, r.1.peers.len())))
        .collect();
    for (_, (n, _, _)) in owners.iter() {
        *owned_by.entry(n).or_default() += 1;
    }
    let mut in_sync: std::collections::HashMap<u32, usize> = Default::default();
    for r in rows.iter().filter(|r| r.1.state == "replica" && r.1.in_sync) {
        if owners.get(&r.1.partition).is_some_and(|o| o.1 == r.1.epoch) {
            *in_sync.entry(r.1.partition).or_default() += 1;
        }
    }
    let under = owners.iter().filter(|(p, o)| in_sync.get(p).copied().unwrap_or(0) < o.2).count();
    let unowned = (0..crate::keys::PARTITIONS as u32).filter(|p| !owners.contains_key(p)).count();
    let sum = |f: fn(&pb::PartitionRow) -> u32| {
        rows.iter().filter(|r| r.1.state == "owned").map(|r| f(r.1) as u64).sum::<u64>()
    };
    let max_lag = answers.iter().flat_map(|a| a.lag.iter().map(|l| l.lag_ms)).max().unwrap_or(0);
    let per_node: Vec<String> = owned_by.iter().map(|(n, k)| format!("{n} {k}")).collect();
    let no_quorum: Vec<&str> = answers.iter().filter(|a| !a.serving).map(|a| a.node.as_str()).collect();
    let summary = format!(
        "{} partitions: {} owned ({}), {} unowned, {} incoming, {} outgoing, {} parked; {} replicas ({} in sync), {} under-replicated; {} drivers, {} trips, {} claims; max replica lag {} ms{}{}",
        crate::keys::PARTITIONS,
        owners.len(),
        per_node.join(", "),
        unowned,
        count("incoming"),
        count("outgoing"),
        count("parked"),
        count("replica"),
        rows.iter().filter(|r| r.1.state == "replica" && r.1.in_sync).count(),
        under,
        sum(|r| r.drivers),
        sum(|r| r.trips),
        sum(|r| r.claims),
        max_lag,
        if silent.is_empty() { String::new() } else { format!("; NOT ANSWERING: {}", silent.join(", ")) },
        if no_quorum.is_empty() {
            String::new()
        } else {
            format!("; NO QUORUM (serving nothing): {}", no_quorum.join(", "))
        }
    );
    if as_json {
        let rs: Vec<_> = rows
            .iter()
            .map(|(n, r)| {
                json!({"partition": r.partition, "node": n, "state": r.state, "epoch": r.epoch,
                       "ring_owner": r.ring_owner, "peers": r.peers, "drivers": r.drivers, "trips": r.trips,
                       "claims": r.claims, "in_sync": r.in_sync, "replica_lag_ms": lag_of(n, r)})
            })
            .collect();
        let v = json!({"summary": summary, "owned": owners.len(), "unowned": unowned, "under_replicated": under,
                       "max_replica_lag_ms": max_lag, "not_answering": silent, "partitions": rs});
        out!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if !only_summary {
        let table_rows: Vec<Vec<String>> = rows
            .iter()
            .map(|(n, r)| {
                let sync = match r.state.as_str() {
                    "replica" => if r.in_sync { "in sync" } else { "syncing" }.to_string(),
                    "owned" => lag_of(n, r).map_or("-".into(), |l| format!("{l} ms")),
                    _ => "-".into(),
                };
                vec![
                    r.partition.to_string(),
                    n.to_string(),
                    r.state.clone(),
                    r.epoch.to_string(),
                    r.ring_owner.clone(),
                    r.peers.join(","),
                    r.drivers.to_string(),
                    r.trips.to_string(),
                    r.claims.to_string(),
                    sync,
                ]
            })
            .collect();
        let h =
            ["PARTITION", "NODE", "STATE", "EPOCH", "RING OWNER", "PEERS", "DRIVERS", "TRIPS", "CLAIMS", "LAG / SYNC"];
        out!("{}", table(&h, &table_rows));
    }
    out!("{summary}");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn table_aligns_columns() {
        let t = super::table(&["A", "BB"], &[vec!["xyz".into(), "1".into()], vec!["q".into(), "22".into()]]);
        assert_eq!(t, "A    BB\nxyz  1\nq    22");
    }
}
