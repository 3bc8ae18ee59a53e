"""The fake `vllm` and `ollama` executables, run as real processes.

Every fake runs in a session of its own; the `spawn` fixture kills each whole
process group afterwards, orphans included.
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

import _fakegpu
from _fakegpu import make_sim, sim_uuid
from llmsup.gpu import GiB, GpuProcess
from tests.gpusim import nvml_source
from tests.util import fake_env, free_port, wait_for

FAST = {"FAKE_LOAD_TIME": "0.2", "FAKE_DISCOVERY_TIME": "0.05", "FAKE_PULL_TIME": "0.3"}


@dataclass
class Fake:
    proc: subprocess.Popen[bytes]
    log_path: Path
    port: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


Spawn = Callable[..., Fake]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    fakes: list[Fake] = []

    def start(argv: list[str], port: int = 0, **env: object) -> Fake:
        log_path = tmp_path / f"{argv[0]}-{len(fakes)}.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                argv,
                env=fake_env(**{**FAST, **env}),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        fake = Fake(proc, log_path, port)
        fakes.append(fake)
        return fake

    yield start
    for fake in fakes:
        with suppress(ProcessLookupError):
            os.killpg(fake.pid, signal.SIGKILL)
        fake.proc.wait(timeout=5)


def start_vllm(spawn: Spawn, *args: str, **env: object) -> Fake:
    port = free_port()
    argv = ["vllm", "serve", "org/model", "--host", "127.0.0.1", "--port", str(port), *args]
    return spawn(argv, port, **env)


def start_ollama(spawn: Spawn, models_dir: Path, wait: bool = True, **env: object) -> Fake:
    port = free_port()
    env = {"OLLAMA_HOST": f"127.0.0.1:{port}", "OLLAMA_MODELS": str(models_dir), **env}
    fake = spawn(["ollama", "serve"], port, **env)
    if wait:
        wait_ready(fake, "/")
    return fake


def request(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def status_of(port: int, path: str = "/health", timeout: float = 1.0) -> int | None:
    """The HTTP status of GET `path`, or None if nothing answers."""
    try:
        return request(port, "GET", path, timeout=timeout)[0]
    except (OSError, http.client.HTTPException):
        return None


def wait_ready(fake: Fake, path: str = "/health", timeout: float = 10.0) -> None:
    wait_for(lambda: status_of(fake.port, path) == 200, timeout, message=f"{path} never 200")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def group_members(pgid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes of process group `pgid`."""
    members = []
    for p in psutil.process_iter():
        with suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                members.append(p)
    return members


def write_control(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# vLLM


def test_vllm_command_line_errors() -> None:
    def run(*args: str, **env: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["vllm", *args], env=fake_env(**env), capture_output=True, text=True, timeout=10
        )

    assert run("--version").stdout.strip() == "0.33.0"
    unknown = run("serve", "org/model", "--no-such-flag", "1")
    assert unknown.returncode == 2
    assert "vllm: error: unrecognized arguments: --no-such-flag 1" in unknown.stderr
    bad_choice = run("serve", "org/model", "--dtype", "float64")
    assert bad_choice.returncode == 2
    assert "invalid choice: 'float64'" in bad_choice.stderr
    tools = run("serve", "org/model", "--enable-auto-tool-choice")
    assert tools.returncode == 1
    assert "--enable-auto-tool-choice requires --tool-call-parser" in tools.stderr
    # The parser takes any kv-cache dtype; only "engine start" rejects it, once loaded.
    kv = run("serve", "org/model", "--kv-cache-dtype", "fp7", FAKE_LOAD_TIME="0.3")
    assert kv.returncode == 1
    assert "Loading weights took" in kv.stdout
    assert "Unknown kv cache dtype: 'fp7'" in kv.stderr
    assert "Starting vLLM server" not in kv.stdout
    assert run("serve", "org/model", FAKE_EXIT_CODE="3").returncode == 3


def connects(port: int) -> bool:
    with suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def test_vllm_refuses_connections_while_loading(spawn: Spawn) -> None:
    fake = start_vllm(spawn, FAKE_LOAD_TIME="1.0")
    wait_for(lambda: "Starting to load model" in fake.log(), message="no load log")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", fake.port), timeout=1).close()
    wait_for(lambda: connects(fake.port), message="the port never accepted")
    # The port accepts only after uvicorn's last start line, as in real vLLM.
    log = fake.log()
    order = [
        "Loading weights took",
        "init engine (profile, create kv cache, warmup model) took",
        f"Starting vLLM server on http://127.0.0.1:{fake.port}",
        "Available routes are:",
        "Application startup complete.",
    ]
    at = [log.find(line) for line in order]
    assert -1 not in at and at == sorted(at), at
    # The CPU build prints none of the GPU path's lines.
    for gpu_only in ("Model loading took", "torch.compile took", "Graph capturing finished"):
        assert gpu_only not in log
    wait_ready(fake)
    assert request(fake.port, "GET", "/version") == (200, b'{"version":"0.33.0"}')


def test_vllm_api_key_and_metrics(spawn: Spawn) -> None:
    fake = start_vllm(spawn, "--served-model-name", "chat", "alias", VLLM_API_KEY="s3cret")
    wait_ready(fake)
    assert request(fake.port, "GET", "/v1/models") == (401, b'{"error":"Unauthorized"}')
    auth = {"Authorization": "Bearer s3cret"}
    status, body = request(fake.port, "GET", "/v1/models", headers=auth)
    assert status == 200
    assert [m["id"] for m in json.loads(body)["data"]] == ["chat", "alias"]

    req = {"model": "chat", "prompt": "hello", "max_tokens": 4}
    status, body = request(fake.port, "POST", "/v1/completions", req, auth)
    assert status == 200
    assert json.loads(body)["usage"]["completion_tokens"] == 4
    status, body = request(fake.port, "POST", "/v1/completions", {**req, "model": "x"}, auth)
    assert status == 404
    assert set(json.loads(body)["error"]) >= {"message", "type", "code"}

    status, body = request(fake.port, "GET", "/metrics")
    assert status == 200
    assert 'vllm:generation_tokens_total{engine="0",model_name="chat"} 4.0' in body.decode()


def test_vllm_streams_server_sent_events(spawn: Spawn, tmp_path: Path) -> None:
    # Generation is held up from the start: the first chunk (the role) must still come,
    # as it is made, not with the rest at the end.
    control = tmp_path / "control.json"
    write_control(control, {"deep_hang": True})
    fake = start_vllm(spawn, FAKE_CONTROL_FILE=str(control))
    wait_ready(fake)
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=10)
    events: list[str] = []

    def next_event() -> str:
        while True:
            line = response.readline().decode()
            if not line or line.startswith("data: "):
                return line[6:].strip()

    try:
        req = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}
        conn.request("POST", "/v1/chat/completions", json.dumps(req))
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type", "").startswith("text/event-stream")
        events.append(next_event())  # while no token can be made
        assert json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"
        write_control(control, {})
        while event := next_event():
            events.append(event)
    finally:
        conn.close()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(data) for data in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert len(chunks) == 6  # the role, then one chunk per token
    assert len(text.split()) == 5
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def is_tracker(p: psutil.Process) -> bool:
    return "multiprocessing.resource_tracker" in " ".join(p.cmdline())


def tree_of(pid: int, expected: set[str]) -> dict[str, psutil.Process] | None:
    """The descendants of `pid` by title (the resource tracker as "tracker"), once
    they are exactly `expected`."""
    try:
        procs = {
            ("tracker" if is_tracker(p) else p.cmdline()[0]): p
            for p in psutil.Process(pid).children(recursive=True)
        }
    except (psutil.Error, IndexError):  # a helper of a python3 launcher shim came and went
        return None
    return procs if set(procs) == expected else None


def environ_blank(pid: int) -> bool:
    """/proc/PID/environ holds nothing but NUL bytes (setproctitle was here)."""
    return Path(f"/proc/{pid}/environ").read_bytes().strip(b"\0") == b""


def test_vllm_tensor_parallel_children_outlive_sigkill(spawn: Spawn) -> None:
    fake = start_vllm(spawn, "--tensor-parallel-size", "2", LLMSUP_TAG="tp-test")
    server = psutil.Process(fake.pid)
    expected = {"tracker", "VLLM::EngineCore", "VLLM::Worker_TP0", "VLLM::Worker_TP1"}
    procs = wait_for(
        lambda: tree_of(fake.pid, expected), message="EngineCore and two workers never appeared"
    )
    engine = procs["VLLM::EngineCore"]
    assert engine.ppid() == fake.pid and procs["tracker"].ppid() == fake.pid
    assert {p.ppid() for n, p in procs.items() if "Worker" in n} == {engine.pid}
    wait_ready(fake)
    assert (
        engine.name() == "VLLM::EngineCore"
        and "VLLM::EngineCor" in Path(f"/proc/{engine.pid}/comm").read_text()
    )
    for p in [server, *procs.values()]:
        assert os.getpgid(p.pid) == fake.pid
    # setproctitle blanks the environment of the EngineCore and the workers.
    assert server.environ()["LLMSUP_TAG"] == "tp-test"
    assert procs["tracker"].environ()["LLMSUP_TAG"] == "tp-test"
    for name in ("VLLM::EngineCore", "VLLM::Worker_TP0", "VLLM::Worker_TP1"):
        wait_for(functools.partial(environ_blank, procs[name].pid), message=name)

    os.kill(fake.pid, signal.SIGKILL)
    fake.proc.wait(timeout=5)
    assert status_of(fake.port) is None  # the port went with the server
    wait_for(lambda: engine.ppid() != fake.pid, message="the EngineCore was not reparented")
    assert all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs.values())
    # The orphaned EngineCore still does its work: a dead worker makes it stop the other.
    procs["VLLM::Worker_TP0"].kill()
    wait_for(lambda: gone(engine.pid) and gone(procs["VLLM::Worker_TP1"].pid))
    # The tracker leaves once the last holder of its pipe is gone.
    wait_for(lambda: gone(procs["tracker"].pid), message="the resource tracker stayed")


def test_vllm_sigterm_stops_everything(spawn: Spawn) -> None:
    fake = start_vllm(spawn, "-tp", "2")
    wait_ready(fake)
    wait_for(lambda: len(psutil.Process(fake.pid).children(recursive=True)) == 4)
    fake.proc.send_signal(signal.SIGTERM)
    assert fake.proc.wait(timeout=5) == 0
    wait_for(lambda: not group_members(fake.pid), timeout=3, message="processes left behind")
    assert "Shutting down" in fake.log()


def test_vllm_exits_0_when_engine_dies(spawn: Spawn) -> None:
    fake = start_vllm(spawn)
    expected = {"tracker", "VLLM::EngineCore", "VLLM::Worker"}
    procs = wait_for(
        lambda: tree_of(fake.pid, expected), message="no EngineCore and Worker at TP=1"
    )
    wait_ready(fake)
    procs["VLLM::EngineCore"].kill()
    # /health says so at once, the port closes later, and the exit code is 0 as in vLLM.
    wait_for(lambda: status_of(fake.port) == 503, timeout=3, message="/health never 503")
    assert fake.proc.wait(timeout=10) == 0
    assert "died unexpectedly" in fake.log()
    assert status_of(fake.port) is None
    wait_for(lambda: not group_members(fake.pid), message="the worker or tracker stayed")


def test_vllm_exit_code_after_start(spawn: Spawn) -> None:
    fake = start_vllm(spawn, FAKE_EXIT_CODE="7", FAKE_EXIT_AFTER="0.4")
    wait_ready(fake)
    assert fake.proc.wait(timeout=5) == 7
    wait_for(lambda: not group_members(fake.pid), timeout=3, message="engine left behind")


def test_vllm_control_file(spawn: Spawn, tmp_path: Path) -> None:
    control = tmp_path / "control.json"
    fake = start_vllm(spawn, FAKE_CONTROL_FILE=str(control))
    wait_ready(fake)
    req = {"prompt": "hi", "max_tokens": 2}

    def completion_hangs() -> bool:
        try:
            request(fake.port, "POST", "/v1/completions", req, timeout=0.5)
        except TimeoutError:
            return True
        return False

    write_control(control, {"deep_hang": True})
    wait_for(completion_hangs, message="completions never hung")
    assert status_of(fake.port) == 200

    write_control(control, {"hang": True})
    wait_for(lambda: status_of(fake.port, timeout=0.5) is None, message="/health never hung")
    with socket.create_connection(("127.0.0.1", fake.port), timeout=1):
        pass  # still accepting connections

    write_control(control, {})
    wait_ready(fake)
    assert request(fake.port, "POST", "/v1/completions", req)[0] == 200

    write_control(control, {"health_500": True, "exit": 4})
    assert fake.proc.wait(timeout=5) == 4
    # "exit" is used up; the state keys stay for whoever reads the file next.
    assert json.loads(control.read_text()) == {"health_500": True}


# ---------------------------------------------------------------------------
# Ollama


def runners_of(fake: Fake) -> list[psutil.Process]:
    return [p for p in psutil.Process(fake.pid).children() if "runner" in p.cmdline()]


def test_ollama_listens_at_once_and_waits_for_discovery(spawn: Spawn, tmp_path: Path) -> None:
    # Discovery longer than the test: the port accepts while requests still wait.
    slow = start_ollama(spawn, tmp_path, wait=False, FAKE_DISCOVERY_TIME="600")
    wait_for(lambda: connects(slow.port), message="OLLAMA_HOST's port never listened")
    with pytest.raises(TimeoutError):
        request(slow.port, "GET", "/", timeout=0.5)
    fake = start_ollama(spawn, tmp_path, wait=False, FAKE_DISCOVERY_TIME="0.3")
    wait_for(lambda: status_of(fake.port, "/", timeout=5) == 200, message="/ never 200")
    assert request(fake.port, "GET", "/") == (200, b"Ollama is running")
    assert request(fake.port, "GET", "/api/version") == (200, b'{"version":"0.33.0"}')


def test_ollama_pull_streams_progress(spawn: Spawn, tmp_path: Path) -> None:
    fake = start_ollama(spawn, tmp_path)
    status, body = request(fake.port, "POST", "/api/pull", {"model": "qwen2.5:7b"})
    assert status == 200
    lines = [json.loads(line) for line in body.splitlines()]
    assert lines[0] == {"status": "pulling manifest"}
    progress = [x["completed"] for x in lines if "completed" in x and x["total"] > 10**6]
    assert len(progress) >= 5
    assert progress == sorted(progress)
    assert lines[-1] == {"status": "success"}
    status, body = request(fake.port, "GET", "/api/tags")
    assert [m["name"] for m in json.loads(body)["models"]] == ["qwen2.5:7b"]


def test_ollama_pull_failure(spawn: Spawn, tmp_path: Path) -> None:
    fake = start_ollama(spawn, tmp_path, FAKE_PULL_FAIL="1")
    status, body = request(fake.port, "POST", "/api/pull", {"model": "llama3.2"})
    assert status == 200
    assert "error" in json.loads(body.splitlines()[-1])
    assert json.loads(request(fake.port, "GET", "/api/tags")[1]) == {"models": []}


def test_ollama_keep_alive_loads_and_unloads(spawn: Spawn, tmp_path: Path) -> None:
    fake = start_ollama(spawn, tmp_path)
    model = "qwen2.5:0.5b"
    assert request(fake.port, "POST", "/api/pull", {"model": model, "stream": False})[0] == 200

    status, body = request(fake.port, "POST", "/api/generate", {"model": model, "keep_alive": "-1"})
    assert status == 400
    assert json.loads(body) == {"error": 'time: missing unit in duration "-1"'}
    status, body = request(fake.port, "POST", "/api/generate", {"model": "nope", "keep_alive": -1})
    assert (status, json.loads(body)) == (404, {"error": "model 'nope' not found"})

    status, body = request(fake.port, "POST", "/api/generate", {"model": model, "keep_alive": -1})
    assert status == 200
    assert json.loads(body)["done_reason"] == "load"
    (runner,) = runners_of(fake)
    assert runner.name() == "ollama"
    assert os.getpgid(runner.pid) == fake.pid
    loaded = json.loads(request(fake.port, "GET", "/api/ps")[1])["models"]
    assert [m["name"] for m in loaded] == [model]
    assert loaded[0]["expires_at"] > "2200"

    status, body = request(fake.port, "POST", "/api/generate", {"model": model, "keep_alive": 0})
    assert json.loads(body)["done_reason"] == "unload"
    wait_for(lambda: gone(runner.pid), message="runner still running after unload")
    assert json.loads(request(fake.port, "GET", "/api/ps")[1]) == {"models": []}


def test_ollama_sigterm_kills_runners(spawn: Spawn, tmp_path: Path) -> None:
    fake = start_ollama(spawn, tmp_path)
    for model in ("a:1b", "b:1b"):
        request(fake.port, "POST", "/api/pull", {"model": model, "stream": False})
        req = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": False}
        status, body = request(fake.port, "POST", "/v1/chat/completions", req)
        assert status == 200, body
    runners = runners_of(fake)
    assert len(runners) == 2
    fake.proc.send_signal(signal.SIGTERM)
    assert fake.proc.wait(timeout=5) == 0
    wait_for(lambda: all(gone(r.pid) for r in runners), timeout=3, message="runners survived")


def test_ollama_sigkill_orphans_runners(spawn: Spawn, tmp_path: Path) -> None:
    fake = start_ollama(spawn, tmp_path)
    request(fake.port, "POST", "/api/pull", {"model": "m:1b", "stream": False})
    request(fake.port, "POST", "/api/generate", {"model": "m:1b", "keep_alive": "1h"})
    (runner,) = runners_of(fake)
    os.kill(fake.pid, signal.SIGKILL)
    fake.proc.wait(timeout=5)
    wait_for(lambda: runner.ppid() != fake.pid, message="the runner was not reparented")
    assert runner.is_running() and runner.status() != psutil.STATUS_ZOMBIE
    # A restarted server finds the pulled model on disk, not the orphan.
    again = start_ollama(spawn, tmp_path)
    tags = json.loads(request(again.port, "GET", "/api/tags")[1])["models"]
    assert [m["name"] for m in tags] == ["m:1b"]
    assert json.loads(request(again.port, "GET", "/api/ps")[1]) == {"models": []}


def test_tick_numbers_one_line_per_interval_from_the_server_alone(
    spawn: Spawn, tmp_path: Path
) -> None:
    """FAKE_TICK: `tick 0`, `tick 1`, ... from the API server only (vLLM at TP=2, and
    Ollama with a runner loaded), so that a line lost on its way shows as a gap."""
    vllm = start_vllm(spawn, "-tp", "2", FAKE_TICK="0.02")
    ollama = start_ollama(spawn, tmp_path / "models", FAKE_TICK="0.02")
    assert request(ollama.port, "POST", "/api/pull", {"model": "m"})[0] == 200
    assert request(ollama.port, "POST", "/api/generate", {"model": "m"})[0] == 200
    wait_ready(vllm)
    for fake in (vllm, ollama):

        def ticks(fake: Fake = fake) -> list[int]:
            lines = fake.log().splitlines()
            return [int(x.split()[1]) for x in lines if x.startswith("tick ")]

        wait_for(lambda: len(ticks()) >= 20, message="fewer than 20 ticks")
        seen = ticks()
        assert seen == list(range(len(seen)))


# ---------------------------------------------------------------------------
# A simulated GPU host (LLMSUP_FAKE_NVML), read as llmsup reads NVML


def worker_of(fake: Fake) -> psutil.Process:
    """The worker under the EngineCore: the process that holds GPU memory at TP=1."""
    expected = {"tracker", "VLLM::EngineCore", "VLLM::Worker"}
    return wait_for(lambda: tree_of(fake.pid, expected), message="no Worker")["VLLM::Worker"]


def test_vllm_takes_simulated_gpu_memory_and_an_orphan_keeps_it(
    spawn: Spawn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = make_sim(tmp_path / "gpus.json", n=2, total=80 * GiB)
    source = nvml_source(monkeypatch, sim)
    fake = start_vllm(spawn, LLMSUP_FAKE_NVML=sim, CUDA_VISIBLE_DEVICES="1")
    worker = worker_of(fake)
    wait_ready(fake)
    assert "Graph capturing finished" in fake.log()  # a GPU host: the GPU path's lines
    snap = source.snapshot()
    taken = int(80 * GiB * 0.92)
    assert snap.processes == (GpuProcess(worker.pid, sim_uuid(1), 1, taken),)
    assert [g.memory_used for g in snap.gpus] == [0, taken]

    engine = psutil.Process(worker.ppid())
    os.kill(fake.pid, signal.SIGKILL)
    fake.proc.wait(timeout=5)
    wait_for(lambda: engine.ppid() != fake.pid, message="the EngineCore was not reparented")
    assert worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE
    assert source.snapshot().processes == (GpuProcess(worker.pid, sim_uuid(1), 1, taken),)

    # The next start on that GPU fails as vLLM's does, after the load time.
    again = start_vllm(spawn, LLMSUP_FAKE_NVML=sim, CUDA_VISIBLE_DEVICES=sim_uuid(1))
    assert again.proc.wait(timeout=10) == 1
    assert (
        "ValueError: Free memory on device (6.40/80.00 GiB) on startup is less than desired "
        "GPU memory utilization (0.92, 73.60 GiB). Decrease GPU memory utilization or reduce "
        "GPU memory used by other processes." in again.log()
    )
    assert "Starting vLLM server" not in again.log()
    assert "Loading weights took" in again.log()  # it failed only once "loaded"

    engine.kill()  # its worker follows it
    wait_for(lambda: source.snapshot().gpus[1].memory_used == 0, message="memory never freed")


def test_vllm_workers_take_memory_on_their_ranks_gpus(
    spawn: Spawn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = make_sim(tmp_path / "gpus.json", n=4, total=80 * GiB)
    visible = f"3,{sim_uuid(1)}"
    fake = start_vllm(
        spawn,
        "-tp",
        "2",
        "--gpu-memory-utilization",
        "0.5",
        LLMSUP_FAKE_NVML=sim,
        CUDA_VISIBLE_DEVICES=visible,
    )
    wait_ready(fake)
    # argv[0] is the title from the start; the comm name is set a moment later.
    workers = {p.cmdline()[0]: p.pid for p in psutil.Process(fake.pid).children(recursive=True)}
    snap = nvml_source(monkeypatch, sim).snapshot()
    held = {(p.pid, p.gpu_index, p.used_memory) for p in snap.processes}
    assert held == {
        (workers["VLLM::Worker_TP0"], 3, 40 * GiB),
        (workers["VLLM::Worker_TP1"], 1, 40 * GiB),
    }


def test_vllm_gpu_memory_is_freed_after_the_release_delay(
    spawn: Spawn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = make_sim(tmp_path / "gpus.json", n=1)
    source = nvml_source(monkeypatch, sim)
    fake = start_vllm(spawn, LLMSUP_FAKE_NVML=sim, FAKE_GPU_RELEASE_DELAY="1.0")
    wait_ready(fake)
    assert source.snapshot().gpus[0].memory_used > 0
    fake.proc.send_signal(signal.SIGTERM)
    assert fake.proc.wait(timeout=5) == 0
    wait_for(lambda: not group_members(fake.pid), timeout=3, message="processes left behind")
    exited = time.monotonic()
    snap = source.snapshot()
    assert snap.processes == ()
    assert snap.gpus[0].memory_used == int(80 * GiB * 0.92)  # freed memory lags the exit
    wait_for(lambda: source.snapshot().gpus[0].memory_used == 0, timeout=5)
    assert time.monotonic() - exited >= 1.0


def test_ollama_runners_take_simulated_gpu_memory(
    spawn: Spawn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = make_sim(tmp_path / "gpus.json", n=2, total=10 * GiB)
    fake = start_ollama(
        spawn,
        tmp_path / "models",
        LLMSUP_FAKE_NVML=sim,
        CUDA_VISIBLE_DEVICES=sim_uuid(1),
        FAKE_OLLAMA_VRAM=3 * GiB,
    )
    for model in ("a:1b", "b:1b"):
        request(fake.port, "POST", "/api/pull", {"model": model, "stream": False})
    request(fake.port, "POST", "/api/generate", {"model": "a:1b", "keep_alive": -1})
    (runner,) = runners_of(fake)
    snap = nvml_source(monkeypatch, sim).snapshot()
    assert snap.processes == (GpuProcess(runner.pid, sim_uuid(1), 1, 3 * GiB),)
    # Something else takes most of the GPU: the next model goes partly on the CPU.
    _fakegpu.allocate(sim, os.getpid(), 1, 6 * GiB)
    request(fake.port, "POST", "/api/generate", {"model": "b:1b", "keep_alive": -1})
    loaded = json.loads(request(fake.port, "GET", "/api/ps")[1])["models"]
    sizes = {m["name"]: (m["size"], m["size_vram"]) for m in loaded}
    assert sizes == {"a:1b": (3 * GiB, 3 * GiB), "b:1b": (3 * GiB, 1 * GiB)}
