"""`llmsup export kubernetes`: a manifest as Kubernetes objects. Pure.

`export()` picks the models to export and plans them twice: as the manifest says
(every check of `llmsup check`, a model allowed across nodes), and as pods run them
(host 0.0.0.0; with `always_on`, on-demand models always on). What Kubernetes cannot
express is refused, each problem located in the file; `render()` turns the pods'
plan into files: one per server, the gateway's, the model cache's claim, and a
`kustomization.yaml` listing them, for `kubectl apply -k`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from llmsup.backends.vllm import VllmModel
from llmsup.backends.vllm_flags import FlagTable
from llmsup.errors import ManifestError, Problem, UnknownModel
from llmsup.export import gateway, refusals
from llmsup.export.images import LLMSUP_IMAGE, image_for, vllm_table
from llmsup.export.names import k8s_name
from llmsup.export.secrets import Secrets
from llmsup.export.workloads import (
    CACHE,
    CLAIM,
    Cluster,
    Obj,
    Server,
    metadata,
    nodes_of,
    server_objects,
)
from llmsup.manifest import LoadedManifest
from llmsup.plan import Plan, gpu_claim, make_plan, served_names_of

DEFAULT_PVC_SIZE = "500Gi"
KUSTOMIZATION = "kustomization.yaml"


@dataclass(frozen=True)
class Options:
    namespace: str | None = None
    # `vllm`, `ollama`, `llmsup` (the gateway), or a server's name -> its image
    images: Mapping[str, str] = field(default_factory=dict)
    models_pvc: str | None = None  # a claim the user made; else one is written
    pvc_size: str = DEFAULT_PVC_SIZE
    always_on: bool = False  # on-demand models run always


@dataclass(frozen=True)
class Export:
    files: dict[str, list[Obj]]  # file name -> its objects; KUSTOMIZATION lists the others
    notes: list[str]
    problems: list[Problem]  # warnings, and notes on fields a host's daemon alone reads
    secret_command: str | None  # creates the Secret the objects read (placeholders)
    vllm_flags: FlagTable


def export(loaded: LoadedManifest, names: Sequence[str], options: Options) -> Export:
    """The objects of `names` (every model when empty); ManifestError with every
    problem when the manifest is invalid or asks what Kubernetes cannot do."""
    chosen, notes = select(loaded, names)
    flags = vllm_table(options.images.get("vllm"))
    checked = make_plan(chosen, flags, one_host=False)
    images = {
        la.unit: image_for(options.images, la.models, la.backend, flags.version)
        for la in checked.launches
    }
    problems = [
        *checked.problems,
        *refusals.refusals(chosen, checked, always_on=options.always_on),
        *refusals.command_problems(chosen, checked, images),
    ]
    if any(p.severity == "error" for p in problems):
        raise ManifestError(sorted(problems, key=lambda p: (p.line, p.column)))
    # Only the launches of this plan count: its checks would judge a host (ports
    # on 0.0.0.0, GPU shares of always-on models) and were made on `checked`.
    pods = make_plan(in_pods(chosen, always_on=options.always_on), flags, one_host=False)
    files, secrets = render(chosen, pods, options)
    notes += _notes(chosen, pods, options, flags)
    problems += refusals.host_notes(chosen)
    return Export(files, notes, problems, secrets.command(options.namespace), flags)


def select(loaded: LoadedManifest, names: Sequence[str]) -> tuple[LoadedManifest, list[str]]:
    """The manifest with only `names` (all when empty); the gateway's aliases to
    models left out are dropped, with a note."""
    m = loaded.manifest
    if not names:
        return loaded, []
    unknown = [n for n in names if n not in m.models]
    if unknown:
        known = ", ".join(m.models)
        raise UnknownModel(f"no model named {', '.join(unknown)} (known: {known})")
    models = {n: spec for n, spec in m.models.items() if n in names}
    notes = []
    gw = m.gateway
    if gw is not None:
        served = {s for n, spec in models.items() for s in served_names_of(n, spec)}
        kept = {a: t for a, t in gw.aliases.items() if t in served}
        if kept != gw.aliases:
            for alias in gw.aliases.keys() - kept.keys():
                notes.append(f"gateway alias {alias!r} dropped: its model is not exported")
            gw = gw.model_copy(update={"aliases": kept})
    manifest = m.model_copy(update={"models": models, "gateway": gw})
    return LoadedManifest(manifest, loaded.source, loaded.path), sorted(notes)


def in_pods(loaded: LoadedManifest, *, always_on: bool) -> LoadedManifest:
    """The manifest as pods run it: every server listens on 0.0.0.0; with
    `always_on`, on-demand models start always (no idle stop, no swaps)."""
    m = loaded.manifest
    models = {}
    for name, spec in m.models.items():
        update: dict[str, object] = {"host": None}
        if always_on and spec.start == "on_demand":
            update.update(start="always", idle_timeout=None, exclusive=None)
        models[name] = spec.model_copy(update=update)
    defaults = m.defaults.model_copy(update={"host": "0.0.0.0"})
    manifest = m.model_copy(update={"models": models, "defaults": defaults})
    return LoadedManifest(manifest, loaded.source, loaded.path)


def render(
    loaded: LoadedManifest, plan: Plan, options: Options
) -> tuple[dict[str, list[Obj]], Secrets]:
    """File name -> objects, for the pods' `plan` of `loaded`; and the Secret's keys."""
    secrets = Secrets(plan.launches, loaded.manifest.gateway, plan.remotes)
    cluster = Cluster(options.namespace, options.models_pvc or CLAIM, secrets)
    files: dict[str, list[Obj]] = {}
    if options.models_pvc is None:
        files[f"{CLAIM}.yaml"] = [claim(cluster, options.pvc_size)]
    version = plan.vllm_flags.version if plan.vllm_flags else vllm_table(None).version
    for la in plan.launches:
        image = image_for(options.images, la.models, la.backend, version)
        assert image is not None  # refused before: a command server without one
        files[f"{k8s_name(la.unit)}.yaml"] = server_objects(
            server(loaded, plan, la.unit, image), cluster
        )
    image = options.images.get("llmsup", LLMSUP_IMAGE)
    if objs := gateway.gateway_objects(loaded, plan, image, cluster):
        files[f"{gateway.NAME}.yaml"] = objs
    files[KUSTOMIZATION] = [kustomization(list(files), options.namespace)]
    return files, secrets


def server(loaded: LoadedManifest, plan: Plan, unit: str, image: str) -> Server:
    m = loaded.manifest
    launch = plan.unit_of(unit)
    assert launch is not None
    spec = m.models[unit]
    return Server(
        launch=launch,
        image=image,
        health=m.health(unit),
        stop_timeout=m.stop_timeout(unit),
        gpus=len(gpu_claim(loaded, unit).gpus),
        nodes=nodes_of(spec),
    )


def claim(cluster: Cluster, size: str) -> Obj:
    """The model cache every server's pod mounts: one claim, many nodes."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata(cluster.claim, "cache", cluster),
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": size}}},
    }


def kustomization(resources: list[str], namespace: str | None) -> Obj:
    out: Obj = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization"}
    if namespace:
        out["namespace"] = namespace
    out["resources"] = resources
    return out


def _notes(loaded: LoadedManifest, plan: Plan, options: Options, flags: FlagTable) -> list[str]:
    m = loaded.manifest
    out = []
    picked = [f"{la.unit} {len(la.gpus)}" for la in plan.launches if la.gpus]
    if picked:
        out.append(
            "GPU indices are not exported: the scheduler picks each pod's GPUs, as many as "
            f"its gpus lists (nvidia.com/gpu: {', '.join(picked)})"
        )
    for la in plan.launches:
        if not gpu_claim(loaded, la.unit).gpus:
            out.append(f"{la.unit} asks for no GPU: its pod runs it on the CPU (list gpus to ask)")
        spec = m.models[la.unit]
        if isinstance(spec, VllmModel) and spec.model.startswith(("/", ".")):
            out.append(
                f"{la.unit} loads {spec.model}: its pod must find that path (the model "
                f"cache is mounted at {CACHE})"
            )
    if options.always_on:
        for name, spec in m.models.items():
            if spec.start == "on_demand":
                dropped = [f for f in ("idle_timeout", "exclusive") if getattr(spec, f)]
                but = f", without its {' and '.join(dropped)}" if dropped else ""
                out.append(f"{name} is on_demand: exported always on (--always-on){but}")
    gw = m.gateway
    if gw is not None and not (gw.api_keys or gw.api_key_file):
        out.append(
            "the gateway has no api_keys: whatever reaches its Service in the cluster can "
            "use every model (add api_keys, or restrict it with a NetworkPolicy)"
        )
    if options.models_pvc is None:
        out.append(
            f"{CLAIM}.yaml claims {options.pvc_size} ReadWriteMany for the model cache: the "
            "default storage class must offer ReadWriteMany (or pass --models-pvc NAME)"
        )
    if not flags.exact:
        out.append(f"vLLM flags: {flags.why}")
    return out
