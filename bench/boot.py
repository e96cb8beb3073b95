#!/usr/bin/env python3
"""bench/boot: time to a usable guest, Drover vs raw QEMU, same kernel, initramfs, shape, accel.

  drover: `drover vm start NAME --wait`, until the in-guest agent has answered the host; the
          moment the guest's /init printed its marker is recorded too (console log polled), so
          the management overhead and the agent's own start are reported apart
  raw:    qemu-system-x86_64 with PLATFORM.md's fastest command line, until /init prints
          DROVER-INIT-READY on the serial console

Raw QEMU boots twice per run: with `-cpu max` (PLATFORM.md's line) and with the named CPU model
droverd pins new VMs to (`Westmere`), so the CPU model's share of a difference shows apart.
Runs alternate (drover, raw, drover, raw, ...) so drift on the machine hits both alike; medians
and the ratio are printed, then droverd's RSS with 10 VMs defined and 2 running. Everything runs
once per QEMU installation (`--qemu both`: the system's, and QEMU 10 from target/qemu-10 or
/opt/drover-qemu10 when there), with a side-by-side table at the end.

Usage: bench/boot.py [RUNS] [--qemu system|both|DIR]   (default 15, both; needs
`PROFILE=release scripts/build.sh` first)

       bench/boot.py --debian [RUNS]   (default 5) the Debian 12 image (`drover image build
          --distro debian-12`, built if missing): `drover vm start --wait` vs raw QEMU with the
          same kernel, root loader, disk and command line, both until the packaged agent answers
          on port A (raw: a client on the org.drover.req socket gets the agent's first frame).
          Every boot gets a fresh copy of the image's disk (a first boot, the same for both).
"""
import argparse, json, os, shutil, statistics, subprocess, sys, time

from common import BIN, Droverd, count, poll, qemu_installs, raw_qemu_cmd

MARKER = b"DROVER-INIT-READY"


def count_markers(path):
    return count(path, MARKER)


def qemu_cpu_seconds(pid):
    """User + system CPU time a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench(runs, version, qemu_dir, rss):
    """One QEMU installation: medians {drover, marker, raw cpu...}."""
    qemu, firmware = raw_qemu_cmd(qemu_dir)
    with Droverd("drover-bench.", qemu_dir=qemu_dir) as drover:
        tmp, sock, daemon = drover.tmp, drover.sock, drover.proc
        image = json.loads(drover("--output", "json", "image", "show"))
        drover("vm", "create", "bench", "--cpus", "1", "--memory", "512M")
        vm = json.loads(drover("--output", "json", "vm", "show", "bench"))
        model = vm.get("platform", {}).get("cpu") or "max"
        machine = vm.get("platform", {}).get("machine") or "q35"
        cpus = ["max"] + ([model] if model != "max" else [])
        console = f"{tmp}/state/vms/bench/console.log"

        def drover_boot():
            before = count_markers(console)
            t0 = time.monotonic()
            p = subprocess.Popen([f"{BIN}/drover", "--socket", sock, "vm", "start", "bench", "--wait"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            t_marker = poll(lambda: count_markers(console) > before)
            p.wait()
            t_agent = time.monotonic()
            drover("vm", "stop", "bench", "--force")
            return t_agent - t0, t_marker - t0

        def raw_boot(cpu):
            d = f"{tmp}/raw"
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
            args = [*qemu, "-accel", "tcg", "-cpu", cpu, "-M", "q35",
                    "-bios", f"{firmware}/qboot.rom", "-smp", "1", "-m", "512",
                    "-nodefaults", "-no-user-config", "-display", "none", "-serial", f"file:{d}/console.log",
                    "-kernel", image["kernel"], "-initrd", image["initrd"],
                    "-append", image["manifest"]["default_cmdline"],
                    "-device", "virtio-serial-pci,id=vser0",
                    "-chardev", f"socket,id=req,path={d}/req.sock,server=on,wait=off",
                    "-device", "virtserialport,bus=vser0.0,chardev=req,name=org.drover.req",
                    "-chardev", f"socket,id=evt,path={d}/evt.sock,server=on,wait=off",
                    "-device", "virtserialport,bus=vser0.0,chardev=evt,name=org.drover.evt",
                    "-qmp", f"unix:{d}/qmp.sock,server=on,wait=off"]
            t0 = time.monotonic()
            q = subprocess.Popen(args)
            t = poll(lambda: count_markers(f"{d}/console.log") > 0)
            cpu_s = qemu_cpu_seconds(q.pid)
            q.kill()
            q.wait()
            raw_cpu[cpu].append(cpu_s)
            return t - t0

        print(f"QEMU {version}: boot to a usable guest, TCG, 1 vCPU, 512 MiB, {runs} runs each (alternating); "
              f"drover's VM: machine {machine}, cpu {model}")
        agent, marker, raw, raw_cpu = [], [], {c: [] for c in cpus}, {c: [] for c in cpus}
        for i in range(runs):
            a, m = drover_boot()
            agent.append(a); marker.append(m)
            for c in cpus:
                raw[c].append(raw_boot(c))
            print(f"  run {i + 1}: drover agent ready {a:.3f} s (its /init marker at {m:.3f} s)   raw marker "
                  + ", ".join(f"-cpu {c} {raw[c][-1]:.3f} s" for c in cpus))
        ma, mm = statistics.median(agent), statistics.median(marker)
        mr = {c: statistics.median(v) for c, v in raw.items()}
        same = mr.get(model, mr["max"])
        print(f"median: drover start --wait {ma:.3f} s, raw QEMU to /init marker "
              + ", ".join(f"-cpu {c} {v:.3f} s" for c, v in mr.items())
              + f"; ratio to raw with the same CPU {ma / same:.3f} (goal <= 1.05)")
        print(f"        drover to the same marker {mm:.3f} s (ratio {mm / same:.3f}); marker to agent answering {ma - mm:.3f} s")
        mc = {c: statistics.median(v) for c, v in raw_cpu.items()}
        print("        raw QEMU CPU time to the marker (user+sys, less sensitive to load than wall time): "
              + ", ".join(f"-cpu {c} {v:.3f} s" for c, v in mc.items()))

        if rss:
            for i in range(1, 10):
                drover("vm", "create", f"idle{i}", "--memory", "256M")
            drover("vm", "start", "bench", "--wait")
            drover("vm", "start", "idle1", "--wait")
            with open(f"/proc/{daemon.pid}/status") as f:
                kib = next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))
            print(f"droverd RSS with 10 VMs defined, 2 running: {kib / 1024:.1f} MiB")
            drover("vm", "stop", "bench", "--force")
            drover("vm", "stop", "idle1", "--force")
        return {"drover": ma, "marker": mm, **{f"raw -cpu {c}": v for c, v in mr.items()},
                **{f"raw -cpu {c}, QEMU CPU s": v for c, v in mc.items()}, "model": model}


def agent_hello(path):
    """Connect to a VM's port A socket and return once the agent has sent its first bytes."""
    import socket
    poll(lambda: os.path.exists(path), 30)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(path)
    c.settimeout(600)
    c.recv(1)
    c.close()


def debian(runs):
    with Droverd("drover-bench.") as drover:
        tmp, sock = drover.tmp, drover.sock
        image = json.loads(drover("--output", "json", "image", "build", "--distro", "debian-12"))

        def drover_boot():
            # A fresh thin clone of the image each run, as a user's new VM: a first boot.
            subprocess.run([f"{BIN}/drover", "--socket", sock, "vm", "delete", "deb", "--force"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            drover("vm", "create", "deb", "--from-image", "debian-12", "--memory", "1G", "--nic", "user", "--seed")
            t0 = time.monotonic()
            subprocess.run([f"{BIN}/drover", "--socket", sock, "vm", "start", "deb", "--wait", "--wait-timeout", "600"],
                           check=True, stdout=subprocess.DEVNULL)
            t = time.monotonic() - t0
            drover("vm", "stop", "deb", "--force")
            return t

        def raw_boot():
            d = f"{tmp}/raw"
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
            shutil.copyfile(image["disk"], f"{d}/disk.qcow2")
            args = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-M", "q35",
                    "-bios", "/usr/share/qemu/qboot.rom", "-smp", "1", "-m", "1024",
                    "-nodefaults", "-no-user-config", "-display", "none", "-serial", f"file:{d}/console.log",
                    "-kernel", image["kernel"], "-initrd", image["initrd"], "-append", image["cmdline"],
                    "-drive", f"file={d}/disk.qcow2,if=none,id=d0,format=qcow2", "-device", "virtio-blk-pci,drive=d0",
                    "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0",
                    "-device", "virtio-serial-pci,id=vser0",
                    "-chardev", f"socket,id=req,path={d}/req.sock,server=on,wait=off",
                    "-device", "virtserialport,bus=vser0.0,chardev=req,name=org.drover.req",
                    "-chardev", f"socket,id=evt,path={d}/evt.sock,server=on,wait=off",
                    "-device", "virtserialport,bus=vser0.0,chardev=evt,name=org.drover.evt"]
            t0 = time.monotonic()
            q = subprocess.Popen(args)
            agent_hello(f"{d}/req.sock")
            t = time.monotonic() - t0
            q.kill()
            q.wait()
            return t

        print(f"Debian 12 boot to the packaged agent answering, TCG, 1 vCPU, 1 GiB, {runs} runs each (alternating)")
        dr, rw = [], []
        for i in range(runs):
            a = drover_boot()
            r = raw_boot()
            dr.append(a); rw.append(r)
            print(f"  run {i + 1}: drover start --wait {a:.2f} s   raw QEMU to agent hello {r:.2f} s")
        md, mr = statistics.median(dr), statistics.median(rw)
        print(f"median: drover {md:.2f} s, raw QEMU {mr:.2f} s, ratio {md / mr:.3f}")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--debian":
        return debian(int(sys.argv[2]) if len(sys.argv) > 2 else 5)
    p = argparse.ArgumentParser(description="boot to a usable guest, Drover vs raw QEMU, per QEMU version")
    p.add_argument("runs", nargs="?", type=int, default=15)
    p.add_argument("--qemu", default="both", help="system, both (system + QEMU 10), or an installation dir")
    a = p.parse_args()
    results = []
    for i, (version, d) in enumerate(qemu_installs(a.qemu)):
        results.append((version, bench(a.runs, version, d, rss=i == 0)))
    if len(results) > 1:
        print("\nside by side (medians, s):")
        keys = [k for k in results[0][1] if k != "model"]
        print(f"  {'':36}" + "".join(f"{'QEMU ' + v:>14}" for v, _ in results))
        for k in keys:
            print(f"  {k:36}" + "".join(f"{r.get(k, float('nan')):>14.3f}" for _, r in results))


if __name__ == "__main__":
    main()
