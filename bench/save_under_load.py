#!/usr/bin/env python3
"""bench/save_under_load: does `auto` keep a save's pause within its budget on a busy host?

`drover snapshot create` (capture `auto`) copies a guest's memory while the guest is paused when
the copy fits droverd's 1 s budget, and streams it otherwise. The choice uses a copy rate; this
benchmark saves the same guest on an idle host and on a busy one, alternately, and reports each
save's capture and pause as droverd recorded them.

  guest   MEM MiB (default 2048), RAM 75 % filled from /dev/urandom (bench/state.py's fill_ram)
  busy    LOAD processes burning CPU and memory bandwidth on the host (`sha256sum /dev/zero`,
          default 2: one per core here) started 1 s before the save and stopped after it
  runs    RUNS saves, idle and busy alternating, each deleted once it is on disk

Compare droverds by DROVER_BIN_DIR (one directory each, sessions alternated by hand).

Usage: bench/save_under_load.py [RUNS] [--memory MIB] [--load N] [--qemu-dir DIR]
(needs `PROFILE=release scripts/build.sh` and `scripts/image-build.sh` first)
"""
import argparse, json, re, statistics, subprocess, time

from common import Droverd, poll
from state import filled_guest


def main():
    p = argparse.ArgumentParser(description="a save's capture and pause on an idle and a busy host")
    p.add_argument("runs", nargs="?", type=int, default=10)
    p.add_argument("--memory", type=int, default=2048, help="guest memory in MiB")
    p.add_argument("--load", type=int, default=2, help="CPU burners while busy")
    p.add_argument("--qemu-dir", default=None, help="a QEMU installation (default: the system's)")
    a = p.parse_args()
    with Droverd("drover-sl.", log="info,drover_host=debug", qemu_dir=a.qemu_dir) as drover:
        vm = "sl"
        filled_guest(drover, vm, a.memory)
        seen = {"idle": [], "busy": []}
        for i in range(a.runs):
            kind = "busy" if i % 2 else "idle"
            burners = []
            if kind == "busy":
                burners = [subprocess.Popen(["sha256sum", "/dev/zero"]) for _ in range(a.load)]
                time.sleep(1.0)
            try:
                drover("snapshot", "create", vm, "--name", f"u{i}")
            finally:
                for b in burners:
                    b.kill()
                    b.wait()
            st = json.loads(drover("--output", "json", "snapshot", "show", vm, f"u{i}"))
            seen[kind].append((st.get("capture"), st["paused_ms"]))
            print(f"  run {i + 1} ({kind}): capture {st.get('capture')}, paused {st['paused_ms']} ms")
            poll(lambda: json.loads(drover("--output", "json", "snapshot", "show", vm, f"u{i}"))["phase"]
                 == "durable", 600, 0.05)
            drover("snapshot", "delete", vm, f"u{i}")
            time.sleep(1.0)
        rates = [int(r) for r in re.findall(r"memory copy rate measured.*?rate=(\d+)", open(drover.log_path).read())]
        print(f"{a.memory} MiB ({int(a.memory * 0.75)} MiB random), {a.load} burners when busy:")
        for kind, runs in seen.items():
            if not runs:
                continue
            ms = [m for _, m in runs]
            caps = ", ".join(f"{c} {sum(1 for x, _ in runs if x == c)}" for c in sorted({str(x) for x, _ in runs}))
            over = sum(1 for m in ms if m > 1000)
            print(f"  {kind}: pause median {statistics.median(ms):.0f} ms, max {max(ms)} ms, "
                  f"over 1 s {over} of {len(ms)}; captures: {caps}")
        if rates:
            print(f"  rates measured before saves: {', '.join(f'{r / 1e6:.0f} MB/s' for r in rates)}")


if __name__ == "__main__":
    main()
