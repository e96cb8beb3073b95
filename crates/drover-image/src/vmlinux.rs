//! Extracts the uncompressed ELF `vmlinux` from a Debian (xz-compressed) bzImage.
//!
//! Booting the ELF through QEMU's PVH entry skips the in-guest decompressor, which halves boot
//! time under TCG (PLATFORM.md). The bzImage holds the kernel as one xz stream, followed by the
//! 4-byte decompressed size and the rest of the decompressor stub.
//!
//! Two things keep `lzma_rs::xz_decompress` from doing this alone: the kernel's stream uses the x86
//! BCJ filter (`xz --x86`, filter id 4), which lzma-rs does not implement, and lzma-rs insists on
//! end-of-input right after the stream footer. So this module walks the xz container itself
//! (stream header, block headers, checks), hands each block's LZMA2 data to lzma-rs's raw LZMA2
//! decoder, undoes the BCJ filter, and stops at the index: whatever follows the stream is ignored.

use sha2::{Digest, Sha256};

use crate::elf;

/// Magic bytes at the start of an xz stream.
const XZ_MAGIC: &[u8; 6] = b"\xFD7zXZ\x00";
const XZ_HEADER_LEN: usize = 12;
const FILTER_X86: u64 = 0x04;
const FILTER_LZMA2: u64 = 0x21;

/// CRC-32 (IEEE, reflected), used by xz for headers and as a block check.
pub(crate) fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
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

/// CRC-64 (ECMA-182, reflected), an xz block check.
fn crc64(data: &[u8]) -> u64 {
    const TABLE: [u64; 256] = {
        let mut t = [0u64; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u64;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xC96C_5795_D787_0F42 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut c = !0u64;
    for &b in data {
        c = TABLE[((c ^ u64::from(b)) & 0xFF) as usize] ^ (c >> 8);
    }
    !c
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

/// Reads an xz variable-length integer at `*pos`, advancing it.
fn varint(b: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut v = 0u64;
    for i in 0..9 {
        let byte = *b.get(*pos).ok_or("truncated integer in block header")?;
        *pos += 1;
        v |= u64::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("integer in block header too long".into())
}

/// Decodes the xz stream at the start of `data` (anything after the stream's blocks is ignored)
/// and returns the concatenated output of its blocks, each verified against its check.
fn decode_xz(data: &[u8]) -> Result<Vec<u8>, String> {
    let h = data.get(..XZ_HEADER_LEN).ok_or("truncated stream header")?;
    if h[..6] != XZ_MAGIC[..]
        || h[6] != 0
        || u32::from_le_bytes([h[8], h[9], h[10], h[11]]) != crc32(&h[6..8])
    {
        return Err("invalid stream header".into());
    }
    let check_id = h[7];
    let check_len = match check_id {
        0x00 => 0,
        0x01 => 4,
        0x04 => 8,
        0x0A => 32,
        other => return Err(format!("unsupported integrity check type {other:#x}")),
    };

    let mut out = Vec::new();
    let mut pos = XZ_HEADER_LEN;
    loop {
        let size_byte = *data.get(pos).ok_or("truncated stream: no index")?;
        if size_byte == 0 {
            // The index follows; all blocks are decoded.
            return Ok(out);
        }
        let header_len = (usize::from(size_byte) + 1) * 4;
        let header = data
            .get(pos..pos + header_len)
            .ok_or("truncated block header")?;
        let (body, crc) = header.split_at(header_len - 4);
        if u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) != crc32(body) {
            return Err(format!("block header at offset {pos}: CRC32 mismatch"));
        }
        let flags = header[1];
        if flags & 0x3C != 0 {
            return Err(format!("block header at offset {pos}: reserved flags set"));
        }
        let mut p = 2;
        let packed_size = if flags & 0x40 != 0 {
            Some(varint(body, &mut p)?)
        } else {
            None
        };
        let unpacked_size = if flags & 0x80 != 0 {
            Some(varint(body, &mut p)?)
        } else {
            None
        };
        let mut x86_start = None;
        let nfilters = usize::from(flags & 0x03) + 1;
        for i in 0..nfilters {
            let id = varint(body, &mut p)?;
            let props_len =
                usize::try_from(varint(body, &mut p)?).map_err(|_| "filter properties too long")?;
            let props = body
                .get(p..p + props_len)
                .ok_or("truncated filter properties")?;
            p += props_len;
            let last = i + 1 == nfilters;
            match (id, last) {
                (FILTER_LZMA2, true) => {}
                (FILTER_X86, false) if x86_start.is_none() => {
                    x86_start = Some(match props {
                        [] => 0,
                        [a, b, c, d] => u32::from_le_bytes([*a, *b, *c, *d]),
                        _ => return Err("bad x86 BCJ filter properties".into()),
                    });
                }
                _ => {
                    return Err(format!(
                        "unsupported filter chain (filter id {id:#x} at position {i}); only LZMA2, \
                         optionally after the x86 BCJ filter, is supported"
                    ))
                }
            }
        }

        let block_data = &data[pos + header_len..];
        let mut input = block_data;
        let first = out.len();
        lzma_rs::decompress::raw::Lzma2Decoder::new()
            .decompress(&mut input, &mut out)
            .map_err(|e| format!("LZMA2 decoding of the block at offset {pos} failed: {e:?}"))?;
        let packed = (block_data.len() - input.len()) as u64;
        let unpacked = (out.len() - first) as u64;
        if packed_size.is_some_and(|s| s != packed) || unpacked_size.is_some_and(|s| s != unpacked)
        {
            return Err(format!(
                "block at offset {pos}: sizes disagree with its header"
            ));
        }
        if let Some(start) = x86_start {
            bcj_x86_decode(&mut out[first..], start);
        }

        // Block padding to a multiple of 4, then the check of the block's (unfiltered) output.
        let unpadded = header_len + (block_data.len() - input.len());
        let check_at = pos + unpadded.div_ceil(4) * 4;
        let check = data
            .get(check_at..check_at + check_len)
            .ok_or("truncated block check")?;
        let block_out = &out[first..];
        let ok = match check_id {
            0x01 => check == crc32(block_out).to_le_bytes(),
            0x04 => check == crc64(block_out).to_le_bytes(),
            0x0A => check == Sha256::digest(block_out).as_slice(),
            _ => true,
        };
        if !ok {
            return Err(format!(
                "block at offset {pos}: integrity check failed (corrupt data)"
            ));
        }
        pos = check_at + check_len;
    }
}

/// Undoes xz's x86 BCJ filter over a whole block, in place.
///
/// The filter turned the relative targets of `E8` (call) and `E9` (jmp) instructions into absolute
/// ones (which compress better); this converts them back. It follows the reference decoder
/// (xz-embedded's `bcj_x86`): the `prev_mask` bookkeeping skips bytes that were themselves part of
/// a recently converted or rejected instruction, and only 32-bit displacements whose top byte is
/// 0x00 or 0xFF were converted. The last four bytes are never converted.
fn bcj_x86_decode(buf: &mut [u8], start_offset: u32) {
    const ALLOWED: [bool; 8] = [true, true, true, false, true, false, false, false];
    const BIT_NUM: [u32; 8] = [0, 1, 2, 2, 3, 3, 3, 3];
    let test_msbyte = |b: u8| b == 0x00 || b == 0xFF;

    if buf.len() <= 4 {
        return;
    }
    let end = buf.len() - 4;
    let mut prev_pos: usize = usize::MAX;
    let mut prev_mask: u32 = 0;
    let mut i = 0;
    while i < end {
        if buf[i] & 0xFE != 0xE8 {
            i += 1;
            continue;
        }
        let distance = i.wrapping_sub(prev_pos);
        if distance > 3 {
            prev_mask = 0;
        } else {
            prev_mask = (prev_mask << (distance - 1)) & 7;
            if prev_mask != 0 {
                let b = buf[i + 4 - BIT_NUM[prev_mask as usize] as usize];
                if !ALLOWED[prev_mask as usize] || test_msbyte(b) {
                    prev_pos = i;
                    prev_mask = (prev_mask << 1) | 1;
                    i += 1;
                    continue;
                }
            }
        }
        prev_pos = i;
        if test_msbyte(buf[i + 4]) {
            let mut src = u32::from_le_bytes([buf[i + 1], buf[i + 2], buf[i + 3], buf[i + 4]]);
            let mut dest;
            loop {
                // Positions are modulo 2^32, as in the reference (it keeps `pos` in a uint32_t).
                dest = src.wrapping_sub(start_offset.wrapping_add(i as u32).wrapping_add(5));
                if prev_mask == 0 {
                    break;
                }
                let j = BIT_NUM[prev_mask as usize] * 8;
                let b = (dest >> (24 - j)) as u8;
                if !test_msbyte(b) {
                    break;
                }
                src = dest ^ ((1u32 << (32 - j)) - 1);
            }
            dest &= 0x01FF_FFFF;
            dest |= 0u32.wrapping_sub(dest & 0x0100_0000);
            buf[i + 1..i + 5].copy_from_slice(&dest.to_le_bytes());
            i += 5;
        } else {
            prev_mask = (prev_mask << 1) | 1;
            i += 1;
        }
    }
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
    fn checksums_match_known_values() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc64(b"123456789"), 0x995D_C9BB_DF19_39FA);
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
        for at in [XZ_HEADER_LEN + 1, stream.len() / 2, stream.len() - 40] {
            let mut s = stream.to_vec();
            s[at] ^= 0x55;
            assert!(decode_xz(&s).is_err(), "corruption at {at} not detected");
        }
        assert!(decode_xz(&stream[..stream.len() / 2]).is_err());
    }
}
