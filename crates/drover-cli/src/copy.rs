//! `drover vm cp`: files into and out of a running guest through its agent, in requests of at
//! most 4 MiB each (the daemon passes each on to the agent in pieces), with progress.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use drover_api::Client;
use serde::Serialize;

use crate::output::{fmt_bytes, Out};

/// Bytes per request (the daemon's limit for one file request).
const REQUEST: usize = 4 * 1024 * 1024;

/// One side of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// A file on this machine (`-`: standard input or output).
    Local(PathBuf),
    /// `VM:/absolute/path`.
    Guest { vm: String, path: String },
}

impl Place {
    /// `VM:/path` is in a guest; anything else (with no colon before the first `/`) is local.
    pub fn parse(arg: &str) -> anyhow::Result<Place> {
        match arg.split_once(':') {
            Some((vm, path)) if !vm.is_empty() && !vm.contains('/') => {
                if !path.starts_with('/') {
                    anyhow::bail!("{arg}: the guest path must be absolute (VM:/path/in/guest)");
                }
                Ok(Place::Guest {
                    vm: vm.to_string(),
                    path: path.to_string(),
                })
            }
            _ => Ok(Place::Local(PathBuf::from(arg))),
        }
    }
}

/// What `vm cp` reports.
#[derive(Debug, Serialize)]
pub struct Copied {
    /// The VM.
    pub vm: String,
    /// `in` (into the guest) or `out`.
    pub direction: &'static str,
    /// The guest path.
    pub guest_path: String,
    /// The local path (`-` for stdin/stdout).
    pub local_path: String,
    /// Bytes copied.
    pub bytes: u64,
    /// Wall time.
    pub ms: u64,
}

#[derive(Serialize)]
struct Query<'a> {
    path: &'a str,
    offset: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    len: Option<usize>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    done: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    mode: Option<String>,
}

fn url(vm: &str, q: &Query) -> anyhow::Result<String> {
    Ok(format!(
        "/v1/vms/{}/files?{}",
        crate::seg(vm)?,
        serde_urlencoded::to_string(q).context("encoding the path")?
    ))
}

/// Copy `src` to `dst` (exactly one of them in a guest).
pub async fn copy(
    c: &Client,
    out: &Out,
    src: &str,
    dst: &str,
    mode: Option<&str>,
) -> anyhow::Result<Copied> {
    let t0 = Instant::now();
    let mode = mode
        .map(|m| {
            u32::from_str_radix(m, 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .with_context(|| format!("--mode {m}: octal permission bits, e.g. 755"))
        })
        .transpose()?;
    let mut done = match (Place::parse(src)?, Place::parse(dst)?) {
        (Place::Local(from), Place::Guest { vm, path }) => {
            let path = guest_target(&path, &from);
            let bytes = upload(c, out, &from, &vm, &path, mode).await?;
            Copied {
                vm,
                direction: "in",
                guest_path: path,
                local_path: from.display().to_string(),
                bytes,
                ms: 0,
            }
        }
        (Place::Guest { vm, path }, Place::Local(to)) => {
            if mode.is_some() {
                anyhow::bail!(
                    "--mode is for copies into a guest; a copy out keeps the guest file's mode"
                );
            }
            let to = local_target(&to, &path);
            let bytes = download(c, out, &vm, &path, &to).await?;
            Copied {
                vm,
                direction: "out",
                guest_path: path,
                local_path: to.display().to_string(),
                bytes,
                ms: 0,
            }
        }
        (Place::Guest { .. }, Place::Guest { .. }) => {
            anyhow::bail!("both sides are in guests; copy out to a local file, then in")
        }
        (Place::Local(_), Place::Local(_)) => anyhow::bail!(
            "neither side is in a guest: name one as VM:/path (e.g. web1:/etc/hostname)"
        ),
    };
    done.ms = t0.elapsed().as_millis() as u64;
    Ok(done)
}

/// Into a guest directory (`web1:/tmp/`): the local file's name there.
fn guest_target(path: &str, from: &Path) -> String {
    match (path.ends_with('/'), from.file_name()) {
        (true, Some(n)) if from != Path::new("-") => format!("{path}{}", n.to_string_lossy()),
        _ => path.to_string(),
    }
}

/// Into a local directory: the guest file's name there.
fn local_target(to: &Path, guest: &str) -> PathBuf {
    let name = guest.rsplit('/').next().unwrap_or_default();
    if to.is_dir() && !name.is_empty() {
        to.join(name)
    } else {
        to.to_path_buf()
    }
}

async fn upload(
    c: &Client,
    out: &Out,
    from: &Path,
    vm: &str,
    path: &str,
    mode: Option<u32>,
) -> anyhow::Result<u64> {
    let (mut input, total, local_mode): (Box<dyn Read>, Option<u64>, Option<u32>) = if from
        == Path::new("-")
    {
        (Box::new(std::io::stdin()), None, None)
    } else {
        let f = std::fs::File::open(from).with_context(|| format!("opening {}", from.display()))?;
        let meta = f
            .metadata()
            .with_context(|| format!("reading {}", from.display()))?;
        if meta.is_dir() {
            anyhow::bail!("{} is a directory; vm cp copies one file", from.display());
        }
        (
            Box::new(f),
            Some(meta.len()),
            Some(meta.permissions().mode() & 0o7777),
        )
    };
    let mode = mode.or(local_mode).map(|m| format!("{m:o}"));
    let p = out.progress(&format!("copying {} to {vm}:{path}", from.display()));
    let mut offset = 0u64;
    let mut buf = vec![0u8; REQUEST];
    loop {
        let n =
            fill(&mut input, &mut buf).with_context(|| format!("reading {}", from.display()))?;
        let last = n < buf.len();
        let q = Query {
            path,
            offset,
            len: None,
            done: last,
            mode: mode.clone().filter(|_| last),
        };
        let _: drover_api::FileWritten = c.put_bytes(&url(vm, &q)?, buf[..n].to_vec()).await?;
        offset += n as u64;
        p.set(&progress_line(offset, total));
        if last {
            break;
        }
    }
    p.done(&format!("copied {} to {vm}:{path}", fmt_bytes(offset)));
    Ok(offset)
}

async fn download(c: &Client, out: &Out, vm: &str, path: &str, to: &Path) -> anyhow::Result<u64> {
    let stdout = to == Path::new("-");
    // Written beside the target and renamed when complete: a failed copy leaves no half file.
    let part = to.with_file_name(format!(
        ".{}.drover-part",
        to.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    let mut file = if stdout {
        None
    } else {
        Some(std::fs::File::create(&part).with_context(|| format!("creating {}", part.display()))?)
    };
    let p = out.progress(&format!("copying {vm}:{path} to {}", to.display()));
    let mut offset = 0u64;
    let mut mode = None;
    let result: anyhow::Result<()> = async {
        loop {
            let q = Query {
                path,
                offset,
                len: Some(REQUEST),
                done: false,
                mode: None,
            };
            let (headers, bytes) = c.get_bytes(&url(vm, &q)?).await?;
            let header = |k: &str| {
                headers
                    .get(k)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            let size = header("x-drover-file-size").and_then(|v| v.parse().ok());
            mode = header("x-drover-file-mode").and_then(|v| u32::from_str_radix(&v, 8).ok());
            let eof = header("x-drover-eof").as_deref() == Some("true");
            match &mut file {
                Some(f) => f.write_all(&bytes),
                None => std::io::stdout().lock().write_all(&bytes),
            }
            .with_context(|| format!("writing {}", to.display()))?;
            offset += bytes.len() as u64;
            p.set(&progress_line(offset, size));
            if eof || bytes.is_empty() {
                return Ok(());
            }
        }
    }
    .await;
    if let Err(e) = result {
        if file.is_some() {
            let _ = std::fs::remove_file(&part);
        }
        return Err(e);
    }
    if let Some(f) = file {
        if let Some(m) = mode {
            f.set_permissions(std::fs::Permissions::from_mode(m))
                .with_context(|| format!("setting the mode of {}", part.display()))?;
        }
        f.sync_all()
            .with_context(|| format!("writing {}", part.display()))?;
        std::fs::rename(&part, to).with_context(|| format!("moving into {}", to.display()))?;
    }
    p.done(&format!("copied {} from {vm}:{path}", fmt_bytes(offset)));
    Ok(offset)
}

/// Read until `buf` is full or the input ends.
fn fill(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn progress_line(done: u64, total: Option<u64>) -> String {
    match total {
        Some(t) if t > 0 => format!(
            "{} of {} ({}%)",
            fmt_bytes(done),
            fmt_bytes(t),
            done.saturating_mul(100) / t
        ),
        _ => fmt_bytes(done),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_parse_as_a_user_writes_them() {
        assert_eq!(
            Place::parse("web1:/etc/hostname").unwrap(),
            Place::Guest {
                vm: "web1".into(),
                path: "/etc/hostname".into()
            }
        );
        assert_eq!(
            Place::parse("./a:b").unwrap(),
            Place::Local(PathBuf::from("./a:b"))
        );
        assert_eq!(Place::parse("-").unwrap(), Place::Local(PathBuf::from("-")));
        assert!(
            Place::parse("web1:etc/hostname").is_err(),
            "relative guest path"
        );
        assert_eq!(
            guest_target("/tmp/", Path::new("/x/agent.deb")),
            "/tmp/agent.deb"
        );
        assert_eq!(guest_target("/tmp/a", Path::new("/x/agent.deb")), "/tmp/a");
        assert_eq!(guest_target("/tmp/", Path::new("-")), "/tmp/");
    }
}
