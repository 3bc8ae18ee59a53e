"""Scale benchmark: llmsup and supervisord, each supervising many fake vLLM servers.

    .venv/bin/python bench/scale.py [--models 100] [--points 25,50] [--kills 20] [--idle 20]

For each number of models (the points, then --models), in one run and on the
same fake servers (`vllm serve org/mN --host 127.0.0.1 --port P ...`, the argv
`llmsup plan` gives, each with its own port and GPU index, FAKE_LOAD_TIME 1 s):

- the floor: the servers started by a bare loop of Popen;
- llmsup (`llmsup up --foreground`): until every model is READY, and until every
  /health answers; idle RSS and CPU; `llmsup status` and `status --json` wall
  time, the control API call alone; one process-table scan as the daemon does
  it (`process.members`, `process.marked_with`); respawn latency after SIGKILL
  (backoff_initial 0); `llmsup down`; and the status API's latency while it
  launches the same number of servers that only sleep (no CPU), to tell the
  daemon's own work from the load of many fakes booting on the same cores;
- supervisord, installed from PyPI into a venv of its own in the user's cache
  directory (autorestart=true, startsecs=1, startretries and backoff left at
  their defaults), with the same argv and environment: until every /health
  answers, idle RSS and CPU, `supervisorctl status`, respawn latency, shutdown.

supervisord only starts processes and never waits for HTTP readiness: "up" is
compared on the time until every server's /health answers 200, watched the same
way (this script polls the ports) for the floor, llmsup and supervisord.
Respawn latency is from the SIGKILL of a server to a new child process of the
supervisor, read from /proc/PID/task/*/children the same way for both. llmsup
also stops the orphaned EngineCore before it respawns; supervisord leaves it.

At the largest point a separate pass profiles the llmsup daemon with py-spy
(up, kills, down). Figures are medians (p90 beside them); growth is given as
the exponent k in cost ~ models^k between the first and last points, and as
the marginal cost per model between consecutive points. Writes
bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import json
import math
import os
import platform
import re
import resource
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stats import summary_ms  # noqa: E402
from llmsup import process  # noqa: E402
from llmsup.client import call  # noqa: E402
from tests.supervisor_util import Lineage  # noqa: E402

FAKES = ROOT / "tests" / "fakes"
RESULTS = ROOT / "bench" / "results"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmsup-bench"
LOAD_TIME = 1.0  # FAKE_LOAD_TIME of every server
KILL_GAP = 0.5  # seconds between kills: the new server's start-up settles
PROFILE_RATE = 100  # py-spy samples per second


class BenchError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------- helpers


def timed(fn: Callable[[], Any], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed_cli(fn: Callable[[], Any], runs: int) -> dict[str, float]:
    """Wall time of a command (median, p90) and its own CPU time (median): on 2 cores
    with hundreds of fake processes ticking, wall time also holds the wait for a CPU."""
    walls, cpus = [], []
    for _ in range(runs):
        c, t = children_cpu(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(children_cpu() - c)
    return {**summary_ms(walls), "cpu_median_ms": statistics.median(cpus) * 1000}


def thread_cpu(fn: Callable[[], Any], runs: int) -> float:
    """Median CPU time of `fn` in this thread (ms): free of waits for a CPU."""
    out = []
    for _ in range(runs):
        t = time.thread_time()
        fn()
        out.append(time.thread_time() - t)
    return statistics.median(out) * 1000


def free_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            ports.add(int(s.getsockname()[1]))
    return sorted(ports)


def children(pid: int) -> set[int]:
    """Child pids of `pid` (of all its threads), straight from /proc."""
    out: set[int] = set()
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
                out.update(int(x) for x in f.read().split())
    return out


def port_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().decode(errors="replace").split("\0")
    except OSError:
        return None
    for a, b in itertools.pairwise(args):
        if a == "--port":
            return int(b)
    return None


def healthy(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        resp.read()
        return resp.status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def cpu_seconds(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def idle_usage(pid: int, seconds: float) -> dict[str, float]:
    """The supervisor's RSS and CPU over `seconds`, and the CPU its servers take meanwhile
    (the fakes tick every 50 ms: the background every other figure here runs against)."""
    p = psutil.Process(pid)
    servers = list(p.children(recursive=True))

    def servers_cpu() -> float:
        total = 0.0
        for c in servers:
            with contextlib.suppress(psutil.Error):
                total += cpu_seconds(c)
        return total

    c0, s0, t0 = cpu_seconds(p), servers_cpu(), time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    return {
        "idle_window_s": seconds,
        "rss_mib": p.memory_info().rss / 2**20,
        "idle_cpu_percent": (cpu_seconds(p) - c0) / elapsed * 100,
        "servers_idle_cpu_percent": (servers_cpu() - s0) / elapsed * 100,
        "threads": p.num_threads(),
        "open_fds": p.num_fds(),
    }


LINEAGES: list[Lineage] = []


def lineage() -> Lineage:
    """What descends from the processes this run launches, by the kernel's process
    table (not by an environment tag, which vLLM's EngineCore blanks). Snapshots are
    taken where the run asks for them (`look`), so that none competes with what is
    measured."""
    out = Lineage(interval=None)
    LINEAGES.append(out)
    return out


def leftovers() -> list[psutil.Process]:
    """Every live process that descended from anything this run launched."""
    return list({p.pid: p for ours in LINEAGES for p, _ in ours.live()}.values())


def kill_all(procs: list[psutil.Process]) -> int:
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=5)
    return len(procs)


# ------------------------------------------------------------------ the models


@dataclass(frozen=True)
class Spec:
    name: str
    port: int
    argv: list[str]  # as `llmsup plan` gives it: argv[0] is looked up on PATH
    env: dict[str, str]


@dataclass
class Setup:
    n: int
    dir: Path
    manifest: Path
    state: Path
    specs: list[Spec] = field(default_factory=list)

    @property
    def sock(self) -> Path:
        return self.state / "control.sock"

    @property
    def key(self) -> str:
        return process.state_key(self.state)


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != process.MARKER}
    env["PATH"] = f"{FAKES}{os.pathsep}{env.get('PATH', '')}"
    return env


def llmsup_cmd() -> list[str]:
    script = Path(sys.executable).parent / "llmsup"
    return [str(script)] if script.exists() else [sys.executable, "-m", "llmsup.cli"]


def make_setup(root: Path, n: int, label: str = "llmsup") -> Setup:
    d = root / f"{label}-{n}"
    d.mkdir()
    s = Setup(n, d, d / "models.yaml", d / "state")
    lines = [
        f"state_dir: {s.state}",
        "defaults:",
        "  health: {interval: 10s, timeout: 5s, failures: 3, startup_timeout: 3m}",
        "  restart: {backoff_initial: 0s, backoff_max: 0s, max_restarts: 100000, window: 1s}",
        "  stop_timeout: 10s",
        "models:",
    ]
    for i, port in enumerate(free_ports(n)):
        lines.append(
            f"  m{i}: {{backend: vllm, model: org/m{i}, port: {port}, gpus: [{i}], "
            f"env: {{FAKE_LOAD_TIME: '{LOAD_TIME}'}}}}"
        )
    s.manifest.write_text("\n".join(lines) + "\n")
    r = subprocess.run(
        [*llmsup_cmd(), "plan", "-f", str(s.manifest), "--json"],
        env=base_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        raise BenchError(f"llmsup plan failed: {r.stderr}")
    s.specs = [
        Spec(row["name"], int(row["port"]), list(row["argv"]), dict(row["env"]))
        for row in json.loads(r.stdout)
    ]
    return s


class Watch:
    """Polls every port's /health until all answer 200; first-200 time per port."""

    def __init__(self, ports: list[int], t0: float) -> None:
        self.t0 = t0
        self.pending = list(ports)
        self.first: dict[int, float] = {}

    def poll(self) -> bool:
        for port in list(self.pending):
            if healthy(port):
                self.first[port] = time.monotonic() - self.t0
                self.pending.remove(port)
        return not self.pending

    @property
    def all_s(self) -> float:
        return max(self.first.values())


def watch_up(
    s: Setup,
    t0: float,
    parent: int,
    ready: Callable[[], bool] | None = None,
    timeout: float = 180,
) -> dict[str, float]:
    """Poll until every server answers (and `ready()`, if given); times from t0."""
    w = Watch([x.port for x in s.specs], t0)
    out: dict[str, float] = {}
    deadline = t0 + timeout
    while True:
        now = time.monotonic()
        if "all_spawned_s" not in out and len(children(parent)) >= s.n:
            out["all_spawned_s"] = now - t0
        done = w.poll()
        if ready is not None and "all_ready_s" not in out and ready():
            out["all_ready_s"] = time.monotonic() - t0
        if done and (ready is None or "all_ready_s" in out):
            break
        if time.monotonic() > deadline:
            raise BenchError(f"{len(w.pending)} of {s.n} servers never answered /health")
        time.sleep(0.05)
    out["all_healthy_s"] = w.all_s
    out["first_healthy_s"] = min(w.first.values())
    return out


def respawns(parent: int, specs: list[Spec]) -> list[float]:
    """SIGKILL each server once; time until `parent` has a new child process."""
    out = []
    for spec in specs:
        before = children(parent)
        victims = [p for p in before if port_of(p) == spec.port]
        if len(victims) != 1:
            raise BenchError(f"{spec.name}: {len(victims)} server processes on {spec.port}")
        t0 = time.monotonic()
        os.kill(victims[0], signal.SIGKILL)
        while not children(parent) - before:
            if time.monotonic() - t0 > 30:
                raise BenchError(f"{spec.name}: no new process 30 s after SIGKILL")
            time.sleep(0.001)
        out.append(time.monotonic() - t0)
        time.sleep(KILL_GAP)
    return out


def kill_targets(s: Setup, kills: int) -> list[Spec]:
    """Distinct models, spread over the manifest (each killed once)."""
    k = min(kills, s.n)
    return [s.specs[(i * s.n) // k] for i in range(k)]


# ------------------------------------------------------------------- the floor


def run_bare(root: Path, s: Setup) -> dict[str, Any]:
    env = base_env()
    out = root / f"bare-{s.n}.log"
    procs: list[subprocess.Popen[bytes]] = []
    ours = lineage()
    try:
        with open(out, "ab") as f:
            t0 = time.monotonic()
            for spec in s.specs:
                procs.append(
                    subprocess.Popen(
                        spec.argv,
                        env={**env, **spec.env},
                        stdin=subprocess.DEVNULL,
                        stdout=f,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
                ours.anchor(procs[-1].pid)
        res = watch_up(s, t0, os.getpid())
        ours.look()
        return res
    finally:
        for p in procs:
            with contextlib.suppress(OSError):
                p.terminate()
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
        kill_all([p for p, _ in ours.live()])


# ---------------------------------------------------------------------- llmsup


class LlmsupDaemon:
    def __init__(self, s: Setup) -> None:
        self.s = s
        self.proc: subprocess.Popen[bytes] | None = None
        self.t0 = 0.0
        self.calls: list[float] = []  # status call latencies while polling for READY
        self.lineage = lineage()

    def start(self, extra_env: dict[str, str] | None = None) -> None:
        with open(self.s.dir / "daemon.out", "ab") as out:
            self.t0 = time.monotonic()
            self.proc = subprocess.Popen(
                [*llmsup_cmd(), "up", "--foreground", "-f", str(self.s.manifest)],
                env={**base_env(), **(extra_env or {})},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        self.lineage.anchor(self.proc.pid)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def status(self) -> list[dict[str, Any]]:
        _, data = call(self.s.sock, "GET", "/v1/status", timeout=10)
        return list(data["models"])

    def all_ready(self) -> bool:
        t = time.perf_counter()
        try:
            rows = self.status()
        except Exception:
            return False
        self.calls.append(time.perf_counter() - t)
        return len(rows) == self.s.n and all(r["state"] == "READY" for r in rows)

    def wait_api(self, timeout: float = 60) -> float:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(Exception):
                self.status()
                return time.monotonic() - self.t0
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"llmsup daemon did not answer: {self.tail()}")
            time.sleep(0.02)

    def wait_all_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not self.all_ready():
            if time.monotonic() > deadline:
                raise BenchError(f"llmsup: not all READY after {timeout} s: {self.tail()}")
            time.sleep(0.1)

    def tail(self, chars: int = 2000) -> str:
        f = self.s.dir / "daemon.out"
        return f.read_text(errors="replace")[-chars:] if f.exists() else ""

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*llmsup_cmd(), *args, "-f", str(self.s.manifest)],
            env=base_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def down(self) -> float:
        """`llmsup down` (returns once no process is left); its wall time."""
        t = time.monotonic()
        r = self.cli("down", timeout=300)
        wall = time.monotonic() - t
        if r.returncode != 0:
            raise BenchError(f"llmsup down failed: {r.stdout}{r.stderr}")
        assert self.proc is not None
        self.proc.wait(30)
        return wall

    def stop(self) -> None:
        """Whatever happened: no daemon and no server of this state dir is left."""
        self.lineage.look()  # the tree as it stands, before `down` orphans anything
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.cli("down", timeout=120)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
        kill_all([p for p, _ in self.lineage.live()])


def scans(s: Setup) -> dict[str, float]:
    """One walk of the process table as the daemon does it, timed here (same psutil):
    wall time, and CPU time (the work itself)."""
    rec = process.load_records(s.state)[0]
    members = timed(lambda: process.members(rec), 5)
    marked = timed(lambda: process.marked_with(s.key + ":"), 5)
    return {
        "processes_on_host": len(psutil.pids()),
        "members_scan_ms": statistics.median(members) * 1000,
        "members_scan_cpu_ms": thread_cpu(lambda: process.members(rec), 5),
        "marked_with_scan_ms": statistics.median(marked) * 1000,
        "marked_with_scan_cpu_ms": thread_cpu(lambda: process.marked_with(s.key + ":"), 5),
    }


def run_llmsup(s: Setup, kills: int, idle: float, status_runs: int) -> dict[str, Any]:
    d = LlmsupDaemon(s)
    res: dict[str, Any] = {}
    try:
        d.start()
        res["api_answers_s"] = d.wait_api()
        res.update(watch_up(s, d.t0, d.pid, d.all_ready))
        d.lineage.look()  # every server's tree, EngineCores included
        res["up_minus_load_s"] = res["all_ready_s"] - LOAD_TIME
        res["status_api_call_during_up"] = summary_ms(d.calls)
        time.sleep(3)
        res.update(idle_usage(d.pid, idle))
        res["status_api_call"] = summary_ms(timed(d.status, 20))

        def cli_status() -> None:
            r = d.cli("status")
            if r.returncode != 0 or r.stdout.count(" READY ") != s.n:
                raise BenchError(f"llmsup status: {r.stdout[-500:]}{r.stderr}")

        def cli_status_json() -> None:
            r = d.cli("status", "--json")
            if r.returncode != 0 or len(json.loads(r.stdout)["models"]) != s.n:
                raise BenchError(f"llmsup status --json: {r.stdout[-500:]}{r.stderr}")

        res["status_cli"] = timed_cli(cli_status, status_runs)
        res["status_cli_json"] = timed_cli(cli_status_json, status_runs)
        res.update(scans(s))
        targets = kill_targets(s, kills)
        res["respawn"] = summary_ms(respawns(d.pid, targets))
        d.wait_all_ready()
        d.lineage.look()  # the new servers' trees
        restarts = {r["name"]: r["restarts"] for r in d.status()}
        res["restarts_seen"] = sum(restarts.values())
        res["down_s"] = d.down()
        res["left_after_down"] = len(d.lineage.live())
        return res
    finally:
        d.stop()


QUIET_VLLM = "#!/bin/sh\nexec sleep 600\n"


def quiet_launch(root: Path, n: int, seconds: float = 10.0) -> dict[str, Any]:
    """The same launch of n servers with a `vllm` that only sleeps (no CPU, never
    ready): the status API's latency while the daemon spawns and probes them,
    without n Python fakes booting on the same cores."""
    bin_dir = root / f"quiet-bin-{n}"
    bin_dir.mkdir()
    exe = bin_dir / "vllm"
    exe.write_text(QUIET_VLLM)
    exe.chmod(0o755)
    d = LlmsupDaemon(make_setup(root, n, "quiet"))
    try:
        d.start({"PATH": f"{bin_dir}{os.pathsep}{base_env()['PATH']}"})
        d.wait_api()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            d.all_ready()  # records each call's latency
            time.sleep(0.05)
        spawned = sum(1 for r in d.status() if r["pid"])
        return {"status_api_call": summary_ms(d.calls), "spawned": spawned}
    finally:
        d.stop()


# ----------------------------------------------------------------- supervisord


TOOLS_VENV = CACHE / "supervisord-venv"


def supervisord_venv() -> tuple[Path, str]:
    """supervisord (and py-spy, for the profile) from PyPI, in a venv of their own
    (never the project's)."""
    venv = TOOLS_VENV
    bin_dir = venv / "bin"
    if not (bin_dir / "supervisord").exists() or not (bin_dir / "py-spy").exists():
        log(f"installing supervisor and py-spy into {venv}")
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        r = subprocess.run(
            [str(bin_dir / "pip"), "install", "-q", "supervisor", "py-spy"],
            capture_output=True,
            text=True,
            check=False,
        )
        if r.returncode != 0:
            raise BenchError(f"pip install supervisor py-spy failed: {r.stdout}{r.stderr}")
    version = subprocess.run(
        [str(bin_dir / "supervisord"), "--version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return bin_dir, version


def supervisord_conf(s: Setup, root: Path) -> Path:
    d = root / f"supervisord-{s.n}"
    (d / "logs").mkdir(parents=True)
    parts = [
        f"[unix_http_server]\nfile={d}/supervisor.sock\nchmod=0700\n",
        f"[supervisord]\nnodaemon=true\nlogfile={d}/supervisord.log\n"
        f"pidfile={d}/supervisord.pid\nchildlogdir={d}/logs\n",
        "[rpcinterface:supervisor]\n"
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n",
        f"[supervisorctl]\nserverurl=unix://{d}/supervisor.sock\n",
    ]
    for spec in s.specs:
        env = ",".join(f'{k}="{v}"' for k, v in spec.env.items())
        parts.append(
            f"[program:{spec.name}]\ncommand={shlex.join(spec.argv)}\nenvironment={env}\n"
            "autostart=true\nautorestart=true\nstartsecs=1\nstopwaitsecs=10\n"
            f"redirect_stderr=true\nstdout_logfile={d}/logs/{spec.name}.log\n"
        )
    conf = d / "supervisord.conf"
    conf.write_text("\n".join(parts))
    return conf


def run_supervisord(
    root: Path, s: Setup, bin_dir: Path, kills: int, idle: float, status_runs: int
) -> dict[str, Any]:
    conf = supervisord_conf(s, root)
    res: dict[str, Any] = {}
    proc: subprocess.Popen[bytes] | None = None
    ours = lineage()
    try:
        with open(conf.parent / "supervisord.out", "ab") as out:
            t0 = time.monotonic()
            proc = subprocess.Popen(
                [str(bin_dir / "supervisord"), "-n", "-c", str(conf)],
                env=base_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        ours.anchor(proc.pid)
        res.update(watch_up(s, t0, proc.pid))
        ours.look()  # every server's tree, EngineCores included
        res["up_minus_load_s"] = res["all_healthy_s"] - LOAD_TIME
        time.sleep(3)
        res.update(idle_usage(proc.pid, idle))

        def ctl_status() -> None:
            r = subprocess.run(
                [str(bin_dir / "supervisorctl"), "-c", str(conf), "status"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            if r.stdout.count("RUNNING") != s.n:
                raise BenchError(f"supervisorctl status: {r.stdout[-500:]}{r.stderr}")

        res["status_cli"] = timed_cli(ctl_status, status_runs)
        res["respawn"] = summary_ms(respawns(proc.pid, kill_targets(s, kills)))
        w = Watch([x.port for x in s.specs], time.monotonic())
        deadline = time.monotonic() + 60
        while not w.poll():
            if time.monotonic() > deadline:
                raise BenchError("supervisord: servers not back after the kills")
            time.sleep(0.1)
        ours.look()
        t = time.monotonic()
        proc.terminate()
        proc.wait(120)
        res["shutdown_s"] = time.monotonic() - t
        res["orphans_left_after_shutdown"] = len(ours.live())  # EngineCores of killed servers
        return res
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        kill_all([p for p, _ in ours.live()])


# --------------------------------------------------------------------- profile

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
SUSPECTS = {
    "process.members (process-table scan per stop)": "members (llmsup/process.py)",
    "process.marked_with (scan at start/cleanup)": "marked_with (llmsup/process.py)",
    "process._marker (environ reads)": "_marker (llmsup/process.py)",
    "psutil process_iter": "process_iter (psutil/__init__.py)",
    "Daemon.status / Server.status": "status (llmsup/daemon.py)",
    "Daemon.changed + notify tasks": "changed (llmsup/daemon.py)",
    "Daemon.changed.notify (cond.notify_all)": "notify (llmsup/daemon.py)",
    "readiness / health probes (probe.get_ok)": "get_ok (llmsup/probe.py)",
    "process.spawn": "spawn (llmsup/process.py)",
    "fork/exec (Popen._execute_child)": "Popen._execute_child (subprocess.py)",
    "Child._pump (server output)": "_pump (llmsup/process.py)",
    "foreground listener (cli printer)": "__call__ (llmsup/cli/daemon.py)",
    "loop idle (waiting in select)": "EpollSelector.select (selectors.py)",
}


def short_file(path: str) -> str:
    m = re.search(r"/lib/python3\.\d+/(?:site-packages/)?(.+)$", path)
    if m:
        return m[1]
    if "/llmsup/" in path:
        return "llmsup/" + path.rsplit("/llmsup/", 1)[1]
    return path


def frame_key(frame: str) -> str:
    m = FRAME.match(frame)
    return f"{m['func']} ({short_file(m['file'])})" if m else frame


def parse_profile(path: Path) -> dict[str, Any]:
    """py-spy raw output (`frame;frame;... count`): shares of the busy samples."""
    total = 0
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    text = path.read_text(errors="replace") if path.exists() else ""
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [frame_key(f) for f in stack.split(";")]
        n = int(count)
        total += n
        leaf[frames[-1]] += n
        for k in set(frames):
            inclusive[k] += n
    if not total:
        return {"samples": 0}

    def share(n: int) -> float:
        return round(100 * n / total, 1)

    ours = [(k, n) for k, n in inclusive.most_common() if k.endswith(".py)") and "llmsup/" in k]
    return {
        "samples": total,
        "seconds": total / PROFILE_RATE,
        "suspects_inclusive_pct": {
            name: share(sum(n for k, n in inclusive.items() if k.startswith(pat)))
            for name, pat in SUSPECTS.items()
        },
        "top_llmsup_inclusive_pct": {k: share(n) for k, n in ours[:15]},
        "top_self_pct": {k: share(n) for k, n in leaf.most_common(12)},
    }


@contextlib.contextmanager
def py_spy(pid: int, out: Path) -> Iterator[None]:
    spy_bin = TOOLS_VENV / "bin" / "py-spy"
    argv = [str(spy_bin), "record", "--pid", str(pid), "--format", "raw"]
    argv += ["--rate", str(PROFILE_RATE), "--nonblocking", "-o", str(out)]
    with open(out.with_suffix(".log"), "wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
        time.sleep(0.3)  # attached and sampling
        try:
            yield
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


SLOW_STEP = re.compile(
    r"Executing <(?:Task \w+ name='[^']*' coro=<(?P<coro>[\w.]+)\(\)|Handle (?P<handle>[\w.]+))"
    r".* took (?P<s>[\d.]+) seconds"
)


def loop_stalls(log_text: str) -> dict[str, Any]:
    """asyncio debug mode's slow-callback lines (steps of 0.1 s or more), by callback."""
    by: dict[str, list[float]] = {}
    for m in SLOW_STEP.finditer(log_text):
        by.setdefault(m["coro"] or m["handle"], []).append(float(m["s"]))
    steps = [x for xs in by.values() for x in xs]
    return {
        "slow_steps": len(steps),
        "total_s": round(sum(steps), 2),
        "max_s": max(steps, default=0.0),
        "by_callback": {
            k: {"n": len(xs), "total_s": round(sum(xs), 2), "max_s": max(xs)}
            for k, xs in sorted(by.items(), key=lambda kv: -sum(kv[1]))
        },
    }


def profile_llmsup(root: Path, s: Setup, kills: int) -> dict[str, Any]:
    """The same daemon and servers again: the launch under asyncio's debug mode (which
    names every loop step of 0.1 s or more: py-spy barely samples a thread that is
    inside fork/exec), then kills and `down` under py-spy (every thread, busy samples)."""
    res: dict[str, Any] = {}
    d = LlmsupDaemon(s)
    try:
        d.start({"PYTHONASYNCIODEBUG": "1"})
        d.wait_api()
        up = watch_up(s, d.t0, d.pid, d.all_ready)
        d.lineage.look()
        res["up_asyncio_debug"] = {
            "all_ready_s": up["all_ready_s"],
            "status_api_call_max_ms": max(d.calls) * 1000,
            **loop_stalls(d.tail(10**7)),
        }
        d.down()
    finally:
        d.stop()
    d = LlmsupDaemon(s)
    try:
        d.start()
        d.wait_api()
        d.wait_all_ready(timeout=180)
        d.lineage.look()
        with py_spy(d.pid, root / "profile-kills.txt"):
            lat = respawns(d.pid, kill_targets(s, kills))
        res["kills"] = {"respawn_under_profiler": summary_ms(lat)}
        res["kills"].update(parse_profile(root / "profile-kills.txt"))
        d.wait_all_ready()
        d.lineage.look()
        with py_spy(d.pid, root / "profile-down.txt"):
            d.down()
        res["down"] = parse_profile(root / "profile-down.txt")
        return res
    finally:
        d.stop()


# ---------------------------------------------------------------------- growth


def dig(d: dict[str, Any], path: str) -> float | None:
    cur: Any = d
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return float(cur) if isinstance(cur, (int, float)) else None


GROWTH = {
    "llmsup up, all READY minus load (s)": "llmsup.up_minus_load_s",
    "llmsup up, all /health 200 (s)": "llmsup.all_healthy_s",
    "supervisord up, all /health 200 (s)": "supervisord.all_healthy_s",
    "floor (bare Popen), all /health 200 (s)": "bare.all_healthy_s",
    "llmsup status CLI (ms)": "llmsup.status_cli.median_ms",
    "llmsup status --json CLI (ms)": "llmsup.status_cli_json.median_ms",
    "llmsup status API call (ms)": "llmsup.status_api_call.median_ms",
    "llmsup status CLI CPU (ms)": "llmsup.status_cli.cpu_median_ms",
    "supervisorctl status (ms)": "supervisord.status_cli.median_ms",
    "supervisorctl status CPU (ms)": "supervisord.status_cli.cpu_median_ms",
    "llmsup status call max while launching (ms)": "llmsup.status_api_call_during_up.max_ms",
    "llmsup status call max while launching servers that sleep (ms)": (
        "llmsup.quiet_launch.status_api_call.max_ms"
    ),
    "llmsup all spawned (s)": "llmsup.all_spawned_s",
    "supervisord all spawned (s)": "supervisord.all_spawned_s",
    "floor all spawned (s)": "bare.all_spawned_s",
    "llmsup respawn (ms)": "llmsup.respawn.median_ms",
    "supervisord respawn (ms)": "supervisord.respawn.median_ms",
    "llmsup process.members scan (ms)": "llmsup.members_scan_ms",
    "llmsup process.members scan CPU (ms)": "llmsup.members_scan_cpu_ms",
    "llmsup process.marked_with scan CPU (ms)": "llmsup.marked_with_scan_cpu_ms",
    "llmsup down (s)": "llmsup.down_s",
    "supervisord shutdown (s)": "supervisord.shutdown_s",
    "llmsup RSS (MiB)": "llmsup.rss_mib",
    "supervisord RSS (MiB)": "supervisord.rss_mib",
    "llmsup idle CPU (%)": "llmsup.idle_cpu_percent",
    "supervisord idle CPU (%)": "supervisord.idle_cpu_percent",
    "servers' own idle CPU (%)": "llmsup.servers_idle_cpu_percent",
}


def growth(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Per figure: values by models, exponent k (cost ~ models^k), marginal cost per model."""
    out: dict[str, Any] = {}
    for label, path in GROWTH.items():
        vals = [(int(p["models"]), dig(p, path)) for p in points]
        pairs = [(n, v) for n, v in vals if v is not None]
        if len(pairs) < 2:
            continue
        (n0, v0), (n1, v1) = pairs[0], pairs[-1]
        k = math.log(v1 / v0) / math.log(n1 / n0) if v0 > 0 and v1 > 0 else None
        marginal = {
            f"{a}->{b}": (vb - va) / (b - a) for (a, va), (b, vb) in itertools.pairwise(pairs)
        }
        out[label] = {
            "by_models": {str(n): round(v, 3) for n, v in pairs},
            "exponent": None if k is None else round(k, 2),
            "marginal_per_model": {key: round(v, 4) for key, v in marginal.items()},
        }
    return out


def ratios(p: dict[str, Any]) -> dict[str, float]:
    pairs = {
        "up_all_healthy": ("llmsup.all_healthy_s", "supervisord.all_healthy_s"),
        "status_cli": ("llmsup.status_cli.median_ms", "supervisord.status_cli.median_ms"),
        "status_cli_cpu": (
            "llmsup.status_cli.cpu_median_ms",
            "supervisord.status_cli.cpu_median_ms",
        ),
        "status_cli_json": ("llmsup.status_cli_json.median_ms", "supervisord.status_cli.median_ms"),
        "rss": ("llmsup.rss_mib", "supervisord.rss_mib"),
        "idle_cpu": ("llmsup.idle_cpu_percent", "supervisord.idle_cpu_percent"),
        "respawn": ("llmsup.respawn.median_ms", "supervisord.respawn.median_ms"),
        "stop_all": ("llmsup.down_s", "supervisord.shutdown_s"),
    }
    out = {}
    for name, (a, b) in pairs.items():
        va, vb = dig(p, a), dig(p, b)
        if va is not None and vb:
            out[name] = round(va / vb, 2)
    return out


# ------------------------------------------------------------------------ main


def print_summary(res: dict[str, Any]) -> None:
    print(f"\nllmsup vs supervisord {res['supervisord_version']}, {res['machine']}")
    print(f"fake vLLM servers, FAKE_LOAD_TIME {LOAD_TIME:g} s; ratios are llmsup/supervisord")
    print(
        f"load average at start {res['loadavg_at_start'][0]:.1f}, "
        f"{res['processes_at_start']} processes (other work on this machine skews wall times)\n"
    )
    # (label, figure, also supervisord's, digits); "bare." figures are the floor's
    rows = [
        ("up: all /health 200 (s)", "all_healthy_s", True, 2),
        ("  floor: bare Popen (s)", "bare.all_healthy_s", False, 2),
        ("  llmsup all READY - load (s)", "up_minus_load_s", False, 2),
        ("  all servers spawned (s)", "all_spawned_s", True, 2),
        ("  floor: all spawned (s)", "bare.all_spawned_s", False, 2),
        ("  llmsup API first answer (s)", "api_answers_s", False, 2),
        ("  status API call max (ms)", "status_api_call_during_up.max_ms", False, 0),
        ("  same, servers that sleep (ms)", "quiet_launch.status_api_call.max_ms", False, 0),
        ("status CLI wall (ms)", "status_cli.median_ms", True, 0),
        ("status CLI CPU (ms)", "status_cli.cpu_median_ms", True, 0),
        ("status --json CLI wall (ms)", "status_cli_json.median_ms", False, 0),
        ("status --json CLI CPU (ms)", "status_cli_json.cpu_median_ms", False, 0),
        ("status API call (ms)", "status_api_call.median_ms", False, 1),
        ("RSS idle (MiB)", "rss_mib", True, 1),
        ("CPU idle (%)", "idle_cpu_percent", True, 2),
        ("  servers' own idle CPU (%)", "servers_idle_cpu_percent", True, 0),
        ("respawn median (ms)", "respawn.median_ms", True, 1),
        ("respawn p90 (ms)", "respawn.p90_ms", True, 1),
        ("stop all (s)", "down_s", True, 2),
        ("members() scan wall (ms)", "members_scan_ms", False, 1),
        ("members() scan CPU (ms)", "members_scan_cpu_ms", False, 1),
        ("processes on host", "processes_on_host", False, 0),
    ]
    for p in res["points"]:
        print(f"--- {p['models']} models")
        print(f"{'':32}{'llmsup':>10}{'supervisord':>13}{'ratio':>8}")
        for label, key, both, nd in rows:
            va = dig(p, key if key.startswith("bare.") else f"llmsup.{key}")
            skey = "shutdown_s" if key == "down_s" else key
            vb = dig(p, f"supervisord.{skey}") if both else None
            ratio = f"{va / vb:8.2f}" if va is not None and vb else ""
            sa = f"{va:10.{nd}f}" if va is not None else f"{'-':>10}"
            sb = f"{vb:13.{nd}f}" if vb is not None else f"{'':>13}"
            print(f"{label:32}{sa}{sb}{ratio}")
    print("\ngrowth (exponent k: cost ~ models^k, first to last point; marginal per model)")
    for label, g in res["growth"].items():
        marg = ", ".join(f"{k}: {v:g}" for k, v in g["marginal_per_model"].items())
        print(f"  {label:42} k={g['exponent']}  [{marg}]")
    prof = res.get("profile")
    if prof:
        up = prof["up_asyncio_debug"]
        print(
            f"\nllmsup launch of {prof['models']} models, asyncio debug mode: "
            f"{up['slow_steps']} loop steps >= 0.1 s, {up['total_s']} s in all, "
            f"max {up['max_s']} s; status call max {up['status_api_call_max_ms']:.0f} ms"
        )
        for name, v in list(up["by_callback"].items())[:4]:
            print(f"  {name}: {v['n']} steps, {v['total_s']} s, max {v['max_s']} s")
        print(f"llmsup daemon under py-spy at {prof['models']} models (% of busy samples)")
        for phase in ("kills", "down"):
            ph = prof.get(phase, {})
            if not ph.get("samples"):
                continue
            sus = {k: v for k, v in ph["suspects_inclusive_pct"].items() if v >= 1.0}
            print(
                f"  {phase} ({ph['seconds']:.1f} busy s): "
                + "; ".join(f"{k} {v}%" for k, v in sus.items())
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", type=int, default=100, help="the largest point")
    ap.add_argument("--points", default="25,50", help="smaller numbers of models")
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument(
        "--idle", type=float, default=20.0, help="seconds of idle measurement (half below --models)"
    )
    ap.add_argument("--status-runs", type=int, default=10)
    ap.add_argument("--profile-kills", type=int, default=10)
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    sizes = sorted({int(x) for x in args.points.split(",") if x.strip()} | {args.models})

    def on_term(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    t_start = time.monotonic()
    bin_dir, version = supervisord_venv()
    res: dict[str, Any] = {
        "machine": f"{platform.node()} {os.cpu_count()} cpus, {platform.python_version()}",
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "supervisord_version": version,
        "fake_load_time_s": LOAD_TIME,
        "loadavg_at_start": os.getloadavg(),
        "processes_at_start": len(psutil.pids()),
        "kills": args.kills,
        "notes": [
            "supervisord only starts processes; it does not wait for HTTP readiness. "
            "'up' is compared on the time until every server's /health answers 200, "
            "polled by this script for the floor, llmsup and supervisord alike.",
            "respawn: SIGKILL of one server (its API process) to a new child process of the "
            "supervisor, read from /proc the same way for both. llmsup (backoff_initial 0) "
            "first stops the orphaned EngineCore the killed server leaves; supervisord "
            "restarts at once (no backoff before the first restart of a RUNNING process) "
            "and leaves the orphan running (orphans_left_after_shutdown).",
            "members/marked_with scans are timed in this process with the same psutil, "
            "while the llmsup daemon and its servers run.",
            "2 cores: the fakes tick every 50 ms (servers_idle_cpu_percent) and booting 100 "
            "Python servers saturates both cores, so wall times at the larger points include "
            "waits for a CPU; CPU-time figures (cpu_median_ms, *_cpu_ms) do not.",
        ],
        "points": [],
    }
    with tempfile.TemporaryDirectory(prefix="llmsup-scale-") as tmp:
        root = Path(tmp)
        try:
            for n in sizes:
                s = make_setup(root, n)
                point: dict[str, Any] = {"models": n}
                log(f"{n} models: bare Popen floor")
                point["bare"] = run_bare(root, s)
                log(f"{n} models: llmsup")
                idle = args.idle if n == sizes[-1] else args.idle / 2
                point["llmsup"] = run_llmsup(s, args.kills, idle, args.status_runs)
                log(f"{n} models: llmsup, servers that only sleep")
                point["llmsup"]["quiet_launch"] = quiet_launch(root, n)
                log(f"{n} models: supervisord")
                point["supervisord"] = run_supervisord(
                    root, s, bin_dir, args.kills, idle, args.status_runs
                )
                point["ratios_llmsup_over_supervisord"] = ratios(point)
                res["points"].append(point)
            if not args.no_profile:
                log(f"{args.models} models: llmsup under py-spy")
                s = make_setup(root, args.models, "profiled")
                res["profile"] = {
                    "models": args.models,
                    **profile_llmsup(root, s, args.profile_kills),
                }
        finally:
            left = kill_all(leftovers())
            if left:
                log(f"stopped {left} leftover processes")
    res["growth"] = growth(res["points"])
    res["loadavg_at_end"] = os.getloadavg()
    res["total_run_s"] = time.monotonic() - t_start
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(res, indent=2) + "\n")
    print_summary(res)
    print(f"\nwrote {RESULTS / 'scale.json'} ({res['total_run_s']:.0f} s)")


if __name__ == "__main__":
    main()
