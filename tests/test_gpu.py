"""NvmlSource on a GPU host played by the fake pynvml, and the pure helpers."""

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
from _fakegpu import make_sim, sim_uuid
from llmsup.gpu import (
    GiB,
    Gpu,
    GpuProcess,
    GpuUnavailable,
    NvmlSource,
    Snapshot,
    describe_holder,
    fmt_bytes,
    holders,
    memory_by_pids,
    process_info,
    resolve,
)
from tests.gpusim import fake_pynvml, nvml_source
from tests.util import FAKES_DIR, wait_for

# ---------------------------------------------------------------------------
# NVML, played by the fake pynvml from a host file (tests/fakes/_fakegpu.py)


def edit(path: str | Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Change the host file as the fakes do: under its lock."""
    with _fakegpu.locked(str(path)) as data:
        change(data)


def fault(path: str | Path, call: str, error: str | list[str], gpu: int | None = None) -> None:
    """`call` raises `error` (each of a list in turn), on the host or on GPU `gpu`."""

    def plan(data: dict[str, Any]) -> None:
        scope = data if gpu is None else data["gpus"][gpu]
        scope.setdefault("faults", {})[call] = error

    edit(path, plan)


def hold(path: str | Path, pid: int, gpu: int, nbytes: int, **extra: Any) -> None:
    """An allocation of `pid` as the fakes record it, plus `extra` (kind, reported)."""
    entry = {"pid": pid, "start": None, "gpu": sim_uuid(gpu), "bytes": nbytes, **extra}
    edit(path, lambda data: data["allocations"].append(entry))


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("NVML_ERROR_LIBRARY_NOT_FOUND", "no NVIDIA driver (libnvidia-ml.so.1 not found)"),
        ("NVML_ERROR_DRIVER_NOT_LOADED", "NVIDIA driver not loaded"),
        ("NVML_ERROR_NO_PERMISSION", "no permission to use the NVIDIA driver"),
        ("NVML_ERROR_LIB_RM_VERSION_MISMATCH", "versions differ"),
        ("NVML_ERROR_UNKNOWN", "NVML could not start: NVML_ERROR_UNKNOWN (Unknown Error)"),
    ],
)
def test_nvml_init_failure_is_gpu_unavailable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, code: str, reason: str
) -> None:
    host = make_sim(tmp_path / "gpus.json", n=1)
    fault(host, "nvmlInit", code)
    source = nvml_source(monkeypatch, host)
    with pytest.raises(GpuUnavailable) as caught:
        source.snapshot()
    assert reason in str(caught.value)
    assert "\n" not in str(caught.value)
    # The driver comes back (installed, loaded): the next snapshot initialises again.
    edit(host, lambda data: data.pop("faults"))
    assert [g.index for g in source.snapshot().gpus] == [0]


def test_nvml_without_a_host_is_a_host_without_a_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_pynvml(monkeypatch, "unused")
    monkeypatch.delenv(_fakegpu.HOST_ENV)
    with pytest.raises(GpuUnavailable, match=r"^no NVIDIA driver \(libnvidia-ml.so.1 not found\)$"):
        NvmlSource().snapshot()


def test_nvml_two_gpus_with_processes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    host = make_sim(tmp_path / "gpus.json", n=2)
    me, parent = os.getpid(), os.getppid()

    def second_gpu(data: dict[str, Any]) -> None:
        data["gpus"][1].update(name="NVIDIA H200", baseline=60 * GiB, utilization=12)

    edit(host, second_gpu)
    hold(host, me, 0, 40 * GiB)
    hold(host, me, 0, GiB, kind="graphics")  # compute and graphics: one entry, compute's
    hold(host, parent, 0, 2 * GiB, reported=None)  # NVML cannot say how much
    hold(host, me, 1, 3 * GiB)
    hold(host, me, 1, 4 * GiB)  # two allocations of one process: their sum
    hold(host, parent, 1, 5 * GiB, kind="graphics")
    fake = fake_pynvml(monkeypatch, host)
    source = NvmlSource()
    snap = source.snapshot()
    assert snap.notes == ()
    assert snap.gpus == (
        Gpu(0, sim_uuid(0), "NVIDIA H100 80GB HBM3", 80 * GiB, 43 * GiB, 37 * GiB, 0, 30),
        Gpu(1, sim_uuid(1), "NVIDIA H200", 80 * GiB, 72 * GiB, 8 * GiB, 12, 30),
    )
    assert sorted(snap.processes, key=lambda p: (p.gpu_index, p.pid)) == sorted(
        [
            GpuProcess(me, sim_uuid(0), 0, 40 * GiB),
            GpuProcess(parent, sim_uuid(0), 0, None),
            GpuProcess(me, sim_uuid(1), 1, 7 * GiB),
            GpuProcess(parent, sim_uuid(1), 1, 5 * GiB),
        ],
        key=lambda p: (p.gpu_index, p.pid),
    )
    source.snapshot()
    assert fake._initialised == 1  # initialised once, kept initialised
    source.close()
    assert fake._initialised == 0


def test_nvml_value_not_available_of_an_older_pynvml_is_unknown(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """pynvml before 11.5 passes NVML_VALUE_NOT_AVAILABLE through as 2**64 - 1."""
    host = make_sim(tmp_path / "gpus.json", n=1)
    fake = fake_pynvml(monkeypatch, host)
    raw = types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=2**64 - 1)
    monkeypatch.setattr(fake, "nvmlDeviceGetComputeRunningProcesses", lambda handle: [raw])
    snap = NvmlSource().snapshot()
    assert snap.processes == (GpuProcess(os.getpid(), sim_uuid(0), 0, None),)


def test_nvml_gpu_lost_between_calls_is_skipped_with_a_note(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    host = make_sim(tmp_path / "gpus.json", n=3)
    source = nvml_source(monkeypatch, host)
    assert len(source.snapshot().gpus) == 3
    edit(host, lambda data: data["gpus"][1].update(lost=True))
    fault(host, "nvmlDeviceGetUtilizationRates", "NVML_ERROR_UNKNOWN", gpu=2)
    snap = source.snapshot()
    assert [g.index for g in snap.gpus] == [0]
    assert snap.notes == (
        f"GPU 1 ({sim_uuid(1)}) is lost: NVML_ERROR_GPU_IS_LOST",
        f"GPU 2 ({sim_uuid(2)}) cannot be read: NVML_ERROR_UNKNOWN",
    )


def test_nvml_unsupported_readings_are_none(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    host = make_sim(tmp_path / "gpus.json", n=2)
    edit(host, lambda data: data["gpus"][0].update(utilization=None))  # the GPU cannot say
    fault(host, "nvmlDeviceGetTemperature", "NVML_ERROR_NOT_SUPPORTED", gpu=0)
    fault(host, "nvmlDeviceGetComputeRunningProcesses", "NVML_ERROR_NO_PERMISSION", gpu=0)
    hold(host, os.getpid(), 0, GiB, kind="graphics", reported=None)
    # The old temperature call is gone from the driver: its successor answers.
    fault(host, "nvmlDeviceGetTemperature", "NVML_ERROR_FUNCTION_NOT_FOUND", gpu=1)
    edit(host, lambda data: data["gpus"][1].update(temperature=55))
    fault(host, "nvmlDeviceGetGraphicsRunningProcesses", "NVML_ERROR_NOT_SUPPORTED", gpu=1)
    snap = nvml_source(monkeypatch, host).snapshot()
    g, h = snap.gpus
    assert (g.utilization, g.temperature) == (None, None)
    assert snap.processes == (GpuProcess(os.getpid(), g.uuid, 0, None),)
    assert h.temperature == 55
    # A compute-only GPU that cannot list graphics processes is not worth a note.
    assert snap.notes == (f"GPU 0 ({g.uuid}): processes unknown: NVML_ERROR_NO_PERMISSION",)


def test_nvml_library_older_than_the_package_leaves_processes_unknown_not_the_gpus(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """nvidia-ml-py newer than the driver: its process listing raises NVMLLibraryMismatchError
    (no NVMLError); the GPUs are still read, with one note saying what to do."""
    host = make_sim(tmp_path / "gpus.json", n=1)
    fault(host, "nvmlDeviceGetComputeRunningProcesses", "NVML_ERROR_FUNCTION_NOT_FOUND", gpu=0)
    snap = nvml_source(monkeypatch, host).snapshot()
    assert [g.index for g in snap.gpus] == [0]
    assert snap.notes == (
        f"GPU 0 ({sim_uuid(0)}): processes unknown: nvidia-ml-py does not match the driver's "
        "NVML library (install the nvidia-ml-py of the driver's version)",
    )


def test_nvml_reinitialises_after_the_driver_was_reloaded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    host = make_sim(tmp_path / "gpus.json", n=1)
    fake = fake_pynvml(monkeypatch, host)
    source = NvmlSource()
    source.snapshot()
    fault(host, "nvmlDeviceGetCount", ["NVML_ERROR_UNINITIALIZED"])
    assert len(source.snapshot().gpus) == 1
    assert fake._initialised == 2
    fault(host, "nvmlDeviceGetCount", ["NVML_ERROR_DRIVER_NOT_LOADED"] * 2)
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
# The simulated host: what the fakes record, as NVML reports it


def test_simulated_allocations(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = make_sim(tmp_path / "gpus.json", n=2, total=80 * GiB)
    me = os.getpid()
    assert _fakegpu.allocate(path, me, 0, 10 * GiB) == (10 * GiB, 80 * GiB, 80 * GiB)
    _fakegpu.allocate(path, me, sim_uuid(1), 30 * GiB)
    _fakegpu.allocate(path, me, "1", 5 * GiB)
    source = nvml_source(monkeypatch, path)
    snap = source.snapshot()
    assert [(g.index, g.uuid, g.memory_used, g.memory_free) for g in snap.gpus] == [
        (0, sim_uuid(0), 10 * GiB, 70 * GiB),
        (1, sim_uuid(1), 35 * GiB, 45 * GiB),
    ]
    assert snap.gpus[0].name == "NVIDIA H100 80GB HBM3"
    assert sorted(snap.processes, key=lambda p: p.gpu_index) == [
        GpuProcess(me, sim_uuid(0), 0, 10 * GiB),
        GpuProcess(me, sim_uuid(1), 1, 35 * GiB),
    ]
    assert _fakegpu.free_on(path, sim_uuid(1)) == 45 * GiB
    # vLLM's start: all of utilization x total, or nothing.
    assert _fakegpu.reserve(path, me, 1, 0.9) == (False, 45 * GiB, 80 * GiB)
    assert _fakegpu.reserve(path, me, 1, 0.5)[0]
    # Ollama's: what fits.
    assert _fakegpu.allocate(path, me, 1, 80 * GiB)[0] == 5 * GiB
    assert source.snapshot().gpus[1].memory_free == 0
    with pytest.raises(_fakegpu.SimError):
        _fakegpu.allocate(path, me, 5, GiB)


def allocate_and_exit(path: str, delay: float, nbytes: int = 8 * GiB, times: int = 1) -> int:
    """A process that allocates under its own pid and exits; its pid."""
    code = (
        "import os, sys; sys.path.insert(0, sys.argv[1]); import _fakegpu\n"
        "for _ in range(int(sys.argv[5])):\n"
        "    _fakegpu.allocate(sys.argv[2], os.getpid(), 0, int(sys.argv[3]), float(sys.argv[4]))\n"
        "print(os.getpid())\n"
    )
    argv = [sys.executable, "-c", code, str(FAKES_DIR), path, str(nbytes), str(delay)]
    done = subprocess.run([*argv, str(times)], capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_simulated_memory_of_a_dead_process_lingers_for_its_release_delay(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = make_sim(tmp_path / "gpus.json", n=1)
    source = nvml_source(monkeypatch, path)
    allocate_and_exit(path, delay=0.0)
    assert source.snapshot().gpus[0].memory_used == 0

    pid = allocate_and_exit(path, delay=0.6)
    first = time.monotonic()
    snap = source.snapshot()  # first seen dead now: the delay starts
    assert snap.gpus[0].memory_used == 8 * GiB
    assert snap.processes == ()  # nothing to name: the process is gone
    assert json.loads(Path(path).read_text())["allocations"][0]["pid"] == pid
    wait_for(lambda: source.snapshot().gpus[0].memory_used == 0, timeout=5)
    assert time.monotonic() - first >= 0.6


def test_simulated_pid_reuse_is_not_a_live_holder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = make_sim(tmp_path / "gpus.json", n=1)
    hold(path, os.getpid(), 0, GiB, start=1, release_delay=0)
    snap = nvml_source(monkeypatch, path).snapshot()
    assert (snap.gpus[0].memory_used, snap.processes) == (0, ())


def test_simulated_writes_from_many_processes_all_land(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = make_sim(tmp_path / "gpus.json", n=1, total=1000 * GiB)
    code = (
        "import os, sys; sys.path.insert(0, sys.argv[1]); import _fakegpu\n"
        "for _ in range(20):\n"
        "    _fakegpu.allocate(sys.argv[2], os.getpid(), 0, 1 << 30, 3600.0)\n"
        "    _fakegpu.free_on(sys.argv[2], 0)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(FAKES_DIR), path]) for _ in range(8)]
    source = nvml_source(monkeypatch, path)
    while any(p.poll() is None for p in procs):
        source.snapshot()  # a reader that writes too (it marks the dead)
    assert all(p.wait() == 0 for p in procs)
    assert len(json.loads(Path(path).read_text())["allocations"]) == 160
    assert source.snapshot().gpus[0].memory_used == 160 * GiB


def test_simulated_lost_gpu_and_a_broken_host_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = make_sim(tmp_path / "gpus.json", n=3)
    edit(path, lambda data: data["gpus"][1].update(lost=True))
    edit(path, lambda data: data["gpus"][2].update(baseline=GiB))
    snap = nvml_source(monkeypatch, path).snapshot()
    assert [g.index for g in snap.gpus] == [0, 2]
    assert snap.gpus[1].memory_used == GiB
    assert snap.notes == (f"GPU 1 ({sim_uuid(1)}) is lost: NVML_ERROR_GPU_IS_LOST",)
    # A host file the test got wrong is the test's error, not a driver state: it is loud.
    with pytest.raises(_fakegpu.SimError, match="No such file"):
        nvml_source(monkeypatch, tmp_path / "none.json").snapshot()
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(_fakegpu.SimError, match=r"bad\.json"):
        nvml_source(monkeypatch, tmp_path / "bad.json").snapshot()
    fault(path, "nvmlInit", "NVML_ERROR_NO_SUCH_THING")
    with pytest.raises(_fakegpu.SimError, match="not an NVML_ERROR_ code"):
        nvml_source(monkeypatch, path).snapshot()


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
