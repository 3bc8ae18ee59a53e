"""What Kubernetes cannot express, and how every manifest field reaches it.

`FIELDS` says, for each field of the manifest, whether it maps into the objects,
is refused when set to what Kubernetes cannot do (a located error), or belongs to
a host's daemon alone (said in a note when set); a test keeps it complete.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

from pydantic import BaseModel

from llmsup.backends.remote import RemoteModel
from llmsup.backends.vllm import VllmModel
from llmsup.errors import Problem
from llmsup.export.gateway import NAME as GATEWAY
from llmsup.export.names import k8s_name, service_name
from llmsup.export.workloads import CLAIM, MULTI_NODE_FLAGS, nodes_of
from llmsup.fields import ModelBase
from llmsup.manifest import LoadedManifest, Manifest
from llmsup.plan import Plan
from llmsup.yamlsrc import KeyPath

How = Literal["maps", "refused", "host"]

_BACKOFF = "the kubelet's own restart backoff (10s doubling to 5m, never given up)"
FIELDS: dict[str, tuple[How, str]] = {
    "version": ("maps", "checked"),
    "state_dir": ("host", "a cluster keeps no daemon state"),
    "control.group": ("host", "no control socket in a cluster: use kubectl"),
    "defaults.host": ("maps", "0.0.0.0 in a pod"),
    "defaults.stop_timeout": ("maps", "terminationGracePeriodSeconds"),
    "defaults.log.max_size": ("host", "the kubelet rotates container logs"),
    "defaults.log.backups": ("host", "the kubelet rotates container logs"),
    "gateway.host": ("maps", "0.0.0.0 in the gateway's pod"),
    "gateway.port": ("maps", "the gateway's containerPort and Service"),
    "gateway.api_keys": ("maps", "the Secret, a file in the gateway's pod"),
    "gateway.api_key_file": ("maps", "the Secret, a file in the gateway's pod"),
    "gateway.aliases": ("maps", "the gateway's manifest"),
    "gateway.max_body": ("maps", "the gateway's manifest"),
    "gateway.start_wait": ("maps", "the gateway's manifest"),
    "gateway.max_connections": ("maps", "the gateway's manifest"),
    "gateway.header_timeout": ("maps", "the gateway's manifest"),
    "gateway.body_timeout": ("maps", "the gateway's manifest"),
    "gateway.keepalive_timeout": ("maps", "the gateway's manifest"),
    "health.interval": ("maps", "periodSeconds of the probes"),
    "health.timeout": ("maps", "timeoutSeconds of the probes"),
    "health.failures": ("maps", "failureThreshold of the liveness and readiness probes"),
    "health.startup_timeout": ("maps", "the startup probe's failureThreshold x periodSeconds"),
    "health.deep_probe": ("refused", "a probe cannot send a completion"),
    "health.deep_interval": ("host", "used by deep_probe alone"),
    "health.gpu_wait": ("host", "the scheduler waits for free GPUs"),
    "restart.policy": ("refused", "never: a Deployment always restarts its pods"),
    "restart.backoff_initial": ("host", _BACKOFF),
    "restart.backoff_max": ("host", _BACKOFF),
    "restart.max_restarts": ("host", _BACKOFF),
    "restart.window": ("host", _BACKOFF),
    "model.backend": ("maps", "the image and the objects"),
    "model.gpus": ("maps", "their number as nvidia.com/gpu; two servers sharing one: refused"),
    "model.host": ("maps", "0.0.0.0 in a pod"),
    "model.env": ("maps", "env; secret-like names from the Secret"),
    "model.stop_timeout": ("maps", "terminationGracePeriodSeconds"),
    "model.start": ("refused", "on_demand, unless --always-on"),
    "model.idle_timeout": ("refused", "unless --always-on"),
    "model.exclusive": ("refused", "unless --always-on"),
    "vllm.model": ("maps", "the command line"),
    "vllm.served_name": ("maps", "the command line; the gateway's routes"),
    "vllm.port": ("maps", "the command line, containerPort, Service"),
    "vllm.tensor_parallel_size": ("maps", "the command line; /dev/shm above one GPU"),
    "vllm.pipeline_parallel_size": ("maps", "the command line"),
    "vllm.nodes": ("maps", "a LeaderWorkerSet of that size"),
    "vllm.gpu_memory_utilization": ("maps", "the command line"),
    "vllm.max_model_len": ("maps", "the command line"),
    "vllm.kv_cache_dtype": ("maps", "the command line"),
    "vllm.dtype": ("maps", "the command line"),
    "vllm.quantization": ("maps", "the command line"),
    "vllm.trust_remote_code": ("maps", "the command line"),
    "vllm.tool_call_parser": ("maps", "the command line"),
    "vllm.api_key": ("maps", "VLLM_API_KEY from the Secret"),
    "vllm.api_key_file": ("maps", "VLLM_API_KEY from the Secret"),
    "vllm.source": ("maps", "the environment"),
    "vllm.extra_args": ("maps", "the command line"),
    "ollama.model": ("maps", "pulled and preloaded as the container starts"),
    "ollama.port": ("maps", "OLLAMA_HOST, containerPort, Service"),
    "ollama.keep_alive": ("maps", "the preload's --keepalive"),
    "ollama.num_parallel": ("maps", "the environment"),
    "ollama.context_length": ("maps", "the environment"),
    "ollama.kv_cache_type": ("maps", "the environment"),
    "ollama.flash_attention": ("maps", "the environment"),
    "ollama.max_loaded_models": ("maps", "the environment"),
    "ollama.gpu_memory": ("host", "the scheduler gives whole GPUs"),
    "command.command": ("maps", "the command, in the image --image NAME=IMG names"),
    "command.port": ("maps", "containerPort, Service"),
    "command.health_path": ("maps", "the probes' path"),
    "command.served_name": ("maps", "the gateway's routes"),
    "remote.urls": ("maps", "the gateway's manifest"),
    "remote.served_name": ("maps", "the gateway's manifest"),
    "remote.api_key": ("maps", "the Secret, the gateway's environment"),
    "remote.api_key_file": ("maps", "the Secret, the gateway's environment"),
    "remote.read_timeout": ("maps", "the gateway's manifest"),
}


def field_key(path: KeyPath, backend: str | None = None) -> str:
    """A set field's key in FIELDS: `models.x.health.interval` -> `health.interval`,
    `models.x.port` -> `vllm.port`, `defaults.restart.policy` -> `restart.policy`."""
    names = [str(p) for p in path]
    if names[0] == "models":
        field = names[2]
        if field in ("health", "restart"):
            return ".".join(names[2:])
        shared = field in ModelBase.model_fields or field == "backend"
        return f"{'model' if shared else backend}.{field}"
    if names[:2] in (["defaults", "health"], ["defaults", "restart"]):
        return ".".join(names[1:])
    return ".".join(names)


def set_fields(m: Manifest) -> Iterator[tuple[str, KeyPath]]:
    """Each field the manifest sets (its FIELDS key and its path), in file order."""

    def walk(obj: BaseModel, path: KeyPath, backend: str | None) -> Iterator[tuple[str, KeyPath]]:
        for name in type(obj).model_fields:
            if name not in obj.model_fields_set:
                continue
            value, here = getattr(obj, name), (*path, name)
            if isinstance(value, BaseModel):
                yield from walk(value, here, backend)
            elif here == ("models",):
                for model, spec in value.items():
                    yield from walk(spec, ("models", model), spec.backend)
            else:
                yield field_key(here, backend), here

    yield from walk(m, (), None)


def host_notes(loaded: LoadedManifest) -> list[Problem]:
    """A note for the host-only fields the manifest sets, one per reason (where the
    first of them is set)."""
    first: dict[str, KeyPath] = {}
    keys: dict[str, list[str]] = {}
    for key, path in set_fields(loaded.manifest):
        how, why = FIELDS[key]
        if how == "host":
            first.setdefault(why, path)
            if key not in keys.setdefault(why, []):
                keys[why].append(key)
    out = []
    for why, path in first.items():
        rest = keys[why][1:]
        nor = f" (nor {', '.join(rest)})" if rest else ""
        out.append(loaded.problem(path, f"not exported{nor}: {why}", "note"))
    return out


def refusals(loaded: LoadedManifest, plan: Plan, *, always_on: bool) -> list[Problem]:
    """What the manifest asks for that Kubernetes cannot do, each where it says so."""
    m = loaded.manifest
    out: list[Problem] = []
    for name, spec in m.models.items():
        at = ("models", name)
        if isinstance(spec, RemoteModel):  # the gateway's, as it is: none of these apply
            continue
        if not always_on:
            out += _on_demand(loaded, name, spec)
        if m.restart(name).policy == "never":
            path = (*at, "restart", "policy") if spec.restart.policy else None
            out.append(
                loaded.problem(
                    path or ("defaults", "restart", "policy"),
                    "never: a Deployment always restarts its pod; use on-failure (or "
                    "always) for this export",
                )
            )
        if m.health(name).deep_probe:
            path = (*at, "health", "deep_probe") if spec.health.deep_probe else None
            out.append(
                loaded.problem(
                    path or ("defaults", "health", "deep_probe"),
                    "a Kubernetes probe cannot send a completion; set it to false for "
                    "this export (the liveness probe is the ready path's GET)",
                )
            )
    out += _shared_gpus(loaded, plan)
    out += _names(loaded, plan)
    out += _multi_node_flags(loaded, plan)
    unique = {(p.line, p.column, p.message): p for p in out}  # one per place in `defaults`
    return list(unique.values())


def _on_demand(loaded: LoadedManifest, name: str, spec: ModelBase) -> list[Problem]:
    at = ("models", name)
    out = []
    if spec.start == "on_demand":
        out.append(
            loaded.problem(
                (*at, "start"),
                "on_demand: a Kubernetes Deployment cannot start on a request; pass "
                "--always-on to export it always on, or leave the model out (name the "
                "models to export)",
            )
        )
    if spec.idle_timeout is not None:
        out.append(
            loaded.problem(
                (*at, "idle_timeout"),
                "Kubernetes does not stop an idle model; remove it, or pass --always-on to drop it",
            )
        )
    if spec.exclusive is not None:
        out.append(
            loaded.problem(
                (*at, "exclusive"),
                "Kubernetes does not swap models in and out; pass --always-on to run "
                "each on its own GPUs, or leave the model out",
            )
        )
    return out


def _shared_gpus(loaded: LoadedManifest, plan: Plan) -> list[Problem]:
    """Two servers that name one GPU: in Kubernetes, each pod gets whole GPUs."""
    owner: dict[str, str] = {}
    out = []
    for la in plan.launches:
        for i, gpu in enumerate(la.gpus):
            first = owner.setdefault(str(gpu), la.unit)
            if first != la.unit:
                out.append(
                    loaded.problem(
                        ("models", la.unit, "gpus", i),
                        f"GPU {gpu} is also in the gpus of {first}: Kubernetes gives each pod "
                        "whole GPUs (nvidia.com/gpu), never a share of one; give each model "
                        "GPUs of its own, or export one of them (name it on the command line)",
                    )
                )
    return out


def _names(loaded: LoadedManifest, plan: Plan) -> list[Problem]:
    """Servers whose Kubernetes names (DNS labels, and so their files' names) would be
    the same, or those of the export's own objects."""
    taken = {GATEWAY: "the gateway", CLAIM: "the model cache's claim", "kustomization": "kustomize"}
    out = []
    for la in plan.launches:
        nodes = nodes_of(loaded.manifest.models[la.unit])
        for name in dict.fromkeys((k8s_name(la.unit), service_name(la.unit, nodes))):
            other = taken.setdefault(name, la.unit)
            if other != la.unit:
                out.append(
                    loaded.problem(
                        ("models", la.unit),
                        f"becomes the Kubernetes name {name!r}, as {other} does: rename one",
                        key=True,
                    )
                )
                break
    return out


def _multi_node_flags(loaded: LoadedManifest, plan: Plan) -> list[Problem]:
    """Flags of vLLM's multi-node mode in extra_args of a model that spans nodes."""
    flags = plan.vllm_flags
    out = []
    for name, spec in loaded.manifest.models.items():
        if not isinstance(spec, VllmModel) or spec.nodes == 1 or flags is None:
            continue
        for i, arg in enumerate(spec.extra_args):
            flag = flags.resolve(arg) or arg.split("=", 1)[0]
            if flag in MULTI_NODE_FLAGS:
                out.append(
                    loaded.problem(
                        ("models", name, "extra_args", i),
                        f"{flag} is the export's to set for a model across nodes "
                        "(vLLM's multi-node mode in a LeaderWorkerSet); remove it",
                    )
                )
    return out


def command_problems(
    loaded: LoadedManifest, plan: Plan, images: dict[str, str | None]
) -> list[Problem]:
    """A command server without an image (an error); one that listens on loopback,
    where its Service cannot reach it (a warning)."""
    out = []
    for la in plan.launches:
        if la.backend != "command":
            continue
        if images.get(la.unit) is None:
            out.append(
                loaded.problem(
                    ("models", la.unit, "command"),
                    f"a command server needs an image to run in: pass --image "
                    f"{la.unit}=IMAGE (an image with {la.argv[0]} in it)",
                )
            )
        for i, arg in enumerate(la.argv):
            if arg in ("127.0.0.1", "localhost", "::1") or arg.endswith(
                ("=127.0.0.1", "=localhost")
            ):
                out.append(
                    loaded.problem(
                        ("models", la.unit, "command", i),
                        f"{arg!r}: a server that listens on loopback in its pod is out of "
                        "its Service's reach; make it listen on 0.0.0.0",
                        "warning",
                    )
                )
    return out
