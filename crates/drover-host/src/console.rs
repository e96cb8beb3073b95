//! The serial console's input: bytes for the guest's serial port go to QEMU's console socket
//! (`RunPaths::console`, a socket chardev that also writes every output byte to the console
//! log). QEMU serves one client at a time on it, so droverd keeps at most one connection per
//! socket and every writer (each browser console of the VM) shares it. A task drains what QEMU
//! sends back on it (the output is read from the log instead): a full socket buffer would make
//! QEMU hold back the guest's output.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;

/// Longest a connect or a write to a console socket may take.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Why input did not reach a console.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleInputError {
    /// The socket is not there: the VM is not running, or its QEMU was started by a droverd
    /// whose console took no input.
    #[error("the console socket {0} does not exist (the VM is not running, or was started before its console took input: restart it)")]
    NoSocket(PathBuf),
    /// Connecting or writing failed, or took too long.
    #[error("writing to the console socket {path}: {why}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// What failed.
        why: String,
    },
}

/// One connection per console socket, shared by every writer.
#[derive(Default)]
pub struct ConsoleInputs {
    conns: tokio::sync::Mutex<HashMap<PathBuf, OwnedWriteHalf>>,
}

impl ConsoleInputs {
    /// Write `bytes` to the console at `socket`, connecting (again) if needed: a connection
    /// left over from an earlier QEMU of the VM fails its write and is replaced once.
    pub async fn send(&self, socket: &Path, bytes: &[u8]) -> Result<(), ConsoleInputError> {
        let mut conns = self.conns.lock().await;
        if let Some(w) = conns.get_mut(socket) {
            if write(w, bytes).await.is_ok() {
                return Ok(());
            }
            conns.remove(socket);
        }
        if !socket.exists() {
            return Err(ConsoleInputError::NoSocket(socket.to_path_buf()));
        }
        let io = |why: String| ConsoleInputError::Io {
            path: socket.to_path_buf(),
            why,
        };
        let stream = tokio::time::timeout(IO_TIMEOUT, tokio::net::UnixStream::connect(socket))
            .await
            .map_err(|_| io("connecting timed out".into()))?
            .map_err(|e| io(e.to_string()))?;
        let (mut r, mut w) = stream.into_split();
        tokio::spawn(async move {
            let mut sink = [0u8; 4096];
            while matches!(r.read(&mut sink).await, Ok(n) if n > 0) {}
        });
        write(&mut w, bytes).await.map_err(io)?;
        conns.insert(socket.to_path_buf(), w);
        // Connections of VMs that have gone accumulate only until their next failed write;
        // bound the map anyway.
        if conns.len() > 4096 {
            conns.retain(|p, _| p.exists());
        }
        Ok(())
    }
}

async fn write(w: &mut OwnedWriteHalf, bytes: &[u8]) -> Result<(), String> {
    match tokio::time::timeout(IO_TIMEOUT, w.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the write timed out (QEMU is not reading its console)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Input reaches whoever serves the socket; a server that went away and came back (a new
    /// QEMU of the VM) gets the next input on a fresh connection; no socket is a clear error.
    #[tokio::test]
    async fn input_reaches_the_socket_and_survives_a_new_server() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.sock");
        let inputs = ConsoleInputs::default();
        assert!(matches!(
            inputs.send(&path, b"x").await,
            Err(ConsoleInputError::NoSocket(_))
        ));
        for round in 0..2 {
            let listener = tokio::net::UnixListener::bind(&path).unwrap();
            inputs.send(&path, b"echo hi\n").await.unwrap();
            inputs.send(&path, b"ls\n").await.unwrap();
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = vec![0u8; 11];
            s.read_exact(&mut got).await.unwrap();
            assert_eq!(got, b"echo hi\nls\n", "round {round}");
            drop((s, listener));
            std::fs::remove_file(&path).unwrap();
        }
    }
}
