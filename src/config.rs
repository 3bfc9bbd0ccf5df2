//! Node configuration: every `locus node` flag, also settable as `LOCUS_<NAME>`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Parses `900s`, `15m`, `250ms`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().map_err(|_| format!("invalid duration {s:?} (try 900s, 15m, 250ms)"))?;
    let secs = match unit.trim() {
        "" | "s" => v,
        "ms" => v / 1000.0,
        "m" | "min" => v * 60.0,
        "h" => v * 3600.0,
        u => return Err(format!("unknown duration unit {u:?} in {s:?} (use ms, s, m or h)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("invalid duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The value of `--node-name` and `--gossip-host` that means this machine's hostname.
pub const HOSTNAME: &str = "@hostname";

/// This machine's hostname (a container's own).
pub fn hostname() -> Option<String> {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").ok().or_else(|| std::env::var("HOSTNAME").ok())?;
    let h = h.trim();
    (!h.is_empty()).then(|| h.to_string())
}

fn default_shards() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// `locus node`: one Locus node.
#[derive(Args, Clone, Debug)]
pub struct NodeConfig {
    /// Name of this node (logs, metrics, default data directory). `@hostname`: this
    /// machine's hostname (a container's own, for replicas started with `--scale`).
    #[arg(long, env = "LOCUS_NODE_NAME", default_value = "node-1")]
    pub node_name: String,
    /// gRPC listen address (the `locus.v1` API).
    #[arg(long, env = "LOCUS_GRPC_ADDR", default_value = "127.0.0.1:7400")]
    pub grpc_addr: SocketAddr,
    /// HTTP listen address: /healthz, /readyz and /metrics (Prometheus).
    #[arg(long, env = "LOCUS_HTTP_ADDR", default_value = "127.0.0.1:7480")]
    pub http_addr: SocketAddr,
    /// UDP address for drivers' compact fixes (sessions from `Sessions.Open`); off when
    /// not given.
    #[arg(long, env = "LOCUS_UDP_ADDR")]
    pub udp_addr: Option<SocketAddr>,
    /// Receive buffer of the UDP socket, MiB: what absorbs a burst while the node is
    /// busy (about 1 KiB of it per small datagram). Above `net.core.rmem_max` only for a
    /// process with `CAP_NET_ADMIN`; the size got is logged at start.
    #[arg(long, env = "LOCUS_UDP_RECV_BUFFER_MIB", default_value_t = 64)]
    pub udp_recv_buffer_mib: usize,
    /// Gossip (SWIM over UDP) address; also this node's identity on the ring, so keep it
    /// stable across restarts. Must be an address peers can reach (not 0.0.0.0).
    #[arg(long, env = "LOCUS_GOSSIP_ADDR", default_value = "127.0.0.1:7946")]
    pub gossip_addr: SocketAddr,
    /// Resolve this name at start for the gossip address's IP (its port stays
    /// `--gossip-addr`'s): a service name in a container network, say. `@hostname`:
    /// this machine's own hostname (each replica of a scaled service its own address).
    #[arg(long, env = "LOCUS_GOSSIP_HOST")]
    pub gossip_host: Option<String>,
    /// Gossip addresses of nodes to join (`host:port,host:port`); retried with backoff
    /// until one answers. Without it the node starts a cluster of its own.
    #[arg(long, env = "LOCUS_JOIN", value_delimiter = ',')]
    pub join: Vec<String>,
    /// Virtual nodes per member on the ring. Every node of a cluster must agree.
    #[arg(long, env = "LOCUS_VNODES", default_value_t = crate::ring::DEFAULT_VNODES,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub vnodes: u32,
    /// Default deadline of a scatter-gather query (Nearby, Within); a request may set its own.
    #[arg(long, env = "LOCUS_SCATTER_TIMEOUT", default_value = "200ms", value_parser = parse_duration)]
    pub scatter_timeout: Duration,
    /// How long a suspected member has to refute before it is declared down.
    #[arg(long, env = "LOCUS_SUSPECT_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub suspect_timeout: Duration,
    /// How often a node probes one other member (failure detection). A probe not
    /// answered within half of it is retried through other members.
    #[arg(long, env = "LOCUS_PROBE_PERIOD", default_value = "500ms", value_parser = parse_duration)]
    pub probe_period: Duration,
    /// Quiet time before a changed member set becomes a new ring.
    #[arg(long, env = "LOCUS_RING_DEBOUNCE", default_value = "200ms", value_parser = parse_duration)]
    pub ring_debounce: Duration,
    /// On leave or shutdown, how long to wait for peers to drop this node from their rings.
    #[arg(long, env = "LOCUS_LEAVE_WAIT", default_value = "3s", value_parser = parse_duration)]
    pub leave_wait: Duration,
    /// On leave or shutdown, how long to wait for peers to pull this node's partitions
    /// before it stops anyway (what is left stays parked here until it returns).
    #[arg(long, env = "LOCUS_HANDOFF_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub handoff_timeout: Duration,
    /// Pacing of partition moves: after each chunk of partitions pulled, wait this many
    /// times as long as the chunk took, leaving the CPU to queries meanwhile (0: move
    /// as fast as possible). Promotions after a crash are never paced.
    #[arg(long, env = "LOCUS_HANDOFF_PACE", default_value_t = 1.0)]
    pub handoff_pace: f64,
    /// Copies of every partition kept besides the owner's, on its next distinct ring
    /// successors (0: none; a crash then loses the node's trips and claims until it
    /// returns).
    #[arg(long, env = "LOCUS_REPLICAS", default_value_t = 1)]
    pub replicas: u32,
    /// How long a claim or trip event waits for its in-sync replicas. One not stored
    /// by them in time is answered UNAVAILABLE (the outcome is unknown: a retry with
    /// the same event id applies it once), unless `--degraded-writes`.
    #[arg(long, env = "LOCUS_REPLICA_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub replica_timeout: Duration,
    /// Answer a claim or trip event that no in-sync replica stored in time anyway
    /// (counted as degraded): more available while a replica is down or syncing, but a
    /// crash of the owner then loses it for good (the promoted replica lacks it).
    #[arg(long, env = "LOCUS_DEGRADED_WRITES")]
    pub degraded_writes: bool,
    /// Where the driver log lives. Default: ./data/<node-name>.
    #[arg(long, env = "LOCUS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// A driver with no accepted fix for this long expires.
    #[arg(long, env = "LOCUS_DRIVER_TTL", default_value = "900s", value_parser = parse_duration)]
    pub driver_ttl: Duration,
    /// Fixes kept per driver (the last one included).
    #[arg(long, env = "LOCUS_TRAIL_LEN", default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub trail_len: u16,
    #[arg(long, env = "LOCUS_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Fixes whose timestamp is further ahead of the server clock are rejected.
    #[arg(long, env = "LOCUS_MAX_FUTURE_SKEW", default_value = "30s", value_parser = parse_duration)]
    pub max_future_skew: Duration,
    /// Fixes implying a faster move from the last accepted fix are rejected.
    #[arg(long, env = "LOCUS_MAX_SPEED_MPS", default_value_t = 70.0)]
    pub max_speed_mps: f64,
    /// Shard workers (tasks owning drivers). Default: one per CPU.
    #[arg(long, env = "LOCUS_SHARDS", default_value_t = default_shards())]
    pub shards: usize,
    /// Messages each shard mailbox holds (a streamed batch is one message per shard).
    #[arg(long, env = "LOCUS_MAILBOX_CAPACITY", default_value_t = 1024)]
    pub mailbox_capacity: usize,
    /// How long a streamed batch or a read waits for mailbox space before it is
    /// answered `overloaded` / RESOURCE_EXHAUSTED. Unary updates never wait.
    #[arg(long, env = "LOCUS_OVERLOAD_WAIT", default_value = "200ms", value_parser = parse_duration)]
    pub overload_wait: Duration,
    /// Group-commit interval of driver snapshots. A kill -9 loses at most the fixes
    /// accepted in about one interval plus one flush.
    #[arg(long, env = "LOCUS_PERSIST_INTERVAL", default_value = "250ms", value_parser = parse_duration)]
    pub persist_interval: Duration,
    /// How long every accepted fix is kept for `Locations.GetHistory` and
    /// `Fixes.Subscribe` (0 turns the history off).
    #[arg(long, env = "LOCUS_HISTORY_RETENTION", default_value = "24h", value_parser = parse_duration)]
    pub history_retention: Duration,
    /// At most this much of a partition's history (MiB) travels inside a hand-off's pull;
    /// older segments are copied after it, before the old holder forgets them (0 to 16).
    #[arg(long, env = "LOCUS_HISTORY_PULL_MIB", default_value_t = 16, value_parser = clap::value_parser!(u64).range(0..=16))]
    pub history_pull_mib: u64,
    /// A driver is re-indexed in the R-tree only after moving this far (queries widen
    /// their search by it, so answers stay exact).
    #[arg(long, env = "LOCUS_INDEX_SLACK_M", default_value_t = 30.0)]
    pub index_slack_m: f64,
    /// Driver log segments are closed at this size (bytes).
    #[arg(long, env = "LOCUS_LOG_SEGMENT_BYTES", default_value_t = 64 << 20)]
    pub log_segment_bytes: u64,
    /// Compact the driver log once closed segments exceed this (bytes), or twice the
    /// live state, whichever is larger.
    #[arg(long, env = "LOCUS_LOG_COMPACT_BYTES", default_value_t = 256 << 20)]
    pub log_compact_bytes: u64,
    /// Distinct vehicle types accepted per shard.
    #[arg(long, env = "LOCUS_MAX_VEHICLE_TYPES", default_value_t = 64)]
    pub max_vehicle_types: usize,
    /// Fixes a WatchDriver client may fall behind before its stream is ended as lagged.
    #[arg(long, env = "LOCUS_WATCH_QUEUE", default_value_t = 1024)]
    pub watch_queue: usize,
    /// How long a driver claimed by `Match` waits for DRIVER_ASSIGNED before it is
    /// AVAILABLE again.
    #[arg(long, env = "LOCUS_OFFER_TIMEOUT", default_value = "15s", value_parser = parse_duration)]
    pub offer_timeout: Duration,
    /// Added to a trip's estimated drive time for its TTL (pushed forward by each event).
    #[arg(long, env = "LOCUS_TRIP_BUFFER", default_value = "15m", value_parser = parse_duration)]
    pub trip_buffer: Duration,
    /// How long a dropped or cancelled trip (and its share link) stays.
    #[arg(long, env = "LOCUS_TRIP_LINGER", default_value = "5m", value_parser = parse_duration)]
    pub trip_linger: Duration,
    /// Route points a trip keeps before down-sampling.
    #[arg(long, env = "LOCUS_ROUTE_MAX", default_value_t = 512, value_parser = clap::value_parser!(u32).range(8..=100_000))]
    pub route_max: u32,
    /// DRIVER_NEAR_PICKUP fires when the assigned driver comes this close to the pickup.
    #[arg(long, env = "LOCUS_NEAR_PICKUP_M", default_value_t = 200.0)]
    pub near_pickup_m: f64,
    /// Fare: base amount.
    #[arg(long, env = "LOCUS_FARE_BASE", default_value_t = 3.5)]
    pub fare_base: f64,
    /// Fare: per kilometre driven with the passenger.
    #[arg(long, env = "LOCUS_FARE_PER_KM", default_value_t = 1.2)]
    pub fare_per_km: f64,
    /// Fare: per minute of carriage.
    #[arg(long, env = "LOCUS_FARE_PER_MIN", default_value_t = 0.3)]
    pub fare_per_min: f64,
    /// Base of public share URLs. Default: http://<advertised HTTP address>.
    #[arg(long, env = "LOCUS_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Share endpoints: requests per second per client address (bursts of twice that).
    #[arg(long, env = "LOCUS_SHARE_CLIENT_RATE", default_value_t = 20.0)]
    pub share_client_rate: f64,
    /// Proxies (addresses or CIDR blocks, comma-separated) whose `X-Forwarded-For`
    /// names the client for the share endpoints' per-client rate limit. Others' is ignored.
    #[arg(long, env = "LOCUS_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<String>,
    /// `GET /share/{token}`: requests per second per token (bursts of twice that).
    #[arg(long, env = "LOCUS_SHARE_TOKEN_RATE", default_value_t = 10.0)]
    pub share_token_rate: f64,
    /// Bearer tokens and their roles, one per line, hashed (`locus token new`). Without
    /// it every RPC is open to anyone who reaches the port, so the node then listens only
    /// on loopback addresses unless `--insecure` says otherwise. Reloaded on SIGHUP.
    #[arg(long, env = "LOCUS_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,
    /// The secret every node of the cluster shares (a file; at least 16 bytes). Nodes
    /// authenticate each other's gRPC calls and gossip packets with keys derived from
    /// it; a node with another key cannot join. Required with `--auth-file`.
    #[arg(long, env = "LOCUS_CLUSTER_KEY_FILE")]
    pub cluster_key_file: Option<PathBuf>,
    /// This node's TLS certificate (PEM, the chain): gRPC and HTTP then serve TLS only.
    /// It must name the addresses peers and clients reach the node at.
    #[arg(long, env = "LOCUS_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of `--tls-cert` (PEM).
    #[arg(long, env = "LOCUS_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// The CA (PEM) that signed every node's certificate: nodes verify each other with
    /// it and present their own (mutual TLS); client certificates, when presented on the
    /// gRPC port, must chain to it too.
    #[arg(long, env = "LOCUS_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Serve without `--auth-file` on addresses other than loopback (every RPC open,
    /// gossip unauthenticated unless `--cluster-key-file`). Warned about at start.
    #[arg(long, env = "LOCUS_INSECURE")]
    pub insecure: bool,
    /// Watches (WatchDriver, WatchTrip) clients may hold open on this node at once; one
    /// more is answered RESOURCE_EXHAUSTED.
    #[arg(long, env = "LOCUS_MAX_WATCHES", default_value_t = 100_000)]
    pub max_watches: usize,
    /// Event subscriptions (Events.Subscribe) clients may hold open on this node at once.
    #[arg(long, env = "LOCUS_MAX_SUBSCRIPTIONS", default_value_t = 1_000)]
    pub max_subscriptions: usize,
    /// Concurrent gRPC streams (calls) per HTTP/2 connection (the SETTINGS a client must
    /// respect; its extra calls wait). Nodes share one connection per peer, so keep it large.
    #[arg(long, env = "LOCUS_GRPC_MAX_STREAMS", default_value_t = 4096)]
    pub grpc_max_streams: u32,
    /// Open HTTP connections (share links, health, metrics) at once; one more is closed
    /// at once, unanswered.
    #[arg(long, env = "LOCUS_HTTP_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub http_max_connections: usize,
    /// An HTTP client must send a request's headers within this long (also while a
    /// kept-alive connection waits for its next request), or the connection is closed;
    /// a TLS handshake (HTTP or gRPC) must finish within it too.
    #[arg(long, env = "LOCUS_HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub http_header_timeout: Duration,
    /// How long a graceful shutdown waits for in-flight RPCs.
    #[arg(long, env = "LOCUS_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
}

impl NodeConfig {
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(|| PathBuf::from("data").join(&self.node_name))
    }

    /// Checks values clap cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.shards == 0 || self.shards > 256 {
            return Err("--shards must be 1..=256".into());
        }
        if self.mailbox_capacity == 0 {
            return Err("--mailbox-capacity must be > 0".into());
        }
        if self.max_speed_mps.is_nan() || self.max_speed_mps <= 0.0 {
            return Err("--max-speed-mps must be > 0".into());
        }
        if !(0.0..=10_000.0).contains(&self.index_slack_m) {
            return Err("--index-slack-m must be in 0..=10000".into());
        }
        if self.driver_ttl.is_zero() || self.driver_ttl > Duration::from_secs(366 * 86_400) {
            return Err("--driver-ttl must be > 0 and at most 366 days".into());
        }
        if self.max_future_skew > Duration::from_secs(86_400) {
            return Err("--max-future-skew must be at most 1 day".into());
        }
        if self.persist_interval.is_zero() {
            return Err("--persist-interval must be > 0".into());
        }
        if self.watch_queue == 0 {
            return Err("--watch-queue must be > 0".into());
        }
        if self.gossip_addr.ip().is_unspecified() {
            return Err("--gossip-addr must be an address peers can reach, not 0.0.0.0 or ::".into());
        }
        if self.scatter_timeout.is_zero() || self.scatter_timeout > Duration::from_secs(10) {
            return Err("--scatter-timeout must be > 0 and at most 10s".into());
        }
        for (name, v) in [
            ("--near-pickup-m", self.near_pickup_m),
            ("--fare-base", self.fare_base),
            ("--fare-per-km", self.fare_per_km),
            ("--fare-per-min", self.fare_per_min),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(format!("{name} must be a number >= 0"));
            }
        }
        for (name, v) in
            [("--share-client-rate", self.share_client_rate), ("--share-token-rate", self.share_token_rate)]
        {
            if !v.is_finite() || v <= 0.0 {
                return Err(format!("{name} must be > 0"));
            }
        }
        if self.replicas > 4 {
            return Err("--replicas must be at most 4".into());
        }
        if self.offer_timeout.is_zero() {
            return Err("--offer-timeout must be > 0".into());
        }
        if self.suspect_timeout < Duration::from_millis(500) {
            return Err("--suspect-timeout must be at least 500ms".into());
        }
        if self.max_watches == 0 || self.max_subscriptions == 0 || self.grpc_max_streams == 0 {
            return Err("--max-watches, --max-subscriptions and --grpc-max-streams must be > 0".into());
        }
        if self.http_max_connections == 0 || self.http_header_timeout.is_zero() {
            return Err("--http-max-connections and --http-header-timeout must be > 0".into());
        }
        crate::http::proxies::Trusted::parse(&self.trusted_proxies)?;
        if self.auth_file.is_some() && self.cluster_key_file.is_none() {
            return Err("--auth-file needs --cluster-key-file (nodes prove themselves to each other with it)".into());
        }
        if self.probe_period < Duration::from_millis(100) || self.probe_period > Duration::from_secs(10) {
            return Err("--probe-period must be between 100ms and 10s".into());
        }
        Ok(())
    }

    /// Expands `@hostname` in `--node-name` and resolves `--gossip-host` (real
    /// networks only; retried for a while: a container's name may not resolve yet).
    pub async fn resolve_names(mut self) -> Result<NodeConfig, String> {
        let host = || hostname().ok_or_else(|| "cannot read this machine's hostname".to_string());
        if self.node_name == HOSTNAME {
            self.node_name = host()?;
        }
        if let Some(h) = self.gossip_host.clone() {
            let name = if h == HOSTNAME { host()? } else { h };
            let port = self.gossip_addr.port();
            let mut last = String::new();
            for _ in 0..50 {
                match tokio::net::lookup_host((name.as_str(), port)).await {
                    Ok(addrs) => {
                        let addrs: Vec<SocketAddr> = addrs.collect();
                        // An address peers can reach: not loopback when there is another.
                        let pick = addrs.iter().find(|a| a.is_ipv4() && !a.ip().is_loopback()).or(addrs.first());
                        if let Some(a) = pick {
                            self.gossip_addr = *a;
                            return Ok(self);
                        }
                        last = "no address".into();
                    }
                    Err(e) => last = e.to_string(),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            return Err(format!("--gossip-host {name}: {last}"));
        }
        Ok(self)
    }

    /// Refuses to serve open RPCs beyond loopback: without `--auth-file`, every
    /// listening address must be loopback unless `--insecure` (checked for real sockets
    /// only; the in-process network reaches no one).
    pub fn check_exposure(&self) -> Result<(), String> {
        if self.auth_file.is_some() || self.insecure {
            return Ok(());
        }
        let udp = self.udp_addr.map(|a| ("--udp-addr", a));
        for (name, a) in
            [("--grpc-addr", self.grpc_addr), ("--http-addr", self.http_addr), ("--gossip-addr", self.gossip_addr)]
                .into_iter()
                .chain(udp)
        {
            if !a.ip().is_loopback() {
                return Err(format!(
                    "{name} {a} is not a loopback address and there is no --auth-file: every RPC would be open to \
                     anyone who reaches it. Give --auth-file and --cluster-key-file, or --insecure to do it anyway"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("900s"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }
}
