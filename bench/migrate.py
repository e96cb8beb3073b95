#!/usr/bin/env python3
"""bench/migrate: live migration of a busy 1 GiB guest between two hosts, Drover vs raw QEMU.

Two droverd's in network namespaces (scripts/netns-hosts.sh up 2: h1 = 10.77.0.11, h2 = 10.77.0.12,
migration traffic crosses their veths and the bridge). The guest (the default image, 1 vCPU,
1 GiB, TCG) runs a tiny static program (`tick`, C source below, built with gcc; no libc) that
fills 75 % of RAM with non-zero data, rewrites it at 10 MiB/s (distinct 4 KiB pages, round robin,
paced by the clock), and prints its CLOCK_MONOTONIC to the serial console every ~1 ms.

  raw:    two QEMUs started by this script with droverd's exact command line for the VM (read from
          /proc/PID/cmdline of the VM droverd started, paths moved to a private dir), the source in
          drover-h1, the destination started with `-incoming tcp:IP:PORT` in the other namespace;
          by hand over QMP: migrate-set-parameters (downtime-limit, max-bandwidth 16 GiB/s), then
          migrate tcp:IP:PORT, poll query-migrate until completed, quit the source. The workload
          is started through the agent's port B directly (no droverd).
  drover: `drover --remote hA vm migrate VM --to hB --downtime-ms N --output json` on a VM that
          droverd started, with the same workload; its JSON must carry total_ms and downtime_ms
          (QEMU's figures).
Both migrate one guest back and forth (h1 -> h2, h2 -> h1, ...), RUNS times each.

Per migration:
  total         QEMU's total-time (query-migrate) / drover's total_ms
  end to end    raw: from starting the destination QEMU to query-migrate saying completed;
                drover: the CLI command's wall time
  downtime      QEMU's downtime / drover's downtime_ms
  guest frozen  how far the guest's clock fell behind the host's: under TCG the guest's clock stops
                while the VM is stopped, so (host arrival time - guest timestamp) of the console
                lines jumps by exactly the time the guest did not run (minimum over 1 s before the
                migration vs 1 s after, which cancels the host's polling delay)
  console gap   the longest the host saw no new line from the guest (includes the host's 1 ms poll)
A guest that prints nothing for 5 s after a migration counts as hung (seen with QEMU 7.2 + TCG
now and then, raw too): the run is reported with the vCPU's RIP, the guest is booted again (raw)
or restarted (drover), and hung runs stay out of the medians.

Usage: bench/migrate.py [RUNS] [--downtime-ms N] [--dirty-mibps N]   (default 5 runs, 50 ms, 10)
Needs root, gcc, and `PROFILE=release scripts/build.sh` first. Brings the namespaces up and down
itself (private DROVER_NETNS_ROOT and DROVER_CONFIG_DIR under /tmp); refuses to run while
drover-h1/drover-h2 exist (someone else's hosts).
"""
import argparse, base64, json, os, random, shutil, signal, socket, statistics, struct, subprocess, sys
import tempfile, threading, time

from common import AGENT, BIN, IMAGES, ROOT, Qmp, passable_tmpdir, qemu_version

MEMORY_MIB = 1024
FILL = 0.75
# A set of hosts of its own (DROVER_NETNS_SET / DROVER_NETNS_NET, as scripts/netns-hosts.sh takes
# them), so the benchmark can run beside other hosts on the machine.
SET = os.environ.get("DROVER_NETNS_SET", "h")
NET = os.environ.get("DROVER_NETNS_NET", "10.77.0")
IP = {1: f"{NET}.11", 2: f"{NET}.12"}

TICK_C = r"""
/* bench/migrate's guest workload: `tick KIB_PER_S MIB`.
 * Fills MIB MiB of anonymous memory, then rewrites it page by page at KIB_PER_S KiB/s (round robin,
 * paced by the clock), and prints the guest's CLOCK_MONOTONIC in microseconds as "T<us>\n" to
 * stdout about every millisecond. No libc: raw syscalls, so it runs in the busybox-only guest. */
typedef long i64;
typedef unsigned long u64;
struct ts { i64 s, ns; };
static i64 sys(i64 n, i64 a, i64 b, i64 c, i64 d, i64 e, i64 f) {
    i64 r;
    register i64 r10 __asm__("r10") = d, r8 __asm__("r8") = e, r9 __asm__("r9") = f;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return r;
}
static u64 num(const char *s) { u64 v = 0; while (*s >= '0' && *s <= '9') v = v * 10 + (u64)(*s++ - '0'); return v; }
static u64 now_us(void) { struct ts t; sys(228, 1, (i64)&t, 0, 0, 0, 0); return (u64)t.s * 1000000 + (u64)t.ns / 1000; }
__asm__(".global _start\n_start:\n mov %rsp, %rdi\n and $-16, %rsp\n call cmain\n hlt\n");
void cmain(i64 *sp) {
    char **argv = (char **)(sp + 1);
    u64 kib_s = sp[0] > 1 ? num(argv[1]) : 10240, pages = (sp[0] > 2 ? num(argv[2]) : 64) * 256;
    u64 *mem = (u64 *)sys(9, 0, (i64)(pages << 12), 3, 0x22, -1, 0); /* mmap anonymous rw */
    if ((i64)mem < 0) sys(60, 1, 0, 0, 0, 0, 0);
    u64 x = 88172645463325252UL, page = 0, done = 0;
    for (u64 i = 0; i < pages << 9; i++) mem[i] = ++x;            /* fault it all in */
    u64 start = now_us();
    struct ts d = {0, 1000000};
    char buf[32];
    for (;;) {
        u64 t = now_us(), us = t;
        int i = sizeof buf;
        buf[--i] = '\n';
        do { buf[--i] = (char)('0' + us % 10); us /= 10; } while (us);
        buf[--i] = 'T';
        sys(1, 1, (i64)(buf + i), (i64)(sizeof buf - (u64)i), 0, 0, 0);
        for (u64 due = (t - start) * kib_s / 4000000; done < due; done++) { /* 4 KiB pages due by now */
            u64 *p = mem + (page << 9);
            for (int k = 0; k < 512; k++) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; p[k] = x; }
            page = page + 1 == pages ? 0 : page + 1;
        }
        sys(35, (i64)&d, 0, 0, 0, 0, 0); /* nanosleep 1 ms */
    }
}
"""


def build_tick(tmp):
    """The workload binary, base64 (the agent's exec stdin is text)."""
    src, out = f"{tmp}/tick.c", f"{tmp}/tick"
    with open(src, "w") as f:
        f.write(TICK_C)
    subprocess.run(["gcc", "-Os", "-static", "-nostdlib", "-fno-asynchronous-unwind-tables", "-fno-stack-protector",
                    "-fno-builtin", "-Wl,--build-id=none", "-Wl,-z,max-page-size=4096", "-Wl,-z,norelro", "-Wl,-n",
                    "-s", "-o", out, src], check=True)
    with open(out, "rb") as f:
        b64 = base64.b64encode(f.read()).decode()
    with open(f"{out}.b64", "w") as f:
        f.write(b64)
    return b64, f"{out}.b64"


def workload_script(kib_s, fill_mib):
    return (f"base64 -d > /tmp/tick && chmod +x /tmp/tick && "
            f"(setsid /tmp/tick {kib_s} {fill_mib} > /dev/ttyS0 2>&1 < /dev/null &)")


    def close(self):
        self.f.close()  # the socket stays open while its file object does
        self.s.close()


def agent_exec(sock_path, argv, stdin=None, timeout=120.0):
    """Run a command in the guest through the agent's port B (what droverd does for `vm exec`)."""
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


class Console:
    """Tails the guest's console log(s) every ms; keeps (host time, guest µs) of each tick line."""

    def __init__(self, paths):
        self.paths = paths  # a callable: the console logs the guest may write to now
        self.samples = []
        self.lock = threading.Lock()
        self.stop = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        files, last = {}, 0  # path -> [fd, inode, pending bytes]
        while not self.stop:
            for p in self.paths():
                try:
                    ino = os.stat(p).st_ino
                except FileNotFoundError:
                    continue
                f = files.get(p)
                if f is None or f[1] != ino:
                    if f:
                        os.close(f[0])
                    f = files[p] = [os.open(p, os.O_RDONLY), ino, b""]
                while True:
                    data = os.read(f[0], 1 << 16)
                    if not data:
                        break
                    now = time.monotonic()
                    lines = (f[2] + data).split(b"\n")
                    f[2] = lines.pop()
                    new = []
                    for l in lines:
                        l = l.rstrip(b"\r")  # the tty turns \n into \r\n
                        if l.startswith(b"T") and l[1:].isdigit():
                            g = int(l[1:])
                            if g > last:  # a reopened or reused log repeats old lines
                                last = g
                                new.append((now, g / 1e6))
                    with self.lock:
                        self.samples.extend(new)
            time.sleep(0.001)
        for f in files.values():
            os.close(f[0])

    def since(self, t):
        with self.lock:
            return [s for s in self.samples if s[0] >= t]

    def wait_ticking(self, t, timeout=120):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if len(self.since(t)) > 200:
                return
            time.sleep(0.05)
        raise SystemExit("the guest workload prints no ticks on the console")

    def judge(self, t_start, t_end):
        """Guest frozen, console gap and the guest clock's biggest step, in ms, around [t_start, t_end]."""
        with self.lock:
            s = list(self.samples)
        before = [h - g for h, g in s if t_start - 1.0 <= h <= t_start]
        after = [h - g for h, g in s if t_end <= h <= t_end + 1.0]
        span = [x for x in s if t_start - 0.05 <= x[0] <= t_end + 1.0]
        if not before or not after or len(span) < 2:
            print(f"    (console: {len(before)} lines before, {len(after)} after; last line at "
                  f"{s[-1][0] - t_end if s else float('nan'):+.2f} s from the end)")
            return None, None, None
        frozen = (min(after) - min(before)) * 1000
        gap = max(b[0] - a[0] for a, b in zip(span, span[1:])) * 1000
        step = max(b[1] - a[1] for a, b in zip(span, span[1:])) * 1000
        return frozen, gap, step

    def alive_after(self, t, timeout=5.0):
        """Whether the guest printed a line after t (waits up to timeout, and at least 1.1 s so
        judge() has its window)."""
        end = time.monotonic() + timeout
        time.sleep(1.1)
        while not self.since(t + 0.05):
            if time.monotonic() > end:
                return False
            time.sleep(0.05)
        time.sleep(max(0.0, t + 1.1 - time.monotonic()))
        return True

    def close(self):
        self.stop = True
        self.thread.join()


def fmt(v, unit="ms"):
    return "?" if v is None else f"{v:.1f} {unit}" if isinstance(v, float) else f"{v} {unit}"


def med(v):
    v = [x for x in v if x is not None]
    return statistics.median(v) if v else float("nan")


class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = passable_tmpdir("drover-mig.")
        self.shm = tempfile.mkdtemp(prefix="drover-mig-raw.", dir="/dev/shm")
        self.env = dict(os.environ, DROVER_NETNS_ROOT=self.tmp, DROVER_CONFIG_DIR=f"{self.tmp}/config",
                        DROVER_BIN_DIR=BIN, DROVER_IMAGE_DIR=IMAGES, DROVER_AGENT_BIN=AGENT,
                        DROVER_QEMU_DIR=os.path.abspath(args.qemu_dir) if args.qemu_dir else "")
        self.qemus = []
        self.port = random.randrange(20000, 30000)

    def state(self, host):
        return f"{self.tmp}/drover-{SET}{host}"

    def netns(self, cmd):
        r = subprocess.run([f"{ROOT}/scripts/netns-hosts.sh", *cmd], env=self.env, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"netns-hosts.sh {' '.join(cmd)}: {r.stderr}")

    def drover(self, host, *args, check=True):
        r = subprocess.run([f"{BIN}/drover", "--remote", f"{SET}{host}", *args], env=self.env,
                           capture_output=True, text=True)
        if check and r.returncode != 0:
            raise SystemExit(f"drover --remote {SET}{host} {' '.join(args)}: {r.stderr}")
        return r

    def cleanup(self):
        for q in self.qemus:
            if q.poll() is None:
                q.kill()
                q.wait()
        self.netns(["down", "--purge"])
        shutil.rmtree(self.shm, ignore_errors=True)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ---- raw QEMU ----

    def template(self):
        """droverd's QEMU argv for a 1 GiB VM, and the paths in it that belong to that VM."""
        self.drover(1, "vm", "create", "mig", "--memory", f"{MEMORY_MIB}M")
        self.drover(1, "vm", "start", "mig", "--wait")
        run = f"{self.state(1)}/run/mig"
        with open(f"{run}/qemu.pid") as f:
            pid = int(f.read())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode() for a in f.read().split(b"\0")[:-1]]
        self.drover(1, "vm", "stop", "mig", "--force")
        ram = next(a.split("mem-path=")[1].split(",")[0] for a in argv if "mem-path=" in a)
        return argv, run, f"{self.state(1)}/vms/mig/console.log", ram

    def raw_qemu(self, template, host, tag, incoming=None):
        argv, run, console, ram = template
        d = f"{self.tmp}/raw/{tag}"
        os.makedirs(d)
        args = [a.replace(ram, f"{self.shm}/{tag}").replace(console, f"{self.tmp}/raw/console.log")
                .replace(run, d).replace("guest=mig,", "guest=raw-mig,") for a in argv]
        assert not any(self.state(1) in a for a in args), args
        if incoming:
            args += ["-incoming", incoming]
        log = open(f"{d}/qemu.log", "w")
        q = subprocess.Popen(["ip", "netns", "exec", f"drover-{SET}{host}", *args], stdout=log, stderr=log)
        self.qemus.append(q)
        return q, d

    def raw_boot(self, template, tick_b64, con, tag):
        """A fresh raw guest on h1 with the workload running."""
        q, d = self.raw_qemu(template, 1, tag)
        end = time.monotonic() + 120
        while True:
            try:
                if agent_exec(f"{d}/port-b.sock", ["true"], timeout=5).get("type") == "exec_result":
                    break
            except (OSError, EOFError):
                pass
            if time.monotonic() > end:
                raise SystemExit("raw guest: the agent does not answer on port B")
            time.sleep(0.2)
        t = time.monotonic()
        r = agent_exec(f"{d}/port-b.sock", ["sh", "-c", workload_script(self.args.dirty_mibps * 1024, int(MEMORY_MIB * FILL))],
                       stdin=tick_b64)
        if r.get("exit_code") != 0:
            raise SystemExit(f"raw guest: starting the workload failed: {r}")
        con.wait_ticking(t)
        time.sleep(1.0)
        return q, d

    def raw_phase(self, template, tick_b64, runs):
        a = self.args
        print(f"raw QEMU: droverd's command line, {MEMORY_MIB} MiB, downtime-limit {a.downtime_ms} ms, "
              f"max-bandwidth 16 GiB/s, tcp over the veths")
        os.makedirs(f"{self.tmp}/raw")
        con = Console(lambda: [f"{self.tmp}/raw/console.log"])
        n = 0
        q, d = self.raw_boot(template, tick_b64, con, f"q{n}")
        host, results, hung = 1, [], 0
        try:
            while len(results) < runs and hung <= runs:
                to = 3 - host
                self.port += 1
                n += 1
                uri = f"tcp:{IP[to]}:{self.port}"
                src = Qmp(f"{d}/qmp.sock")
                src("migrate-set-parameters", **{"downtime-limit": a.downtime_ms, "max-bandwidth": 16 << 30})
                t0 = time.monotonic()
                q2, d2 = self.raw_qemu(template, to, f"q{n}", incoming=uri)
                dst = Qmp(f"{d2}/qmp.sock")  # up once QEMU listens on the migration port
                t1 = time.monotonic()
                src("migrate", uri=uri)
                rate = 0
                while True:
                    m = src("query-migrate")
                    rate = max(rate, m.get("ram", {}).get("dirty-pages-rate", 0))
                    if m.get("status") == "completed":
                        break
                    if m.get("status") in ("failed", "cancelled"):
                        raise SystemExit(f"raw migration failed: {m.get('error-desc')}")
                    time.sleep(0.005)
                t2 = time.monotonic()
                src("quit")
                src.close()
                q.wait()
                os.unlink(f"{self.shm}/{os.path.basename(d)}")
                alive = con.alive_after(t2)
                ram = m.get("ram", {})
                label = f"  raw    run {len(results) + 1} h{host}->h{to}:"
                if not alive:
                    # Seen here now and then (also on loopback, also idle): QEMU says running, the
                    # vCPU spins in the guest kernel with interrupts off. Start over with a new guest.
                    regs = dst("human-monitor-command", **{"command-line": "info registers"})
                    rip = regs[regs.find("RIP="):].split()[0] if "RIP=" in regs else "?"
                    dst.close()
                    hung += 1
                    print(f"{label} the guest HUNG after the migration (downtime {m['downtime']} ms, total "
                          f"{m['total-time']} ms; no console output for 5 s, vCPU at {rip}); booting a new guest")
                    q2.kill()
                    q2.wait()
                    os.unlink(f"{self.shm}/q{n}")
                    n += 1
                    q, d = self.raw_boot(template, tick_b64, con, f"q{n}")
                    host = 1
                    continue
                frozen, gap, step = con.judge(t1, t2)
                dst.close()
                res = dict(total=m["total-time"], e2e=(t2 - t0) * 1000, down=m["downtime"], frozen=frozen, gap=gap)
                results.append(res)
                print(f"{label} total {res['total']} ms (end to end {res['e2e']:.0f} ms, destination up in "
                      f"{(t1 - t0) * 1000:.0f}), downtime {res['down']} ms, guest frozen {fmt(frozen)}, "
                      f"console gap {fmt(gap)} (guest clock step {fmt(step)}); {ram.get('transferred', 0) >> 20} MiB sent, "
                      f"{ram.get('dirty-sync-count', '?')} passes, dirty rate up to {rate * 4096 / 1048576:.1f} MiB/s")
                q, d, host = q2, d2, to
        finally:
            con.close()
            if q.poll() is None:
                q.kill()
                q.wait()
        return results, hung

    # ---- drover ----

    def drover_available(self):
        r = self.drover(1, "vm", "migrate", "--help", check=False)
        return r.returncode == 0 and "--to" in r.stdout

    def drover_phase(self, tick_b64_file, runs):
        a = self.args
        print(f"drover: `drover --remote hA vm migrate mig --to hB --downtime-ms {a.downtime_ms} --output json`")
        self.drover(1, "vm", "start", "mig", "--wait")
        con = Console(lambda: [f"{self.state(h)}/vms/mig/console.log" for h in (1, 2)])
        host, results, hung = 1, [], 0
        try:
            t = time.monotonic()
            self.drover(1, "vm", "exec", "mig", "--stdin", tick_b64_file, "--",
                        "sh", "-c", workload_script(a.dirty_mibps * 1024, int(MEMORY_MIB * FILL)))
            con.wait_ticking(t)
            time.sleep(1.0)
            while len(results) < runs and hung <= runs:
                to = 3 - host
                i = len(results)
                t0 = time.monotonic()
                r = self.drover(host, "vm", "migrate", "mig", "--to", f"{SET}{to}", "--downtime-ms", str(a.downtime_ms),
                                "--output", "json", check=False)
                t2 = time.monotonic()
                if r.returncode != 0:
                    print(f"  drover run {i + 1} h{host}->h{to}: failed (exit {r.returncode}): {r.stderr.strip()}")
                    break
                try:
                    out = json.loads(r.stdout)
                except ValueError:
                    print(f"  drover run {i + 1}: output is not JSON: {r.stdout[:300]!r}")
                    break
                if not con.alive_after(t2):
                    hung += 1
                    print(f"  drover run {len(results) + 1} h{host}->h{to}: the guest HUNG after the migration "
                          f"(no console output for 5 s; drover said {out}); restarting it on h{to}")
                    self.drover(to, "vm", "stop", "mig", "--force")
                    self.drover(to, "vm", "start", "mig", "--wait")
                    t = time.monotonic()
                    self.drover(to, "vm", "exec", "mig", "--stdin", tick_b64_file, "--",
                                "sh", "-c", workload_script(a.dirty_mibps * 1024, int(MEMORY_MIB * FILL)))
                    con.wait_ticking(t)
                    time.sleep(1.0)
                    host = to
                    continue
                # The CLI's wall time brackets the guest's pause as well as the raw window does.
                frozen, gap, step = con.judge(t0, t2)
                res = dict(total=out.get("total_ms"), e2e=(t2 - t0) * 1000, down=out.get("downtime_ms"),
                           frozen=frozen, gap=gap)
                results.append(res)
                missing = [k for k in ("total_ms", "downtime_ms") if k not in out]
                print(f"  drover run {i + 1} h{host}->h{to}: total {fmt(res['total'])} (CLI {res['e2e']:.0f} ms), "
                      f"downtime {fmt(res['down'])}, guest frozen {fmt(frozen)}, console gap {fmt(gap)} "
                      f"(guest clock step {fmt(step)})" + (f"; JSON lacks {', '.join(missing)}: {sorted(out)}" if missing else ""))
                host = to
        finally:
            con.close()
        return results, hung


def main():
    p = argparse.ArgumentParser(description="live migration of a busy 1 GiB guest, Drover vs raw QEMU")
    p.add_argument("runs", nargs="?", type=int, default=5)
    p.add_argument("--downtime-ms", type=int, default=50, help="QEMU downtime-limit for both (default 50)")
    p.add_argument("--dirty-mibps", type=int, default=10, help="guest dirtying rate, MiB/s (default 10)")
    p.add_argument("--qemu-dir", default=None,
                   help="both hosts on the QEMU installation in DIR (droverd --qemu-dir; default the system's)")
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces)")
    for b in (f"{BIN}/drover", f"{BIN}/droverd", AGENT):
        if not os.access(b, os.X_OK):
            raise SystemExit(f"no {b}: run `PROFILE=release scripts/build.sh` first")
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    if f"drover-{SET}1" in ns or f"drover-{SET}2" in ns:
        raise SystemExit(f"namespaces drover-{SET}1/drover-{SET}2 exist already (other hosts running?); "
                         "`scripts/netns-hosts.sh down` them first")
    def stop(signum, _frame):
        raise SystemExit(f"signal {signum}")
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    b = Bench(args)
    try:
        tick_b64, tick_file = build_tick(b.tmp)
        b.netns(["up", "2"])
        template = b.template()
        print(f"QEMU {qemu_version(args.qemu_dir)}: live migration, TCG, 1 vCPU, {MEMORY_MIB} MiB, {int(FILL * 100)} % of RAM filled, "
              f"{args.dirty_mibps} MiB/s dirtied, back and forth h1 <-> h2, {args.runs} runs each")
        raw, raw_hung = b.raw_phase(template, tick_b64, args.runs)
        drv, drv_hung = [], 0
        if b.drover_available():
            drv, drv_hung = b.drover_phase(tick_file, args.runs)
        else:
            print("drover vm migrate not available yet (`drover vm migrate --help` fails): Drover part skipped")
    finally:
        b.cleanup()
    m = lambda rs, k: med([r[k] for r in rs])
    if raw_hung or drv_hung:
        print(f"guests hung after a migration: raw {raw_hung}, drover {drv_hung} (not counted below)")
    print(f"raw QEMU, medians of {len(raw)}: total {m(raw, 'total'):.0f} ms (end to end {m(raw, 'e2e'):.0f} ms), "
          f"downtime {m(raw, 'down'):.1f} ms, guest frozen {m(raw, 'frozen'):.1f} ms, console gap {m(raw, 'gap'):.1f} ms")
    if drv:
        print(f"drover,   medians of {len(drv)}: total {m(drv, 'total'):.0f} ms (CLI {m(drv, 'e2e'):.0f} ms), "
              f"downtime {m(drv, 'down'):.1f} ms, guest frozen {m(drv, 'frozen'):.1f} ms, console gap {m(drv, 'gap'):.1f} ms")
        print(f"drover/raw: total {m(drv, 'total') / m(raw, 'total'):.2f}x, end to end {m(drv, 'e2e') / m(raw, 'e2e'):.2f}x "
              f"(goal <= 1.1); downtime {m(drv, 'down'):.1f} ms QEMU-reported, {m(drv, 'frozen'):.1f} ms guest-seen "
              f"(goal <= 20; raw {m(raw, 'down'):.1f} / {m(raw, 'frozen'):.1f})")


if __name__ == "__main__":
    main()
