//! Test harness: real `locus node` processes on loopback with their own data directories.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use locus::auth::layer::AuthChannel;
use locus::pb;
use locus::pb::locations_client::LocationsClient;

pub mod cluster;
pub mod replay;

pub const LOCUS: &str = env!("CARGO_BIN_EXE_locus");

/// A running node process; killed on drop.
pub struct NodeProc {
    child: Option<Child>,
    pub grpc: String,
    pub http: String,
    /// The gossip (ring key) address, `host:port`.
    pub gossip: String,
    pub dir: PathBuf,
    pub args: Vec<String>,
    exited: Option<ExitStatus>,
    /// Every line the node logged so far (JSON).
    pub logs: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("\"{key}\":\"");
    let start = line.find(&pat)? + pat.len();
    let end = line[start..].find('"')? + start;
    Some(&line[start..end])
}

impl NodeProc {
    /// Starts a node on ephemeral ports with its data in `dir`.
    pub fn start(dir: &Path, extra: &[&str]) -> NodeProc {
        let filter = std::env::var("LOCUS_TEST_LOG").unwrap_or_else(|_| "info".into());
        Self::start_logged(dir, extra, &filter)
    }

    /// [`start`](Self::start) with the node's log filter (`RUST_LOG`) given.
    pub fn start_logged(dir: &Path, extra: &[&str], filter: &str) -> NodeProc {
        let args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        // Ephemeral ports unless the test pins them (a restarted cluster node keeps its
        // gossip address: it is the node's identity on the ring).
        let mut base: Vec<&str> = vec!["node"];
        for (flag, default) in [
            ("--node-name", "test"),
            ("--grpc-addr", "127.0.0.1:0"),
            ("--http-addr", "127.0.0.1:0"),
            ("--gossip-addr", "127.0.0.1:0"),
        ] {
            if !extra.contains(&flag) {
                base.extend([flag, default]);
            }
        }
        let mut child = Command::new(LOCUS)
            .args(&base)
            .args(["--log-format", "json", "--data-dir"])
            .arg(dir)
            .args(&args)
            // LOCUS_TEST_LOG=info,locus::trips=debug (say) to see more of a failing test.
            .env("RUST_LOG", filter)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn locus node");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        let name = extra.iter().position(|a| *a == "--node-name").and_then(|i| extra.get(i + 1)).unwrap_or(&"node");
        let tag = format!("[{name}]");
        let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = logs.clone();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                // Shown by the test runner when a test fails.
                eprintln!("{tag} {line}");
                kept.lock().unwrap().push(line.clone());
                if !sent && line.contains("locus node serving") {
                    let g = field(&line, "grpc").map(str::to_string);
                    let h = field(&line, "http").map(str::to_string);
                    let o = field(&line, "gossip").map(str::to_string);
                    let _ = tx.send((g, h, o));
                    sent = true;
                }
            }
        });
        let (g, h, o) = rx.recv_timeout(Duration::from_secs(30)).expect("node did not report its addresses");
        NodeProc {
            child: Some(child),
            grpc: format!("http://{}", g.expect("grpc addr")),
            http: h.expect("http addr"),
            gossip: o.expect("gossip addr"),
            dir: dir.to_path_buf(),
            args,
            exited: None,
            logs,
        }
    }

    pub async fn client(&self) -> LocationsClient<AuthChannel> {
        locus::sim::connect(&self.grpc).await.expect("connect")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL, no chance to flush.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("kill -9");
            c.wait().expect("wait");
        }
    }

    /// SIGTERM, then wait for the exit status (async, so the test's own gRPC clients
    /// keep running and can see the server go away).
    pub async fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        let ok = Command::new("kill").args(["-TERM", &c.id().to_string()]).status().expect("kill -TERM");
        assert!(ok.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = c.try_wait().expect("try_wait") {
                return s;
            }
            assert!(Instant::now() < deadline, "node did not exit after SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A handle on the same process that does not own it (dropping it kills nothing).
    pub fn share(&self) -> NodeProc {
        NodeProc {
            child: None,
            grpc: self.grpc.clone(),
            http: self.http.clone(),
            gossip: self.gossip.clone(),
            dir: self.dir.clone(),
            args: self.args.clone(),
            exited: None,
            logs: self.logs.clone(),
        }
    }

    /// The exit status if the process has exited (it is then reaped).
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            let c = self.child.as_mut()?;
            if let Some(s) = c.try_wait().expect("try_wait") {
                self.exited = Some(s);
                self.child = None;
            }
        }
        self.exited
    }

    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.exited
    }

    /// Starts a new process on the same data directory with the same flags.
    pub fn restart(&self) -> NodeProc {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        NodeProc::start(&self.dir, &args)
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn now_ms() -> i64 {
    locus::clock::wall_ms()
}

/// A valid fix for `id` at (lat, lon), `ts` ms.
pub fn fix(id: &str, lat: f64, lon: f64, ts: i64) -> pb::LocationUpdate {
    pb::LocationUpdate {
        driver_id: id.into(),
        lat,
        lon,
        timestamp_ms: ts,
        status: pb::DriverStatus::Available as i32,
        ..Default::default()
    }
}

/// The city centre the cluster tests' fleets and trips are around.
pub const CENTRE: (f64, f64) = (52.52, 13.405);

/// Where driver `i` of a test fleet starts: spread over a few km around [`CENTRE`].
pub fn home(i: usize) -> (f64, f64) {
    let a = i as f64 * 0.618;
    (CENTRE.0 + 0.02 * a.sin() * (i % 13) as f64 / 13.0, CENTRE.1 + 0.03 * a.cos())
}

/// A booking picked up at the centre, 10 minutes' drive.
pub fn booking(trip: &str) -> pb::TripEvent {
    pb::TripEvent {
        trip_id: trip.into(),
        event_id: format!("{trip}-b"),
        r#type: pb::TripEventType::BookingCreated as i32,
        pickup: Some(pb::Point { lat: CENTRE.0, lon: CENTRE.1 }),
        dropoff: Some(pb::Point { lat: 52.50, lon: 13.45 }),
        estimated_drive_s: 600,
        ..Default::default()
    }
}

/// Trip event `id` of `trip`, naming `driver` (with a vehicle) when not empty.
pub fn event(trip: &str, id: &str, t: pb::TripEventType, driver: &str) -> pb::TripEvent {
    pb::TripEvent {
        trip_id: trip.into(),
        event_id: format!("{trip}-{id}"),
        r#type: t as i32,
        driver_id: driver.into(),
        vehicle: (!driver.is_empty()).then(|| pb::Vehicle { cab_number: "CAB".into(), ..Default::default() }),
        ..Default::default()
    }
}

/// Match the nearest available driver to a trip picked up at the centre.
pub fn match_req(trip: &str) -> pb::MatchRequest {
    pb::MatchRequest { trip_id: trip.into(), lat: CENTRE.0, lon: CENTRE.1, radius_m: 50_000.0, ..Default::default() }
}

/// Polls `f` until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// GetDriver by cab number, without the trail.
pub fn by_cab(cab: &str) -> pb::GetDriverRequest {
    pb::GetDriverRequest { key: Some(pb::get_driver_request::Key::CabNumber(cab.into())), include_trail: false }
}

/// GetDriver by session, without the trail.
pub fn by_session(session: &str) -> pb::GetDriverRequest {
    pb::GetDriverRequest { key: Some(pb::get_driver_request::Key::Session(session.into())), include_trail: false }
}

/// GetDriver by driver id, without the trail.
pub fn by_id(id: &str) -> pb::GetDriverRequest {
    pb::GetDriverRequest { key: Some(pb::get_driver_request::Key::DriverId(id.into())), include_trail: false }
}

/// RemoveDriver by driver id.
pub fn remove_by_id(id: &str) -> pb::RemoveDriverRequest {
    pb::RemoveDriverRequest { key: Some(pb::remove_driver_request::Key::DriverId(id.into())) }
}

/// A plain HTTP/1.1 GET over a fresh connection: (status, body).
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    locus::sim::http_get(addr, path).await.expect("http get")
}
