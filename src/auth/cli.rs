//! `locus token`: makes tokens and their hashed `--auth-file` lines, and cluster keys.
//!
//! - `locus token new --roles gateway,reader --name gw-1 [--auth-file F]`: prints a new
//!   token on stdout; appends its line to F (created 0600 if missing), or prints the
//!   line on stderr.
//! - `locus token hash --roles R --name N`: reads a token on stdin, prints its line.
//! - `locus token cluster-key [--out F]`: a new random cluster key.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use super::{Role, line_for, new_token};

#[derive(Args, Debug)]
pub struct TokenCmd {
    #[command(subcommand)]
    cmd: TokenSub,
}

#[derive(Subcommand, Debug)]
enum TokenSub {
    /// A new random token: printed on stdout, its hashed line added to --auth-file.
    New {
        /// Comma-separated: gateway, dispatch, reader, admin.
        #[arg(long, value_delimiter = ',', value_parser = parse_role, required = true)]
        roles: Vec<Role>,
        /// A name for logs and metrics.
        #[arg(long)]
        name: String,
        /// Append the line here (created with mode 0600) instead of printing it.
        #[arg(long)]
        auth_file: Option<PathBuf>,
    },
    /// The hashed line of a token read on stdin.
    Hash {
        #[arg(long, value_delimiter = ',', value_parser = parse_role, required = true)]
        roles: Vec<Role>,
        #[arg(long)]
        name: String,
    },
    /// A new random cluster key (share the file with every node).
    ClusterKey {
        /// Write it here (mode 0600) instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    Role::parse(s).ok_or_else(|| format!("unknown role {s:?} (gateway, dispatch, reader, admin)"))
}

fn check_name(name: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !name.is_empty() && name.chars().all(|c| c.is_ascii_graphic()),
        "--name must be printable ASCII without spaces"
    );
    Ok(())
}

/// Writes `text` to a new file readable by its owner only, or appends to an existing one.
fn append_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// The first line of a token file.
pub fn read_token(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let t = text.lines().next().unwrap_or_default().trim().to_string();
    anyhow::ensure!(!t.is_empty(), "{} holds no token", path.display());
    Ok(t)
}

pub fn run(cmd: TokenCmd) -> anyhow::Result<()> {
    match cmd.cmd {
        TokenSub::New { roles, name, auth_file } => {
            check_name(&name)?;
            let token = new_token();
            let line = line_for(&token, &roles, &name);
            match auth_file {
                Some(f) => append_private(&f, &format!("{line}\n"))?,
                None => eprintln!("{line}"),
            }
            println!("{token}");
        }
        TokenSub::Hash { roles, name } => {
            check_name(&name)?;
            let mut token = String::new();
            std::io::stdin().lock().read_line(&mut token)?;
            let token = token.trim();
            anyhow::ensure!(!token.is_empty(), "no token on stdin");
            println!("{}", line_for(token, &roles, &name));
        }
        TokenSub::ClusterKey { out } => {
            let key = new_token().replacen("lct_", "lck_", 1);
            match out {
                Some(f) => {
                    anyhow::ensure!(!f.exists(), "{} exists: not overwriting a cluster key", f.display());
                    append_private(&f, &format!("{key}\n"))?
                }
                None => println!("{key}"),
            }
        }
    }
    Ok(())
}
