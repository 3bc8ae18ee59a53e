"""GPU sources and helpers: pynvml played by a fake module, a simulated host on disk."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import _fakegpu
from llmsup import gpu
from llmsup.gpu import (
    GiB,
    Gpu,
    GpuProcess,
    GpuUnavailable,
    NvmlSource,
    SimulatedSource,
    Snapshot,
    describe_holder,
    fmt_bytes,
    holders,
    make_sim,
    memory_by_pids,
    process_info,
    resolve,
    sim_uuid,
    source_from_env,
)
from tests.util import FAKES_DIR, wait_for

# ---------------------------------------------------------------------------
# A fake pynvml: the real module's names and error codes, scripted devices.

NVML_ERRORS = {
    "NVML_ERROR_UNINITIALIZED": 1,
    "NVML_ERROR_INVALID_ARGUMENT": 2,
    "NVML_ERROR_NOT_SUPPORTED": 3,
    "NVML_ERROR_NO_PERMISSION": 4,
    "NVML_ERROR_ALREADY_INITIALIZED": 5,
    "NVML_ERROR_NOT_FOUND": 6,
    "NVML_ERROR_INSUFFICIENT_SIZE": 7,
    "NVML_ERROR_DRIVER_NOT_LOADED": 9,
    "NVML_ERROR_LIBRARY_NOT_FOUND": 12,
    "NVML_ERROR_FUNCTION_NOT_FOUND": 13,
    "NVML_ERROR_GPU_IS_LOST": 15,
    "NVML_ERROR_LIB_RM_VERSION_MISMATCH": 18,
    "NVML_ERROR_UNKNOWN": 999,
}
NOT_AVAILABLE = 2**64 - 1


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return {v: k for k, v in NVML_ERRORS.items()}.get(self.value, "?").title()


def fail(name: str) -> NVMLError:
    return NVMLError(NVML_ERRORS[name])


class FakeNvml:
    """State behind a module object that has pynvml's function names."""

    def __init__(self, devices: list[dict[str, Any]]) -> None:
        self.devices = devices
        self.init_error: str | None = None
        self.count_errors: list[str] = []
        self.inits = 0
        module = types.ModuleType("pynvml")
        module.NVMLError = NVMLError  # type: ignore[attr-defined]
        for name, value in NVML_ERRORS.items():
            setattr(module, name, value)
        module.NVML_TEMPERATURE_GPU = 0  # type: ignore[attr-defined]
        for name in dir(self):
            if name.startswith("nvml"):
                setattr(module, name, getattr(self, name))
        self.module = module

    def _field(self, handle: int, key: str) -> Any:
        value = self.devices[handle].get(key)
        if isinstance(value, str) and value.startswith("NVML_ERROR_"):
            raise fail(value)
        return value

    def nvmlInit(self) -> None:
        if self.init_error:
            raise fail(self.init_error)
        self.inits += 1

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        if self.count_errors:
            raise fail(self.count_errors.pop(0))
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> Any:
        return self._field(handle, "uuid")

    def nvmlDeviceGetName(self, handle: int) -> Any:
        return self._field(handle, "name")

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        total, used = self._field(handle, "memory")
        return types.SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return types.SimpleNamespace(gpu=self._field(handle, "util"), memory=0)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> Any:
        assert sensor == 0
        return self._field(handle, "temp")

    def _procs(self, handle: int, key: str) -> list[Any]:
        found = self._field(handle, key) or []
        return [types.SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in found]

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[Any]:
        return self._procs(handle, "compute")

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: int) -> list[Any]:
        return self._procs(handle, "graphics")


def device(i: int, **over: Any) -> dict[str, Any]:
    base = {
        "uuid": f"GPU-{i}aaaaaaa-0000-0000-0000-000000000000",
        "name": b"NVIDIA H100 80GB HBM3",
        "memory": (80 * GiB, 1 * GiB),
        "util": 12,
        "temp": 41,
        "compute": [],
        "graphics": [],
    }
    return {**base, **over}


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> Callable[[list[dict[str, Any]]], FakeNvml]:
    def install(devices: list[dict[str, Any]]) -> FakeNvml:
        fake = FakeNvml(devices)
        monkeypatch.setitem(sys.modules, "pynvml", fake.module)
        return fake

    return install


Install = Callable[[list[dict[str, Any]]], FakeNvml]


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("NVML_ERROR_LIBRARY_NOT_FOUND", "no NVIDIA driver (libnvidia-ml.so.1 not found)"),
        ("NVML_ERROR_DRIVER_NOT_LOADED", "NVIDIA driver not loaded"),
        ("NVML_ERROR_NO_PERMISSION", "no permission to use the NVIDIA driver"),
        ("NVML_ERROR_LIB_RM_VERSION_MISMATCH", "versions differ"),
        ("NVML_ERROR_UNKNOWN", "NVML could not start: NVML_ERROR_UNKNOWN"),
    ],
)
def test_nvml_init_failure_is_gpu_unavailable(nvml: Install, code: str, reason: str) -> None:
    fake = nvml([device(0)])
    fake.init_error = code
    source = NvmlSource()
    with pytest.raises(GpuUnavailable) as caught:
        source.snapshot()
    assert reason in str(caught.value)
    assert "\n" not in str(caught.value)
    # The driver comes back (installed, loaded): the next snapshot initialises again.
    fake.init_error = None
    assert [g.index for g in source.snapshot().gpus] == [0]


def test_nvml_two_gpus_with_processes(nvml: Install) -> None:
    fake = nvml(
        [
            device(0, compute=[(100, 40 * GiB), (101, None)], graphics=[(100, 40 * GiB)]),
            device(
                1,
                uuid=b"GPU-1bbbbbbb-0000-0000-0000-000000000000",
                name="NVIDIA H100 80GB HBM3",
                memory=(80 * GiB, 70 * GiB),
                compute=[(102, NOT_AVAILABLE)],
                graphics=[(103, 2 * GiB)],
            ),
        ]
    )
    source = NvmlSource()
    snap = source.snapshot()
    assert snap.notes == ()
    assert snap.gpus == (
        Gpu(0, device(0)["uuid"], "NVIDIA H100 80GB HBM3", 80 * GiB, GiB, 79 * GiB, 12, 41),
        Gpu(
            1,
            "GPU-1bbbbbbb-0000-0000-0000-000000000000",
            "NVIDIA H100 80GB HBM3",
            80 * GiB,
            70 * GiB,
            10 * GiB,
            12,
            41,
        ),
    )
    uuid0, uuid1 = snap.gpus[0].uuid, snap.gpus[1].uuid
    assert sorted(snap.processes, key=lambda p: p.pid) == [
        GpuProcess(100, uuid0, 0, 40 * GiB),  # compute and graphics: one entry
        GpuProcess(101, uuid0, 0, None),
        GpuProcess(102, uuid1, 1, None),  # NVML_VALUE_NOT_AVAILABLE
        GpuProcess(103, uuid1, 1, 2 * GiB),
    ]
    source.snapshot()
    assert fake.inits == 1  # initialised once, kept initialised
    source.close()


def test_nvml_gpu_lost_between_calls_is_skipped_with_a_note(nvml: Install) -> None:
    fake = nvml([device(0), device(1), device(2)])
    source = NvmlSource()
    assert len(source.snapshot().gpus) == 3
    fake.devices[1]["memory"] = "NVML_ERROR_GPU_IS_LOST"
    fake.devices[2]["util"] = "NVML_ERROR_UNKNOWN"
    snap = source.snapshot()
    assert [g.index for g in snap.gpus] == [0]
    assert snap.notes == (
        f"GPU 1 ({device(1)['uuid']}) is lost: NVML_ERROR_GPU_IS_LOST",
        f"GPU 2 ({device(2)['uuid']}) cannot be read: NVML_ERROR_UNKNOWN",
    )


def test_nvml_unsupported_readings_are_none(nvml: Install) -> None:
    fake = nvml(
        [
            device(
                0,
                util="NVML_ERROR_NOT_SUPPORTED",
                temp="NVML_ERROR_NOT_SUPPORTED",
                compute="NVML_ERROR_NO_PERMISSION",
                graphics=[(7, None)],
            ),
            device(1, temp="NVML_ERROR_FUNCTION_NOT_FOUND", graphics="NVML_ERROR_NOT_SUPPORTED"),
        ]
    )
    fake.module.nvmlDeviceGetTemperatureV = lambda handle, sensor: 55  # type: ignore[attr-defined]
    snap = NvmlSource().snapshot()
    g, h = snap.gpus
    assert (g.utilization, g.temperature) == (None, None)
    assert snap.processes == (GpuProcess(7, g.uuid, 0, None),)
    # The old temperature call is gone from the driver: its successor answers.
    assert h.temperature == 55
    # A compute-only GPU that cannot list graphics processes is not worth a note.
    assert snap.notes == (f"GPU 0 ({g.uuid}): processes unknown: NVML_ERROR_NO_PERMISSION",)


def test_nvml_reinitialises_after_the_driver_was_reloaded(nvml: Install) -> None:
    fake = nvml([device(0)])
    source = NvmlSource()
    source.snapshot()
    fake.count_errors = ["NVML_ERROR_UNINITIALIZED"]
    assert len(source.snapshot().gpus) == 1
    assert fake.inits == 2
    fake.count_errors = ["NVML_ERROR_DRIVER_NOT_LOADED", "NVML_ERROR_DRIVER_NOT_LOADED"]
    with pytest.raises(GpuUnavailable, match="stopped answering"):
        source.snapshot()


def test_nvml_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(GpuUnavailable, match="nvidia-ml-py"):
        NvmlSource().snapshot()


def driver_present() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


def test_real_pynvml() -> None:
    """The installed pynvml on this host: GPUs if a driver runs, else a readable reason."""
    source = NvmlSource()
    if not driver_present():
        with pytest.raises(GpuUnavailable, match=r"no NVIDIA driver \(libnvidia-ml.so.1"):
            source.snapshot()
        return
    try:
        snap = source.snapshot()
    except GpuUnavailable as e:  # a driver library without a loaded driver, say
        assert str(e)
        return
    finally:
        source.close()
    for g in snap.gpus:
        assert g.uuid.startswith("GPU-")
        assert g.memory_total >= g.memory_used >= 0


# ---------------------------------------------------------------------------
# The simulated host


def test_simulated_allocations(tmp_path: Path) -> None:
    path = make_sim(tmp_path / "gpus.json", n=2, total=80 * GiB)
    me = os.getpid()
    assert _fakegpu.allocate(str(path), me, 0, 10 * GiB) == (10 * GiB, 80 * GiB, 80 * GiB)
    _fakegpu.allocate(str(path), me, sim_uuid(1), 30 * GiB)
    _fakegpu.allocate(str(path), me, "1", 5 * GiB)
    snap = SimulatedSource(path).snapshot()
    assert [(g.index, g.uuid, g.memory_used, g.memory_free) for g in snap.gpus] == [
        (0, sim_uuid(0), 10 * GiB, 70 * GiB),
        (1, sim_uuid(1), 35 * GiB, 45 * GiB),
    ]
    assert snap.gpus[0].name == "NVIDIA H100 80GB HBM3"
    assert sorted(snap.processes, key=lambda p: p.gpu_index) == [
        GpuProcess(me, sim_uuid(0), 0, 10 * GiB),
        GpuProcess(me, sim_uuid(1), 1, 35 * GiB),
    ]
    assert _fakegpu.free_on(str(path), sim_uuid(1)) == 45 * GiB
    # vLLM's start: all of utilization x total, or nothing.
    assert _fakegpu.reserve(str(path), me, 1, 0.9) == (False, 45 * GiB, 80 * GiB)
    assert _fakegpu.reserve(str(path), me, 1, 0.5)[0]
    # Ollama's: what fits.
    assert _fakegpu.allocate(str(path), me, 1, 80 * GiB)[0] == 5 * GiB
    assert SimulatedSource(path).snapshot().gpus[1].memory_free == 0
    with pytest.raises(_fakegpu.SimError):
        _fakegpu.allocate(str(path), me, 5, GiB)


def allocate_and_exit(path: Path, delay: float, nbytes: int = 8 * GiB, times: int = 1) -> int:
    """A process that allocates under its own pid and exits; its pid."""
    code = (
        "import os, sys; sys.path.insert(0, sys.argv[1]); import _fakegpu\n"
        "for _ in range(int(sys.argv[5])):\n"
        "    _fakegpu.allocate(sys.argv[2], os.getpid(), 0, int(sys.argv[3]), float(sys.argv[4]))\n"
        "print(os.getpid())\n"
    )
    argv = [sys.executable, "-c", code, str(FAKES_DIR), str(path), str(nbytes), str(delay)]
    done = subprocess.run([*argv, str(times)], capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_simulated_memory_of_a_dead_process_lingers_for_its_release_delay(tmp_path: Path) -> None:
    path = make_sim(tmp_path / "gpus.json", n=1)
    source = SimulatedSource(path)
    allocate_and_exit(path, delay=0.0)
    assert source.snapshot().gpus[0].memory_used == 0

    pid = allocate_and_exit(path, delay=0.6)
    first = time.monotonic()
    snap = source.snapshot()  # first seen dead now: the delay starts
    assert snap.gpus[0].memory_used == 8 * GiB
    assert snap.processes == ()  # nothing to name: the process is gone
    assert json.loads(path.read_text())["allocations"][0]["pid"] == pid
    wait_for(lambda: source.snapshot().gpus[0].memory_used == 0, timeout=5)
    assert time.monotonic() - first >= 0.6


def test_simulated_pid_reuse_is_not_a_live_holder(tmp_path: Path) -> None:
    path = make_sim(tmp_path / "gpus.json", n=1)
    data = json.loads(path.read_text())
    data["allocations"] = [
        {"pid": os.getpid(), "start": 1, "gpu": sim_uuid(0), "bytes": GiB, "release_delay": 0}
    ]
    path.write_text(json.dumps(data))
    assert SimulatedSource(path).snapshot().gpus[0].memory_used == 0


def test_simulated_writes_from_many_processes_all_land(tmp_path: Path) -> None:
    path = make_sim(tmp_path / "gpus.json", n=1, total=1000 * GiB)
    code = (
        "import os, sys; sys.path.insert(0, sys.argv[1]); import _fakegpu\n"
        "for _ in range(20):\n"
        "    _fakegpu.allocate(sys.argv[2], os.getpid(), 0, 1 << 30, 3600.0)\n"
        "    _fakegpu.free_on(sys.argv[2], 0)\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(FAKES_DIR), str(path)]) for _ in range(8)
    ]
    source = SimulatedSource(path)
    while any(p.poll() is None for p in procs):
        source.snapshot()  # a reader that writes too (it marks the dead)
    assert all(p.wait() == 0 for p in procs)
    assert len(json.loads(path.read_text())["allocations"]) == 160
    assert source.snapshot().gpus[0].memory_used == 160 * GiB


def test_simulated_lost_gpu_and_missing_file(tmp_path: Path) -> None:
    path = make_sim(tmp_path / "gpus.json", n=3)
    data = json.loads(path.read_text())
    data["gpus"][1]["lost"] = True
    data["gpus"][2]["baseline"] = GiB
    path.write_text(json.dumps(data))
    snap = SimulatedSource(path).snapshot()
    assert [g.index for g in snap.gpus] == [0, 2]
    assert snap.gpus[1].memory_used == GiB
    assert snap.notes == (f"GPU 1 ({sim_uuid(1)}) is lost: NVML_ERROR_GPU_IS_LOST",)
    with pytest.raises(GpuUnavailable, match="does not exist"):
        SimulatedSource(tmp_path / "none.json").snapshot()
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(GpuUnavailable, match="not JSON"):
        SimulatedSource(tmp_path / "bad.json").snapshot()


def test_source_from_env(tmp_path: Path) -> None:
    sim = source_from_env({"LLMSUP_GPU_SIM": str(tmp_path / "g.json")})
    assert isinstance(sim, SimulatedSource)
    assert isinstance(source_from_env({}), NvmlSource)


# ---------------------------------------------------------------------------
# Pure helpers


def host(n: int = 4) -> Snapshot:
    gpus = tuple(Gpu(i, sim_uuid(i), "NVIDIA H100", 80 * GiB, 0, 80 * GiB, 0, 30) for i in range(n))
    return Snapshot(gpus, ())


def test_resolve_indices_and_uuids() -> None:
    snap = host()
    found, errors = resolve([2, sim_uuid(0), "3", "GPU-00000001"], snap)
    assert errors == []
    assert [g.index for g in found] == [2, 0, 3, 1]


def test_resolve_errors() -> None:
    snap = host()
    found, errors = resolve([7, "GPU-abc", "MIG-1234", 1, sim_uuid(1), "GPU-0000"], snap)
    assert [g.index for g in found] == [1]
    assert errors[0] == "GPU 7 does not exist (this host has 4: 0-3)"
    assert errors[1].startswith("no GPU with UUID GPU-abc (known: GPU-00000000-")
    assert "MIG" in errors[2] and "not supported" in errors[2]
    assert errors[3] == f"GPU 1 ({sim_uuid(1)}) is listed twice: as 1 and {sim_uuid(1)}"
    assert errors[4].startswith("GPU-0000 matches several GPUs")
    assert resolve([0], Snapshot((), ()))[1] == ["GPU 0 does not exist (this host has no GPU)"]
    lost = Snapshot(host().gpus[:1], (), ("GPU 1 (GPU-x) is lost: NVML_ERROR_GPU_IS_LOST",))
    assert resolve([1], lost)[1] == [
        "GPU 1 does not exist (this host has 1: 0); GPU 1 (GPU-x) is lost: NVML_ERROR_GPU_IS_LOST"
    ]


def test_holders_and_memory_by_pids() -> None:
    u0, u1 = sim_uuid(0), sim_uuid(1)
    snap = Snapshot(
        host(2).gpus,
        (
            GpuProcess(10, u0, 0, 2 * GiB),
            GpuProcess(11, u0, 0, None),
            GpuProcess(12, u0, 0, 40 * GiB),
            GpuProcess(12, u1, 1, 30 * GiB),
            GpuProcess(13, u1, 1, 1 * GiB),
        ),
    )
    assert [p.pid for p in holders(snap, u0)] == [12, 10, 11]
    assert memory_by_pids(snap, {11, 12}) == {0: 40 * GiB, 1: 30 * GiB}
    assert memory_by_pids(snap, {99}) == {}


def test_describe_holder() -> None:
    proc = GpuProcess(4242, sim_uuid(0), 0, 40 * GiB)
    text = describe_holder(proc, ("alice", "vllm serve org/model"))
    assert text == "pid 4242 (alice: vllm serve org/model) holds 40.0 GiB on GPU 0"
    hidden = describe_holder(GpuProcess(7, sim_uuid(1), 1, None), None)
    assert hidden == "pid 7 (a process this user cannot see) holds an unknown amount on GPU 1"
    assert len(describe_holder(proc, ("bob", "x" * 500))) < 150


def test_process_info() -> None:
    info = process_info(os.getpid())
    assert info is not None
    assert "python" in info[1] or "pytest" in info[1]
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    assert process_info(int(done.stdout)) is None


def test_fmt_bytes() -> None:
    assert fmt_bytes(0) == "0 B"
    assert fmt_bytes(1023) == "1023 B"
    assert fmt_bytes(1536) == "1.5 KiB"
    assert fmt_bytes(12.34 * GiB) == "12.3 GiB"
    assert fmt_bytes(80 * GiB) == "80.0 GiB"
    assert fmt_bytes(-2 * 1024**2) == "-2.0 MiB"
    assert fmt_bytes(3 * 1024**5) == "3072.0 TiB"


def test_module_import_is_cheap() -> None:
    code = "import sys, llmsup.gpu; print('pynvml' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
    assert gpu.SIM_ENV == "LLMSUP_GPU_SIM"
