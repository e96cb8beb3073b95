//! Named remote droverd's: `drover remote add/list/remove` and `--remote NAME`.
//!
//! Kept in `$DROVER_CONFIG_DIR/remotes.toml` (default `$XDG_CONFIG_HOME/drover` or
//! `~/.config/drover`), mode 0600. The token and the trusted certificate are copied into the
//! file, so a remote keeps working when the files it was added from go away.

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One remote (the same shape droverd's can pass each other).
pub use drover_api::RemoteSpec as Remote;

/// The remotes file.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Remotes {
    /// By name.
    #[serde(default)]
    pub remote: BTreeMap<String, Remote>,
}

/// Where the remotes file lives.
pub fn config_file() -> anyhow::Result<PathBuf> {
    let dir = if let Some(d) = std::env::var_os("DROVER_CONFIG_DIR") {
        PathBuf::from(d)
    } else if let Some(d) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        PathBuf::from(d).join("drover")
    } else if let Some(h) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        PathBuf::from(h).join(".config/drover")
    } else {
        bail!("cannot tell where to keep remotes: set DROVER_CONFIG_DIR or HOME");
    };
    Ok(dir.join("remotes.toml"))
}

/// A remote name: what `--remote` takes.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Remotes {
    /// Read the file (missing: no remotes).
    pub fn load(path: &Path) -> anyhow::Result<Remotes> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                toml::from_str(&text).with_context(|| format!("reading {}", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Remotes::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Write the file, private to its owner (it holds tokens), replacing it atomically.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
        let text = toml::to_string(self).context("encoding remotes")?;
        let tmp = path.with_extension("toml.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
    }

    /// The remote called `name`, or an error listing the known ones.
    pub fn get(&self, name: &str) -> Result<&Remote, UnknownRemote> {
        self.remote.get(name).ok_or_else(|| UnknownRemote {
            name: name.to_string(),
            known: self.remote.keys().cloned().collect(),
        })
    }
}

/// `--remote` named a remote that is not configured.
#[derive(Debug, thiserror::Error)]
#[error("unknown remote {name:?}; {}", known_list(known))]
pub struct UnknownRemote {
    /// The name asked for.
    pub name: String,
    /// The configured ones.
    pub known: Vec<String>,
}

fn known_list(known: &[String]) -> String {
    if known.is_empty() {
        "no remotes are configured (add one with `drover remote add NAME https://HOST:PORT --token-file F --ca-file F`)".into()
    } else {
        format!(
            "known remotes: {} (see `drover remote list`)",
            known.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remotes_round_trip_privately_and_name_the_known_ones() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/remotes.toml");
        let mut r = Remotes::load(&path).unwrap();
        assert!(r.remote.is_empty());
        let err = r.get("h2").unwrap_err().to_string();
        assert!(err.contains("no remotes are configured"), "{err}");
        r.remote.insert(
            "h2".into(),
            Remote {
                url: "https://10.77.0.12:7443".into(),
                token: Some("drv_x".into()),
                ca: "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n".into(),
            },
        );
        r.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = Remotes::load(&path).unwrap();
        assert_eq!(back.remote, r.remote);
        let err = back.get("h3").unwrap_err().to_string();
        assert!(
            err.contains("\"h3\"") && err.contains("known remotes: h2"),
            "{err}"
        );
        assert!(valid_name("h2") && !valid_name("a/b") && !valid_name(""));
    }
}
