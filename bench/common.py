"""Shared by the benchmarks: a throwaway droverd on a temp state dir, and polling helpers."""
import sys, json, os, shutil, socket, subprocess, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("DROVER_BIN_DIR", f"{ROOT}/target/release")
AGENT = os.environ.get("DROVER_AGENT_BIN", f"{ROOT}/target/x86_64-unknown-linux-gnu/release/drover-agent")
IMAGES = os.environ.get("DROVER_IMAGE_DIR", f"{ROOT}/target/drover-images")



def passable_tmpdir(prefix):
    """A temporary directory droverd can keep a state dir in: QEMU runs as drover-qemu
    (droverd --qemu-user), which must be able to pass through it (mkdtemp makes it 0700)."""
    d = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(d, 0o711)
    return d

def poll(pred, timeout=60.0, step=0.002):
    """Wait until pred() is true; returns the time.monotonic() it became so."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return time.monotonic()
        time.sleep(step)
    raise SystemExit("timed out")


def count(path, needle):
    """How often needle occurs in the file (0 when it does not exist yet)."""
    try:
        with open(path, "rb") as f:
            return f.read().count(needle)
    except FileNotFoundError:
        return 0


def qemu10_dir():
    """A QEMU 10 installation (scripts/install-deps.sh --qemu-prefix DIR), or None."""
    for d in (os.environ.get("DROVER_BENCH_QEMU10_DIR"), f"{ROOT}/target/qemu-10", "/opt/drover-qemu10"):
        if d and os.access(f"{d}/usr/bin/qemu-system-x86_64", os.X_OK):
            return d
    return None


def qemu_version(qemu_dir):
    """`7.2.22` of the system's QEMU (qemu_dir None) or of the one under qemu_dir."""
    exe = f"{qemu_dir}/usr/bin/qemu-system-x86_64" if qemu_dir else "qemu-system-x86_64"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.split()
    return out[out.index("version") + 1] if "version" in out else "?"


def qemu_installs(choice="both"):
    """[(version, dir)] to run a benchmark on: `system` (dir None), a directory, or `both`
    (the system's and QEMU 10, when one is found), side by side."""
    if choice == "system":
        dirs = [None]
    elif choice == "both":
        dirs = [None] + ([qemu10_dir()] if qemu10_dir() else [])
    else:
        dirs = [os.path.abspath(choice)]
    return [(qemu_version(d), d) for d in dirs]


def raw_qemu_cmd(qemu_dir):
    """The emulator of an installation with its firmware directory, as droverd runs it."""
    if qemu_dir is None:
        return ["qemu-system-x86_64"], "/usr/share/qemu"
    return [f"{qemu_dir}/usr/bin/qemu-system-x86_64", "-L", f"{qemu_dir}/usr/share/qemu"], f"{qemu_dir}/usr/share/qemu"


class Droverd:
    """A droverd with its own state dir and socket (on the QEMU under qemu_dir, else the
    system's); stops it and its VMs on exit."""

    def __init__(self, prefix, log="warn", qemu_dir=None):
        self.tmp = passable_tmpdir(prefix)
        self.sock = f"{self.tmp}/d.sock"
        self.state = f"{self.tmp}/state"
        self.log_path = f"{self.tmp}/droverd.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([f"{BIN}/droverd", "--state-dir", self.state, "--socket", self.sock,
                                      "--image-dir", IMAGES, "--agent-binary", AGENT, "--log", log,
                                      *(["--qemu-dir", qemu_dir] if qemu_dir else [])],
                                     stdout=self.log, stderr=self.log)
        poll(lambda: os.path.exists(self.sock), 10)
        time.sleep(0.2)
        self("image", "build")

    def __call__(self, *args):
        """Run the CLI; exit on failure."""
        r = subprocess.run([f"{BIN}/drover", "--socket", self.sock, *args], capture_output=True, text=True)
        if r.returncode != 0:
            # With --output json the CLI writes its error as JSON on stdout.
            raise SystemExit(f"drover {' '.join(args)} (exit {r.returncode}): {r.stderr}{r.stdout}")
        return r.stdout

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait()
        subprocess.run(["pkill", "-9", "-f", self.tmp])
        # droverd keeps guest memory in /dev/shm/drover-<sha256(state dir)[:6]>.
        import hashlib
        key = hashlib.sha256(os.path.abspath(self.state).encode()).hexdigest()[:12]
        shutil.rmtree(f"/dev/shm/drover-{key}", ignore_errors=True)
        if os.environ.get("DROVER_BENCH_KEEP") is None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            # droverd's log and each VM's console (the guest's own timeline) stay for reading.
            print(f"kept {self.tmp} (DROVER_BENCH_KEEP)", file=sys.stderr)


class Qmp:
    """A minimal QMP client over a unix socket; events are skipped."""

    def __init__(self, path, timeout=20.0):
        end = time.monotonic() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                self.s.close()
                if time.monotonic() > end:
                    raise RuntimeError(f"QMP {path} does not answer")
                time.sleep(0.005)
        self.f = self.s.makefile("rb")
        self.f.readline()
        self("qmp_capabilities")

    def close(self):
        self.f.close()
        self.s.close()

    def __call__(self, cmd, **args):
        msg = {"execute": cmd, **({"arguments": args} if args else {})}
        self.s.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            line = self.f.readline()
            if not line:
                raise EOFError(f"QMP closed during {cmd}")
            m = json.loads(line)
            if "error" in m:
                raise RuntimeError(f"{cmd}: {m['error'].get('desc')}")
            if "return" in m:
                return m["return"]
