#!/usr/bin/env python3
"""bench/mapped_ram: a classic save (RAM in QEMU's migration stream, to a file on disk) and its
restore, by stream kind, on each QEMU installation.

  exec       `migrate exec:cat > FILE` / `migrate-incoming exec:cat FILE`: what Drover's
             `snapshot create --classic` does (QEMU 7.2 rejects `file:` URIs)
  file       `migrate file:FILE` (QEMU >= 8.2)
  mapped-ram `file:FILE` with the `mapped-ram` capability (QEMU >= 9.0): each RAM page at a fixed
             offset of the file, written and read with pwrite/pread instead of a stream
  mapped-ram+multifd  the same with `multifd` (2 channels): several threads write and read RAM

No guest: QEMU starts paused (q35, RAM in a memory-backend-file in /dev/shm as droverd gives it),
and the bench writes FILL of that RAM file itself (distinct non-zero pages), so every run moves the
same bytes. Time: from the QMP command to query-migrate saying completed (save), and from
migrate-incoming to completed (restore). Medians of RUNS.

Usage: bench/mapped_ram.py [RUNS] [--qemu system|both|DIR] [--mib 2048]   (default 3, both)
"""
import argparse, os, shutil, statistics, subprocess, tempfile, time

from common import Qmp, qemu_installs, raw_qemu_cmd

FILL = 0.75


def fill(path, mib):
    """Write FILL of the RAM file with incompressible data: 64 MiB from /dev/urandom, repeated
    (no page is zero or like its neighbours; repeats lie beyond any compressor's window)."""
    chunk = os.urandom(64 << 20)
    left = int(mib * FILL) << 20
    with open(path, "r+b") as f:
        while left > 0:
            n = min(left, len(chunk))
            f.write(chunk[:n])
            left -= n


def start(qemu, work, tag, ram, mib, incoming=False):
    d = f"{work}/{tag}"
    os.makedirs(d, exist_ok=True)
    args = [*qemu, "-accel", "tcg", "-machine", "q35", "-m", f"{mib}M", "-nodefaults", "-display", "none",
            "-object", f"memory-backend-file,id=ram0,size={mib}M,mem-path={ram},share=on",
            "-machine", "memory-backend=ram0", "-S", "-qmp", f"unix:{d}/qmp.sock,server=on,wait=off"]
    if incoming:
        args += ["-incoming", "defer"]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return p, Qmp(f"{d}/qmp.sock")


def wait_done(q, what):
    while True:
        s = q("query-migrate").get("status")
        if s == "completed":
            return
        if s in ("failed", "cancelled"):
            raise SystemExit(f"{what}: {q('query-migrate').get('error-desc')}")
        time.sleep(0.002)


def caps(q, kind):
    on = {"mapped-ram": kind.startswith("mapped-ram"), "multifd": kind.endswith("multifd")}
    have = {c["capability"] for c in q("query-migrate-capabilities")}
    q("migrate-set-capabilities", capabilities=[{"capability": c, "state": v} for c, v in on.items() if c in have])
    params = {"max-bandwidth": 16 << 30}
    if on["multifd"]:
        params["multifd-channels"] = 2
    q("migrate-set-parameters", **params)


def one(qemu, work, mib, kind, run):
    src_ram, dst_ram = f"/dev/shm/drover-mr-src-{os.getpid()}", f"/dev/shm/drover-mr-dst-{os.getpid()}"
    out = f"{work}/state-{kind}-{run}.bin"
    try:
        with open(src_ram, "wb") as f:
            f.truncate(mib << 20)
        fill(src_ram, mib)
        p, q = start(qemu, work, f"s{run}{kind}", src_ram, mib)
        caps(q, kind)
        uri = f"exec:cat > {out}" if kind == "exec" else f"file:{out}"
        t0 = time.monotonic()
        q("migrate", uri=uri)
        wait_done(q, f"save {kind}")
        save = time.monotonic() - t0
        q("quit"); p.wait()
        os.sync()
        size = os.path.getsize(out)
        p, q = start(qemu, work, f"r{run}{kind}", dst_ram, mib, incoming=True)
        caps(q, kind)
        t0 = time.monotonic()
        q("migrate-incoming", uri=f"exec:cat {out}" if kind == "exec" else f"file:{out}")
        wait_done(q, f"restore {kind}")
        restore = time.monotonic() - t0
        q("quit"); p.wait()
        return save, restore, size
    finally:
        for f in (src_ram, dst_ram, out):
            if os.path.exists(f):
                os.unlink(f)


def main():
    a = argparse.ArgumentParser(description="classic save/restore by stream kind, per QEMU version")
    a.add_argument("runs", nargs="?", type=int, default=3)
    a.add_argument("--qemu", default="both")
    a.add_argument("--mib", type=int, default=2048)
    args = a.parse_args()
    work = tempfile.mkdtemp(prefix="drover-mr.", dir="/var/tmp")
    rows = []
    try:
        for version, d in qemu_installs(args.qemu):
            qemu, _ = raw_qemu_cmd(d)
            major, minor = (int(x) for x in version.split(".")[:2])
            kinds = ["exec"]
            if (major, minor) >= (8, 2):
                kinds.append("file")
            if major >= 9:
                kinds += ["mapped-ram", "mapped-ram+multifd"]
            res = {k: [] for k in kinds}
            for run in range(args.runs):
                for k in kinds:
                    res[k].append(one(qemu, work, args.mib, k, run))
                    s, r, size = res[k][-1]
                    print(f"  QEMU {version} {k:20} run {run + 1}: save {s * 1000:.0f} ms, restore {r * 1000:.0f} ms, "
                          f"file {size / 2**20:.0f} MiB")
            for k, v in res.items():
                rows.append((version, k, statistics.median(x[0] for x in v) * 1000,
                             statistics.median(x[1] for x in v) * 1000, v[0][2] / 2**20))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nclassic save / restore of {args.mib} MiB ({int(FILL * 100)} % filled), medians of {args.runs}:")
    print(f"  {'QEMU':8} {'stream':20} {'save ms':>9} {'restore ms':>11} {'file MiB':>9}")
    for v, k, s, r, size in rows:
        print(f"  {v:8} {k:20} {s:>9.0f} {r:>11.0f} {size:>9.0f}")


if __name__ == "__main__":
    main()
