#!/usr/bin/env python3
"""bench/live-change: from `drover vm attach NAME disk` to the disk visible inside the guest,
side by side with the same sequence done by hand on raw QEMU (qemu-img create, then QMP
blockdev-add + device_add onto a free pcie-root-port).

"Visible inside the guest" is the same signal for both: the guest image's uevent handler prints
`drover-uevent: block add vdX` on the serial console when the kernel has the disk; the console
file is polled every 2 ms. Runs alternate drover/raw. Also reported: droverd's durable record
commit (the journal write) per change, from its debug log.

Usage: bench/live_change.py [RUNS]   (default 11; needs `PROFILE=release scripts/build.sh` first)
"""
import json, os, re, socket, statistics, subprocess, sys, time

from common import Droverd, Qmp, count, poll


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 11
    raw = None
    with Droverd("drover-lc.", log="warn,drover_host=debug") as drover:
        tmp, log = drover.tmp, drover.log
        image = json.loads(drover("--output", "json", "image", "show"))
        drover("vm", "create", "lc", "--memory", "512M")
        drover("vm", "start", "lc", "--wait")
        console = f"{tmp}/state/vms/lc/console.log"

        rd = f"{tmp}/raw"
        os.makedirs(rd)
        args = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-M", "q35", "-bios", "/usr/share/qemu/qboot.rom",
                "-smp", "1", "-m", "512", "-nodefaults", "-no-user-config", "-display", "none",
                "-serial", f"file:{rd}/console.log", "-kernel", image["kernel"], "-initrd", image["initrd"],
                "-append", image["manifest"]["default_cmdline"], "-qmp", f"unix:{rd}/qmp.sock,server=on,wait=off"]
        for i in range(4):
            args += ["-device", f"pcie-root-port,id=hp{i},chassis={i + 1},bus=pcie.0"]
        raw = subprocess.Popen(args)
        qmp = Qmp(f"{rd}/qmp.sock")
        poll(lambda: count(f"{rd}/console.log", b"DROVER-INIT-READY") > 0, 60)
        time.sleep(1.0)

        def drover_attach(i):
            before = count(console, b"drover-uevent: block add")
            t0 = time.monotonic()
            drover("vm", "attach", "lc", "disk", "--id", f"d{i}", "--size", "16M")
            t_cli = time.monotonic()
            t = poll(lambda: count(console, b"drover-uevent: block add") > before)
            drover("vm", "detach", "lc", f"d{i}")
            return t - t0, t_cli - t0

        def raw_attach(i):
            before = count(f"{rd}/console.log", b"drover-uevent: block add")
            path = f"{rd}/r{i}.qcow2"
            t0 = time.monotonic()
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "16M"], check=True)
            t_img = time.monotonic()
            qmp("blockdev-add", **{"driver": "qcow2", "node-name": f"r{i}", "file": {"driver": "file", "filename": path}})
            qmp("device_add", driver="virtio-blk-pci", id=f"r{i}", drive=f"r{i}", serial=f"r{i}", bus="hp0")
            t = poll(lambda: count(f"{rd}/console.log", b"drover-uevent: block add") > before)
            qmp("device_del", id=f"r{i}")
            poll(lambda: count(f"{rd}/console.log", b"drover-uevent: block remove") > i)
            time.sleep(0.2)
            qmp("blockdev-del", **{"node-name": f"r{i}"})
            return t - t0, t - t_img

        print(f"live disk attach until the guest kernel has it, TCG, 512 MiB guest, {runs} runs each")
        d_all, d_cli, r_all, r_qmp = [], [], [], []
        for i in range(runs):
            a, c = drover_attach(i)
            b, q = raw_attach(i)
            d_all.append(a); d_cli.append(c); r_all.append(b); r_qmp.append(q)
            print(f"  run {i + 1}: drover {a * 1000:.0f} ms (CLI answered at {c * 1000:.0f} ms)   "
                  f"raw {b * 1000:.0f} ms (of which QMP to guest {q * 1000:.0f} ms)")
        md, mr, mq = statistics.median(d_all), statistics.median(r_all), statistics.median(r_qmp)
        print(f"median: drover attach {md * 1000:.0f} ms, raw qemu-img + QMP {mr * 1000:.0f} ms, "
              f"ratio {md / mr:.2f} (goals: <= 300 ms, <= 1.2x); raw QMP alone {mq * 1000:.0f} ms")
        log.flush()
        us = [int(m) for m in re.findall(r"record committed.*?us=(\d+)", open(f"{tmp}/droverd.log").read())]
        if us:
            print(f"journal: durable record commit per change, median {statistics.median(us) / 1000:.2f} ms over {len(us)} commits")
        if raw:
            raw.kill()
            raw.wait()


if __name__ == "__main__":
    main()
