"""Pure renderers: the data a command prints with `--json`, as the text it prints
without. No I/O, no daemon: each takes dicts and lists and returns lines."""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from typing import Any


def table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    """Columns padded to their widest cell; the last one as it comes."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1]
        for row in rows
    ]


def age(seconds: float | None) -> str:
    """`42s`, `17m`, `3h05m`; `-` for none."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def gpu_memory(held: Mapping[str, int] | None) -> str:
    """`0:71.2G 1:71.2G`, `-` when nothing is held, `n/a` without GPU information."""
    if held is None:
        return "n/a"
    if not held:
        return "-"
    return " ".join(f"{i}:{b / 2**30:.1f}G" for i, b in sorted(held.items()))


def size(n: int) -> str:
    """`512 B`, `3.0 KiB`, `1.5 MiB`, `2.0 GiB`."""
    value, unit = float(n), "B"
    for bigger in ("KiB", "MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


def log_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """A warning per server whose log drops its output now (a full disk), a note per
    server whose log lacks some; one line per server, not per model it serves."""
    out, seen = [], set()
    for r in rows:
        unit, dropped = r.get("unit", r["name"]), r.get("log_dropped_bytes") or 0
        if unit in seen or not (dropped or r.get("log_warning")):
            continue
        seen.add(unit)
        if r.get("log_warning"):
            out.append(f"warning: {unit}: {r['log_warning']} ({size(dropped)} dropped so far)")
        else:
            out.append(f"note: {unit}: {size(dropped)} of output could not be written to its log")
    return out


def gateway_line(info: Mapping[str, Any] | None) -> str | None:
    """`gateway: http://127.0.0.1:9000/v1 (listening on 0.0.0.0:9000), API key required`"""
    if info is None:
        return None
    where = f"{info['host']}:{info['port']}"
    if not info["listening"]:
        return f"gateway: not listening on {where}"
    keys = (
        "API key required" if info["keys_required"] else "no API key: open to anyone who reaches it"
    )
    return f"gateway: {info['url']} (listening on {where}), {keys}"


def _detail(r: Mapping[str, Any]) -> str:
    if r["state"] == "FAILED":  # why, not the last load step it reached
        detail: str = r["reason"] or r["detail"]
    else:
        detail = r["progress"] or r["detail"]
    if r["last_exit"] and r["state"] != "FAILED":
        detail = f"{detail} (last: {r['last_exit']})" if detail else f"last: {r['last_exit']}"
    return detail


STATUS_HEAD = (
    "NAME", "BACKEND", "STATE", "PID", "PORT", "UPTIME", "RESTARTS", "HEALTH", "GPU MEM", "DETAIL",
)  # fmt: skip


def upstreams(r: Mapping[str, Any]) -> list[str]:
    """A remote model's upstreams, a line each: URL, state, for how long, latency of
    its last probe, and its last error (with its age, once it is up again)."""
    cells: list[tuple[str, ...]] = []
    for u in r["upstreams"]:
        up = u["state"] == "up" and u["latency_ms"] is not None
        latency = f"{u['latency_ms']:.0f}ms" if up else "-"
        error = u["error"]
        if error and u["state"] == "up" and u["error_age_s"] is not None:
            error = f"last error {age(u['error_age_s'])} ago: {error}"
        cells.append((f"  {u['url']}", u["state"], age(u["for_s"]), latency, error))
    return [line.rstrip() for line in table(cells)] if cells else []


def _remote_cells(r: Mapping[str, Any]) -> tuple[str, ...]:
    latencies = [u["latency_ms"] for u in r["upstreams"] if u["state"] == "up" and u["latency_ms"]]
    health = f"{min(latencies):.0f}ms" if latencies else "-"
    detail = r["detail"] if r["state"] == "READY" else r["reason"] or r["detail"]
    return (r["name"], r["backend"], r["state"], "-", "-", "-", "-", health, "-", detail)


def status(data: Mapping[str, Any]) -> list[str]:
    """`llmsup status`: a row per model of `data["models"]` and `data["remotes"]` (each
    remote model's upstreams below the table), a note when GPUs were seen and are no
    longer, a warning when a log drops output, the gateway's address, and a FAILED
    model's last log lines."""
    rows = data["models"]
    remotes = data.get("remotes") or []
    cells: list[tuple[str, ...]] = [STATUS_HEAD]
    for r in rows:
        health = "-" if r["health_latency_ms"] is None else f"{r['health_latency_ms']:.0f}ms"
        cells.append(
            (
                r["name"],
                r["backend"],
                r["state"],
                str(r["pid"] or "-"),
                str(r["port"]),
                age(r["uptime"]),
                str(r["restarts"]),
                health,
                gpu_memory(r.get("gpu_memory")),
                _detail(r),
            )
        )
    cells += [_remote_cells(r) for r in remotes]
    out = table(cells)
    for r in remotes:
        out += [f"{r['name']}: upstreams", *upstreams(r)]
    if data.get("gpu_note") and any(r.get("gpu_memory") is not None for r in rows):
        out.append(f"note: {data['gpu_note']}")
    out += log_lines(rows)
    if line := gateway_line(data.get("gateway")):
        out.append(line)
    for r in rows:
        if r["state"] == "FAILED" and r["tail"]:
            out.append(f"\n{r['name']}: last log lines:")
            out += [f"  {line}" for line in r["tail"][-10:]]
    return out


BUSY = frozenset({"WAITING", "WAITING_GPU", "STARTING", "LOADING", "BACKOFF"})


def settled(states: Mapping[str, str], elapsed: float) -> str | None:
    """`2 ready, 1 failed, after 3.1s; supervising (Ctrl-C stops all)` once no server
    (of `states`, unit -> state) is on its way up; None until then."""
    if not states or BUSY & set(states.values()):
        return None
    ready = sum(v == "READY" for v in states.values())
    failed = sum(v == "FAILED" for v in states.values())
    # With nothing launched the daemon says why and exits: no "supervising".
    going = "; supervising (Ctrl-C stops all)" if failed < len(states) else ""
    return f"{ready} ready, {failed} failed, after {elapsed:.1f}s{going}"


def leftovers(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """What a daemon that is gone left: per launch, its processes still alive."""
    cells: list[tuple[str, ...]] = [("UNIT", "PID", "STATE", "ALIVE", "COMMAND")]
    for r in rows:
        alive = " ".join(map(str, r["alive"])) or "none"
        state = "unsupervised" if r["alive"] else "gone"
        cells.append((r["unit"], str(r["pid"]), state, alive, shlex.join(r["argv"])[:100]))
    return table(cells)


def reload(result: Mapping[str, Sequence[str]]) -> list[str]:
    """What a reload did: `added: a, b`, `restarted: c`..."""
    keys = ("added", "removed", "restarted", "unchanged")
    return [f"{key}: {', '.join(result[key])}" for key in keys if result.get(key)]


def plan(entries: Sequence[Mapping[str, Any]], vllm_flags: tuple[str, str] | None) -> list[str]:
    """`llmsup plan`: per entry its environment and command line, in launch order;
    `vllm_flags` (version, why) says what vLLM's flags were checked against."""
    out: list[str] = []
    if vllm_flags is not None and any(e["backend"] == "vllm" for e in entries):
        out.append(f"# vLLM flags checked against {vllm_flags[0]}'s: {vllm_flags[1]}\n")
    shown: set[str] = set()
    for i, e in enumerate(entries, 1):
        if e["backend"] == "remote":
            h = e["health"]
            key = ", with its api_key" if e["api_key"] else ""
            out.append(f"# {i}. {e['name']} (remote): no process here; the gateway routes to")
            out += [f"#   {url}" for url in e["urls"]]
            out.append(
                f"#   as {', '.join(e['served_names'])}{key}, each probed with GET /v1/models "
                f"every {h['interval']:g}s\n"
            )
            continue
        if e["unit"] in shown:
            out.append(f"# {i}. {e['name']} ({e['backend']}): served by {e['unit']}'s server\n")
            continue
        shown.add(e["unit"])
        after = f", after {', '.join(e['after'])} is ready" if e["after"] else ""
        if e.get("swapped_with"):
            after += f", swapped with {', '.join(e['swapped_with'])} (never together)"
        out.append(f"# {i}. {e['name']} ({e['backend']}) on {e['host']}:{e['port']}{after}")
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in e["env"].items())
        cmd = shlex.join(e["argv"])
        out.append(f"{env} \\\n  {cmd}" if env else cmd)
        out += [f"#   then {step}" for step in e["steps"]]
        out.append("")
    return out


def gpus(data: Mapping[str, Any]) -> list[str]:
    """`llmsup gpus`: each GPU and, below it, its processes; then the notes."""
    from llmsup.gpu import fmt_bytes

    out = []
    for g in data["gpus"]:
        util = "-" if g["utilization"] is None else f"{g['utilization']}%"
        temp = "-" if g["temperature"] is None else f"{g['temperature']}C"
        out.append(
            f"GPU {g['index']}  {g['name']}  {fmt_bytes(g['memory_used'])} / "
            f"{fmt_bytes(g['memory_total'])} used, {fmt_bytes(g['memory_free'])} free  "
            f"util {util}  {temp}  {g['uuid']}"
        )
        for row in [x for x in data["processes"] if x["gpu"] == g["index"]]:
            held = row["used_memory"]
            amount = "?" if held is None else fmt_bytes(held)
            who = f"{row['user']}: {row['command']}" if row["user"] else "not visible to this user"
            out.append(f"    pid {row['pid']:<8} {amount:>10}  {row['owner']:<24} {who[:90]}")
    out += [f"note: {n}" for n in data["notes"]]
    return out
