#!/usr/bin/env python3
"""bench/migrate_hang: how often a guest is broken after a live migration between two raw QEMUs.

Boots one guest with droverd's QEMU command line (TCG, q35, qboot, shared RAM file, maxcpus=2,
the image's tuned kernel command line; 256 MiB), then migrates it back and forth N times over a
unix socket on this host (max-bandwidth 16 GiB/s, downtime-limit 50 ms). After each migration the
in-guest agent must answer a ping on port B within --timeout s (+ --grace s); if not, the guest
counts as HUNG: RIP is sampled, `info registers`, `x/40i $pc-0x60` and `info lapic` are saved in
the private dir, and a fresh guest is booted.

Optional guest load, to raise the rate:
  --memchk MIB  a static checker (C source below, built with gcc) that rewrites MIB MiB page by page
                and, before rewriting a page, checks it still holds the previous round's pattern;
                mismatches go to the serial console as "BAD page=..." and count as CORRUPT
  --churn       a shell loop forking `ls -l /proc` (context switches, slab churn)
Variants, one at a time: --cpu MODEL, --accel-opts thread=single, --no-ram-file, --maxcpus N,
--seabios, --drop-append WORD, --add-append WORD, --extra ARG, --stop-copy (QMP `stop` before
`migrate`, `cont` on the destination: no live phase).

Findings (2026-11-30, QEMU 7.2.22, 2 cores): with a RAM size that is a multiple of 256 KiB, live
migration under TCG broke the guest in ~1 of 4 migrations (--memchk 32 --churn), whatever the CPU
model / RAM backing / maxcpus / TSC flags / thread=single (seqcount left odd, spinlock left held,
slab freelist corrupted, user registers or pages from another point in time): QEMU 7.2's fast
dirty-bitmap sync does not re-arm TCG's TLB dirty tracking (fixed in QEMU 9.0, 03bfc2188f).
--mem 262152K (8 KiB more; cmdline.rs RAM_PAD) and --stop-copy never broke it.

Usage: bench/migrate_hang.py [-n 30] [--memchk 32 --churn] [variant options] [--json FILE]
No root needed beyond access to /dev/shm; no droverd. Uses the image in target/drover-images/current
(copied to a private dir first) unless --image DIR.
"""
import argparse, base64, json, os, random, shutil, socket, struct, subprocess, sys, tempfile, time

from common import IMAGES, Qmp

DEFAULT_APPEND = ("console=ttyS0 quiet loglevel=0 mitigations=off i8042.noaux i8042.nokbd i8042.nopnp "
                  "8250.nr_uarts=1 no_timer_check cryptomgr.notests tsc=reliable random.trust_cpu=on")


MEMCHK_C = r"""
/* memchk MIB: rewrite MIB MiB page by page forever; before rewriting a page, check that it still
 * holds what was written in the previous round. Prints "BAD page=P word=W got=G want=X round=R". */
typedef long i64; typedef unsigned long u64;
static i64 sys(i64 n, i64 a, i64 b, i64 c, i64 d, i64 e, i64 f) {
    i64 r; register i64 r10 __asm__("r10") = d, r8 __asm__("r8") = e, r9 __asm__("r9") = f;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9) : "rcx", "r11", "memory");
    return r;
}
static u64 num(const char *s) { u64 v = 0; while (*s >= '0' && *s <= '9') v = v * 10 + (u64)(*s++ - '0'); return v; }
static char *hex(char *p, u64 v) { for (int i = 60; i >= 0; i -= 4) *p++ = "0123456789abcdef"[(v >> i) & 15]; return p; }
static char *str(char *p, const char *s) { while (*s) *p++ = *s++; return p; }
__asm__(".global _start\n_start:\n mov %rsp, %rdi\n and $-16, %rsp\n call cmain\n hlt\n");
void cmain(i64 *sp) {
    char **argv = (char **)(sp + 1);
    u64 pages = (sp[0] > 1 ? num(argv[1]) : 32) * 256;
    volatile u64 *mem = (volatile u64 *)sys(9, 0, (i64)(pages << 12), 3, 0x22, -1, 0);
    if ((i64)mem < 0) sys(60, 1, 0, 0, 0, 0, 0);
    u64 bad = 0;
    for (u64 r = 1;; r++) {
        for (u64 p = 0; p < pages; p++) {
            volatile u64 *q = mem + (p << 9);
            if (r > 1) for (u64 w = 0; w < 512; w++) {
                u64 want = ((r - 1) << 40) ^ (p << 9) ^ w;
                if (q[w] != want && bad < 50) {
                    char b[160], *e = str(b, "BAD page="); e = hex(e, p); e = str(e, " word="); e = hex(e, w);
                    e = str(e, " got="); e = hex(e, q[w]); e = str(e, " want="); e = hex(e, want); *e++ = '\n';
                    sys(1, 1, (i64)b, e - b, 0, 0, 0); bad++;
                }
            }
            for (u64 w = 0; w < 512; w++) q[w] = (r << 40) ^ (p << 9) ^ w;
        }
        if (r % 8 == 0) { char b[40], *e = str(b, "ROUND "); e = hex(e, r); *e++ = '\n'; sys(1, 1, (i64)b, e - b, 0, 0, 0); }
    }
}
"""


def build_memchk(d):
    src, out = f"{d}/memchk.c", f"{d}/memchk"
    with open(src, "w") as f:
        f.write(MEMCHK_C)
    subprocess.run(["gcc", "-Os", "-static", "-nostdlib", "-fno-asynchronous-unwind-tables", "-fno-stack-protector",
                    "-fno-builtin", "-Wl,--build-id=none", "-Wl,-z,max-page-size=4096", "-Wl,-z,norelro", "-Wl,-n",
                    "-s", "-o", out, src], check=True)
    return out


    def hmp(self, line):
        return self("human-monitor-command", **{"command-line": line})

    def close(self):
        self.f.close()
        self.s.close()


def agent_exec(sock_path, argv, stdin=None, timeout=60.0):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(sock_path)
    fid = random.randrange(1, 1 << 31)
    body = {"type": "exec", "argv": argv, "timeout_ms": int(timeout * 1000), **({"stdin": stdin} if stdin else {})}
    payload = json.dumps({"v": 1, "id": fid, "body": body}).encode()
    s.sendall(b"DRV1" + struct.pack(">I", len(payload)) + payload)
    buf = b""
    try:
        while True:
            i = buf.find(b"DRV1")
            if i >= 0 and len(buf) >= i + 8:
                n = struct.unpack(">I", buf[i + 4:i + 8])[0]
                if len(buf) >= i + 8 + n:
                    frame = json.loads(buf[i + 8:i + 8 + n])
                    buf = buf[i + 8 + n:]
                    if frame.get("id") == fid:
                        return frame["body"]
                    continue
            chunk = s.recv(65536)
            if not chunk:
                raise EOFError("port B closed")
            buf += chunk
    finally:
        s.close()


def ping(sock_path, timeout):
    """True if the agent answers a ping on port B within timeout seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.settimeout(max(0.05, end - time.monotonic()))
            s.connect(sock_path)
            fid = random.randrange(1, 1 << 31)
            payload = json.dumps({"v": 1, "id": fid, "body": {"type": "ping"}}).encode()
            s.sendall(b"DRV1" + struct.pack(">I", len(payload)) + payload)
            buf = b""
            while True:
                i = buf.find(b"DRV1")
                if i >= 0 and len(buf) >= i + 8:
                    n = struct.unpack(">I", buf[i + 4:i + 8])[0]
                    if len(buf) >= i + 8 + n:
                        frame = json.loads(buf[i + 8:i + 8 + n])
                        buf = buf[i + 8 + n:]
                        if frame.get("id") == fid:
                            return True
                        continue
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except (OSError, ValueError):
            pass
        finally:
            s.close()
        time.sleep(0.05)
    return False


class Rig:
    def __init__(self, a):
        self.a = a
        self.dir = tempfile.mkdtemp(prefix="mh.", dir="/tmp")
        self.shm = tempfile.mkdtemp(prefix="mh.", dir="/dev/shm")
        for f in ("vmlinux", "initramfs.cpio"):
            src = os.path.join(a.image, f)
            dst = os.path.join(self.dir, f)
            shutil.copyfile(src, dst)
        self.procs = []
        self.n = 0

    def argv(self, d, ram, incoming):
        a = self.a
        append = [w for w in DEFAULT_APPEND.split() if w not in a.drop_append] + a.add_append + ["drover.hostname=mh"]
        args = ["qemu-system-x86_64", "-name", "guest=mh,debug-threads=on", "-nodefaults", "-no-user-config",
                "-display", "none", "-accel", "tcg" + (f",{a.accel_opts}" if a.accel_opts else ""), "-cpu", a.cpu, "-machine", a.machine]
        if not a.seabios:
            args += ["-bios", "/usr/share/qemu/qboot.rom"]
        args += ["-smp", f"cpus=1,maxcpus={a.maxcpus}", "-m", a.mem]
        if a.ram_file:
            args += ["-object", f"memory-backend-file,id=ram0,size={a.mem},mem-path={ram},share=on",
                     "-machine", "memory-backend=ram0"]
        if incoming:
            args += ["-incoming", incoming]
        args += ["-chardev", f"file,id=console,path={self.dir}/console.log,append=on", "-serial", "chardev:console",
                 "-kernel", f"{self.dir}/vmlinux", "-initrd", f"{self.dir}/initramfs.cpio", "-append", " ".join(append)]
        for i in range(4):
            args += ["-device", f"pcie-root-port,id=hp{i},chassis={i + 1},bus=pcie.0"]
        args += ["-device", "virtio-serial-pci,id=vser0",
                 "-chardev", f"socket,id=porta,path={d}/port-a.sock,server=on,wait=off",
                 "-device", "virtserialport,bus=vser0.0,chardev=porta,name=org.drover.req",
                 "-chardev", f"socket,id=portb,path={d}/port-b.sock,server=on,wait=off",
                 "-device", "virtserialport,bus=vser0.0,chardev=portb,name=org.drover.evt",
                 "-qmp", f"unix:{d}/qmp.sock,server=on,wait=off"] + a.extra
        return args

    def start(self, incoming=None):
        self.n += 1
        d = f"{self.dir}/q{self.n}"
        os.makedirs(d)
        ram = f"{self.shm}/q{self.n}"
        uri = f"unix:{d}/mig.sock" if incoming else None
        log = open(f"{d}/qemu.log", "w")
        p = subprocess.Popen(self.argv(d, ram, uri), stdout=log, stderr=log)
        self.procs.append(p)
        return dict(p=p, d=d, ram=ram, uri=uri, qmp=Qmp(f"{d}/qmp.sock"))

    def stop(self, q):
        try:
            q["qmp"].close()
        except OSError:
            pass
        if q["p"].poll() is None:
            q["p"].kill()
        q["p"].wait()
        try:
            os.unlink(q["ram"])
        except FileNotFoundError:
            pass

    def boot(self):
        t = time.monotonic()
        q = self.start()
        if not ping(f"{q['d']}/port-b.sock", 120):
            raise SystemExit("the guest does not boot (no pong in 120 s)")
        boot_s = time.monotonic() - t
        if self.a.memchk:
            with open(build_memchk(self.dir), "rb") as f:
                b64 = base64.b64encode(f.read()).decode()
            r = agent_exec(f"{q['d']}/port-b.sock", ["sh", "-c", "base64 -d > /tmp/memchk && chmod +x /tmp/memchk && "
                           f"(setsid /tmp/memchk {self.a.memchk} > /dev/ttyS0 2>&1 < /dev/null &)"], stdin=b64)
            if r.get("exit_code") != 0:
                raise SystemExit(f"memchk start failed: {r}")
            time.sleep(2.0)
        if self.a.memchk and self.a.memchk_stop:
            time.sleep(self.a.memchk_stop)
            agent_exec(f"{q['d']}/port-b.sock", ["sh", "-c", "killall -STOP memchk"])
        if self.a.churn:
            r = agent_exec(f"{q['d']}/port-b.sock", ["sh", "-c", "(setsid sh -c 'while :; do ls -l /proc > /dev/null; done' "
                           "> /dev/null 2>&1 < /dev/null &)"])
            if r.get("exit_code") != 0:
                raise SystemExit(f"churn start failed: {r}")
        time.sleep(self.a.settle)
        return q, boot_s

    def cleanup(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(self.shm, ignore_errors=True)
        if not self.a.keep:
            shutil.rmtree(self.dir, ignore_errors=True)


def diagnose(q):
    out = {}
    try:
        rips = []
        for _ in range(5):
            r = q["qmp"].hmp("info registers")
            rips.append(r[r.find("RIP="):].split()[0] if "RIP=" in r else "?")
            time.sleep(0.2)
        out["rips"] = rips
        out["regs"] = r
        out["code"] = q["qmp"].hmp("x/12i $pc")
        out["code_before"] = q["qmp"].hmp("x/40i $pc-0x60")
        out["lapic"] = q["qmp"].hmp("info lapic")
        out["status"] = q["qmp"]("query-status")
        # vCPU thread CPU use over 1 s (spinning vs halted)
        pid = q["p"].pid
        def ticks():
            tot = {}
            for tid in os.listdir(f"/proc/{pid}/task"):
                try:
                    name = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
                    st = open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
                    tot[name] = tot.get(name, 0) + int(st[11]) + int(st[12])
                except OSError:
                    pass
            return tot
        t1 = ticks(); time.sleep(1.0); t2 = ticks()
        out["thread_cpu_pct"] = {k: t2[k] - t1.get(k, 0) for k in t2 if t2[k] - t1.get(k, 0)}
    except Exception as e:  # noqa
        out["error"] = repr(e)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("-n", type=int, default=30, help="migrations")
    p.add_argument("--label", default="")
    p.add_argument("--cpu", default="max")
    p.add_argument("--machine", default="q35")
    p.add_argument("--mem", default="256M", help="guest RAM with unit, e.g. 256M or 262400K")
    p.add_argument("--maxcpus", type=int, default=2)
    p.add_argument("--no-ram-file", dest="ram_file", action="store_false")
    p.add_argument("--seabios", action="store_true")
    p.add_argument("--drop-append", action="append", default=[])
    p.add_argument("--add-append", action="append", default=[])
    p.add_argument("--extra", action="append", default=[], help="extra QEMU argument (repeat)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds for the first pong after a migration")
    p.add_argument("--grace", type=float, default=7.0, help="more seconds before calling it a hang")
    p.add_argument("--settle", type=float, default=0.5, help="seconds between migrations")
    p.add_argument("--image", default=f"{IMAGES}/current", help="dir with vmlinux and initramfs.cpio (copied first)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--accel-opts", default="", help="e.g. thread=single")
    p.add_argument("--stop-copy", action="store_true", help="stop the guest before migrating, cont on the destination")
    p.add_argument("--memchk-stop", type=float, default=0, help="SIGSTOP the checker after this many s (filled, then idle)")
    p.add_argument("--churn", action="store_true", help="a shell loop forking ls in the guest")
    p.add_argument("--memchk", type=int, default=0, help="run the memory checker over this many MiB in the guest")
    p.add_argument("--json", help="append a summary line to this file")
    a = p.parse_args()
    rig = Rig(a)
    label = a.label or " ".join(sys.argv[1:])
    hangs, slow, details, boots = 0, 0, [], []
    corrupt = 0
    def bads():
        try:
            return open(f"{rig.dir}/console.log", errors="replace").read().count("BAD page=")
        except FileNotFoundError:
            return 0
    print(f"[{label}] qemu: {' '.join(rig.argv('D', 'RAM', None)[1:])}", flush=True)
    try:
        src, b = rig.boot()
        boots.append(b)
        for i in range(a.n):
            bad0 = bads()
            dst = rig.start(incoming=True)
            src["qmp"]("migrate-set-parameters", **{"max-bandwidth": 16 << 30, "downtime-limit": 50})
            t0 = time.monotonic()
            if a.stop_copy:
                src["qmp"]("stop")
            src["qmp"]("migrate", uri=dst["uri"])
            while True:
                m = src["qmp"]("query-migrate")
                if m.get("status") == "completed":
                    break
                if m.get("status") in ("failed", "cancelled"):
                    raise SystemExit(f"migration failed: {m}")
                time.sleep(0.005)
            t1 = time.monotonic()
            if a.stop_copy:
                while dst["qmp"]("query-status")["status"] != "paused":
                    time.sleep(0.005)
                dst["qmp"]("cont")
            try:
                src["qmp"]("quit")
            except EOFError:
                pass
            rig.stop(src)
            ok = ping(f"{dst['d']}/port-b.sock", a.timeout)
            late = False
            if not ok:
                ok = late = ping(f"{dst['d']}/port-b.sock", a.grace)
            t2 = time.monotonic()
            if a.memchk:
                time.sleep(1.0)
            nb = bads() - bad0
            if nb:
                corrupt += 1
                print(f"  {i + 1:2d}: CORRUPT: {nb} new BAD lines", flush=True)
            if ok:
                if late:
                    slow += 1
                print(f"  {i + 1:2d}: ok{' (LATE)' if late else ''}  total {m['total-time']} ms downtime "
                      f"{m['downtime']} ms, pong {1000 * (t2 - t1):.0f} ms after", flush=True)
                src = dst
            else:
                hangs += 1
                dg = diagnose(dst)
                details.append(dg)
                print(f"  {i + 1:2d}: HUNG  total {m['total-time']} ms downtime {m['downtime']} ms; RIPs {dg.get('rips')} "
                      f"threads {dg.get('thread_cpu_pct')} status {dg.get('status')}", flush=True)
                with open(f"{rig.dir}/hang{hangs}.txt", "w") as f:
                    f.write(json.dumps(dg, indent=1, default=str))
                    for k in ("regs", "code", "code_before", "lapic"):
                        f.write(f"\n--- {k}\n{dg.get(k)}")
                print(f"      details in {rig.dir}/hang{hangs}.txt", flush=True)
                a.keep = True
                rig.stop(dst)
                src, b = rig.boot()
                boots.append(b)
    finally:
        rig.cleanup()
    print(f"[{label}] hangs {hangs}/{a.n}, corrupt {corrupt}/{a.n}, late {slow}, boots {len(boots)} (first boot {boots[0]:.2f} s)", flush=True)
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(dict(label=label, hangs=hangs, corrupt=corrupt, n=a.n, late=slow, boot_s=boots, dir=rig.dir)) + "\n")


if __name__ == "__main__":
    main()
