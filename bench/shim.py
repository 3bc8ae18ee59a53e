"""The per-server log shim: what it costs to put one between a server and its log.

    .venv/bin/python bench/shim.py [--runs 20] [--mb 128]

Writes bench/results/shim.json. Medians (and p90), each next to a baseline
measured in the same run:
- startup: from Popen to the first byte of the server's output in its log,
  through the shim vs a bare Popen writing to the file itself;
- idle footprint: RSS and USS (what one more shim adds) of a shim whose server
  sleeps, vs a bare Python interpreter;
- throughput: MB/s of a server's output through the shim (log + copy to a
  reader), vs `cat FILE | tee LOG` (the same job) and `cat FILE > LOG`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stats import summary_ms  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PY = sys.executable
SHIM = [PY, "-m", "llmsup.shim"]
Launch = Callable[[Path, list[str]], "subprocess.Popen[bytes]"]


def via(shim: list[str]) -> Launch:
    def launch(log: Path, argv: list[str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [*shim, "--log", str(log), "--pid-file", f"{log}.pid", "--", *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )

    return launch


def bare(log: Path, argv: list[str]) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=f)


LAUNCHES: dict[str, Launch] = {"bare": bare, "shim": via(SHIM)}


def first_byte(launch: Launch, work: Path) -> float:
    """Seconds from the launch to the server's first byte in its log."""
    log = work / "first.log"
    log.unlink(missing_ok=True)
    begun = time.perf_counter()
    proc = launch(log, ["echo", "ready"])
    while not (log.exists() and log.stat().st_size > 0):
        time.sleep(0.0002)
    took = time.perf_counter() - begun
    proc.wait()
    return took


def idle(launch: Launch | None, work: Path) -> tuple[float, float]:
    """RSS and USS in MB of a shim (or a bare interpreter) whose server sleeps."""
    log = work / "idle.log"
    if launch is None:
        proc = subprocess.Popen([PY, "-c", "import time; time.sleep(60)"])
    else:
        proc = launch(log, ["sleep", "60"])
    try:
        pid_file = Path(f"{log}.pid")
        while launch is not None and not pid_file.exists():
            time.sleep(0.01)
        time.sleep(0.5)  # settled
        mem = psutil.Process(proc.pid).memory_full_info()
        return mem.rss / 2**20, mem.uss / 2**20
    finally:
        for p in psutil.Process(proc.pid).children():
            p.kill()
        proc.kill()
        proc.wait()
        pid_file.unlink(missing_ok=True)


def through(argv: list[str], out: bool, size: int) -> float:
    """MB/s of `argv` moving `size` bytes (its stdout read and dropped if `out`)."""
    begun = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE if out else subprocess.DEVNULL)
    if proc.stdout is not None:
        while os.read(proc.stdout.fileno(), 2**20):
            pass
        proc.stdout.close()
    proc.wait()
    return size / 2**20 / (time.perf_counter() - begun)


def throughput(work: Path, mb: int, runs: int) -> dict[str, float]:
    source = work / "output.txt"
    line = b"INFO 12-02 12:00:00 [engine.py:42] Avg prompt throughput: 0.0 tokens/s\n"
    with open(source, "wb") as f:
        f.write(line * (mb * 2**20 // len(line)))
    size = source.stat().st_size
    log = work / "through.log"
    cases = {
        "shim": ([*SHIM, "--log", str(log), "--max-bytes", "0", "--", "cat", str(source)], True),
        "tee": (["sh", "-c", f'cat "{source}" | tee "{log}"'], True),
        "cat": (["sh", "-c", f'cat "{source}" > "{log}"'], False),
    }
    found: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(runs):
        for name, (argv, out) in cases.items():
            log.unlink(missing_ok=True)
            found[name].append(through(argv, out, size))
            assert log.stat().st_size == size, f"{name}: the log is not whole"
    log.unlink(missing_ok=True)
    source.unlink()
    return {f"{name}_mb_s": statistics.median(v) for name, v in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="startups measured per launch")
    parser.add_argument("--mb", type=int, default=128, help="MB of output for throughput")
    args = parser.parse_args()
    res: dict[str, Any] = {
        "machine": f"{platform.node()} {os.cpu_count()} cpus, {platform.python_version()}",
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    with tempfile.TemporaryDirectory(prefix="llmsup-bench-shim-") as tmp:
        work = Path(tmp)
        startup: dict[str, list[float]] = {name: [] for name in LAUNCHES}
        for _ in range(args.runs):  # interleaved: a load that comes and goes hits all alike
            for name, launch in LAUNCHES.items():
                startup[name].append(first_byte(launch, work))
        res["startup_to_first_byte_logged"] = {k: summary_ms(v) for k, v in startup.items()}
        res["startup_shim_minus_bare_ms"] = (
            statistics.median(startup["shim"]) - statistics.median(startup["bare"])
        ) * 1000
        footprint: dict[str, Any] = {}
        idlers: dict[str, Launch | None] = {"python": None, **LAUNCHES}
        del idlers["bare"]
        for name, idler in idlers.items():
            samples = [idle(idler, work) for _ in range(5)]
            footprint[name] = {
                "rss_mb": statistics.median(s[0] for s in samples),
                "uss_mb": statistics.median(s[1] for s in samples),
            }
        res["idle_footprint"] = footprint
        res["throughput"] = {"mb": args.mb, "runs": 3, **throughput(work, args.mb, 3)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "shim.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
