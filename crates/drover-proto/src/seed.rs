//! `drover.json` in a VM's NoCloud seed: what the agent applies at boot where cloud-init is not
//! installed. Written by droverd, read by the agent from an untrusted disk: strict and bounded.

use serde::{Deserialize, Serialize};

/// The file's name in the seed.
pub const FILE: &str = "drover.json";
/// Most bytes of the file the agent reads.
pub const MAX_BYTES: usize = 512 * 1024;
/// Most keys.
pub const MAX_KEYS: usize = 32;
/// Longest key line.
pub const MAX_KEY_LEN: usize = 8 * 1024;

/// Hostname and SSH keys for the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AgentSeed {
    /// Keys are installed once per instance id.
    pub instance_id: String,
    /// Hostname to set (the VM's name).
    pub hostname: String,
    /// Lines for root's `authorized_keys`.
    #[serde(default)]
    pub ssh_keys: Vec<String>,
}

/// RFC 1123 label: what a VM name must be to serve as a hostname.
pub fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 63
        && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !h.starts_with('-')
        && !h.ends_with('-')
}

/// Why a key line is not acceptable, if it is not.
pub fn key_problem(k: &str) -> Option<String> {
    let k = k.trim();
    if k.is_empty() {
        return Some("is empty".into());
    }
    if k.len() > MAX_KEY_LEN {
        return Some(format!("is longer than {MAX_KEY_LEN} bytes"));
    }
    if k.contains('\n') || k.contains('\r') {
        return Some("has more than one line".into());
    }
    if k.contains("PRIVATE KEY") {
        return Some("is a private key (never give those)".into());
    }
    if k.bytes().any(|b| b.is_ascii_control()) {
        return Some("has control characters".into());
    }
    let has_type = k
        .split_whitespace()
        .any(|w| w.starts_with("ssh-") || w.starts_with("ecdsa-sha2-") || w.starts_with("sk-"));
    if !has_type {
        return Some("has no key type (ssh-ed25519, ssh-rsa, ecdsa-sha2-...)".into());
    }
    None
}

/// The keys in an `authorized_keys`-style file: one per non-empty, non-comment line.
pub fn keys_from_file(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

impl AgentSeed {
    /// Parses and checks the file: size, JSON shape, hostname, keys, instance id.
    pub fn parse(bytes: &[u8]) -> Result<AgentSeed, String> {
        if bytes.len() > MAX_BYTES {
            return Err(format!("{FILE} is over {MAX_BYTES} bytes"));
        }
        let seed: AgentSeed =
            serde_json::from_slice(bytes).map_err(|e| format!("{FILE} is not valid: {e}"))?;
        if !valid_hostname(&seed.hostname) {
            return Err(format!(
                "hostname {:?} is not a valid hostname",
                seed.hostname
            ));
        }
        if seed.instance_id.is_empty()
            || seed.instance_id.len() > 128
            || seed.instance_id.bytes().any(|b| !b.is_ascii_graphic())
        {
            return Err("instance_id must be 1-128 printable characters".into());
        }
        if seed.ssh_keys.len() > MAX_KEYS {
            return Err(format!("more than {MAX_KEYS} SSH keys"));
        }
        for (i, k) in seed.ssh_keys.iter().enumerate() {
            if let Some(why) = key_problem(k) {
                return Err(format!("SSH key {}: {why}", i + 1));
            }
        }
        Ok(seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_is_strict() {
        let ok = br#"{"instance_id":"i-1","hostname":"web1","ssh_keys":["ssh-ed25519 AAAA c"]}"#;
        let s = AgentSeed::parse(ok).unwrap();
        assert_eq!(s.hostname, "web1");
        assert!(AgentSeed::parse(br#"{"instance_id":"i","hostname":"web1","x":1}"#).is_err());
        assert!(AgentSeed::parse(br#"{"instance_id":"i","hostname":"a b"}"#).is_err());
        assert!(AgentSeed::parse(br#"{"instance_id":"","hostname":"a"}"#).is_err());
        assert!(
            AgentSeed::parse(br#"{"instance_id":"i","hostname":"a","ssh_keys":["x"]}"#).is_err()
        );
        assert!(AgentSeed::parse(&vec![b' '; MAX_BYTES + 1]).is_err());
        assert!(AgentSeed::parse(b"\xff").is_err());
    }

    #[test]
    fn keys_file_lines() {
        let text = "# mine\n\nssh-ed25519 AAAA a\n  ssh-rsa AAAAB3 other  \n";
        assert_eq!(
            keys_from_file(text),
            vec![
                "ssh-ed25519 AAAA a".to_string(),
                "ssh-rsa AAAAB3 other".into()
            ]
        );
    }

    #[test]
    fn hostnames_and_keys() {
        assert!(valid_hostname("web-1"));
        for h in ["", "-a", "a-", "a_b", "a.b"] {
            assert!(!valid_hostname(h), "{h}");
        }
        assert!(!valid_hostname(&"a".repeat(64)));
        assert_eq!(key_problem("ssh-rsa AAAA"), None);
        assert!(key_problem("hello").unwrap().contains("no key type"));
        assert!(key_problem("ssh-rsa A\nB").unwrap().contains("line"));
    }
}
