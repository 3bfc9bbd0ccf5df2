//! Who may call what: bearer tokens with roles, the cluster credential between nodes,
//! and the keys derived from the cluster key.
//!
//! Pure core (no I/O but reading a file on request):
//! - [`TokenTable`]: the `--auth-file`, one token per line, stored hashed (SHA-256):
//!   `sha256:<hex> <role,role...> [name]`. `locus token new` makes a token and its line.
//! - [`need`]: what a gRPC method needs, from its path and whether the request says it
//!   was forwarded by a node (`locus-hop`, `locus-scope`): a client role, the cluster
//!   credential, or nothing (health and reflection).
//! - [`ClusterKey`]: the `--cluster-key-file` secret; everything secret between nodes is
//!   derived from it by HMAC-SHA256 with a distinct label (the gRPC node credential, the
//!   gossip MAC key), so no derived value reveals another or the key.
//! - [`Auth`]: the table in force (replaced whole on SIGHUP; a file that does not parse
//!   keeps the old table) and the node credential; [`Auth::check`] decides one request.
//!
//! The shells are in [`layer`]: the tower layer in front of every gRPC service, and
//! [`layer::AuthChannel`], the client side that sends a token (a client's, or the node
//! credential on peer channels). Tokens never reach a log or a metric label.

pub mod cli;
pub mod layer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use ring::{digest, hmac};

/// A client role. A token may hold several.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Fix ingest: `Update`, `UpdateStream`, `RemoveDriver`, `Sessions.Open` / `Close`.
    Gateway,
    /// Trips and dispatch: `Trips.Apply`, `Trips.ShareTrip`, `Dispatch.Match`, `Dispatch.Decline`.
    Dispatch,
    /// Reads, watches and events: `GetDriver`, `Nearby`, `Within`, `WatchDriver`,
    /// `GetHistory`, `GetTrip`, `WatchTrip`, `Events.Subscribe`, `Fixes.Subscribe`, the
    /// live map.
    Reader,
    /// The `Cluster` service (members, ring, partitions, leave, drain).
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Gateway, Role::Dispatch, Role::Reader, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Dispatch => "dispatch",
            Role::Reader => "reader",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// A set of roles.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Roles(u8);

impl Roles {
    pub fn with(self, r: Role) -> Roles {
        Roles(self.0 | r.bit())
    }

    pub fn has(self, r: Role) -> bool {
        self.0 & r.bit() != 0
    }
}

/// What a request needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Health and reflection: open to anyone (probes and tools).
    Public,
    Role(Role),
    /// Node-to-node calls: only the cluster credential.
    Node,
}

/// What a gRPC method (`/package.Service/Method`) needs. `forwarded`: the request
/// carries a node's forwarding metadata (a hop count or a scatter scope), which only a
/// node may send. Unknown methods need a node: nothing unlisted is open by accident.
pub fn need(path: &str, forwarded: bool) -> Need {
    let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or((path, ""));
    if service == "grpc.health.v1.Health" || service.starts_with("grpc.reflection.") {
        return Need::Public;
    }
    if forwarded {
        return Need::Node;
    }
    use Role::*;
    let role = match (service, method) {
        ("locus.v1.Locations", "Update" | "UpdateStream" | "RemoveDriver") => Gateway,
        ("locus.v1.Sessions", _) => Gateway,
        ("locus.v1.Locations", "GetDriver" | "Nearby" | "Within" | "WatchDriver" | "GetHistory") => Reader,
        ("locus.v1.Trips", "Apply" | "ShareTrip") => Dispatch,
        ("locus.v1.Trips", "GetTrip" | "WatchTrip") => Reader,
        ("locus.v1.Dispatch", _) => Dispatch,
        ("locus.v1.Events" | "locus.v1.Fixes", _) => Reader,
        ("locus.v1.Cluster", _) => Admin,
        _ => return Need::Node,
    };
    Need::Role(role)
}

/// One token of the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// For logs and metrics (never the token).
    pub name: String,
    pub roles: Roles,
}

/// A malformed auth file: the line and why (never the line's content).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("auth file line {line}: {reason}")]
pub struct ParseError {
    pub line: usize,
    pub reason: String,
}

/// The tokens a node accepts, by the SHA-256 of the token.
#[derive(Clone, Debug, Default)]
pub struct TokenTable {
    by_hash: HashMap<[u8; 32], Entry>,
}

/// SHA-256 of a token.
pub fn hash_token(token: &str) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, token.as_bytes());
    d.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// The auth file line of a token.
pub fn line_for(token: &str, roles: &[Role], name: &str) -> String {
    let roles: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
    format!("sha256:{} {} {name}", hex(&hash_token(token)), roles.join(","))
}

/// A new random token (256 bits, hex, with a recognisable prefix for secret scanners).
pub fn new_token() -> String {
    let mut b = [0u8; 32];
    rand::fill(&mut b);
    format!("lct_{}", hex(&b))
}

impl TokenTable {
    pub fn parse(text: &str) -> Result<TokenTable, ParseError> {
        let mut by_hash = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let err = |reason: &str| ParseError { line, reason: reason.to_string() };
            let l = raw.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let mut f = l.split_whitespace();
            let h = f.next().unwrap_or_default();
            let Some(h) = h.strip_prefix("sha256:") else {
                return Err(err(
                    "expected `sha256:<64 hex digits> <roles> [name]` (tokens are stored hashed: `locus token hash`)",
                ));
            };
            let hash: [u8; 32] =
                unhex(h).and_then(|v| v.try_into().ok()).ok_or_else(|| err("the hash is not 64 hex digits"))?;
            let roles_field = f.next().ok_or_else(|| err("no roles (gateway, dispatch, reader, admin)"))?;
            let mut roles = Roles::default();
            for r in roles_field.split(',') {
                let role = Role::parse(r)
                    .ok_or_else(|| err(&format!("unknown role {r:?} (gateway, dispatch, reader, admin)")))?;
                roles = roles.with(role);
            }
            let name = f.collect::<Vec<_>>().join(" ");
            let name = if name.is_empty() { format!("line-{line}") } else { name };
            if by_hash.insert(hash, Entry { name, roles }).is_some() {
                return Err(err("the same token is listed twice"));
            }
        }
        Ok(TokenTable { by_hash })
    }

    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    pub fn lookup(&self, token: &str) -> Option<&Entry> {
        self.by_hash.get(&hash_token(token))
    }
}

/// The cluster key: the secret every node of a cluster shares.
#[derive(Clone)]
pub struct ClusterKey(hmac::Key);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

/// The shortest cluster key accepted (bytes, after trimming whitespace).
pub const MIN_CLUSTER_KEY: usize = 16;

impl ClusterKey {
    pub fn new(secret: &[u8]) -> Result<ClusterKey, String> {
        if secret.len() < MIN_CLUSTER_KEY {
            return Err(format!("the cluster key must be at least {MIN_CLUSTER_KEY} bytes"));
        }
        Ok(ClusterKey(hmac::Key::new(hmac::HMAC_SHA256, secret)))
    }

    pub fn read(path: &Path) -> Result<ClusterKey, String> {
        let raw = std::fs::read(path).map_err(|e| format!("reading the cluster key {}: {e}", path.display()))?;
        ClusterKey::new(raw.trim_ascii()).map_err(|e| format!("{}: {e}", path.display()))
    }

    fn derive(&self, label: &str) -> [u8; 32] {
        hmac::sign(&self.0, label.as_bytes()).as_ref().try_into().expect("HMAC-SHA256 is 32 bytes")
    }

    /// The secret UDP session keys are derived from (see `udp`).
    pub fn udp_master(&self) -> [u8; 32] {
        self.derive("locus/v1/udp-session-keys")
    }

    /// The bearer token nodes send each other.
    pub fn node_credential(&self) -> String {
        format!("lcn_{}", hex(&self.derive("locus/v1/grpc-node-credential")))
    }

    /// The key gossip packets are authenticated with.
    pub fn gossip_key(&self) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, &self.derive("locus/v1/gossip-mac"))
    }
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// No `authorization: Bearer` header, or a token no one issued.
    Unauthenticated(&'static str),
    /// A valid token without the role the method needs.
    PermissionDenied(Need),
}

/// The node's authentication state: the token table in force and the node credential.
#[derive(Debug)]
pub struct Auth {
    file: PathBuf,
    table: RwLock<TokenTable>,
    node: [u8; 32],
}

impl Auth {
    /// Reads `file` (the token table) and takes the node credential from `key`.
    pub fn open(file: &Path, key: &ClusterKey) -> Result<Auth, String> {
        let table = Self::read(file)?;
        Ok(Auth { file: file.to_path_buf(), table: RwLock::new(table), node: hash_token(&key.node_credential()) })
    }

    fn read(file: &Path) -> Result<TokenTable, String> {
        let text =
            std::fs::read_to_string(file).map_err(|e| format!("reading the auth file {}: {e}", file.display()))?;
        TokenTable::parse(&text).map_err(|e| format!("{}: {e}", file.display()))
    }

    /// Reads the file again; on an error the table in force stays. Returns the count.
    pub fn reload(&self) -> Result<usize, String> {
        let t = Self::read(&self.file)?;
        let n = t.len();
        *self.table.write().expect("auth table lock") = t;
        Ok(n)
    }

    pub fn tokens(&self) -> usize {
        self.table.read().expect("auth table lock").len()
    }

    /// Decides one request: `path` is the gRPC method, `bearer` the token sent (if any).
    /// A refusal carries the token's name when the token is known (wrong role).
    pub fn check(&self, path: &str, forwarded: bool, bearer: Option<&str>) -> Result<Need, (Refused, Option<String>)> {
        self.decide(need(path, forwarded), bearer)
    }

    /// Decides an HTTP request that needs `role` (the live map's data needs `reader`).
    pub fn check_role(&self, role: Role, bearer: Option<&str>) -> Result<Need, (Refused, Option<String>)> {
        self.decide(Need::Role(role), bearer)
    }

    fn decide(&self, n: Need, bearer: Option<&str>) -> Result<Need, (Refused, Option<String>)> {
        if n == Need::Public {
            return Ok(n);
        }
        let Some(token) = bearer else {
            return Err((Refused::Unauthenticated("no bearer token"), None));
        };
        let h = hash_token(token);
        // The node credential's hash is compared in constant time (a hash of a secret:
        // timing would reveal nothing useful anyway, but it costs nothing).
        if ct_eq(&h, &self.node) {
            return Ok(n);
        }
        let table = self.table.read().expect("auth table lock");
        let Some(e) = table.by_hash.get(&h) else {
            return Err((Refused::Unauthenticated("unknown token"), None));
        };
        match n {
            Need::Role(r) if e.roles.has(r) => Ok(n),
            _ => Err((Refused::PermissionDenied(n), Some(e.name.clone()))),
        }
    }
}

fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_need_the_documented_roles() {
        assert_eq!(need("/locus.v1.Locations/UpdateStream", false), Need::Role(Role::Gateway));
        assert_eq!(need("/locus.v1.Locations/Nearby", false), Need::Role(Role::Reader));
        assert_eq!(need("/locus.v1.Dispatch/Match", false), Need::Role(Role::Dispatch));
        assert_eq!(need("/locus.v1.Sessions/Open", false), Need::Role(Role::Gateway));
        assert_eq!(need("/locus.v1.Trips/Apply", false), Need::Role(Role::Dispatch));
        assert_eq!(need("/locus.v1.Trips/WatchTrip", false), Need::Role(Role::Reader));
        assert_eq!(need("/locus.v1.Events/Subscribe", false), Need::Role(Role::Reader));
        assert_eq!(need("/locus.v1.Fixes/Subscribe", false), Need::Role(Role::Reader));
        assert_eq!(need("/locus.v1.Locations/GetHistory", false), Need::Role(Role::Reader));
        assert_eq!(need("/locus.v1.Cluster/Drain", false), Need::Role(Role::Admin));
        assert_eq!(need("/locus.v1.Internal/Claim", false), Need::Node);
        assert_eq!(need("/locus.v1.Handoff/Pull", false), Need::Node);
        assert_eq!(need("/locus.v1.Locations/NotAMethod", false), Need::Node);
        // A forwarded request (hop or scatter scope) needs a node, whatever the method.
        assert_eq!(need("/locus.v1.Locations/Nearby", true), Need::Node);
        assert_eq!(need("/grpc.health.v1.Health/Check", true), Need::Public);
        assert_eq!(need("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", false), Need::Public);
    }

    #[test]
    fn the_table_parses_hashed_lines_and_names_bad_ones() {
        let a = new_token();
        let b = new_token();
        assert_ne!(a, b);
        let text = format!(
            "# tokens\n\n{}\n{}\n",
            line_for(&a, &[Role::Gateway], "gw-1"),
            line_for(&b, &[Role::Dispatch, Role::Reader], "dispatch")
        );
        let t = TokenTable::parse(&text).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t.lookup(&a).unwrap().name, "gw-1");
        assert!(t.lookup(&b).unwrap().roles.has(Role::Reader));
        assert!(!t.lookup(&b).unwrap().roles.has(Role::Admin));
        assert!(t.lookup("lct_guess").is_none());
        // The file holds no token, only its hash.
        assert!(!text.contains(&a[4..]));

        let e = TokenTable::parse(&format!("{a} gateway\n")).unwrap_err();
        assert_eq!(e.line, 1);
        assert!(!e.to_string().contains(&a), "the error must not echo a secret");
        assert_eq!(TokenTable::parse("sha256:abcd gateway").unwrap_err().reason, "the hash is not 64 hex digits");
        let bad_role = format!("\n{}", line_for(&a, &[Role::Gateway], "x").replace("gateway", "root"));
        let e = TokenTable::parse(&bad_role).unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.reason.contains("unknown role \"root\""), "{e}");
        let twice = format!("{}\n{}", line_for(&a, &[Role::Gateway], "x"), line_for(&a, &[Role::Reader], "y"));
        assert!(TokenTable::parse(&twice).is_err());
    }

    #[test]
    fn check_separates_unknown_wrong_role_node_and_public() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        let (gw, admin) = (new_token(), new_token());
        std::fs::write(
            &file,
            format!("{}\n{}\n", line_for(&gw, &[Role::Gateway], "gw"), line_for(&admin, &[Role::Admin], "ops")),
        )
        .unwrap();
        let key = ClusterKey::new(b"0123456789abcdef-cluster").unwrap();
        let auth = Auth::open(&file, &key).unwrap();
        let upd = "/locus.v1.Locations/Update";
        assert!(auth.check(upd, false, Some(&gw)).is_ok());
        assert_eq!(auth.check(upd, false, None).unwrap_err().0, Refused::Unauthenticated("no bearer token"));
        assert_eq!(auth.check(upd, false, Some("lct_nope")).unwrap_err().0, Refused::Unauthenticated("unknown token"));
        let (r, name) = auth.check("/locus.v1.Locations/Nearby", false, Some(&gw)).unwrap_err();
        assert_eq!(r, Refused::PermissionDenied(Need::Role(Role::Reader)));
        assert_eq!(name.as_deref(), Some("gw"));
        // Not even an admin token calls node-to-node methods, or forwards.
        assert!(auth.check("/locus.v1.Handoff/Pull", false, Some(&admin)).is_err());
        assert!(auth.check("/locus.v1.Cluster/Members", true, Some(&admin)).is_err());
        assert!(auth.check("/locus.v1.Cluster/Members", false, Some(&admin)).is_ok());
        // The node credential calls anything.
        let node = key.node_credential();
        assert!(auth.check("/locus.v1.Handoff/Pull", false, Some(&node)).is_ok());
        assert!(auth.check("/locus.v1.Locations/Nearby", true, Some(&node)).is_ok());
        // Another cluster's credential is just an unknown token.
        let other = ClusterKey::new(b"another-cluster-key-0000").unwrap().node_credential();
        assert!(auth.check("/locus.v1.Handoff/Pull", false, Some(&other)).is_err());
        assert!(auth.check("/grpc.health.v1.Health/Check", false, None).is_ok());

        // Reload: a new token works, the old one is gone; a broken file keeps the table.
        let gw2 = new_token();
        std::fs::write(&file, line_for(&gw2, &[Role::Gateway], "gw2")).unwrap();
        assert_eq!(auth.reload(), Ok(1));
        assert!(auth.check(upd, false, Some(&gw2)).is_ok());
        assert!(auth.check(upd, false, Some(&gw)).is_err());
        std::fs::write(&file, "garbage").unwrap();
        assert!(auth.reload().is_err());
        assert!(auth.check(upd, false, Some(&gw2)).is_ok());
    }

    #[test]
    fn derived_keys_differ_and_short_keys_are_refused() {
        assert!(ClusterKey::new(b"short").is_err());
        let k = ClusterKey::new(b"0123456789abcdef").unwrap();
        let k2 = ClusterKey::new(b"0123456789abcdef").unwrap();
        assert_eq!(k.node_credential(), k2.node_credential());
        let g = hmac::sign(&k.gossip_key(), b"x");
        assert!(hmac::verify(&k2.gossip_key(), b"x", g.as_ref()).is_ok());
        assert!(!k.node_credential().contains(&hex(g.as_ref())));
    }
}
