//! The two ELF questions the image builder asks, answered with the `object` crate: is a binary a
//! static x86-64 executable (no `PT_INTERP`), and what is in a kernel module's `.modinfo` section.
//!
//! The inputs are files from packages and from the user: a truncated or odd file gives an error,
//! never a panic (`object` bounds-checks every read).

use object::elf::{FileHeader64, EM_X86_64, ET_DYN, ET_EXEC, PT_INTERP};
use object::read::elf::{FileHeader, ProgramHeader};
use object::LittleEndian as LE;

/// The ELF magic, `\x7fELF`.
pub const MAGIC: &[u8; 4] = b"\x7fELF";

fn header(b: &[u8]) -> Result<&FileHeader64<LE>, String> {
    if !b.starts_with(MAGIC) {
        return Err("not an ELF file (no \\x7fELF magic)".into());
    }
    let h =
        FileHeader64::<LE>::parse(b).map_err(|e| format!("not a valid 64-bit ELF file: {e}"))?;
    if !h.is_little_endian() {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    Ok(h)
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
    let machine = h.e_machine(LE);
    if machine != EM_X86_64 {
        return StaticCheck::Invalid(format!(
            "built for ELF machine {} instead of x86-64 ({})",
            machine.0, EM_X86_64.0
        ));
    }
    let e_type = h.e_type(LE);
    if e_type != ET_EXEC && e_type != ET_DYN {
        return StaticCheck::Invalid(format!(
            "ELF type {} is not an executable (object file or core dump?)",
            e_type.0
        ));
    }
    let phdrs = match h.program_headers(LE, b) {
        Ok(p) => p,
        Err(_) => {
            return StaticCheck::Invalid("program headers run past the end of the file".into())
        }
    };
    if phdrs.is_empty() {
        return StaticCheck::Invalid("no program headers (a shared object or object file?)".into());
    }
    if phdrs.iter().any(|p| p.p_type(LE) == PT_INTERP) {
        StaticCheck::Dynamic
    } else {
        StaticCheck::Static
    }
}

/// Returns the contents of the section called `name` (e.g. `.modinfo`), if the file has one.
pub fn section<'a>(b: &'a [u8], name: &str) -> Result<Option<&'a [u8]>, String> {
    let h = header(b)?;
    let sections = h
        .sections(LE, b)
        .map_err(|e| format!("bad section headers: {e}"))?;
    match sections.section_by_name(LE, name.as_bytes()) {
        None => Ok(None),
        Some((_, sh)) => {
            use object::read::elf::SectionHeader;
            sh.data(LE, b)
                .map(Some)
                .map_err(|_| "section runs past the end of the file".to_string())
        }
    }
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

    // The raw header values the synthetic files are built with.
    const ET_EXEC: u16 = 2;
    const ET_DYN: u16 = 3;
    const EM_X86_64: u16 = 62;

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
