//! Extracts the uncompressed ELF `vmlinux` from a Debian (xz-compressed) bzImage.
//!
//! Booting the ELF through QEMU's PVH entry skips the in-guest decompressor, which halves boot
//! time under TCG (PLATFORM.md). The bzImage holds the kernel as one xz stream, followed by the
//! 4-byte decompressed size and the rest of the decompressor stub. `lzma_rs::xz_decompress`
//! insists on end-of-input right after the stream footer, so instead of decoding "to the end of the
//! file" we find the footer ourselves: an xz footer is `CRC32 | backward size | flags | "YZ"`, and
//! its CRC32 and flags (equal to the header's) make it easy to recognise without decoding.

use crate::elf;

/// Magic bytes at the start of an xz stream.
const XZ_MAGIC: &[u8; 6] = b"\xFD7zXZ\x00";
/// Magic bytes at the very end of an xz stream.
const XZ_FOOTER_MAGIC: &[u8; 2] = b"YZ";
const XZ_HEADER_LEN: usize = 12;
const XZ_FOOTER_LEN: usize = 12;

/// CRC-32 (IEEE, reflected), the checksum xz uses for its header and footer.
fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut c = !0u32;
    for &b in data {
        c = TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
    }
    !c
}

/// True if `data[start..]` begins with a well-formed xz stream header (magic + flags + CRC32).
fn valid_header(data: &[u8], start: usize) -> bool {
    let Some(h) = data.get(start..start + XZ_HEADER_LEN) else {
        return false;
    };
    h[..6] == XZ_MAGIC[..] && h[6] == 0 && u32::from_le_bytes([h[8], h[9], h[10], h[11]]) == crc32(&h[6..8])
}

/// Candidate ends (exclusive) of the xz stream that starts at `start`, in file order: positions just
/// after a "YZ" whose preceding 10 bytes form a footer with a valid CRC32 and the header's flags.
fn candidate_ends(data: &[u8], start: usize) -> impl Iterator<Item = usize> + '_ {
    let flags = [data[start + 6], data[start + 7]];
    // The smallest stream is a header, an empty index (8 bytes) and a footer.
    let first = start + XZ_HEADER_LEN + 8 + XZ_FOOTER_LEN;
    (first..=data.len()).step_by(4).filter(move |&end| {
        let f = &data[end - XZ_FOOTER_LEN..end];
        f[10..12] == XZ_FOOTER_MAGIC[..]
            && f[8..10] == flags
            && u32::from_le_bytes([f[0], f[1], f[2], f[3]]) == crc32(&f[4..10])
    })
}

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
        if !valid_header(bzimage, start) {
            continue;
        }
        for end in candidate_ends(bzimage, start) {
            match decode(&bzimage[start..end]) {
                Ok(out) => return Ok(out),
                // A false footer match (2^-32 odds per candidate) or a non-kernel stream: keep looking.
                Err(e) => last_err = Some(format!("xz stream at offset {start}: {e}")),
            }
        }
    }
    Err(last_err.unwrap_or_else(|| {
        "no xz stream (magic FD 37 7A 58 5A 00) found; only xz-compressed bzImages are supported \
         (Debian's linux-image-*-amd64 kernels are)"
            .to_string()
    }))
}

fn decode(stream: &[u8]) -> Result<Vec<u8>, String> {
    // Kernels are tens of MiB; start big to avoid repeated reallocation while decoding.
    let mut out = Vec::with_capacity(stream.len().saturating_mul(4));
    lzma_rs::xz_decompress(&mut &stream[..], &mut out).map_err(|e| format!("xz decoding failed: {e:?}"))?;
    if !out.starts_with(elf::MAGIC) {
        return Err("decompressed data does not start with \\x7fELF (not an ELF kernel)".into());
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
        let mut out = Vec::new();
        lzma_rs::xz_compress(&mut &data[..], &mut out).unwrap();
        out
    }

    /// Looks like a bzImage: setup code, the xz payload, its size, then more stub code that even
    /// contains bytes resembling an xz footer magic.
    fn fake_bzimage(payload: &[u8], uncompressed_len: usize) -> Vec<u8> {
        let mut b = vec![0x90u8; 1000];
        b[0x202..0x206].copy_from_slice(b"HdrS");
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
    fn crc32_matches_known_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
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
        let elf = fake_elf();
        let mut payload = xz(&elf);
        // lzma-rs writes no integrity check, so break the block header (which has a CRC32).
        payload[XZ_HEADER_LEN + 1] ^= 0xFF;
        let img = fake_bzimage(&payload, elf.len());
        assert!(extract(&img).is_err());
    }
}
