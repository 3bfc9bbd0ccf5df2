//! A throwaway PostgreSQL server for the exporter's benchmark and tests: Debian's
//! `postgresql` package, a cluster in a temporary directory, reached on a Unix socket
//! there only; stopped on drop. As root it runs as the package's `postgres` user
//! (`initdb` refuses root).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

pub struct PgServer {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    as_postgres: bool,
}

/// The newest installed PostgreSQL's `bin` directory (`LOCUS_PG_BIN` overrides).
pub fn pg_bin() -> Option<PathBuf> {
    if let Ok(b) = std::env::var("LOCUS_PG_BIN") {
        return Some(PathBuf::from(b));
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).filter(|p| p.join("initdb").exists()).collect())
        .unwrap_or_default();
    found.sort();
    found.pop()
}

impl PgServer {
    /// Creates and starts a cluster in `dir` (which must not exist yet), on `port`.
    pub fn start(dir: &Path, port: u16) -> anyhow::Result<PgServer> {
        let bin = pg_bin().context("PostgreSQL is not installed (apt-get install postgresql)")?;
        std::fs::create_dir_all(dir)?;
        // SAFETY: geteuid has no preconditions.
        let as_postgres = unsafe { libc::geteuid() } == 0;
        if as_postgres {
            let ok = Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir).status()?;
            if !ok.success() {
                bail!("chown {} to postgres failed", dir.display());
            }
        }
        let pg = PgServer { bin, dir: dir.to_path_buf(), port, as_postgres };
        let data = pg.dir.join("data");
        let data = data.to_str().context("a UTF-8 path")?;
        pg.run("initdb", &["-D", data, "-A", "trust", "-U", "locus", "--no-sync", "-E", "UTF8"])?;
        let opts = format!("-k {} -p {port} -c listen_addresses=''", pg.dir.display());
        let log = pg.dir.join("pg.log");
        pg.run("pg_ctl", &["-D", data, "-o", &opts, "-l", log.to_str().context("a UTF-8 path")?, "-w", "start"])?;
        Ok(pg)
    }

    fn run(&self, tool: &str, args: &[&str]) -> anyhow::Result<()> {
        let exe = self.bin.join(tool);
        let out = if self.as_postgres {
            Command::new("runuser").args(["-u", "postgres", "--"]).arg(&exe).args(args).output()
        } else {
            Command::new(&exe).args(args).output()
        }
        .with_context(|| format!("running {}", exe.display()))?;
        if !out.status.success() {
            bail!("{tool} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// The connection string (user `locus`, database `postgres`).
    pub fn dsn(&self) -> String {
        format!("host={} port={} user=locus dbname=postgres", self.dir.display(), self.port)
    }

    pub async fn client(&self) -> anyhow::Result<tokio_postgres::Client> {
        let (c, conn) = tokio_postgres::connect(&self.dsn(), tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Ok(c)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        if let Some(d) = data.to_str() {
            let _ = self.run("pg_ctl", &["-D", d, "-m", "immediate", "stop"]);
        }
    }
}
