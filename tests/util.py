"""Helpers shared by the tests: polling, free ports, the fake backends on PATH."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")

FAKES_DIR = Path(__file__).resolve().parent / "fakes"


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str = "",
) -> T:
    """Poll `predicate` until it returns something truthy, and return that.

    Raises AssertionError (with `message`) if it is still falsy after `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(message or f"condition not met within {timeout} s")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fake_env(**extra: object) -> dict[str, str]:
    """A copy of os.environ with the fake `vllm` and `ollama` first on PATH, plus `extra`."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(FAKES_DIR), env.get("PATH", "")])
    env.update({key: str(value) for key, value in extra.items()})
    return env


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[None]:
    """A tmpfs of `size` mounted on `where` (made here) for the block: a disk that fills
    up. Skips, saying why, without root or when the mount fails."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "llmsup-test", str(where)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)
