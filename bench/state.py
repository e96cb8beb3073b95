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
  host fast      `drover snapshot create` / `drover snapshot restore` (CLI round trips)
  host classic   the same with --classic (RAM in QEMU's migration stream, as plain QEMU saves)
Times from the host include starting the guest command through `drover vm exec` (~20-40 ms).

Everything runs once per QEMU installation (`--qemu both`: the system's, and QEMU 10 from
target/qemu-10 or /opt/drover-qemu10 when there), with a side-by-side table at the end.

Usage: bench/state.py [RUNS] [--qemu system|both|DIR] [--sizes 512,2048]   (default 5, both;
needs `PROFILE=release scripts/build.sh` first)
"""
import argparse, json, os, statistics, sys, time

from common import Droverd, count, poll, qemu_installs


def bench(runs, version, qemu_dir, sizes):
    """One QEMU installation: {size: {figure: median ms}}."""
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
            sh(vm, f"echo 'export DROVER_PRINCIPAL=bench DROVER_SECRET={secret}' > /tmp/cred; "
                   f"mount -o remount,size=95% /tmp; yes drover-fills-ram | head -c {fill * 1048576} > /tmp/fill")
            sh(vm, "(drover-guest listen --app-id bench > /dev/console 2>&1 &); sleep 0.5")
            gsave, grest, hsave, hrest, csave, crest = [], [], [], [], [], []
            ready, durable, paused_log = [], [], []

            def phase(name):
                return json.loads(drover("--output", "json", "snapshot", "show", vm, name))["phase"]

            def wait_phase(name, t0):
                """Seconds from t0 until the state is restorable, and until it is on disk."""
                r = poll(lambda: phase(name) in ("ready", "durable"), 600, 0.02) - t0
                d = poll(lambda: phase(name) == "durable", 600, 0.02) - t0
                return r, d
            for i in range(runs):
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
                    t0 = time.monotonic()
                    drover("snapshot", "restore", vm, name)
                    restores.append(time.monotonic() - t0)
                    time.sleep(0.3)
                for name in (f"g{i}", f"h{i}", f"c{i}"):
                    drover("snapshot", "delete", vm, name)
                print(f"  {size_mib} MiB run {i + 1}: guest save {gsave[-1] * 1000:.0f} ms (restorable {ready[-1]:.1f} s, "
                      f"durable {durable[-1]:.1f} s), guest restore {grest[-1] * 1000:.0f} ms, "
                      f"host fast {hsave[-1] * 1000:.0f}/{hrest[-1] * 1000:.0f} ms, classic {csave[-1] * 1000:.0f}/{crest[-1] * 1000:.0f} ms")
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
            out[size_mib] = {
                "guest paused, fast save": paused["fast"],
                "guest paused, classic save": paused["classic"],
                "host fast save": m(hsave), "host fast restore": m(hrest),
                "host classic save": m(csave), "host classic restore": m(crest),
                "guest save -> saved event": m(gsave), "guest restore -> listener": m(grest),
                "restorable after": statistics.median(ready) * 1000,
                "durable after": statistics.median(durable) * 1000,
            }
            drover("vm", "stop", vm, "--force")
            drover("vm", "delete", vm)
    return out


def main():
    p = argparse.ArgumentParser(description="saving and restoring VM state, per QEMU version")
    p.add_argument("runs", nargs="?", type=int, default=5)
    p.add_argument("--qemu", default="both", help="system, both (system + QEMU 10), or an installation dir")
    p.add_argument("--sizes", default="512,2048", help="guest sizes in MiB (default 512,2048)")
    a = p.parse_args()
    sizes = [int(x) for x in a.sizes.split(",")]
    results = [(v, bench(a.runs, v, d, sizes)) for v, d in qemu_installs(a.qemu)]
    if len(results) > 1:
        print("\nside by side (medians, ms):")
        for size in sizes:
            print(f"  {size} MiB{'':21}" + "".join(f"{'QEMU ' + v:>14}" for v, _ in results))
            for k in results[0][1][size]:
                print(f"    {k:28}" + "".join(f"{r[size][k]:>14.0f}" for _, r in results))


if __name__ == "__main__":
    main()
