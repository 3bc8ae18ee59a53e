"""Run a real llmsup daemon against the fake servers, and look at its processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

from llmsup.client import call
from llmsup.process import MARKER, state_key
from tests.util import FAKES_DIR, wait_for

LLMSUP = [sys.executable, "-m", "llmsup.cli"]

# Quick timings so that faults are seen and repaired in about a second.
FAST_DEFAULTS = """\
defaults:
  health: {interval: 300ms, timeout: 500ms, failures: 2, startup_timeout: 20s}
  restart: {backoff_initial: 100ms, backoff_max: 1s, max_restarts: 3, window: 1m}
  stop_timeout: 2s
"""


class Daemon:
    """`llmsup up --foreground` in a subprocess, with its manifest and state dir."""

    def __init__(self, tmp: Path, models: str, extra_env: dict[str, str] | None = None) -> None:
        self.dir = tmp
        self.state = tmp / "state"
        self.manifest = tmp / "models.yaml"
        self.write(models)
        self.env = {
            **os.environ,
            "PATH": f"{FAKES_DIR}{os.pathsep}{os.environ.get('PATH', '')}",
            "OLLAMA_MODELS": str(tmp / "ollama-models"),
            "FAKE_LOAD_TIME": "0.3",  # unless a model's env says otherwise
            **(extra_env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.output = tmp / "daemon.out"
        self.preexec: Callable[[], None] | None = None  # run in the daemon before exec

    def write(self, models: str) -> None:
        body = textwrap.indent(textwrap.dedent(models), "  ")
        self.manifest.write_text(f"state_dir: {self.state}\n{FAST_DEFAULTS}models:\n{body}")

    @property
    def sock(self) -> Path:
        return self.state / "control.sock"

    def start(self) -> None:
        with open(self.output, "ab") as out:
            self.proc = subprocess.Popen(
                [*LLMSUP, "up", "--foreground", "-f", str(self.manifest)],
                env=self.env,
                stdout=out,
                stderr=out,
                start_new_session=True,
                preexec_fn=self.preexec,
            )
        proc = self.proc
        wait_for(lambda: self.answers() or proc.poll() is not None, 30)
        if not self.answers():
            raise AssertionError(f"daemon exited with {proc.poll()}: {self.log()}")

    def answers(self) -> bool:
        try:
            call(self.sock, "GET", "/v1/status", timeout=2)
        except Exception:
            return False
        return True

    def log(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*LLMSUP, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def status(self) -> dict[str, dict[str, Any]]:
        _, data = call(self.sock, "GET", "/v1/status", timeout=10)
        return {row["name"]: row for row in data["models"]}

    def state_of(self, name: str) -> str:
        return str(self.status()[name]["state"])

    def wait_state(self, name: str, state: str, timeout: float = 20) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            row = self.status()[name]
            return row if row["state"] == state else None

        return wait_for(reached, timeout, message=f"{name} never {state}: {self.status()[name]}")

    def wait_all_ready(self, timeout: float = 30) -> dict[str, dict[str, Any]]:
        def ready() -> dict[str, dict[str, Any]] | None:
            rows = self.status()
            return rows if all(r["state"] == "READY" for r in rows.values()) else None

        return wait_for(ready, timeout, message=f"not all READY: {self.log()[-3000:]}")

    def processes(self, unit: str | None = None) -> list[psutil.Process]:
        """Live processes carrying this daemon's marker (of one unit, or all)."""
        prefix = f"{state_key(self.state)}:" + (f"{unit}:" if unit else "")
        return marked(prefix)

    def kill_daemon(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        """Tear down: `down` if it answers, then make sure nothing of ours is left."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.cli("down", "-f", str(self.manifest), timeout=60)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
        for p in self.processes():
            with contextlib.suppress(psutil.Error):
                p.kill()


def marked(prefix: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            if p.environ().get(MARKER, "").startswith(prefix):
                out.append(p)
        except psutil.Error:
            continue
    return out


@contextlib.contextmanager
def running(tmp: Path, models: str, **kw: Any) -> Iterator[Daemon]:
    d = Daemon(tmp, models, **kw)
    try:
        d.start()
        yield d
    finally:
        d.stop()


def names(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            out.append(p.name())
    return sorted(out)


def gone(pids: list[int]) -> bool:
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            continue
    return True


def time_now() -> float:
    return time.monotonic()
