"""One server as Kubernetes objects: a Deployment (or, across nodes, a
LeaderWorkerSet running vLLM's multi-node mode) and a ClusterIP Service.

Its command line and environment are the plan's (host 0.0.0.0), less the GPU
indices (the scheduler picks a pod's GPUs) and with secrets read from the Secret.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmsup.backends import Launch, cuda_devices
from llmsup.backends.launch import is_secret_name
from llmsup.backends.vllm import VllmModel
from llmsup.export.names import k8s_name, service_name
from llmsup.export.secrets import Secrets
from llmsup.fields import ModelBase
from llmsup.manifest import Health

Obj = dict[str, Any]

PART_OF = {"app.kubernetes.io/part-of": "llmsup", "app.kubernetes.io/managed-by": "llmsup"}
CLAIM = "llmsup-models"  # the model cache's PersistentVolumeClaim (unless --models-pvc)
CACHE = "/models"  # where the model cache volume is mounted
# Where each backend's server keeps the models it downloads: on that volume.
CACHE_ENV = {
    "vllm": {"HF_HOME": f"{CACHE}/huggingface"},
    "ollama": {"OLLAMA_MODELS": f"{CACHE}/ollama"},
    "command": {"HF_HOME": f"{CACHE}/huggingface"},
}
# LeaderWorkerSet gives each pod its group's size, its index and the leader's address.
MULTI_NODE = (
    "--distributed-executor-backend", "mp",
    "--nnodes", "$(LWS_GROUP_SIZE)",
    "--node-rank", "$(LWS_WORKER_INDEX)",
    "--master-addr", "$(LWS_LEADER_ADDRESS)",
)  # fmt: skip
MULTI_NODE_FLAGS = frozenset({*MULTI_NODE[::2], "--headless"})
LWS_API = "leaderworkerset.x-k8s.io/v1"


def nodes_of(spec: ModelBase) -> int:
    """The nodes a model spans (vLLM's `nodes`; one for the others)."""
    return spec.nodes if isinstance(spec, VllmModel) else 1


@dataclass(frozen=True)
class Server:
    """One server to export, with what its manifest entry says beyond the launch."""

    launch: Launch  # built for a pod (host 0.0.0.0)
    image: str
    health: Health
    stop_timeout: float
    gpus: int  # nvidia.com/gpu per pod
    nodes: int = 1


@dataclass(frozen=True)
class Cluster:
    """What every pod shares: the namespace, the model cache's claim, the Secret."""

    namespace: str | None
    claim: str
    secrets: Secrets


def escape(text: str) -> str:
    """Kubernetes expands `$(VAR)` in command and env values; `$$` is a literal `$`."""
    return text.replace("$", "$$")


def labels(name: str, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/component": component, **PART_OF}


def selector(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "llmsup"}


def metadata(name: str, component: str, cluster: Cluster, models: tuple[str, ...] = ()) -> Obj:
    meta: Obj = {"name": name}
    if cluster.namespace:
        meta["namespace"] = cluster.namespace
    meta["labels"] = labels(name, component)
    if models:
        meta["annotations"] = {"llmsup/models": ", ".join(models)}
    return meta


def service(name: str, port: int, cluster: Cluster, pods: Mapping[str, str], component: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(name, component, cluster),
        "spec": {
            "type": "ClusterIP",
            "selector": dict(pods),
            "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def http_probes(h: Health, path: str, startup: float | None) -> Obj:
    """Liveness every `interval` (`failures` in a row restart the container), readiness
    alike; a startup probe that allows `startup` seconds before the first success."""
    period, timeout = max(1, math.ceil(h.interval)), max(1, math.ceil(h.timeout))
    get = {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period}
    alive = {**get, "timeoutSeconds": timeout, "failureThreshold": h.failures}
    out: Obj = {}
    if startup is not None:
        out["startupProbe"] = {
            **get,
            "timeoutSeconds": timeout,
            "failureThreshold": max(1, math.ceil(startup / period)),
        }
    return {**out, "readinessProbe": alive, "livenessProbe": dict(alive)}


def env(la: Launch, secrets: Secrets) -> list[Obj]:
    """The plan's environment without GPU indices; secrets from the Secret; the
    model cache where the server looks for it (unless the manifest says where)."""
    drop = cuda_devices(la.gpus)
    out: list[Obj] = []
    for var, value in la.env.items():
        if var in drop:
            continue
        if is_secret_name(var):
            out.append({"name": var, "valueFrom": secrets.ref(la.unit, var)})
        else:
            out.append({"name": var, "value": escape(value)})
    for var in la.secrets:
        if var not in la.env:
            out.append({"name": var, "valueFrom": secrets.ref(la.unit, var)})
    for var, value in CACHE_ENV.get(la.backend, {}).items():
        if var not in la.env:
            out.append({"name": var, "value": value})
    return out


def ollama_start(la: Launch) -> Obj | None:
    """Pull and preload each model (`llmsup plan`'s steps) once the server answers:
    the container counts as started, and is probed, only when they are done."""
    if not la.ollama_loads:
        return None
    steps = ["until ollama list >/dev/null 2>&1; do sleep 1; done"]
    for load in la.ollama_loads:
        keep = f"{load.keep_alive}s" if isinstance(load.keep_alive, int) else load.keep_alive
        model = shlex.quote(load.model)
        steps += [f"ollama pull {model}", f"ollama run --keepalive={shlex.quote(keep)} {model} ''"]
    return {"postStart": {"exec": {"command": ["/bin/sh", "-c", " && ".join(steps)]}}}


def container(s: Server, cluster: Cluster, argv: list[str], *, serves: bool) -> Obj:
    """The server's container; `serves`: it answers HTTP (not a multi-node worker)."""
    la = s.launch
    c: Obj = {
        "name": "server" if la.backend == "command" else la.backend,
        "image": s.image,
        "command": argv,
        "env": env(la, cluster.secrets),
    }
    if serves:
        c["ports"] = [{"name": "http", "containerPort": la.port, "protocol": "TCP"}]
        c.update(http_probes(s.health, la.ready_path, s.health.startup_timeout))
        if (start := ollama_start(la)) is not None:
            c["lifecycle"] = start
    if s.gpus:
        gpus = {"nvidia.com/gpu": str(s.gpus)}
        c["resources"] = {"requests": gpus, "limits": dict(gpus)}
    c["volumeMounts"] = [{"name": "models", "mountPath": CACHE}]
    if s.gpus > 1:
        c["volumeMounts"].append({"name": "dshm", "mountPath": "/dev/shm"})
    return c


def pod(s: Server, cluster: Cluster, argv: list[str], *, serves: bool = True) -> Obj:
    volumes: list[Obj] = [{"name": "models", "persistentVolumeClaim": {"claimName": cluster.claim}}]
    if s.gpus > 1:
        # Several GPU workers in one pod talk through shared memory (NCCL); a
        # container's own /dev/shm is 64 MiB.
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
    return {
        "restartPolicy": "Always",
        # A Service named like an engine's variable (`vllm` -> VLLM_PORT) breaks it.
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": math.ceil(s.stop_timeout),
        "containers": [container(s, cluster, argv, serves=serves)],
        "volumes": volumes,
    }


def server_objects(s: Server, cluster: Cluster) -> list[Obj]:
    """A Deployment and its Service; across nodes, a LeaderWorkerSet and the leader's."""
    la = s.launch
    name, svc = k8s_name(la.unit), service_name(la.unit, s.nodes)
    argv = [escape(a) for a in la.argv]
    if s.nodes > 1:
        return [
            leader_worker_set(s, cluster, name, argv),
            service(svc, la.port, cluster, {**selector(name), "role": "leader"}, "model"),
        ]
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(name, "model", cluster, la.models),
        "spec": {
            "replicas": 1,
            # The new pod would need GPUs the old one holds: replace, never overlap.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector(name)},
            "template": {
                "metadata": {"labels": labels(name, "model")},
                "spec": pod(s, cluster, argv),
            },
        },
    }
    return [deployment, service(svc, la.port, cluster, selector(name), "model")]


def leader_worker_set(s: Server, cluster: Cluster, name: str, argv: list[str]) -> Obj:
    """vLLM across `nodes` pods: the leader serves HTTP and is probed; the workers join
    it headless. Any pod that restarts takes its whole group with it."""
    leader = [*argv, *MULTI_NODE]
    worker = [*argv, *MULTI_NODE, "--headless"]
    return {
        "apiVersion": LWS_API,
        "kind": "LeaderWorkerSet",
        "metadata": metadata(name, "model", cluster, s.launch.models),
        "spec": {
            "replicas": 1,
            # Workers start with the leader: it is ready only once they have joined.
            "startupPolicy": "LeaderCreated",
            "leaderWorkerTemplate": {
                "size": s.nodes,
                "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": {
                    "metadata": {"labels": {**labels(name, "model"), "role": "leader"}},
                    "spec": pod(s, cluster, leader),
                },
                "workerTemplate": {
                    "metadata": {"labels": {**labels(name, "model"), "role": "worker"}},
                    "spec": pod(s, cluster, worker, serves=False),
                },
            },
        },
    }
