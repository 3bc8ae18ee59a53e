"""Adoption benchmark: a new daemon takes up N running servers (live restore).

    .venv/bin/python bench/adoption.py [--models 32,100] [--runs 5]

For each N, `--runs` times: a cold `llmsup up --foreground` of N models to all
READY (the baseline), then the daemon is SIGKILLed and a new one started, then
that one leaves with `llmsup down --keep-models` and another is started; each
new daemon must adopt every server (same pid and start time) and be READY.
Measured from the wall clock just before the new daemon's process is launched
(psutil's start times rest on a boot time in whole seconds) to the first
`status` (polled every 5 ms) that shows every model READY; target: under 1 s at
32 models.

The daemon runs with its bytecode cached (PYTHONPYCACHEPREFIX, filled by an untimed
start and `down` of each fleet), as an installed llmsup has it: with PYTHONDONTWRITEBYTECODE
every start compiles llmsup's ~60 modules again (about 0.3 s more here).

The servers are cheap: the `command` backend running a 10-line Python HTTP
server (`python -S`, the socket module only) that answers 200 to anything, so
the figures are the daemon's own costs, not a model's.

Every daemon runs through a small wrapper (written to the temporary directory)
that stamps where its time goes: Python's start and imports, the CLI (manifest,
plan, GPU check), `Daemon.restore` (records loaded, verified, leftovers
stopped: the process-table scan), `_take_up`, the control socket answering,
and the moment the last server turned READY in the daemon; plus the daemon's
own CPU time until then (less sensitive than wall time to a busy machine).
Writes bench/results/adoption.json and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stats import summary_ms  # noqa: E402
from llmsup.client import call  # noqa: E402
from tests.supervisor_util import Daemon  # noqa: E402
from tests.util import free_port, wait_for  # noqa: E402

RESULTS = ROOT / "bench" / "results"
TARGET_S = 1.0  # at 32 models
POLL = 0.005  # seconds between status calls while waiting for READY

SERVER = """\
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(64)
while True:
    c, _ = s.accept()
    try:
        c.recv(4096)
        c.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok")
    except OSError:
        pass
    c.close()
"""

# The daemon, stamped: each mark is (name, wall clock); written as one JSON line
# to $ADOPTION_STAMPS once every model is READY (a SIGKILL later loses nothing).
# Wraps only what exists, so that a renamed method loses its mark, not the run.
WRAPPER = """\
import functools, inspect, json, os, sys, time
marks = [("python_started", time.time())]
import llmsup.api as api
import llmsup.daemon as daemon
import llmsup.process as process
marks.append(("imported", time.time()))
verify = []

def mark(name):
    marks.append((name, time.time()))

def around(owner, name, label):
    orig = getattr(owner, name, None)
    if orig is None:
        return
    if inspect.iscoroutinefunction(orig):
        async def wrapped(*a, **k):
            mark(label + ">")
            try:
                return await orig(*a, **k)
            finally:
                mark(label + "<")
    else:
        def wrapped(*a, **k):
            mark(label + ">")
            try:
                return orig(*a, **k)
            finally:
                mark(label + "<")
    setattr(owner, name, functools.wraps(orig)(wrapped))

def timed_verify(orig):
    def wrapped(*a, **k):
        t = time.perf_counter()
        try:
            return orig(*a, **k)
        finally:
            verify.append(time.perf_counter() - t)
    return wrapped

process.verify = timed_verify(process.verify)
around(daemon.Daemon, "run", "run")
around(daemon.Daemon, "restore", "restore")
around(daemon.Daemon, "_stop_leftovers", "stop_leftovers")
around(process, "load_records", "load_records")
around(daemon.Daemon, "_take_up", "take_up")
around(api, "serve", "serve")
ready = set()
changed = daemon.Daemon.changed

def on_change(self, unit, state, detail):
    changed(self, unit, state, detail)
    if state.value == "READY" and unit not in ready:
        ready.add(unit)
        if len(ready) == len(self.plan.launches):
            mark("all_ready")
            marks.append(("cpu_s_at_all_ready", time.process_time()))
            marks.append(("verify_calls", len(verify)))
            marks.append(("verify_sum_s", sum(verify)))
            with open(os.environ["ADOPTION_STAMPS"], "a") as f:
                f.write(json.dumps(marks) + "\\n")

daemon.Daemon.changed = on_change
from llmsup.cli import main
sys.exit(main())
"""


def log(msg: str) -> None:
    print(f"[adoption {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ports(n: int) -> list[int]:
    out: list[int] = []
    while len(out) < n:  # free_port may hand out one twice
        if (p := free_port()) not in out:
            out.append(p)
    return out


def manifest(tmp: Path, n: int) -> str:
    server = tmp / "server.py"
    server.write_text(SERVER)
    return "".join(
        f"m{i}: {{backend: command, command: [{sys.executable}, -S, {server}, '{p}'], "
        f"port: {p}, health_path: /}}\n"
        for i, p in enumerate(ports(n))
    )


class Bench:
    """One fleet of N models, its daemons launched through the stamping wrapper."""

    def __init__(self, tmp: Path, n: int) -> None:
        self.n = n
        self.d = Daemon(tmp, manifest(tmp, n))
        self.stamps = tmp / "stamps.jsonl"
        self.wrapper = tmp / "stamped_llmsup.py"
        self.wrapper.write_text(WRAPPER)
        self.d.env["ADOPTION_STAMPS"] = str(self.stamps)
        # Bytecode cached, as an installed llmsup has it (pip compiles at install),
        # outside the source tree: `warm_up` fills the cache before anything is timed.
        self.d.env.pop("PYTHONDONTWRITEBYTECODE", None)
        self.d.env["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")

    def launch(self, timeout: float) -> tuple[float, dict[str, dict[str, Any]], dict[str, float]]:
        """Start a daemon and wait until `status` shows every model READY: the wall
        clock from its launch to then, the rows, and the daemon's phases."""
        d = self.d
        stamped = len(self.stamps.read_text().splitlines()) if self.stamps.exists() else 0
        with open(d.output, "ab") as out:
            t0 = time.time()
            d.proc = subprocess.Popen(
                [sys.executable, str(self.wrapper), "up", "--foreground", "-f", str(d.manifest)],
                env=d.env,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        d.lineage.anchor(d.proc.pid)
        deadline = t0 + timeout
        while True:
            try:
                _, data = call(d.sock, "GET", "/v1/status", timeout=5)
            except Exception:
                data = None
            now = time.time()
            if data is not None:
                rows = {r["name"]: r for r in data["models"]}
                if len(rows) == self.n and all(r["state"] == "READY" for r in rows.values()):
                    break
            if d.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited {d.proc.returncode}: {d.log()[-2000:]}")
            if now > deadline:
                raise RuntimeError(f"not all READY within {timeout:g}s: {d.log()[-2000:]}")
            time.sleep(POLL)
        lines = wait_for(lambda: self.stamps.read_text().splitlines()[stamped:], 10)
        marks = {k: float(v) for k, v in json.loads(lines[0])}
        return now - t0, rows, phases(t0, now, marks)

    def warm_up(self, timeout: float) -> None:
        """One start and `down`, untimed: the bytecode of the daemon, its shims and
        the servers is cached from then on."""
        self.launch(timeout)
        self.end("down")

    def end(self, how: str) -> None:
        """End the daemon: `kill` (SIGKILL), `keep` (down --keep-models) or `down`."""
        d = self.d
        assert d.proc is not None
        if how == "kill":
            d.kill_daemon()
            return
        args = ["down", "--keep-models"] if how == "keep" else ["down"]
        r = d.cli(*args, "-f", str(d.manifest), timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"llmsup {' '.join(args)}: {r.stdout}{r.stderr}")
        d.proc.wait(60)


def servers(rows: dict[str, dict[str, Any]]) -> dict[str, tuple[int, float]]:
    """Each model's server: pid and start time."""
    return {name: (r["pid"], psutil.Process(r["pid"]).create_time()) for name, r in rows.items()}


def phases(t0: float, t_ready: float, m: dict[str, float]) -> dict[str, float]:
    """Seconds spent in each part of a start, from the stamps of one daemon (NaN
    where a mark is missing)."""

    def span(a: str, b: str) -> float:
        return m[b] - m[a] if a in m and b in m else math.nan

    return {
        "python_start": m["python_started"] - t0,
        "imports": span("python_started", "imported"),
        "cli_manifest_plan_gpucheck": span("imported", "run>"),
        "run_setup_lock_cgroups": span("run>", "restore>"),
        "restore": span("restore>", "restore<"),
        "restore_load_records": span("load_records>", "load_records<"),
        "restore_verify": span("load_records<", "stop_leftovers>"),
        "restore_verify_calls_sum": m.get("verify_sum_s", math.nan),
        "restore_stop_leftovers_scan": span("stop_leftovers>", "stop_leftovers<"),
        "take_up": span("take_up>", "take_up<"),
        "take_up_to_all_ready": span("take_up<", "all_ready"),
        "socket_answers": m["serve<"] - t0 if "serve<" in m else math.nan,
        "all_ready_in_daemon": m["all_ready"] - t0,
        "all_ready_seen_by_status": t_ready - t0,
        "daemon_cpu_to_all_ready": m.get("cpu_s_at_all_ready", math.nan),
    }


def median_phases(samples: list[dict[str, float]]) -> dict[str, float]:
    """Median milliseconds per phase (phases with a missing mark left out)."""
    keys = samples[0].keys() if samples else []
    return {
        k: round(statistics.median(s[k] for s in samples) * 1000, 1)
        for k in keys
        if not any(math.isnan(s[k]) for s in samples)
    }


def one_fleet(tmp: Path, n: int, runs: int) -> dict[str, Any]:
    """Per run: a cold up, a SIGKILL and an adoption, a `down --keep-models` and
    an adoption, a `down`."""
    b = Bench(tmp, n)
    cold: list[float] = []
    adopt: dict[str, list[float]] = {"after_sigkill": [], "after_down_keep_models": []}
    cold_phases: list[dict[str, float]] = []
    adopt_phases: list[dict[str, float]] = []
    timeout = 30 + n * 0.5
    try:
        b.warm_up(timeout)
        for run in range(runs):
            took, rows, ph = b.launch(timeout)
            cold.append(took)
            cold_phases.append(ph)
            before = servers(rows)
            log(f"{n} models, run {run + 1}: cold up {took:.2f}s")
            b.end("kill")
            for key, then in (("after_sigkill", "keep"), ("after_down_keep_models", "down")):
                took, rows, ph = b.launch(timeout)
                if (now := servers(rows)) != before:
                    moved = sorted(k for k in now if now[k] != before.get(k))
                    raise RuntimeError(f"{key}: not adopted (other servers): {moved}")
                adopt[key].append(took)
                adopt_phases.append(ph)
                log(f"  adopted {key.replace('_', ' ')}: {took:.3f}s")
                b.end(then)
    finally:
        b.d.stop()
    if b.d.leftovers:
        raise RuntimeError(f"left over after down: {b.d.leftovers}")
    every = adopt["after_sigkill"] + adopt["after_down_keep_models"]
    return {
        "models": n,
        "cold_up_to_all_ready": summary_ms(cold),
        "adoption_to_all_ready": summary_ms(every),
        "adoption_after_sigkill": summary_ms(adopt["after_sigkill"]),
        "adoption_after_down_keep_models": summary_ms(adopt["after_down_keep_models"]),
        "adoption_ratio_vs_cold_up": round(statistics.median(every) / statistics.median(cold), 3),
        "adoption_phases_median_ms": median_phases(adopt_phases),
        "cold_up_phases_median_ms": median_phases(cold_phases),
    }


def summary(res: dict[str, Any]) -> str:
    lines = [f"adoption benchmark ({res['machine']}, load {res['load_before']})"]
    for f in res["fleets"]:
        a, c = f["adoption_to_all_ready"], f["cold_up_to_all_ready"]
        lines.append(
            f"{f['models']:>4} models: adoption {a['median_ms']:.0f} ms (p90 {a['p90_ms']:.0f}), "
            f"cold up {c['median_ms']:.0f} ms (p90 {c['p90_ms']:.0f}), "
            f"ratio {f['adoption_ratio_vs_cold_up']}"
        )
        ph = f["adoption_phases_median_ms"]
        lines.append("      " + ", ".join(f"{k} {v}" for k, v in ph.items()))
    if (t := res.get("target")) is not None:
        lines.append(f"target under {TARGET_S:g} s at 32 models: {t}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default="32,100", help="fleet sizes, comma-separated")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS / "adoption.json")
    args = ap.parse_args()
    res: dict[str, Any] = {
        "machine": f"{platform.node()} {os.cpu_count()} cpus, {platform.python_version()}",
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "runs": args.runs,
        "servers": "command backend: a 10-line Python HTTP server (python -S, socket only)",
        "fleets": [],
    }
    for n in (int(x) for x in args.models.split(",")):
        with tempfile.TemporaryDirectory(prefix=f"llmsup-adoption-{n}-") as tmp:
            res["fleets"].append(one_fleet(Path(tmp), n, args.runs))
    res["load_after"] = [round(x, 2) for x in os.getloadavg()]
    at32 = [f for f in res["fleets"] if f["models"] == 32]
    if at32:
        median = at32[0]["adoption_to_all_ready"]["median_ms"] / 1000
        res["target"] = f"{'met' if median < TARGET_S else 'missed'} ({median:.3f} s median)"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(summary(res))


if __name__ == "__main__":
    main()
