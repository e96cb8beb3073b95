//! droverd's configuration file (`/etc/drover/droverd.toml`): its keys are droverd's long flags
//! (`state-dir`, `listen`, `socket-mode`, ... with `-` or `_`), so the file and `droverd --help`
//! never disagree and a new flag is a new key without further code.
//!
//! The file's settings come first on the command line and the real arguments after them, so an
//! argument given to droverd wins over the file (the command overrides repeated flags). Unknown
//! keys and values of the wrong shape are refused with the file's name, before droverd starts.
//! Precedence, highest first: command line, environment variables, the file, built-in defaults —
//! except that a key set in the file also beats the flag's environment variable, since it is
//! spelled out as an argument.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Where packages install the file; read when it exists and no `--config` is given.
pub const DEFAULT_PATH: &str = "/etc/drover/droverd.toml";

/// What went wrong with the configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// It could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It is not TOML, or not a table of flags.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the key.
        message: String,
    },
}

/// The file named by `--config FILE` / `--config=FILE` in `argv`, or [`DEFAULT_PATH`] when it
/// exists; `--config none` reads no file.
pub fn chosen_path(argv: &[OsString]) -> Option<PathBuf> {
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        let a = a.to_string_lossy();
        let given = if a == "--config" {
            it.next().map(|v| v.to_string_lossy().into_owned())
        } else {
            a.strip_prefix("--config=").map(str::to_string)
        };
        if let Some(p) = given {
            return (p != "none").then(|| PathBuf::from(p));
        }
    }
    if let Some(p) = std::env::var_os("DROVER_CONFIG") {
        return (p != "none").then(|| PathBuf::from(p));
    }
    Path::new(DEFAULT_PATH)
        .exists()
        .then(|| PathBuf::from(DEFAULT_PATH))
}

/// `argv` with the file's settings put in front of the real arguments (after the program name).
pub fn merged_argv(
    cmd: &clap::Command,
    argv: Vec<OsString>,
) -> Result<Vec<OsString>, ConfigFileError> {
    let Some(path) = chosen_path(&argv) else {
        return Ok(argv);
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigFileError::Read {
        path: path.clone(),
        source,
    })?;
    let from_file = args_from_toml(cmd, &text).map_err(|message| ConfigFileError::Invalid {
        path: path.clone(),
        message,
    })?;
    let mut out = Vec::with_capacity(argv.len() + from_file.len());
    let mut real = argv.into_iter();
    out.extend(real.next());
    out.extend(from_file.into_iter().map(OsString::from));
    out.extend(real);
    Ok(out)
}

/// Turns a TOML table of flag names into arguments: `key = "v"` / numbers give `--key v`,
/// `key = true` gives `--key` for switches (false: nothing), arrays repeat the flag.
pub fn args_from_toml(cmd: &clap::Command, text: &str) -> Result<Vec<String>, String> {
    let table: toml::Table = text.parse().map_err(|e| format!("not valid TOML: {e}"))?;
    let mut out = Vec::new();
    for (key, value) in table {
        let flag = key.replace('_', "-");
        let Some(arg) = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(flag.as_str()))
        else {
            return Err(format!(
                "unknown key '{key}' (the keys are droverd's long flags; see droverd --help)"
            ));
        };
        if flag == "config" {
            return Err("'config' cannot be set inside the configuration file".into());
        }
        let switch = !arg.get_action().takes_values();
        let scalar = |v: &toml::Value| -> Result<String, String> {
            match v {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(i) => Ok(i.to_string()),
                toml::Value::Float(f) => Ok(f.to_string()),
                other => Err(format!(
                    "key '{key}' takes a string or a number, not {}",
                    other.type_str()
                )),
            }
        };
        match (&value, switch) {
            (toml::Value::Boolean(true), true) => out.push(format!("--{flag}")),
            (toml::Value::Boolean(false), true) => {}
            (_, true) => return Err(format!("key '{key}' is a switch: write {key} = true")),
            (toml::Value::Array(items), false) => {
                for v in items {
                    out.push(format!("--{flag}"));
                    out.push(scalar(v)?);
                }
            }
            (v, false) => {
                out.push(format!("--{flag}"));
                out.push(scalar(v)?);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction, Command};

    fn cmd() -> Command {
        Command::new("droverd")
            .args_override_self(true)
            .arg(
                Arg::new("state_dir")
                    .long("state-dir")
                    .default_value("/var/lib/drover"),
            )
            .arg(Arg::new("listen").long("listen"))
            .arg(Arg::new("socket_mode").long("socket-mode"))
            .arg(
                Arg::new("pool")
                    .long("image-pool")
                    .action(ArgAction::Append),
            )
            .arg(
                Arg::new("verbose")
                    .long("verbose")
                    .action(ArgAction::SetTrue),
            )
            .arg(Arg::new("config").long("config"))
    }

    fn parse(file: &str, argv: &[&str]) -> clap::ArgMatches {
        let mut args: Vec<String> = vec![argv[0].into()];
        args.extend(args_from_toml(&cmd(), file).unwrap());
        args.extend(argv[1..].iter().map(|s| s.to_string()));
        cmd().try_get_matches_from(args).unwrap()
    }

    #[test]
    fn keys_are_flags_and_the_command_line_wins() {
        let file = "state_dir = \"/srv/drover\"\nlisten = \"10.0.0.1:7443\"\nsocket-mode = 660\nverbose = true\nimage-pool = [\"a=/srv/a\", \"b=/srv/b\"]\n";
        let m = parse(file, &["droverd"]);
        assert_eq!(m.get_one::<String>("state_dir").unwrap(), "/srv/drover");
        assert_eq!(m.get_one::<String>("socket_mode").unwrap(), "660");
        assert!(m.get_flag("verbose"));
        let pools: Vec<_> = m.get_many::<String>("pool").unwrap().collect();
        assert_eq!(pools, ["a=/srv/a", "b=/srv/b"]);
        let m = parse(file, &["droverd", "--state-dir", "/tmp/x"]);
        assert_eq!(m.get_one::<String>("state_dir").unwrap(), "/tmp/x");
    }

    #[test]
    fn unknown_keys_and_wrong_shapes_are_refused_by_name() {
        let e = args_from_toml(&cmd(), "stat_dir = \"/x\"").unwrap_err();
        assert!(e.contains("unknown key 'stat_dir'"), "{e}");
        let e = args_from_toml(&cmd(), "verbose = \"yes\"").unwrap_err();
        assert!(e.contains("is a switch"), "{e}");
        let e = args_from_toml(&cmd(), "listen = { a = 1 }").unwrap_err();
        assert!(e.contains("takes a string or a number"), "{e}");
        let e = args_from_toml(&cmd(), "config = \"/etc/other\"").unwrap_err();
        assert!(e.contains("cannot be set"), "{e}");
        assert!(args_from_toml(&cmd(), "listen = ")
            .unwrap_err()
            .contains("not valid TOML"));
        assert!(args_from_toml(&cmd(), "verbose = false")
            .unwrap()
            .is_empty());
    }

    #[test]
    fn the_file_comes_from_config_or_is_skipped() {
        let v = |s: &[&str]| s.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            chosen_path(&v(&["droverd", "--config", "/a.toml"])),
            Some("/a.toml".into())
        );
        assert_eq!(
            chosen_path(&v(&["droverd", "--config=/b.toml"])),
            Some("/b.toml".into())
        );
        assert_eq!(chosen_path(&v(&["droverd", "--config", "none"])), None);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("d.toml");
        std::fs::write(&f, "listen = \"127.0.0.1:7443\"\n").unwrap();
        let argv = v(&[
            "droverd",
            "--config",
            f.to_str().unwrap(),
            "--state-dir",
            "/s",
        ]);
        let merged = merged_argv(&cmd(), argv).unwrap();
        let m = cmd().try_get_matches_from(merged).unwrap();
        assert_eq!(m.get_one::<String>("listen").unwrap(), "127.0.0.1:7443");
        assert_eq!(m.get_one::<String>("state_dir").unwrap(), "/s");
        let missing = v(&["droverd", "--config", "/nonexistent/d.toml"]);
        assert!(matches!(
            merged_argv(&cmd(), missing),
            Err(ConfigFileError::Read { .. })
        ));
    }
}
