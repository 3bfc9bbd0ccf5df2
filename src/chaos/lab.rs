//! The chaos suite's hosts: one network namespace per node, each with its own address
//! on a bridge in the root namespace (where the clients run), and the faults a real
//! network and a real operator inflict on them.
//!
//! - Hosts `locus-h1..N`: `10.77.0.11..` on the bridge `locus-br` (`10.77.0.1`).
//! - Nodes run as `ip netns exec locus-hI locus node ...`, with authentication on; their
//!   logs go to `<dir>/hI.log` (appended across restarts).
//! - Faults: `kill -9`, SIGSTOP / SIGCONT, SIGTERM (a graceful leave), a partition (iptables
//!   DROP between hosts of different groups, both ways; clients still reach every node),
//!   a bad link (netem delay and loss where the kernel has netem, else a 1 Mbit/s tbf
//!   with 400 ms of queue and 10% random loss by iptables).
//!
//! Needs root (namespaces, iptables, tc). [`Lab::drop`] removes what it made.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

pub const BRIDGE: &str = "locus-br";
const SUBNET: [u8; 3] = [10, 77, 0];

fn sh(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!("{args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn sh_quiet(args: &[&str]) {
    let _ = Command::new(args[0]).args(&args[1..]).stdout(Stdio::null()).stderr(Stdio::null()).status();
}

pub fn host_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], 10 + i as u8)
}

fn ns(i: usize) -> String {
    format!("locus-h{i}")
}

/// How a bad link is made on this kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadLink {
    /// `tc netem delay 80ms 40ms loss 10%`.
    Netem,
    /// No netem in this kernel: `tbf rate 1mbit latency 400ms` plus 10% random loss
    /// (`iptables -m statistic`).
    TbfAndLoss,
}

/// The hosts and what the nodes on them need.
pub struct Lab {
    pub hosts: usize,
    pub dir: PathBuf,
    pub locus: PathBuf,
    pub bad_link: BadLink,
}

impl Lab {
    /// Makes `hosts` namespaces on a fresh bridge (removing any a previous run left).
    pub fn create(hosts: usize, dir: &Path, locus: &Path) -> anyhow::Result<Lab> {
        anyhow::ensure!(is_root(), "the chaos suite needs root (network namespaces, iptables, tc)");
        for tool in ["ip", "iptables", "tc"] {
            anyhow::ensure!(
                Command::new(tool).arg("-V").output().is_ok() || Command::new(tool).arg("help").output().is_ok(),
                "{tool} not found (apt-get install iproute2 iptables)"
            );
        }
        Self::cleanup(8);
        sh(&["ip", "link", "add", BRIDGE, "type", "bridge"])?;
        sh(&["ip", "addr", "add", "10.77.0.1/24", "dev", BRIDGE])?;
        sh(&["ip", "link", "set", BRIDGE, "up"])?;
        // Bridged traffic may pass through the root namespace's FORWARD chain (Docker
        // sets its policy to DROP): let the hosts talk to each other.
        sh(&["iptables", "-I", "FORWARD", "-i", BRIDGE, "-o", BRIDGE, "-j", "ACCEPT"])?;
        for i in 1..=hosts {
            let n = ns(i);
            let veth = format!("locus-v{i}");
            sh(&["ip", "netns", "add", &n])?;
            sh(&["ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &n])?;
            sh(&["ip", "link", "set", &veth, "master", BRIDGE, "up"])?;
            let addr = format!("{}/24", host_ip(i));
            sh(&["ip", "netns", "exec", &n, "ip", "addr", "add", &addr, "dev", "eth0"])?;
            sh(&["ip", "netns", "exec", &n, "ip", "link", "set", "eth0", "up"])?;
            sh(&["ip", "netns", "exec", &n, "ip", "link", "set", "lo", "up"])?;
        }
        // Is there netem? Try it on host 1's link.
        let n1 = ns(1);
        let netem =
            sh(&["ip", "netns", "exec", &n1, "tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay", "1ms"]);
        sh_quiet(&["ip", "netns", "exec", &n1, "tc", "qdisc", "del", "dev", "eth0", "root"]);
        let bad_link = if netem.is_ok() { BadLink::Netem } else { BadLink::TbfAndLoss };
        std::fs::create_dir_all(dir)?;
        Ok(Lab { hosts, dir: dir.to_path_buf(), locus: locus.to_path_buf(), bad_link })
    }

    /// Removes namespaces and the bridge (also those of an earlier, interrupted run).
    pub fn cleanup(max_hosts: usize) {
        for i in 1..=max_hosts {
            sh_quiet(&["ip", "netns", "del", &ns(i)]);
        }
        sh_quiet(&["ip", "link", "del", BRIDGE]);
        while Command::new("iptables")
            .args(["-D", "FORWARD", "-i", BRIDGE, "-o", BRIDGE, "-j", "ACCEPT"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {}
    }

    /// Cuts every host of one group off from every host of the others (both ways).
    pub fn partition(&self, groups: &[&[usize]]) -> anyhow::Result<()> {
        for (gi, g) in groups.iter().enumerate() {
            for &a in *g {
                for (gj, h) in groups.iter().enumerate() {
                    if gi == gj {
                        continue;
                    }
                    for &b in *h {
                        let peer = host_ip(b).to_string();
                        let n = ns(a);
                        sh(&["ip", "netns", "exec", &n, "iptables", "-A", "INPUT", "-s", &peer, "-j", "DROP"])?;
                        sh(&["ip", "netns", "exec", &n, "iptables", "-A", "OUTPUT", "-d", &peer, "-j", "DROP"])?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Removes every partition and bad link.
    pub fn heal(&self) {
        for i in 1..=self.hosts {
            let n = ns(i);
            sh_quiet(&["ip", "netns", "exec", &n, "iptables", "-F"]);
            sh_quiet(&["ip", "netns", "exec", &n, "tc", "qdisc", "del", "dev", "eth0", "root"]);
        }
    }

    /// Delays and drops packets on host `i`'s link.
    pub fn bad_link(&self, i: usize) -> anyhow::Result<()> {
        let n = ns(i);
        match self.bad_link {
            BadLink::Netem => sh(&[
                "ip", "netns", "exec", &n, "tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay", "80ms",
                "40ms", "loss", "10%",
            ]),
            BadLink::TbfAndLoss => {
                sh(&[
                    "ip", "netns", "exec", &n, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", "1mbit",
                    "burst", "32kbit", "latency", "400ms",
                ])?;
                for chain in ["INPUT", "OUTPUT"] {
                    sh(&[
                        "ip",
                        "netns",
                        "exec",
                        &n,
                        "iptables",
                        "-A",
                        chain,
                        "-m",
                        "statistic",
                        "--mode",
                        "random",
                        "--probability",
                        "0.1",
                        "-j",
                        "DROP",
                    ])?;
                }
                Ok(())
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        Self::cleanup(self.hosts.max(8));
    }
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

/// One node's process on its host.
pub struct NodeProc {
    pub host: usize,
    pub name: String,
    child: Option<Child>,
    args: Vec<String>,
    pub log: PathBuf,
    pub paused: bool,
}

impl NodeProc {
    pub fn grpc(&self) -> String {
        format!("http://{}:7400", host_ip(self.host))
    }

    pub fn http(&self) -> SocketAddr {
        SocketAddr::from((host_ip(self.host), 7480))
    }

    /// Starts `locus node` on host `i` (joining `join`), with `extra` flags.
    pub fn start(lab: &Lab, i: usize, join: &[usize], extra: &[String]) -> anyhow::Result<NodeProc> {
        let ip = host_ip(i);
        let join: Vec<String> = join.iter().filter(|j| **j != i).map(|j| format!("{}:7946", host_ip(*j))).collect();
        let mut args: Vec<String> = vec![
            "node".into(),
            "--node-name".into(),
            format!("h{i}"),
            "--grpc-addr".into(),
            format!("{ip}:7400"),
            "--http-addr".into(),
            format!("{ip}:7480"),
            "--gossip-addr".into(),
            format!("{ip}:7946"),
            "--data-dir".into(),
            lab.dir.join(format!("h{i}")).display().to_string(),
            "--log-format".into(),
            "json".into(),
        ];
        if !join.is_empty() {
            args.extend(["--join".into(), join.join(",")]);
        }
        args.extend(extra.iter().cloned());
        let mut n = NodeProc {
            host: i,
            name: format!("h{i}"),
            child: None,
            args,
            log: lab.dir.join(format!("h{i}.log")),
            paused: false,
        };
        n.spawn(lab)?;
        Ok(n)
    }

    fn spawn(&mut self, lab: &Lab) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &ns(self.host)])
            .arg(&lab.locus)
            .args(&self.args)
            .env("RUST_LOG", "info,h2=warn,tower=warn,hyper=warn")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting a node")?;
        self.child = Some(child);
        self.paused = false;
        Ok(())
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            sh_quiet(&["kill", sig, &c.id().to_string()]);
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn pause(&mut self) {
        self.signal("-STOP");
        self.paused = true;
    }

    pub fn resume(&mut self) {
        self.signal("-CONT");
        self.paused = false;
    }

    /// SIGTERM (hand everything over, leave) and wait up to `within` for the exit.
    pub async fn terminate(&mut self, within: Duration) -> anyhow::Result<std::process::ExitStatus> {
        if self.paused {
            self.resume();
        }
        let Some(mut c) = self.child.take() else { bail!("{} is not running", self.name) };
        sh_quiet(&["kill", "-TERM", &c.id().to_string()]);
        let t0 = std::time::Instant::now();
        loop {
            if let Some(s) = c.try_wait()? {
                return Ok(s);
            }
            if t0.elapsed() > within {
                let _ = c.kill();
                let _ = c.wait();
                bail!("{} did not exit within {within:?} of SIGTERM", self.name);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts the same node again (same data, same address).
    pub fn restart(&mut self, lab: &Lab) -> anyhow::Result<()> {
        self.kill9();
        self.spawn(lab)
    }

    /// The process exited on its own (a crash): its status.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let c = self.child.as_mut()?;
        let s = c.try_wait().ok().flatten()?;
        self.child = None;
        Some(s)
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        if self.paused {
            self.resume();
        }
        self.kill9();
    }
}
