"""What exit codes and a server's log lines (read by its backend) say."""

from __future__ import annotations

from llmsup.backends import REGISTRY
from llmsup.backends.vllm import vllm_phase
from llmsup.state import describe_exit

VLLM, COMMAND = REGISTRY["vllm"], REGISTRY["command"]


def test_exit_descriptions() -> None:
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(-9) == "killed by SIGKILL"


def test_vllm_phases_from_log_lines() -> None:
    line = "INFO 11-25 10:00:01 [gpu_model_runner.py:1] Model loading took 1.2 GiB and 3.1 seconds"
    assert vllm_phase(line) == ("model loaded", 50)
    assert vllm_phase("INFO nothing here") is None
    # The lines real vLLM 0.32 prints on CPU, in their order, with rising progress.
    cpu = [
        "(EngineCore_DP0 pid=1) INFO 12-01 10:00:00 [cpu_worker.py:1] Starting to load model m...",
        "(EngineCore_DP0 pid=1) INFO 12-01 10:00:22 [default_loader.py:1] Loading weights "
        "took 0.01 seconds",
        "(EngineCore_DP0 pid=1) INFO 12-01 10:00:23 [core.py:1] init engine (profile, create kv "
        "cache, warmup model) took 1.60 seconds",
        "(APIServer pid=1) INFO 12-01 10:00:24 [api_server.py:1] Starting vLLM server on "
        "http://0.0.0.0:8000",
        "(APIServer pid=1) INFO:     Application startup complete.",
    ]
    phases = [vllm_phase(line) for line in cpu]
    assert None not in phases
    percents = [p[1] for p in phases if p is not None]
    assert percents == sorted(percents) and len(set(percents)) == len(percents)


def test_only_uvicorns_last_line_wakes_the_readiness_probe() -> None:
    assert VLLM.listening_soon("(APIServer pid=1) INFO:     Application startup complete.")
    assert not VLLM.listening_soon(
        "INFO [api_server.py:1] Starting vLLM server on http://0.0.0.0:8000"
    )


def test_exit_hint_names_a_dead_engine_core() -> None:
    line = (
        "(APIServer pid=1) ERROR [core_client.py:1] Engine core proc EngineCore_DP0 died "
        "unexpectedly, shutting down client."
    )
    assert VLLM.exit_hint(line) == "EngineCore died"
    assert VLLM.exit_hint("vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered")
    assert VLLM.exit_hint("INFO Loading weights took 1 s") is None
    assert COMMAND.exit_hint(line) is None
