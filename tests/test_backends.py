"""Backends as plugins: the registry is the one source of the manifest's model
classes, of the plan's servers and checks, of GPU claims and of log reading."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import aiohttp
import psutil
import pytest

from llmsup import gpu, gpucheck
from llmsup.backends import REGISTRY, Http
from llmsup.backends.ollama import OllamaModel, build
from llmsup.errors import ManifestError
from llmsup.manifest import BACKENDS, json_schema, parse_manifest
from llmsup.plan import make_plan
from llmsup.state import State
from llmsup.supervise import events as ev
from llmsup.supervise import machine as m
from tests.test_runner import FakeClock, FakeServer, runner_for
from tests.util import fake_env, free_port

GiB = 2**30


def test_the_manifest_takes_its_model_classes_from_the_registry() -> None:
    assert list(REGISTRY) == ["vllm", "ollama", "command", "remote"]
    assert {name: b.model for name, b in REGISTRY.items()} == BACKENDS
    for name, backend in REGISTRY.items():
        assert backend.name == name
        assert backend.model.model_fields["backend"].annotation == Literal[name]
    [entry] = json_schema()["properties"]["models"]["patternProperties"].values()
    assert entry["discriminator"]["mapping"] == {
        name: f"#/$defs/{b.model.__name__}" for name, b in REGISTRY.items()
    }


@pytest.mark.parametrize(
    ("entry", "where", "message"),
    [
        ("backend: sglang", "3:14 models.a.backend", "unknown backend 'sglang'"),
        ("model: m", "2:3 models.a", "missing required key 'backend'"),
    ],
)
def test_a_backend_not_in_the_registry_is_named_with_those_that_are(
    entry: str, where: str, message: str
) -> None:
    with pytest.raises(ManifestError) as e:
        parse_manifest(f"models:\n  a:\n    {entry}\n", "models.yaml", {})
    [p] = e.value.problems
    assert f"{p.line}:{p.column} {p.path}" == where
    assert p.message == f"{message} (one of: vllm, ollama, command, remote)"


# A backend registered before the manifest is imported: the schema, the error
# texts, the plan and its checks all take it up, with nothing else to change.
ECHO = """
import json, sys
from collections.abc import Sequence
from typing import Literal
from pydantic import Field
from llmsup import backends
from llmsup.backends.base import Backend, Context, Locator
from llmsup.backends.launch import Launch
from llmsup.errors import Problem
from llmsup.fields import ModelBase, Port

class EchoModel(ModelBase):
    backend: Literal["echo"] = Field(description="an echo server")
    port: Port = Field(description="its port")
    text: str = Field(description="what it answers")

class Echo(Backend[EchoModel]):
    name, model = "echo", EchoModel

    def build(self, names: Sequence[str], specs: Sequence[EchoModel], host: str,
              *, first: bool) -> Launch:
        return Launch(names[0], "echo", tuple(names), ("echo", specs[0].text), {}, host,
                      specs[0].port, "/")

    def served_names(self, spec: EchoModel) -> list[str]:
        return []

    def check(self, at: Locator, name: str, spec: EchoModel, ctx: Context) -> list[Problem]:
        return [at.problem(("models", name, "text"), "echo!", "warning")]

backends.REGISTRY["echo"] = Echo()
from llmsup.errors import ManifestError
from llmsup.manifest import json_schema, parse_manifest
from llmsup.plan import make_plan

try:
    parse_manifest("models:\\n  a: {backend: tgi}\\n", "m.yaml", {})
except ManifestError as e:
    unknown = e.problems[0].message
try:
    parse_manifest("models:\\n  a: {backend: echo, port: 1, txt: x}\\n", "m.yaml", {})
except ManifestError as e:
    typo = [p.message for p in e.problems]
loaded = parse_manifest("models:\\n  a: {backend: echo, port: 9, text: hi}\\n", "m.yaml", {})
plan = make_plan(loaded)
print(json.dumps({
    "unknown": unknown, "typo": typo,
    "argv": list(plan.launches[0].argv), "problems": [str(p) for p in plan.problems],
    "described": json_schema()["properties"]["models"]["description"],
}))
"""


def test_a_backend_added_to_the_registry_reaches_the_schema_errors_and_plan() -> None:
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(ECHO)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["unknown"] == "unknown backend 'tgi' (one of: vllm, ollama, command, remote, echo)"
    assert out["typo"] == [
        "missing required key 'text'",
        "unknown key 'txt' (did you mean 'text'?)",
    ]
    assert out["argv"] == ["echo", "hi"]
    assert out["problems"] == ["m.yaml:2:37: warning: models.a.text: echo!"]
    assert (
        out["described"]
        == "model name -> its server (backend: vllm, ollama, command, remote or echo)"
    )


def _gpu(index: int) -> gpu.Gpu:
    return gpu.Gpu(
        index=index,
        uuid=f"GPU-{index}",
        name="H100",
        memory_total=80 * GiB,
        memory_used=0,
        memory_free=80 * GiB,
        utilization=0,
        temperature=30,
    )


def test_what_a_start_waits_for_is_each_backends_gpu_claim() -> None:
    loaded = parse_manifest(
        textwrap.dedent(
            """\
            models:
              half: {backend: vllm, model: m, gpus: [1], gpu_memory_utilization: 0.5}
              both: {backend: vllm, model: n, tensor_parallel_size: 2, port: 8001}
              small: {backend: ollama, model: a, gpus: [0], gpu_memory: 6G}
              tiny: {backend: ollama, model: b, gpus: [0], gpu_memory: 2G}
              free: {backend: command, command: [srv], port: 9000, gpus: [1]}
            """
        ),
        "models.yaml",
        {},
    )
    plan = make_plan(loaded)
    snap = gpu.Snapshot((_gpu(0), _gpu(1)), ())

    def needs(unit: str) -> list[tuple[int, int]]:
        launch = plan.unit_of(unit)
        assert launch is not None
        return [(n.gpu.index, n.bytes) for n in gpucheck.needs(loaded, launch, snap)]

    assert needs("half") == [(1, 40 * GiB)]
    assert needs("both") == [(0, int(0.92 * 80 * GiB)), (1, int(0.92 * 80 * GiB))]
    assert needs("small") == needs("tiny") == [(0, 8 * GiB)]  # one server, both models
    assert needs("free") == []


class Talking(FakeServer):
    """A server whose log lines the test writes."""

    say: Callable[[str], None]

    async def spawn(self, on_line: Callable[[str], None]) -> int:
        self.say = on_line
        return await super().spawn(on_line)


DIED = "ERROR [core_client.py:1] Engine core proc EngineCore_DP0 died unexpectedly"
LOADED = "INFO [default_loader.py:1] Loading weights took 0.01 seconds"


@pytest.mark.parametrize(
    ("backend", "progress", "exit"),
    [
        ("vllm", "weights loaded (40%)", "exited with code 0 (EngineCore died)"),
        ("command", "", "exited with code 0"),
    ],
)
def test_the_runner_reads_log_lines_through_the_backend(
    backend: str, progress: str, exit: str
) -> None:
    async def main() -> None:
        clock, server = FakeClock(), Talking()
        runner = runner_for(server, clock, m.Rules(), backend)
        task = asyncio.create_task(runner.run(ev.Start()))
        await clock.run_until(lambda: runner.life.state == State.READY)
        server.say(LOADED)
        server.say(DIED)
        await clock.run_until(lambda: True)
        assert runner.life.progress == progress
        server.crash(0)
        await clock.run_until(lambda: runner.life.state != State.READY)
        assert runner.life.last_exit == exit
        runner.post(ev.Stop())
        await clock.run_until(task.done)

    asyncio.run(main())


# ------------------------------------------------------------------ steps after the start

OLLAMA_FAST = {"FAKE_DISCOVERY_TIME": "0.05", "FAKE_PULL_TIME": "0.3", "FAKE_LOAD_TIME": "0.1"}


@pytest.fixture
def fake_ollama(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Starts the fake `ollama serve` on OLLAMA_HOST (port: the launch's)."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(port: int, **env: str) -> subprocess.Popen[bytes]:
        host = {"OLLAMA_HOST": f"127.0.0.1:{port}", "OLLAMA_MODELS": str(tmp_path)}
        proc = subprocess.Popen(
            ["ollama", "serve"],
            env=fake_env(**OLLAMA_FAST, **host, **env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


async def _answering(http: Http) -> None:
    for _ in range(200):
        try:
            async with http.session.get(http.base + "/") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError("the fake ollama never answered 200 on /")


async def _loaded(http: Http, count: int | None = None) -> list[str]:
    """The models /api/ps lists (once there are `count` of them)."""
    for _ in range(200):
        async with http.session.get(http.base + "/api/ps") as r:
            names = [str(m["name"]) for m in (await r.json())["models"]]
        if count is None or len(names) == count:
            return sorted(names)
        await asyncio.sleep(0.05)
    raise AssertionError(f"/api/ps never listed {count} models: {names}")


def test_the_ollama_backend_pulls_preloads_and_loads_again_what_a_dead_runner_dropped(
    fake_ollama: Callable[..., subprocess.Popen[bytes]],
) -> None:
    port = free_port()
    names = ["qwen2.5:0.5b", "llama3.2:1b"]
    specs = [OllamaModel(backend="ollama", model=n, port=port) for n in names]
    launch = build(["a", "b"], specs, "127.0.0.1", noprune=False)
    backend = REGISTRY["ollama"]
    server = fake_ollama(port)

    async def main() -> None:
        async with aiohttp.ClientSession() as session:
            http = Http(session, f"http://127.0.0.1:{port}")
            await _answering(http)
            said: list[str] = []
            assert await backend.post_start(launch, http, said.append, 30.0) is None
            assert any(x.startswith("pulling qwen2.5:0.5b ") for x in said), said
            assert said.index("loading qwen2.5:0.5b") < said.index("loading llama3.2:1b")
            alive = await backend.liveness(launch, http, 5.0)
            assert alive is not None and (alive.ok, alive.detail) == (True, "loaded")
            # A runner dies: Ollama forgets its model; the next probe loads it again.
            runners = [p for p in psutil.Process(server.pid).children() if "runner" in p.cmdline()]
            assert len(runners) == 2
            runners[0].kill()
            assert len(await _loaded(http, count=1)) == 1
            alive = await backend.liveness(launch, http, 5.0)
            assert alive is not None and (alive.ok, alive.detail) == (True, "loaded")
            assert await _loaded(http) == sorted(names)

    asyncio.run(main())


def test_a_failed_ollama_pull_is_why_the_steps_failed(
    fake_ollama: Callable[..., subprocess.Popen[bytes]],
) -> None:
    port = free_port()
    spec = OllamaModel(backend="ollama", model="llama3.2:1b", port=port)
    launch = build(["a"], [spec], "127.0.0.1", noprune=False)
    fake_ollama(port, FAKE_PULL_FAIL="1")

    async def main() -> None:
        async with aiohttp.ClientSession() as session:
            http = Http(session, f"http://127.0.0.1:{port}")
            await _answering(http)
            why = await REGISTRY["ollama"].post_start(launch, http, lambda _: None, 30.0)
            assert why is not None and why.startswith("pull llama3.2:1b: "), why

    asyncio.run(main())


def test_a_model_on_disk_is_not_pulled_again(
    fake_ollama: Callable[..., subprocess.Popen[bytes]],
) -> None:
    """As `ollama run`: a host that cannot reach the registry (every pull fails here)
    still serves the models it has; one it lacks is pulled, and that pull's error
    is why the steps failed."""
    port = free_port()
    spec = OllamaModel(backend="ollama", model="llama3.2:1b", port=port)
    launch = build(["a"], [spec], "127.0.0.1", noprune=False)
    server = fake_ollama(port)

    async def main(pull_fails: bool) -> str | None:
        async with aiohttp.ClientSession() as session:
            http = Http(session, f"http://127.0.0.1:{port}")
            await _answering(http)
            said: list[str] = []
            why = await REGISTRY["ollama"].post_start(launch, http, said.append, 30.0)
            assert pull_fails or any(x.startswith("pulling llama3.2:1b") for x in said), said
            return why

    assert asyncio.run(main(pull_fails=False)) is None  # pulled: now on disk
    os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=5)
    fake_ollama(port, FAKE_PULL_FAIL="1")  # the same models directory, no registry
    assert asyncio.run(main(pull_fails=True)) is None
    other = OllamaModel(backend="ollama", model="qwen2.5:0.5b", port=port)
    launch = build(["b"], [other], "127.0.0.1", noprune=False)
    why = asyncio.run(main(pull_fails=True))
    assert why is not None and why.startswith("pull qwen2.5:0.5b: "), why


def test_backends_without_steps_have_nothing_to_do_after_the_start() -> None:
    loaded = parse_manifest("models:\n  a: {backend: vllm, model: org/a}\n", "m.yaml", {})
    [launch] = make_plan(loaded).launches
    backend = REGISTRY["vllm"]
    assert backend.steps(launch) == []

    async def main() -> None:
        async with aiohttp.ClientSession() as session:
            http = Http(session, "http://127.0.0.1:1")  # never reached
            assert await backend.post_start(launch, http, lambda _: None, 1.0) is None
            assert await backend.liveness(launch, http, 1.0) is None

    asyncio.run(main())
