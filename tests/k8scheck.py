"""Checks of Kubernetes objects that need no cluster.

`schema_problems`: kubernetes-validate in strict mode (the API's OpenAPI schema,
no unknown fields) for a Kubernetes version; a LeaderWorkerSet, which it does not
know, through its pod templates wrapped as v1 PodTemplates. The schema accepts
any string where the API server wants an enum value, a quantity, a name or a
reference: `own_problems` and `lws_problems` check those.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

Obj = dict[str, Any]
Path = tuple[str | int, ...]

# resource.Quantity (k8s.io/apimachinery/pkg/api/resource): a number, then a binary
# suffix (Ki..Ei), a decimal one (n, u, m, k, M..E) or an exponent.
QUANTITY = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?\d+)?")
DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")
CONFIG_KEY = re.compile(r"[-._a-zA-Z0-9]+")  # a key of a Secret or ConfigMap
PORT_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")  # IANA_SVC_NAME, with a letter

ENUMS: dict[str, set[str]] = {
    "protocol": {"TCP", "UDP", "SCTP"},
    "medium": {"", "Memory", "HugePages"},
    "scheme": {"HTTP", "HTTPS"},
    "imagePullPolicy": {"Always", "IfNotPresent", "Never"},
    "startupPolicy": {"LeaderCreated", "LeaderReady"},
}
ACCESS_MODES = {"ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"}
POD_RESTART = {"Always", "OnFailure", "Never"}
LWS_RESTART = {"Default", "RecreateGroupOnPodRestart", "None"}
SERVICE_TYPES = {"ClusterIP", "NodePort", "LoadBalancer", "ExternalName"}
STRATEGIES = {"Recreate", "RollingUpdate"}
SECONDS = {"periodSeconds", "timeoutSeconds", "failureThreshold", "successThreshold"}

LWS_API = "leaderworkerset.x-k8s.io/v1"
LWS_SPEC = {"replicas", "leaderWorkerTemplate", "rolloutStrategy", "startupPolicy", "networkConfig"}
LWS_TEMPLATE = {"leaderTemplate", "workerTemplate", "size", "restartPolicy", "subGroupPolicy"}


def schema_targets(obj: Obj) -> list[Obj]:
    """What kubernetes-validate can check of `obj`: itself, or a LeaderWorkerSet's pod
    templates as v1 PodTemplates."""
    if obj["kind"] != "LeaderWorkerSet":
        return [obj]
    out = []
    for role, tmpl in obj["spec"]["leaderWorkerTemplate"].items():
        if role.endswith("Template"):
            meta = {"name": f"{obj['metadata']['name']}-{role.lower()}"}
            out.append(
                {"apiVersion": "v1", "kind": "PodTemplate", "metadata": meta, "template": tmpl}
            )
    return out


def schema_problems(objs: list[Obj], version: str) -> list[str]:
    """Every object (kustomization.yaml aside) against Kubernetes `version`'s schema."""
    import kubernetes_validate

    out = []
    for obj in objs:
        if obj["kind"] == "Kustomization":
            continue
        for target in schema_targets(obj):
            where = f"{target['kind']}/{target['metadata']['name']}"
            try:
                kubernetes_validate.validate(target, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                out.append(f"{where} ({version}): {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                out.append(f"{where} ({version}): {e.message}")
    return out


def leaves(node: Any, path: Path = ()) -> Iterator[tuple[Path, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from leaves(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from leaves(v, (*path, i))
    else:
        yield path, node


def mappings(node: Any, path: Path = ()) -> Iterator[tuple[Path, Obj]]:
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from mappings(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from mappings(v, (*path, i))


def _label_key(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and not (len(prefix) <= 253 and DNS1123_SUBDOMAIN.fullmatch(prefix)):
        return False
    return len(name) <= 63 and LABEL_NAME.fullmatch(name) is not None


def _leaf_problem(kind: str, path: Path, value: Any) -> str | None:
    keys = [p for p in path if isinstance(p, str)]
    key = keys[-1] if keys else ""
    parent = path[-2] if len(path) > 1 else None
    if "accessModes" in path:
        return None if value in ACCESS_MODES else f"access mode {value!r}"
    if key in ENUMS:
        return None if value in ENUMS[key] else f"{key} {value!r}"
    if key == "restartPolicy":
        allowed = LWS_RESTART if parent == "leaderWorkerTemplate" else POD_RESTART
        return None if value in allowed else f"restartPolicy {value!r}"
    if path[-2:] == ("strategy", "type"):
        return None if value in STRATEGIES else f"strategy {value!r}"
    if kind == "Service" and path == ("spec", "type"):
        return None if value in SERVICE_TYPES else f"Service type {value!r}"
    if parent in ("requests", "limits") or key in ("sizeLimit", "storage"):
        if not (isinstance(value, str) and QUANTITY.fullmatch(value)):
            return f"quantity {value!r}"
        if key == "nvidia.com/gpu" and not (value.isdigit() and int(value) > 0):
            return f"GPU count {value!r} (a positive integer)"
        return None
    if key in SECONDS or key == "terminationGracePeriodSeconds":
        ok = isinstance(value, int) and value >= (
            0 if key == "terminationGracePeriodSeconds" else 1
        )
        return None if ok else f"{key} {value!r}"
    if key in ("containerPort", "port") and isinstance(value, int):
        return None if 1 <= value <= 65535 else f"port {value!r}"
    if key == "name" and len(path) >= 3 and path[-3] in ("containers", "volumes", "volumeMounts"):
        label = len(value) <= 63 and DNS1123_LABEL.fullmatch(value) is not None
        return None if label else f"{path[-3]} name {value!r}"
    if key == "name" and len(path) >= 3 and path[-3] == "env":
        return None if ENV_NAME.fullmatch(value) else f"env name {value!r}"
    if key == "name" and len(path) >= 3 and path[-3] == "ports":
        named = len(value) <= 15 and PORT_NAME.fullmatch(value) and re.search("[a-z]", value)
        return None if named else f"port name {value!r}"
    if key == "key" and ("secretKeyRef" in path or "items" in path):
        return None if CONFIG_KEY.fullmatch(value) else f"key {value!r}"
    return None


def _pod_specs(obj: Obj) -> Iterator[Obj]:
    if obj["kind"] == "Deployment":
        yield obj["spec"]["template"]
    elif obj["kind"] == "LeaderWorkerSet":
        lwt = obj["spec"]["leaderWorkerTemplate"]
        yield from (lwt[k] for k in ("leaderTemplate", "workerTemplate") if k in lwt)


def _reference_problems(obj: Obj) -> list[str]:
    """Mounts name declared volumes; probes name declared ports."""
    out = []
    for tmpl in _pod_specs(obj):
        spec = tmpl["spec"]
        volumes = {v["name"] for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            ports = {p["name"] for p in c.get("ports", []) if "name" in p}
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    out.append(f"container {c['name']} mounts undeclared volume {m['name']!r}")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                port = c.get(probe, {}).get("httpGet", {}).get("port")
                if isinstance(port, str) and port not in ports:
                    out.append(f"{probe} of {c['name']} names undeclared port {port!r}")
    return out


def own_problems(obj: Obj) -> list[str]:
    """What the API server would refuse that the schema lets through: enum values,
    quantities, names, label syntax, references inside a pod."""
    kind = obj["kind"]
    if kind == "Kustomization":
        return []
    name = obj["metadata"]["name"]
    where = f"{kind}/{name}"
    out = []
    pattern = DNS1035_LABEL if kind == "Service" else DNS1123_SUBDOMAIN
    if len(name) > 63 or not pattern.fullmatch(name):
        out.append(f"{where}: name {name!r}")
    for path, value in leaves(obj):
        if (problem := _leaf_problem(kind, path, value)) is not None:
            out.append(f"{where}: {'.'.join(map(str, path))}: {problem}")
    for path, mapping in mappings(obj):
        selector = kind == "Service" and path == ("spec", "selector")
        if path and (path[-1] in ("labels", "matchLabels") or selector):
            for k, v in mapping.items():
                if not _label_key(k):
                    out.append(f"{where}: label key {k!r}")
                if not (isinstance(v, str) and len(v) <= 63 and (not v or LABEL_NAME.fullmatch(v))):
                    out.append(f"{where}: label value {v!r}")
    return out + [f"{where}: {p}" for p in _reference_problems(obj)]


def lws_problems(obj: Obj) -> list[str]:
    """A LeaderWorkerSet's own fields, as its CRD (lws v1) declares them."""
    out = []
    if obj.get("apiVersion") != LWS_API:
        out.append(f"apiVersion {obj.get('apiVersion')!r}")
    spec = obj["spec"]
    out += [f"spec.{k}: unknown field" for k in spec.keys() - LWS_SPEC]
    if not (isinstance(spec.get("replicas", 1), int) and spec.get("replicas", 1) >= 0):
        out.append(f"spec.replicas {spec['replicas']!r}")
    lwt = spec.get("leaderWorkerTemplate")
    if not isinstance(lwt, dict):
        return [*out, "spec.leaderWorkerTemplate is required"]
    out += [f"spec.leaderWorkerTemplate.{k}: unknown field" for k in lwt.keys() - LWS_TEMPLATE]
    if "workerTemplate" not in lwt:
        out.append("spec.leaderWorkerTemplate.workerTemplate is required")
    size = lwt.get("size", 1)
    if not (isinstance(size, int) and size >= 1):
        out.append(f"spec.leaderWorkerTemplate.size {size!r}")
    return out
