"""What the GPUs of this host hold, behind one small interface.

    GpuSource.snapshot() -> Snapshot(gpus, processes, notes)

Two sources: `NvmlSource` asks the NVIDIA driver through pynvml (imported
lazily: importing this module costs nothing on a host without a driver), and
`SimulatedSource` reads a JSON file that plays a GPU host for the fake servers
in tests (`LLMSUP_GPU_SIM=path`). The helpers below the sources are pure.

The simulated host file (every writer holds an flock on `<file>.lock` and
replaces the file atomically):

    {"gpus": [{"index": 0, "uuid": "GPU-00000000-0000-0000-0000-000000000000",
               "name": "NVIDIA H100 80GB HBM3", "memory_total": 85899345920,
               "utilization": 0, "temperature": 30}],
     "allocations": [{"pid": 123, "start": 4567, "gpu": "GPU-...", "bytes": 1234,
                      "release_delay": 0.0, "dead_since": null}]}

An allocation holds its bytes while its process lives. Once the process is
gone (or a zombie, or its pid reused: `start` is the process start time from
/proc), the memory stays used for `release_delay` seconds after a reader first
saw it dead (`dead_since`, wall-clock seconds), then the allocation is
dropped: freed GPU memory lags a process exit on real hosts too. A GPU entry
may say `"lost": true` to play NVML_ERROR_GPU_IS_LOST, and `"baseline": N` for
bytes used by nothing in particular. tests/fakes/_fakegpu.py writes the same
format with the standard library only; keep the two in step.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psutil

from llmsup.errors import GpuUnavailable as GpuUnavailable

GiB = 1024**3
SIM_ENV = "LLMSUP_GPU_SIM"
# NVML_VALUE_NOT_AVAILABLE for an unsigned long long: what usedGpuMemory reads
# when the driver cannot say (other users' processes, containers, Windows WDDM).
_NOT_AVAILABLE_ULL = 2**64 - 1


@dataclass(frozen=True)
class Gpu:
    """One GPU: memory in bytes, utilization in percent, temperature in Celsius."""

    index: int
    uuid: str
    name: str
    memory_total: int
    memory_used: int
    memory_free: int
    utilization: int | None
    temperature: int | None


@dataclass(frozen=True)
class GpuProcess:
    """A process with a context on a GPU. `used_memory` is None when the driver cannot say."""

    pid: int
    gpu_uuid: str
    gpu_index: int
    used_memory: int | None


@dataclass(frozen=True)
class Snapshot:
    """The GPUs and their processes at one moment; `notes` name devices that were skipped."""

    gpus: tuple[Gpu, ...]
    processes: tuple[GpuProcess, ...]
    notes: tuple[str, ...] = ()

    def gpu(self, uuid: str) -> Gpu | None:
        return next((g for g in self.gpus if g.uuid == uuid), None)


class GpuSource(Protocol):
    def snapshot(self) -> Snapshot:
        """The GPUs now. Raises GpuUnavailable when there is no driver at all."""
        ...


# ---------------------------------------------------------------------------
# NVML


class NvmlSource:
    """The NVIDIA driver through pynvml (the nvidia-ml-py package).

    NVML is initialised on the first snapshot and kept initialised; an init that
    failed is tried again on the next snapshot, and a driver that went away
    (NVML_ERROR_UNINITIALIZED or DRIVER_NOT_LOADED later on) is initialised again
    once. Safe to share between threads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._initialised = False

    def snapshot(self) -> Snapshot:
        with self._lock:
            nvml = _import_pynvml()
            self._init(nvml)
            try:
                return _nvml_snapshot(nvml)
            except _DriverGone:
                # The driver was reloaded under us: one fresh init, then give up.
                self._initialised = False
                self._init(nvml)
                try:
                    return _nvml_snapshot(nvml)
                except _DriverGone as e:
                    self._initialised = False
                    raise GpuUnavailable(f"NVIDIA driver stopped answering ({e})") from None

    def close(self) -> None:
        with self._lock:
            if not self._initialised:
                return
            self._initialised = False
            nvml = _import_pynvml()
            with contextlib.suppress(nvml.NVMLError):
                nvml.nvmlShutdown()

    def _init(self, nvml: Any) -> None:
        if self._initialised:
            return
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as e:
            raise GpuUnavailable(_init_reason(nvml, e)) from None
        self._initialised = True


class _DriverGone(Exception):
    """The driver stopped answering in the middle of a read. Outside LlmsupError on
    purpose: it never leaves this module (the source re-initialises NVML once, then
    raises GpuUnavailable), and no `except LlmsupError` may swallow it on the way."""


def _import_pynvml() -> Any:
    try:
        import pynvml
    except ImportError:
        raise GpuUnavailable("the nvidia-ml-py package (pynvml) is not installed") from None
    return pynvml


def _error_name(nvml: Any, error: Any) -> str:
    """`NVML_ERROR_GPU_IS_LOST` for an NVMLError, from the module's own constants."""
    value = getattr(error, "value", None)
    for name in dir(nvml):
        if name.startswith("NVML_ERROR_") and getattr(nvml, name) == value:
            return str(name)
    return f"NVML error {value}"


def _is(nvml: Any, error: Any, *names: str) -> bool:
    value = getattr(error, "value", None)
    return any(getattr(nvml, name, None) == value for name in names)


def _init_reason(nvml: Any, error: Any) -> str:
    if _is(nvml, error, "NVML_ERROR_LIBRARY_NOT_FOUND"):
        return "no NVIDIA driver (libnvidia-ml.so.1 not found)"
    if _is(nvml, error, "NVML_ERROR_DRIVER_NOT_LOADED"):
        return "NVIDIA driver not loaded (the nvidia kernel module is not running)"
    if _is(nvml, error, "NVML_ERROR_NO_PERMISSION"):
        return "no permission to use the NVIDIA driver (check access to /dev/nvidia*)"
    if _is(nvml, error, "NVML_ERROR_LIB_RM_VERSION_MISMATCH"):
        return (
            "NVIDIA driver and library versions differ "
            "(the driver was upgraded: reboot or reload the nvidia module)"
        )
    return f"NVML could not start: {_error_name(nvml, error)} ({error})"


def _text(value: Any) -> str:
    """pynvml returns bytes or str for names and UUIDs, depending on its version."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


def _nvml_snapshot(nvml: Any) -> Snapshot:
    try:
        count = int(nvml.nvmlDeviceGetCount())
    except nvml.NVMLError as e:
        if _is(nvml, e, "NVML_ERROR_UNINITIALIZED", "NVML_ERROR_DRIVER_NOT_LOADED"):
            raise _DriverGone(_error_name(nvml, e)) from None
        raise GpuUnavailable(f"cannot count GPUs: {_error_name(nvml, e)} ({e})") from None
    gpus: list[Gpu] = []
    processes: list[GpuProcess] = []
    notes: list[str] = []
    for index in range(count):
        uuid = ""
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            gpu = _nvml_gpu(nvml, index, uuid, handle)
        except nvml.NVMLError as e:
            if _is(nvml, e, "NVML_ERROR_UNINITIALIZED", "NVML_ERROR_DRIVER_NOT_LOADED"):
                raise _DriverGone(_error_name(nvml, e)) from None
            who = f"GPU {index} ({uuid})" if uuid else f"GPU {index}"
            what = "is lost" if _is(nvml, e, "NVML_ERROR_GPU_IS_LOST") else "cannot be read"
            notes.append(f"{who} {what}: {_error_name(nvml, e)}")
            continue
        gpus.append(gpu)
        found, note = _nvml_processes(nvml, gpu, handle)
        processes += found
        if note:
            notes.append(note)
    return Snapshot(tuple(gpus), tuple(processes), tuple(notes))


def _optional(nvml: Any, read: Any) -> int | None:
    """A reading the device may not support; a lost device still raises."""
    try:
        return int(read())
    except AttributeError:  # a pynvml without the function
        return None
    except nvml.NVMLError as e:
        if _is(
            nvml,
            e,
            "NVML_ERROR_GPU_IS_LOST",
            "NVML_ERROR_UNKNOWN",
            "NVML_ERROR_UNINITIALIZED",
            "NVML_ERROR_DRIVER_NOT_LOADED",
        ):
            raise
        return None


def _temperature(nvml: Any, handle: Any) -> int:
    """nvmlDeviceGetTemperature, or its successor where the driver or pynvml lacks it."""
    sensor = getattr(nvml, "NVML_TEMPERATURE_GPU", 0)
    read = getattr(nvml, "nvmlDeviceGetTemperature", None)
    if read is not None:
        try:
            return int(read(handle, sensor))
        except nvml.NVMLError as e:
            if not _is(nvml, e, "NVML_ERROR_FUNCTION_NOT_FOUND"):
                raise
    return int(nvml.nvmlDeviceGetTemperatureV(handle, sensor))


def _nvml_gpu(nvml: Any, index: int, uuid: str, handle: Any) -> Gpu:
    name = _text(nvml.nvmlDeviceGetName(handle))
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    return Gpu(
        index=index,
        uuid=uuid,
        name=name,
        memory_total=int(memory.total),
        memory_used=int(memory.used),
        memory_free=int(memory.free),
        utilization=_optional(nvml, lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
        temperature=_optional(nvml, lambda: _temperature(nvml, handle)),
    )


def _nvml_processes(nvml: Any, gpu: Gpu, handle: Any) -> tuple[list[GpuProcess], str | None]:
    """Compute and graphics processes of one GPU, one entry per pid."""
    by_pid: dict[int, int | None] = {}
    note = None
    for query in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        try:
            infos = getattr(nvml, query)(handle)
        except nvml.NVMLError as e:
            if _is(nvml, e, "NVML_ERROR_UNINITIALIZED", "NVML_ERROR_DRIVER_NOT_LOADED"):
                raise _DriverGone(_error_name(nvml, e)) from None
            graphics = query.endswith("GraphicsRunningProcesses")
            if not (graphics and _is(nvml, e, "NVML_ERROR_NOT_SUPPORTED")):
                # Compute-only GPUs need not list graphics processes: no note for that.
                note = f"GPU {gpu.index} ({gpu.uuid}): processes unknown: {_error_name(nvml, e)}"
            continue
        for info in infos:
            used = getattr(info, "usedGpuMemory", None)
            amount = None if used is None or int(used) == _NOT_AVAILABLE_ULL else int(used)
            pid = int(info.pid)
            if by_pid.get(pid) is None:
                by_pid[pid] = amount
    found = [GpuProcess(pid, gpu.uuid, gpu.index, used) for pid, used in by_pid.items()]
    return found, note


# ---------------------------------------------------------------------------
# A simulated host


@contextlib.contextmanager
def _locked_sim(path: Path) -> Iterator[dict[str, Any]]:
    """The simulated host's data under an exclusive flock; written back if changed."""
    with open(f"{path}.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise GpuUnavailable(f"simulated GPU host {path} does not exist") from None
        except OSError as e:
            raise GpuUnavailable(f"simulated GPU host {path}: {e.strerror}") from None
        try:
            data = json.loads(text)
        except ValueError as e:
            raise GpuUnavailable(f"simulated GPU host {path} is not JSON: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("gpus"), list):
            raise GpuUnavailable(f"simulated GPU host {path} has no 'gpus' list")
        data.setdefault("allocations", [])
        before = json.dumps(data, sort_keys=True)
        yield data
        if json.dumps(data, sort_keys=True) != before:
            _write_json(path, data)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def process_start(pid: int) -> int | None:
    """The start time of `pid` in clock ticks since boot, or None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def _sim_alive(alloc: Mapping[str, Any]) -> bool:
    start = process_start(int(alloc["pid"]))
    return start is not None and alloc.get("start") in (None, start)


def _sim_sweep(data: dict[str, Any], now: float) -> list[tuple[dict[str, Any], bool]]:
    """Drop released allocations; the rest, each with whether its process lives."""
    kept: list[tuple[dict[str, Any], bool]] = []
    for alloc in data["allocations"]:
        alive = _sim_alive(alloc)
        if not alive:
            if alloc.get("dead_since") is None:
                alloc["dead_since"] = now
            if now - float(alloc["dead_since"]) >= float(alloc.get("release_delay") or 0.0):
                continue
        kept.append((alloc, alive))
    data["allocations"] = [alloc for alloc, _ in kept]
    return kept


def _sim_gpu_of(ref: Any, gpus: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The GPU entry an allocation names (UUID, or index as int or digits)."""
    text = str(ref)
    for g in gpus:
        if str(g["uuid"]) == text or (text.isdigit() and int(g["index"]) == int(text)):
            return g
    return None


class SimulatedSource:
    """A GPU host played from a JSON file (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def snapshot(self) -> Snapshot:
        with _locked_sim(self.path) as data:
            live = _sim_sweep(data, time.time())
            gpu_entries = list(data["gpus"])
        gpus: list[Gpu] = []
        processes: dict[tuple[int, str], GpuProcess] = {}
        notes: list[str] = []
        for entry in sorted(gpu_entries, key=lambda g: int(g["index"])):
            index, uuid = int(entry["index"]), str(entry["uuid"])
            if entry.get("lost"):
                notes.append(f"GPU {index} ({uuid}) is lost: NVML_ERROR_GPU_IS_LOST")
                continue
            used = int(entry.get("baseline") or 0)
            for alloc, alive in live:
                if _sim_gpu_of(alloc["gpu"], [entry]) is None:
                    continue
                used += int(alloc["bytes"])
                if not alive:
                    continue  # memory not yet released, but no process to show
                pid = int(alloc["pid"])
                earlier = processes.get((pid, uuid))
                amount = int(alloc["bytes"]) + ((earlier.used_memory or 0) if earlier else 0)
                processes[(pid, uuid)] = GpuProcess(pid, uuid, index, amount)
            total = int(entry["memory_total"])
            used = min(used, total)
            gpus.append(
                Gpu(
                    index=index,
                    uuid=uuid,
                    name=str(entry.get("name") or "NVIDIA GPU"),
                    memory_total=total,
                    memory_used=used,
                    memory_free=total - used,
                    utilization=_int_or_none(entry.get("utilization")),
                    temperature=_int_or_none(entry.get("temperature")),
                )
            )
        return Snapshot(tuple(gpus), tuple(processes.values()), tuple(notes))


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def sim_uuid(index: int) -> str:
    return f"GPU-{index:08d}-0000-0000-0000-000000000000"


def make_sim(
    path: str | os.PathLike[str],
    n: int = 4,
    total: int = 80 * GiB,
    name: str = "NVIDIA H100 80GB HBM3",
) -> Path:
    """Write a simulated host of `n` idle GPUs with UUIDs GPU-0000000N-0000-..."""
    target = Path(path)
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
    with open(f"{target}.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _write_json(target, {"gpus": gpus, "allocations": []})
    return target


def source_from_env(env: Mapping[str, str] = os.environ) -> GpuSource:
    """`LLMSUP_GPU_SIM=path`: a SimulatedSource; otherwise the driver."""
    sim = env.get(SIM_ENV, "").strip()
    return SimulatedSource(sim) if sim else NvmlSource()


# ---------------------------------------------------------------------------
# Pure helpers


def fmt_bytes(n: float) -> str:
    """`12.3 GiB`, `512.0 MiB`, `100 B`."""
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    if value < 1024:
        return f"{sign}{int(value)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{sign}{value:.1f} {unit}"


def _index_list(indices: Sequence[int]) -> str:
    if not indices:
        return "this host has no GPU"
    ordered = sorted(indices)
    if ordered == list(range(ordered[0], ordered[-1] + 1)) and len(ordered) > 2:
        listed = f"{ordered[0]}-{ordered[-1]}"
    else:
        listed = ", ".join(str(i) for i in ordered)
    return f"this host has {len(ordered)}: {listed}"


def resolve(
    gpus_from_manifest: Sequence[int | str], snapshot: Snapshot
) -> tuple[list[Gpu], list[str]]:
    """The GPUs a manifest names (indices or UUIDs, in its order), and errors for the rest.

    A UUID may be given in full or as a unique prefix, as CUDA_VISIBLE_DEVICES
    allows. MIG devices are not supported: they are reported as errors.
    """
    found: list[Gpu] = []
    errors: list[str] = []
    named_as: dict[str, str] = {}
    by_index = {g.index: g for g in snapshot.gpus}
    for ref in gpus_from_manifest:
        text = str(ref).strip()
        gpu: Gpu | None = None
        if isinstance(ref, int) or text.isdigit():
            gpu = by_index.get(int(text))
            if gpu is None:
                why = _index_list(list(by_index))
                lost = [n for n in snapshot.notes if n.startswith(f"GPU {int(text)} ")]
                errors.append(
                    f"GPU {int(text)} does not exist ({why})" + "".join(f"; {n}" for n in lost)
                )
                continue
        elif text.upper().startswith("MIG-"):
            errors.append(
                f"{text} is a MIG device; MIG is not supported: list the parent GPU's index or UUID"
            )
            continue
        else:
            matches = [g for g in snapshot.gpus if g.uuid.lower().startswith(text.lower())]
            exact = [g for g in matches if g.uuid.lower() == text.lower()]
            if exact or len(matches) == 1:
                gpu = (exact or matches)[0]
            else:
                known = ", ".join(g.uuid for g in snapshot.gpus) or "none"
                if matches:
                    errors.append(
                        f"{text} matches several GPUs: {', '.join(g.uuid for g in matches)}"
                    )
                else:
                    errors.append(f"no GPU with UUID {text} (known: {known})")
                continue
        if gpu.uuid in named_as:
            errors.append(
                f"GPU {gpu.index} ({gpu.uuid}) is listed twice: as {named_as[gpu.uuid]} and {text}"
            )
            continue
        named_as[gpu.uuid] = text
        found.append(gpu)
    return found, errors


def holders(snapshot: Snapshot, gpu_uuid: str) -> list[GpuProcess]:
    """The processes on one GPU, the largest first (unknown amounts last)."""
    procs = [p for p in snapshot.processes if p.gpu_uuid == gpu_uuid]
    return sorted(procs, key=lambda p: (p.used_memory is None, -(p.used_memory or 0), p.pid))


def describe_holder(proc: GpuProcess, pid_info: tuple[str, str] | None) -> str:
    """`pid 4242 (alice: vllm serve org/model ...) holds 40.0 GiB`."""
    if pid_info is None:
        who = "a process this user cannot see"
    else:
        user, cmdline = pid_info
        if len(cmdline) > 80:
            cmdline = cmdline[:77] + "..."
        who = f"{user}: {cmdline}" if cmdline else user
    amount = "an unknown amount" if proc.used_memory is None else fmt_bytes(proc.used_memory)
    return f"pid {proc.pid} ({who}) holds {amount} on GPU {proc.gpu_index}"


def process_info(pid: int) -> tuple[str, str] | None:
    """(user, command line) of a local process, or None if it is gone or hidden."""
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            user = p.username()
            cmdline = " ".join(p.cmdline()) or p.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    return user, cmdline


def memory_by_pids(snapshot: Snapshot, pids: set[int]) -> dict[int, int]:
    """Bytes that `pids` (say, one model's process tree) hold, per GPU index.

    A GPU appears when one of the pids is on it, with 0 if NVML cannot say how much.
    """
    out: dict[int, int] = {}
    for p in snapshot.processes:
        if p.pid in pids:
            out[p.gpu_index] = out.get(p.gpu_index, 0) + (p.used_memory or 0)
    return out
