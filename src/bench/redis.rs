//! The Redis side of the benchmarks: a real `redis-server` child process and a minimal
//! RESP client (pipelined GEOADD, GEOSEARCH, INFO), so both systems see the same
//! workload on the same machine.

use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;

use super::{Latency, Proc, Workload, city_point, wait_port};

const KEY: &str = "drivers";

/// A `redis-server` started for the benchmark, killed on drop.
pub struct Server {
    _proc: Proc,
    port: u16,
}

struct Conn {
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: OwnedWriteHalf,
}

fn cmd(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// A parsed RESP reply (only what the benchmark needs).
#[derive(Debug)]
enum Reply {
    Simple,
    Int,
    Bulk(Vec<u8>),
    Array,
}

impl Conn {
    async fn open(port: u16) -> anyhow::Result<Conn> {
        let s = TcpStream::connect(("127.0.0.1", port)).await?;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        Ok(Conn { r: BufReader::with_capacity(1 << 16, r), w })
    }

    async fn line(&mut self, buf: &mut Vec<u8>) -> anyhow::Result<()> {
        buf.clear();
        if self.r.read_until(b'\n', buf).await? == 0 {
            bail!("redis closed the connection");
        }
        Ok(())
    }

    /// Reads one reply; arrays are read whole (their element count is returned).
    fn read<'a>(
        &'a mut self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<Reply>> + Send + 'a>> {
        Box::pin(async move {
            let mut l = Vec::with_capacity(64);
            self.line(&mut l).await?;
            let body = std::str::from_utf8(&l[1..l.len().saturating_sub(2)]).unwrap_or("").to_string();
            match l.first() {
                Some(b'+') => Ok(Reply::Simple),
                Some(b':') => Ok(Reply::Int),
                Some(b'-') => bail!("redis error: {body}"),
                Some(b'$') => {
                    let n: i64 = body.parse()?;
                    if n < 0 {
                        return Ok(Reply::Bulk(Vec::new()));
                    }
                    let mut data = vec![0u8; n as usize + 2];
                    self.r.read_exact(&mut data).await?;
                    data.truncate(n as usize);
                    Ok(Reply::Bulk(data))
                }
                Some(b'*') => {
                    let n: i64 = body.parse()?;
                    for _ in 0..n.max(0) {
                        self.read().await?;
                    }
                    Ok(Reply::Array)
                }
                _ => bail!("unexpected RESP line {l:?}"),
            }
        })
    }

    async fn call(&mut self, args: &[&[u8]]) -> anyhow::Result<Reply> {
        let mut b = Vec::new();
        cmd(&mut b, args);
        self.w.write_all(&b).await?;
        self.read().await
    }
}

impl Server {
    /// Starts `redis-server` on `port`, or returns `None` if it is not installed.
    pub async fn start(port: u16) -> anyhow::Result<Option<Server>> {
        let found = Command::new("redis-server").arg("--version").stdout(Stdio::null()).status();
        if !found.is_ok_and(|s| s.success()) {
            return Ok(None);
        }
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--protected-mode", "no", "--daemonize", "no", "--loglevel", "warning"])
            .stdout(Stdio::null())
            .spawn()
            .context("starting redis-server")?;
        let proc = Proc(child);
        wait_port(port).await?;
        Ok(Some(Server { _proc: proc, port }))
    }

    pub async fn flush(&self) -> anyhow::Result<()> {
        Conn::open(self.port).await?.call(&[b"FLUSHALL"]).await?;
        Ok(())
    }

    /// `used_memory` from `INFO memory`, bytes.
    pub async fn used_memory(&self) -> anyhow::Result<u64> {
        let Reply::Bulk(info) = Conn::open(self.port).await?.call(&[b"INFO", b"memory"]).await? else {
            bail!("INFO did not return a bulk string");
        };
        let s = String::from_utf8_lossy(&info);
        let v = s.lines().find_map(|l| l.strip_prefix("used_memory:")).context("no used_memory")?;
        Ok(v.trim().parse()?)
    }

    /// Sends the workload as GEOADD commands, `depth` per pipeline, over `conns`
    /// connections (driver `i` on connection `i % conns`, like the Locus streams).
    /// Returns fixes per second.
    pub async fn geoadd_pipelined(&self, w: &Workload, conns: usize, depth: usize) -> anyhow::Result<f64> {
        // Pre-build every pipeline, as the Locus side pre-builds its batches.
        let mut per: Vec<Vec<(Vec<u8>, usize)>> = (0..conns).map(|_| Vec::new()).collect();
        let mut cur: Vec<(Vec<u8>, usize)> = (0..conns).map(|_| (Vec::new(), 0)).collect();
        for round in 0..w.rounds {
            for i in 0..w.drivers {
                let c = i % conns;
                let (lat, lon, _) = w.fix(i, round);
                let (lon, lat, id) = (format!("{lon:.7}"), format!("{lat:.7}"), format!("drv-{i}"));
                cmd(&mut cur[c].0, &[b"GEOADD", KEY.as_bytes(), lon.as_bytes(), lat.as_bytes(), id.as_bytes()]);
                cur[c].1 += 1;
                if cur[c].1 == depth {
                    per[c].push(std::mem::take(&mut cur[c]));
                }
            }
        }
        for (c, rest) in cur.into_iter().enumerate() {
            if rest.1 > 0 {
                per[c].push(rest);
            }
        }
        let total: usize = per.iter().flatten().map(|p| p.1).sum();
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for pipelines in per {
            let port = self.port;
            tasks.push(tokio::spawn(async move {
                let mut c = Conn::open(port).await?;
                for (buf, n) in pipelines {
                    c.w.write_all(&buf).await?;
                    for _ in 0..n {
                        c.read().await?;
                    }
                }
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        Ok(total as f64 / t0.elapsed().as_secs_f64())
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

/// Sequential `GEOSEARCH drivers FROMLONLAT lon lat BYRADIUS r m ASC COUNT 10 WITHDIST` at
/// random city points, one connection to the server on `port`.
pub async fn geosearch_latency(port: u16, queries: usize, radius_m: f64, seed: u64) -> anyhow::Result<Latency> {
    {
        let mut c = Conn::open(port).await?;
        let mut rng = SmallRng::seed_from_u64(seed);
        let radius = format!("{radius_m}");
        let one = |rng: &mut SmallRng| {
            let (lat, lon) = city_point(rng);
            let (lon, lat) = (format!("{lon:.7}"), format!("{lat:.7}"));
            let mut b = Vec::new();
            cmd(
                &mut b,
                &[
                    b"GEOSEARCH",
                    KEY.as_bytes(),
                    b"FROMLONLAT",
                    lon.as_bytes(),
                    lat.as_bytes(),
                    b"BYRADIUS",
                    radius.as_bytes(),
                    b"m",
                    b"ASC",
                    b"COUNT",
                    b"10",
                    b"WITHDIST",
                ],
            );
            b
        };
        for _ in 0..200 {
            let b = one(&mut rng);
            c.w.write_all(&b).await?;
            c.read().await?;
        }
        let mut us = Vec::with_capacity(queries);
        let t0 = Instant::now();
        for _ in 0..queries {
            let b = one(&mut rng);
            let q0 = Instant::now();
            c.w.write_all(&b).await?;
            match c.read().await? {
                Reply::Array => {}
                r => bail!("GEOSEARCH returned {r:?}"),
            }
            us.push(q0.elapsed().as_secs_f64() * 1e6);
        }
        Ok(Latency::from(us, t0.elapsed().as_secs_f64()))
    }
}
