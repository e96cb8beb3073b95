//! What the agent reports about itself ([`AgentInfo`]), read from `/proc`.

use drover_proto::{AgentInfo, PROTOCOL_VERSION};

const UPTIME_PATH: &str = "/proc/uptime";
const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";
/// The protocol refuses longer `boot_id`s; a UUID is 36 bytes.
const MAX_BOOT_ID: usize = 64;

/// The agent's current [`AgentInfo`].
///
/// Never fails: a missing `/proc` entry yields `0` / an empty `boot_id` (logged), because a pong
/// with partial information is more useful to the host than no pong.
pub fn agent_info() -> AgentInfo {
    let uptime_ms = match std::fs::read_to_string(UPTIME_PATH) {
        Ok(s) => parse_uptime_ms(&s).unwrap_or_else(|| {
            crate::log!("cannot parse {UPTIME_PATH}: {s:?}");
            0
        }),
        Err(e) => {
            crate::log!("cannot read {UPTIME_PATH}: {e}");
            0
        }
    };
    let boot_id = match std::fs::read_to_string(BOOT_ID_PATH) {
        Ok(s) => truncate_to(s.trim(), MAX_BOOT_ID).to_string(),
        Err(e) => {
            crate::log!("cannot read {BOOT_ID_PATH}: {e}");
            String::new()
        }
    };
    AgentInfo {
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        protocol: PROTOCOL_VERSION,
        uptime_ms,
        boot_id,
    }
}

/// Milliseconds from the first field of `/proc/uptime` (`"12345.67 54321.00"`).
///
/// Parsed as decimal text rather than `f64` so the result is exact.
pub fn parse_uptime_ms(s: &str) -> Option<u64> {
    let first = s.split_whitespace().next()?;
    let (secs, frac) = first.split_once('.').unwrap_or((first, ""));
    let secs: u64 = secs.parse().ok()?;
    // Take up to three fractional digits, right-padded: ".5" is 500 ms, ".67" is 670 ms.
    let mut ms = 0u64;
    let mut digits = 0;
    for c in frac.chars().take(3) {
        ms = ms * 10 + u64::from(c.to_digit(10)?);
        digits += 1;
    }
    for _ in digits..3 {
        ms *= 10;
    }
    secs.checked_mul(1000)?.checked_add(ms)
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char boundary.
pub(crate) fn truncate_to(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime_parsing() {
        assert_eq!(parse_uptime_ms("12345.67 54321.00\n"), Some(12_345_670));
        assert_eq!(parse_uptime_ms("3.5 1.0"), Some(3_500));
        assert_eq!(parse_uptime_ms("7 1"), Some(7_000));
        assert_eq!(parse_uptime_ms("1.2345 0"), Some(1_234));
        assert_eq!(parse_uptime_ms(""), None);
        assert_eq!(parse_uptime_ms("x.1 0"), None);
    }

    #[test]
    fn local_info_is_sane() {
        let info = agent_info();
        assert_eq!(info.protocol, PROTOCOL_VERSION);
        assert_eq!(info.agent_version, env!("CARGO_PKG_VERSION"));
        assert!(info.uptime_ms > 0);
        assert_eq!(info.boot_id.len(), 36, "{:?}", info.boot_id);
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate_to("héllo", 2), "h");
        assert_eq!(truncate_to("abc", 5), "abc");
    }
}
