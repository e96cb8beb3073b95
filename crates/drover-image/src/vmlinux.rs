//! Extracts the uncompressed ELF `vmlinux` from a Debian (xz-compressed) bzImage.
//!
//! Booting the ELF through QEMU's PVH entry skips the in-guest decompressor, which halves boot
//! time under TCG (PLATFORM.md). The bzImage holds the kernel as one xz stream, followed by the
//! 4-byte decompressed size and the rest of the decompressor stub.
//!
//! liblzma decodes that stream as `xz` would, x86 BCJ filter included, and stops at the stream's
//! end, so whatever follows it (the size and the stub) is ignored.

use crate::elf;

/// Magic bytes at the start of an xz stream.
const XZ_MAGIC: &[u8; 6] = b"\xFD7zXZ\x00";
/// Returns the uncompressed ELF kernel inside `bzimage`.
///
/// Accepts an already-uncompressed ELF as is. Errors say what was (not) found, for the caller to
/// wrap with the file's path.
pub fn extract(bzimage: &[u8]) -> Result<Vec<u8>, String> {
    if bzimage.starts_with(elf::MAGIC) {
        return Ok(bzimage.to_vec());
    }
    let mut last_err = None;
    let mut pos = 0;
    while let Some(found) = find(&bzimage[pos..], XZ_MAGIC) {
        let start = pos + found;
        pos = start + 1;
        // The magic can occur by chance in code or data; a stream that does not decode into an
        // ELF is skipped and the search goes on.
        match decode_xz(&bzimage[start..]) {
            Ok(out) if out.starts_with(elf::MAGIC) => return Ok(out),
            Ok(_) => {
                last_err = Some(format!(
                    "xz stream at offset {start} does not decompress to an ELF file (no \\x7fELF)"
                ))
            }
            Err(e) => last_err = Some(format!("xz stream at offset {start}: {e}")),
        }
    }
    Err(last_err.unwrap_or_else(|| {
        "no xz stream (magic FD 37 7A 58 5A 00) found; only xz-compressed bzImages are supported \
         (Debian's linux-image-*-amd64 kernels are)"
            .to_string()
    }))
}

/// The most an xz stream may decompress to: a Debian vmlinux is ~60 MB; anything past this is
/// not a kernel, and must not fill the host's memory.
const MAX_KERNEL: u64 = 512 << 20;
/// liblzma's memory limit for the decoder (the kernel's stream uses a small dictionary).
const MEMLIMIT: u64 = 256 << 20;

/// Decodes the xz stream at the start of `data` (anything after the stream is ignored), verifying
/// every block's check.
fn decode_xz(data: &[u8]) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let stream = liblzma::stream::Stream::new_stream_decoder(MEMLIMIT, 0)
        .map_err(|e| format!("cannot set up the xz decoder: {e}"))?;
    let mut out = Vec::new();
    liblzma::bufread::XzDecoder::new_stream(data, stream)
        .take(MAX_KERNEL + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("xz decoding failed: {e}"))?;
    if out.len() as u64 > MAX_KERNEL {
        return Err(format!(
            "decompresses to more than {} MiB",
            MAX_KERNEL >> 20
        ));
    }
    Ok(out)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_elf() -> Vec<u8> {
        let mut v = b"\x7fELF\x02\x01\x01".to_vec();
        // Some compressible and some less compressible content.
        for i in 0u32..50_000 {
            v.extend_from_slice(&(i.wrapping_mul(2_654_435_761)).to_le_bytes()[..2]);
            v.push(b'k');
        }
        v
    }

    fn xz(data: &[u8]) -> Vec<u8> {
        liblzma::encode_all(data, 6).unwrap()
    }

    /// Looks like a bzImage: setup code, the xz payload, its size, then more stub code that even
    /// contains another xz magic.
    fn fake_bzimage(payload: &[u8], uncompressed_len: usize) -> Vec<u8> {
        let mut b = vec![0x90u8; 1000];
        b[0x202..0x206].copy_from_slice(b"HdrS");
        // A stray xz magic before the real stream must be skipped.
        b[0x300..0x306].copy_from_slice(XZ_MAGIC);
        b.extend_from_slice(payload);
        b.extend_from_slice(&(uncompressed_len as u32).to_le_bytes());
        b.extend_from_slice(b"YZ trailing decompressor code \xFD7zXZ junk YZYZ");
        b.extend_from_slice(&[0u8; 333]);
        b
    }

    #[test]
    fn extracts_elf_followed_by_trailing_bytes() {
        let elf = fake_elf();
        let img = fake_bzimage(&xz(&elf), elf.len());
        assert_eq!(extract(&img).unwrap(), elf);
    }

    #[test]
    fn decodes_x86_bcj_streams_like_xz_does() {
        // Made with Python's lzma module (liblzma): FILTER_X86 + LZMA2, with CRC32, and with CRC64
        // and a BCJ start offset of 0x1000; plus a plain LZMA2 stream with a SHA-256 check.
        let plain = include_bytes!("../testdata/x86.bin");
        for (name, stream) in [
            ("x86-crc32", &include_bytes!("../testdata/x86-crc32.xz")[..]),
            (
                "x86-crc64-offset",
                &include_bytes!("../testdata/x86-crc64-offset.xz")[..],
            ),
            ("sha256", &include_bytes!("../testdata/sha256.xz")[..]),
        ] {
            assert_eq!(decode_xz(stream).unwrap(), plain, "{name}");
            let img = fake_bzimage(stream, plain.len());
            assert_eq!(extract(&img).unwrap(), plain, "{name} inside a bzImage");
        }
    }

    #[test]
    fn rejects_non_elf_payload() {
        let data = b"not a kernel at all".repeat(100);
        let img = fake_bzimage(&xz(&data), data.len());
        let err = extract(&img).unwrap_err();
        assert!(err.contains("\\x7fELF"), "{err}");
    }

    #[test]
    fn rejects_image_without_xz() {
        let err = extract(&[0u8; 4096]).unwrap_err();
        assert!(err.contains("no xz stream"), "{err}");
    }

    #[test]
    fn passes_through_an_elf() {
        let elf = fake_elf();
        assert_eq!(extract(&elf).unwrap(), elf);
    }

    #[test]
    fn corrupt_stream_is_an_error_not_a_panic() {
        let stream = include_bytes!("../testdata/x86-crc32.xz");
        for at in [13, stream.len() / 2, stream.len() - 40] {
            let mut s = stream.to_vec();
            s[at] ^= 0x55;
            assert!(decode_xz(&s).is_err(), "corruption at {at} not detected");
        }
        assert!(decode_xz(&stream[..stream.len() / 2]).is_err());
    }
}
