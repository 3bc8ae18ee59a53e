"""Chaos run: hundreds of seeded faults against one daemon and eight fake servers.

    .venv/bin/python bench/chaos.py [--faults 300] [--seed 1] [--max-seconds 900]

A real `llmsup up --foreground` supervises fake vLLM servers (with and without
tensor parallelism), fake Ollama servers (with runner children), an on-demand
model behind the gateway, and one model whose restart policy is `never`.
Faults come one at a time or overlapping: SIGKILL of a server, of an
EngineCore, of a TP worker or of an Ollama runner; SIGSTOP; /health answering
500; a hung server (some also ignoring SIGTERM); a stalled generation; a
foreign process taking a model's port while it restarts; the daemon SIGKILLed
and started again; an upgrade; reloads that change a model (some while that
model is being stopped). A steady trickle of chat completions goes through the
gateway all along.

The daemon's deaths are live restores: every server that was READY and untouched
when the daemon died must be adopted by the next one, the same process (pid and
start time) READY again; a model restarted by it counts in "model restarts
caused by daemon deaths" (expected: 0). A daemon kill may first SIGSTOP or hang a
model or two (the daemon may be stopping them at the kill): the next daemon
adopts them too and replaces them once they fail to answer, never while a
process of their old instance is left (the one of policy `never` is FAILED then,
and restarted). An upgrade is `llmsup down --keep-models`, then `up
--foreground` of tests/fakes/newer_llmsup.py (this code, one state format
ahead). The first upgrade moves the state directory a format ahead, which this
llmsup then refuses; so from then on every daemon start and every CLI call of
the run goes through the newer runner, and a later upgrade is newer -> newer
(the hand-over an upgrade within one format makes).

Every server prints `tick N` every 20 ms (FAKE_TICK); after the run, each log's
ticks are read per instance (a restarted server begins again at 0): a gap in a
sequence is output lost on its way to the log, across a daemon death or not.

After each fault (and every few faults, with nothing in flight) it checks that
models recover (READY, or FAILED where the policy says so), that no process of
a dead instance is left, and samples the daemon's fds and RSS. What is left is
judged by the kernel's process tree, sessions, groups and cgroups as the tests'
`Lineage` remembers them, not by llmsup's marker; two vLLM models run workers
whose helper leaves the session with an empty environment (FAKE_WORKER_ESCAPE). A
server's log shim (no marker, outside its session) counts as the server's while it
is the parent of a live server process. Writes bench/results/chaos.json, prints a
summary, and exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmsup.client import call  # noqa: E402
from llmsup.process import state_key  # noqa: E402
from tests.supervisor_util import LLMSUP, Daemon, read_stat  # noqa: E402
from tests.util import FAKES_DIR, free_port, wait_for  # noqa: E402

RESULTS = ROOT / "bench" / "results"
T = TypeVar("T")

READY_BOUND = 30.0  # seconds for a model to be READY again after a fault
FAILED_BOUND = 20.0  # seconds for a model to be FAILED where its policy says so
CLIENT_TIMEOUT = 20.0  # a gateway request that takes longer is a hang
IDLE_TIMEOUT = 6.0  # of the on-demand model
FD_TOLERANCE = 5  # open fds: last third's median may exceed the first's by this
FD_FILE_TOLERANCE = 2  # the same for fds other than sockets (logs, pipes, pidfds)
RSS_TOLERANCE_MIB = 8.0  # RSS: the same, in MiB
TICK = 0.02  # seconds between the `tick N` lines of every server (FAKE_TICK)
NEWER = [sys.executable, str(FAKES_DIR / "newer_llmsup.py")]  # one state format ahead

DEFAULTS = """\
defaults:
  health: {interval: 300ms, timeout: 800ms, failures: 2, startup_timeout: 20s,
           deep_probe: true, deep_interval: 1s}
  restart: {backoff_initial: 100ms, backoff_max: 1s, max_restarts: 1000, window: 1m}
  stop_timeout: 2s
"""

# A foreign process (no llmsup marker) that takes a port as soon as it is free.
GRABBER = r"""
import socket, sys, time
held = None
for line in sys.stdin:
    cmd, *rest = line.split()
    if cmd == "grab":
        port, end = int(rest[0]), time.monotonic() + float(rest[1])
        while True:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
                s.listen(8)
                held = s
                print("ok", flush=True)
                break
            except OSError:
                s.close()
            if time.monotonic() > end:
                print("miss", flush=True)
                break
            time.sleep(0.001)
    elif cmd == "release":
        if held is not None:
            held.close()
            held = None
        print("released", flush=True)
"""


def poll(pred: Callable[[], T | None], timeout: float, interval: float = 0.05) -> T | None:
    """`pred()` once it is truthy, or None after `timeout` seconds."""
    try:
        return wait_for(pred, timeout, interval)
    except AssertionError:
        return None


def alive(pid: int, created: float | None = None) -> bool:
    try:
        p = psutil.Process(pid)
        if created is not None and abs(p.create_time() - created) > 0.01:
            return False
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stats(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "median_s": None, "max_s": None}
    return {
        "n": len(values),
        "median_s": round(statistics.median(values), 3),
        "max_s": round(max(values), 3),
    }


# ------------------------------------------------------------------ the fleet


@dataclass
class Model:
    name: str
    backend: str  # vllm | ollama
    served: str  # the name clients send through the gateway
    port: int
    control: Path  # FAKE_CONTROL_FILE of every instance
    gpus: list[int] = field(default_factory=list)
    on_demand: bool = False
    fragile: bool = False  # restart policy never: every fault ends FAILED
    escape: bool = False  # vLLM workers start a helper that leaves the session, no env
    gen: int = 0  # an env value that reloads change

    @property
    def tp(self) -> int:
        return len(self.gpus) if self.backend == "vllm" else 1

    def yaml(self, tmp: Path) -> str:
        env = {
            "FAKE_CONTROL_FILE": str(self.control),
            "CHAOS_GEN": str(self.gen),
            "FAKE_TICK": f"{TICK:g}",
        }
        if self.escape:
            env["FAKE_WORKER_ESCAPE"] = "1"
        if self.backend == "ollama":
            env |= {"OLLAMA_MODELS": str(tmp / f"ollama-{self.name}"), "FAKE_PULL_TIME": "0.1"}
            head = f"backend: ollama, model: {json.dumps(self.served)}"
        else:
            head = f"backend: vllm, model: org/{self.name}, served_name: {self.served}"
            head += f", gpus: {self.gpus}"
        extra = ""
        if self.on_demand:
            extra += f", start: on_demand, idle_timeout: {IDLE_TIMEOUT:g}s"
        if self.fragile:
            extra += ", restart: {policy: never}"
        return f"{self.name}: {{{head}, port: {self.port}, env: {json.dumps(env)}{extra}}}\n"

    def set_control(self, **keys: bool) -> None:
        tmp = self.control.with_suffix(".tmp")
        tmp.write_text(json.dumps(keys))
        tmp.replace(self.control)


def fleet(tmp: Path) -> dict[str, Model]:
    def m(name: str, backend: str, served: str, gpus: list[int], **kw: Any) -> Model:
        return Model(name, backend, served, free_port(), tmp / f"{name}.control", gpus, **kw)

    models = [
        m("v1", "vllm", "v1", [0]),
        m("v2", "vllm", "v2", [1], escape=True),
        m("tp1", "vllm", "tp1", [2, 3]),
        m("tp2", "vllm", "tp2", [4, 5], escape=True),
        m("o1", "ollama", "qwen2.5:0.5b", []),
        m("o2", "ollama", "llama3.2:1b", []),
        m("od", "vllm", "od", [6], on_demand=True),
        m("fragile", "vllm", "fragile", [7], fragile=True),
    ]
    for x in models:
        x.set_control()
    return {x.name: x for x in models}


# ---------------------------------------------------------------- the gateway


class Trickle:
    """Chat completions through the gateway all along, streamed and not, each
    with a client timeout; every outcome is classified."""

    def __init__(self, port: int, names: list[str], clients: int, seed: int) -> None:
        self.url = f"http://127.0.0.1:{port}/v1/chat/completions"
        self.names = names
        self.clients = clients
        self.seed = seed
        self.t0 = time.monotonic()
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, str] = {}
        self.durations: list[float] = []
        self.down: list[list[float]] = []  # [start, end] while the daemon was down
        self.paused: set[str] = set()  # names that get no requests for now
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(CLIENT_TIMEOUT + 10)

    def daemon_down(self, start: float) -> list[float]:
        window = [start, float("inf")]
        with self._lock:
            self.down.append(window)
        return window

    def _in_down_window(self, t0: float, t1: float) -> bool:
        with self._lock:
            return any(t0 <= end + 1.0 and t1 >= start for start, end in self.down)

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            await asyncio.gather(*(self._client(session, i) for i in range(self.clients)))

    async def _client(self, session: aiohttp.ClientSession, i: int) -> None:
        rng = random.Random(self.seed * 1000 + i)
        while not self._stop.is_set():
            name, stream = rng.choice(self.names), rng.random() < 0.5
            if name in self.paused:
                await asyncio.sleep(0.05)
                continue
            t0 = time.monotonic()
            kind, detail = await self._one(session, name, stream, rng.randint(4, 16))
            t1 = time.monotonic()
            if kind in ("refused", "disconnected", "cut mid-stream") and self._in_down_window(
                t0, t1
            ):
                kind += " (daemon down)"
            with self._lock:
                self.counts[kind] += 1
                at = f"{time.monotonic() - self.t0:.1f}s"
                self.examples.setdefault(kind, f"{at} {name} stream={stream}: {detail}"[:300])
                self.durations.append(t1 - t0)
            await asyncio.sleep(rng.uniform(0.02, 0.15))

    async def _one(
        self, session: aiohttp.ClientSession, name: str, stream: bool, tokens: int
    ) -> tuple[str, str]:
        body = {
            "model": name,
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": tokens,
            "stream": stream,
        }
        status, data = 0, b""
        try:
            async with session.post(self.url, json=body) as r:
                status = r.status
                async for chunk in r.content.iter_any():
                    data += chunk
                if r.status == 200:
                    if stream and b"data: [DONE]" in data:
                        return "ok", ""
                    if not stream and b'"choices"' in data:
                        return "ok", ""
                    return "unclean 200", data[-200:].decode(errors="replace")
                try:
                    err = json.loads(data)["error"]
                    clean = all(k in err for k in ("message", "type", "code"))
                except (ValueError, KeyError, TypeError):
                    clean = False
                text = data[:300].decode(errors="replace")
                if clean:
                    return f"error {r.status} {err['code']}", str(err["message"])
                return f"unclean {r.status}", text
        except asyncio.TimeoutError:
            return "hang", f"no complete answer within {CLIENT_TIMEOUT:g}s (status {status})"
        except aiohttp.ClientConnectorError as e:
            return "refused", repr(e)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as e:
            if status == 200:
                # Headers were sent: an error event (OpenAI's shape), then the cut.
                if b'data: {"error"' in data:
                    event = data[data.rindex(b'data: {"error"') + 6 :].split(b"\n\n")[0]
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        err = json.loads(event)["error"]
                        return f"error event mid-stream {err['code']}", str(err["message"])
                return "cut mid-stream", repr(e)
            return "disconnected", repr(e)
        except aiohttp.ClientError as e:
            return "client error", repr(e)


# ------------------------------------------------------------------- faults


@dataclass
class Fault:
    index: int
    kind: str
    target: str
    detail: str = ""
    t0: float = 0.0
    outcome: str = "pending"  # recovered | failed as expected | not recovered | error
    recover_s: float | None = None
    failed_s: float | None = None  # until FAILED, where expected
    reason: str = ""
    notes: list[str] = field(default_factory=list)


class Grabber:
    """The foreign process that takes a model's port."""

    def __init__(self, tmp: Path) -> None:
        script = tmp / "port-holder.py"
        script.write_text(GRABBER)
        self.proc = subprocess.Popen(
            [sys.executable, str(script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.lock = threading.Lock()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def reply(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Chaos:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.rng = random.Random(args.seed)
        self.models = fleet(tmp)
        # Added and removed by reloads; never the target of other faults.
        self.extra = Model("extra", "vllm", "extra", free_port(), tmp / "extra.control", [8])
        self.extra.set_control()
        self.extra_on = False
        self.reload_lock = threading.Lock()
        self.spontaneous: list[str] = []  # health failures with no fault in flight
        self.phase = "main"
        self.gateway_port = free_port()
        self.d = Daemon(tmp, "")
        self.d.env["FAKE_LOAD_TIME"] = "0.3"
        self.write_manifest()
        self.key = state_key(self.d.state)
        self.lock = threading.Lock()
        self.busy: dict[str, Fault] = {}
        self.epoch: Counter[str] = Counter()  # faults started per model
        self.threads: list[threading.Thread] = []
        self.faults: list[Fault] = []
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.orphans: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self.daemon_kills: list[dict[str, Any]] = []
        self.upgrades: list[dict[str, Any]] = []
        self.runner = LLMSUP  # NEWER from the first upgrade on
        self.left_after_down: list[dict[str, Any]] = []
        self.adopted: set[str] = set()  # instances that lived across a daemon death
        self.reloads: list[dict[str, Any]] = []
        self.port_grabs: Counter[str] = Counter()
        self.grabber = Grabber(tmp)
        self.trickle = Trickle(
            self.gateway_port, [m.served for m in self.models.values()], 4, args.seed
        )
        self.t_start = time.monotonic()

    # -- manifest, daemon, status

    def write_manifest(self) -> None:
        models = [*self.models.values(), *([self.extra] if self.extra_on else [])]
        body = "".join(m.yaml(self.tmp) for m in models)
        self.d.manifest.write_text(
            f"state_dir: {self.d.state}\n{DEFAULTS}"
            f"gateway: {{port: {self.gateway_port}, start_wait: 10s}}\n"
            f"models:\n{textwrap.indent(body, '  ')}"
        )

    def status(self) -> dict[str, dict[str, Any]]:
        return self.d.status()

    def gateway_pid(self) -> int | None:
        """The daemon's gateway process now (None: no daemon answers, or none runs)."""
        try:
            _, data = call(self.d.sock, "GET", "/v1/status", timeout=10)
        except Exception:
            return None
        pid = (data.get("gateway") or {}).get("pid")
        return pid if isinstance(pid, int) else None

    def row(self, name: str) -> dict[str, Any]:
        return self.status()[name]

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """The CLI of the llmsup now in use."""
        return self.d.cli(*args, "-f", str(self.d.manifest), timeout=timeout, runner=self.runner)

    def start_daemon(self) -> None:
        """`up --foreground` of the llmsup now in use, once its control socket answers."""
        d = self.d
        with open(d.output, "ab") as out:
            d.proc = subprocess.Popen(
                [*self.runner, "up", "--foreground", "-f", str(d.manifest)],
                env=d.env,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        d.lineage.anchor(d.proc.pid)
        proc = d.proc
        wait_for(lambda: d.answers() or proc.poll() is not None, 30)
        if not d.answers():
            raise RuntimeError(f"the daemon exited with {proc.poll()}: {d.log()[-3000:]}")

    def daemon_pid(self) -> int:
        assert self.d.proc is not None
        return self.d.proc.pid

    def elapsed(self) -> float:
        return time.monotonic() - self.t_start

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)
        print(f"  PROBLEM: {text}", flush=True)

    # -- processes

    def marked(self) -> list[tuple[psutil.Process, str]]:
        """Live processes of this daemon's servers, with the instance of the server
        they belong to: by the kernel's process tree, session, group and cgroup as
        `Lineage` remembers them, not by llmsup's marker (which vLLM blanks)."""
        return [(p, s.instance) for p, s in self.d.lineage.servers_live() if s.instance]

    def unattributed(self) -> list[psutil.Process]:
        """Live processes that came from a daemon but belong to no server and are not
        a daemon or a CLI this run started (their parent is this process), nor the
        log shim of a live server (its parent)."""
        live = self.d.lineage.live()
        shims = set()
        for p, s in live:
            with contextlib.suppress(psutil.Error):
                if s.server is not None:
                    shims.add(p.ppid())
        out = []
        for p, s in live:
            with contextlib.suppress(psutil.Error):
                if s.server is None and p.ppid() != os.getpid() and p.pid not in shims:
                    out.append(p)
        return out

    def instance_procs(self, instance: str) -> list[psutil.Process]:
        return [p for p, mark in self.marked() if mark == instance]

    @staticmethod
    def unit_of(mark: str) -> str:
        return mark.split(":", 1)[1].rsplit(":", 1)[0]

    def strays(self) -> tuple[dict[str, list[tuple[psutil.Process, str]]], dict[str, Any]]:
        """Per unit, live processes of an instance that is not its current one (as
        `status` says just before and just after the scan), and who listens on the
        models' ports."""
        before, gateways = self.status(), {self.gateway_pid()}
        procs = self.marked()
        loose = self.unattributed()
        ports = {m.port for m in [*self.models.values(), self.extra]}
        listeners: dict[int, int] = {}
        with contextlib.suppress(psutil.Error):
            for c in psutil.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port in ports and c.pid:
                    listeners[c.pid] = c.laddr.port
        after = self.status()
        gateways.add(self.gateway_pid())
        out: dict[str, list[tuple[psutil.Process, str]]] = {}
        for p, mark in procs:
            unit = self.unit_of(mark)
            if unit == "@gateway" and p.pid in gateways:
                continue  # the daemon's own gateway process; an earlier one is an orphan
            current = {r[unit]["instance"] for r in (before, after) if unit in r}
            if mark not in current:
                out.setdefault(unit, []).append((p, mark))
        for p in [p for p in loose if p.pid not in gateways]:  # one key each: the same
            # process must be there at every look
            out[f"(none: pid {p.pid})"] = [(p, "")]
        return out, {"rows": after, "listeners": listeners}

    def scan_orphans(self, context: str) -> int:
        """Processes of a dead instance (or of a second server of one model), and
        model ports they hold. A unit counts when it has such processes at three
        looks over 3 s (a restart never leaves them that long); they are then
        stopped so that the run can go on, and counted."""
        found, seen = self.strays()
        for wait in (1.0, 2.0):
            if not found:
                return 0
            time.sleep(wait)
            again, seen = self.strays()
            found = {u: again[u] for u in found if u in again}
        count = 0
        for unit, procs in found.items():
            row = seen["rows"].get(unit, {})
            for p, mark in procs:
                with contextlib.suppress(psutil.Error):
                    entry = {
                        "context": context,
                        "pid": p.pid,
                        "name": p.name(),
                        "instance": mark,
                        "unit": unit,
                        "unit_state": row.get("state"),
                        "unit_instance": row.get("instance"),
                        "holds_model_port": seen["listeners"].get(p.pid),
                        "at_s": round(self.elapsed(), 1),
                        **self.describe(p),
                    }
                    with self.lock:
                        self.orphans.append(entry)
                    count += 1
                    self.problem(f"orphan after {context}: {entry}")
        for procs in found.values():
            for p, _ in procs:
                with contextlib.suppress(psutil.Error):
                    p.kill()
        return count

    def describe(self, p: psutil.Process) -> dict[str, Any]:
        """What tells a process apart, for the report: its command line, age, parent
        and children, and how the lineage found it."""
        out: dict[str, Any] = {}
        with contextlib.suppress(psutil.Error):
            out["cmdline"] = " ".join(p.cmdline())[:300]
            out["age_s"] = round(time.time() - p.create_time(), 1)
            out["ppid"] = p.ppid()
            out["children"] = [f"{c.pid} {c.name()}" for c in p.children()][:5]
        st = read_stat(p.pid)
        found = self.d.lineage.seen.get((p.pid, st.start)) if st is not None else None
        if found is not None:
            out["found_by"] = found.how
        return out

    def sample(self, index: int) -> None:
        try:
            p = psutil.Process(self.daemon_pid())
            kinds: Counter[str] = Counter()
            for fd in os.listdir(f"/proc/{p.pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{p.pid}/fd/{fd}")
                    kinds[link.split(":", 1)[0] if ":" in link else "file"] += 1
            self.samples.append(
                {
                    "fault": index,
                    "phase": self.phase,
                    "at_s": round(self.elapsed(), 1),
                    "daemon_pid": p.pid,
                    "fds": p.num_fds(),
                    "fds_not_sockets": p.num_fds() - kinds["socket"],
                    "rss_mib": round(p.memory_info().rss / 2**20, 2),
                    "fd_kinds": dict(kinds),
                }
            )
        except psutil.Error as e:
            self.problem(f"cannot sample the daemon: {e!r}")

    # -- waiting

    def wait_new_ready(self, name: str, old: str | None, bound: float = READY_BOUND) -> bool:
        def ready() -> str | None:
            r = self.row(name)
            if r["state"] == "FAILED":  # nothing restarts it by itself
                return "failed"
            return "ready" if r["state"] == "READY" and r["instance"] not in (None, old) else None

        return poll(ready, bound) == "ready"

    def wait_left_ready(self, name: str, old: str | None, bound: float) -> dict[str, Any] | None:
        """The row once the daemon has acted on a fault (the instance it watched is
        being stopped or gone)."""

        def acted() -> dict[str, Any] | None:
            r = self.row(name)
            leaving = r["state"] not in ("READY", "UNHEALTHY") or r["instance"] != old
            return r if leaving else None

        return poll(acted, bound, 0.02)

    def wait_failed(self, name: str, bound: float = FAILED_BOUND) -> dict[str, Any] | None:
        def failed() -> dict[str, Any] | None:
            r = self.row(name)
            return r if r["state"] == "FAILED" else None

        return poll(failed, bound, 0.02)

    def restart_failed(self, f: Fault, name: str) -> None:
        """`llmsup restart NAME`, then READY: the end of a fault that FAILED a model."""
        old = self.row(name)["instance"]
        r = self.cli("restart", name)
        if r.returncode != 0:
            self.problem(f"#{f.index}: llmsup restart {name} exited {r.returncode}: {r.stderr}")
        if self.wait_new_ready(name, old):
            f.recover_s = time.monotonic() - f.t0
            f.outcome = "failed as expected"
        else:
            f.outcome = "not recovered"
            self.problem(f"#{f.index} {f.kind} {name}: not READY after restart: {self.row(name)}")

    def repair(self, name: str, why: str) -> None:
        """A model left broken by a finding: note it, restart it, go on."""
        self.notes.append(f"{why}: `llmsup restart {name}` to go on")
        print(f"  NOTE: {why}: restarting {name} to go on", flush=True)
        self.cli("restart", name)
        if not self.wait_new_ready(name, None):
            self.problem(f"{name} still not READY after a repair restart: {self.row(name)}")

    # -- one fault on one model (in a thread)

    def run_fault(self, f: Fault) -> None:
        m = self.models.get(f.target) or self.extra
        try:
            if f.kind == "idle_check":
                self.check_idle_stop(f, m)
            else:
                getattr(self, f"fault_{f.kind}")(f, m)
            if f.outcome == "pending":
                f.outcome = "recovered"
            self.scan_orphans(f"#{f.index} {f.kind} {m.name}")
            if f.outcome == "not recovered" and f.kind not in ("idle_check", "reload_remove"):
                self.repair(m.name, f"#{f.index} {f.kind} left {m.name} {self.row(m.name)}")
        except Exception as e:
            f.outcome = "error"
            self.problem(f"#{f.index} {f.kind} {m.name}: harness error {e!r}")
            traceback.print_exc()
        finally:
            m.set_control()
            with self.lock:
                self.busy.pop(m.name, None)
            self.report(f)

    def report(self, f: Fault) -> None:
        took = f"{f.recover_s:.2f}s" if f.recover_s is not None else "-"
        fail = f" (FAILED after {f.failed_s:.2f}s)" if f.failed_s is not None else ""
        detail = f"[{f.detail}] " if f.detail else ""
        print(
            f"[{f.index + 1:4d} {self.elapsed():6.1f}s] {f.kind:<18} {f.target:<8} "
            f"{detail}{f.outcome} {took}{fail}",
            flush=True,
        )

    def expect_failed(self, f: Fault, m: Model, *fragments: str) -> None:
        r = self.wait_failed(m.name)
        if r is None:
            f.outcome = "not recovered"
            self.problem(f"#{f.index} {f.kind} {m.name}: never FAILED: {self.row(m.name)}")
            return
        f.failed_s = time.monotonic() - f.t0
        f.reason = r["reason"]
        if not any(x in f.reason for x in fragments):
            self.problem(f"#{f.index} {m.name} FAILED with {f.reason!r}, expected {fragments}")
        m.set_control()
        self.restart_failed(f, m.name)

    def after_crash(self, f: Fault, m: Model, old: str, *fragments: str) -> None:
        """The daemon must replace the instance (or FAIL the model, policy never)."""
        if m.fragile:
            self.expect_failed(f, m, *fragments)
        elif self.wait_new_ready(m.name, old):
            f.recover_s = time.monotonic() - f.t0
        else:
            f.outcome = "not recovered"
            self.problem(f"#{f.index} {f.kind} {m.name}: not READY in time: {self.row(m.name)}")

    def fault_kill_server(self, f: Fault, m: Model) -> None:
        r = self.row(m.name)
        f.t0 = time.monotonic()
        os.kill(r["pid"], signal.SIGKILL)
        self.after_crash(f, m, r["instance"], "killed by SIGKILL")

    def _kill_child(self, f: Fault, m: Model, pick: Callable[[psutil.Process], bool]) -> None:
        r = self.row(m.name)
        kids = [p for p in self.instance_procs(r["instance"]) if p.pid != r["pid"] and pick(p)]
        if not kids:  # e.g. no runner loaded at this moment: kill the server instead
            f.notes.append("no such child: killed the server")
            f.detail = "server"
            self.fault_kill_server(f, m)
            return
        child = self.rng.choice(kids) if len(kids) > 1 else kids[0]
        with contextlib.suppress(psutil.Error):
            f.detail = child.name()
        f.t0 = time.monotonic()
        child.kill()
        if m.backend == "ollama":  # the server stays; the daemon loads the model again
            created = child.create_time()

            def new_runner() -> bool:
                row = self.row(m.name)
                if row["state"] != "READY" or alive(child.pid, created):
                    return False
                return any(
                    p.pid != row["pid"] and p.name() == "ollama"
                    for p in self.instance_procs(row["instance"])
                )

            if poll(new_runner, READY_BOUND):
                f.recover_s = time.monotonic() - f.t0
            else:
                f.outcome = "not recovered"
                self.problem(f"#{f.index} {m.name}: no new runner: {self.row(m.name)}")
            return
        self.after_crash(f, m, r["instance"], "exited with code", "unhealthy")

    def fault_kill_engine_core(self, f: Fault, m: Model) -> None:
        self._kill_child(f, m, lambda p: "EngineCore" in p.name())

    def fault_kill_tp_worker(self, f: Fault, m: Model) -> None:
        self._kill_child(f, m, lambda p: "Worker_TP" in p.name())

    def fault_kill_ollama_runner(self, f: Fault, m: Model) -> None:
        self._kill_child(f, m, lambda p: p.name() == "ollama")

    def fault_sigstop(self, f: Fault, m: Model) -> None:
        r = self.row(m.name)
        f.t0 = time.monotonic()
        os.kill(r["pid"], signal.SIGSTOP)
        self.after_crash(f, m, r["instance"], "unhealthy")

    def _control(self, f: Fault, m: Model, fragment: str, **keys: bool) -> None:
        """A control-file fault: set, wait for the daemon to act, clear (the file
        is read by every instance), then expect recovery."""
        r = self.row(m.name)
        f.t0 = time.monotonic()
        m.set_control(**keys)
        if self.wait_left_ready(m.name, r["instance"], READY_BOUND) is None:
            f.outcome = "not recovered"
            self.problem(f"#{f.index} {f.kind} {m.name}: never noticed: {self.row(m.name)}")
            return
        m.set_control()
        self.after_crash(f, m, r["instance"], fragment)

    def fault_health_500(self, f: Fault, m: Model) -> None:
        self._control(f, m, "HTTP 500", health_500=True)

    def fault_hang(self, f: Fault, m: Model) -> None:
        if self.rng.random() < 0.5:
            f.detail = "ignores SIGTERM"
            self._control(f, m, "unhealthy", hang=True, ignore_sigterm=True)
        else:
            self._control(f, m, "unhealthy", hang=True)

    def fault_deep_hang(self, f: Fault, m: Model) -> None:
        self._control(f, m, "completion", deep_hang=True)

    def fault_port_grab(self, f: Fault, m: Model) -> None:
        r = self.row(m.name)
        with self.grabber.lock:
            self.grabber.send(f"grab {m.port} 3")  # fails while the server holds it
            time.sleep(0.01)
            f.t0 = time.monotonic()
            os.kill(r["pid"], signal.SIGKILL)
            got = self.grabber.reply()
            if got != "ok":
                self.port_grabs["missed (the new instance bound first)"] += 1
                f.detail = "missed"
                self.after_crash(f, m, r["instance"], "killed by SIGKILL")
                return
            self.port_grabs["grabbed"] += 1
            failed = self.wait_failed(m.name)
            if failed is None:
                f.outcome = "not recovered"
                self.problem(f"#{f.index} {m.name}: port held, never FAILED: {self.row(m.name)}")
            else:
                f.failed_s = time.monotonic() - f.t0
                f.reason = failed["reason"]
                if f"port {m.port}" in f.reason and f"pid {self.grabber.pid}" in f.reason:
                    self.port_grabs["FAILED naming the holder"] += 1
                else:
                    self.problem(f"#{f.index} {m.name}: FAILED without the holder: {f.reason!r}")
            self.grabber.send("release")
            self.grabber.reply()
        if failed is not None:
            self.restart_failed(f, m.name)

    def fault_reload(self, f: Fault, m: Model) -> None:
        self._reload(f, m, "restarted")

    def fault_reload_mid_stop(self, f: Fault, m: Model) -> None:
        """A reload that changes a model while the daemon is stopping it (a hung
        server that ignores SIGTERM: the stop lasts its stop_timeout). Sent on the
        control socket, as `llmsup reload` does, so that it lands in that window."""
        self._reload(f, m, "restarted", mid_stop=True)

    def fault_reload_add(self, f: Fault, m: Model) -> None:
        self._reload(f, m, "added")

    def fault_reload_remove(self, f: Fault, m: Model) -> None:
        self._reload(f, m, "removed")

    def _reload(self, f: Fault, m: Model, expect: str, mid_stop: bool = False) -> None:
        """Rewrite the manifest (a changed env value, or the extra model added or
        removed), reload, and check that only that model was touched. One reload
        at a time here: `reload_race` sends two at once, on purpose, at the end."""
        info: dict[str, Any] = {"fault": f.index, "model": m.name, "kind": f.kind}
        with self.reload_lock:
            with self.lock:
                idle_before = {n for n in self.models if n not in self.busy}
                epochs = dict(self.epoch)
            rows = self.status()
            old = rows[m.name]["instance"] if m.name in rows else None
            if expect == "restarted":
                m.gen += 1
            self.extra_on = expect == "added" or (self.extra_on and expect != "removed")
            self.write_manifest()
            if mid_stop:
                m.set_control(hang=True, ignore_sigterm=True)

                def stopping() -> str | None:
                    state = str(self.row(m.name)["state"])
                    return state if state == "STOPPING" else None

                info["state_at_reload"] = (
                    poll(stopping, READY_BOUND, 0.01) or self.row(m.name)["state"]
                )
                f.t0 = time.monotonic()
                code, data = call(
                    self.d.sock, "POST", "/v1/reload", {"manifest": str(self.d.manifest)}
                )
                ok = code == 200 and m.name in data.get(expect, [])
                info["output"] = json.dumps(data)
            else:
                f.t0 = time.monotonic()
                res = self.cli("reload")
                lines = dict(x.split(": ", 1) for x in res.stdout.splitlines() if ": " in x)
                ok = res.returncode == 0 and m.name in lines.get(expect, "").split(", ")
                info["output"] = res.stdout.strip() + res.stderr.strip()
            m.set_control()
            after = self.status()
        if not ok:
            self.problem(f"#{f.index} reload ({expect} {m.name}): {info['output']!r}")
        with self.lock:
            idle = {
                n
                for n in idle_before
                if n not in self.busy and self.epoch[n] == epochs.get(n, 0) and n != m.name
            }
        moved = [
            n
            for n in idle
            if rows[n]["instance"]
            and after[n]["instance"]
            and rows[n]["instance"] != after[n]["instance"]
        ]
        info["others_restarted"] = moved
        if moved:
            self.problem(f"#{f.index} reload of {m.name} also restarted {moved}")
        if expect == "removed":
            gone = poll(lambda: m.name not in self.status() and not self.unit_procs(m.name), 10)
            if gone:
                f.recover_s = time.monotonic() - f.t0
            else:
                f.outcome = "not recovered"
                self.problem(f"#{f.index} removed {m.name} is still there")
        elif self.wait_new_ready(m.name, old):
            f.recover_s = time.monotonic() - f.t0
        else:
            f.outcome = "not recovered"
            self.problem(
                f"#{f.index} {f.kind} {m.name}: not READY after reload: {self.row(m.name)}"
            )
        info["recovered"] = f.outcome != "not recovered"
        self.reloads.append(info)

    def race(self, f: Fault, m: Model) -> None:
        poll(lambda: self.row(m.name)["state"] == "READY", READY_BOUND)
        self.fault_reload_race(f, m)
        self.scan_orphans(f"#{f.index} reload_race {m.name}")

    def fault_reload_race(self, f: Fault, m: Model) -> None:
        """Two reloads of one changed manifest at once (SIGHUP, as systemd's
        ExecReload sends, and the control socket, as `llmsup reload`): the model
        must end with one server, READY, and stay that way."""
        with self.reload_lock:
            old = self.row(m.name)["instance"]
            m.gen += 1
            self.write_manifest()
            answers: list[Any] = []
            body = {"manifest": str(self.d.manifest)}
            api = threading.Thread(
                target=lambda: answers.append(call(self.d.sock, "POST", "/v1/reload", body))
            )
            f.t0 = time.monotonic()
            api.start()
            os.kill(self.daemon_pid(), signal.SIGHUP)
            api.join()
        info: dict[str, Any] = {"fault": f.index, "model": m.name, "kind": f.kind}
        info["output"] = json.dumps(answers[0][1]) if answers else "no answer"
        if not self.wait_new_ready(m.name, old):
            f.outcome = "not recovered"
            self.problem(f"#{f.index} {m.name}: not READY after two reloads: {self.row(m.name)}")
        else:
            f.recover_s = time.monotonic() - f.t0
        instances: set[str] = set()
        end = time.monotonic() + 3.0
        while time.monotonic() < end:  # READY and staying so: one server, one instance
            instances |= {mark for _, mark in self.marked() if self.unit_of(mark) == m.name}
            if current := self.row(m.name)["instance"]:
                instances.add(current)
            time.sleep(0.1)
        info["instances_in_3s"] = len(instances)
        if len(instances) > 1:
            f.outcome = "not recovered"
            f.notes.append(f"{len(instances)} instances in 3 s")
            self.problem(
                f"#{f.index} two reloads at once: {m.name} went through {len(instances)} "
                f"instances in the 3 s after READY (two servers supervise it)"
            )
        info["recovered"] = f.outcome != "not recovered"
        self.reloads.append(info)

    def unit_procs(self, unit: str) -> list[psutil.Process]:
        return [p for p, mark in self.marked() if self.unit_of(mark) == unit]

    def check_idle_stop(self, f: Fault, m: Model) -> None:
        """No traffic to the on-demand model: it must stop after its idle_timeout."""
        if not poll(lambda: self.row(m.name)["state"] == "READY", READY_BOUND):
            f.notes.append(f"not READY to begin with: {self.row(m.name)['state']}")
            return
        self.trickle.paused.add(m.served)
        try:
            f.t0 = time.monotonic()

            def idle() -> bool:
                r = self.row(m.name)
                return bool(r["state"] == "STOPPED" and "idle" in r["detail"])

            if poll(idle, IDLE_TIMEOUT + 5):
                f.recover_s = time.monotonic() - f.t0
            else:
                f.outcome = "not recovered"
                self.problem(
                    f"#{f.index} {m.name} did not stop after {IDLE_TIMEOUT:g}s without "
                    f"requests (idle_timeout): {self.row(m.name)['state']}"
                )
        finally:
            self.trickle.paused.discard(m.served)

    # -- the daemon itself

    def kill_daemon(self, f: Fault) -> None:
        """SIGKILL the daemon (sometimes with a model or two SIGSTOPped or hung first,
        which it may be stopping at the kill) and start it again: see `next_daemon`."""
        hurt: dict[str, str] = {}
        ready = self.idle_ready()
        for m in self.rng.sample(ready, min(len(ready), self.rng.choice([0, 0, 1, 2]))):
            if self.rng.random() < 0.5:
                os.kill(self.row(m.name)["pid"], signal.SIGSTOP)
                hurt[m.name] = "SIGSTOP"
            else:
                m.set_control(hang=True, ignore_sigterm=True)
                hurt[m.name] = "hung, ignores SIGTERM"
        if hurt:
            time.sleep(self.rng.uniform(0.5, 3.0))  # the daemon may be stopping them
        f.detail = f"pid {self.daemon_pid()}" + "".join(f", {n} {h}" for n, h in hurt.items())
        self.next_daemon(f, hurt, self.d.kill_daemon, self.daemon_kills)

    def upgrade(self, f: Fault) -> None:
        """`llmsup down --keep-models`, then the newer llmsup's `up` (see the module's
        docstring): see `next_daemon`."""
        f.detail = f"{'newer' if self.runner is NEWER else 'this'} llmsup -> newer"

        def leave() -> None:
            r = self.cli("down", "--keep-models")
            if r.returncode != 0 or "run on" not in r.stdout:
                self.problem(f"#{f.index} down --keep-models: {r.returncode} {r.stdout}{r.stderr}")
            assert self.d.proc is not None
            try:
                self.d.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.problem(f"#{f.index}: the daemon did not exit after down --keep-models")
                self.d.kill_daemon()
            self.runner = NEWER

        self.next_daemon(f, {}, leave, self.upgrades)

    def server_of(self, row: dict[str, Any]) -> tuple[Any, ...]:
        """What must not change when a daemon adopts a model's server."""
        created = None
        with contextlib.suppress(psutil.Error, TypeError, ValueError):
            created = psutil.Process(row["pid"]).create_time()
        return (row["pid"], created, row["instance"], row["restarts"])

    def next_daemon(
        self, f: Fault, hurt: dict[str, str], end: Callable[[], None], log: list[dict[str, Any]]
    ) -> None:
        """The daemon ends (`end`) and the next one starts. Every model that was READY
        and not in `hurt` must be the same server after (adopted: pid, start time,
        instance and restart count); the others may be replaced, but only once every
        process of their old instance is gone; every model must settle."""
        rows = self.status()
        untouched = {
            n: self.server_of(r) for n, r in rows.items() if r["state"] == "READY" and n not in hurt
        }
        before = self.marked()
        old_instances = {mark for _, mark in before}
        old_pid = self.daemon_pid()
        f.t0 = time.monotonic()
        window = self.trickle.daemon_down(f.t0)
        end()
        survivors = [p for p, _ in before if alive(p.pid)]
        launched_early: list[str] = []
        done = threading.Event()

        def watch() -> None:  # a new server of a model while its old one is left?
            while not done.is_set():
                procs = self.marked()
                old = {self.unit_of(m) for _, m in procs if m in old_instances}
                new = {self.unit_of(m) for _, m in procs if m not in old_instances}
                if both := sorted(old & new):
                    launched_early.append(f"new and old servers of {both}")
                time.sleep(0.01)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        self.start_daemon()
        answered = time.monotonic()
        window[1] = answered
        for m in self.models.values():
            m.set_control()

        def gave_up(n: str, r: dict[str, Any]) -> bool:  # a hurt model of policy never
            return n in hurt and self.models[n].fragile and r["state"] == "FAILED"

        def settled() -> bool:
            rows = self.status()
            return all(self.settled_state(n, r) or gave_up(n, r) for n, r in rows.items())

        ok = poll(settled, READY_BOUND * 2)
        done.set()
        watcher.join()
        after = self.status()
        failed = sorted(n for n, r in after.items() if gave_up(n, r))
        current = {r["instance"] for r in after.values() if r["instance"]}
        restarted = sorted(
            n
            for n, server in untouched.items()
            if n not in after or self.server_of(after[n]) != server
        )
        left = [
            p.pid for p, mark in before if mark not in current and alive(p.pid, p.create_time())
        ]
        info = {
            "fault": f.index,
            "old_daemon_pid": old_pid,
            "runner": "newer" if self.runner is NEWER else "this",
            "processes_before": len(before),
            "also": [f"{n} {h}" for n, h in hurt.items()],
            "survived_the_daemon": len(survivors),
            "answer_s": round(answered - f.t0, 3),
            "all_settled_s": round(time.monotonic() - f.t0, 3) if ok else None,
            "ready_untouched": len(untouched),
            "adopted": len(untouched) - len(restarted),
            "model_restarts_caused": restarted,
            "hurt_replaced": sorted(
                n for n in hurt if n in after and after[n]["instance"] != rows[n]["instance"]
            ),
            "hurt_failed_as_policy_never_says": failed,
            "old_processes_left": left,
            "launched_while_old_left": launched_early[:5],
        }
        log.append(info)
        self.adopted |= {untouched[n][2] for n in untouched if n not in restarted}
        if restarted:
            detail = {
                n: (untouched[n], self.server_of(after[n]) if n in after else None)
                for n in restarted
            }
            self.problem(f"#{f.index} {f.kind}: models not adopted (restarted): {detail}")
        if left:
            self.problem(f"#{f.index}: old processes left after the daemon restart: {left}")
        if launched_early:
            self.problem(f"#{f.index}: launched before the old instances were stopped: {info}")
        if ok:
            f.recover_s = time.monotonic() - f.t0
        else:
            f.outcome = "not recovered"
            self.problem(f"#{f.index}: not all models back after a daemon restart: {self.status()}")
        for n in failed:
            self.cli("restart", n)
            if not self.wait_new_ready(n, None):
                self.problem(f"#{f.index}: {n} not READY after a restart: {self.row(n)}")
        self.scan_orphans(f"#{f.index} {f.kind}")

    def settled_state(self, name: str, r: dict[str, Any]) -> bool:
        if r["state"] == "READY":
            return True
        m = self.models.get(name)  # on demand: STOPPED until a request
        return m is not None and m.on_demand and r["state"] == "STOPPED"

    def settle(self, index: int) -> None:
        """Nothing in flight: every model as expected, no orphan; sample the daemon."""
        self.drain()

        def settled() -> dict[str, dict[str, Any]] | None:
            rows = self.status()
            return None if not all(self.settled_state(n, r) for n, r in rows.items()) else rows

        if poll(settled, READY_BOUND) is None:
            for n, r in self.status().items():
                if self.settled_state(n, r):
                    continue
                m = self.models.get(n)
                if m and m.fragile and r["state"] == "FAILED" and "unhealthy" in r["reason"]:
                    # No fault was in flight: probes timed out on this busy machine,
                    # and policy `never` gives up on the first failure, as it should.
                    self.spontaneous.append(f"after #{index}: {r['reason']}")
                    self.repair(n, f"settle after #{index}: {n} FAILED ({r['reason']})")
                    continue
                self.problem(f"settle after #{index}: {n} is {r['state']}: {r['reason']}")
                self.repair(n, f"settle after #{index}: {n} {r['state']}")
        self.scan_orphans(f"settle after #{index}")
        self.sample(index)

    def drain(self) -> None:
        for t in self.threads:
            t.join()
        self.threads = [t for t in self.threads if t.is_alive()]

    # -- choosing faults

    KINDS: tuple[tuple[str, float], ...] = (
        ("kill_server", 3.0),
        ("kill_engine_core", 1.5),
        ("kill_tp_worker", 3.0),
        ("kill_ollama_runner", 1.5),
        ("sigstop", 2.0),
        ("health_500", 1.5),
        ("hang", 1.5),
        ("deep_hang", 1.5),
        ("port_grab", 1.0),
    )

    def applicable(self, kind: str, m: Model) -> bool:
        if kind in ("kill_engine_core",):
            return m.backend == "vllm"
        if kind == "kill_tp_worker":
            return m.backend == "vllm" and m.tp > 1
        if kind == "kill_ollama_runner":
            return m.backend == "ollama"
        if kind in ("port_grab", "reload_mid_stop"):
            return not m.fragile
        return True

    def idle_ready(self) -> list[Model]:
        rows = self.status()
        with self.lock:
            return [
                m
                for n, m in self.models.items()
                if n not in self.busy and rows[n]["state"] == "READY"
            ]

    def pick(self, kind: str | None) -> tuple[str, Model] | None:
        cands = self.idle_ready()
        if kind is not None:
            cands = [m for m in cands if self.applicable(kind, m) and m.name != "od"]
        if not cands:
            return None
        weights = [0.5 if m.fragile else 1.0 for m in cands]
        m = self.rng.choices(cands, weights)[0]
        if kind is None:
            kinds = [(k, w) for k, w in self.KINDS if self.applicable(k, m)]
            kind = self.rng.choices([k for k, _ in kinds], [w for _, w in kinds])[0]
        return kind, m

    def launch(self, f: Fault) -> None:
        with self.lock:
            self.busy[f.target] = f
            self.epoch[f.target] += 1
        self.faults.append(f)
        t = threading.Thread(target=self.run_fault, args=(f,), daemon=True)
        self.threads = [x for x in self.threads if x.is_alive()]
        self.threads.append(t)
        t.start()

    def schedule(self, n: int) -> tuple[dict[int, str], dict[int, str]]:
        """Faults at fixed places (by fraction of the run), and checks (before them).

        The daemon kills and upgrades come in the first third, so that one daemon
        process serves the rest and its fds and RSS can be compared over time; reloads
        all along."""
        faults: dict[int, str] = {}
        places = [(x, "daemon_kill") for x in (0.1, 0.2, 0.3)[: max(1, n // 100)]]
        places += [(x, "upgrade") for x in (0.12, 0.22)[: max(1, n // 150)]]
        places += [(x, "reload") for x in (0.05, 0.25, 0.45, 0.65, 0.85)]
        places += [(x, "reload_mid_stop") for x in (0.15, 0.35, 0.55, 0.75, 0.95)]
        places += [(0.4, "reload_add"), (0.7, "reload_remove")]
        for x, kind in places:
            at = int(n * x)
            while at in faults:
                at += 1
            faults[at] = kind
        checks = {int(n * x): "idle_check" for x in (0.38, 0.5, 0.8)}
        return faults, checks

    def run_inline(self, f: Fault, body: Callable[[], None]) -> None:
        self.faults.append(f)
        try:
            body()
            if f.outcome == "pending":
                f.outcome = "recovered"
        except Exception as e:
            f.outcome = "error"
            self.problem(f"#{f.index} {f.kind}: harness error {e!r}")
            traceback.print_exc()
        self.report(f)

    def wait_slot(self, limit: int, deadline: float, want: Callable[[], T | None]) -> T | None:
        while True:
            self.threads = [t for t in self.threads if t.is_alive()]
            if len(self.threads) < limit and (got := want()):
                return got
            if time.monotonic() > deadline:
                return None
            time.sleep(0.02)

    # -- the run

    def run(self) -> None:
        n, args = self.args.faults, self.args
        self.start_daemon()
        self.sample(-1)
        if not poll(lambda: all(self.settled_state(k, r) for k, r in self.status().items()), 60):
            raise SystemExit(f"the fleet never came up: {self.status()}")
        self.trickle.start()
        plan, checks = self.schedule(n)
        limit = 1
        deadline = self.t_start + args.max_seconds
        od = next(m for m in self.models.values() if m.on_demand)

        def od_free() -> bool:
            return od.name not in self.busy

        races = 3 if n >= 30 else 0
        for i in range(n - races):
            if time.monotonic() > deadline:
                self.notes.append(f"--max-seconds reached after {i} faults")
                break
            if i % 10 == 0:
                limit = self.rng.choice([1, 2, 3, 4])
            if i and i % args.settle_every == 0:
                self.settle(i - 1)
            if checks.get(i) == "idle_check" and self.wait_slot(limit, deadline, od_free):
                self.launch(Fault(i, "idle_check", od.name))
            kind = plan.get(i)
            if kind in ("daemon_kill", "upgrade"):
                self.drain()
                f = Fault(i, kind, "daemon")
                body = self.kill_daemon if kind == "daemon_kill" else self.upgrade
                self.run_inline(f, functools.partial(body, f))
                continue
            if kind in ("reload_add", "reload_remove"):
                if self.wait_slot(limit, deadline, lambda: True):
                    self.launch(Fault(i, kind, self.extra.name))
                continue
            chosen = self.wait_slot(limit, deadline, functools.partial(self.pick, kind))
            if chosen is not None:
                self.launch(Fault(i, chosen[0], chosen[1].name))
        self.drain()
        self.settle(n - races - 1)
        self.phase = "end"  # the leak check looks at the main phase only
        # Two reloads at once, last: a daemon that gets them wrong may not recover.
        targets = [m for m in self.models.values() if not m.fragile and not m.on_demand]
        for i in range(n - races, n):
            m = self.rng.choice(targets)
            f = Fault(i, "reload_race", m.name)
            self.run_inline(f, functools.partial(self.race, f, m))
        end = Fault(n, "idle_check", od.name)
        self.run_inline(end, lambda: self.check_idle_stop(end, od))
        self.trickle.stop()
        self.scan_orphans("the end")
        self.sample(n)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.trickle.stop()
        for m in self.models.values():
            m.set_control()
        self.grabber.close()
        down = False  # `down` of the llmsup in use (this one's is refused after an upgrade)
        if self.d.proc is not None and self.d.proc.poll() is None:
            with contextlib.suppress(Exception):
                down = self.cli("down", timeout=120).returncode == 0
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.d.proc.wait(30)
        if down:  # the last of a stop may still be exiting
            poll(lambda: not self.d.lineage.live(), 5)
        self.d.stop()  # kills, and lists, whatever is left
        if down and self.d.leftovers:
            self.left_after_down = self.d.leftovers
            self.problem(f"the final `llmsup down` left processes: {self.d.leftovers}")

    # -- the report

    def check_ticks(self) -> dict[str, Any]:
        """Every server log's `tick N` sequences (see `tick_runs`): lines lost, per
        instance, and in the instances that lived across a daemon death."""
        units = [*self.models, self.extra.name]
        runs: dict[str, list[Ticks]] = {}
        odd: dict[str, list[str]] = {}
        for unit in units:
            runs[unit], odd_lines = tick_runs(log_lines(self.d.state / "logs" / f"{unit}.log"))
            if odd_lines:
                odd[unit] = odd_lines[:5]
        every = [r for rs in runs.values() for r in rs]
        across = [r for r in every if r.instance in self.adopted]
        gaps = [
            {"unit": u, "instance": r.instance, "lost": r.lost, "gaps": r.gaps[:5]}
            for u, rs in runs.items()
            for r in rs
            if r.lost
        ]
        out = {
            "tick_interval_s": TICK,
            "server_processes": len(every),
            "ticks_read": sum(r.count for r in every),
            "lost_lines": sum(r.lost for r in every),
            "across_daemon_deaths": {
                "instances": len(across),
                "of_adopted": len(self.adopted),
                "ticks_read": sum(r.count for r in across),
                "lost_lines": sum(r.lost for r in across),
            },
            "gaps": gaps[:20],
            "lines_fitting_no_sequence": odd,
        }
        if gaps:
            self.problem(f"{out['lost_lines']} log lines lost: {gaps[:5]}")
        if odd:
            self.problem(f"tick lines that continue no sequence: {odd}")
        if len(across) < len(self.adopted):
            self.problem(
                f"{len(self.adopted) - len(across)} adopted instances have no ticks in their log"
            )
        return out

    def leak_check(self) -> dict[str, Any]:
        """fds and RSS of the last daemon process: first third vs last third of its samples."""
        main = [s for s in self.samples if s["phase"] == "main"]
        last = main[-1]["daemon_pid"] if main else None
        mine = [s for s in self.samples if s["daemon_pid"] == last and s["phase"] == "main"]
        out: dict[str, Any] = {"daemon_pid": last, "samples": len(mine)}
        if len(mine) < 6:
            out["note"] = "too few samples of one daemon process"
            return out
        third = len(mine) // 3
        first, final = mine[:third], mine[-third:]
        tolerances = (
            ("fds", float(FD_TOLERANCE)),
            ("fds_not_sockets", float(FD_FILE_TOLERANCE)),
            ("rss_mib", RSS_TOLERANCE_MIB),
        )
        for key, tol in tolerances:
            a = statistics.median(s[key] for s in first)
            b = statistics.median(s[key] for s in final)
            out[key] = {
                "first_third_median": a,
                "last_third_median": b,
                "growth": round(b - a, 2),
                "tolerance": tol,
                "grew": b - a > tol,
            }
        out["faults_covered"] = [mine[0]["fault"], mine[-1]["fault"]]
        out["fd_kinds_first"] = mine[0]["fd_kinds"]
        out["fd_kinds_last"] = mine[-1]["fd_kinds"]
        return out

    def results(self) -> dict[str, Any]:
        by_kind: dict[str, dict[str, Any]] = {}
        for kind in sorted({f.kind for f in self.faults}):
            fs = [f for f in self.faults if f.kind == kind]
            by_kind[kind] = {
                "n": len(fs),
                "outcomes": dict(Counter(f.outcome for f in fs)),
                "recover": stats([f.recover_s for f in fs if f.recover_s is not None]),
                "until_failed": stats([f.failed_s for f in fs if f.failed_s is not None]),
            }
        failed = [f for f in self.faults if f.failed_s is not None]
        g = self.trickle.counts
        statuses: Counter[str] = Counter()
        for k, v in g.items():
            if k.startswith("error event mid-stream"):
                statuses["200 + error event"] += v
            elif k.startswith("error "):
                statuses[k.split()[1]] += v
        leak = self.leak_check()
        ticks = self.check_ticks()
        for key in ("fds", "fds_not_sockets", "rss_mib"):
            if isinstance(leak.get(key), dict) and leak[key]["grew"]:
                self.problem(f"daemon {key} grew: {leak[key]}")
        hangs = g.get("hang", 0)
        unclean = {k: v for k, v in g.items() if k.startswith(("unclean", "client error"))}
        unclean |= {
            k: v for k, v in g.items() if k in ("refused", "disconnected", "cut mid-stream")
        }
        if hangs:
            self.problem(f"{hangs} gateway requests hung: {self.trickle.examples.get('hang')}")
        if unclean:
            self.problem(f"gateway answers neither ok nor a clean error: {unclean}")
        return {
            "machine": f"{platform.node()} {os.cpu_count()} cpus, {platform.python_version()}",
            "when": time.strftime("%Y-%m-%d %H:%M:%S"),
            "seed": self.args.seed,
            "llmsup": llmsup_version(),
            "wall_s": round(self.elapsed(), 1),
            "faults": len(self.faults),
            "faults_by_kind": {k: v["n"] for k, v in by_kind.items()},
            "recoveries": sum(1 for f in self.faults if f.outcome == "recovered"),
            "spontaneous_health_failures": self.spontaneous,
            "failed_as_expected": {
                "n": len(failed),
                "until_failed": stats([f.failed_s for f in failed if f.failed_s is not None]),
                "reasons": sorted({_shorten(f.reason) for f in failed}),
            },
            "not_recovered": [
                f"#{f.index} {f.kind} {f.target}"
                for f in self.faults
                if f.outcome in ("not recovered", "error")
            ],
            "by_kind": by_kind,
            "port_grabs": dict(self.port_grabs),
            "daemon_deaths": {
                "daemon_kills": len(self.daemon_kills),
                "upgrades": len(self.upgrades),
                "ready_untouched_at_the_deaths": sum(
                    k["ready_untouched"] for k in self.daemon_kills + self.upgrades
                ),
                "model_restarts_caused": sum(
                    len(k["model_restarts_caused"]) for k in self.daemon_kills + self.upgrades
                ),
            },
            "log_lines": ticks,
            "daemon_kills": self.daemon_kills,
            "upgrades": self.upgrades,
            "reloads": self.reloads,
            "orphans": {"found": len(self.orphans), "details": self.orphans},
            "left_after_the_final_down": self.left_after_down,
            "gateway": {
                "requests": sum(g.values()),
                "ok": g.get("ok", 0),
                "clean_errors_by_status": dict(sorted(statuses.items())),
                "outcomes": dict(sorted(g.items())),
                "hangs": hangs,
                "client_timeout_s": CLIENT_TIMEOUT,
                "max_duration_s": round(max(self.trickle.durations, default=0.0), 3),
                "examples": self.trickle.examples,
            },
            "daemon_leak_check": leak,
            "samples": [{k: v for k, v in s.items() if k != "fd_kinds"} for s in self.samples],
            "fault_log": [
                {
                    "i": f.index,
                    "kind": f.kind,
                    "target": f.target,
                    "detail": f.detail,
                    "outcome": f.outcome,
                    "recover_s": None if f.recover_s is None else round(f.recover_s, 3),
                    "failed_s": None if f.failed_s is None else round(f.failed_s, 3),
                    "reason": f.reason,
                    "notes": f.notes,
                }
                for f in sorted(self.faults, key=lambda f: f.index)
            ],
            "notes": self.notes,
            "problems": self.problems,
        }


# ------------------------------------------------------------- log lines

STARTING = re.compile(r"^--- llmsup \S+: starting \S+: .*\(instance (\S+)\)$")
TICK_LINE = re.compile(r"^tick (\d+)$")


@dataclass
class Ticks:
    """One server process's `tick N` lines in its log: N = 0, 1, 2, ..."""

    instance: str  # from the daemon's `starting` line before it ("?": none)
    last: int = 0
    count: int = 1
    lost: int = 0
    gaps: list[tuple[int, int]] = field(default_factory=list)  # (last seen, next seen)


def tick_runs(lines: list[str]) -> tuple[list[Ticks], list[str]]:
    """The tick sequences of one unit's log (pure): a `tick 0` begins one (a new
    server process), any other tick continues the sequence it follows; where none
    ends just before it, it continues the latest sequence below it, and the numbers
    between are lines lost. The last lines of a stopped server may follow the
    `starting` line of the next, so a few recent sequences are looked at, not one.
    Returns the sequences and the lines that fit none."""
    runs: list[Ticks] = []
    odd: list[str] = []
    label = "?"
    for line in lines:
        if m := STARTING.match(line):
            label = m[1]
            continue
        if (m := TICK_LINE.match(line)) is None:
            continue
        n = int(m[1])
        if n == 0:
            runs.append(Ticks(label))
            label = "?"
            continue
        recent = runs[-3:]
        run = next((r for r in reversed(recent) if r.last == n - 1), None)
        if run is None:
            run = next((r for r in reversed(recent) if r.last < n), None)
            if run is None:
                odd.append(line)
                continue
            run.gaps.append((run.last, n))
            run.lost += n - run.last - 1
        run.last = n
        run.count += 1
    return runs, odd


def log_lines(path: Path) -> list[str]:
    """A server log and its rotated backups (`NAME.log.N`, oldest first), as lines."""
    backups = [p for p in path.parent.glob(path.name + ".*") if p.suffix[1:].isdigit()]
    files = [*sorted(backups, key=lambda p: -int(p.suffix[1:])), path]
    return [x for f in files if f.exists() for x in f.read_text(errors="replace").splitlines()]


def llmsup_version() -> str:
    """The commit under test, and whether llmsup/ differs from it."""

    def git(*args: str) -> str:
        r = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
        r.check_returncode()
        return r.stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "llmsup")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}{' + uncommitted changes in llmsup/' if dirty else ''}"


def _shorten(reason: str) -> str:
    for sep in ("; restart", " (", "(last:"):
        reason = reason.split(sep)[0]
    return reason.strip()[:120]


def summary(res: dict[str, Any]) -> str:
    lines = [f"chaos: {res['faults']} faults in {res['wall_s']}s (seed {res['seed']})"]
    for kind, v in res["by_kind"].items():
        rec, fl = v["recover"], v["until_failed"]
        text = f"  {kind:<20} n={v['n']:<4} {v['outcomes']}"
        if rec["n"]:
            text += f"  recover median {rec['median_s']}s max {rec['max_s']}s"
        if fl["n"]:
            text += f"  FAILED after median {fl['median_s']}s"
        lines.append(text)
    fe = res["failed_as_expected"]
    lines.append(f"FAILED where expected: {fe['n']} ({'; '.join(fe['reasons'][:6])})")
    lines.append(f"port grabs: {res['port_grabs']}")
    lines.append(f"orphans found: {res['orphans']['found']}")
    g = res["gateway"]
    lines.append(
        f"gateway: {g['requests']} requests, {g['ok']} ok, clean errors by status "
        f"{g['clean_errors_by_status']}, hangs {g['hangs']}, longest {g['max_duration_s']}s"
    )
    lines.append(f"  outcomes: {g['outcomes']}")
    leak = res["daemon_leak_check"]
    for key in ("fds", "fds_not_sockets", "rss_mib"):
        if key in leak:
            x = leak[key]
            lines.append(
                f"daemon {key}: first third {x['first_third_median']} -> last third "
                f"{x['last_third_median']} (growth {x['growth']}, tolerance {x['tolerance']})"
            )
    deaths = res["daemon_deaths"]
    lines.append(
        f"daemon deaths: {deaths['daemon_kills']} kills, {deaths['upgrades']} upgrades; "
        f"model restarts caused by them: {deaths['model_restarts_caused']} "
        f"(of {deaths['ready_untouched_at_the_deaths']} READY untouched servers)"
    )
    for what, key in (("kill", "daemon_kills"), ("upgrade", "upgrades")):
        for k in res[key]:
            lines.append(
                f"  {what} #{k['fault']} ({k['runner']} llmsup after): "
                f"{k['adopted']}/{k['ready_untouched']} adopted, "
                f"{k['survived_the_daemon']} processes survived, "
                f"answer {k['answer_s']}s, settled {k['all_settled_s']}s, "
                f"old left {len(k['old_processes_left'])}"
                + (f", hurt {k['also']} replaced {k['hurt_replaced']}" if k["also"] else "")
            )
    ll = res["log_lines"]
    lines.append(
        f"log lines: {ll['ticks_read']} ticks of {ll['server_processes']} server processes, "
        f"{ll['lost_lines']} lost; across daemon deaths: "
        f"{ll['across_daemon_deaths']['instances']} instances, "
        f"{ll['across_daemon_deaths']['lost_lines']} lost"
    )
    for note in res["notes"]:
        lines.append(f"note: {note}")
    lines.append(f"problems: {len(res['problems'])}")
    lines += [f"  - {p[:400]}" for p in res["problems"]]
    return "\n".join(lines)


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix="llmsup-chaos-"))
    try:
        yield tmp
    finally:
        if keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--faults", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-seconds", type=float, default=900.0)
    ap.add_argument("--settle-every", type=int, default=10, help="faults between full checks")
    ap.add_argument("--keep", action="store_true", help="keep the state dir and logs")
    ap.add_argument("--out", type=Path, default=RESULTS / "chaos.json")
    args = ap.parse_args()
    with workdir(args.keep) as tmp:
        chaos = Chaos(args, tmp)
        try:
            chaos.run()
        finally:
            chaos.close()
        res = chaos.results()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(summary(res))
    sys.exit(1 if res["problems"] else 0)


if __name__ == "__main__":
    main()
