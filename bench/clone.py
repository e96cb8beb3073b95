#!/usr/bin/env python3
"""bench/clone: instant clones of a saved state, against booted VMs.

One template (MEM MiB, default 512, RAM 75 % filled from /dev/urandom in its /tmp) is booted and
a fast state of it saved. Then:

  latency   COUNT clones (default 20), one `drover vm clone tpl/warm m-I` each: wall time of the
            CLI, which returns once the clone's agent has answered with its new identity applied
            (hostname, machine-id, MAC). droverd's log (debug) splits each into: to QEMU running
            the restored guest (`running_ms`), waiting for the agent's first hello (`ready_ms`),
            the agent applying the identity (`applied_ms`). Medians and all runs printed.
  memory    the COUNT clones running (after SETTLE s), against COUNT booted VMs of the same size
            (`vm start --wait`, optionally with --fill-booted each filling its RAM the same way):
            RSS and PSS summed over the QEMU processes (/proc/PID/smaps_rollup), their private
            memory, and the state's memory file in /dev/shm the clones share (counted once).

Usage: bench/clone.py [COUNT] [--memory MIB] [--settle S] [--no-booted] [--fill-booted]
(needs `PROFILE=release scripts/build.sh` and `scripts/image-build.sh` first)
"""
import argparse, json, os, re, statistics, time

from common import Droverd, poll


def smaps(pid):
    """{field: kB} of /proc/PID/smaps_rollup."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            m = re.match(r"(\w+):\s+(\d+) kB", line)
            if m:
                out[m.group(1)] = int(m.group(2))
    return out


def memory_of(drover, names):
    """Summed MiB over the VMs' QEMUs: rss, pss, private (clean + dirty)."""
    tot = {"rss": 0, "pss": 0, "private": 0}
    for n in names:
        pid = json.loads(drover("--output", "json", "vm", "show", n))["pid"]
        s = smaps(pid)
        tot["rss"] += s.get("Rss", 0)
        tot["pss"] += s.get("Pss", 0)
        tot["private"] += s.get("Private_Clean", 0) + s.get("Private_Dirty", 0)
    return {k: v / 1024 for k, v in tot.items()}


def main():
    p = argparse.ArgumentParser(description="instant clones vs booted VMs")
    p.add_argument("count", nargs="?", type=int, default=20)
    p.add_argument("--memory", type=int, default=512, help="template memory in MiB")
    p.add_argument("--settle", type=float, default=5.0, help="seconds before reading memory")
    p.add_argument("--no-booted", action="store_true", help="skip the booted VMs")
    p.add_argument("--fill-booted", action="store_true", help="fill each booted VM's RAM like the template's")
    a = p.parse_args()
    fill = int(a.memory * 0.75)
    fill_cmd = (f"mount -o remount,size=95% /tmp; "
                f"dd if=/dev/urandom of=/tmp/fill bs=1M count={fill} 2>/dev/null; sync")
    with Droverd("drover-cl.", log="info,drover_host=debug") as drover:
        drover("vm", "create", "tpl", "--memory", f"{a.memory}M", "--disk", "size=64M,id=data", "--nic", "user")
        drover("vm", "start", "tpl", "--wait")
        drover("vm", "exec", "tpl", "--timeout", "600", "--", "sh", "-c", fill_cmd)
        drover("snapshot", "create", "tpl", "--name", "warm")
        poll(lambda: json.loads(drover("--output", "json", "snapshot", "show", "tpl", "warm"))["phase"] == "durable",
             600, 0.05)
        wall, running, agent = [], [], []
        names = [f"m-{i + 1}" for i in range(a.count)]
        for n in names:
            t0 = time.monotonic()
            r = json.loads(drover("--output", "json", "vm", "clone", "tpl/warm", n))
            wall.append((time.monotonic() - t0) * 1000)
            c = r["clones"][0]
            if c.get("identity_error"):
                raise SystemExit(f"{n}: {c['identity_error']}")
            running.append(c["running_ms"])
            agent.append(c["agent_ms"])
            print(f"  {n}: CLI {wall[-1]:.0f} ms; running {c['running_ms']} ms, agent with new identity {c['agent_ms']} ms")
        log = open(drover.log_path).read()
        ready = [int(x) for x in re.findall(r"took its identity.*?ready_ms=(\d+)", log)]
        applied = [int(x) for x in re.findall(r"took its identity.*?applied_ms=(\d+)", log)]
        med = statistics.median
        print(f"{a.count} clones of a {a.memory} MiB template ({fill} MiB of it random), medians: "
              f"vm clone -> agent answered with its identity {med(wall):.0f} ms (CLI wall; min {min(wall):.0f}, max {max(wall):.0f}); "
              f"droverd: to running {med(running):.0f} ms, then agent hello {med(ready):.0f} ms, "
              f"then identity applied {med(applied):.0f} ms")
        time.sleep(a.settle)
        cm = memory_of(drover, names)
        ram_dir = [d for d in os.listdir("/dev/shm") if d.startswith("drover-")]
        state_file = 0
        for d in ram_dir:
            f = f"/dev/shm/{d}/tpl@s1"
            if os.path.exists(f):
                state_file = os.stat(f).st_blocks * 512 / 1048576
        print(f"{a.count} clones: RSS {cm['rss']:.0f} MiB, PSS {cm['pss']:.0f} MiB, private {cm['private']:.0f} MiB "
              f"(+ the state's memory file, {state_file:.0f} MiB in /dev/shm, shared by all); "
              f"host memory for the clones ~{cm['private'] + state_file:.0f} MiB, {(cm['private'] + state_file) / a.count:.0f} MiB each")
        for n in names:
            drover("vm", "delete", "--force", n)
        if not a.no_booted:
            booted = [f"b-{i + 1}" for i in range(a.count)]
            t0 = time.monotonic()
            for n in booted:
                drover("vm", "create", n, "--memory", f"{a.memory}M", "--disk", "size=64M,id=data", "--nic", "user")
                drover("vm", "start", n)
            for n in booted:
                poll(lambda: (json.loads(drover("--output", "json", "vm", "show", n)).get("agent") or {}).get("ready"),
                     600, 0.2)
            print(f"{a.count} booted VMs up (agents answering) after {time.monotonic() - t0:.0f} s (started together)")
            if a.fill_booted:
                for n in booted:
                    drover("vm", "exec", n, "--timeout", "600", "--", "sh", "-c", fill_cmd)
            time.sleep(a.settle)
            bm = memory_of(drover, booted)
            print(f"{a.count} booted VMs{' (filled)' if a.fill_booted else ' (idle after boot)'}: RSS {bm['rss']:.0f} MiB, "
                  f"PSS {bm['pss']:.0f} MiB, private {bm['private']:.0f} MiB; their RAM files are their own, "
                  f"so PSS is their host memory: {bm['pss'] / a.count:.0f} MiB each")
            print(f"clones / booted, host memory: {(cm['private'] + state_file) / bm['pss']:.2f}x")
            for n in booted:
                drover("vm", "delete", "--force", n)


if __name__ == "__main__":
    main()
