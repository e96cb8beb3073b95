#!/usr/bin/env python3
"""libvirt's side of bench/state: `virsh save` / `virsh restore` of the same guest Drover runs.

bench/state.py --part libvirt uses it (5 runs alternating with Drover's own); run by itself,
`bench/state_libvirt.py [RUNS] [--sizes 512,2048]` measures libvirt alone.

What it starts, and how it keeps the machine's libvirt untouched:
  * libvirtd (Debian's libvirt-daemon + libvirt-daemon-driver-qemu + libvirt-clients; NOT
    libvirt-daemon-system, which would pull systemd-sysv and the default network) as root, in a
    private mount namespace (`unshare --mount`) where /etc/libvirt, /run/libvirt, /var/lib/libvirt,
    /var/cache/libvirt and /var/log/libvirt are a temporary directory of its own: qemu.conf there
    says `user = "root"`, no security driver, serial logs written by QEMU itself
    (`stdio_handler = "file"`, no virtlogd). No network is defined, so there is no virbr0.
    libvirt looks up its built-in default user (libvirt-qemu, which libvirt-daemon-system would
    create) before it reads qemu.conf: /etc/passwd and /etc/group in the namespace are copies
    with that user added. Outside, only empty mount points appear (removed on exit) where
    those directories do not exist. DROVER_BENCH_KEEP=1 keeps the temporary directory (logs,
    domain XML, console logs) for a look afterwards.
  * libvirtd's parent is this script in `--reap` mode: a child subreaper that waits on every child
    at once. QEMU daemonizes away from libvirtd, so without it the machine's PID 1 (which reaps
    late here) would inherit QEMU, and libvirt would wait for a zombie to go away on every save.
  * The domain: `<domain type='qemu'>` (TCG) with the `-kernel`, `-initrd`, `-append`, `-cpu`,
    `-machine` and `-bios` (qboot) of droverd's QEMU for the same VM (read from its
    /proc/PID/cmdline), 1 vCPU, the size's RAM (anonymous, libvirt's default), no NIC, no disk,
    and the serial port (the guest's root shell on ttyS0) as a unix socket with a log file the
    host reads; commands are typed into that shell (the fill, the ticker).

Measured per run:
  save     `virsh save DOMAIN FILE` (command time; libvirt pauses the guest, streams its state to
           the file, then stops QEMU)
  restore  `virsh restore FILE`: the command time (it returns once libvirt has resumed the vCPU),
           and "guest runs again": from the command's start until the guest's console shows a
           line the restored guest printed. A ticker in the guest (started before the first
           save, a shell loop without forks) prints `tick N` every ~20 ms; the host polls the
           console log every 2 ms. So "runs again" is at most ~20 ms (+ one poll) late.
"""
from xml.sax.saxutils import escape
import argparse, ctypes, os, re, shutil, signal, socket, statistics, subprocess, sys, threading, time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import passable_tmpdir, poll  # noqa: E402

# The directories a privileged libvirtd uses, each replaced by one of ours in its namespace.
PRIVATE = ["/etc/libvirt", "/run/libvirt", "/var/lib/libvirt", "/var/cache/libvirt", "/var/log/libvirt"]

QEMU_CONF = """\
# bench/state_libvirt.py's own libvirtd: QEMU as root, nothing relabelled, serial logs by QEMU.
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
stdio_handler = "file"
"""

# Prints `tick N` on the serial console every ~20 ms, for ever: the host's sign that the guest
# runs. `read -t` on a FIFO nobody writes is the sleep (a shell builtin: no fork per tick).
TICKER = ("mkfifo /tmp/tick.fifo; (exec 3<>/tmp/tick.fifo; i=0; "
          "while :; do i=$((i+1)); echo \"tick $i\"; read -t 0.02 x <&3; done) </dev/null >/dev/ttyS0 2>&1 &")

TICK = re.compile(rb"tick (\d+)\r?\n")  # a whole line of the ticker's


def available():
    """None when libvirt can be benchmarked here, else why not (what to install or do)."""
    if os.geteuid() != 0:
        return "needs root (libvirtd runs QEMU as root in a private mount namespace)"
    for exe in ("libvirtd", "virsh", "unshare"):
        if not shutil.which(exe):
            return (f"{exe} not found: apt-get install --no-install-recommends libvirt-daemon "
                    "libvirt-daemon-driver-qemu libvirt-clients")
    return None


def forward(pid, sig):
    """Pass a signal on to pid, unless it has gone already."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def reap(cmd):
    """`--reap CMD...`: run CMD as a child subreaper's only child; wait on every child at once
    (QEMU, orphaned by its daemonizing fork, lands here); pass SIGTERM/SIGINT on to CMD; exit
    with its status once it has exited."""
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_CHILD_SUBREAPER = 36
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise SystemExit(f"prctl(PR_SET_CHILD_SUBREAPER): errno {ctypes.get_errno()}")
    child = os.fork()
    if child == 0:
        os.execvp(cmd[0], cmd)
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda sig, _f: forward(child, sig))
    status = 0
    while True:
        try:
            pid, st = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid == child:
            status = os.waitstatus_to_exitcode(st)
    sys.exit(status if status >= 0 else 128 - status)


class Libvirtd:
    """A libvirtd of our own (see the module doc); stops it, its domains and its files on exit."""

    def __init__(self):
        self.tmp = passable_tmpdir("drover-lv.")
        self.dirs = {p: f"{self.tmp}/{p.strip('/').replace('/', '-')}" for p in PRIVATE}
        for d in self.dirs.values():
            os.makedirs(d)
        with open(f"{self.dirs['/etc/libvirt']}/qemu.conf", "w") as f:
            f.write(QEMU_CONF)
        with open(f"{self.dirs['/etc/libvirt']}/libvirtd.conf", "w") as f:
            f.write('unix_sock_group = "root"\nunix_sock_rw_perms = "0700"\nauth_unix_rw = "none"\n')
        # Mount points for the bind mounts: empty directories, where the packages we do not
        # install (libvirt-daemon-system) would have made them; removed again on exit.
        self.made = [p for p in PRIVATE if not os.path.exists(p)]
        for p in self.made:
            os.makedirs(p)
        # libvirt resolves its built-in default user (libvirt-qemu) before it reads qemu.conf;
        # libvirt-daemon-system would create it: here it exists only in the namespace.
        for db, line in (("passwd", "libvirt-qemu:x:64055:64055::/nonexistent:/usr/sbin/nologin"),
                         ("group", "libvirt-qemu:x:64055:")):
            with open(f"/etc/{db}") as src, open(f"{self.tmp}/{db}", "w") as dst:
                dst.write(src.read().rstrip("\n") + f"\n{line}\n")
        binds = "; ".join([f"mount --bind {d} {p}" for p, d in self.dirs.items()] +
                          [f"mount --bind {self.tmp}/{db} /etc/{db}" for db in ("passwd", "group")])
        self.uri = f"qemu:///system?socket={self.dirs['/run/libvirt']}/libvirt-sock"
        self.log_path = f"{self.tmp}/libvirtd.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             f"set -e; {binds}; exec \"$0\" \"$1\" --reap libvirtd --pid-file {self.tmp}/libvirtd.pid",
             sys.executable, os.path.abspath(__file__)],
            # Its own session: a signal to the bench's process group (Ctrl-C, timeout(1)) must
            # not stop libvirtd before __exit__ has destroyed its domains.
            stdout=self.log, stderr=self.log, start_new_session=True)
        try:
            poll(lambda: os.path.exists(f"{self.dirs['/run/libvirt']}/libvirt-sock") or self.proc.poll() is not None, 60, 0.05)
            if self.proc.poll() is not None:
                raise SystemExit(f"libvirtd did not start: {open(self.log_path).read()[-2000:]}")
            poll(lambda: subprocess.run(["virsh", "-c", self.uri, "version"], capture_output=True).returncode == 0, 120, 0.2)
        except SystemExit as e:
            self.__exit__()
            raise SystemExit(f"libvirtd: {e}; its log ends: {open(self.log_path).read()[-2000:]}")
        except BaseException:
            self.__exit__()
            raise

    def __call__(self, *args, timeout=900):
        """Run virsh against our libvirtd; exit on failure."""
        r = subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise SystemExit(f"virsh {' '.join(args)}: {r.stderr.strip()}\n(libvirtd log: {self.log_path})")
        return r.stdout

    def version(self):
        """`9.0.0` of the running libvirtd."""
        m = re.search(r"Running against daemon: (\S+)", self("version", "--daemon"))
        return m.group(1) if m else "?"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            for name in subprocess.run(["virsh", "-c", self.uri, "list", "--name"], capture_output=True,
                                       text=True).stdout.split():
                subprocess.run(["virsh", "-c", self.uri, "destroy", name], capture_output=True)
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        for p in self.made:
            try:
                os.rmdir(p)
            except OSError as e:
                print(f"libvirt bench: could not remove the mount point {p}: {e}", file=sys.stderr)
        if os.environ.get("DROVER_BENCH_KEEP") is None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def qemu_argv(*needles):
    """The command line of the running QEMU whose arguments contain every one of `needles`."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [a.decode() for a in f.read().split(b"\0")[:-1]]
        except OSError:
            continue
        if argv and "qemu-system" in argv[0] and all(any(n in a for a in argv) for n in needles):
            return argv
    raise SystemExit(f"no QEMU running with {needles}")


def guest_of(argv):
    """What the libvirt domain copies from a QEMU command line (droverd's): kernel, initrd,
    kernel command line, CPU model and machine type (as libvirt names them), firmware."""
    def arg(flag, default=None):
        return argv[argv.index(flag) + 1] if flag in argv else default
    return {"kernel": arg("-kernel"), "initrd": arg("-initrd"), "cmdline": arg("-append", ""),
            # A model's extra flags (`Westmere,+x`) are not carried over; droverd gives none.
            "cpu": arg("-cpu", "max").split(",")[0],
            "machine": (arg("-machine") or arg("-M") or "q35").split(",")[0],
            "firmware": arg("-bios", "/usr/share/qemu/qboot.rom")}


def domain_xml(name, size_mib, g, run_dir):
    """The libvirt domain of the bench guest (see the module doc); `g` is guest_of()'s."""
    cpu_xml = ("<cpu mode='maximum'/>" if g["cpu"] == "max" else
               f"<cpu mode='custom' match='exact' check='none'><model fallback='forbid'>{g['cpu']}</model></cpu>")
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{size_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='{g["machine"]}'>hvm</type>
    <loader type='rom'>{escape(g["firmware"])}</loader>
    <kernel>{escape(g["kernel"])}</kernel>
    <initrd>{escape(g["initrd"])}</initrd>
    <cmdline>{escape(g["cmdline"])}</cmdline>
  </os>
  {cpu_xml}
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
    <serial type='unix'>
      <source mode='bind' path='{run_dir}/serial.sock'/>
      <log file='{run_dir}/console.log' append='on'/>
      <target port='0'/>
    </serial>
  </devices>
</domain>
"""


def last_tick(path, start=0):
    """(file size, number of the last complete `tick N` line after byte `start`, or None)."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read()
    except FileNotFoundError:
        return 0, None
    ticks = TICK.findall(data)
    return start + len(data), (int(ticks[-1]) if ticks else None)


class TickWatch(threading.Thread):
    """Watches the console log from byte `start` on, from the moment it is made, for the first
    tick line (with a number <= `below` when given: a restored guest counts on from where its
    state was saved, below what a still-running old guest has printed since). Polls every 2 ms
    beside the command being timed, so a tick printed before the command returns is seen then."""

    def __init__(self, path, start, below=None):
        super().__init__(daemon=True)
        self.path, self.pos, self.below = path, start, below
        self.seen, self.stop = None, threading.Event()
        self.start()

    def run(self):
        rest = b""
        while not self.stop.is_set():
            try:
                with open(self.path, "rb") as f:
                    if os.fstat(f.fileno()).st_size < self.pos:  # rotated: read it from the start
                        self.pos, rest = 0, b""
                    f.seek(self.pos)
                    data = f.read()
            except FileNotFoundError:
                data = b""
            self.pos += len(data)
            lines = (rest + data).split(b"\n")
            rest = lines.pop()
            for line in lines:
                m = TICK.fullmatch(line + b"\n")
                if m and (self.below is None or int(m.group(1)) <= self.below):
                    self.seen = time.monotonic()
                    return
            time.sleep(0.002)

    def wait(self, timeout=600):
        """time.monotonic() of the first such tick; exits when none comes within `timeout` s."""
        self.join(timeout)
        self.stop.set()
        if self.seen is None:
            raise SystemExit(f"{self.path}: no tick of the restored guest within {timeout} s")
        return self.seen


class Domain:
    """One bench guest under our libvirtd: booted, shell commands typed on its serial console."""

    def __init__(self, virsh, name, size_mib, guest):
        self.virsh, self.name = virsh, name
        self.dir = f"{virsh.tmp}/{name}"
        os.makedirs(self.dir)
        self.console = f"{self.dir}/console.log"
        self.serial = f"{self.dir}/serial.sock"
        self.n = 0
        xml = f"{self.dir}/domain.xml"
        with open(xml, "w") as f:
            f.write(domain_xml(name, size_mib, guest, self.dir))
        virsh("define", xml)
        virsh("start", name)
        poll(lambda: b"DROVER-INIT-READY" in open(self.console, "rb").read()
             if os.path.exists(self.console) else False, 300, 0.05)

    def sh(self, script, timeout=900):
        """Type `script` into the guest's root shell on ttyS0; wait until it has finished.

        Connected only meanwhile, and reading all the time: QEMU's serial port sends each byte
        as its own socket write, so an unread connection fills the socket buffer after a few
        hundred bytes and the guest's console stalls for good (QEMU waits for room that never
        comes, even after the client leaves). Unconnected, QEMU writes only the log."""
        self.n += 1
        # The shell echoes what is typed: the quotes keep the echo from matching the marker.
        marker = f"LVDONE{self.n}\r\n".encode()
        s = socket.socket(socket.AF_UNIX)
        s.connect(self.serial)
        try:
            s.sendall(f"{script}\necho LV''DONE{self.n}\n".encode())
            s.settimeout(1.0)
            seen, end = b"", time.monotonic() + timeout
            while marker not in seen:
                if time.monotonic() > end:
                    raise SystemExit(f"{self.name}: `{script}` did not finish in {timeout} s (console: {self.console})")
                try:
                    data = s.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    raise SystemExit(f"{self.name}: the serial console closed during `{script}`")
                seen = seen[-64:] + data
        finally:
            s.close()

    def save_restore(self, path):
        """One `virsh save` and `virsh restore`: (save s, restore command s, restore -> guest runs s)."""
        t0 = time.monotonic()
        self.virsh("save", self.name, path)
        save = time.monotonic() - t0
        start, _ = last_tick(self.console)
        watch = TickWatch(self.console, start)
        t0 = time.monotonic()
        self.virsh("restore", path)
        cmd = time.monotonic() - t0
        runs = watch.wait() - t0
        os.unlink(path)
        return save, cmd, runs


def fill_plain(sh, fill_mib):
    """bench/state.py's fill, for when this runs alone: 64 MiB from /dev/urandom, repeated."""
    sh("mount -o remount,size=95% /tmp; head -c 67108864 /dev/urandom > /tmp/chunk")
    sh(f"for i in $(seq {max(1, fill_mib // 64 - 1)}); do cat /tmp/chunk; done > /tmp/fill")


class Side:
    """libvirt's runs interleaved with Drover's: begin(size, argv) boots and fills a domain of that
    size like the QEMU command line `argv` (droverd's), run(size, i) saves and restores it once,
    end(size) removes it; results(size) has the medians."""

    def __init__(self, virsh, fill=fill_plain):
        self.virsh, self.fill = virsh, fill
        self.doms, self.runs = {}, {}

    def begin(self, size_mib, argv):
        g = guest_of(argv)
        t0 = time.monotonic()
        dom = Domain(self.virsh, f"lv{size_mib}", size_mib, g)
        t1 = time.monotonic()
        self.fill(dom.sh, int(size_mib * 0.75))
        t2 = time.monotonic()
        dom.sh(TICKER)
        _, first = last_tick(dom.console)
        time.sleep(1)
        _, second = last_tick(dom.console)
        period = 1000 / max(1, (second or 0) - (first or 0))
        self.doms[size_mib] = dom
        self.runs[size_mib] = []
        print(f"  libvirt {size_mib} MiB: domain {dom.name} (-cpu {g['cpu']}, -machine {g['machine']}, "
              f"-bios {g['firmware']}, kernel {g['kernel']}, initrd {g['initrd']}) booted in {t1 - t0:.1f} s, "
              f"{int(size_mib * 0.75)} MiB filled in {t2 - t1:.0f} s, ticking every {period:.0f} ms")

    def run(self, size_mib, i):
        dom = self.doms[size_mib]
        r = dom.save_restore(f"{self.virsh.tmp}/{dom.name}.save")
        self.runs[size_mib].append(r)
        print(f"  libvirt {size_mib} MiB run {i + 1}: virsh save {r[0] * 1000:.0f} ms, virsh restore "
              f"{r[1] * 1000:.0f} ms (guest runs again after {r[2] * 1000:.0f} ms)")

    def end(self, size_mib):
        dom = self.doms.pop(size_mib)
        self.virsh("destroy", dom.name)
        self.virsh("undefine", dom.name)

    def results(self, size_mib):
        """{figure: median ms} of one size."""
        rs = self.runs[size_mib]
        med = lambda k: statistics.median(r[k] for r in rs) * 1000
        return {"libvirt save": med(0), "libvirt restore command": med(1), "libvirt restore -> guest runs": med(2)}


def exit_on_sigterm():
    """SIGTERM ends the bench as an error does: context managers stop what they started."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--reap":
        reap(sys.argv[2:])
    exit_on_sigterm()
    p = argparse.ArgumentParser(description="libvirt's virsh save / restore of Drover's bench guest")
    p.add_argument("runs", nargs="?", type=int, default=5)
    p.add_argument("--sizes", default="512,2048")
    p.add_argument("--image", default=None, help="a guest image dir (vmlinux, initramfs.cpio, manifest.json); "
                   "default: $DROVER_IMAGE_DIR/current")
    a = p.parse_args()
    why = available()
    if why:
        raise SystemExit(f"libvirt: {why}")
    import json
    from common import IMAGES
    image = os.path.realpath(a.image or f"{IMAGES}/current")
    cmdline = json.load(open(f"{image}/manifest.json"))["default_cmdline"]
    # Alone, the domain boots the image as droverd would, with its default shape.
    argv = ["qemu", "-kernel", f"{image}/vmlinux", "-initrd", f"{image}/initramfs.cpio", "-append", cmdline,
            "-cpu", "Westmere", "-machine", "q35"]
    with Libvirtd() as virsh:
        print(f"libvirt {virsh.version()}, image {image}")
        side = Side(virsh)
        for size in (int(x) for x in a.sizes.split(",")):
            side.begin(size, argv)
            for i in range(a.runs):
                side.run(size, i)
            print(f"  {size} MiB medians: " + ", ".join(f"{k} {v:.0f} ms" for k, v in side.results(size).items()))
            side.end(size)


if __name__ == "__main__":
    main()
