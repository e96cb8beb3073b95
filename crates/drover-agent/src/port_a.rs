//! Port A (`org.drover.req`): requests the guest initiates; the host answers each with an `Ack`.
//!
//! Today the only request is `Hello`, sent at the start of every connection so the host learns the
//! agent is up (and which boot it is in). App requests (save, restore, ...) will be sent through
//! the same [`PortA`], which owns the id sequence.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};

use drover_proto::{Body, Frame};

use crate::wire::{body_name, FrameReader, FrameWriter, Incoming};

/// Created once the host has acknowledged a hello; `/init` waits for it before loading the
/// modules only data disks need, so they do not compete with the agent's start.
pub const READY_FLAG: &str = "/run/drover/agent-ready";

/// The guest-initiated side of the channel. One per agent, shared across connections, so request
/// ids keep increasing over host reconnects.
#[derive(Debug)]
pub struct PortA {
    next_id: AtomicU64,
}

impl Default for PortA {
    fn default() -> Self {
        Self::new()
    }
}

impl PortA {
    /// A fresh id sequence, starting at 1.
    pub fn new() -> Self {
        PortA {
            next_id: AtomicU64::new(1),
        }
    }

    /// A new request id.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Serve one connection: send `Hello`, then read the host's answers until end of stream.
    /// Returns how many frames arrived; `Err` if the hello cannot be sent or a read fails.
    ///
    /// On virtio-serial the hello write blocks until a host is connected, which is what we want:
    /// it goes out as soon as someone can hear it.
    pub fn serve<R: Read, W: Write>(&self, reader: R, writer: &FrameWriter<W>) -> io::Result<u64> {
        let hello_id = self.next_id();
        writer
            .send(&Frame::new(
                hello_id,
                Body::Hello(crate::info::agent_info()),
            ))
            .map_err(|e| io::Error::other(format!("{e:#}")))?;

        let mut frames = FrameReader::new(reader);
        let mut count = 0;
        while let Some(incoming) = frames.next_incoming()? {
            let frame = match incoming {
                Incoming::Frame(f) => f,
                Incoming::Dropped(e) => {
                    crate::log!("port A: dropped input: {e}");
                    continue;
                }
            };
            count += 1;
            let id = frame.id;
            match frame.body {
                Body::Ack { accepted: true, .. } if id == hello_id => {
                    crate::log!("host connected (hello {id} acknowledged)");
                    // /init holds back non-essential boot work until the host has heard us.
                    let _ = std::fs::create_dir_all("/run/drover")
                        .and_then(|_| std::fs::write(READY_FLAG, b""));
                }
                Body::Ack {
                    accepted, reason, ..
                } => {
                    crate::log!(
                        "port A: request {id} {}{}",
                        if accepted { "accepted" } else { "refused" },
                        reason.map(|r| format!(": {r}")).unwrap_or_default()
                    );
                }
                Body::Error { code, message } => {
                    crate::log!("port A: request {id} failed: {code}: {message}");
                }
                body => {
                    // The host sent a command on the guest's port; tell it where to go.
                    let name = body_name(&body);
                    crate::log!("port A: unexpected {name} from host (id {id})");
                    writer.reply_error(
                        id,
                        "unsupported",
                        &format!("{name} is not accepted on port A; host commands go to port B"),
                    );
                }
            }
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::thread;
    use std::time::Duration;

    fn recv(frames: &mut FrameReader<UnixStream>) -> Frame {
        match frames.next_incoming().unwrap() {
            Some(Incoming::Frame(f)) => f,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    #[test]
    fn hello_on_every_connection_then_answers() {
        let port = std::sync::Arc::new(PortA::new());
        let mut ids = Vec::new();
        for _ in 0..2 {
            let (mut host, agent) = UnixStream::pair().unwrap();
            host.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let p = port.clone();
            let served = thread::spawn(move || {
                let writer = FrameWriter::new(agent.try_clone()?);
                p.serve(agent, &writer)
            });
            let mut frames = FrameReader::new(host.try_clone().unwrap());
            let hello = recv(&mut frames);
            let Body::Hello(info) = hello.body else {
                panic!("expected hello, got {hello:?}");
            };
            assert_eq!(info.protocol, drover_proto::PROTOCOL_VERSION);
            assert_eq!(info.boot_id.len(), 36);
            ids.push(hello.id);

            let ack = Body::Ack {
                accepted: true,
                reason: None,
                ticket: None,
            };
            host.write_all(&drover_proto::encode(&Frame::new(hello.id, ack)).unwrap())
                .unwrap();
            // A host command on the wrong port gets an error, not silence.
            host.write_all(&drover_proto::encode(&Frame::new(99, Body::Ping)).unwrap())
                .unwrap();
            let err = recv(&mut frames);
            assert_eq!(err.id, 99);
            assert!(matches!(err.body, Body::Error { ref code, .. } if code == "unsupported"));

            host.shutdown(std::net::Shutdown::Write).unwrap();
            assert_eq!(served.join().unwrap().unwrap(), 2);
        }
        assert!(ids[1] > ids[0], "ids keep increasing across connections");
    }
}
