"""The manifest against the real GPUs: do they exist, will the weights fit, is
there free memory for a start, and who holds it when there is not.

Pure functions over a `gpu.Snapshot`, except where noted (reading model
directories for the fit estimate, reading a process's marker to label it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil

from llmsup import fit, gpu
from llmsup.backends import REGISTRY, Launch
from llmsup.backends.vllm import DEFAULT_GPU_MEMORY_UTILIZATION, VllmModel, tensor_parallel
from llmsup.errors import Problem
from llmsup.manifest import LoadedManifest
from llmsup.process import MARKER


def gpu_problems(loaded: LoadedManifest, snapshot: gpu.Snapshot) -> list[Problem]:
    """Every model's `gpus` exist on this host; the weights fit (reads model dirs)."""
    out: list[Problem] = []
    for name, spec in loaded.manifest.models.items():
        found, errors = gpu.resolve(spec.gpus, snapshot)
        own: set[str] = set()
        for i, ref in enumerate(spec.gpus):  # located at the entry that is wrong
            for e in gpu.resolve([ref], snapshot)[1]:
                own.add(e)
                out.append(loaded.problem(("models", name, "gpus", i), e))
        for e in errors:
            if e not in own:  # about the list as a whole (one GPU named twice)
                out.append(loaded.problem(("models", name, "gpus"), e))
        if isinstance(spec, VllmModel) and not errors:
            out += _fit(loaded, name, spec, found or list(snapshot.gpus[:1]))
    return out


def _local_dir(model: str) -> Path | None:
    """A local model directory: the path itself, or a hub id in the Hugging Face cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if model.count("/") != 1 or model.startswith(("/", ".")):
        return None
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    snapshots = hf_home / "hub" / f"models--{model.replace('/', '--')}" / "snapshots"
    candidates = (
        sorted(snapshots.glob("*"), key=lambda p: p.stat().st_mtime) if snapshots.is_dir() else []
    )
    return candidates[-1] if candidates else None


def _fit(loaded: LoadedManifest, name: str, m: VllmModel, gpus: list[gpu.Gpu]) -> list[Problem]:
    at = ("models", name, "model")
    directory = _local_dir(m.model)
    if directory is None:
        msg = f"memory fit not estimated: {m.model} is not a local directory or in the HF cache"
        return [loaded.problem(at, msg, "note")]
    try:
        est = fit.estimate(
            directory,
            tp=tensor_parallel(m),
            pp=m.pipeline_parallel_size or 1,
            max_model_len=m.max_model_len if m.max_model_len and m.max_model_len > 0 else None,
            kv_cache_dtype=m.kv_cache_dtype,
            dtype=m.dtype,
        )
    except fit.FitError as e:
        return [loaded.problem(at, f"memory fit not estimated: {e}", "warning")]
    if est is None or not gpus:
        return []
    total = min(g.memory_total for g in gpus)
    util = m.gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION
    return [
        loaded.problem(("models", name, "gpu_memory_utilization"), msg, severity)
        for severity, msg in fit.check_fit(est, total, util, est.max_model_len)
    ]


# ------------------------------------------------------------- before a start


@dataclass(frozen=True)
class Need:
    gpu: gpu.Gpu
    bytes: int


def needs(loaded: LoadedManifest, launch: Launch, snapshot: gpu.Snapshot) -> list[Need]:
    """What a server will ask of each of its GPUs, as its backend claims: a share of
    each (vLLM's utilization x total), or bytes free on the first (Ollama's
    `gpu_memory`, summed over the models it serves); nothing known for `command`."""
    backend = REGISTRY[launch.backend]
    claims = [backend.gpu_claim(loaded.manifest.models[n]) for n in launch.models]
    found, _ = gpu.resolve(list(claims[0].gpus), snapshot)
    share = claims[0].share
    if share is not None:
        return [Need(g, int(share * g.memory_total)) for g in found]
    want = sum(c.free for c in claims)
    return [Need(g, want) for g in found[:1]] if want else []


def short(needs_: list[Need], snapshot: gpu.Snapshot) -> list[tuple[Need, int]]:
    """The needs that the GPUs' free memory cannot meet now, with the free bytes."""
    out = []
    for n in needs_:
        now = snapshot.gpu(n.gpu.uuid)
        free = now.memory_free if now is not None else 0
        if free < n.bytes:
            out.append((n, free))
    return out


def marker_of(pid: int) -> str | None:
    """The llmsup instance a process belongs to (effect: reads its environment)."""
    try:
        return psutil.Process(pid).environ().get(MARKER)
    except (psutil.Error, OSError):
        return None


def with_descendants(owners: Mapping[int, str]) -> dict[int, str]:
    """pid -> unit, extended to every live descendant of those pids (effect: one
    scan of the process table)."""
    children: dict[int, list[int]] = {}
    for p in psutil.process_iter(["ppid"]):
        children.setdefault(p.info["ppid"] or 0, []).append(p.pid)
    out = dict(owners)
    todo = list(owners)
    while todo:
        pid = todo.pop()
        for c in children.get(pid, []):
            if c not in out:
                out[c] = out[pid]
                todo.append(c)
    return out


def recorded(state_dir: Path) -> dict[int, str]:
    """pid -> unit for the live processes that the records in `state_dir` name:
    what a daemon that is gone left behind (effect: reads processes)."""
    from llmsup.process import load_records, members

    return {p.pid: rec.unit for rec in load_records(state_dir) for p in members(rec)}


def label(
    pid: int,
    marker: str | None,
    current: Mapping[str, str],
    owners: Mapping[int, str] | None = None,
    orphans: Mapping[int, str] | None = None,
) -> str:
    """`model qwen`, `orphan of qwen`, or `foreign`. `current`: instance -> model;
    `owners`: pid -> model for the processes of running servers, `orphans`: pid ->
    model for those a dead daemon's records name (by tree, cgroup and records: vLLM's
    EngineCore and workers blank the environment that holds the marker)."""
    if owners and pid in owners:
        return f"model {owners[pid]}"
    if marker is None and orphans and pid in orphans:
        return f"orphan of {orphans[pid]}"
    if marker is None:
        return "foreign"
    if marker in current:
        return f"model {current[marker]}"
    unit = marker.split(":")[1] if marker.count(":") >= 2 else marker
    return f"orphan of {unit}"


def who_holds(
    snapshot: gpu.Snapshot,
    uuid: str,
    current: Mapping[str, str],
    owners: Mapping[int, str] | None = None,
) -> list[str]:
    """One line per process on a GPU, labelled (effect: reads processes)."""
    lines = []
    for p in gpu.holders(snapshot, uuid):
        tag = label(p.pid, marker_of(p.pid), current, owners)
        lines.append(f"{gpu.describe_holder(p, gpu.process_info(p.pid))} [{tag}]")
    return lines


def waiting_message(
    shortfalls: list[tuple[Need, int]],
    snapshot: gpu.Snapshot,
    current: Mapping[str, str],
    owners: Mapping[int, str] | None = None,
) -> str:
    parts = []
    for need, free in shortfalls:
        held = who_holds(snapshot, need.gpu.uuid, current, owners)
        holders = "; ".join(held) if held else "no process listed (memory not released yet)"
        parts.append(
            f"GPU {need.gpu.index} has {gpu.fmt_bytes(free)} free, needs "
            f"{gpu.fmt_bytes(need.bytes)}: {holders}"
        )
    return " | ".join(parts)


def check_host(loaded: LoadedManifest) -> tuple[list[Problem], str | None]:
    """`gpu_problems` against this host's GPUs (effect: asks the driver).

    Returns the problems and, when there is no GPU to check against, a note.
    """
    try:
        snapshot = gpu.NvmlSource().snapshot()
    except gpu.GpuUnavailable as e:
        return [], f"GPU checks skipped: {e}"
    return gpu_problems(loaded, snapshot), None
