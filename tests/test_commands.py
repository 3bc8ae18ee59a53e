"""Manifest entries give exactly the command lines our users type today."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmsup.cli import main
from llmsup.errors import ManifestError
from llmsup.manifest import parse_manifest
from llmsup.plan import make_plan, plan_or_raise

ROOT = Path(__file__).resolve().parent.parent
LLMSUP = [sys.executable, "-m", "llmsup.cli"]


def plan_of(text: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return plan_or_raise(parse_manifest(textwrap.dedent(text), "models.yaml", env or {}))


def flags(argv: tuple[str, ...] | list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Split argv into positionals and {flag: values}, so flag order does not matter."""
    pos: list[str] = []
    out: dict[str, list[str]] = {}
    current: str | None = None
    for a in argv:
        if a.startswith("--"):
            current = a
            out[a] = []
        elif current is None:
            pos.append(a)
        else:
            out[current].append(a)
    return pos, out


def same_command(got: tuple[str, ...], typed: str) -> None:
    """`got` is `typed` plus the --host/--port llmsup always passes, in any flag order."""
    want_pos, want = flags(shlex.split(typed))
    got_pos, have = flags(got)
    assert got_pos == want_pos
    want.setdefault("--host", ["127.0.0.1"])
    want.setdefault("--port", ["8000"])
    assert have == want


def test_llama3_8b_with_key_in_env() -> None:
    plan = plan_of(
        """
        models:
          llama3:
            backend: vllm
            model: NousResearch/Meta-Llama-3-8B-Instruct
            dtype: auto
            api_key: token-abc123
        """
    )
    (la,) = plan.launches
    same_command(la.argv, "vllm serve NousResearch/Meta-Llama-3-8B-Instruct --dtype auto")
    assert la.resolve_env() == {"VLLM_API_KEY": "token-abc123"}
    assert "token-abc123" not in " ".join(la.argv)
    assert la.display_env() == {"VLLM_API_KEY": "***"}


QWEN32 = """
  qwen32:
    backend: vllm
    model: /home/ly/qwen2.5/Qwen2.5-32B-Instruct/
    tensor_parallel_size: 8
    dtype: auto
    api_key: "123"
    gpu_memory_utilization: 0.95
    max_model_len: 27768
    tool_call_parser: hermes
    served_name: Qwen2.5-32B-Instruct
    kv_cache_dtype: fp8_e5m2
"""
QWEN_VL = """
  qwen-vl:
    backend: vllm
    model: /home/ly/qwen2.5/Qwen2-VL-7B-Instruct
    gpus: [2]
    dtype: auto
    api_key: "123"
    gpu_memory_utilization: 0.5
    max_model_len: 5108
    tool_call_parser: hermes
    served_name: Qwen2-VL-7B-Instruct
    port: 1236
"""


def test_qwen32_tp8() -> None:
    (la,) = plan_of("models:" + QWEN32).launches
    same_command(
        la.argv,
        "vllm serve /home/ly/qwen2.5/Qwen2.5-32B-Instruct/ --tensor-parallel-size 8 --dtype auto "
        "--gpu-memory-utilization 0.95 --max-model-len 27768 --enable-auto-tool-choice "
        "--tool-call-parser hermes --served-model-name Qwen2.5-32B-Instruct "
        "--kv-cache-dtype fp8_e5m2",
    )
    assert la.resolve_env() == {"VLLM_API_KEY": "123"}


def test_qwen_vl_on_gpu_2() -> None:
    (la,) = plan_of("models:" + QWEN_VL).launches
    same_command(
        la.argv,
        "vllm serve /home/ly/qwen2.5/Qwen2-VL-7B-Instruct --dtype auto --tensor-parallel-size 1 "
        "--gpu-memory-utilization 0.5 --max-model-len 5108 --enable-auto-tool-choice "
        "--tool-call-parser hermes --served-model-name Qwen2-VL-7B-Instruct --port 1236",
    )
    assert la.resolve_env() == {
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": "2",
        "VLLM_API_KEY": "123",
    }


def test_qwen32_and_qwen_vl_overcommit_gpu_2() -> None:
    loaded = parse_manifest("models:" + QWEN32 + QWEN_VL, "models.yaml", {})
    errors = make_plan(loaded).errors
    assert len(errors) == 1
    assert errors[0].path == "models.qwen-vl.gpu_memory_utilization"
    assert "GPU 2 would be asked for 1.45 of its memory" in errors[0].message
    assert "qwen32 (0.95) + qwen-vl (0.5)" in errors[0].message
    with pytest.raises(ManifestError):
        plan_or_raise(loaded)


def test_ollama_run_is_serve_pull_preload() -> None:
    plan = plan_of(
        """
        models:
          llama3.2-1b:
            backend: ollama
            model: hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q8_0
        """
    )
    (la,) = plan.launches
    assert la.argv == ("ollama", "serve")
    assert la.env == {"OLLAMA_HOST": "127.0.0.1:11434"}
    assert [(x.model, x.keep_alive) for x in la.ollama_loads] == [
        ("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q8_0", -1)
    ]
    assert la.ready_path == "/"


def test_ollama_models_on_one_port_share_a_server() -> None:
    plan = plan_of(
        """
        models:
          a: {backend: ollama, model: "qwen2.5:7b", gpus: [GPU-1234], port: 11500}
          b: {backend: ollama, model: "llama3.2:1b", gpus: [GPU-1234], port: 11500,
              keep_alive: 10m, flash_attention: true}
          c: {backend: ollama, model: "phi3", gpus: [1], port: 11501}
        """
    )
    first, second = plan.launches
    assert first.models == ("a", "b")
    assert first.env == {
        "OLLAMA_HOST": "127.0.0.1:11500",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": "GPU-1234",
        "OLLAMA_FLASH_ATTENTION": "1",
    }
    assert [x.keep_alive for x in first.ollama_loads] == [-1, "10m"]
    assert second.models == ("c",)
    assert second.env["OLLAMA_NOPRUNE"] == "1"  # only the first server prunes


def test_every_field_reaches_argv_or_env() -> None:
    plan = plan_of(
        """
        models:
          full:
            backend: vllm
            model: deepseek-ai/DeepSeek-V2-Lite
            gpus: [GPU-aaaa, GPU-bbbb, GPU-cccc, GPU-dddd]
            tensor_parallel_size: 2
            pipeline_parallel_size: 2
            quantization: fp8
            trust_remote_code: true
            max_model_len: 32K
            source: modelscope
            env: {HF_HOME: /srv/hf}
            extra_args: ["--enable-prefix-caching", "--max-num-seqs", "64"]
        """
    )
    (la,) = plan.launches
    _, f = flags(la.argv)
    assert f["--tensor-parallel-size"] == ["2"]
    assert f["--pipeline-parallel-size"] == ["2"]
    assert f["--quantization"] == ["fp8"]
    assert f["--trust-remote-code"] == []
    assert f["--max-model-len"] == ["32768"]
    assert f["--max-num-seqs"] == ["64"]
    assert la.env == {
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": "GPU-aaaa,GPU-bbbb,GPU-cccc,GPU-dddd",
        "VLLM_USE_MODELSCOPE": "True",
        "HF_HOME": "/srv/hf",
    }


def test_api_key_file_is_read_at_launch(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("from-file\n")
    plan = plan_of(f"models:\n  a: {{backend: vllm, model: m, api_key_file: {key}}}\n")
    (la,) = plan.launches
    assert la.resolve_env() == {"VLLM_API_KEY": "from-file"}
    key.write_text("rotated")
    assert la.resolve_env() == {"VLLM_API_KEY": "rotated"}


def test_shared_gpu_orders_launches() -> None:
    plan = plan_of(
        """
        models:
          big: {backend: vllm, model: a, gpus: [0, 1], gpu_memory_utilization: 0.5}
          other: {backend: vllm, model: b, gpus: [2], port: 8001}
          small: {backend: vllm, model: c, gpus: [1], gpu_memory_utilization: 0.4, port: 8002}
          tiny: {backend: vllm, model: d, gpus: [1], gpu_memory_utilization: 0.05, port: 8003}
        """
    )
    assert plan.after == {"small": ("big",), "tiny": ("big", "small")}


# ----------------------------------------------------------------- the CLI


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return subprocess.run(
        [*LLMSUP, *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def test_root_example_is_valid() -> None:
    r = run_cli("check", "-f", str(ROOT / "models.yaml"), env={"LLMSUP_GATEWAY_KEY": "k-1"})
    assert r.returncode == 0, r.stderr
    assert "OK, 4 models in 4 servers" in r.stdout


def test_root_example_ships_no_gateway_key() -> None:
    env = {k: v for k, v in os.environ.items() if k != "LLMSUP_GATEWAY_KEY"}
    r = subprocess.run(
        [*LLMSUP, "check", "-f", "models.yaml"], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert r.returncode == 2
    assert "gateway.api_keys[0]: environment variable LLMSUP_GATEWAY_KEY is not set" in r.stderr
    assert "a default here would be a key anyone can read" in r.stderr
    r = run_cli("check", "-f", "models.yaml", env={"LLMSUP_GATEWAY_KEY": ""})
    assert r.returncode == 2
    assert "models.yaml:" in r.stderr and "gateway.api_keys[0]: the key is empty" in r.stderr


def test_check_invalid_exits_2_with_located_errors(tmp_path: Path) -> None:
    bad = tmp_path / "models.yaml"
    bad.write_text(
        "models:\n  q:\n    backend: vllm\n    model: m\n    gpu_memory_utilization: 1.5\n"
    )
    r = run_cli("check", "-f", str(bad))
    assert r.returncode == 2
    assert f"{bad}:5:29: models.q.gpu_memory_utilization: must be in (0, 1], got 1.5" in r.stderr
    assert "1 error: manifest not valid" in r.stderr


def test_missing_manifest_exits_2(tmp_path: Path) -> None:
    r = run_cli("check", "-f", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2
    assert "no such file" in r.stderr


def test_manifest_from_environment_variable(tmp_path: Path) -> None:
    m = tmp_path / "elsewhere.yaml"
    m.write_text("models:\n  a: {backend: vllm, model: m}\n")
    r = run_cli("check", cwd=tmp_path, env={"LLMSUP_MANIFEST": str(m)})
    assert r.returncode == 0, r.stderr
    assert str(m) in r.stdout


def test_plan_json_redacts_secrets(tmp_path: Path) -> None:
    m = tmp_path / "models.yaml"
    m.write_text(
        "models:\n"
        "  a: {backend: vllm, model: m, api_key: '${K}', env: {HF_TOKEN: hf_abc},\n"
        "      gpu_memory_utilization: 0.45}\n"
        "  b: {backend: vllm, model: n, port: 8001, gpu_memory_utilization: 0.45}\n"
    )
    r = run_cli("plan", "--json", "-f", str(m), env={"K": "sk-very-secret"})
    assert r.returncode == 0, r.stderr
    entries = json.loads(r.stdout)
    assert [e["name"] for e in entries] == ["a", "b"]
    assert entries[0]["env"] == {"HF_TOKEN": "***", "VLLM_API_KEY": "***"}
    assert entries[1]["after"] == ["a"]  # both on GPU 0 (vLLM's default device)
    assert set(entries[0]) >= {"name", "backend", "argv", "env", "after"}
    r = run_cli("plan", "-f", str(m), env={"K": "sk-very-secret"})
    assert "sk-very-secret" not in r.stdout + r.stderr
    assert "hf_abc" not in r.stdout + r.stderr


def test_plan_text_is_copy_pasteable(tmp_path: Path) -> None:
    m = tmp_path / "models.yaml"
    m.write_text("models:\n  a: {backend: vllm, model: 'my model dir', gpus: [3]}\n")
    r = run_cli("plan", "-f", str(m))
    assert r.returncode == 0, r.stderr
    cmd = next(line for line in r.stdout.splitlines() if line.strip().startswith("vllm"))
    assert shlex.split(cmd)[:3] == ["vllm", "serve", "my model dir"]
    assert "CUDA_VISIBLE_DEVICES=3" in r.stdout


def test_plan_unknown_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSUP_GATEWAY_KEY", "k-1")
    r = CliRunner().invoke(main, ["plan", "-f", str(ROOT / "models.yaml"), "nope"])
    assert r.exit_code == 1
    assert "no model named nope" in r.output


def test_schema_is_json_schema() -> None:
    r = CliRunner().invoke(main, ["schema"])
    assert r.exit_code == 0
    schema = json.loads(r.output)
    assert schema["$schema"].endswith("2020-12/schema")
    assert "models" in schema["required"]
    assert {"VllmModel", "OllamaModel", "CommandModel"} <= set(schema["$defs"])
    assert "tensor_parallel_size" in schema["$defs"]["VllmModel"]["properties"]


def test_help_does_not_import_heavy_modules() -> None:
    code = (
        "import sys; from llmsup.cli import main\n"
        "try: main(['--help'])\nexcept SystemExit: pass\n"
        "heavy = [m for m in ('pydantic', 'aiohttp', 'psutil', 'pynvml', 'requests') "
        "if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in r.stdout


@pytest.mark.parametrize(
    ("args", "code", "also_absent"),
    [
        (["status", "-f"], 3, "[]"),  # no daemon answers: looks for leftovers (psutil)
        (["stop", "m", "-f"], 3, "['psutil']"),
        (["down", "-f"], 3, "[]"),
        (["logs", "m", "--file"], 1, "['psutil']"),  # the state dir, daemon or not: none yet
    ],
)
def test_daemon_commands_do_not_import_the_schema(
    tmp_path: Path, args: list[str], code: int, also_absent: str
) -> None:
    """Commands that only talk to the daemon (or read its state dir) stay light."""
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"state_dir: {tmp_path / 'state'}\nmodels: {{}}\n")
    script = (
        "import sys; from llmsup.cli import main\n"
        f"try: main({[*args, str(manifest)]!r})\n"
        "except SystemExit as e: print('EXIT', e.code)\n"
        f"heavy = [m for m in ('pydantic', 'aiohttp', 'pynvml', *{also_absent})\n"
        "         if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert f"EXIT {code}" in r.stdout, r.stdout + r.stderr
    assert "HEAVY []" in r.stdout
