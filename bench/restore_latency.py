#!/usr/bin/env python3
"""bench/restore_latency: where a fast restore's time goes, from the command to the guest running.

One guest (MEM MiB, default 512, RAM 75 % filled from /dev/urandom) prints `tick N` on its serial
console every ~20 ms (a shell loop of builtins, as bench/state.py's libvirt comparison uses).
Each run saves a fast state and restores it; timed from the restore's start:

  command   `drover snapshot restore` returns (the CLI's wall time)
  ticks     the restored guest's first tick is on the console (numbered at most the last the
            replaced guest printed, so it is the restored guest's and not the old one's)

Each state is restorable before its restore starts (the first is a copy; later ones, of a guest
running on a restored state's memory, stream, and a restore waits until that is done).

and droverd's debug log splits each restore into its steps (`restore_phases`). Medians of RUNS.

Usage: bench/restore_latency.py [RUNS] [--memory MIB] [--qemu-dir DIR]
(needs `PROFILE=release scripts/build.sh` and `scripts/image-build.sh` first)
"""
import argparse, json, re, statistics, time

from common import Droverd, poll
from state import filled_guest
import state_libvirt


def main():
    p = argparse.ArgumentParser(description="a fast restore's time to the guest running, by step")
    p.add_argument("runs", nargs="?", type=int, default=7)
    p.add_argument("--memory", type=int, default=512, help="guest memory in MiB")
    p.add_argument("--qemu-dir", default=None, help="a QEMU installation (default: the system's)")
    a = p.parse_args()
    with Droverd("drover-rl.", log="info,drover_host=debug", qemu_dir=a.qemu_dir) as drover:
        vm = "rl"
        sh = filled_guest(drover, vm, a.memory)
        sh(state_libvirt.TICKER)
        time.sleep(0.5)
        console = f"{drover.tmp}/state/vms/{vm}/console.log"
        if state_libvirt.last_tick(console)[1] is None:
            raise SystemExit(f"the ticker prints nothing on the console ({console})")
        command, ticks = [], []
        for i in range(a.runs):
            drover("snapshot", "create", vm, "--name", f"r{i}")
            # After the first restore the guest runs on a state's memory and its saves stream:
            # a restore started before the stream is done waits for it, which is not timed here.
            poll(lambda: json.loads(drover("--output", "json", "snapshot", "show", vm, f"r{i}"))["phase"]
                 in ("ready", "durable"), 600, 0.02)
            time.sleep(0.3)
            start, last = state_libvirt.last_tick(console)
            watch = state_libvirt.TickWatch(console, start, below=last)
            t0 = time.monotonic()
            drover("snapshot", "restore", vm, f"r{i}")
            command.append((time.monotonic() - t0) * 1000)
            ticks.append((watch.wait() - t0) * 1000)
            print(f"  run {i + 1}: command {command[-1]:.0f} ms, guest ticks {ticks[-1]:.0f} ms")
            time.sleep(1.0)
            # On disk first: droverds before 2026-12-03 reused a deleted state's id, and the
            # deleted state's write-out then overwrote the next save's record.
            poll(lambda: json.loads(drover("--output", "json", "snapshot", "show", vm, f"r{i}"))["phase"]
                 == "durable", 600, 0.05)
            drover("snapshot", "delete", vm, f"r{i}")
        log = open(drover.log_path).read()
        phases = {}
        for what in ("restore_phases", "stop_phases", "exit_phases", "launch_phases.*restore=true"):
            for line in [l for l in log.splitlines() if re.search(what, l)][-a.runs:]:
                for k, v in re.findall(r"(\w+_ms)=(\d+)", line):
                    phases.setdefault(k, []).append(int(v))
        med = statistics.median
        print(f"{a.memory} MiB ({int(a.memory * 0.75)} MiB random), medians of {a.runs}: "
              f"restore command {med(command):.0f} ms, guest ticks again {med(ticks):.0f} ms")
        if phases:
            print("droverd's steps (medians, ms): " + ", ".join(f"{k[:-3]} {med(v):.0f}" for k, v in phases.items()))


if __name__ == "__main__":
    main()
