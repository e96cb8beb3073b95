//! `drover vm cp`: files into and out of a running guest through its agent, a piece at a time.
//! The API takes and gives a file in requests of at most [`MAX_FILE_REQUEST`] bytes; each goes to
//! the agent as pieces of [`drover_proto::MAX_FILE_CHUNK`], each answered before the next, so
//! nothing large is buffered on either side and a slow guest slows the copy instead of filling
//! memory.

use std::time::Duration;

use super::Manager;
use crate::action::VmAction;
use crate::agent_link::LinkError;
use crate::auth::Caller;
use crate::error::{HostError, Result};
use drover_proto::{Body, FileGet, FilePut, MAX_FILE_CHUNK};

/// Largest body of one file request through the API.
pub const MAX_FILE_REQUEST: usize = 4 * 1024 * 1024;

/// How long one piece may take in the guest.
const PIECE_TIMEOUT: Duration = Duration::from_secs(60);

/// A piece of a guest file, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRead {
    /// The bytes.
    pub data: Vec<u8>,
    /// The file's size.
    pub size: u64,
    /// Its permission bits.
    pub mode: u32,
    /// The bytes end at the end of the file.
    pub eof: bool,
}

impl Manager {
    /// Write `data` at `offset` of `path` in VM `name`'s guest; `done` syncs the file and puts
    /// it in place of `path` (with `mode`). Offset 0 starts the file afresh. Returns the bytes
    /// written so far.
    #[allow(clippy::too_many_arguments)]
    pub async fn file_put(
        &self,
        name: &str,
        path: &str,
        offset: u64,
        data: &[u8],
        done: bool,
        mode: Option<u32>,
        caller: &Caller,
    ) -> Result<u64> {
        let agent = self.file_agent(name, caller).await?;
        if data.len() > MAX_FILE_REQUEST {
            return Err(HostError::Invalid(format!(
                "a file request carries at most {MAX_FILE_REQUEST} bytes"
            )));
        }
        let mut at = offset;
        let mut pieces: Vec<&[u8]> = data.chunks(MAX_FILE_CHUNK).collect();
        if pieces.is_empty() {
            pieces.push(&[]);
        }
        let last = pieces.len() - 1;
        for (i, piece) in pieces.into_iter().enumerate() {
            let body = Body::FilePut(FilePut {
                path: path.to_string(),
                offset: at,
                data: piece.to_vec(),
                done: done && i == last,
                mode,
            });
            check(name, path, agent.call(body, PIECE_TIMEOUT).await)?;
            at += piece.len() as u64;
        }
        Ok(at)
    }

    /// Read at most `len` bytes (capped at [`MAX_FILE_REQUEST`]) of `path` in VM `name`'s guest
    /// from `offset`.
    pub async fn file_get(
        &self,
        name: &str,
        path: &str,
        offset: u64,
        len: usize,
        caller: &Caller,
    ) -> Result<FileRead> {
        let agent = self.file_agent(name, caller).await?;
        let want = len.min(MAX_FILE_REQUEST);
        let mut out = FileRead {
            data: Vec::new(),
            size: 0,
            mode: 0,
            eof: false,
        };
        loop {
            let ask = (want - out.data.len()).min(MAX_FILE_CHUNK);
            let body = Body::FileGet(FileGet {
                path: path.to_string(),
                offset: offset + out.data.len() as u64,
                len: ask as u32,
            });
            let piece = match check(name, path, agent.call(body, PIECE_TIMEOUT).await)? {
                Body::FileData(d) => d,
                other => {
                    return Err(HostError::Agent(format!(
                        "unexpected reply from the agent: {}",
                        other.name()
                    )))
                }
            };
            if piece.data.len() > ask {
                return Err(HostError::Agent(format!(
                    "the agent in VM {name} sent {} bytes where {ask} were asked",
                    piece.data.len()
                )));
            }
            out.size = piece.size;
            out.mode = piece.mode;
            out.eof = piece.eof;
            out.data.extend_from_slice(&piece.data);
            if piece.eof || out.data.len() >= want || ask == 0 {
                return Ok(out);
            }
        }
    }

    /// The ready agent of running VM `name`, for a file copy.
    async fn file_agent(
        &self,
        name: &str,
        caller: &Caller,
    ) -> Result<crate::agent_link::AgentLink> {
        let slot = self.look(name, VmAction::Files, caller)?;
        self.ready_agent(name, &slot, "copying files").await
    }
}

/// The agent's answer to a file piece, its refusals turned into errors that name the path.
fn check(name: &str, path: &str, r: std::result::Result<Body, LinkError>) -> Result<Body> {
    match r {
        Ok(b) => Ok(b),
        Err(LinkError::Refused(why)) => Err(match why.split_once(": ") {
            Some(("not_found", m)) => HostError::Missing(format!("in VM {name}: {m}")),
            Some(("bad_request", m)) => HostError::Invalid(format!("in VM {name}: {m}")),
            Some(("unsupported", _)) => HostError::Agent(format!(
                "the agent in VM {name} cannot copy files: it predates `vm cp`; upgrade it"
            )),
            _ => HostError::Agent(format!("copying {path} in VM {name}: {why}")),
        }),
        Err(LinkError::Timeout(d)) => Err(HostError::Timeout(format!(
            "the agent in VM {name} did not answer a piece of {path} within {}s (an agent \
             older than `vm cp` ignores it: upgrade it)",
            d.as_secs()
        ))),
        Err(e) => Err(HostError::Agent(format!("VM {name}: {e}"))),
    }
}
