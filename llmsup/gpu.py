"""What the GPUs of this host hold, behind one small interface.

    GpuSource.snapshot() -> Snapshot(gpus, processes, notes)

`NvmlSource` asks the NVIDIA driver through pynvml (imported lazily:
importing this module costs nothing on a host without a driver). The helpers
below it are pure. The tests play a GPU host with a fake pynvml module
(tests/fakes/nvml), so they run this same code.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import psutil

from llmsup.errors import GpuUnavailable as GpuUnavailable

GiB = 1024**3
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
    # An nvidia-ml-py newer than the driver's NVML raises this (not an NVMLError) for an
    # unversioned call the library lacks; the older `_v2` call may still be there.
    mismatch = getattr(nvml, "NVMLLibraryMismatchError", ())
    for query in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        try:
            try:
                infos = getattr(nvml, query)(handle)
            except mismatch:
                older = getattr(nvml, f"{query}_v2", None)
                if older is None:
                    raise
                infos = older(handle)
        except mismatch:
            note = (
                f"GPU {gpu.index} ({gpu.uuid}): processes unknown: nvidia-ml-py does not "
                "match the driver's NVML library (install the nvidia-ml-py of the driver's version)"
            )
            continue
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
