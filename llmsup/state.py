"""A server's states as status shows them, and what its log lines and exit
codes say. The life that moves between the states: `llmsup.supervise.machine`."""

from __future__ import annotations

import enum


class State(str, enum.Enum):
    STOPPED = "STOPPED"
    WAITING = "WAITING"  # for a server it starts after (shared GPU)
    WAITING_GPU = "WAITING_GPU"  # for free memory on its GPUs
    STARTING = "STARTING"  # process spawned, port not answering yet
    LOADING = "LOADING"  # answering, pulling or loading the model
    READY = "READY"
    UNHEALTHY = "UNHEALTHY"  # probes failing, not yet enough to restart
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    FAILED = "FAILED"

    @property
    def running(self) -> bool:
        return self in (State.STARTING, State.LOADING, State.READY, State.UNHEALTHY)


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        import signal

        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exited with code {returncode}"


# vLLM's load-phase log lines (CPU and GPU builds), and how far along each one is.
# On CPU only "Starting to load model", "Loading weights took", "init engine" and
# the last two appear; the others are the GPU path's.
VLLM_PHASES: tuple[tuple[str, str, int], ...] = (
    ("Starting to load model", "loading weights", 10),
    ("Loading weights took", "weights loaded", 40),
    ("Model loading took", "model loaded", 50),
    ("torch.compile took", "compiled", 65),
    ("Graph capturing finished", "graphs captured", 80),
    ("init engine (profile, create kv cache, warmup model) took", "engine ready", 90),
    ("Starting vLLM server on", "starting API server", 95),
    ("Application startup complete.", "API server started", 99),
)
# uvicorn's last line before the port accepts (about 10 ms later in vLLM 0.32);
# "Starting vLLM server on" comes half a second earlier.
LISTENING_SOON = "Application startup complete."


def vllm_phase(line: str) -> tuple[str, int] | None:
    for marker, phase, percent in VLLM_PHASES:
        if marker in line:
            return phase, percent
    return None


def listening_soon(line: str) -> bool:
    """The server printed its last line before it accepts connections: probe now."""
    return LISTENING_SOON in line


def exit_hint(backend: str, line: str) -> str | None:
    """What a server's log line says about its coming exit, if anything.

    vLLM exits with code 0 when its EngineCore dies: the code alone hides it."""
    if backend == "vllm" and (
        ("Engine core proc" in line and "died unexpectedly" in line) or "EngineDeadError" in line
    ):
        return "EngineCore died"
    return None
