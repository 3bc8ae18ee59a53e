"""Backends as plugins: the registry is the one source of the manifest's model
classes, of the plan's servers and checks, of GPU claims and of log reading."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Literal

import pytest

from llmsup import gpu, gpucheck
from llmsup.backends import REGISTRY
from llmsup.errors import ManifestError
from llmsup.manifest import BACKENDS, json_schema, parse_manifest
from llmsup.plan import make_plan
from llmsup.state import State
from llmsup.supervise import events as ev
from llmsup.supervise import machine as m
from llmsup.supervise.runner import Runner
from tests.test_runner import FakeClock, FakeServer, NoJitter

GiB = 2**30


def test_the_manifest_takes_its_model_classes_from_the_registry() -> None:
    assert list(REGISTRY) == ["vllm", "ollama", "command"]
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
    assert p.message == f"{message} (one of: vllm, ollama, command)"


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
    assert out["unknown"] == "unknown backend 'tgi' (one of: vllm, ollama, command, echo)"
    assert out["typo"] == [
        "missing required key 'text'",
        "unknown key 'txt' (did you mean 'text'?)",
    ]
    assert out["argv"] == ["echo", "hi"]
    assert out["problems"] == ["m.yaml:2:37: warning: models.a.text: echo!"]
    assert out["described"] == "model name -> its server (backend: vllm, ollama, command or echo)"


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
        runner = Runner(
            "unit",
            backend,
            lambda: m.Rules(),
            clock=clock,
            launcher=server,
            prober=server,
            gpus=server,
            neighbours=server,
            journal=server,
            rand=NoJitter(),
        )
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
