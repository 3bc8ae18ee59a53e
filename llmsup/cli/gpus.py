"""`llmsup gpus`: each GPU, its memory, and who holds it."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import click

from llmsup.cli import render
from llmsup.cli.common import manifest_option, target
from llmsup.errors import LlmsupError


@click.command()
@manifest_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def gpus(manifest_file: Path | None, as_json: bool) -> None:
    """Each GPU, its memory, and its processes: which model, an orphan, or foreign."""
    from llmsup import gpu, gpucheck
    from llmsup.client import call

    try:
        snap = gpu.NvmlSource().snapshot()
    except gpu.GpuUnavailable as e:
        if as_json:
            click.echo(json.dumps({"gpus": [], "processes": [], "note": str(e)}, indent=2))
        else:
            click.echo(f"no GPU information: {e}")
        return
    current: dict[str, str] = {}
    owners: dict[int, str] = {}
    orphans: dict[int, str] = {}
    daemon_note = ""
    try:
        _, data = call(target(manifest_file).state.socket, "GET", "/v1/status", timeout=5.0)
        current = {r["instance"]: r["unit"] for r in data["models"] if r.get("instance")}
        owners = {pid: r["unit"] for r in data["models"] for pid in r.get("pids", [])}
        owners = gpucheck.with_descendants(owners)
    except LlmsupError:
        if snap.processes:
            daemon_note = "no llmsup daemon answers: llmsup's processes show as orphans"
            with contextlib.suppress(LlmsupError, OSError):
                orphans = gpucheck.recorded(target(manifest_file).state.path)
    procs: list[dict[str, Any]] = []
    for p in snap.processes:
        info = gpu.process_info(p.pid)
        procs.append(
            {
                "gpu": p.gpu_index,
                "pid": p.pid,
                "used_memory": p.used_memory,
                "owner": gpucheck.label(p.pid, gpucheck.marker_of(p.pid), current, owners, orphans),
                "user": info[0] if info else None,
                "command": info[1] if info else None,
            }
        )
    out = {
        "gpus": [g.__dict__ for g in snap.gpus],
        "processes": procs,
        "notes": [*snap.notes, *([daemon_note] if daemon_note else [])],
    }
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    for line in render.gpus(out):
        click.echo(line)
