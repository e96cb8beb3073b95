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
    let ways = [
        "--config 0",
        "persistence off",
        "--with 0:disk:data",
        "promote",
    ];
    let mut n = 0;
    for saves in [1, 2] {
        for way in ways {
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
