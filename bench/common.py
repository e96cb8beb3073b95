"""Shared by the benchmarks: a throwaway droverd on a temp state dir, and polling helpers."""
import json, os, shutil, socket, subprocess, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("DROVER_BIN_DIR", f"{ROOT}/target/release")
AGENT = os.environ.get("DROVER_AGENT_BIN", f"{ROOT}/target/x86_64-unknown-linux-gnu/release/drover-agent")
IMAGES = os.environ.get("DROVER_IMAGE_DIR", f"{ROOT}/target/drover-images")


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


class Droverd:
    """A droverd with its own state dir and socket; stops it and its VMs on exit."""

    def __init__(self, prefix, log="warn"):
        self.tmp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
        self.sock = f"{self.tmp}/d.sock"
        self.state = f"{self.tmp}/state"
        self.log_path = f"{self.tmp}/droverd.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([f"{BIN}/droverd", "--state-dir", self.state, "--socket", self.sock,
                                      "--image-dir", IMAGES, "--agent-binary", AGENT, "--log", log],
                                     stdout=self.log, stderr=self.log)
        poll(lambda: os.path.exists(self.sock), 10)
        time.sleep(0.2)
        self("image", "build")

    def __call__(self, *args):
        """Run the CLI; exit on failure."""
        r = subprocess.run([f"{BIN}/drover", "--socket", self.sock, *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"drover {' '.join(args)}: {r.stderr}")
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
        shutil.rmtree(self.tmp, ignore_errors=True)


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
