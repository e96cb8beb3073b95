//! Frames over byte streams: a reader that yields decoded frames and a shared writer.

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use drover_proto::{Body, Decoder, Frame, ProtoError};

/// Longest `Error.message` the protocol accepts.
const MAX_ERROR_MESSAGE: usize = 4096;
/// Longest `Error.code` the protocol accepts.
const MAX_ERROR_CODE: usize = 64;

/// What a [`FrameReader`] produced.
#[derive(Debug)]
pub enum Incoming {
    /// A valid frame.
    Frame(Frame),
    /// Bytes that were skipped or a frame that was refused; the stream goes on.
    Dropped(ProtoError),
}

/// Reads frames from a byte stream, resynchronising after garbage.
pub struct FrameReader<R> {
    reader: R,
    decoder: Decoder,
    buf: Box<[u8]>,
}

impl<R: Read> FrameReader<R> {
    /// Wrap a stream. Partial frames are discarded with the reader, so make a new one per connection.
    pub fn new(reader: R) -> Self {
        FrameReader {
            reader,
            decoder: Decoder::new(),
            buf: vec![0u8; 64 * 1024].into_boxed_slice(),
        }
    }

    /// The next frame or dropped chunk; `Ok(None)` at end of stream (on virtio-serial: the host
    /// disconnected).
    pub fn next_incoming(&mut self) -> io::Result<Option<Incoming>> {
        loop {
            if let Some(result) = self.decoder.next_frame() {
                return Ok(Some(match result {
                    Ok(frame) => Incoming::Frame(frame),
                    Err(e) => Incoming::Dropped(e),
                }));
            }
            let n = match self.reader.read(&mut self.buf) {
                Ok(0) => return Ok(None),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.decoder.push(&self.buf[..n]);
        }
    }
}

/// The writing half of a port, shared by every thread that answers on it.
///
/// One mutex serialises whole frames, so replies from concurrent execs never interleave.
pub struct FrameWriter<W> {
    inner: Arc<Mutex<W>>,
}

impl<W> Clone for FrameWriter<W> {
    fn clone(&self) -> Self {
        FrameWriter {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<W: Write> FrameWriter<W> {
    /// Share `writer`.
    pub fn new(writer: W) -> Self {
        FrameWriter {
            inner: Arc::new(Mutex::new(writer)),
        }
    }

    /// Encode and write one frame, then flush.
    pub fn send(&self, frame: &Frame) -> anyhow::Result<()> {
        let bytes = drover_proto::encode(frame)
            .with_context(|| format!("encoding frame {} ({})", frame.id, body_name(&frame.body)))?;
        let mut w = crate::lock(&self.inner);
        w.write_all(&bytes)
            .and_then(|()| w.flush())
            .with_context(|| format!("writing frame {} ({})", frame.id, body_name(&frame.body)))
    }

    /// Send a reply; if it cannot be encoded (too large), send an `Error` with the same id instead,
    /// so the host is never left waiting. Failures are logged, not returned: there is nobody else
    /// to tell.
    pub fn reply(&self, id: u64, body: Body) {
        let frame = Frame::new(id, body);
        match self.send(&frame) {
            Ok(()) => {}
            Err(e) if e.downcast_ref::<ProtoError>().is_some() => {
                crate::log!("{e:#}");
                self.reply_error(id, "internal", &format!("{e:#}"));
            }
            Err(e) => crate::log!("{e:#}"),
        }
    }

    /// Acknowledge request `id` as accepted.
    pub fn ack(&self, id: u64) {
        self.reply(
            id,
            Body::Ack {
                accepted: true,
                reason: None,
                ticket: None,
            },
        );
    }

    /// Send `Error{code, message}` for request `id`, cut to the protocol's field limits.
    pub fn reply_error(&self, id: u64, code: &str, message: &str) {
        let body = error_body(code, message);
        if let Err(e) = self.send(&Frame::new(id, body)) {
            crate::log!("{e:#}");
        }
    }
}

/// An `Error` body with fields cut to the protocol's limits.
pub fn error_body(code: &str, message: &str) -> Body {
    Body::Error {
        code: crate::info::truncate_to(code, MAX_ERROR_CODE).to_string(),
        message: crate::info::truncate_to(message, MAX_ERROR_MESSAGE).to_string(),
    }
}

/// The wire name of a body's type, for logs.
pub fn body_name(body: &Body) -> &'static str {
    body.name()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_yields_frames_garbage_and_eof() {
        let mut bytes = b"noise".to_vec();
        bytes.extend(drover_proto::encode(&Frame::new(4, Body::Ping)).unwrap());
        let mut r = FrameReader::new(&bytes[..]);
        assert!(matches!(
            r.next_incoming().unwrap(),
            Some(Incoming::Dropped(ProtoError::Garbage(5)))
        ));
        match r.next_incoming().unwrap() {
            Some(Incoming::Frame(f)) => assert_eq!(f, Frame::new(4, Body::Ping)),
            other => panic!("unexpected {other:?}"),
        }
        assert!(r.next_incoming().unwrap().is_none());
    }

    #[test]
    fn oversized_reply_becomes_error() {
        let w = FrameWriter::new(Vec::new());
        w.reply(
            9,
            Body::Ack {
                accepted: false,
                reason: Some("x".repeat(drover_proto::MAX_FRAME_LEN)),
                ticket: None,
            },
        );
        let out = crate::lock(&w.inner).clone();
        let mut r = FrameReader::new(&out[..]);
        match r.next_incoming().unwrap() {
            Some(Incoming::Frame(Frame {
                id: 9,
                body: Body::Error { code, .. },
                ..
            })) => assert_eq!(code, "internal"),
            other => panic!("unexpected {other:?}"),
        }
    }
}
