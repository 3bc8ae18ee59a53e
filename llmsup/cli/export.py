"""`llmsup export kubernetes`: the manifest as Kubernetes objects in a directory."""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from llmsup.cli.common import manifest_option
from llmsup.errors import ManifestError, Problem

if TYPE_CHECKING:
    from llmsup.manifest import LoadedManifest


@click.group()
def export() -> None:
    """Write the manifest as another system's configuration."""


def _images(values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for value in values:
        name, eq, image = value.partition("=")
        if not eq or not name or not image:
            raise click.BadParameter(f"{value!r} is not NAME=IMAGE", param_hint="--image")
        out[name] = image
    return out


@export.command()
@manifest_option
@click.option(
    "-o",
    "--output",
    "out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write the files to (made if missing).",
)
@click.option("-n", "--namespace", default=None, help="Namespace of every object.")
@click.option(
    "--image",
    "images",
    multiple=True,
    metavar="NAME=IMAGE",
    help="Image of vllm, ollama, llmsup (the gateway), or of one model (a command model "
    "needs one). Repeatable.",
)
@click.option("--models-pvc", default=None, help="Mount this existing claim as the model cache.")
@click.option(
    "--pvc-size",
    default=None,
    help="Size of the model cache's claim written with the objects (default 500Gi).",
)
@click.option(
    "--always-on", is_flag=True, help="Export on-demand models as always-on ones (a note says so)."
)
@click.argument("names", nargs=-1, metavar="[MODEL]...")
def kubernetes(
    manifest_file: Path | None,
    out: Path,
    namespace: str | None,
    images: tuple[str, ...],
    models_pvc: str | None,
    pvc_size: str | None,
    always_on: bool,
    names: tuple[str, ...],
) -> None:
    """Write a Deployment (a LeaderWorkerSet across nodes) and a Service per server,
    the gateway's, and a kustomization.yaml, for `kubectl apply -k DIR`; exit 2 with
    file:line:col errors for what Kubernetes cannot express."""
    from llmsup.export import kubernetes as k8s
    from llmsup.export import names as k8s_names
    from llmsup.export import write
    from llmsup.export.images import KINDS
    from llmsup.manifest import default_manifest_path

    if models_pvc is not None and pvc_size is not None:
        raise click.UsageError("--models-pvc and --pvc-size exclude each other")
    if namespace is not None and not k8s_names.is_namespace(namespace):
        raise click.BadParameter(
            f"{namespace!r} is no namespace name (lower-case letters, digits, '-')",
            param_hint="--namespace",
        )
    if models_pvc is not None and not k8s_names.is_subdomain(models_pvc):
        raise click.BadParameter(
            f"{models_pvc!r} is no claim name (lower-case letters, digits, '-', '.')",
            param_hint="--models-pvc",
        )
    if pvc_size is not None and not k8s_names.is_quantity(pvc_size):
        raise click.BadParameter(
            f"{pvc_size!r} is no Kubernetes quantity (e.g. 500Gi, 2Ti)", param_hint="--pvc-size"
        )
    loaded, unset = _load(manifest_file or default_manifest_path())
    chosen = _images(images)
    allowed = [*KINDS, *loaded.manifest.models]
    unknown = [n for n in chosen if n not in allowed]
    if unknown:
        raise click.BadParameter(
            f"no model or image kind named {', '.join(unknown)} (one of: {', '.join(allowed)})",
            param_hint="--image",
        )
    options = k8s.Options(
        namespace=namespace,
        images=chosen,
        models_pvc=models_pvc,
        pvc_size=pvc_size or k8s.DEFAULT_PVC_SIZE,
        always_on=always_on,
    )
    result = k8s.export(loaded, names, options)
    _check_unset(loaded, unset, result.files)
    for p in result.problems:
        click.echo(str(p), err=True)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    written = write.write(out, result.files, loaded.path.name)
    click.echo(f"wrote {len(written)} files to {out}: {', '.join(p.name for p in written)}")
    if result.secret_command:
        click.echo("Create the Secret the pods read (your values in place of each <...>):")
        click.echo(f"  {result.secret_command}")
    click.echo(f"Then: kubectl apply -k {shlex.quote(str(out))}")


_UNSET = re.compile(r"environment variable (\w+) is not set")


def _load(path: Path) -> tuple[LoadedManifest, dict[str, tuple[str, list[Problem]]]]:
    """The manifest, and its variables that are not set here: exporting needs no
    secret's value (the pods read the Secret), so each stands for a token, and
    `_check_unset` refuses one that reaches an object (not a secret, then)."""
    from llmsup.manifest import load_manifest

    try:
        return load_manifest(path), {}
    except ManifestError as e:
        found = [(m[1], p) for p in e.problems if (m := _UNSET.search(p.message))]
        if not found or len(found) != len(e.problems):
            raise
    unset: dict[str, tuple[str, list[Problem]]] = {}
    for name, problem in found:
        token = unset.get(name, (f"llmsup-unset-{name}-{secrets.token_hex(6)}", []))
        token[1].append(problem)
        unset[name] = token
    env = {**os.environ, **{name: token for name, (token, _) in unset.items()}}
    return load_manifest(path, env), unset


def _check_unset(
    loaded: LoadedManifest,
    unset: dict[str, tuple[str, list[Problem]]],
    files: Mapping[str, list[Any]],
) -> None:
    """ManifestError for each unset variable whose value an object would carry."""
    if not unset:
        return
    text = json.dumps(files, default=str)
    leaked = [p for token, problems in unset.values() if token in text for p in problems]
    if leaked:
        raise ManifestError(leaked)
    for name in unset:
        click.echo(f"note: {name} is not set here: the pods read it from the Secret", err=True)
