"""The simulated GPU host the fakes allocate memory on (`LLMSUP_GPU_SIM=path`).

Standard library only. The file format, and the rules for when memory of a
dead process is released, are described in llmsup/gpu.py (SimulatedSource),
which reads the same file; keep the two in step. In short:

    {"gpus": [{"index": 0, "uuid": "GPU-...", "memory_total": N, ...}],
     "allocations": [{"pid": P, "start": T, "gpu": "GPU-...", "bytes": B,
                      "release_delay": S, "dead_since": null}]}

Every access holds an exclusive flock on `<path>.lock` and replaces the file
atomically, as several fake processes write it at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

GiB = 1024**3


class SimError(Exception):
    """The simulated host is missing or unreadable, or has no such GPU."""


@contextlib.contextmanager
def locked(path: str) -> Iterator[dict[str, Any]]:
    """The host's data, swept of released allocations; written back if changed."""
    with open(f"{path}.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise SimError(f"simulated GPU host {path}: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("gpus"), list):
            raise SimError(f"simulated GPU host {path} has no 'gpus' list")
        data.setdefault("allocations", [])
        before = json.dumps(data, sort_keys=True)
        _sweep(data, time.time())
        yield data
        if json.dumps(data, sort_keys=True) != before:
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1)
            os.replace(tmp, path)


def process_start(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot; None if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def _alive(alloc: dict[str, Any]) -> bool:
    start = process_start(int(alloc["pid"]))
    return start is not None and alloc.get("start") in (None, start)


def _sweep(data: dict[str, Any], now: float) -> None:
    kept = []
    for alloc in data["allocations"]:
        if not _alive(alloc):
            if alloc.get("dead_since") is None:
                alloc["dead_since"] = now
            if now - float(alloc["dead_since"]) >= float(alloc.get("release_delay") or 0.0):
                continue
        kept.append(alloc)
    data["allocations"] = kept


def find_gpu(data: dict[str, Any], gpu_ref: int | str) -> dict[str, Any]:
    """The GPU entry for an index (as in CUDA_VISIBLE_DEVICES) or a UUID (or its prefix)."""
    text = str(gpu_ref).strip()
    for g in data["gpus"]:
        if text.isdigit() and int(g["index"]) == int(text):
            return dict(g)
    matches = [g for g in data["gpus"] if str(g["uuid"]).startswith(text)] if text else []
    exact = [g for g in matches if str(g["uuid"]) == text]
    if exact or len(matches) == 1:
        return dict((exact or matches)[0])
    raise SimError(f"no GPU {text!r} on the simulated host")


def _used(data: dict[str, Any], gpu: dict[str, Any]) -> int:
    used = int(gpu.get("baseline") or 0)
    for alloc in data["allocations"]:
        ref = str(alloc["gpu"])
        if ref == str(gpu["uuid"]) or (ref.isdigit() and int(ref) == int(gpu["index"])):
            used += int(alloc["bytes"])
    return min(used, int(gpu["memory_total"]))


def memory_on(path: str, gpu_ref: int | str) -> tuple[int, int]:
    """(free, total) bytes of one GPU."""
    with locked(path) as data:
        gpu = find_gpu(data, gpu_ref)
        total = int(gpu["memory_total"])
        return total - _used(data, gpu), total


def free_on(path: str, gpu_ref: int | str) -> int:
    return memory_on(path, gpu_ref)[0]


def _record(data: dict[str, Any], pid: int, gpu: dict[str, Any], nbytes: int, delay: float) -> None:
    data["allocations"].append(
        {
            "pid": pid,
            "start": process_start(pid),
            "gpu": str(gpu["uuid"]),
            "bytes": nbytes,
            "release_delay": float(delay),
            "dead_since": None,
        }
    )


def allocate(
    path: str, pid: int, gpu_ref: int | str, nbytes: int, release_delay: float = 0.0
) -> tuple[int, int, int]:
    """Record up to `nbytes` held by `pid` on a GPU: at most what is free (Ollama
    puts the rest on the CPU). Returns (bytes allocated, free before, total)."""
    with locked(path) as data:
        gpu = find_gpu(data, gpu_ref)
        total = int(gpu["memory_total"])
        free = total - _used(data, gpu)
        amount = max(0, min(int(nbytes), free))
        if amount:
            _record(data, pid, gpu, amount, release_delay)
        return amount, free, total


def reserve(
    path: str, pid: int, gpu_ref: int | str, fraction: float, release_delay: float = 0.0
) -> tuple[bool, int, int]:
    """vLLM's start: take `fraction` of the GPU's total if that much is free, in one
    locked step, else nothing. Returns (taken, free before, total)."""
    with locked(path) as data:
        gpu = find_gpu(data, gpu_ref)
        total = int(gpu["memory_total"])
        free = total - _used(data, gpu)
        wanted = int(total * fraction)
        if free < wanted:
            return False, free, total
        _record(data, pid, gpu, wanted, release_delay)
        return True, free, total


def held_by(path: str, pids: set[int]) -> int:
    """Bytes that `pids` hold, on all GPUs."""
    with locked(path) as data:
        return sum(int(a["bytes"]) for a in data["allocations"] if int(a["pid"]) in pids)


def visible_devices() -> list[str]:
    """CUDA_VISIBLE_DEVICES as a list; unset means every GPU (callers use the rank)."""
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return []
    return [part.strip() for part in raw.split(",") if part.strip()]


def device_of_rank(rank: int) -> str | None:
    """The GPU that rank `rank` uses: the rank-th visible device, or None if there is none."""
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return str(rank)
    devices = visible_devices()
    return devices[rank] if rank < len(devices) else None


def release_delay() -> float:
    raw = os.environ.get("FAKE_GPU_RELEASE_DELAY", "").strip()
    try:
        return max(0.0, float(raw)) if raw else 0.0
    except ValueError:
        return 0.0


def sim_path() -> str | None:
    return os.environ.get("LLMSUP_GPU_SIM", "").strip() or None
