//! Compact UDP fixes on one node (`locus bench`, section "udp").
//!
//! `udp_drivers` drivers get a first fix over gRPC and a session each; then one client
//! sends `udp_rounds` rounds of one datagram per driver (sealed beforehand, each round
//! a second later and a few metres on) to one node receiving with `recvmmsg`: first as
//! fast as it can, then again (later rounds) paced at `udp_rate`. The client sends with
//! UDP segmentation offload ([`mmsg::send_segmented`]): it stands in for many phones,
//! whose sending costs the node nothing, and the node's socket still gets every datagram
//! on its own. The node's counters give what it received and accepted: the rate is
//! fixes accepted per second from the first datagram sent to the last one applied, and
//! the loss is what was sent but never received (the kernel's socket buffers
//! overflowing) or received but not accepted. The node's CPU time over the run, per
//! accepted fix, is its own cost whatever the client's (on loopback the kernel's IP and
//! UDP receive path runs on the sender's time, so it is not in it).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::task::JoinSet;

use super::{BenchConfig, Proc, metric, wait_port};
use crate::clock::wall_ms;
use crate::pb;
use crate::pb::sessions_client::SessionsClient;
use crate::sim::{connect, connect_channel};
use crate::udp::{SessionId, mmsg, quantise, seal};

/// Both runs of the section.
pub struct UdpFigures {
    pub drivers: usize,
    pub rounds: usize,
    pub bytes_min: usize,
    pub bytes_avg: f64,
    pub bytes_max: usize,
    /// As fast as the client can send.
    pub flood: UdpRun,
    /// Paced at `rate`.
    pub paced: UdpRun,
    pub rate: u64,
}

/// One run: what was sent, received and accepted, and how long it took.
pub struct UdpRun {
    pub sent: u64,
    pub received: u64,
    pub accepted: u64,
    pub secs: f64,
    /// The node's CPU time (user and system: its receive system calls, not the kernel's
    /// IP and UDP receive path, which on loopback runs on the sender's time) from the
    /// first datagram sent to the last one applied.
    pub node_cpu_secs: f64,
}

impl UdpRun {
    pub fn rate(&self) -> f64 {
        self.accepted as f64 / self.secs.max(1e-9)
    }

    /// The node's CPU time per accepted fix, microseconds.
    pub fn cpu_us_per_fix(&self) -> f64 {
        self.node_cpu_secs * 1e6 / self.accepted.max(1) as f64
    }
}

/// The node's datagrams received and fixes accepted so far.
async fn counters(http: &str) -> anyhow::Result<(u64, u64)> {
    let (_, page) = crate::sim::http_get(http, "/metrics").await?;
    let n = |name| metric(&page, name).unwrap_or(0.0) as u64;
    Ok((n("locus_udp_datagrams_total"), n("locus_udp_fixes_accepted_total")))
}

pub async fn run(cfg: &BenchConfig, dir: &std::path::Path) -> anyhow::Result<UdpFigures> {
    let port = cfg.port_base + 20;
    let udp: SocketAddr = format!("127.0.0.1:{}", port + 2).parse()?;
    let _node = Proc(
        super::node_command(cfg, "bench-udp", port, Some(port + 3), dir, ["--udp-addr", &udp.to_string()])?
            .spawn()
            .context("starting locus node")?,
    );
    wait_port(port).await?;
    let target = format!("http://127.0.0.1:{port}");
    let http = format!("127.0.0.1:{}", port + 1);
    let n = cfg.udp_drivers;
    let rounds = cfg.udp_rounds;
    let base = wall_ms() - (2 * rounds as i64 + 5) * 1_000;
    let home = |i: usize| (52.40 + (i % 1_000) as f64 * 2e-4, 13.20 + (i / 1_000) as f64 * 2e-4);

    // First fixes over gRPC.
    let mut loc = connect(&target).await?;
    for chunk in (0..n).collect::<Vec<_>>().chunks(1_000) {
        let updates: Vec<pb::LocationUpdate> = chunk
            .iter()
            .map(|&i| pb::LocationUpdate {
                driver_id: format!("udp-{i}"),
                lat: home(i).0,
                lon: home(i).1,
                timestamp_ms: base,
                status: pb::DriverStatus::Available as i32,
                ..Default::default()
            })
            .collect();
        let r = loc.update_stream(tokio_stream::iter(vec![pb::LocationBatch { updates, batch_id: 1 }])).await?;
        let mut acks = r.into_inner();
        while acks.message().await?.is_some() {}
    }
    // Sessions, 64 at a time.
    let ch = connect_channel(&target).await?;
    let mut keys: Vec<Option<(SessionId, [u8; 16])>> = vec![None; n];
    let mut set = JoinSet::new();
    let mut next = 0;
    while next < n || !set.is_empty() {
        while next < n && set.len() < 64 {
            let mut c = SessionsClient::new(ch.clone());
            let i = next;
            set.spawn(async move { (i, c.open(pb::OpenSessionRequest { driver_id: format!("udp-{i}") }).await) });
            next += 1;
        }
        if let Some(r) = set.join_next().await {
            let (i, s) = r?;
            let s = s?.into_inner();
            keys[i] = Some((SessionId(s.session_id), s.key.as_slice().try_into()?));
        }
    }
    // Every datagram, sealed beforehand: the client's cost is not the node's. Round r
    // of run `k` is round k * rounds + r of the drivers' day.
    let seal_rounds = |k: usize| -> anyhow::Result<Vec<Vec<u8>>> {
        let mut datagrams = Vec::with_capacity(n * rounds);
        for r in k * rounds + 1..=(k + 1) * rounds {
            for (i, s) in keys.iter().enumerate() {
                let (id, key) = s.as_ref().context("a session did not open")?;
                let (lat, lon) = home(i);
                let t = base + r as i64 * 1_000;
                let f = quantise(*id, lat + r as f64 * 5e-5, lon, t, 0.0, 5.5, 5.0, r as u32);
                datagrams.push(seal(&f, key));
            }
        }
        Ok(datagrams)
    };
    let datagrams = seal_rounds(0)?;
    let bytes_min = datagrams.iter().map(Vec::len).min().unwrap_or(0);
    let bytes_max = datagrams.iter().map(Vec::len).max().unwrap_or(0);
    let bytes_avg = datagrams.iter().map(Vec::len).sum::<usize>() as f64 / datagrams.len().max(1) as f64;
    eprintln!("[bench] udp: {n} drivers x {rounds} rounds, {bytes_avg:.1} bytes per datagram");
    let pid = _node.0.id();
    let flood = send_run(&http, pid, udp, &datagrams, 0).await?;
    drop(datagrams);
    eprintln!("[bench] udp: as fast as the client can: {:.0} fixes/s", flood.rate());
    let paced = send_run(&http, pid, udp, &seal_rounds(1)?, cfg.udp_rate).await?;
    eprintln!("[bench] udp: paced at {}/s: {:.0} fixes/s", cfg.udp_rate, paced.rate());
    Ok(UdpFigures { drivers: n, rounds, bytes_min, bytes_avg, bytes_max, flood, paced, rate: cfg.udp_rate })
}

/// Sends `datagrams` to the node (at `rate` a second, or as fast as the client can when
/// 0) and waits until it has applied what it received.
async fn send_run(http: &str, pid: u32, udp: SocketAddr, datagrams: &[Vec<u8>], rate: u64) -> anyhow::Result<UdpRun> {
    let (recv0, acc0) = counters(http).await?;
    let cpu0 = super::cpu_secs(pid)?;
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let t0 = Instant::now();
    let mut sent = 0u64;
    if rate == 0 {
        for chunk in datagrams.chunks(4_096) {
            sent += mmsg::send_segmented(&sock, udp, chunk).await? as u64;
        }
    } else {
        // What is due by now, every millisecond.
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        while (sent as usize) < datagrams.len() {
            tick.tick().await;
            let due = ((t0.elapsed().as_secs_f64() * rate as f64) as usize).min(datagrams.len());
            if due > sent as usize {
                sent += mmsg::send_segmented(&sock, udp, &datagrams[sent as usize..due]).await? as u64;
            }
        }
    }
    // Until the node has applied everything it received (asked every 10 ms: the run's
    // end is known to within 10 ms).
    let (mut last, mut last_change) = ((0, 0), Instant::now());
    let mut done_at = t0.elapsed();
    let mut cpu1 = cpu0;
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let c = counters(http).await?;
        if c != last {
            last = c;
            last_change = Instant::now();
            done_at = t0.elapsed();
            cpu1 = super::cpu_secs(pid)?;
        } else if last_change.elapsed() >= Duration::from_millis(1_000) {
            break;
        }
    }
    let (received, accepted) = (last.0 - recv0, last.1 - acc0);
    Ok(UdpRun { sent, received, accepted, secs: done_at.as_secs_f64(), node_cpu_secs: cpu1 - cpu0 })
}

pub fn report(f: &UdpFigures, out: &mut String) -> std::fmt::Result {
    writeln!(out, "\n## Compact UDP fixes (one node, `recvmmsg`)\n")?;
    writeln!(
        out,
        "| figure ({} drivers × {} rounds a run) | as fast as the client can | paced at {}/s | target |",
        f.drivers, f.rounds, f.rate
    )?;
    writeln!(out, "|---|---|---|---|")?;
    let row = |out: &mut String, name: &str, v: &dyn Fn(&UdpRun) -> String, target: &str| {
        writeln!(out, "| {name} | {} | {} | {target} |", v(&f.flood), v(&f.paced))
    };
    row(out, "fixes accepted per second", &|r| format!("**{:.0}/s**", r.rate()), "≥ 500,000/s")?;
    row(
        out,
        "the node's CPU time per accepted fix (user + system)",
        &|r| format!("{:.2} µs", r.cpu_us_per_fix()),
        "–",
    )?;
    row(
        out,
        "datagrams sent / received by the node / accepted",
        &|r| format!("{} / {} / {}", r.sent, r.received, r.accepted),
        "–",
    )?;
    row(
        out,
        "lost in the kernel (socket buffers full)",
        &|r| {
            let lost = r.sent.saturating_sub(r.received);
            format!("{lost} ({:.2}%)", 100.0 * lost as f64 / r.sent.max(1) as f64)
        },
        "counted, reported",
    )?;
    writeln!(
        out,
        "| bytes per datagram (min / mean / max) | {} / {:.1} / {} | | ≤ 60 |",
        f.bytes_min, f.bytes_avg, f.bytes_max
    )?;
    Ok(())
}
