"""The gateway as Kubernetes objects: llmsup's gateway alone in a Deployment,
routing to the models' Services, with a ClusterIP Service of its own.

Its manifest, in a ConfigMap, names each model as `backend: remote` (its Service's
URL, served names, the key the server asks for, how often to probe it): that backend
is what the gateway needs to run without the servers beside it. A remote model of
the exported manifest stays one, at its own URLs.
"""

from __future__ import annotations

import hashlib
from typing import Any

import yaml

from llmsup.backends import REGISTRY
from llmsup.export.names import env_name, service_name
from llmsup.export.secrets import GATEWAY_KEYS, REMOTE_KEY, SECRET, Secrets
from llmsup.export.workloads import (
    Cluster,
    Obj,
    labels,
    metadata,
    nodes_of,
    selector,
    service,
)
from llmsup.manifest import Gateway, LoadedManifest
from llmsup.plan import Plan

NAME = "llmsup-gateway"
CONFIG = "/etc/llmsup/models.yaml"
KEYS_DIR = "/etc/llmsup-keys"  # apart from CONFIG's directory: a ConfigMap's is read-only
STATE_DIR = "/var/lib/llmsup"
COMMAND = ["llmsup", "up", "-f", CONFIG]  # the daemon in the foreground: here, the gateway
# Settings the pod decides (where it listens, where its keys are).
_OWN = frozenset({"host", "port", "api_keys", "api_key_file"})


def url(service: str, port: int, namespace: str | None) -> str:
    """A server's Service, by its cluster DNS name."""
    host = f"{service}.{namespace}.svc" if namespace else service
    return f"http://{host}:{port}"


def upstream_env(key: str) -> str:
    """The gateway's variable holding the key of the Secret `key` (a server's key)."""
    return f"UPSTREAM_{env_name(key)}"


def gateway_manifest(
    loaded: LoadedManifest, plan: Plan, gw: Gateway, secrets: Secrets, namespace: str | None
) -> dict[str, Any]:
    """The gateway's own manifest: its settings, and each model as a remote server."""
    own: dict[str, Any] = {"host": "0.0.0.0", "port": gw.port}
    if secrets.gateway:
        own["api_key_file"] = f"{KEYS_DIR}/{GATEWAY_KEYS}"
    for field in type(gw).model_fields:
        if field in gw.model_fields_set and field not in _OWN:
            own[field] = getattr(gw, field)
    models: dict[str, Any] = {}
    for la in plan.launches:
        health = loaded.manifest.health(la.unit)
        svc = service_name(la.unit, nodes_of(loaded.manifest.models[la.unit]))
        for model in la.models:
            spec = loaded.manifest.models[model]
            entry: dict[str, Any] = {
                "backend": "remote",
                "urls": [url(svc, la.port, namespace)],
            }
            if served := REGISTRY[spec.backend].served_names(spec):
                entry["served_name"] = served
            if la.auth_env is not None:
                entry["api_key"] = f"${{{upstream_env(secrets.key(la.unit, la.auth_env))}}}"
            entry["health"] = {
                "interval": health.interval,
                "timeout": health.timeout,
                "failures": health.failures,
            }
            models[model] = entry
    for r in plan.remotes:
        entry = {"backend": "remote", "urls": list(r.urls), "served_name": list(r.served_names)}
        if r.api_key is not None:
            entry["api_key"] = f"${{{upstream_env(secrets.key(r.name, REMOTE_KEY))}}}"
        entry["health"] = {"interval": r.interval, "timeout": r.timeout, "failures": r.failures}
        entry["read_timeout"] = r.read_timeout
        models[r.name] = entry
    return {"version": 1, "state_dir": STATE_DIR, "gateway": own, "models": models}


def gateway_objects(loaded: LoadedManifest, plan: Plan, image: str, cluster: Cluster) -> list[Obj]:
    """ConfigMap (its manifest), Deployment, Service; none without a `gateway:`."""
    gw = loaded.manifest.gateway
    if gw is None:
        return []
    secrets = cluster.secrets
    manifest = gateway_manifest(loaded, plan, gw, secrets, cluster.namespace)
    text = (
        "# The gateway alone: each model is a `backend: remote` reached at its Service.\n"
        + yaml.safe_dump(manifest, sort_keys=False)
    )
    config = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(NAME, "gateway", cluster),
        "data": {"models.yaml": text},
    }
    env: list[Obj] = []
    keyed = [(la.unit, la.auth_env) for la in plan.launches if la.auth_env is not None]
    keyed += [(r.name, REMOTE_KEY) for r in plan.remotes if r.api_key is not None]
    for unit, secret_var in keyed:
        key = secrets.key(unit, secret_var)
        var = upstream_env(key)
        if all(e["name"] != var for e in env):
            env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": SECRET, "key": key}}})
    mounts: list[Obj] = [
        {"name": "config", "mountPath": CONFIG.rsplit("/", 1)[0], "readOnly": True},
        {"name": "state", "mountPath": STATE_DIR},
    ]
    volumes: list[Obj] = [
        {"name": "config", "configMap": {"name": NAME}},
        {"name": "state", "emptyDir": {}},
    ]
    if secrets.gateway:
        mounts.append({"name": "keys", "mountPath": KEYS_DIR, "readOnly": True})
        items = [{"key": GATEWAY_KEYS, "path": GATEWAY_KEYS}]
        volumes.append({"name": "keys", "secret": {"secretName": SECRET, "items": items}})
    probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10}
    container: Obj = {
        "name": "gateway",
        "image": image,
        "command": COMMAND,
        **({"env": env} if env else {}),
        "ports": [{"name": "http", "containerPort": gw.port, "protocol": "TCP"}],
        "readinessProbe": probe,
        "livenessProbe": dict(probe),
        "volumeMounts": mounts,
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(NAME, "gateway", cluster),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector(NAME)},
            "template": {
                "metadata": {
                    "labels": labels(NAME, "gateway"),
                    # A changed manifest rolls the gateway (a ConfigMap change alone does not).
                    "annotations": {"llmsup/config-hash": _digest(text)},
                },
                "spec": {
                    "enableServiceLinks": False,
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }
    return [config, deployment, service(NAME, gw.port, cluster, selector(NAME), "gateway")]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
