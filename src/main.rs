//! The `locus` binary: `locus node` runs a node, `locus sim` runs the city simulator,
//! `locus admin` asks a node about the cluster, `locus bench` runs the benchmarks,
//! `locus export postgres` copies every accepted fix into PostgreSQL.

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use locus::config::{LogFormat, NodeConfig};

/// mimalloc: with it, `locus bench` loaded 1M drivers at 612k fixes/s against 438k with
/// glibc malloc (Nearby p99 0.65 ms against 1.05 ms); resident memory was about the same.
/// Built without transparent huge pages (`no_thp`): memory it returned and took back was
/// faulted in 2 MiB at a time, each zeroed whole, and while partitions moved that
/// zeroing took a third of a new node's CPU (the moves bench: join Nearby p99 50–120 ms
/// with huge pages, about 22–28 ms without; promotions 1.2–1.7 s, then 0.6–0.8 s).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use locus::sim::SimConfig;

#[derive(Parser)]
#[command(name = "locus", version, about = "Locus: real-time vehicle tracking")]
struct Cli {
    /// The bearer token `sim`, `admin` and `bench` send, from a file (its first line).
    #[arg(long, global = true, env = "LOCUS_TOKEN_FILE")]
    token_file: Option<std::path::PathBuf>,
    /// For `https://` nodes: the CA their certificates chain to (also `locus probe`'s, which
    /// then asks over HTTPS). A node reads the same variable as its own `--tls-ca`.
    #[arg(long = "client-tls-ca", global = true, env = "LOCUS_TLS_CA")]
    client_tls_ca: Option<std::path::PathBuf>,
    /// The bearer token itself (prefer --token-file: a command line is visible to others).
    #[arg(long, global = true, env = "LOCUS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a Locus node.
    Node(Box<NodeConfig>),
    /// Run the city simulator against a node.
    Sim(SimConfig),
    /// Ask a node about the cluster: members, lookup KEY, ring, leave.
    Admin(locus::admin::AdminConfig),
    /// Run a benchmark (see `make bench`).
    Bench(locus::bench::BenchConfig),
    /// Break a real cluster on purpose under load and check it (needs root).
    Chaos(locus::chaos::ChaosConfig),
    /// Export every accepted fix into a database, exactly once (`export postgres`).
    Export(locus::export::ExportConfig),
    /// Make tokens for `--auth-file` (stored hashed) and cluster keys.
    Token(locus::auth::cli::TokenCmd),
    /// Exit 0 if a node's HTTP endpoint answers 200 (a container's healthcheck: the
    /// image has no shell and no curl).
    Probe {
        /// The node's HTTP address.
        #[arg(long, default_value = "127.0.0.1:7480")]
        http: String,
        /// `/readyz` (on the ring, nothing incoming) or `/healthz` (alive).
        #[arg(long, default_value = "/readyz")]
        path: String,
    },
}

fn init_tracing(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,h2=warn,tower=warn,hyper=warn"));
    let reg = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => reg.with(tracing_subscriber::fmt::layer().json().flatten_event(true)).init(),
        // Colours only on a terminal: a log file or a collector gets plain text.
        LogFormat::Text => {
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
            reg.with(tracing_subscriber::fmt::layer().compact().with_ansi(ansi)).init()
        }
    }
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called, not
/// when the future is first polled: the node may already answer requests before it polls
/// its shutdown future, and a SIGTERM in between would otherwise kill it outright (exit
/// by signal, nothing handed over or flushed).
fn terminated() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let token = match (&cli.token_file, cli.token) {
        (Some(f), _) => Some(locus::auth::cli::read_token(f)?),
        (None, t) => t,
    };
    locus::auth::layer::set_client_token(token.as_deref())?;
    let ca = match &cli.client_tls_ca {
        Some(p) => Some(std::fs::read(p).map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))?),
        None => None,
    };
    locus::auth::layer::set_client_tls(ca.as_deref());
    match cli.cmd {
        Cmd::Node(cfg) => {
            init_tracing(cfg.log_format);
            locus::node::run(*cfg, terminated(), |_, _| {}).await
        }
        Cmd::Sim(cfg) => {
            init_tracing(LogFormat::Text);
            locus::sim::run(cfg).await
        }
        Cmd::Admin(cfg) => locus::admin::run(cfg).await,
        Cmd::Bench(cfg) => {
            init_tracing(LogFormat::Text);
            locus::bench::run(cfg).await
        }
        Cmd::Chaos(cfg) => locus::chaos::run(cfg).await,
        Cmd::Export(cfg) => {
            init_tracing(LogFormat::Text);
            match cfg.sink {
                locus::export::Sink::Postgres(pg) => {
                    let t = locus::export::run(pg, terminated()).await?;
                    println!(
                        "exported {} rows in {} transactions, {:.1} s ({:.0} rows/s)",
                        t.rows,
                        t.transactions,
                        t.seconds,
                        t.rows as f64 / t.seconds.max(1e-3)
                    );
                    Ok(())
                }
            }
        }
        Cmd::Token(cmd) => locus::auth::cli::run(cmd),
        Cmd::Probe { http, path } => {
            let probe = async {
                match &ca {
                    Some(ca) => locus::tls::https_get(&http, &path, ca).await,
                    None => locus::sim::http_get(&http, &path).await,
                }
            };
            match tokio::time::timeout(std::time::Duration::from_secs(2), probe).await {
                Ok(Ok((200, _))) => Ok(()),
                Ok(Ok((code, body))) => anyhow::bail!("{http}{path}: {code} {}", body.trim()),
                Ok(Err(e)) => anyhow::bail!("{http}{path}: {e}"),
                Err(_) => anyhow::bail!("{http}{path}: no answer within 2s"),
            }
        }
    }
}
