"""GPU awareness end to end, on a simulated GPU host that the fake servers fill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

import _fakegpu
from _fakegpu import make_sim, nvml_env, sim_uuid
from llmsup.gpu import GiB
from tests.supervisor_util import Daemon, gone
from tests.util import free_port, wait_for


def sim_daemon(tmp: Path, models: str) -> Daemon:
    sim = make_sim(tmp / "gpus.json", n=2, total=80 * GiB)
    return Daemon(tmp, models, extra_env=nvml_env(sim))


def test_restart_waits_for_the_memory_to_be_released(tmp_path: Path) -> None:
    models = f"""\
    m:
      backend: vllm
      model: org/m
      gpus: [0]
      gpu_memory_utilization: 0.9
      port: {free_port()}
      env: {{FAKE_GPU_RELEASE_DELAY: "2"}}
    """
    d = sim_daemon(tmp_path, models)
    try:
        d.start()
        row = d.wait_all_ready()["m"]
        held = wait_for(lambda: d.status()["m"]["gpu_memory"], 10)
        assert held["0"] == int(0.9 * 80 * GiB)
        table = d.cli("status", "-f", str(d.manifest)).stdout
        assert "0:72.0G" in table
        os.kill(row["pid"], signal.SIGKILL)
        waiting = d.wait_state("m", "WAITING_GPU", 10)
        assert "GPU 0 has" in waiting["detail"] and "needs 72.0 GiB" in waiting["detail"]
        after = d.wait_state("m", "READY", 20)
        assert after["pid"] != row["pid"]
    finally:
        d.stop()


def test_foreign_holder_fails_the_start_at_the_deadline_and_is_named(tmp_path: Path) -> None:
    models = f"""\
    m:
      backend: vllm
      model: org/m
      gpus: [{sim_uuid(1)}]
      gpu_memory_utilization: 0.9
      port: {free_port()}
      health: {{gpu_wait: 1500ms}}
    """
    d = sim_daemon(tmp_path, models)
    sleeper = subprocess.Popen(["sleep", "120"])
    try:
        _fakegpu.allocate(str(tmp_path / "gpus.json"), sleeper.pid, sim_uuid(1), 40 * GiB)
        d.start()
        row = d.wait_state("m", "FAILED", 20)
        assert "after 1.5s (health.gpu_wait)" in row["reason"]
        assert f"pid {sleeper.pid}" in row["reason"] and "sleep 120" in row["reason"]
        assert "[foreign]" in row["reason"]
        assert row["restarts"] == 0
        assert d.processes("m") == []  # it never started into an out-of-memory crash
    finally:
        sleeper.kill()
        sleeper.wait()
        d.stop()


def test_orphan_holding_memory_is_reported_then_cleaned(tmp_path: Path) -> None:
    models = f"""\
    m: {{backend: vllm, model: org/m, gpus: [0, 1], gpu_memory_utilization: 0.5,
         port: {free_port()}}}
    """
    d = sim_daemon(tmp_path, models)
    try:
        d.start()
        row = d.wait_all_ready()["m"]
        listed = json.loads(d.cli("gpus", "--json", "-f", str(d.manifest)).stdout)
        owners = {p["owner"] for p in listed["processes"]}
        assert owners == {"model m"}, listed
        # The tree as the kernel shows it: the workers blank their environment.
        server = psutil.Process(row["pid"])
        tree = [c.pid for c in server.children(recursive=True)]
        d.kill_daemon()
        server.kill()
        workers = [pid for pid in tree if psutil.pid_exists(pid)]
        assert workers, "the TP workers outlive their server"
        r = d.cli("gpus", "--json", "-f", str(d.manifest))
        listed = json.loads(r.stdout)
        assert {p["pid"] for p in listed["processes"]} <= set(workers)
        assert {p["owner"] for p in listed["processes"]} == {"orphan of m"}
        r = d.cli("gpus", "-f", str(d.manifest))
        assert "orphan of m" in r.stdout and "40.0 GiB" in r.stdout
        d.start()  # the next daemon stops the orphans before launching
        d.wait_all_ready()
        assert gone(workers)
    finally:
        d.stop()


def test_check_against_the_gpus_of_this_host(tmp_path: Path) -> None:
    sim = make_sim(tmp_path / "gpus.json", n=2, total=80 * GiB)
    manifest = tmp_path / "models.yaml"
    manifest.write_text(
        "models:\n"
        "  a: {backend: vllm, model: org/a, gpus: [0, 7]}\n"
        "  b: {backend: vllm, model: org/b, port: 8001, gpus: [GPU-deadbeef]}\n"
    )
    env = {**os.environ, **nvml_env(sim)}
    llmsup = [sys.executable, "-m", "llmsup.cli"]
    r = subprocess.run(
        [*llmsup, "check", "-f", str(manifest)], env=env, capture_output=True, text=True
    )
    assert r.returncode == 2
    assert "2:46: models.a.gpus[1]: GPU 7 does not exist (this host has 2: 0, 1)" in r.stderr
    assert "models.b.gpus[0]: no GPU with UUID GPU-deadbeef" in r.stderr
    manifest.write_text(f"models:\n  a: {{backend: vllm, model: org/a, gpus: [{sim_uuid(1)}]}}\n")
    r = subprocess.run(
        [*llmsup, "check", "-f", str(manifest)], env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert "memory fit not estimated: org/a is not a local directory" in r.stderr
    # no driver at all (the fake pynvml without a host): one note, no traceback
    env.pop("LLMSUP_FAKE_NVML")
    r = subprocess.run(
        [*llmsup, "check", "-f", str(manifest)], env=env, capture_output=True, text=True
    )
    assert r.returncode == 0
    assert "note: GPU checks skipped: no NVIDIA driver" in r.stderr
    assert "Traceback" not in r.stderr


def test_weights_that_cannot_fit_are_an_error_at_check(tmp_path: Path) -> None:
    import struct

    model = tmp_path / "big-model"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps(
            {
                "num_hidden_layers": 80,
                "num_attention_heads": 64,
                "num_key_value_heads": 8,
                "hidden_size": 8192,
                "torch_dtype": "bfloat16",
            }
        )
    )
    # a header that declares 100 GiB of bf16 weights (the data itself is never read)
    n = 50 * GiB
    header = json.dumps({"w": {"dtype": "BF16", "shape": [n], "data_offsets": [0, 2 * n]}})
    (model / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header.encode())
    sim = make_sim(tmp_path / "gpus.json", n=2, total=80 * GiB)
    manifest = tmp_path / "models.yaml"
    manifest.write_text(
        f"models:\n  big: {{backend: vllm, model: {model}, gpus: [0], "
        "gpu_memory_utilization: 0.9}\n"
    )
    env = {**os.environ, **nvml_env(sim)}
    r = subprocess.run(
        [sys.executable, "-m", "llmsup.cli", "check", "-f", str(manifest)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2, r.stderr
    assert "models.big.gpu_memory_utilization" in r.stderr
    assert "100.0 GiB" in r.stderr
    # over two GPUs with tensor parallelism it fits
    manifest.write_text(
        f"models:\n  big: {{backend: vllm, model: {model}, gpus: [0, 1], "
        "gpu_memory_utilization: 0.9}\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "llmsup.cli", "check", "-f", str(manifest)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
