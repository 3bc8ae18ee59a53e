"""A throwaway Debian bookworm booted by a real systemd (systemd-nspawn), driven with nsenter.

The root file system is built once with debootstrap and cached; every boot lays a
tmpfs over it (`--volatile=overlay`), so the cache is never written to. The project,
its virtual environment and the interpreter behind it are bind-mounted read-only at
the same paths, so `llmsup` runs inside exactly as it does here.

Works on a host without systemd as PID 1: `--register=no --keep-unit` keep nspawn
away from systemd-machined and from a service manager that is not there, in a cgroup
made for it; `nsenter` stands in for `machinectl shell` / `systemd-run --machine`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
SUITE = "bookworm"
PACKAGES = "systemd,systemd-sysv,dbus,python3,procps"  # procps: /bin/kill for ExecReload=
STAMP = ".llmsup-rootfs"  # written last, before the rename: a tree without it is not used
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TOOLS = {"systemd-nspawn": "systemd-container", "debootstrap": "debootstrap"}


MIRROR = "http://deb.debian.org/debian"  # debootstrap's default


class Unavailable(Exception):
    """A prerequisite is missing on this host; the message says which, in one line.

    Only `missing_prerequisite` decides this, before anything is tried."""


class SetupFailed(Exception):
    """With every prerequisite present, building or booting the container failed:
    a failure of the test, never a reason to skip it."""


def cache_dir() -> Path:
    base = os.environ.get("LLMSUP_TEST_CACHE")
    return Path(base) if base else Path.home() / ".cache" / "llmsup-tests"


def _run_group(argv: list[str], timeout: float, **kw: object) -> subprocess.CompletedProcess[str]:
    """subprocess.run, but a timeout or an interrupt kills the whole process group."""
    with subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kw,  # type: ignore[call-overload]
    ) as proc:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        return subprocess.CompletedProcess(argv, proc.returncode, out, "")


def missing_prerequisite() -> str | None:
    """Why this host cannot have the container, in one line; None when it can.

    Decided before anything is built or booted: Linux, root, the tools (installed
    with apt-get where missing), and a Debian mirror unless the tree is cached.
    Past this point a failure is a failure."""
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn, debootstrap, nsenter)"
    ensure_tools()
    absent = [tool for tool in [*TOOLS, "nsenter"] if shutil.which(tool) is None]
    if absent:
        return f"{', '.join(absent)} missing and could not be installed"
    if not _cached(cache_dir() / SUITE) and not mirror_reachable():
        return f"no {SUITE} tree cached and {MIRROR} cannot be reached to build one"
    return None


def mirror_reachable(timeout: float = 15.0) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{MIRROR}/dists/{SUITE}/Release", timeout=timeout) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _cached(root: Path) -> bool:
    stamp = root / STAMP
    return stamp.is_file() and stamp.read_text() == PACKAGES


def ensure_tools() -> None:
    """systemd-nspawn and debootstrap, installed with apt-get where missing."""
    missing = [pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
    if missing and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        with contextlib.suppress(subprocess.TimeoutExpired):
            r = _run_group(["apt-get", "update", "-qq"], 300, env=env)
            if r.returncode == 0:
                _run_group(["apt-get", "install", "-y", "-qq", *missing], 300, env=env)


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path) + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == str(path) or p.startswith(prefix)]


def _discard(path: Path) -> None:
    """Remove a half-built tree, never descending into what debootstrap left mounted."""
    for point in sorted(_mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    if not _mounts_under(path):
        shutil.rmtree(path, ignore_errors=True)


def rootfs() -> Path:
    """The cached bookworm tree, built on first use (about a minute to three)."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    root = cache / SUITE
    with open(cache / f"{SUITE}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be building it
        if _cached(root):
            return root
        for stale in cache.glob(f"{SUITE}.tmp-*"):
            _discard(stale)
        if root.exists():  # built with another package list
            old = root.rename(cache / f"{SUITE}.tmp-old-{os.getpid()}")
            _discard(old)
        tmp = cache / f"{SUITE}.tmp-{os.getpid()}"
        try:
            r = _run_group(
                ["debootstrap", "--variant=minbase", f"--include={PACKAGES}", SUITE, str(tmp)],
                600,
            )
            if r.returncode != 0:
                last = (r.stdout.strip().splitlines() or ["?"])[-1]
                raise SetupFailed(f"debootstrap {SUITE} failed: {last}")
            (tmp / STAMP).write_text(PACKAGES)
            tmp.rename(root)
        finally:
            if tmp.exists():
                _discard(tmp)
    return root


def _interpreter_binds() -> list[str]:
    """What the interpreter behind this venv needs inside (the container has its own /usr)."""
    home = Path(sys.base_prefix)
    if home == Path("/usr"):  # Debian's python3: the container's is the same 3.11
        return []
    if home == Path("/usr/local"):
        exe = Path(sys._base_executable).resolve()  # type: ignore[attr-defined]
        return ["/usr/local/lib", str(exe)]
    return [str(home.resolve())]


def binds() -> list[str]:
    """Read-only bind mounts, host path = container path: project, venv, interpreter."""
    paths = [str(REPO), *_interpreter_binds()]
    venv = Path(sys.prefix).resolve()
    if not venv.is_relative_to(REPO):
        paths.append(str(venv))
    return paths


def host_has_systemd() -> bool:
    return Path("/run/systemd/system").is_dir()


def _own_cgroup_parents() -> list[Path]:
    """This process's cgroup in each hierarchy nspawn uses: cgroup2, and v1 name=systemd."""
    mine: dict[str, str] = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            hid, controllers, path = line.rstrip("\n").split(":", 2)
            if hid == "0":
                mine["cgroup2"] = path
            elif controllers == "name=systemd":
                mine["cgroup"] = path
    parents = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            root, point, fstype, options = fields[3], fields[4], fields[sep + 1], fields[sep + 3]
            if root != "/" or fstype not in mine:
                continue
            if fstype == "cgroup" and "name=systemd" not in options.split(","):
                continue
            parents.append(Path(point) / mine[fstype].lstrip("/"))
    return parents


def _rmdir_tree(path: Path) -> None:
    """Remove a cgroup and the ones nspawn made in it (empty by now), deepest first."""
    for dirpath, _, _ in sorted(os.walk(path), key=lambda w: len(w[0]), reverse=True):
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)


def _nspid(pid: int) -> list[int]:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return [int(x) for x in line.split()[1:]]
    return [pid]


class Container:
    """A booted container; `run` executes a command inside it (all its namespaces)."""

    def __init__(self, root: Path, workdir: Path) -> None:
        self.root = root
        self.name = f"llmsup-test-{os.getpid()}"
        self.log_path = workdir / "nspawn.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.init_pid = 0  # the container's PID 1, as the host numbers it
        self.cgroups: list[Path] = []

    def boot(self, timeout: float = 90) -> None:
        argv = [
            "systemd-nspawn",
            "--quiet",
            "--register=no",  # no systemd-machined
            f"--machine={self.name}",
            f"--directory={self.root}",
            "--volatile=overlay",  # a tmpfs over the cached tree, gone at exit
            "--private-network",  # its own loopback: fixed ports, no clash with the host
            "--resolv-conf=off",
            "--timezone=off",
            "--link-journal=no",
            "--console=pipe",
            *(f"--bind-ro={p}" for p in binds()),
            "--boot",
        ]
        if not host_has_systemd():
            # No service manager to ask for a scope: nspawn keeps the cgroup it starts in
            # (its `payload` and `supervisor` below it). Give it one of its own, so that
            # two containers never share one, whatever runs beside these tests.
            argv.insert(1, "--keep-unit")
            moves = []
            for parent in _own_cgroup_parents():
                cgroup = parent / self.name
                try:
                    cgroup.mkdir(exist_ok=True)
                except OSError as e:
                    raise SetupFailed(f"cannot make a cgroup for the container: {e}") from None
                self.cgroups.append(cgroup)
                moves.append(f"echo $$ > {shlex.quote(str(cgroup / 'cgroup.procs'))} && ")
            argv = ["sh", "-c", "".join(moves) + 'exec "$@"', "sh", *argv]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while not self.init_pid:
            self._check_alive()
            with contextlib.suppress(psutil.Error, OSError):
                for child in psutil.Process(self.proc.pid).children(recursive=True):
                    if _nspid(child.pid)[-1] == 1:
                        self.init_pid = child.pid
            if time.monotonic() > deadline:
                raise SetupFailed(f"no init in the container after {timeout:.0f}s: {self.log()}")
            time.sleep(0.1)
        while True:
            self._check_alive()
            try:
                r = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=60)
            except subprocess.TimeoutExpired:
                raise SetupFailed("the container's systemd did not finish booting in 60s") from None
            state = r.stdout.strip()
            if state in ("running", "degraded"):
                break
            if time.monotonic() > deadline:
                raise SetupFailed(f"the container's systemd says {state!r}: {r.stderr.strip()}")
            time.sleep(0.5)

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise SetupFailed(f"systemd-nspawn exited with {self.proc.returncode}: {self.log()}")

    def log(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return " | ".join(text.strip().splitlines()[-5:])

    def run(
        self,
        *argv: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            ["nsenter", f"--target={self.init_pid}", "--all", *argv],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={"PATH": CONTAINER_PATH, "HOME": "/root", "LANG": "C.UTF-8", "SYSTEMD_COLORS": "0"},
        )
        if check and r.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited with {r.returncode}:\n{r.stdout}\n{r.stderr}"
            )
        return r

    def write(self, path: str, text: str, mode: str = "644") -> None:
        script = 'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1"'
        self.run("sh", "-c", script, "sh", path, mode, input=text)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        args = [f"--property={p}" for p in props]
        out = self.run("systemctl", "show", *args, unit).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def processes(self) -> list[psutil.Process]:
        """Every process inside, but PID 1."""
        with contextlib.suppress(psutil.Error):
            return list(psutil.Process(self.init_pid).children(recursive=True))
        return []

    def pid_inside(self, p: psutil.Process) -> int:
        return _nspid(p.pid)[-1]

    def shutdown(self) -> None:
        """Halt it (SIGTERM to nspawn), else kill its PID 1 and nspawn; always reaps."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        if self.proc.poll() is None:
            if self.init_pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.init_pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        for cgroup in self.cgroups:
            _rmdir_tree(cgroup)


@contextlib.contextmanager
def booted(workdir: Path) -> Iterator[Container]:
    """Build (or reuse) the tree, boot it, yield it, and tear it down whatever happens.

    Raises Unavailable where a prerequisite is missing (see `missing_prerequisite`),
    SetupFailed where, with all of them present, the container could not be had.
    """
    reason = missing_prerequisite()
    if reason is not None:
        raise Unavailable(reason)
    container = Container(rootfs(), workdir)
    try:
        container.boot()
        r = container.run(sys.executable, "-c", "import llmsup.cli, aiohttp, psutil", check=False)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["?"])[-1]
            raise SetupFailed(f"this project's Python does not run in {SUITE}: {last}")
        yield container
    finally:
        container.shutdown()
