//! droverd killed at the worst moments (issue 9, item 3): at named points of save, capture,
//! write-out, restore, start and delete (`DROVER_TEST_CRASH_AT`, debug builds only), and at
//! random moments in a loop. After each restart every state is usable or `failed` with its
//! reason, the guest runs with the memory and disk it should have, and no process or file of
//! the cut-off operation is left.

use drover_e2e::{pids_mentioning, wait_for, Daemon};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// A VM with a data disk, running, its agent ready.
fn vm_up(d: &Daemon, vm: &str) {
    d.ok(&[
        "vm",
        "create",
        vm,
        "--memory",
        "256M",
        "--disk",
        "size=32M,id=data",
    ]);
    d.ok(&["vm", "start", vm, "--wait"]);
}

/// Put `tag` in the guest's memory (a file in its RAM-backed root) and on its data disk.
fn mark(d: &Daemon, vm: &str, tag: &str) {
    d.sh(
        vm,
        &format!(
            "echo {tag} > /tmp/mem-marker && echo {tag} > /tmp/d && dd if=/tmp/d of=/dev/vda bs=512 seek=2000 conv=notrunc,fsync 2>/dev/null"
        ),
    );
}

/// (memory marker, disk marker) as the guest sees them, waiting for its agent; the memory
/// marker is `none` in a guest booted since.
fn markers(d: &Daemon, vm: &str) -> (String, String) {
    // Generous: two tests share two cores with their guests under TCG.
    let out = wait_for("the guest to answer", Duration::from_secs(120), || {
        let o = d.drover(&[
            "vm",
            "exec",
            vm,
            "--timeout",
            "20",
            "--",
            "sh",
            "-c",
            "cat /tmp/mem-marker 2>/dev/null || echo none; dd if=/dev/vda bs=512 skip=2000 count=1 2>/dev/null | head -1",
        ]);
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
    });
    let mut l = out.lines().map(|s| s.trim().to_string());
    (l.next().unwrap_or_default(), l.next().unwrap_or_default())
}

fn wait_agent(d: &Daemon, vm: &str) {
    wait_for("the agent", Duration::from_secs(90), || {
        d.drover(&["vm", "exec", vm, "--timeout", "10", "--", "true"])
            .status
            .success()
            .then_some(())
    });
}

fn state(d: &Daemon, vm: &str, id: &str) -> serde_json::Value {
    d.json(&["snapshot", "show", vm, id])
}

fn wait_phase(d: &Daemon, vm: &str, id: &str, phase: &str) -> serde_json::Value {
    wait_for(
        &format!("state {id} to be {phase}"),
        Duration::from_secs(120),
        || {
            let s = state(d, vm, id);
            (s["phase"] == phase).then_some(s)
        },
    )
}

/// Restart droverd with a crash point, run `args` (which it dies in), and start it again
/// normally. Returns whether the CLI call succeeded before the crash.
fn crash_during(d: &mut Daemon, point: &str, args: &[&str]) -> bool {
    d.kill9();
    d.set_env(&[("DROVER_TEST_CRASH_AT", point)]);
    d.spawn();
    let ok = d.drover(args).status.success();
    assert!(
        d.wait_exit(Duration::from_secs(60)),
        "droverd did not reach crash point {point}"
    );
    assert!(
        d.log()
            .contains("DROVER_TEST_CRASH_AT: killing droverd here"),
        "droverd died elsewhere than at {point}:\n{}",
        drover_e2e::tail(&d.log(), 20)
    );
    d.set_env(&[]);
    d.spawn();
    ok
}

/// What is left over that no VM or state accounts for: processes under the state dir other
/// than running VMs' QEMUs (one each), RAM files, state directories and VM directories.
fn leftovers(d: &Daemon) -> Vec<String> {
    let mut bad = Vec::new();
    let vms = d.json(&["vm", "list"]);
    let vms = vms.as_array().cloned().unwrap_or_default();
    let mut running = BTreeSet::new();
    let mut expect_ram = BTreeSet::new();
    let mut names = BTreeSet::new();
    for v in &vms {
        let name = v["name"].as_str().unwrap_or_default().to_string();
        names.insert(name.clone());
        if v["state"] != "stopped" {
            running.insert(v["pid"].as_u64().unwrap_or(0) as i32);
            expect_ram.insert(name.clone());
            // The receiver droverd keeps ready for a running VM's next save.
            expect_ram.insert(format!("{name}@next"));
        }
        let states = d.json(&["snapshot", "list", &name]);
        let ids: BTreeSet<String> = states
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| s["id"].as_str().unwrap_or_default().to_string())
            .collect();
        for id in &ids {
            expect_ram.insert(format!("{name}@{id}"));
        }
        let sdir = d.state_dir().join("vms").join(&name).join("states");
        for e in std::fs::read_dir(&sdir).into_iter().flatten().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if !ids.contains(&n) {
                bad.push(format!("state dir {}", e.path().display()));
            }
            for f in std::fs::read_dir(e.path()).into_iter().flatten().flatten() {
                if f.file_name().to_string_lossy().ends_with(".tmp") {
                    bad.push(format!("temporary file {}", f.path().display()));
                }
            }
        }
    }
    let run = d.state_dir().join("run");
    let standby: Vec<String> = expect_ram
        .iter()
        .filter_map(|n| n.strip_suffix("@next"))
        .map(|vm| format!("{}/{vm}/cap-next/", run.display()))
        .collect();
    for pid in pids_mentioning(&format!("{}/", run.display())) {
        let cmd = String::from_utf8_lossy(
            &std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default(),
        )
        .into_owned();
        if standby.iter().any(|s| cmd.contains(s.as_str())) {
            continue;
        }
        if !running.contains(&pid) {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Zombies are gone already (init reaps them late here).
            if !stat.contains(") Z") && !cmd.is_empty() {
                bad.push(format!(
                    "process {pid}: {}",
                    String::from_utf8_lossy(&cmd).replace('\0', " ")
                ));
            }
        }
    }
    for e in std::fs::read_dir(d.ram_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let n = e.file_name().to_string_lossy().into_owned();
        if !expect_ram.contains(&n) {
            bad.push(format!("RAM file {n}"));
        }
    }
    for sub in ["vms", "run"] {
        for e in std::fs::read_dir(d.state_dir().join(sub))
            .into_iter()
            .flatten()
            .flatten()
        {
            let n = e.file_name().to_string_lossy().into_owned();
            if !names.contains(&n) {
                bad.push(format!("{sub}/{n}"));
            }
        }
    }
    bad
}

fn no_leftovers(d: &Daemon) {
    // Background work of the restart (write-outs, reaping) settles first.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let bad = leftovers(d);
        if bad.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "left over: {bad:#?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn restore_cut_off_while_copying_memory_into_ram_leaves_no_partial_copy() {
    let mut d = Daemon::start();
    vm_up(&d, "r");
    mark(&d, "r", "one");
    d.ok(&["snapshot", "create", "r", "--name", "s1"]);
    let s1 = wait_phase(&d, "r", "s1", "durable");
    mark(&d, "r", "two");
    // As after a host reboot: the state's memory is only on disk.
    let copy = d
        .ram_dir()
        .join(format!("r@{}", s1["id"].as_str().unwrap()));
    std::fs::remove_file(&copy).expect("the state's RAM copy");
    let ok = crash_during(
        &mut d,
        "restore-ram-copy",
        &["snapshot", "restore", "r", "s1"],
    );
    assert!(!ok, "the restore cannot have been answered");
    assert!(!copy.exists(), "no copy under the name a restore maps");
    no_leftovers(&d);
    // The VM it was to replace runs on, untouched.
    assert_eq!(markers(&d, "r"), ("two".into(), "two".into()));
    d.ok(&["snapshot", "restore", "r", "s1"]);
    assert_eq!(markers(&d, "r"), ("one".into(), "one".into()));
    no_leftovers(&d);
}

#[test]
fn write_out_cut_off_is_redone_and_the_state_stays_usable() {
    let mut d = Daemon::start();
    vm_up(&d, "w");
    for (i, point) in ["write-out-copy", "write-out-renamed"].iter().enumerate() {
        let tag = format!("w{i}");
        mark(&d, "w", &tag);
        let name = format!("s-{point}");
        d.kill9();
        d.set_env(&[("DROVER_TEST_CRASH_AT", point)]);
        d.spawn();
        let out = d.ok(&["snapshot", "create", "w", "--name", &name]);
        assert!(
            out.contains("a host crash before then loses this state"),
            "the answer says what a crash costs: {out}"
        );
        assert!(d.wait_exit(Duration::from_secs(60)), "no crash at {point}");
        d.set_env(&[]);
        d.spawn();
        let st = wait_phase(&d, "w", &name, "durable");
        assert!(st["failure"].is_null(), "{st}");
        assert!(st["memory"]["sha256"].is_string(), "{st}");
        no_leftovers(&d);
        mark(&d, "w", "later");
        d.ok(&["snapshot", "restore", "w", &name]);
        assert_eq!(markers(&d, "w"), (tag.clone(), tag.clone()), "{point}");
    }
    no_leftovers(&d);
}

#[test]
fn capture_cut_off_is_finished_by_the_next_droverd_and_the_guest_runs_on() {
    let mut d = Daemon::start();
    vm_up(&d, "c");
    mark(&d, "c", "live");
    crash_during(
        &mut d,
        "capture",
        &[
            "snapshot",
            "create",
            "c",
            "--name",
            "cut",
            "--capture",
            "stream",
        ],
    );
    // The guest is not frozen: it answers, and its clock moves.
    let t1 = markers(&d, "c");
    assert_eq!(t1, ("live".into(), "live".into()));
    let up1: f64 = d
        .sh("c", "cut -d' ' -f1 /proc/uptime")
        .trim()
        .parse()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let up2: f64 = d
        .sh("c", "cut -d' ' -f1 /proc/uptime")
        .trim()
        .parse()
        .unwrap();
    assert!(up2 > up1 + 0.5, "the guest runs: uptime {up1} -> {up2}");
    assert_eq!(d.json(&["vm", "show", "c"])["state"], "running");
    // The capture is finished by the next droverd: the state is usable, with its content.
    let st = wait_for("the state to settle", Duration::from_secs(120), || {
        let s = state(&d, "c", "cut");
        (s["phase"] == "durable" || s["phase"] == "failed").then_some(s)
    });
    assert_eq!(st["phase"], "durable", "{st}");
    mark(&d, "c", "after");
    d.ok(&["snapshot", "restore", "c", "cut"]);
    assert_eq!(markers(&d, "c"), ("live".into(), "live".into()));
    no_leftovers(&d);
    // Saving works again.
    d.ok(&["snapshot", "create", "c", "--name", "again"]);
    wait_phase(&d, "c", "again", "durable");
    no_leftovers(&d);
}

#[test]
fn copy_cut_off_while_the_guest_is_paused_resumes_it_and_leaves_no_state() {
    let mut d = Daemon::start();
    vm_up(&d, "p");
    mark(&d, "p", "p1");
    let ok = crash_during(
        &mut d,
        "save-copy",
        &[
            "snapshot",
            "create",
            "p",
            "--name",
            "cut",
            "--capture",
            "copy",
        ],
    );
    assert!(!ok, "the save cannot have been answered");
    // The guest was paused for the copy: the next droverd lets it run, and the half-made state
    // (its memory under a temporary name) is gone.
    assert_eq!(d.json(&["vm", "show", "p"])["state"], "running");
    assert_eq!(markers(&d, "p"), ("p1".into(), "p1".into()));
    no_leftovers(&d);
    let names = d.json(&["snapshot", "list", "p"]);
    assert!(
        names.as_array().is_some_and(|a| a.is_empty()),
        "an unanswered save leaves no state: {names}"
    );
    // A copy is restorable when it answers, and restores that point in time.
    let st = d.json(&[
        "snapshot",
        "create",
        "p",
        "--name",
        "ok",
        "--capture",
        "copy",
    ]);
    assert_eq!(
        (&st["capture"], &st["phase"]),
        (&"copy".into(), &"ready".into()),
        "{st}"
    );
    mark(&d, "p", "p2");
    d.ok(&["snapshot", "restore", "p", "ok"]);
    assert_eq!(markers(&d, "p"), ("p1".into(), "p1".into()));
    // Running on the restored state's memory (mapped privately), a copy is refused with the
    // way out, and auto streams.
    let e = d.fails(
        4,
        &[
            "snapshot",
            "create",
            "p",
            "--name",
            "no",
            "--capture",
            "copy",
        ],
    );
    assert!(e.contains("--capture stream"), "{e}");
    let st = d.json(&["snapshot", "create", "p", "--name", "auto"]);
    assert_eq!(st["capture"], "stream", "{st}");
    wait_phase(&d, "p", "ok", "durable");
    wait_phase(&d, "p", "auto", "durable");
    no_leftovers(&d);
}

#[test]
fn save_cut_off_after_the_disks_moved_keeps_what_the_guest_writes_next() {
    // QEMU writes the new overlays, the chains do not say so yet: the next droverd must record
    // QEMU's layer, or the next start opens the old one and drops every later write.
    let mut d = Daemon::start();
    vm_up(&d, "m");
    mark(&d, "m", "before");
    crash_during(
        &mut d,
        "save-disks-moved",
        &["snapshot", "create", "m", "--name", "cut"],
    );
    // Re-adopted and running again (it was paused for the save).
    assert_eq!(markers(&d, "m"), ("before".into(), "before".into()));
    assert_eq!(d.json(&["vm", "show", "m"])["state"], "running");
    mark(&d, "m", "later");
    d.ok(&["vm", "stop", "m"]);
    d.ok(&["vm", "start", "m", "--wait"]);
    assert_eq!(
        markers(&d, "m").1,
        "later",
        "a write made after the cut-off save survives a stop and start"
    );
    // Saving and restoring work on top of it.
    mark(&d, "m", "saved");
    d.ok(&["snapshot", "create", "m", "--name", "ok"]);
    wait_phase(&d, "m", "ok", "durable");
    mark(&d, "m", "after");
    d.ok(&["snapshot", "restore", "m", "ok"]);
    assert_eq!(markers(&d, "m"), ("saved".into(), "saved".into()));
}

#[test]
fn save_cut_off_after_its_receiver_started_leaves_no_orphan_qemu() {
    let mut d = Daemon::start();
    vm_up(&d, "o");
    mark(&d, "o", "o1");
    let ok = crash_during(
        &mut d,
        "save-receiver",
        &["snapshot", "create", "o", "--capture", "stream"],
    );
    assert!(!ok);
    no_leftovers(&d);
    assert!(
        pids_mentioning("/cap-").iter().all(|p| {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            !String::from_utf8_lossy(&cmd).contains(&d.state_dir().display().to_string())
        }),
        "no receiving QEMU left"
    );
    assert_eq!(markers(&d, "o"), ("o1".into(), "o1".into()));
    assert_eq!(d.json(&["vm", "show", "o"])["state"], "running");
    d.ok(&["snapshot", "create", "o", "--name", "after"]);
    wait_phase(&d, "o", "after", "durable");
    // A deleted VM takes its helpers (the receiver kept ready) with it.
    d.ok(&["vm", "delete", "o", "--force"]);
    no_leftovers(&d);
}

#[test]
fn start_and_restore_cut_off_are_adopted_whole_or_stopped_with_a_reason() {
    let mut d = Daemon::start();
    d.ok(&[
        "vm",
        "create",
        "s",
        "--memory",
        "256M",
        "--disk",
        "size=32M,id=data",
    ]);
    crash_during(&mut d, "start-spawned", &["vm", "start", "s"]);
    let v = d.json(&["vm", "show", "s"]);
    assert_eq!(v["state"], "running", "{v}");
    assert!(
        v["running_config"].is_object(),
        "adopted with its config: {v}"
    );
    wait_agent(&d, "s");
    mark(&d, "s", "st1");
    // What failed until a restart before: snapshots of such a VM.
    d.ok(&["snapshot", "create", "s", "--name", "a"]);
    wait_phase(&d, "s", "a", "durable");
    mark(&d, "s", "st2");
    crash_during(
        &mut d,
        "restore-loading",
        &["snapshot", "restore", "s", "a"],
    );
    let v = d.json(&["vm", "show", "s"]);
    assert_eq!(v["state"], "stopped", "{v}");
    assert_eq!(v["last_exit"]["reason"], "start-interrupted", "{v}");
    no_leftovers(&d);
    d.ok(&["snapshot", "restore", "s", "a"]);
    assert_eq!(markers(&d, "s"), ("st1".into(), "st1".into()));
    no_leftovers(&d);
}

#[test]
fn delete_cut_off_is_finished_at_the_next_start() {
    let mut d = Daemon::start();
    vm_up(&d, "x");
    d.ok(&["snapshot", "create", "x", "--name", "k"]);
    wait_phase(&d, "x", "k", "durable");
    d.ok(&["vm", "stop", "x"]);
    crash_during(&mut d, "delete-files", &["vm", "delete", "x"]);
    assert!(d.json(&["vm", "list"]).as_array().unwrap().is_empty());
    assert!(!d.state_dir().join("vms/x").exists(), "vms/x removed");
    assert!(!d.state_dir().join("run/x").exists(), "run/x removed");
    no_leftovers(&d);
    // The name is free and new.
    vm_up(&d, "x");
    assert!(d
        .json(&["snapshot", "list", "x"])
        .as_array()
        .unwrap()
        .is_empty());
}

/// A small deterministic generator (xorshift), so a failing run can be replayed by its seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn random_kills_across_save_restore_start_delete_and_write_out() {
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0009);
    let rounds: usize = std::env::var("CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    eprintln!("random kill loop: seed {seed} (replay with CRASH_SEED={seed}), {rounds} rounds");
    let mut rng = Rng(seed);
    let mut d = Daemon::start();
    vm_up(&d, "z");
    mark(&d, "z", "m0");
    // What each acknowledged state must bring back (its marker).
    let mut acked: Vec<(String, String)> = Vec::new();
    let mut expect = "m0".to_string();
    let mut written = vec![expect.clone()];
    let started = Instant::now();
    let mut corrupted = Vec::new();
    for round in 0..rounds {
        let ctx = format!("seed {seed}, round {round}");
        let running = d.json(&["vm", "show", "z"])["state"] == "running";
        let op = rng.below(5);
        let tag = format!("m{}", round + 1);
        let (args, after): (Vec<String>, &str) = match (op, running) {
            (_, false) => (vec!["vm".into(), "start".into(), "z".into()], "start"),
            (0 | 4, true) => {
                mark(&d, "z", &tag);
                written.push(tag.clone());
                expect = tag.clone();
                (
                    vec![
                        "snapshot".into(),
                        "create".into(),
                        "z".into(),
                        "--name".into(),
                        tag.clone(),
                    ],
                    if op == 0 { "save" } else { "write-out" },
                )
            }
            (1, true) if !acked.is_empty() => {
                let (id, _) = acked[rng.below(acked.len() as u64) as usize].clone();
                (
                    vec!["snapshot".into(), "restore".into(), "z".into(), id],
                    "restore",
                )
            }
            (2, true) => {
                d.ok(&["vm", "stop", "z", "--force"]);
                (vec!["vm".into(), "start".into(), "z".into()], "start")
            }
            _ => {
                d.ok(&[
                    "vm", "create", "tmp", "--memory", "128M", "--disk", "size=8M",
                ]);
                (vec!["vm".into(), "delete".into(), "tmp".into()], "delete")
            }
        };
        let journal = |d: &Daemon| -> Vec<serde_json::Value> {
            d.json(&["vm", "config", "journal", "z"])
                .as_array()
                .cloned()
                .unwrap_or_default()
        };
        let journal_before = journal(&d);
        // Kill somewhere inside the operation (write-out: after the answer, while it writes).
        let mut child = std::process::Command::new(drover_e2e::bin_dir().join("drover"))
            .args(&args)
            .env("DROVER_SOCKET", d.socket())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("drover");
        let delay = match after {
            // After the answer: while the memory streams, or is written out.
            "write-out" => {
                let t = Instant::now();
                while t.elapsed() < Duration::from_secs(60) && matches!(child.try_wait(), Ok(None))
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                rng.below(1500)
            }
            "start" => rng.below(120),
            _ => rng.below(400),
        };
        std::thread::sleep(Duration::from_millis(delay));
        let answered = matches!(child.try_wait(), Ok(Some(s)) if s.success());
        d.kill9();
        let _ = child.wait();
        d.spawn();
        if (after == "save" || after == "write-out") && answered {
            acked.push((tag.clone(), tag.clone()));
        }
        eprintln!(
            "round {round}: {after} {args:?}, killed {delay} ms {}, answered: {answered}",
            if after == "write-out" {
                "after the answer"
            } else {
                "in"
            }
        );
        if after == "restore" && answered {
            let (id, _) = args
                .get(3)
                .map(|id| (id.clone(), id.clone()))
                .unwrap_or_default();
            expect = id;
        }
        let journal_after = journal(&d);
        assert!(
            journal_before.iter().all(|e| journal_after.contains(e)),
            "{ctx}: a journal entry was lost"
        );
        // Settled: nothing starting or stopping, no state half-captured.
        wait_for(
            &format!("{ctx}: VMs to settle"),
            Duration::from_secs(60),
            || {
                let l = d.json(&["vm", "list"]);
                l.as_array()
                    .unwrap()
                    .iter()
                    .all(|v| v["state"] == "running" || v["state"] == "stopped")
                    .then_some(())
            },
        );
        if d.json(&["vm", "list"])
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "tmp")
        {
            d.ok(&["vm", "delete", "tmp", "--force"]);
        }
        let z = d.json(&["vm", "show", "z"]);
        if z["state"] == "running" {
            // A restore the kill cut off may have finished or not: either marker is right,
            // anything else (or no answer) is a corrupted guest.
            let (m, disk) = markers(&d, "z");
            // A marker this test wrote: the one expected, or another one the cut-off operation
            // may have brought back (the state it saved or restored).
            let known = |t: &str| t == expect || written.iter().any(|w| w == t);
            // Booted since (a start): no memory marker, the disk keeps one it was given.
            let booted = m == "none" && known(&disk);
            if !booted && (!known(&m) || m != disk) {
                let why = d.drover(&[
                    "vm",
                    "exec",
                    "z",
                    "--",
                    "sh",
                    "-c",
                    "ls /dev/vd*; dd if=/dev/vda bs=512 skip=2000 count=1 | od -c | head -2; cat /proc/uptime; dmesg | tail -5",
                ]);
                let msg = format!(
                    "{ctx}: memory {m:?}, disk {disk:?}, expected {expect:?}; guest: {}{}",
                    String::from_utf8_lossy(&why.stdout),
                    String::from_utf8_lossy(&why.stderr)
                );
                eprintln!("{msg}");
                corrupted.push(msg);
            }
            if booted {
                mark(&d, "z", &disk);
            }
            expect = disk;
        } else {
            d.ok(&["vm", "start", "z", "--wait"]);
            expect = markers(&d, "z").1;
            mark(&d, "z", &expect);
        }
        let bad = {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let b = leftovers(&d);
                if b.is_empty() || Instant::now() > deadline {
                    break b;
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        };
        assert!(
            bad.is_empty(),
            "{ctx} ({after}, killed after {delay} ms): left over {bad:#?}"
        );
        let qemus = pids_mentioning(&format!("{}/run/z/qemu.pid", d.state_dir().display()));
        assert!(qemus.len() <= 1, "{ctx}: VM started twice: {qemus:?}");
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "{ctx}: the loop is over its time bound"
        );
    }
    assert!(corrupted.is_empty(), "corrupted guests: {corrupted:#?}");
    // Every acknowledged state is usable: durable (or failed with a reason, only if it never
    // got past capturing), and restorable to its marker.
    for (id, tag) in &acked {
        let st = wait_for(
            &format!("seed {seed}: state {id} to settle"),
            Duration::from_secs(120),
            || {
                let s = state(&d, "z", id);
                (s["phase"] == "durable" || s["phase"] == "failed").then_some(s)
            },
        );
        if st["phase"] == "failed" {
            assert!(
                st["failure"].as_str().unwrap_or("").contains("captured"),
                "seed {seed}: acknowledged state {id} failed after its capture: {st}\nlog:\n{}",
                d.log()
                    .lines()
                    .filter(|l| l.contains(st["id"].as_str().unwrap_or("?"))
                        || l.contains("serving")
                        || l.contains("CRASH"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            continue;
        }
        d.ok(&["snapshot", "restore", "z", id]);
        let (m, disk) = markers(&d, "z");
        assert_eq!(
            (&m, &disk),
            (tag, tag),
            "seed {seed}: state {id} restores its content"
        );
    }
    assert!(
        acked.len() >= rounds / 10,
        "seed {seed}: only {} acknowledged states: the loop tested too little",
        acked.len()
    );
    eprintln!(
        "random kill loop: {rounds} rounds, {} acknowledged states, {:.0} s",
        acked.len(),
        started.elapsed().as_secs_f64()
    );
}
