"""The simulated GPU host: a JSON file that the fake servers take memory on and
that the fake `pynvml` (nvml/pynvml.py beside this file) reads as NVML.

Standard library only. `LLMSUP_FAKE_NVML=path` names the file for both: the
fake servers allocate on it, and llmsup, run with `nvml/` first on PYTHONPATH
(`nvml_env`), imports the fake pynvml and sees the same GPUs through the same
NvmlSource code that reads a real driver. The format (`make_sim` writes one):

    {"gpus": [{"index": 0, "uuid": "GPU-00000000-0000-0000-0000-000000000000",
               "name": "NVIDIA H100 80GB HBM3", "memory_total": 85899345920,
               "utilization": 0, "temperature": 30}],
     "allocations": [{"pid": 123, "start": 4567, "gpu": "GPU-...", "bytes": 1234,
                      "release_delay": 0.0, "dead_since": null}]}

An allocation holds its bytes while its process lives. Once the process is
gone (or a zombie, or its pid reused: `start` is the process start time from
/proc), the memory stays used for `release_delay` seconds after a reader first
saw it dead (`dead_since`, wall-clock seconds), then the allocation is
dropped: freed GPU memory lags a process exit on real hosts too. Optional:

- a GPU's `"baseline": N`: bytes used by nothing in particular;
- a GPU's `"lost": true`: its calls but the handle and UUID raise
  NVML_ERROR_GPU_IS_LOST;
- `"faults": {"nvmlFunction": "NVML_ERROR_..."}`, at the top (nvmlInit,
  nvmlDeviceGetCount) or in a GPU (its device calls): that call raises that
  error. A list instead of one name raises each in turn, one per call, and
  then the call answers again (the list is consumed in the file);
- an allocation's `"kind": "graphics"` (a graphics process; default compute),
  and `"reported": null` (NVML cannot say how much the process uses).

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
from collections.abc import Iterator, Mapping
from typing import Any

GiB = 1024**3
HOST_ENV = "LLMSUP_FAKE_NVML"
NVML_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nvml")


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
            _write(path, data)


def _write(path: str, data: Mapping[str, Any]) -> None:
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def sim_uuid(index: int) -> str:
    """The UUID `make_sim` gives GPU `index`."""
    return f"GPU-{index:08d}-0000-0000-0000-000000000000"


def make_sim(
    path: str | os.PathLike[str],
    n: int = 4,
    total: int = 80 * GiB,
    name: str = "NVIDIA H100 80GB HBM3",
) -> str:
    """Write a host of `n` idle GPUs with UUIDs GPU-0000000N-0000-...; its path."""
    gpus = [
        {
            "index": i,
            "uuid": sim_uuid(i),
            "name": name,
            "memory_total": total,
            "utilization": 0,
            "temperature": 30,
        }
        for i in range(n)
    ]
    target = os.fspath(path)
    with open(f"{target}.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _write(target, {"gpus": gpus, "allocations": []})
    return target


def nvml_env(path: str | os.PathLike[str], base: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The variables that make a Python process (llmsup) see the host at `path`
    through the fake pynvml: add them to its environment."""
    search = [NVML_DIR, *(p for p in base.get("PYTHONPATH", "").split(os.pathsep) if p)]
    return {HOST_ENV: os.fspath(path), "PYTHONPATH": os.pathsep.join(search)}


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


def alive(alloc: Mapping[str, Any]) -> bool:
    """Whether the process of an allocation lives (and is the one that allocated)."""
    start = process_start(int(alloc["pid"]))
    return start is not None and alloc.get("start") in (None, start)


def _sweep(data: dict[str, Any], now: float) -> None:
    kept = []
    for alloc in data["allocations"]:
        if not alive(alloc):
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


def on_gpu(alloc: Mapping[str, Any], gpu: Mapping[str, Any]) -> bool:
    """Whether an allocation is on `gpu` (it names the GPU's UUID, or its index)."""
    ref = str(alloc["gpu"])
    return ref == str(gpu["uuid"]) or (ref.isdigit() and int(ref) == int(gpu["index"]))


def used(data: Mapping[str, Any], gpu: Mapping[str, Any]) -> int:
    """Bytes used on `gpu`: its baseline and every allocation not yet released."""
    total = int(gpu.get("baseline") or 0)
    total += sum(int(a["bytes"]) for a in data["allocations"] if on_gpu(a, gpu))
    return min(total, int(gpu["memory_total"]))


def take_fault(scope: dict[str, Any], call: str) -> str | None:
    """The NVML error (`NVML_ERROR_...`) that `call` raises now under `scope`'s
    "faults" (the host's or a GPU's); a list of them is consumed one per call."""
    faults = scope.get("faults") or {}
    planned = faults.get(call)
    if isinstance(planned, list):
        if not planned:
            return None
        return str(planned.pop(0))
    return None if planned is None else str(planned)


def memory_on(path: str, gpu_ref: int | str) -> tuple[int, int]:
    """(free, total) bytes of one GPU."""
    with locked(path) as data:
        gpu = find_gpu(data, gpu_ref)
        total = int(gpu["memory_total"])
        return total - used(data, gpu), total


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
        free = total - used(data, gpu)
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
        free = total - used(data, gpu)
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
    """The host file that LLMSUP_FAKE_NVML names, if any."""
    return os.environ.get(HOST_ENV, "").strip() or None
