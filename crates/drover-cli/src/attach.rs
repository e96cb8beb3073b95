//! `drover vm console NAME --attach`: the VM's serial console in this terminal, through
//! droverd's console WebSocket (the same one the web console uses), until the detach key.

use anyhow::{bail, Context};
use drover_api::{Client, ConsoleEvent};
use std::io::{IsTerminal, Read, Write};
use std::time::{Duration, Instant};

/// With piped input, how long output must be quiet after the input ended before detaching:
/// `echo cmd | drover vm console NAME --attach` shows the command's answer.
const QUIET_AFTER_EOF: Duration = Duration::from_secs(2);

/// A detach key: `ctrl-X` or `^X` (X a letter or one of `@[\]^_`), as the control byte it sends.
pub fn parse_detach_key(s: &str) -> Result<u8, String> {
    let lower = s.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("ctrl-")
        .or_else(|| lower.strip_prefix("ctrl+"))
        .or_else(|| lower.strip_prefix('^'));
    match rest.map(str::as_bytes) {
        Some([c]) if c.is_ascii_lowercase() || b"@[\\]^_".contains(c) => {
            Ok(c.to_ascii_uppercase() ^ 0x40)
        }
        _ => Err(format!(
            "{s:?} is not a detach key: use ctrl-X or ^X with X a letter or one of @ [ \\ ] ^ _ (for example ctrl-] or ^P)"
        )),
    }
}

/// How a detach key reads (`ctrl-]`).
fn key_name(key: u8) -> String {
    format!("ctrl-{}", ((key ^ 0x40) as char).to_ascii_lowercase())
}

/// The terminal in raw mode (keys go to the guest as typed, no local echo) until dropped.
struct RawMode(libc::termios);

impl RawMode {
    fn enter() -> anyhow::Result<Self> {
        // SAFETY: termios is plain data; tcgetattr fills it or fails, checked.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut t) } != 0 {
            return Err(std::io::Error::last_os_error()).context("reading the terminal's mode");
        }
        let saved = t;
        // SAFETY: t is a valid termios taken from the terminal above.
        unsafe { libc::cfmakeraw(&mut t) };
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) } != 0 {
            return Err(std::io::Error::last_os_error())
                .context("putting the terminal in raw mode");
        }
        Ok(RawMode(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the mode read in enter().
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.0) };
    }
}

/// Where the input is cut: what comes before the detach key, and whether the key was there.
fn split_at_key(bytes: &[u8], key: u8) -> (&[u8], bool) {
    match bytes.iter().position(|&b| b == key) {
        Some(i) => (&bytes[..i], true),
        None => (bytes, false),
    }
}

/// Attach this terminal (or piped stdin/stdout) to VM `name`'s serial console until the
/// detach key, the end of piped input, or the VM stopping. The VM goes on either way.
pub async fn attach(c: &Client, name: &str, key: u8) -> anyhow::Result<()> {
    let mut con = c.console(name).await?;
    if !con.hello.input {
        bail!(
            "cannot type into {name}'s console: {}. Attaching needs a role with vm.exec; `drover vm console {name} --follow` shows the output",
            con.hello.why.as_deref().unwrap_or("input is off")
        );
    }
    let tty = std::io::stdin().is_terminal();
    let raw = if tty { Some(RawMode::enter()?) } else { None };
    let nl = if raw.is_some() { "\r\n" } else { "\n" };
    eprint!(
        "attached to {name}'s serial console; {} detaches{}{nl}",
        key_name(key),
        if tty {
            " (press Enter for a prompt)"
        } else {
            ""
        }
    );
    // A thread, not a task: a blocking read of stdin cannot be cancelled, and the process
    // exits with it still waiting.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut stdout = std::io::stdout();
    let mut live = false;
    let mut input_ended: Option<Instant> = None;
    let mut last_output = Instant::now();
    let mut failure = None;
    loop {
        tokio::select! {
            ev = con.next() => match ev? {
                None => break,
                // The backlog is what `vm console NAME` prints; attached, only new output
                // shows, so old output cannot pass for an answer.
                Some(ConsoleEvent::Output(_)) if !live => {}
                Some(ConsoleEvent::Output(b)) => {
                    stdout.write_all(&b).context("writing the console's output")?;
                    stdout.flush().context("writing the console's output")?;
                    last_output = Instant::now();
                }
                Some(ConsoleEvent::Live) => live = true,
                Some(ConsoleEvent::Error(e)) => {
                    eprint!("{nl}drover: {}{nl}", e.message);
                    failure = Some(e);
                }
            },
            input = rx.recv(), if input_ended.is_none() => match input {
                Some(bytes) => {
                    let (before, detach) = split_at_key(&bytes, key);
                    if !before.is_empty() {
                        con.send(before).await?;
                    }
                    if detach {
                        con.close().await;
                        drop(raw);
                        eprintln!("{nl}detached from {name}'s console (the VM goes on)");
                        return Ok(());
                    }
                }
                None => input_ended = Some(Instant::now()),
            },
            _ = tokio::time::sleep(Duration::from_millis(200)), if input_ended.is_some() => {
                if input_ended.is_some_and(|t| t.elapsed() >= QUIET_AFTER_EOF)
                    && last_output.elapsed() >= QUIET_AFTER_EOF
                {
                    con.close().await;
                    return Ok(());
                }
            }
        }
    }
    drop(raw);
    match failure {
        Some(e) => Err(drover_api::ClientError::Api(e).into()),
        None => {
            eprintln!("droverd closed {name}'s console");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detach_keys_are_control_bytes() {
        assert_eq!(parse_detach_key("ctrl-]"), Ok(0x1d));
        assert_eq!(parse_detach_key("^]"), Ok(0x1d));
        assert_eq!(parse_detach_key("Ctrl-P"), Ok(0x10));
        assert_eq!(parse_detach_key("ctrl+a"), Ok(0x01));
        assert_eq!(parse_detach_key("^@"), Ok(0x00));
        for bad in ["]", "ctrl-", "ctrl-ab", "ctrl-1", "alt-x", ""] {
            assert!(parse_detach_key(bad).is_err(), "{bad}");
        }
        assert_eq!(key_name(0x1d), "ctrl-]");
        assert_eq!(key_name(0x10), "ctrl-p");
    }

    #[test]
    fn input_is_cut_at_the_detach_key() {
        assert_eq!(split_at_key(b"ls\n\x1drest", 0x1d), (&b"ls\n"[..], true));
        assert_eq!(split_at_key(b"ls\n", 0x1d), (&b"ls\n"[..], false));
        assert_eq!(split_at_key(b"\x1d", 0x1d), (&b""[..], true));
    }
}
