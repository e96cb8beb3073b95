//! Just enough ELF64 (little-endian) parsing for the image builder: is a binary a static x86-64
//! executable (no `PT_INTERP`), and what is in a kernel module's `.modinfo` section.
//!
//! Everything is bounds-checked: the inputs are files from packages and from the user, and a
//! truncated or odd file must give an error, not a panic.

const EI_CLASS_64: u8 = 2;
const EI_DATA_LE: u8 = 1;
const EM_X86_64: u16 = 62;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
const PT_INTERP: u32 = 3;

/// The ELF magic, `\x7fELF`.
pub const MAGIC: &[u8; 4] = b"\x7fELF";

/// A parsed ELF64 little-endian header (only the fields the builder needs).
#[derive(Debug, Clone, Copy)]
struct Header {
    e_type: u16,
    e_machine: u16,
    phoff: u64,
    shoff: u64,
    phentsize: u16,
    phnum: u16,
    shentsize: u16,
    shnum: u16,
    shstrndx: u16,
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    let s = b.get(off..off.checked_add(2)?)?;
    Some(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    let s = b.get(off..off.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_le_bytes(a))
}

fn header(b: &[u8]) -> Result<Header, String> {
    if b.len() < 64 || &b[..4] != MAGIC {
        return Err("not an ELF file (no \\x7fELF magic)".into());
    }
    if b[4] != EI_CLASS_64 || b[5] != EI_DATA_LE {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let trunc = || "truncated ELF header".to_string();
    Ok(Header {
        e_type: u16_at(b, 0x10).ok_or_else(trunc)?,
        e_machine: u16_at(b, 0x12).ok_or_else(trunc)?,
        phoff: u64_at(b, 0x20).ok_or_else(trunc)?,
        shoff: u64_at(b, 0x28).ok_or_else(trunc)?,
        phentsize: u16_at(b, 0x36).ok_or_else(trunc)?,
        phnum: u16_at(b, 0x38).ok_or_else(trunc)?,
        shentsize: u16_at(b, 0x3a).ok_or_else(trunc)?,
        shnum: u16_at(b, 0x3c).ok_or_else(trunc)?,
        shstrndx: u16_at(b, 0x3e).ok_or_else(trunc)?,
    })
}

/// Why a binary cannot run as a program in the guest's initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StaticCheck {
    /// Static x86-64 executable (classic `ET_EXEC` or static-pie `ET_DYN` without an interpreter).
    Static,
    /// Has a `PT_INTERP` program header: needs a dynamic loader the initramfs does not have.
    Dynamic,
    /// Not something the guest kernel can execute; the string says why.
    Invalid(String),
}

/// Checks that `b` is an x86-64 ELF executable that needs no dynamic loader.
///
/// Static-pie binaries (what `-C target-feature=+crt-static` gives on `*-linux-gnu`) are `ET_DYN`
/// without `PT_INTERP`; they run without a loader, so they pass.
pub fn check_static_executable(b: &[u8]) -> StaticCheck {
    let h = match header(b) {
        Ok(h) => h,
        Err(e) => return StaticCheck::Invalid(e),
    };
    if h.e_machine != EM_X86_64 {
        return StaticCheck::Invalid(format!(
            "built for ELF machine {} instead of x86-64 ({EM_X86_64})",
            h.e_machine
        ));
    }
    if h.e_type != ET_EXEC && h.e_type != ET_DYN {
        return StaticCheck::Invalid(format!(
            "ELF type {} is not an executable (object file or core dump?)",
            h.e_type
        ));
    }
    if h.phnum == 0 {
        return StaticCheck::Invalid("no program headers (a shared object or object file?)".into());
    }
    if usize::from(h.phentsize) < 56 {
        return StaticCheck::Invalid(format!("odd program header size {}", h.phentsize));
    }
    for i in 0..u64::from(h.phnum) {
        let off = h
            .phoff
            .checked_add(i * u64::from(h.phentsize))
            .and_then(|o| usize::try_from(o).ok());
        match off.and_then(|o| u32_at(b, o)) {
            Some(PT_INTERP) => return StaticCheck::Dynamic,
            Some(_) => {}
            None => {
                return StaticCheck::Invalid("program headers run past the end of the file".into())
            }
        }
    }
    StaticCheck::Static
}

/// Returns the contents of the section called `name` (e.g. `.modinfo`), if the file has one.
pub fn section<'a>(b: &'a [u8], name: &str) -> Result<Option<&'a [u8]>, String> {
    let h = header(b)?;
    if h.shnum == 0 {
        return Ok(None);
    }
    if usize::from(h.shentsize) < 64 {
        return Err(format!("odd section header size {}", h.shentsize));
    }
    let shdr = |i: u16| -> Result<(u32, u64, u64), String> {
        let off = h
            .shoff
            .checked_add(u64::from(i) * u64::from(h.shentsize))
            .and_then(|o| usize::try_from(o).ok())
            .ok_or("section header offset overflows")?;
        let bad = || format!("section header {i} runs past the end of the file");
        let name = u32_at(b, off).ok_or_else(bad)?;
        let offset = u64_at(b, off + 0x18).ok_or_else(bad)?;
        let size = u64_at(b, off + 0x20).ok_or_else(bad)?;
        Ok((name, offset, size))
    };
    let slice = |offset: u64, size: u64| -> Result<&'a [u8], String> {
        let start = usize::try_from(offset).map_err(|_| "section offset too large")?;
        let len = usize::try_from(size).map_err(|_| "section size too large")?;
        start
            .checked_add(len)
            .and_then(|end| b.get(start..end))
            .ok_or_else(|| "section runs past the end of the file".to_string())
    };
    let (_, str_off, str_size) = shdr(h.shstrndx)?;
    let strtab = slice(str_off, str_size)?;
    for i in 0..h.shnum {
        let (name_off, offset, size) = shdr(i)?;
        let Some(rest) = usize::try_from(name_off).ok().and_then(|o| strtab.get(o..)) else {
            continue;
        };
        let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
        if &rest[..end] == name.as_bytes() {
            return slice(offset, size).map(Some);
        }
    }
    Ok(None)
}

/// Builders of tiny synthetic ELF files for the crate's unit tests.
#[cfg(test)]
pub(crate) mod testutil {
    fn ehdr(e_type: u16, machine: u16) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(super::MAGIC);
        h[4] = 2; // 64-bit
        h[5] = 1; // little-endian
        h[6] = 1; // EV_CURRENT
        h[0x10..0x12].copy_from_slice(&e_type.to_le_bytes());
        h[0x12..0x14].copy_from_slice(&machine.to_le_bytes());
        h[0x34..0x36].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        h
    }

    /// An x86-64 executable whose program headers are `PT_LOAD` and, if `interp`, `PT_INTERP`.
    pub fn exec(e_type: u16, machine: u16, interp: bool) -> Vec<u8> {
        let mut b = ehdr(e_type, machine);
        let types: &[u32] = if interp { &[6, 3, 1] } else { &[6, 1] };
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        b[0x38..0x3a].copy_from_slice(&(types.len() as u16).to_le_bytes());
        for t in types {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&t.to_le_bytes());
            b.extend_from_slice(&ph);
        }
        b.extend_from_slice(b"code");
        b
    }

    /// A relocatable object (like a `.ko`) with one `.modinfo` section holding `modinfo`.
    pub fn module(modinfo: &[u8]) -> Vec<u8> {
        let mut b = ehdr(1, 62);
        let modinfo_off = b.len() as u64;
        b.extend_from_slice(modinfo);
        let strtab = b"\0.modinfo\0.shstrtab\0.text\0";
        let str_off = b.len() as u64;
        b.extend_from_slice(strtab);
        while b.len() & 7 != 0 {
            b.push(0);
        }
        let shoff = b.len() as u64;
        // (name offset, file offset, size): null, .text (empty), .modinfo, .shstrtab
        let sections: [(u32, u64, u64); 4] = [
            (0, 0, 0),
            (20, 0, 0),
            (1, modinfo_off, modinfo.len() as u64),
            (10, str_off, strtab.len() as u64),
        ];
        for (name, off, size) in sections {
            let mut sh = vec![0u8; 64];
            sh[..4].copy_from_slice(&name.to_le_bytes());
            sh[0x18..0x20].copy_from_slice(&off.to_le_bytes());
            sh[0x20..0x28].copy_from_slice(&size.to_le_bytes());
            b.extend_from_slice(&sh);
        }
        b[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        b[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes()); // e_shentsize
        b[0x3c..0x3e].copy_from_slice(&4u16.to_le_bytes()); // e_shnum
        b[0x3e..0x40].copy_from_slice(&3u16.to_le_bytes()); // e_shstrndx
        b
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::{exec, module};
    use super::*;

    #[test]
    fn static_and_static_pie_pass() {
        assert_eq!(
            check_static_executable(&exec(ET_EXEC, EM_X86_64, false)),
            StaticCheck::Static
        );
        assert_eq!(
            check_static_executable(&exec(ET_DYN, EM_X86_64, false)),
            StaticCheck::Static
        );
    }

    #[test]
    fn interpreter_means_dynamic() {
        assert_eq!(
            check_static_executable(&exec(ET_DYN, EM_X86_64, true)),
            StaticCheck::Dynamic
        );
        assert_eq!(
            check_static_executable(&exec(ET_EXEC, EM_X86_64, true)),
            StaticCheck::Dynamic
        );
    }

    #[test]
    fn wrong_machine_type_or_garbage_is_invalid() {
        assert!(matches!(
            check_static_executable(&exec(ET_EXEC, 183, false)),
            StaticCheck::Invalid(m) if m.contains("machine 183")
        ));
        assert!(matches!(
            check_static_executable(&exec(1, EM_X86_64, false)),
            StaticCheck::Invalid(_)
        ));
        assert!(matches!(
            check_static_executable(b"#!/bin/sh\necho hi\n"),
            StaticCheck::Invalid(_)
        ));
        let mut truncated = exec(ET_EXEC, EM_X86_64, false);
        truncated.truncate(80);
        assert!(matches!(
            check_static_executable(&truncated),
            StaticCheck::Invalid(_)
        ));
    }

    #[test]
    fn host_ls_is_dynamic() {
        // /bin/ls from coreutils is a dynamically linked PIE on every distribution we run on.
        if let Ok(b) = std::fs::read("/bin/ls") {
            assert_eq!(check_static_executable(&b), StaticCheck::Dynamic);
        }
    }

    #[test]
    fn finds_modinfo_section() {
        let ko = module(b"license=GPL\0depends=a,b\0");
        assert_eq!(
            section(&ko, ".modinfo").unwrap(),
            Some(&b"license=GPL\0depends=a,b\0"[..])
        );
        assert_eq!(section(&ko, ".text").unwrap(), Some(&b""[..]));
        assert_eq!(section(&ko, ".nothere").unwrap(), None);
        assert!(section(&ko[..100], ".modinfo").is_err());
    }
}
