//! Conventions every well-behaved command line keeps, apart from Drover's own verbs: shell
//! completions, man pages, a quiet end on a closed pipe, `NO_COLOR`.

use anyhow::Context;
use clap::CommandFactory;
use std::path::Path;

/// Whether colour and styling are off (<https://no-color.org>: any non-empty `NO_COLOR`).
pub fn no_color() -> bool {
    std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty())
}

/// Let a closed stdout (`drover vm list | head -1`) end the process quietly, as it does for other
/// Unix tools. Rust ignores SIGPIPE by default, so `println!` would panic on EPIPE instead.
pub fn restore_sigpipe() {
    // SAFETY: resetting one signal's disposition to the default before any thread starts has no
    // memory-safety effect; it only means a write to a closed pipe ends the process.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// `drover completion SHELL`: the completion script on stdout.
pub fn completion<C: CommandFactory>(shell: clap_complete::Shell) {
    let mut cmd = C::command();
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, &mut cmd, name, &mut std::io::stdout());
}

/// `drover man --dir DIR`: one page per command (`drover.1`, `drover-vm.1`, `drover-vm-start.1`, ...).
/// Returns how many pages were written.
pub fn man_pages<C: CommandFactory>(dir: &Path) -> anyhow::Result<usize> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    clap_mangen::generate_to(C::command(), dir)
        .with_context(|| format!("cannot write man pages into {}", dir.display()))?;
    let pages = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "1"))
        .count();
    Ok(pages)
}
