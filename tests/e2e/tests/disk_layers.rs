//! A disk names the disk, not a file: saving a state, then starting any config (an older
//! generation, the initial one with persistence off, one composed with `--with`, a promoted one)
//! gives the guest the disk's current content and never writes into the state's layer. The
//! issue's sequence, checked from inside the guest, after one save and after two.

use drover_e2e::Daemon;
use std::path::PathBuf;

/// Two regions of `/dev/vda`: R1 is written before a save (what the state must keep), R2 after
/// it (what the disk holds now).
const R1: u32 = 100_000;
const R2: u32 = 110_000;

fn write(d: &Daemon, sector: u32, text: &str) {
    write_on(d, "p2", sector, text)
}

fn write_on(d: &Daemon, vm: &str, sector: u32, text: &str) {
    d.sh(
        vm,
        &format!(
            "printf '%-512s' {text} | dd of=/dev/vda bs=512 seek={sector} count=1 conv=notrunc,fsync 2>/dev/null"
        ),
    );
}

/// The first word of a region, as the guest reads it (no cache: straight from the disk).
fn read(d: &Daemon, sector: u32) -> String {
    read_on(d, "p2", sector)
}

fn read_on(d: &Daemon, vm: &str, sector: u32) -> String {
    d.sh(
        vm,
        &format!(
            "dd if=/dev/vda bs=512 skip={sector} count=1 iflag=direct 2>/dev/null | head -c 32"
        ),
    )
    .split_whitespace()
    .next()
    .unwrap_or("")
    .to_string()
}

/// A checksum of 1 MiB of the disk around both regions.
fn sum(d: &Daemon) -> String {
    d.sh(
        "p2",
        &format!(
            "dd if=/dev/vda bs=512 skip={R1} count={} iflag=direct 2>/dev/null | sha256sum",
            R2 - R1 + 8
        ),
    )
    .split_whitespace()
    .next()
    .unwrap_or("")
    .to_string()
}

fn generations(d: &Daemon) -> usize {
    d.json(&["vm", "config", "list", "p2"])["generations"]
        .as_array()
        .map_or(0, |g| g.len())
}

#[test]
fn starting_any_config_after_a_save_keeps_the_state_and_the_disk() {
    let d = Daemon::start();
    d.ok(&[
        "vm",
        "create",
        "p2",
        "--cpus",
        "1",
        "--memory",
        "256M",
        "--disk",
        "size=64M,id=data",
    ]);
    d.ok(&["vm", "config", "persist", "p2", "on"]);
    // Generation 1 (a real change): the configs sealed before any save are 0 and 1.
    d.ok(&["vm", "set", "p2", "memory=320M"]);
    d.ok(&["vm", "start", "p2", "--wait"]);
    // Each way once, after one save or two (each count twice): the whole matrix took 2.5 min
    // of the suite, and a way's rule does not depend on how many states there are.
    let ways = [
        ("--config 0", 1),
        ("persistence off", 2),
        ("--with 0:disk:data", 1),
        ("promote", 2),
    ];
    let mut n = 0;
    for (way, saves) in ways {
        n += 1;
        let ctx = format!("{way}, after {saves} save(s)");
        // The VM runs its newest config here. States: s_first (the oldest of this round,
        // what the issue corrupted) and, with two saves, s_last.
        let first_text = format!("first-{n}");
        write(&d, R1, &first_text);
        let first = format!("a{n}");
        d.ok(&["snapshot", "create", "p2", "--name", &first]);
        let first_sum = sum(&d);
        let mut last = None;
        if saves == 2 {
            write(&d, R1, &format!("second-{n}"));
            let name = format!("b{n}");
            d.ok(&["snapshot", "create", "p2", "--name", &name]);
            last = Some((name, sum(&d), format!("second-{n}")));
        }
        let now = format!("now-{n}");
        write(&d, R2, &now);
        let before = generations(&d);
        d.ok(&["vm", "stop", "p2"]);
        // Sealing after saves records no path move: the config did not change.
        assert_eq!(generations(&d), before, "{ctx}: a save sealed a generation");

        match way {
            "persistence off" => {
                d.ok(&["vm", "config", "persist", "p2", "off"]);
                d.ok(&["vm", "start", "p2", "--wait"]);
            }
            "promote" => {
                // Generation 1, sealed before every save, becomes the initial config.
                d.ok(&["vm", "config", "promote", "p2", "1"]);
                d.ok(&["vm", "start", "p2", "--config", "0", "--wait"]);
            }
            w => {
                let mut args = vec!["vm", "start", "p2", "--wait"];
                args.extend(w.split(' '));
                d.ok(&args);
            }
        }
        // The guest sees the disk as it is now, not as the config was sealed.
        assert_eq!(
            read(&d, R2),
            now,
            "{ctx}: the disk's current content is lost"
        );
        let marker = format!("MARKER-{n}");
        write(&d, R1, &marker);
        d.ok(&["vm", "stop", "p2"]);
        if way == "persistence off" {
            d.ok(&["vm", "config", "persist", "p2", "on"]);
        }

        // The state restores byte for byte.
        d.ok(&["snapshot", "restore", "p2", &first]);
        assert_eq!(
            read(&d, R1),
            first_text,
            "{ctx}: state {first} was written to"
        );
        assert_eq!(sum(&d), first_sum, "{ctx}: state {first} changed");
        if let Some((name, s, text)) = &last {
            d.ok(&["snapshot", "restore", "p2", name]);
            assert_eq!(read(&d, R1), *text, "{ctx}: state {name} was written to");
            assert_eq!(sum(&d), *s, "{ctx}: state {name} changed");
        }
        // The newest generation boots with the restored disk, not the marker under it.
        d.ok(&["vm", "stop", "p2"]);
        d.ok(&["vm", "start", "p2", "--wait"]);
        let want = last.as_ref().map_or(first_text.clone(), |l| l.2.clone());
        assert_eq!(
            read(&d, R1),
            want,
            "{ctx}: the newest generation lost its data"
        );
    }
    d.ok(&["vm", "stop", "p2"]);
}

/// Records an older droverd wrote (a save re-pointed the config's disk path, and the stop after
/// it sealed that as a generation) are migrated at the first start of this one: the generation
/// no longer differs, the initial config gets the disk's current content, the state restores.
/// Needs the older build: DROVER_OLD_BIN_DIR (its `target/debug`), else skipped.
#[test]
fn records_of_an_older_droverd_are_migrated_at_start() {
    let Some(old) = std::env::var_os("DROVER_OLD_BIN_DIR") else {
        eprintln!("skipped: set DROVER_OLD_BIN_DIR to an older build's binaries");
        return;
    };
    let mut d = Daemon::start_from(PathBuf::from(old));
    d.ok(&[
        "vm",
        "create",
        "up",
        "--memory",
        "256M",
        "--disk",
        "size=64M,id=data",
    ]);
    d.ok(&["vm", "config", "persist", "up", "on"]);
    d.ok(&["vm", "start", "up", "--wait"]);
    write_on(&d, "up", R1, "kept");
    d.ok(&["snapshot", "create", "up", "--name", "s1"]);
    write_on(&d, "up", R2, "now");
    d.ok(&["vm", "stop", "up"]);
    d.kill9();
    d.use_bin(None);
    d.spawn();
    assert!(d.log().contains("records migrated"), "{}", d.log());
    let diff = d.json(&["vm", "config", "diff", "up", "0", "1"]);
    assert_eq!(diff, serde_json::json!([]), "the old path move is gone");
    d.ok(&["vm", "start", "up", "--config", "0", "--wait"]);
    assert_eq!(
        read_on(&d, "up", R2),
        "now",
        "the initial config sees the disk as it is"
    );
    write_on(&d, "up", R1, "MARKER");
    d.ok(&["vm", "stop", "up"]);
    d.ok(&["snapshot", "restore", "up", "s1"]);
    assert_eq!(
        read_on(&d, "up", R1),
        "kept",
        "the old state was not written to"
    );
    d.ok(&["vm", "stop", "up"]);
}

/// What a qcow2 image holds at `sector` (its first word), read on the host.
fn image_word(image: &std::path::Path, sector: u32) -> String {
    let word: Vec<u8> = drover_e2e::image_bytes(image, sector as usize * 512, 32)
        .into_iter()
        .take_while(|b| *b != 0 && *b != b' ')
        .collect();
    String::from_utf8_lossy(&word).into_owned()
}

/// A disk given as `image=PATH` keeps the user's data through saves and a delete: after a save
/// the VM writes to droverd's layers (`vm show` says so), and `vm delete` writes the latest data
/// back into the image; `--discard-changes` leaves it as the first save pinned it.
#[test]
fn deleting_a_saved_vm_writes_its_latest_data_back_into_the_users_image() {
    let d = Daemon::start();
    let dir = tempfile::tempdir().unwrap();
    for (vm, discard) in [("keep", false), ("drop", true)] {
        let image = dir.path().join(format!("{vm}.qcow2"));
        drover_e2e::qemu_img(&[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            image.as_os_str(),
            "64M".as_ref(),
        ]);
        d.ok(&[
            "vm",
            "create",
            vm,
            "--memory",
            "256M",
            "--disk",
            &format!("image={},id=data", image.display()),
        ]);
        d.ok(&["vm", "start", vm, "--wait"]);
        write_on(&d, vm, R1, "BEFORE-SAVE");
        d.ok(&["snapshot", "create", vm, "--name", "s"]);
        write_on(&d, vm, R2, "AFTER-SAVE");
        d.ok(&["vm", "stop", vm]);
        let shown = d.ok(&["vm", "show", vm]);
        assert!(shown.contains("written back into it on delete"), "{shown}");
        assert_eq!(
            image_word(&image, R2),
            "",
            "until the delete, the image is as the save pinned it"
        );
        let mut args = vec!["vm", "delete", vm];
        if discard {
            args.push("--discard-changes");
        }
        let said = d.ok(&args);
        assert_eq!(image_word(&image, R1), "BEFORE-SAVE");
        if discard {
            assert!(said.contains("left as it was"), "{said}");
            assert_eq!(image_word(&image, R2), "", "--discard-changes");
        } else {
            assert!(said.contains("with the VM's latest data"), "{said}");
            assert_eq!(
                image_word(&image, R2),
                "AFTER-SAVE",
                "the latest data is in the image"
            );
        }
        assert!(image.exists());
    }
}
