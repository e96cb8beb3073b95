#!/usr/bin/env python3
"""bench/state: saving and restoring VM state, for 512 MiB and 2 GiB guests with their RAM filled.

For each size, median of RUNS:
  guest save     `drover-guest save --wait` started in the guest -> the saved event printed on
                 the guest's console (host polls the console log every 2 ms). The event comes once
                 the point in time is fixed and the guest runs on; the memory then streams out
                 behind it ("capturing"), and is written to disk ("durable"): both reported.
  guest restore  `drover-guest restore` started in the guest -> the listener in the restored
                 state prints the restore event with the app's data on the console (restoring a
                 state whose capture has completed)
  copy save      first, on the booted guest: `drover snapshot create --capture copy` (the guest
                 paused while its memory is copied), its pause and when it is restorable
  host fast      `drover snapshot create` / `drover snapshot restore` (CLI round trips); after
                 the first restore the guest runs on a state's memory and fast saves stream
  host classic   the same with --classic (RAM in QEMU's migration stream, as plain QEMU saves)
Times from the host include starting the guest command through `drover vm exec` (~20-40 ms).

Everything runs once per QEMU installation (`--qemu both`: the system's, and QEMU 10 from
target/qemu-10 or /opt/drover-qemu10 when there), with a side-by-side table at the end.

Across hosts (`--part across`, or with `all`; needs root): two droverd's in network namespaces
(scripts/netns-hosts.sh; DROVER_NETNS_SET/DROVER_NETNS_NET, default rsb / 10.150.0), one VM of
each size with 75 % of its RAM filled from /dev/urandom (a 64 MiB block read from it, repeated:
incompressible), moved back and forth:
  hibernate      `drover vm hibernate` on the host it runs on (the state synced to disk)
  move           `drover vm migrate --to OTHER --offline` (the hibernation state's files and
                 the disks cross: bytes moved = the state's size on disk + the migration's
                 disk_bytes)
  resume there   `drover vm resume` on the other host (to QEMU running the restored guest)
what `drover vm resume NAME --on OTHER` composes (plus its check), medians of RUNS each.

Beside libvirt (`--part libvirt`, or with `all`; needs root and Debian's libvirt-daemon,
libvirt-daemon-driver-qemu and libvirt-clients): bench/state_libvirt.py boots the same guest
(droverd's kernel, initramfs, command line, CPU model and machine type, 1 vCPU, the size's RAM
filled the same way) under a libvirtd of its own, and each of Drover's runs above follows one
`virsh save` + `virsh restore` of it (libvirt, Drover, libvirt, ...; on the system's QEMU only,
which is the one libvirt drives). Both guests print `tick N` on their serial console every
~20 ms, so "restore -> guest runs" is from the restore's start until the console shows a tick
of the restored guest (for Drover: one numbered at most the last the replaced guest printed).

Usage: bench/state.py [RUNS] [--qemu system|both|DIR] [--sizes 512,2048] [--part local|across|libvirt|all]
(default 5, both, all; needs `PROFILE=release scripts/build.sh` first)
"""
import argparse, json, os, shutil, statistics, subprocess, sys, time

from common import AGENT, BIN, IMAGES, ROOT, Droverd, count, passable_tmpdir, poll, qemu_installs
import state_libvirt

SET = os.environ.get("DROVER_NETNS_SET", "rsb")
NET = os.environ.get("DROVER_NETNS_NET", "10.150.0")


def fill_ram(sh, fill_mib):
    """Fill about `fill_mib` MiB of the guest's RAM (its /tmp, a tmpfs) with incompressible data.

    64 MiB from /dev/urandom, repeated up to the fill: no page is zero or like its neighbours, and
    repeats lie beyond any stream compressor's window. (Reading all of it from /dev/urandom took
    longer than `vm exec` allows under TCG here at 2 GiB.) /tmp/fill.md5 and /tmp/chunk let a
    test check the memory survived. `sh(script)` runs a shell script in the guest."""
    sh("mount -o remount,size=95% /tmp; head -c 67108864 /dev/urandom > /tmp/chunk; "
       "md5sum /tmp/chunk > /tmp/fill.md5")
    # The chunk counts towards the fill.
    sh(f"for i in $(seq {max(1, fill_mib // 64 - 1)}); do cat /tmp/chunk; done > /tmp/fill")


def filled_guest(drover, vm, memory_mib):
    """Create and boot VM `vm` with `memory_mib` MiB, RAM 75 % filled (fill_ram); returns its
    `sh(script)`, which runs a shell script in the guest."""
    drover("vm", "create", vm, "--memory", f"{memory_mib}M")
    drover("vm", "start", vm, "--wait")

    def sh(script):
        return drover("vm", "exec", vm, "--timeout", "600", "--", "sh", "-c", script)

    fill_ram(sh, int(memory_mib * 0.75))
    return sh


def bench(runs, version, qemu_dir, sizes, side=None):
    """One QEMU installation: {size: {figure: median ms}}. With `side` (a state_libvirt.Side),
    each run follows one of libvirt's on a guest of the same size, and restores are also timed
    until the restored guest's console ticks."""
    out = {}
    print(f"QEMU {version}:")
    with Droverd("drover-st.", qemu_dir=qemu_dir) as drover:
        tmp = drover.tmp

        def sh(vm, script):
            return drover("vm", "exec", vm, "--timeout", "600", "--", "sh", "-c", script)

        for size_mib in sizes:
            vm = f"b{size_mib}"
            drover("vm", "create", vm, "--memory", f"{size_mib}M")
            drover("vm", "start", vm, "--wait")
            console = f"{tmp}/state/vms/{vm}/console.log"
            secret = json.loads(drover("--output", "json", "vm", "guest-access", "grant", vm,
                                       "--principal", "bench", "--ops", "save,restore"))["secret"]
            fill = int(size_mib * 0.75)
            sh(vm, f"echo 'export DROVER_PRINCIPAL=bench DROVER_SECRET={secret}' > /tmp/cred")
            fill_ram(lambda script: sh(vm, script), fill)
            sh(vm, "(drover-guest listen --app-id bench > /dev/console 2>&1 &); sleep 0.5")
            ticks = {False: [], True: []}  # restore -> the restored guest ticks, fast / classic
            if side:
                sh(vm, state_libvirt.TICKER)
                time.sleep(0.5)
                if state_libvirt.last_tick(console)[1] is None:
                    raise SystemExit(f"{vm}: the ticker prints nothing on the console ({console})")
                side.begin(size_mib, state_libvirt.qemu_argv(drover.tmp, f"guest={vm},"))
            gsave, grest, hsave, hrest, csave, crest = [], [], [], [], [], []
            ready, durable, paused_log = [], [], []

            def phase(name):
                return json.loads(drover("--output", "json", "snapshot", "show", vm, name))["phase"]

            def wait_phase(name, t0):
                """Seconds from t0 until the state is restorable, and until it is on disk."""
                r = poll(lambda: phase(name) in ("ready", "durable"), 600, 0.02) - t0
                d = poll(lambda: phase(name) == "durable", 600, 0.02) - t0
                return r, d
            # A copying save first, while the guest still runs on its own (shared) memory: once
            # restored it runs on a state's memory, mapped privately, and every save streams.
            copy_save, copy_ready, copy_paused = [], [], []
            for i in range(runs):
                t0 = time.monotonic()
                st = json.loads(drover("--output", "json", "snapshot", "create", vm, "--name", f"k{i}",
                                       "--capture", "copy"))
                copy_save.append(time.monotonic() - t0)
                copy_ready.append(wait_phase(f"k{i}", t0)[0])
                copy_paused.append(st["paused_ms"])
                wait_phase(f"k{i}", t0)
                drover("snapshot", "delete", vm, f"k{i}")
                print(f"  {size_mib} MiB copy {i + 1}: save {copy_save[-1] * 1000:.0f} ms (paused {copy_paused[-1]} ms, "
                      f"restorable {copy_ready[-1] * 1000:.0f} ms)")
            for i in range(runs):
                if side:
                    side.run(size_mib, i)
                n = count(console, b'"op":"save","result"')
                t0 = time.monotonic()
                sh(vm, f". /tmp/cred; (drover-guest save --name g{i} --app-id bench --wait > /dev/null &)")
                gsave.append(poll(lambda: count(console, b'"op":"save","result"') > n) - t0)
                r, dd = wait_phase(f"g{i}", t0)
                ready.append(r)
                durable.append(dd)
                time.sleep(0.3)
                n = count(console, b'"op":"restore"')
                t0 = time.monotonic()
                sh(vm, f". /tmp/cred; (drover-guest restore g{i} --app-id bench --data '{{\"run\":{i}}}' > /dev/null 2>&1 &)")
                grest.append(poll(lambda: count(console, b'"op":"restore"') > n) - t0)
                time.sleep(0.5)
                for classic, saves, restores in ((False, hsave, hrest), (True, csave, crest)):
                    name = f"{'c' if classic else 'h'}{i}"
                    t0 = time.monotonic()
                    paused_log.append(json.loads(drover("--output", "json", "snapshot", "create", vm, "--name", name,
                                                        *(["--classic"] if classic else []))))
                    saves.append(time.monotonic() - t0)
                    wait_phase(name, t0)
                    if side:
                        start, last = state_libvirt.last_tick(console)
                        watch = state_libvirt.TickWatch(console, start, below=last)
                    t0 = time.monotonic()
                    drover("snapshot", "restore", vm, name)
                    restores.append(time.monotonic() - t0)
                    if side:
                        ticks[classic].append(watch.wait() - t0)
                    time.sleep(0.3)
                for name in (f"g{i}", f"h{i}", f"c{i}"):
                    drover("snapshot", "delete", vm, name)
                print(f"  {size_mib} MiB run {i + 1}: guest save {gsave[-1] * 1000:.0f} ms (restorable {ready[-1]:.1f} s, "
                      f"durable {durable[-1]:.1f} s), guest restore {grest[-1] * 1000:.0f} ms, "
                      f"host fast {hsave[-1] * 1000:.0f}/{hrest[-1] * 1000:.0f} ms, classic {csave[-1] * 1000:.0f}/{crest[-1] * 1000:.0f} ms"
                      + (f" (restore -> guest ticks: fast {ticks[False][-1] * 1000:.0f} ms, classic {ticks[True][-1] * 1000:.0f} ms)"
                         if side else ""))
            m = lambda v: statistics.median(v) * 1000
            states = paused_log
            paused = {mode: statistics.median([x["paused_ms"] for x in states if x["mode"] == mode] or [0])
                      for mode in ("fast", "classic")}
            print(f"{size_mib} MiB: the guest was paused (median) {paused['fast']:.0f} ms per fast save, "
                  f"{paused['classic']:.0f} ms per classic save")
            print(f"{size_mib} MiB ({fill} MiB filled), medians: guest save {m(gsave):.0f} ms, guest restore -> listener has data {m(grest):.0f} ms; "
                  f"host fast save/restore {m(hsave):.0f}/{m(hrest):.0f} ms; classic {m(csave):.0f}/{m(crest):.0f} ms; "
                  f"classic/fast: save {m(csave) / m(hsave):.1f}x, restore {m(crest) / m(hrest):.1f}x; "
                  f"a guest save is restorable after {statistics.median(ready):.1f} s and on disk after {statistics.median(durable):.1f} s")
            print(f"{size_mib} MiB copying save (guest on its own memory), medians: save {m(copy_save):.0f} ms, "
                  f"paused {statistics.median(copy_paused):.0f} ms, restorable after {m(copy_ready):.0f} ms")
            out[size_mib] = {
                "copy save (booted guest)": m(copy_save),
                "copy save: paused": statistics.median(copy_paused),
                "copy save: restorable after": m(copy_ready),
                "guest paused, fast save": paused["fast"],
                "guest paused, classic save": paused["classic"],
                "host fast save": m(hsave), "host fast restore": m(hrest),
                "host classic save": m(csave), "host classic restore": m(crest),
                "guest save -> saved event": m(gsave), "guest restore -> listener": m(grest),
                "restorable after": statistics.median(ready) * 1000,
                "durable after": statistics.median(durable) * 1000,
            }
            if side:
                out[size_mib]["host fast restore -> guest ticks"] = m(ticks[False])
                out[size_mib]["host classic restore -> guest ticks"] = m(ticks[True])
                out[size_mib].update(side.results(size_mib))
                side.end(size_mib)
            drover("vm", "stop", vm, "--force")
            drover("vm", "delete", vm)
    return out


def libvirt_table(res, sizes, runs):
    """The issue's side-by-side table: libvirt save/restore beside Drover fast and classic."""
    rows = [("save command", "libvirt save", "host fast save", "host classic save"),
            ("restore command", "libvirt restore command", "host fast restore", "host classic restore"),
            ("restore start -> guest ticks again", "libvirt restore -> guest runs",
             "host fast restore -> guest ticks", "host classic restore -> guest ticks")]
    label = " / ".join(f"{s} MiB" if s < 1024 else f"{s // 1024} GiB" for s in sizes)
    print(f"\nbeside libvirt (medians of {runs} alternating runs, ms):")
    print(f"| {label} | libvirt `save`/`restore` | Drover fast | Drover `--classic` |\n|---|---|---|---|")
    for title, *keys in rows:
        print(f"| {title} | " + " | ".join(" / ".join(f"{res[s][k]:.0f}" for s in sizes) for k in keys) + " |")
    print("| fast state restorable / durable after | — | "
          + ", ".join(f"{res[s]['restorable after'] / 1000:.1f} / {res[s]['durable after'] / 1000:.1f} s" for s in sizes)
          + " | — |")


def across(runs, sizes):
    """Hibernate on one host, resume on the other: {size: {figure: median}}."""
    if os.geteuid() != 0:
        print("across hosts: skipped (needs root for network namespaces)")
        return {}
    tmp = passable_tmpdir("drover-sta.")
    env = dict(os.environ, DROVER_NETNS_ROOT=tmp, DROVER_CONFIG_DIR=f"{tmp}/config", DROVER_BIN_DIR=BIN,
               DROVER_IMAGE_DIR=IMAGES, DROVER_AGENT_BIN=AGENT, DROVER_NETNS_SET=SET, DROVER_NETNS_NET=NET)

    def netns(*cmd):
        r = subprocess.run([f"{ROOT}/scripts/netns-hosts.sh", *cmd], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"netns-hosts.sh {' '.join(cmd)}: {r.stderr}")

    def drover(host, *args):
        r = subprocess.run([f"{BIN}/drover", "--remote", f"{SET}{host}", *args], env=env,
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"drover --remote {SET}{host} {' '.join(args)}: {r.stderr}")
        return r.stdout

    out = {}
    netns("up", "2")
    try:
        print(f"across hosts ({SET}1 <-> {SET}2, offline move over TLS on a veth pair):")
        for size_mib in sizes:
            vm = f"x{size_mib}"
            fill = int(size_mib * 0.75)
            drover(1, "vm", "create", vm, "--memory", f"{size_mib}M")
            drover(1, "vm", "start", vm, "--wait")
            fill_ram(lambda script: drover(1, "vm", "exec", vm, "--timeout", "900", "--", "sh", "-c", script), fill)
            hib, move, res, ram_b, disk_b, state_b = [], [], [], [], [], []
            here = 1
            for i in range(runs):
                there = 3 - here
                t0 = time.monotonic()
                drover(here, "vm", "hibernate", vm)
                hib.append(time.monotonic() - t0)
                state_b.append(json.loads(drover(here, "--output", "json", "vm", "show", vm))["hibernation"]["bytes"])
                t0 = time.monotonic()
                m = json.loads(drover(here, "--output", "json", "vm", "migrate", vm, "--to", f"{SET}{there}", "--offline"))
                move.append(time.monotonic() - t0)
                # The state's files go as files (not in ram_bytes); disks through NBD.
                ram_b.append(state_b[-1] + m.get("ram_bytes", 0))
                disk_b.append(m.get("disk_bytes", 0))
                t0 = time.monotonic()
                drover(there, "vm", "resume", vm)
                res.append(time.monotonic() - t0)
                # The guest runs there with its memory as it was (checked outside the timing).
                ok = drover(there, "vm", "exec", vm, "--timeout", "900", "--", "sh", "-c",
                            "md5sum -c /tmp/fill.md5 && tail -c 67108864 /tmp/fill | cmp - /tmp/chunk && echo SAME")
                if "SAME" not in ok:
                    raise SystemExit(f"{vm}: the filled memory did not survive: {ok}")
                print(f"  {size_mib} MiB run {i + 1} ({SET}{here} -> {SET}{there}): hibernate {hib[-1] * 1000:.0f} ms "
                      f"(state {state_b[-1] / 1048576:.0f} MiB), move {move[-1] * 1000:.0f} ms "
                      f"({(ram_b[-1] + disk_b[-1]) / 1048576:.0f} MiB moved), resume there {res[-1] * 1000:.0f} ms")
                here = there
            med = lambda v: statistics.median(v)
            print(f"{size_mib} MiB ({fill} MiB of /dev/urandom blocks), medians of {runs}: hibernate {med(hib) * 1000:.0f} ms, "
                  f"move {med(move) * 1000:.0f} ms, resume there {med(res) * 1000:.0f} ms, "
                  f"hibernate -> running there {(med(hib) + med(move) + med(res)) * 1000:.0f} ms; "
                  f"{(med(ram_b) + med(disk_b)) / 1048576:.0f} MiB moved (state on disk {med(state_b) / 1048576:.0f} MiB)")
            out[size_mib] = {"hibernate": med(hib) * 1000, "move": med(move) * 1000, "resume there": med(res) * 1000,
                             "bytes moved": med(ram_b) + med(disk_b)}
            drover(here, "vm", "stop", vm, "--force")
            drover(here, "vm", "delete", vm)
    finally:
        r = subprocess.run([f"{ROOT}/scripts/netns-hosts.sh", "down", "--purge"], env=env,
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(f"netns-hosts.sh down: {r.stderr}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main():
    p = argparse.ArgumentParser(description="saving and restoring VM state, per QEMU version")
    p.add_argument("runs", nargs="?", type=int, default=5)
    p.add_argument("--qemu", default="both", help="system, both (system + QEMU 10), or an installation dir")
    p.add_argument("--sizes", default="512,2048", help="guest sizes in MiB (default 512,2048)")
    p.add_argument("--part", default="all", choices=["local", "across", "libvirt", "all"],
                   help="local saves/restores; hibernate -> resume on another host; local alternating with "
                        "libvirt's virsh save/restore; or all of them (default: libvirt's only where it can run)")
    a = p.parse_args()
    state_libvirt.exit_on_sigterm()
    sizes = [int(x) for x in a.sizes.split(",")]
    if a.part in ("across", "all"):
        across(a.runs, sizes)
    if a.part == "across":
        return
    why = state_libvirt.available() if a.part in ("libvirt", "all") else "not asked for"
    if why and a.part == "libvirt":
        raise SystemExit(f"beside libvirt: {why}")
    if why and a.part == "all":
        print(f"beside libvirt: skipped ({why})")
    results = []
    for v, d in qemu_installs(a.qemu):
        if why or d is not None:
            # libvirt drives the system's QEMU only (its <emulator>), so only that pass alternates.
            results.append((v, bench(a.runs, v, d, sizes)))
            continue
        with state_libvirt.Libvirtd() as virsh:
            print(f"beside libvirt {virsh.version()} (its own libvirtd in {virsh.tmp})")
            res = bench(a.runs, v, d, sizes, state_libvirt.Side(virsh, fill_ram))
        libvirt_table(res, sizes, a.runs)
        results.append((v, res))
    if len(results) > 1:
        print("\nside by side (medians, ms):")
        for size in sizes:
            print(f"  {size} MiB{'':21}" + "".join(f"{'QEMU ' + v:>14}" for v, _ in results))
            for k in results[0][1][size]:
                print(f"    {k:28}" + "".join(f"{r[size].get(k, float('nan')):>14.0f}" for _, r in results))


if __name__ == "__main__":
    main()
