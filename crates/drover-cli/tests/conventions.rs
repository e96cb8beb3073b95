//! The command-line conventions a user relies on, checked on the real `drover` binary: completion
//! scripts, man pages, YAML output, a quiet end on a closed pipe. None of them needs droverd.

use std::process::{Command, Stdio};

fn drover() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_drover"));
    // Nothing listens here: anything that tries to reach droverd fails fast with exit 5.
    c.env("DROVER_SOCKET", "/nonexistent/drover.sock")
        .env_remove("DROVER_REMOTE");
    c
}

#[test]
fn completion_scripts_name_the_commands() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef drover"),
        ("fish", "complete -c drover"),
    ] {
        let out = drover()
            .args(["completion", shell])
            .output()
            .expect("run drover");
        assert!(out.status.success(), "{shell}: {:?}", out);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(marker), "{shell} script lacks {marker:?}");
        assert!(
            text.contains("snapshot") && text.contains("migrate"),
            "{shell} script lacks subcommands"
        );
    }
    let bad = drover()
        .args(["completion", "tcsh"])
        .output()
        .expect("run drover");
    assert_eq!(
        bad.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

#[test]
fn man_pages_for_every_command() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = drover()
        .args(["man", "--dir"])
        .arg(dir.path())
        .output()
        .expect("run drover");
    assert!(out.status.success(), "{:?}", out);
    for page in [
        "drover.1",
        "drover-vm.1",
        "drover-vm-start.1",
        "drover-snapshot-restore.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page))
            .unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{page} is not a man page"
        );
    }
    let first = std::fs::read_to_string(dir.path().join("drover-vm-start.1")).expect("page");
    assert!(
        first.contains("\\-\\-wait") || first.contains("--wait"),
        "vm start's page documents --wait"
    );
}

#[test]
fn errors_come_as_yaml_when_asked() {
    let out = drover()
        .args(["--output", "yaml", "vm", "list"])
        .output()
        .expect("run drover");
    assert_eq!(out.status.code(), Some(5), "droverd unreachable: {:?}", out);
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value =
        serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("not YAML: {e}: {text}"));
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{text}"
    );
}

#[test]
fn a_closed_pipe_ends_quietly() {
    // A pipe whose reading end is already closed, as after `| head -1` has exited: the first
    // write fails with EPIPE.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = drover()
        .args(["completion", "bash"])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("run drover");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("panicked"),
        "drover panicked on a closed pipe: {err}"
    );
    assert!(err.is_empty(), "nothing on stderr: {err}");
}
