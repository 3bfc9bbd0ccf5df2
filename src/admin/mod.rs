//! `locus admin`: the operator's view of a cluster through any node's `Cluster` service.
//! `members`, `lookup KEY`, `ring` and `leave`, as an aligned table or `--json`.

use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::json;
use tonic::transport::Endpoint;

use crate::pb;
use crate::pb::cluster_client::ClusterClient;

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
    let ch = Endpoint::from_shared(cfg.addr.clone())?.connect_timeout(Duration::from_secs(3)).connect().await?;
    let mut c = ClusterClient::new(ch);
    match cfg.cmd {
        AdminCmd::Members => {
            let r = c.members(pb::MembersRequest {}).await?.into_inner();
            if cfg.json {
                let ms: Vec<_> = r.members.iter().map(member_json).collect();
                let v = json!({"node": r.node, "ring_checksum": format!("{:016x}", r.ring_checksum), "members": ms});
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let agree = r.members.iter().filter(|m| m.in_ring).all(|m| m.ring_checksum == r.ring_checksum);
            println!(
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
            println!("{}", table(&h, &rows));
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
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!("key {:?} -> partition {} (ring {:016x})", r.key, r.partition, r.ring_checksum);
            let rows: Vec<Vec<String>> = r
                .successors
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let role = if i == 0 { "owner".to_string() } else { format!("successor {i}") };
                    vec![role, m.name.clone(), m.grpc_addr.clone(), m.gossip_addr.clone()]
                })
                .collect();
            println!("{}", table(&["ROLE", "NAME", "GRPC", "GOSSIP"], &rows));
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
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!(
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
            println!("{}", table(&["NAME", "GOSSIP", "GRPC", "VNODES", "PARTITIONS", "SHARE"], &rows));
        }
        AdminCmd::Leave => {
            let r = c.leave(pb::LeaveRequest {}).await?.into_inner();
            if cfg.json {
                println!("{}", json!({"leaving": r.node}));
            } else {
                println!("{} is leaving the cluster and will exit", r.node);
            }
        }
    }
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
