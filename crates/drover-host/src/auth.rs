//! Who may do what: callers, roles and permissions.
//!
//! The smallest model later features can grow: a caller is identified by its unix uid (from the
//! API socket's peer credentials) or, on TCP, by a bearer token; it holds one role, and each API
//! action needs one permission. uid 0 is always `admin`; other uids have the role an admin
//! granted them (`drover auth grant`), or none. A token has the role it was created with.
//!
//! Tokens live in a plain text file (default `STATE_DIR/tokens`), one per line:
//! `SHA256-HEX ROLE NAME`. Only the hash is kept, so the file reveals no token; an admin can add
//! one by hand (`printf %s "$TOKEN" | sha256sum`) and droverd picks up edits without a restart.

use crate::error::HostError;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

/// What an action needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// See VMs, configs, host facts.
    Read,
    /// Create, start, stop, delete VMs.
    Lifecycle,
    /// Change a VM's configuration (live or for the next boot).
    Change,
    /// Run commands in guests.
    Exec,
    /// Flip a VM's persistence flag or mode, promote generations.
    ConfigPersist,
    /// Grant and revoke guest principals, read audit logs.
    GuestAccess,
    /// Manage roles, build images.
    Admin,
}

impl Permission {
    /// Every permission, for listing what a role holds.
    pub const ALL: [Permission; 7] = [
        Permission::Read,
        Permission::Lifecycle,
        Permission::Change,
        Permission::Exec,
        Permission::ConfigPersist,
        Permission::GuestAccess,
        Permission::Admin,
    ];

    /// The permission's name as errors and docs spell it.
    pub fn name(self) -> &'static str {
        match self {
            Permission::Read => "vm.read",
            Permission::Lifecycle => "vm.lifecycle",
            Permission::Change => "config.change",
            Permission::Exec => "vm.exec",
            Permission::ConfigPersist => "config.persist",
            Permission::GuestAccess => "guest.access",
            Permission::Admin => "admin",
        }
    }
}

/// A role: a named set of permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything.
    Admin,
    /// Runs and changes VMs; may not change persistence, guest access or roles.
    Operator,
    /// Reads only.
    Viewer,
}

impl Role {
    /// Whether the role holds `p`.
    pub fn allows(self, p: Permission) -> bool {
        match self {
            Role::Admin => true,
            Role::Operator => matches!(
                p,
                Permission::Read | Permission::Lifecycle | Permission::Change | Permission::Exec
            ),
            Role::Viewer => p == Permission::Read,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        })
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "admin" => Ok(Role::Admin),
            "operator" => Ok(Role::Operator),
            "viewer" => Ok(Role::Viewer),
            _ => Err(format!("unknown role {s:?}: use admin, operator or viewer")),
        }
    }
}

/// The caller of an API request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// How it is named in journals and errors (`uid 1000`).
    pub name: String,
    /// Its role, if any.
    pub role: Option<Role>,
    /// The local uid behind it (unix socket callers), which may own files in image pools.
    pub uid: Option<u32>,
}

impl Caller {
    /// droverd itself (seals at shutdown, re-adoption).
    pub fn daemon() -> Caller {
        Caller {
            name: "droverd".into(),
            role: Some(Role::Admin),
            uid: None,
        }
    }

    /// Fail with a message that names what is missing, unless the caller holds `p`.
    pub fn require(&self, p: Permission) -> Result<(), HostError> {
        match self.role {
            Some(r) if r.allows(p) => Ok(()),
            // A token's role is fixed at creation; a uid's can be granted.
            Some(r) if self.name.starts_with("token ") => Err(HostError::Forbidden(format!(
                "{} (role {r}) lacks the {} permission for this; use a token with a role that has it (an admin makes one with `drover auth token create --role ROLE`)",
                self.name,
                p.name()
            ))),
            Some(r) => Err(HostError::Forbidden(format!(
                "{} (role {r}) lacks the {} permission for this; an admin can grant a role that has it (`drover auth grant`)",
                self.name,
                p.name()
            ))),
            None => Err(HostError::Forbidden(format!(
                "{} has no role on this host; an admin can grant one (`drover auth grant --uid N --role operator`)",
                self.name
            ))),
        }
    }
}

/// Token file and token failures.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// A line of the token file is malformed.
    #[error("{path}:{line}: {why} (expected `SHA256-HEX ROLE NAME`)")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        why: String,
    },
    /// Reading or writing the file failed.
    #[error("token file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Bad input to create or revoke.
    #[error("{0}")]
    Invalid(String),
    /// No token by that name.
    #[error("no token named {0:?} (see `drover auth token list`)")]
    NotFound(String),
    /// The name is taken.
    #[error("a token named {0:?} already exists; pick another --name or revoke it first")]
    Exists(String),
}

impl From<TokenError> for HostError {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Invalid(_) => HostError::Invalid(e.to_string()),
            TokenError::NotFound(_) => HostError::Missing(e.to_string()),
            TokenError::Exists(_) => HostError::Conflict(e.to_string()),
            TokenError::Parse { .. } | TokenError::Io { .. } => HostError::Internal(e.to_string()),
        }
    }
}

/// One token as the file records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenEntry {
    /// sha256 of the token, lowercase hex.
    pub sha256: String,
    /// Its role.
    pub role: Role,
    /// Its name (for listing, revoking and journals).
    pub name: String,
}

impl TokenEntry {
    /// What the API shows of it.
    pub fn info(&self) -> drover_api::TokenInfo {
        drover_api::TokenInfo {
            name: self.name.clone(),
            role: self.role.to_string(),
            sha256_prefix: self.sha256.chars().take(12).collect(),
        }
    }

    /// The caller that presents this token.
    pub fn caller(&self) -> Caller {
        Caller {
            name: format!("token {}", self.name),
            role: Some(self.role),
            uid: None,
        }
    }
}

/// sha256 of a token, lowercase hex: what the token file stores.
pub fn hash_token(token: &str) -> String {
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// A fresh random token: `drv_` and 32 random bytes in hex (256 bits, so a plain hash is enough;
/// no slow password hash is needed as for guest secrets people pick).
pub fn new_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    format!("drv_{}", hex::encode(b))
}

/// The token in an `Authorization` header value, if it is `Bearer <token>`.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, rest) = header.trim().split_once(' ')?;
    let token = rest.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn valid_token_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
}

/// Parse a token file's text. Blank lines and `#` comments are skipped.
pub fn parse_tokens(path: &Path, text: &str) -> Result<Vec<TokenEntry>, TokenError> {
    let mut out: Vec<TokenEntry> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |why: String| TokenError::Parse {
            path: path.to_path_buf(),
            line: i + 1,
            why,
        };
        let mut f = line.split_whitespace();
        let (Some(hash), Some(role)) = (f.next(), f.next()) else {
            return Err(err("missing role".into()));
        };
        let hash = hash.to_ascii_lowercase();
        if hash.len() != 64 || !hash.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(err(format!("{hash:?} is not a sha256 in hex (64 digits)")));
        }
        let role: Role = role.to_ascii_lowercase().parse().map_err(err)?;
        let name = f
            .next()
            .map(str::to_string)
            .unwrap_or_else(|| hash[..12].to_string());
        if !valid_token_name(&name) {
            return Err(err(format!("bad token name {name:?}")));
        }
        if f.next().is_some() {
            return Err(err("too many fields".into()));
        }
        if out.iter().any(|e| e.name == name) {
            return Err(err(format!("token name {name:?} appears twice")));
        }
        out.push(TokenEntry {
            sha256: hash,
            role,
            name,
        });
    }
    Ok(out)
}

/// Render entries as a token file.
pub fn format_tokens(entries: &[TokenEntry]) -> String {
    let mut s = String::from(
        "# droverd API tokens: SHA256-HEX ROLE NAME (sha256 of the token; the token itself is not kept)\n",
    );
    for e in entries {
        s.push_str(&format!("{} {} {}\n", e.sha256, e.role, e.name));
    }
    s
}

#[derive(Default)]
struct Loaded {
    stamp: Option<(SystemTime, u64)>,
    entries: Vec<TokenEntry>,
}

/// The token file, re-read whenever it changes on disk (so hand edits and revocations take
/// effect at once, without a restart).
pub struct TokenStore {
    path: PathBuf,
    loaded: Mutex<Loaded>,
}

impl TokenStore {
    /// A store backed by `path` (which need not exist yet: no tokens).
    pub fn new(path: &Path) -> TokenStore {
        TokenStore {
            path: path.to_path_buf(),
            loaded: Mutex::new(Loaded::default()),
        }
    }

    /// The token file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, source: std::io::Error) -> TokenError {
        TokenError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// The current entries, re-read if the file changed.
    pub fn entries(&self) -> Result<Vec<TokenEntry>, TokenError> {
        let stamp = match std::fs::metadata(&self.path) {
            Ok(m) => Some((m.modified().map_err(|e| self.io(e))?, m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(self.io(e)),
        };
        let mut l = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if stamp != l.stamp || l.stamp.is_none() {
            l.entries = match stamp {
                None => Vec::new(),
                Some(_) => {
                    let text = std::fs::read_to_string(&self.path).map_err(|e| self.io(e))?;
                    parse_tokens(&self.path, &text)?
                }
            };
            l.stamp = stamp;
        }
        Ok(l.entries.clone())
    }

    /// The entry for a presented token, if any.
    pub fn resolve(&self, token: &str) -> Result<Option<TokenEntry>, TokenError> {
        let h = hash_token(token);
        Ok(self.entries()?.into_iter().find(|e| e.sha256 == h))
    }

    fn write(&self, entries: &[TokenEntry]) -> Result<(), TokenError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| self.io(e))?;
        }
        // Write aside and rename, so a crash never leaves a half-written file that locks
        // everyone out.
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| self.io(e))?;
        f.write_all(format_tokens(entries).as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| self.io(e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| self.io(e))?;
        // Two writes within one mtime tick with the same length would look unchanged: forget
        // what was loaded so the next look re-reads.
        self.loaded.lock().unwrap_or_else(|p| p.into_inner()).stamp = None;
        Ok(())
    }

    /// Create a token with `role`; returns the token (to show once) and its entry.
    pub fn create(
        &self,
        role: Role,
        name: Option<&str>,
    ) -> Result<(String, TokenEntry), TokenError> {
        let mut entries = self.entries()?;
        let name = match name {
            Some(n) if valid_token_name(n) => n.to_string(),
            Some(n) => {
                return Err(TokenError::Invalid(format!(
                    "bad token name {n:?}: use letters, digits, '-', '_', '.', '@' (at most 64)"
                )))
            }
            None => (1..)
                .map(|i| format!("{role}-{i}"))
                .find(|n| entries.iter().all(|e| &e.name != n))
                .unwrap_or_else(|| role.to_string()),
        };
        if entries.iter().any(|e| e.name == name) {
            return Err(TokenError::Exists(name));
        }
        let token = new_token();
        let entry = TokenEntry {
            sha256: hash_token(&token),
            role,
            name,
        };
        entries.push(entry.clone());
        self.write(&entries)?;
        Ok((token, entry))
    }

    /// Remove the token named `name`.
    pub fn revoke(&self, name: &str) -> Result<TokenEntry, TokenError> {
        let mut entries = self.entries()?;
        let Some(pos) = entries.iter().position(|e| e.name == name) else {
            return Err(TokenError::NotFound(name.to_string()));
        };
        let gone = entries.remove(pos);
        self.write(&entries)?;
        Ok(gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_hash_is_sha256_hex() {
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let t = new_token();
        assert!(t.starts_with("drv_") && t.len() == 68, "{t}");
        assert_ne!(new_token(), t);
    }

    #[test]
    fn bearer_header_is_parsed() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer   abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("abc"), None);
    }

    #[test]
    fn token_file_parses_and_refuses_junk() {
        let p = Path::new("tokens");
        let h = hash_token("t1");
        let text = format!(
            "# comment\n\n{h} viewer ci\n{} ADMIN\n",
            hash_token("t2").to_uppercase()
        );
        let e = parse_tokens(p, &text).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!((e[0].role, e[0].name.as_str()), (Role::Viewer, "ci"));
        // No name: the hash prefix names it; upper-case hex is accepted.
        assert_eq!(e[1].name, hash_token("t2")[..12]);
        // Round trip.
        assert_eq!(parse_tokens(p, &format_tokens(&e)).unwrap(), e);
        for (bad, why) in [
            ("abc admin x", "not a sha256"),
            (h.as_str(), "missing role"),
            (&format!("{h} root x"), "unknown role"),
            (&format!("{h} admin x y"), "too many"),
            (&format!("{h} admin a/b"), "bad token name"),
            (&format!("{h} admin x\n{h} viewer x"), "twice"),
        ] {
            let err = parse_tokens(p, bad).unwrap_err().to_string();
            assert!(err.contains(why) && err.contains("tokens:"), "{bad}: {err}");
        }
    }

    #[test]
    fn token_store_creates_resolves_revokes_and_rereads() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        let s = TokenStore::new(&path);
        assert!(s.entries().unwrap().is_empty());
        let (t, e) = s.create(Role::Operator, None).unwrap();
        assert_eq!(e.name, "operator-1");
        assert_eq!(s.resolve(&t).unwrap().unwrap().role, Role::Operator);
        assert!(s.resolve("drv_nope").unwrap().is_none());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // The token itself is never written.
        assert!(!std::fs::read_to_string(&path).unwrap().contains(&t));
        assert!(matches!(
            s.create(Role::Viewer, Some("operator-1")),
            Err(TokenError::Exists(_))
        ));
        assert!(matches!(
            s.create(Role::Viewer, Some("a b")),
            Err(TokenError::Invalid(_))
        ));
        // A hand edit is picked up without a restart.
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(&format!(
            "{} viewer by-hand-and-longer\n",
            hash_token("manual")
        ));
        std::fs::write(&path, text).unwrap();
        assert_eq!(
            s.resolve("manual").unwrap().unwrap().name,
            "by-hand-and-longer"
        );
        assert_eq!(s.revoke("operator-1").unwrap().role, Role::Operator);
        assert!(s.resolve(&t).unwrap().is_none());
        assert!(matches!(
            s.revoke("operator-1"),
            Err(TokenError::NotFound(_))
        ));
    }

    #[test]
    fn roles_hold_what_they_say() {
        use Permission::*;
        let all = [
            Read,
            Lifecycle,
            Change,
            Exec,
            ConfigPersist,
            GuestAccess,
            Admin,
        ];
        assert!(all.iter().all(|&p| Role::Admin.allows(p)));
        assert!(!Role::Operator.allows(ConfigPersist) && Role::Operator.allows(Change));
        assert_eq!(all.iter().filter(|&&p| Role::Viewer.allows(p)).count(), 1);
        let op = Caller {
            name: "uid 1000".into(),
            role: Some(Role::Operator),
            uid: Some(1000),
        };
        let err = op.require(ConfigPersist).unwrap_err().to_string();
        assert!(
            err.contains("config.persist") && err.contains("uid 1000"),
            "{err}"
        );
        assert!(Caller {
            name: "uid 5".into(),
            role: None,
            uid: Some(5),
        }
        .require(Read)
        .is_err());
    }
}
