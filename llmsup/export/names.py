"""Kubernetes names and quantities: what the API server would refuse, checked here."""

from __future__ import annotations

import re

# A DNS-1035 label: what a Service's name must be (and every name we make is one).
LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
# A DNS-1123 label: what a namespace's name must be; dotted, what a claim's may be.
NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
SUBDOMAIN = re.compile(rf"{NAMESPACE.pattern}(\.{NAMESPACE.pattern})*")
# resource.Quantity: a decimal number and a binary (Ki..Ei) or decimal (n..E, e3) suffix.
QUANTITY = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?\d+)?")
MAX_NAME = 63


def k8s_name(name: str) -> str:
    """A model's name as a DNS-1035 label: lower case, runs of other characters as
    one `-`, a leading digit prefixed (`7b` -> `m-7b`), at most 63 characters."""
    out = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not out[:1].isalpha():
        out = f"m-{out}"
    return out[:MAX_NAME].rstrip("-")


def service_name(unit: str, nodes: int) -> str:
    """A server's Service. Across nodes, LeaderWorkerSet makes a headless Service of
    the set's own name for its pods' addresses: the leader's is `NAME-leader`."""
    name = k8s_name(unit)
    return name if nodes == 1 else f"{name[: MAX_NAME - 7].rstrip('-')}-leader"


def env_name(text: str) -> str:
    """`qwen2.5-32b.VLLM_API_KEY` as an environment variable name: QWEN2_5_32B_VLLM_API_KEY."""
    return re.sub(r"[^A-Z0-9]+", "_", text.upper()).strip("_")


def is_label(text: str) -> bool:
    return len(text) <= MAX_NAME and LABEL.fullmatch(text) is not None


def is_namespace(text: str) -> bool:
    return len(text) <= MAX_NAME and NAMESPACE.fullmatch(text) is not None


def is_subdomain(text: str) -> bool:
    return len(text) <= 253 and SUBDOMAIN.fullmatch(text) is not None


def is_quantity(text: str) -> bool:
    return QUANTITY.fullmatch(text) is not None
