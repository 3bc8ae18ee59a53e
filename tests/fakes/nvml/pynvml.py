"""A fake `pynvml` (the nvidia-ml-py package) that plays the simulated GPU host
of ../_fakegpu.py: the JSON file that LLMSUP_FAKE_NVML names.

Tests put this directory first on PYTHONPATH (`_fakegpu.nvml_env`), so that
llmsup imports this module instead of the real one and reads GPUs, memory and
processes through the same NvmlSource code as on a real host. It has the real
module's names, signatures, return types, error classes and codes for the calls
llmsup makes, and nothing more: a name llmsup does not use is missing, as in an
older pynvml. Standard library only.

Each call reads the file afresh under its lock, so what the fake servers take
or leave shows at once, and the file's "faults" and "lost" GPUs script driver
errors (see _fakegpu.py). Without LLMSUP_FAKE_NVML, nvmlInit fails as on a host
without a driver (NVML_ERROR_LIBRARY_NOT_FOUND). A file that is named but
missing or broken raises _fakegpu.SimError: a mistake of the test, not a driver
state to play.
"""

from __future__ import annotations

import ctypes
import functools
import os
import string
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar, cast

_FAKES = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _FAKES not in sys.path:
    sys.path.append(_FAKES)

import _fakegpu  # noqa: E402  (found through the line above)

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_ALREADY_INITIALIZED = 5
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_INSUFFICIENT_SIZE = 7
NVML_ERROR_INSUFFICIENT_POWER = 8
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_IRQ_ISSUE = 11
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_CORRUPTED_INFOROM = 14
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_RESET_REQUIRED = 16
NVML_ERROR_OPERATING_SYSTEM = 17
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_ERROR_IN_USE = 19
NVML_ERROR_MEMORY = 20
NVML_ERROR_NO_DATA = 21
NVML_ERROR_VGPU_ECC_NOT_SUPPORTED = 22
NVML_ERROR_INSUFFICIENT_RESOURCES = 23
NVML_ERROR_FREQ_NOT_SUPPORTED = 24
NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25
NVML_ERROR_DEPRECATED = 26
NVML_ERROR_NOT_READY = 27
NVML_ERROR_GPU_NOT_FOUND = 28
NVML_ERROR_INVALID_STATE = 29
NVML_ERROR_RESET_TYPE_NOT_SUPPORTED = 30
NVML_ERROR_UNKNOWN = 999

NVML_TEMPERATURE_GPU = 0
NVML_VALUE_NOT_AVAILABLE_ulonglong = ctypes.c_ulonglong(-1)
NVML_VALUE_NOT_AVAILABLE_uint = ctypes.c_uint(-1)
nvmlTemperature_v1 = 0x100000C


class NVMLLibraryMismatchError(Exception):
    """Raised, as by the real module, when an unversioned call is not in the library."""


class NVMLError(Exception):
    """An NVML return code; NVMLError(code) is an instance of that code's subclass."""

    value: int
    _valClassMapping: dict[int, type[NVMLError]] = {}  # noqa: RUF012 (as the real module)
    _errcode_to_string = {  # noqa: RUF012
        NVML_ERROR_UNINITIALIZED: "Uninitialized",
        NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
        NVML_ERROR_NOT_SUPPORTED: "Not Supported",
        NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
        NVML_ERROR_ALREADY_INITIALIZED: "Already Initialized",
        NVML_ERROR_NOT_FOUND: "Not Found",
        NVML_ERROR_INSUFFICIENT_SIZE: "Insufficient Size",
        NVML_ERROR_INSUFFICIENT_POWER: "Insufficient External Power",
        NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
        NVML_ERROR_TIMEOUT: "Timeout",
        NVML_ERROR_IRQ_ISSUE: "Interrupt Request Issue",
        NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
        NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
        NVML_ERROR_CORRUPTED_INFOROM: "Corrupted infoROM",
        NVML_ERROR_GPU_IS_LOST: "GPU is lost",
        NVML_ERROR_RESET_REQUIRED: "GPU requires restart",
        NVML_ERROR_OPERATING_SYSTEM: "The operating system has blocked the request.",
        NVML_ERROR_LIB_RM_VERSION_MISMATCH: "RM has detected an NVML/RM version mismatch.",
        NVML_ERROR_MEMORY: "Insufficient Memory",
        NVML_ERROR_UNKNOWN: "Unknown Error",
    }

    def __new__(cls, value: int) -> NVMLError:
        if cls is NVMLError:
            cls = NVMLError._valClassMapping.get(value, cls)
        obj = Exception.__new__(cls)
        obj.value = value
        return obj

    def __str__(self) -> str:
        return self._errcode_to_string.get(self.value, f"NVML Error with code {self.value}")


def _error_classes() -> None:
    """NVMLError_GpuIsLost and its kin, one subclass per NVML_ERROR_ code, as the
    real module makes them."""
    module = globals()
    for name in [n for n in module if n.startswith("NVML_ERROR_")]:
        words = string.capwords(name.replace("NVML_ERROR_", ""), "_").replace("_", "")
        value = module[name]

        def new(cls: type[NVMLError], *_args: Any, value: int = value) -> NVMLError:
            return NVMLError.__new__(cls, value)

        cls = cast("type[NVMLError]", type(f"NVMLError_{words}", (NVMLError,), {"__new__": new}))
        module[cls.__name__] = cls
        NVMLError._valClassMapping[value] = cls


_error_classes()


class struct_c_nvmlDevice_t(ctypes.Structure):
    """A device; a handle is a pointer to one. Opaque in the real module, it
    holds the device's index here."""

    _fields_ = (("index", ctypes.c_uint),)


c_nvmlDevice_t = ctypes.POINTER(struct_c_nvmlDevice_t)


class c_nvmlMemory_t(ctypes.Structure):
    _fields_ = (
        ("total", ctypes.c_ulonglong),
        ("free", ctypes.c_ulonglong),
        ("used", ctypes.c_ulonglong),
    )


class c_nvmlUtilization_t(ctypes.Structure):
    _fields_ = (("gpu", ctypes.c_uint), ("memory", ctypes.c_uint))


class nvmlFriendlyObject:
    """What the real module returns for a process: a struct's fields as attributes."""

    def __init__(self, dictionary: dict[str, Any]) -> None:
        for key, value in dictionary.items():
            setattr(self, key, value)


# ---------------------------------------------------------------------------
# The host behind the calls

_lock = threading.Lock()
_initialised = 0  # nvmlInit calls not yet matched by nvmlShutdown
# A lost GPU still has a handle and a UUID: the note that names it can say which.
_LOST_GPU_ANSWERS = ("nvmlDeviceGetHandleByIndex", "nvmlDeviceGetUUID")


def _code(name: str) -> int:
    value = globals().get(name)
    if not name.startswith("NVML_ERROR_") or not isinstance(value, int):
        raise _fakegpu.SimError(f"faults: {name!r} is not an NVML_ERROR_ code")
    return value


def _read(call: str, index: int | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The host's data, and GPU `index`'s entry, for one call; or the error it meets."""
    path = _fakegpu.sim_path()
    if not _initialised or path is None:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    gpu = None
    with _fakegpu.locked(path) as data:
        error = _fakegpu.take_fault(data, call)
        if error is None and index is not None:
            gpus = sorted(data["gpus"], key=lambda g: int(g["index"]))
            if not 0 <= index < len(gpus):
                error = "NVML_ERROR_INVALID_ARGUMENT"
            else:
                gpu = gpus[index]
                if gpu.get("lost") and call not in _LOST_GPU_ANSWERS:
                    error = "NVML_ERROR_GPU_IS_LOST"
                else:
                    error = _fakegpu.take_fault(gpu, call)
    # Raised once the lock is left, so that a consumed fault is written back.
    if error is not None:
        raise NVMLError(_code(error))
    return data, gpu


def _device(call: str, handle: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    if not isinstance(handle, c_nvmlDevice_t):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    data, gpu = _read(call, handle.contents.index)
    assert gpu is not None
    return data, gpu


def _reading(gpu: dict[str, Any], key: str) -> int:
    """A reading of the GPU entry; a GPU without it does not support it."""
    value = gpu.get(key)
    if value is None:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    return int(value)


_F = TypeVar("_F", bound=Callable[..., Any])


def throwOnVersionMismatch(func: _F) -> _F:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except NVMLError as e:
            if e.value != NVML_ERROR_FUNCTION_NOT_FOUND:
                raise
            raise NVMLLibraryMismatchError(
                "Unversioned function called and the pyNVML version does not match the NVML "
                "lib version. Either use matching pyNVML and NVML lib versions or use a "
                f"versioned function such as {func.__name__}_v2"
            ) from None

    return wrapper  # type: ignore[return-value]


# ---------------------------------------------------------------------------
# The calls


def nvmlInit() -> None:
    global _initialised
    path = _fakegpu.sim_path()
    if path is None:
        raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)
    with _fakegpu.locked(path) as data:
        error = _fakegpu.take_fault(data, "nvmlInit")
    if error is not None:
        raise NVMLError(_code(error))
    with _lock:
        _initialised += 1


def nvmlShutdown() -> None:
    global _initialised
    with _lock:
        if not _initialised:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        _initialised -= 1


def nvmlDeviceGetCount() -> int:
    data, _ = _read("nvmlDeviceGetCount")
    return len(data["gpus"])


def nvmlDeviceGetHandleByIndex(index: int) -> Any:
    _read("nvmlDeviceGetHandleByIndex", int(index))
    return ctypes.pointer(struct_c_nvmlDevice_t(index=int(index)))


def nvmlDeviceGetUUID(handle: Any) -> str:
    return str(_device("nvmlDeviceGetUUID", handle)[1]["uuid"])


def nvmlDeviceGetName(handle: Any) -> str:
    return str(_device("nvmlDeviceGetName", handle)[1].get("name") or "NVIDIA GPU")


def nvmlDeviceGetMemoryInfo(handle: Any, version: int | None = None) -> c_nvmlMemory_t:
    if version:
        raise NotImplementedError("the fake pynvml answers the unversioned call only")
    data, gpu = _device("nvmlDeviceGetMemoryInfo", handle)
    total, used = int(gpu["memory_total"]), _fakegpu.used(data, gpu)
    return c_nvmlMemory_t(total=total, free=total - used, used=used)


def nvmlDeviceGetUtilizationRates(handle: Any) -> c_nvmlUtilization_t:
    gpu = _device("nvmlDeviceGetUtilizationRates", handle)[1]
    return c_nvmlUtilization_t(gpu=_reading(gpu, "utilization"), memory=0)


def nvmlDeviceGetTemperature(handle: Any, sensor: int) -> int:
    gpu = _device("nvmlDeviceGetTemperature", handle)[1]
    if sensor != NVML_TEMPERATURE_GPU:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return _reading(gpu, "temperature")


def nvmlDeviceGetTemperatureV(handle: Any, sensor: int, version: int = nvmlTemperature_v1) -> int:
    if version != nvmlTemperature_v1:
        raise NVMLError(NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
    gpu = _device("nvmlDeviceGetTemperatureV", handle)[1]
    if sensor != NVML_TEMPERATURE_GPU:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return _reading(gpu, "temperature")


def _processes(call: str, handle: Any, kind: str) -> list[nvmlFriendlyObject]:
    """The live processes of one kind on a GPU, one per pid, with the bytes they hold
    (None where the allocation says NVML cannot tell, as the real module gives)."""
    data, gpu = _device(call, handle)
    by_pid: dict[int, int | None] = {}
    for alloc in data["allocations"]:
        if alloc.get("kind", "compute") != kind or not _fakegpu.on_gpu(alloc, gpu):
            continue
        if not _fakegpu.alive(alloc):
            continue  # memory not yet released, but no process to show
        pid, amount = int(alloc["pid"]), int(alloc["bytes"])
        hidden = "reported" in alloc and alloc["reported"] is None
        earlier = by_pid.get(pid, 0)
        by_pid[pid] = None if hidden or earlier is None else earlier + amount
    unavailable = NVML_VALUE_NOT_AVAILABLE_uint.value
    return [
        nvmlFriendlyObject(
            {
                "pid": pid,
                "usedGpuMemory": used,
                "gpuInstanceId": unavailable,
                "computeInstanceId": unavailable,
            }
        )
        for pid, used in by_pid.items()
    ]


@throwOnVersionMismatch
def nvmlDeviceGetComputeRunningProcesses(handle: Any) -> list[nvmlFriendlyObject]:
    return _processes("nvmlDeviceGetComputeRunningProcesses", handle, "compute")


@throwOnVersionMismatch
def nvmlDeviceGetGraphicsRunningProcesses(handle: Any) -> list[nvmlFriendlyObject]:
    return _processes("nvmlDeviceGetGraphicsRunningProcesses", handle, "graphics")
