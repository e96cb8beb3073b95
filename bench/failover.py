#!/usr/bin/env python3
"""bench/failover: seconds from a host's loss until its service is available again.

A cluster of its own (`scripts/cluster.sh up 3`: a 3-member etcd, 3 droverd hosts in network
namespaces, 2 controllers; lease TTL 3 s), one service `fo` of 6 stateless VMs (cpus 1, 256 MiB,
strategy spread: 2 per host, the minimal image). Each run kills the host with the most members
(`cluster.sh kill-host`: veth cut, droverd and its QEMUs SIGKILLed) and polls every 100 ms:

  down       the host shows `down` in `drover host list` (its lease expired)
  placed     no member is assigned to the lost host any more (the controller re-placed them)
  available  `drover service show fo` says available: every member runs elsewhere, agent ready

all measured from the kill. The host is then brought back (`cluster.sh up 3`) and the next run
starts once the service is available and every host up. Medians and every run are printed.

Usage: sudo bench/failover.py [RUNS] [--ttl S]  (default 3 runs, TTL 3 s)
Needs root, iproute2, etcd (scripts/install-deps.sh), `scripts/build.sh` and `scripts/image-build.sh`.
DROVER_NETNS_SET / DROVER_NETNS_NET pick the namespace set (default fo on 10.87.0).
"""
import argparse, json, os, shutil, statistics, subprocess, sys, time

from common import AGENT, BIN, IMAGES, ROOT, passable_tmpdir

SET = os.environ.get("DROVER_NETNS_SET", "fo")
NET = os.environ.get("DROVER_NETNS_NET", "10.87.0")

SERVICE = """name = "fo"
strategy = "spread"
[[app]]
name = "web"
cpus = 1
memory = "256M"
replicas = 6
"""


class Cluster:
    def __init__(self, ttl):
        self.tmp = passable_tmpdir("drv-fo-")
        self.env = dict(os.environ, DROVER_NETNS_SET=SET, DROVER_NETNS_NET=NET, DROVER_NETNS_ROOT=self.tmp,
                        DROVER_CONFIG_DIR=f"{self.tmp}/cfg", DROVER_BIN_DIR=BIN, DROVER_IMAGE_DIR=IMAGES,
                        DROVER_AGENT_BIN=AGENT, DROVER_CLUSTER_TTL=str(ttl))

    def script(self, *args):
        r = subprocess.run([f"{ROOT}/scripts/cluster.sh", *args], env=self.env, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"cluster.sh {' '.join(args)}: {r.stderr}")
        return r.stdout

    def drover(self, *args, check=True):
        r = subprocess.run([f"{BIN}/drover", "--output", "json", *args], env=self.env, capture_output=True,
                           text=True)
        if check and r.returncode not in (0, 4):
            raise SystemExit(f"drover {' '.join(args)}: {r.stderr}")
        return json.loads(r.stdout) if r.stdout.strip() else None

    def show(self):
        return self.drover("service", "show", "fo")

    def hosts(self):
        return {h["inventory"]["name"]: h["status"] for h in self.drover("host", "list")}

    def __enter__(self):
        self.script("up", "3")
        return self

    def __exit__(self, *exc):
        subprocess.run([f"{ROOT}/scripts/cluster.sh", "down"], env=self.env, capture_output=True)
        shutil.rmtree(self.tmp, ignore_errors=True)


def wait(pred, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


def one_run(c):
    v = c.show()
    per_host = {}
    for m in v["members"]:
        per_host.setdefault(m["host"], []).append(m["name"])
    lost = max(sorted(per_host), key=lambda h: len(per_host[h]))
    c.script("kill-host", lost)
    t0 = time.monotonic()
    marks = {}
    while "available" not in marks:
        now = time.monotonic() - t0
        if "down" not in marks and c.hosts().get(lost) == "down":
            marks["down"] = now
        v = c.show()
        if "placed" not in marks and all(m["host"] != lost for m in v["members"]):
            marks["placed"] = now
        if v["available"] and "placed" in marks:
            marks["available"] = now
        if now > 180:
            raise SystemExit(f"fo not available 180 s after {lost} was lost: {json.dumps(v)}")
        time.sleep(0.1)
    marks.setdefault("down", marks["placed"])
    marks["members"] = len(per_host[lost])
    marks["host"] = lost
    # Back to three hosts before the next run.
    c.script("up", "3")
    wait(lambda: all(s == "up" for s in c.hosts().values()), 60, "every host up")
    wait(lambda: c.show()["available"], 120, "fo available")
    return marks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="?", type=int, default=3)
    ap.add_argument("--ttl", type=int, default=3)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/failover needs root (network namespaces)")
    with Cluster(a.ttl) as c:
        path = f"{c.tmp}/fo.toml"
        with open(path, "w") as f:
            f.write(SERVICE)
        c.drover("service", "apply", "-f", path)
        t = time.monotonic()
        wait(lambda: c.show()["available"], 240, "fo available")
        print(f"6 members available {time.monotonic() - t:.1f} s after apply (lease TTL {a.ttl} s)")
        runs = []
        for i in range(a.runs):
            m = one_run(c)
            runs.append(m)
            print(f"run {i + 1}: lost {m['host']} with {m['members']} members: down {m['down']:.1f} s, "
                  f"re-placed {m['placed']:.1f} s, available {m['available']:.1f} s", flush=True)
        med = lambda k: statistics.median(r[k] for r in runs)
        print(f"median of {len(runs)}: down {med('down'):.1f} s, re-placed {med('placed'):.1f} s, "
              f"available {med('available'):.1f} s (goal <= 10 s: {'met' if med('available') <= 10 else 'not met'})")


if __name__ == "__main__":
    main()
