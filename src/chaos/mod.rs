//! `locus chaos`: breaks a real cluster on purpose, under load, and checks every
//! acknowledged operation against the history its clients recorded.
//!
//! Each scenario starts a fresh cluster of real node processes, each on a host of its
//! own ([`lab`]: network namespaces with their own addresses; authentication on), runs
//! the workload ([`history`]: gateways, riders, event watchers, plus `locus sim`
//! streaming fixes and booking trips), injects its fault, heals, waits until the cluster
//! converges (every node on one ring checksum and ready), lets the timers fall due, and
//! runs the checker ([`check`]). Scenarios:
//!
//! | name | fault |
//! |---|---|
//! | `kill` | `kill -9` one of 3 nodes; restart it after 6 s |
//! | `pause` | SIGSTOP one of 3 for 6 s (past failure detection), then SIGCONT |
//! | `partition` | cut one of 3 off from the others for 8 s (clients still reach it) |
//! | `rolling` | restart every node in turn (SIGTERM, restart, converge) |
//! | `split` | 4 nodes split 2–2 for 8 s (neither half has a quorum) |
//! | `scale` | 3 → 5 (two joins) → 3 (two drains, then SIGTERM) |
//! | `badlink` | 80 ms ± 40 ms delay and 10% loss on one node's link for 10 s |
//!
//! `--short` runs kill, pause, partition and rolling (CI). The suite prints one table
//! row per scenario and exits non-zero on any violation; node logs and the report stay
//! in `--dir`.

pub mod check;
pub mod history;
pub mod lab;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::auth::layer::bearer_value;
use crate::auth::{Role, line_for, new_token};
use crate::pb;
use crate::pb::cluster_client::ClusterClient;
use history::{History, Load, Targets};
use lab::{Lab, NodeProc, host_ip};

pub const SHORT: [&str; 4] = ["kill", "pause", "partition", "rolling"];
pub const ALL: [&str; 7] = ["kill", "pause", "partition", "rolling", "split", "scale", "badlink"];

#[derive(Args, Clone, Debug)]
pub struct ChaosConfig {
    /// The short form (kill, pause, partition, rolling), as CI runs it.
    #[arg(long)]
    pub short: bool,
    /// Scenarios to run (default: all, or the short form).
    #[arg(long, value_delimiter = ',')]
    pub scenarios: Vec<String>,
    /// Node logs, data and the report go here (emptied first).
    #[arg(long, default_value = "target/chaos")]
    pub dir: PathBuf,
    /// The locus binary the nodes run (default: this one).
    #[arg(long)]
    pub locus: Option<PathBuf>,
    /// Drivers the checked gateways send fixes for (one a second each).
    #[arg(long, default_value_t = 200)]
    pub drivers: usize,
    /// Concurrent riders booking and matching checked trips.
    #[arg(long, default_value_t = 3)]
    pub riders: usize,
    /// Drivers of the background simulator (0: no simulator).
    #[arg(long, default_value_t = 1000)]
    pub sim_drivers: usize,
    /// On a violation, keep the cluster up this long before stopping it (to look at it
    /// with `locus admin`: the admin token is in the scenario's directory).
    #[arg(long, default_value = "0s", value_parser = crate::config::parse_duration)]
    pub hold_on_failure: Duration,
}

/// One scenario's row.
#[derive(Debug)]
pub struct Row {
    pub name: String,
    pub ok: u64,
    pub failed: u64,
    pub unknown: u64,
    pub verdict: check::Verdict,
    pub converge: Duration,
    pub secs: f64,
    pub log_problems: Vec<String>,
}

impl Row {
    pub fn passed(&self) -> bool {
        self.verdict.violations.is_empty() && self.log_problems.is_empty()
    }
}

const OFFER_TIMEOUT: Duration = Duration::from_secs(3);
const TRIP_BUFFER: Duration = Duration::from_secs(8);

/// A running scenario: its nodes, clients and history.
struct Run {
    lab: Arc<Lab>,
    nodes: Vec<Option<NodeProc>>,
    targets: Targets,
    admin: String,
    history: Arc<Mutex<History>>,
    stop: watch::Sender<bool>,
    load: Option<tokio::task::JoinHandle<()>>,
    sim: Option<std::process::Child>,
    node_flags: Vec<String>,
}

impl Run {
    async fn begin(lab: Arc<Lab>, cfg: &ChaosConfig, hosts: &[usize], prefix: &str) -> anyhow::Result<Run> {
        let dir = &lab.dir;
        let client = new_token();
        let admin = new_token();
        std::fs::write(
            dir.join("tokens"),
            format!(
                "{}\n{}\n",
                line_for(&client, &[Role::Gateway, Role::Dispatch, Role::Reader], "chaos-client"),
                line_for(&admin, &[Role::Admin], "chaos-admin")
            ),
        )?;
        std::fs::write(dir.join("client.token"), &client)?;
        std::fs::write(dir.join("cluster.key"), new_token())?;
        let node_flags: Vec<String> = [
            "--auth-file",
            &dir.join("tokens").display().to_string(),
            "--cluster-key-file",
            &dir.join("cluster.key").display().to_string(),
            "--shards",
            "2",
            "--offer-timeout",
            "3s",
            "--trip-buffer",
            "8s",
            "--handoff-timeout",
            "20s",
        ]
        .map(String::from)
        .to_vec();
        let mut nodes: Vec<Option<NodeProc>> = (0..=lab.hosts).map(|_| None).collect();
        for &i in hosts {
            nodes[i] = Some(NodeProc::start(&lab, i, hosts, &node_flags)?);
        }
        let targets = Targets::new(bearer_value(&client)?);
        let mut run = Run {
            lab,
            nodes,
            targets,
            admin,
            history: Arc::default(),
            stop: watch::channel(false).0,
            load: None,
            sim: None,
            node_flags,
        };
        run.converge(hosts, Duration::from_secs(30)).await.context("the cluster did not form")?;
        run.targets.set(&hosts.iter().map(|i| format!("http://{}:7400", host_ip(*i))).collect::<Vec<_>>());
        let load = Load {
            drivers: cfg.drivers,
            riders: cfg.riders,
            offer_timeout: OFFER_TIMEOUT,
            trip_buffer: TRIP_BUFFER,
            prefix: format!("chk-{prefix}"),
        };
        let (targets, h, stop) = (run.targets.clone(), run.history.clone(), run.stop.subscribe());
        run.load = Some(tokio::spawn(history::run(load, targets, h, stop)));
        if cfg.sim_drivers > 0 {
            let sim_targets: Vec<String> = hosts.iter().map(|i| format!("http://{}:7400", host_ip(*i))).collect();
            let log = std::fs::File::create(run.lab.dir.join("sim.log"))?;
            run.sim = Some(
                std::process::Command::new(&run.lab.locus)
                    .arg("--token-file")
                    .arg(run.lab.dir.join("client.token"))
                    .args(["sim", "--target", &sim_targets.join(","), "--drivers", &cfg.sim_drivers.to_string()])
                    .args(["--riders-per-sec", "1", "--queries-per-sec", "20"])
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .spawn()
                    .context("starting the simulator")?,
            );
        }
        tokio::time::sleep(Duration::from_secs(4)).await;
        Ok(run)
    }

    fn node(&mut self, i: usize) -> &mut NodeProc {
        self.nodes[i].as_mut().expect("a node on this host")
    }

    fn fault(&self, start: Instant, end: Instant) {
        self.history.lock().expect("history lock").faults.push((start, end));
    }

    /// Waits until every node on `hosts` is up, lists exactly `hosts` on its ring, all
    /// report one checksum, and each is ready; how long that took.
    async fn converge(&self, hosts: &[usize], within: Duration) -> anyhow::Result<Duration> {
        let t0 = Instant::now();
        let mut want: Vec<String> = hosts.iter().map(|i| format!("h{i}")).collect();
        want.sort();
        let token = bearer_value(&self.admin)?;
        let mut last = String::new();
        while t0.elapsed() < within {
            let mut sums = Vec::new();
            let mut ok = true;
            for &i in hosts {
                let url = format!("http://{}:7400", host_ip(i));
                let ch = tonic::transport::Endpoint::from_shared(url)?
                    .connect_timeout(Duration::from_millis(500))
                    .timeout(Duration::from_secs(1))
                    .connect_lazy();
                let mut c = ClusterClient::new(crate::auth::layer::AuthChannel::new(ch, Some(token.clone())));
                match c.members(pb::MembersRequest {}).await {
                    Ok(m) => {
                        let m = m.into_inner();
                        let mut ring: Vec<String> =
                            m.members.iter().filter(|x| x.in_ring).map(|x| x.name.clone()).collect();
                        ring.sort();
                        let agree = m.members.iter().filter(|x| x.in_ring).all(|x| x.ring_checksum == m.ring_checksum);
                        if ring != want || !agree {
                            ok = false;
                            last = format!("h{i}: ring {ring:?}, members agree: {agree}");
                        }
                        sums.push(m.ring_checksum);
                    }
                    Err(e) => {
                        ok = false;
                        last = format!("h{i}: {}", e.message());
                    }
                }
                let http = format!("{}:7480", host_ip(i));
                if ok && !matches!(crate::sim::http_get(&http, "/readyz").await, Ok((200, _))) {
                    ok = false;
                    last = format!("h{i}: not ready");
                }
            }
            if ok && sums.windows(2).all(|w| w[0] == w[1]) {
                return Ok(t0.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("no convergence on {want:?} within {within:?}: {last}")
    }

    fn running(&self) -> Vec<usize> {
        (1..self.nodes.len()).filter(|i| self.nodes[*i].as_ref().is_some_and(|n| n.running())).collect()
    }

    /// Runs on a little, stops the clients, lets timers fall due, checks, stops the nodes.
    async fn finish(mut self, name: &str, converge: Duration, t0: Instant, hold: Duration) -> anyhow::Result<Row> {
        tokio::time::sleep(Duration::from_secs(4)).await;
        let _ = self.stop.send(true);
        if let Some(l) = self.load.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), l).await;
        }
        if let Some(mut s) = self.sim.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        // Every short trip booked is due within its drive + buffer.
        tokio::time::sleep(TRIP_BUFFER + Duration::from_secs(4)).await;
        let h = std::mem::take(&mut *self.history.lock().expect("history lock"));
        let verdict = check::check(&h, &self.targets).await;
        if !verdict.violations.is_empty() && !hold.is_zero() {
            std::fs::write(self.lab.dir.join("admin.token"), &self.admin)?;
            eprintln!(
                "[chaos] {name}: violations; the cluster stays up for {hold:?} (admin.token in {})",
                self.lab.dir.display()
            );
            tokio::time::sleep(hold).await;
        }
        // Crashed processes, then a graceful stop of each.
        let mut log_problems = Vec::new();
        for n in self.nodes.iter_mut().flatten() {
            if let Some(s) = n.exited() {
                log_problems.push(format!("{} exited by itself: {s}", n.name));
            }
        }
        for n in self.nodes.iter_mut().flatten() {
            if n.running()
                && let Err(e) = n.terminate(Duration::from_secs(40)).await
            {
                log_problems.push(e.to_string());
            }
        }
        for n in self.nodes.iter().flatten() {
            let text = std::fs::read_to_string(&n.log).unwrap_or_default();
            for l in text.lines() {
                if l.contains("panicked") || l.contains("\"level\":\"ERROR\"") {
                    log_problems.push(format!("{}: {}", n.name, l.chars().take(300).collect::<String>()));
                }
            }
        }
        Ok(Row {
            name: name.to_string(),
            ok: h.ok,
            failed: h.failed,
            unknown: h.unknown,
            verdict,
            converge,
            secs: t0.elapsed().as_secs_f64(),
            log_problems,
        })
    }
}

async fn scenario(lab: Arc<Lab>, cfg: &ChaosConfig, name: &str) -> anyhow::Result<Row> {
    let t0 = Instant::now();
    let three = [1, 2, 3];
    let mut run = Run::begin(lab.clone(), cfg, if name == "split" { &[1, 2, 3, 4] } else { &three }, name).await?;
    let converge = match name {
        "kill" => {
            let at = Instant::now();
            run.node(2).kill9();
            run.fault(at, at);
            tokio::time::sleep(Duration::from_secs(6)).await;
            run.node(2).restart(&lab)?;
            run.converge(&three, Duration::from_secs(60)).await?
        }
        "pause" => {
            let at = Instant::now();
            run.node(2).pause();
            tokio::time::sleep(Duration::from_secs(6)).await;
            run.node(2).resume();
            run.fault(at, Instant::now());
            run.converge(&three, Duration::from_secs(60)).await?
        }
        "partition" => {
            let at = Instant::now();
            lab.partition(&[&[3], &[1, 2]])?;
            tokio::time::sleep(Duration::from_secs(8)).await;
            lab.heal();
            run.fault(at, Instant::now());
            run.converge(&three, Duration::from_secs(60)).await?
        }
        "split" => {
            let four = [1, 2, 3, 4];
            let at = Instant::now();
            lab.partition(&[&[1, 2], &[3, 4]])?;
            tokio::time::sleep(Duration::from_secs(8)).await;
            lab.heal();
            run.fault(at, Instant::now());
            run.converge(&four, Duration::from_secs(60)).await?
        }
        "rolling" => {
            let mut worst = Duration::ZERO;
            for i in three {
                let status = run.node(i).terminate(Duration::from_secs(40)).await?;
                anyhow::ensure!(status.success(), "h{i} exited with {status} on SIGTERM");
                let others: Vec<usize> = three.iter().copied().filter(|j| *j != i).collect();
                run.converge(&others, Duration::from_secs(30)).await?;
                run.node(i).restart(&lab)?;
                worst = worst.max(run.converge(&three, Duration::from_secs(60)).await?);
            }
            worst
        }
        "scale" => {
            let flags = run.node_flags.clone();
            for i in [4, 5] {
                run.nodes[i] = Some(NodeProc::start(&lab, i, &[1, 2, 3], &flags)?);
            }
            let five = [1, 2, 3, 4, 5];
            let up = run.converge(&five, Duration::from_secs(60)).await?;
            run.targets.set(&five.iter().map(|i| format!("http://{}:7400", host_ip(*i))).collect::<Vec<_>>());
            tokio::time::sleep(Duration::from_secs(4)).await;
            for i in [5, 4] {
                let mut left: Vec<usize> = run.running();
                left.retain(|j| *j != i);
                run.targets.set(&left.iter().map(|j| format!("http://{}:7400", host_ip(*j))).collect::<Vec<_>>());
                let token = bearer_value(&run.admin)?;
                let ch = tonic::transport::Endpoint::from_shared(run.node(i).grpc())?.connect().await?;
                let mut c = ClusterClient::new(crate::auth::layer::AuthChannel::new(ch, Some(token)));
                let d = c.drain(pb::DrainRequest { timeout_ms: 30_000 }).await?.into_inner();
                anyhow::ensure!(d.drained, "h{i} did not drain: {d:?}");
                let status = run.node(i).terminate(Duration::from_secs(40)).await?;
                anyhow::ensure!(status.success(), "h{i} exited with {status} after its drain");
                run.nodes[i] = None;
            }
            up.max(run.converge(&three, Duration::from_secs(60)).await?)
        }
        "badlink" => {
            let at = Instant::now();
            lab.bad_link(2)?;
            tokio::time::sleep(Duration::from_secs(10)).await;
            lab.heal();
            run.fault(at, Instant::now());
            run.converge(&three, Duration::from_secs(60)).await?
        }
        other => bail!("unknown scenario {other:?} (one of {})", ALL.join(", ")),
    };
    run.finish(name, converge, t0, cfg.hold_on_failure).await
}

/// Runs the scenarios; prints the table; errors if any violated an invariant.
pub async fn run(cfg: ChaosConfig) -> anyhow::Result<()> {
    let names: Vec<String> = if !cfg.scenarios.is_empty() {
        cfg.scenarios.clone()
    } else if cfg.short {
        SHORT.map(String::from).to_vec()
    } else {
        ALL.map(String::from).to_vec()
    };
    let locus = match &cfg.locus {
        Some(p) => p.clone(),
        None => std::env::current_exe()?,
    };
    let locus = std::fs::canonicalize(&locus).with_context(|| format!("{}", locus.display()))?;
    let _ = std::fs::remove_dir_all(&cfg.dir);
    std::fs::create_dir_all(&cfg.dir)?;
    let root = std::fs::canonicalize(&cfg.dir)?;
    let mut rows = Vec::new();
    for name in &names {
        let dir = root.join(name);
        let lab = Arc::new(Lab::create(5, &dir, &locus)?);
        eprintln!("[chaos] {name}: starting (logs in {})", dir.display());
        let row = match scenario(lab.clone(), &cfg, name).await {
            Ok(r) => r,
            Err(e) => Row {
                name: name.clone(),
                ok: 0,
                failed: 0,
                unknown: 0,
                verdict: check::Verdict { violations: vec![format!("scenario failed: {e:#}")], ..Default::default() },
                converge: Duration::ZERO,
                secs: 0.0,
                log_problems: vec![],
            },
        };
        if lab.bad_link == lab::BadLink::TbfAndLoss && name == "badlink" {
            eprintln!("[chaos] no netem in this kernel: the bad link was tbf (1 Mbit/s, 400 ms queue) + 10% loss");
        }
        eprintln!("[chaos] {name}: {}", if row.passed() { "passed" } else { "FAILED" });
        for v in row.verdict.violations.iter().chain(&row.log_problems).take(20) {
            eprintln!("    {v}");
        }
        drop(lab);
        rows.push(row);
    }
    let table = report(&rows);
    println!("{table}");
    std::fs::write(root.join("report.md"), &table)?;
    let failed: Vec<&str> = rows.iter().filter(|r| !r.passed()).map(|r| r.name.as_str()).collect();
    if !failed.is_empty() {
        bail!("violations in {} (details above; logs in {})", failed.join(", "), root.display());
    }
    Ok(())
}

pub fn report(rows: &[Row]) -> String {
    let mut s = String::from(
        "| scenario | ops ok | failed | unknown | drivers / trips / timers checked | lost | duplicated | converged in | verdict |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s += &format!(
            "| {} | {} | {} | {} | {} / {} / {} | {} | {} | {:.2} s | {} |\n",
            r.name,
            r.ok,
            r.failed,
            r.unknown,
            r.verdict.drivers,
            r.verdict.trips,
            r.verdict.timers,
            r.verdict.lost,
            r.verdict.duplicated,
            r.converge.as_secs_f64(),
            if r.passed() { "ok" } else { "VIOLATED" }
        );
    }
    s
}
