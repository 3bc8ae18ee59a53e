"""The pace of the daemon's systemd watchdog pings (WATCHDOG=1).

    .venv/bin/python bench/watchdog.py [--seconds 20]

Runs a real daemon (one fake vLLM model, TP=2) with NOTIFY_SOCKET and
WATCHDOG_USEC=400000 set, as systemd would, receives its datagrams, and writes
bench/results/watchdog.json: the gaps between pings while it runs (median, p90,
min, max) next to the interval they should keep, WATCHDOG_USEC/2 = 200 ms.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stats import summary_ms  # noqa: E402
from tests.supervisor_util import Daemon  # noqa: E402
from tests.util import free_port  # noqa: E402

RESULTS = ROOT / "bench" / "results"
WATCHDOG_USEC = 400_000


def pings(tmp: Path, seconds: float) -> list[float]:
    """Arrival times of WATCHDOG=1 while every model is READY, for `seconds`."""
    address = tmp / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(address))
    sock.settimeout(0.5)
    times: list[float] = []
    counting = threading.Event()
    done = threading.Event()

    def receive() -> None:
        while not done.is_set():
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            if counting.is_set() and b"WATCHDOG=1" in data.split(b"\n"):
                times.append(time.monotonic())

    models = f"""\
    m:
      backend: vllm
      model: org/m
      gpus: [0, 1]
      port: {free_port()}
    """
    env = {"NOTIFY_SOCKET": str(address), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    d = Daemon(tmp, models, extra_env=env)
    d.env.pop("WATCHDOG_PID", None)
    receiver = threading.Thread(target=receive)
    receiver.start()
    try:
        d.start()
        d.wait_all_ready()
        counting.set()
        time.sleep(seconds)  # the measuring window
        counting.clear()
    finally:
        done.set()
        receiver.join()
        d.stop()
        sock.close()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmsup-bench-") as tmp:
        times = pings(Path(tmp), args.seconds)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    expected = WATCHDOG_USEC / 2 / 1e6
    res = {
        "machine": f"{platform.node()} {os.cpu_count()} cpus, {platform.python_version()}",
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "seconds": args.seconds,
        "expected_interval_ms": expected * 1000,
        "gaps": summary_ms(gaps),
        "min_gap_ms": min(gaps) * 1000,
        "median_ratio_vs_expected": statistics.median(gaps) / expected,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "watchdog.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
