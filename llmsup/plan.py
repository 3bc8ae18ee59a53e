"""From a manifest to what to launch: cross-model checks and launch order.

Pure: `make_plan(loaded)` returns the launches, their order, and every problem
(errors and warnings) located in the manifest. Nothing here touches processes.
Each model's backend (`llmsup.backends`) builds its server and checks what is
its own; here are the checks that span models: ports, served names, GPU shares,
on-demand models and their swaps, the gateway. Remote models (served on other
hosts, through the gateway) have no server here: they are `Plan.remotes`.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from llmsup.backends import REDACTED, REGISTRY, Backend, Launch, remote
from llmsup.backends.base import Context, GpuClaim, GpuLoad
from llmsup.backends.remote import Remote, RemoteModel
from llmsup.backends.vllm_flags import FlagTable
from llmsup.errors import ManifestError, Problem
from llmsup.fields import ModelBase
from llmsup.manifest import LoadedManifest, Manifest

GPU_SHARE_WARN = 0.95  # each CUDA context costs a few hundred MiB on top


@dataclass(frozen=True)
class Plan:
    launches: tuple[Launch, ...]
    after: dict[str, tuple[str, ...]]  # unit -> units that must be ready first
    problems: tuple[Problem, ...] = field(default=())
    context: Context = field(default_factory=Context)  # what the checks knew
    swaps: dict[str, tuple[str, ...]] = field(default_factory=dict)  # never run together
    remotes: tuple[Remote, ...] = ()  # models on other hosts: the gateway routes to them

    @property
    def vllm_flags(self) -> FlagTable | None:
        """What vLLM flags were checked against (None: no vLLM model was checked)."""
        return self.context.vllm_flags_used

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    def unit_of(self, model: str) -> Launch | None:
        return next((la for la in self.launches if model in la.models), None)

    def to_json(self) -> list[dict[str, Any]]:
        out = []
        for la in self.launches:
            for model in la.models:
                out.append(
                    {
                        "name": model,
                        "backend": la.backend,
                        "unit": la.unit,
                        "argv": list(la.argv),
                        "env": la.display_env(),
                        "after": list(self.after.get(la.unit, ())),
                        "swapped_with": list(self.swaps.get(la.unit, ())),
                        "host": la.host,
                        "port": la.port,
                        "gpus": list(la.gpus),
                        "served_names": list(la.served_names),
                        "steps": steps(la),
                    }
                )
                out[-1].update(REGISTRY[la.backend].checked_against(self.context))
        for r in self.remotes:
            out.append(
                {
                    "name": r.name,
                    "backend": remote.NAME,
                    "unit": r.name,
                    "urls": list(r.urls),
                    "served_names": list(r.served_names),
                    "api_key": REDACTED if r.api_key is not None else None,
                    "health": {
                        "interval": r.interval,
                        "timeout": r.timeout,
                        "failures": r.failures,
                    },
                    "read_timeout": r.read_timeout,
                }
            )
        return out


def steps(la: Launch) -> list[str]:
    """What happens after the process starts, before it counts as ready."""
    wait = f"wait for GET {la.ready_path} = 200 on {la.host}:{la.port}"
    return [wait, *REGISTRY[la.backend].steps(la)]


def backend_of(loaded: LoadedManifest, name: str) -> Backend[Any]:
    return REGISTRY[loaded.manifest.models[name].backend]


def served_names_of(name: str, spec: ModelBase) -> list[str]:
    """The names clients ask for to reach a model (a remote model's key by default)."""
    if isinstance(spec, RemoteModel):
        return remote.served_names(name, spec)
    return REGISTRY[spec.backend].served_names(spec)


def remotes_of(manifest: Manifest) -> tuple[Remote, ...]:
    """The manifest's remote models, with their health settings resolved."""
    out = []
    for name, spec in manifest.models.items():
        if isinstance(spec, RemoteModel):
            h = manifest.health(name)
            out.append(
                remote.build(
                    name, spec, interval=h.interval, timeout=h.timeout, failures=h.failures
                )
            )
    return tuple(out)


def make_plan(
    loaded: LoadedManifest, vllm_flags: FlagTable | None = None, *, one_host: bool = True
) -> Plan:
    """`vllm_flags`: the table to check vLLM flags against; by default, that of the
    `vllm` on this process's PATH (found once per executable, see vllm_flags).
    `one_host=False`: for a cluster (`llmsup export`), where a model may span nodes."""
    m = loaded.manifest
    ctx = Context(vllm_flags, os.environ.get("PATH"), one_host=one_host)
    problems: list[Problem] = []
    servers: dict[tuple[str, Hashable], list[str]] = {}  # models that share one server
    for name, spec in m.models.items():
        backend = REGISTRY[spec.backend]
        problems += backend.check(loaded, name, spec, ctx)
        if not backend.runs_here:
            continue
        key = backend.server_key(name, spec, m.host(name))
        servers.setdefault((spec.backend, key), []).append(name)
        problems += _check_on_demand(loaded, name)
    launches: list[Launch] = []
    seen: set[str] = set()  # backends with a server so far
    for (kind, _), names in servers.items():
        specs = [m.models[n] for n in names]
        problems += REGISTRY[kind].check_group(loaded, names, specs)
        launches.append(
            REGISTRY[kind].build(names, specs, m.host(names[0]), first=kind not in seen)
        )
        seen.add(kind)

    remotes = remotes_of(m)
    problems += _check_ports(loaded, launches)
    problems += _check_served_names(loaded, launches, remotes)
    problems += _check_gpu_shares(loaded)
    problems += _check_beside(loaded)
    problems += _check_gateway(loaded, launches, remotes)
    problems += _check_remotes(loaded, remotes)
    if not m.models:
        problems.append(
            loaded.problem(
                ("models",),
                "no models: `llmsup up` would supervise nothing; add an entry under models:",
                "warning",
                key=True,
            )
        )
    return Plan(
        tuple(launches),
        _launch_order(loaded, launches),
        tuple(problems),
        ctx,
        _swaps(loaded, launches),
        remotes,
    )


def untrusted_problems(loaded: LoadedManifest) -> list[Problem]:
    """For a manifest from an untrusted place (`--untrusted`): only confined backends
    (vLLM, Ollama) may run, and no model repository's own code."""
    out = []
    for name, spec in loaded.manifest.models.items():
        out += REGISTRY[spec.backend].untrusted(loaded, name, spec)
    return out


RUN_WITH_PATH = (
    "install it, or run llmsup with the PATH of the environment that has it "
    "(for systemd: `llmsup systemd install --path`)"
)


def missing_executables(
    loaded: LoadedManifest,
    plan: Plan,
    which: Callable[[str], str | None],
    path: str,
    fix: str = RUN_WITH_PATH,
) -> list[Problem]:
    """Servers whose executable `which` does not find on `path` (the daemon's PATH
    is where `up` will look); `fix` says what to do."""
    out = []
    for la in plan.launches:
        exe = la.argv[0]
        if which(exe) is not None:
            continue
        name = la.models[0]
        out.append(
            loaded.problem(
                ("models", name, *REGISTRY[la.backend].executable_key()),
                f"{exe!r} is not on PATH (searched: {path or '(empty)'}): `up` would fail "
                f"to start {la.unit}; {fix}",
                "warning",
            )
        )
    return out


def plan_or_raise(loaded: LoadedManifest) -> Plan:
    plan = make_plan(loaded)
    if plan.errors:
        raise ManifestError(sorted(plan.problems, key=lambda p: (p.line, p.column)))
    return plan


# -------------------------------------------------------------- GPU placement


def gpu_claim(loaded: LoadedManifest, name: str) -> GpuClaim:
    """What a model asks of the GPUs (its backend says)."""
    return backend_of(loaded, name).gpu_claim(loaded.manifest.models[name])


def physical_gpus(loaded: LoadedManifest, name: str) -> tuple[str, ...]:
    """The GPUs a model will use, as ids comparable across models.

    A vLLM model without `gpus` uses the first TP x PP visible devices.
    """
    return tuple(str(g) for g in gpu_claim(loaded, name).gpus)


def _launch_order(loaded: LoadedManifest, launches: list[Launch]) -> dict[str, tuple[str, ...]]:
    """Servers that share a GPU start one after another, in manifest order:
    vLLM profiles free memory at start, and two starting at once confuse it."""
    used: dict[str, set[str]] = {}
    for la in launches:
        used[la.unit] = {g for model in la.models for g in physical_gpus(loaded, model)}
    after: dict[str, tuple[str, ...]] = {}
    for i, la in enumerate(launches):
        earlier = [
            o.unit
            for o in launches[:i]
            if used[o.unit] & used[la.unit] and not swapped(loaded, o.models, la.models)
        ]
        if earlier:
            after[la.unit] = tuple(earlier)
    return after


def swapped(loaded: LoadedManifest, a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """The servers of models `a` and `b` never run at the same time: the gateway
    swaps them (all on demand, and some pair of them conflicts)."""
    models = loaded.manifest.models
    if not all(models[n].start == "on_demand" for n in (*a, *b)):
        return False
    return any(conflicts(loaded, x, y) for x in a for y in b)


def _swaps(loaded: LoadedManifest, launches: list[Launch]) -> dict[str, tuple[str, ...]]:
    """Server -> the servers the gateway swaps it with (they never run together)."""
    out: dict[str, tuple[str, ...]] = {}
    for la in launches:
        others = [o.unit for o in launches if o is not la and swapped(loaded, o.models, la.models)]
        if others:
            out[la.unit] = tuple(others)
    return out


def _utilizations(loaded: LoadedManifest) -> dict[str, dict[str, float]]:
    """GPU -> {model: share of that GPU's memory it asks for} (vLLM's models)."""
    shares: dict[str, dict[str, float]] = {}
    for name in loaded.manifest.models:
        claim = gpu_claim(loaded, name)
        if claim.share is not None:
            for gpu in claim.gpus:
                shares.setdefault(str(gpu), {})[name] = claim.share
    return shares


def _check_gpu_shares(loaded: LoadedManifest) -> list[Problem]:
    """The always-on models must fit together, and each on-demand model must fit
    beside them (on-demand models that do not fit each other are swapped)."""
    models = loaded.manifest.models
    out: list[Problem] = []
    for gpu, users in _utilizations(loaded).items():
        always = [n for n in users if models[n].start == "always"]
        sets = [always] + [[*always, n] for n in users if models[n].start == "on_demand"]
        for group in sets:
            total = sum(users[n] for n in group)
            if len(group) < 2 or total <= GPU_SHARE_WARN:
                continue
            who = " + ".join(f"{n} ({users[n]:g})" for n in group)
            path = ("models", group[-1], "gpu_memory_utilization")
            if total > 1.0:
                msg = (
                    f"GPU {gpu} would be asked for {total:.2f} of its memory: {who}; "
                    "lower gpu_memory_utilization so the models on it sum to at most 0.95, "
                    + _swap_hint(loaded, always, beside=len(group) > len(always))
                )
                out.append(loaded.problem(path, msg))
            else:
                msg = (
                    f"GPU {gpu} is shared at {total:.2f} ({who}); each CUDA context needs "
                    "a few hundred MiB more, so vLLM may not find the memory it asks for"
                )
                out.append(loaded.problem(path, msg, "warning"))
    return out


def _check_beside(loaded: LoadedManifest) -> list[Problem]:
    """Each model beside what the others claim of the GPUs at most at once: the
    always-on models' shares, plus the largest on-demand one (Ollama's room)."""
    models = loaded.manifest.models
    loads = {}
    for gpu, users in _utilizations(loaded).items():
        always = [u for n, u in users.items() if models[n].start == "always"]
        on_demand = [u for n, u in users.items() if models[n].start == "on_demand"]
        loads[gpu] = GpuLoad(sum(always) + max(on_demand, default=0.0), tuple(users))
    out = []
    for name, spec in models.items():
        out += REGISTRY[spec.backend].check_beside(loaded, name, spec, loads)
    return out


def _swap_hint(loaded: LoadedManifest, always: list[str], beside: bool) -> str:
    """What makes models that do not fit together run one at a time: each of them
    on demand (an always-on model never makes way), started by a gateway."""
    names = f"{', '.join(always[:-1])} and {always[-1]}" if len(always) > 1 else always[0]
    if beside:  # an on-demand model that does not fit beside the always-on ones
        what = f"make {names} start: on_demand too"
    else:
        what = f"make {'both' if len(always) == 2 else 'all'} of {names} start: on_demand"
    gateway = "" if loaded.manifest.gateway else "; add a `gateway:` section, which starts them"
    return f"or {what}, so that the gateway runs one at a time, swapping them{gateway}"


def conflicts(loaded: LoadedManifest, a: str, b: str) -> bool:
    """Models `a` and `b` cannot run at the same time: one exclusive group, or
    together (with the always-on models) they ask a GPU for more than it has."""
    models = loaded.manifest.models
    ea, eb = models[a].exclusive, models[b].exclusive
    if a != b and ea is not None and ea == eb:
        return True
    for users in _utilizations(loaded).values():
        if a in users and b in users and a != b:
            always = sum(u for n, u in users.items() if models[n].start == "always")
            if always + users[a] + users[b] > 1.0:
                return True
    return False


def _check_on_demand(loaded: LoadedManifest, name: str) -> list[Problem]:
    spec = loaded.manifest.models[name]
    out = []
    if spec.start != "on_demand":
        if spec.exclusive is not None:
            out.append(
                loaded.problem(
                    ("models", name, "exclusive"),
                    "only start: on_demand models can be swapped; add start: on_demand",
                )
            )
        if spec.idle_timeout is not None:
            out.append(
                loaded.problem(
                    ("models", name, "idle_timeout"),
                    "idle_timeout applies to start: on_demand models only",
                    "warning",
                )
            )
    elif loaded.manifest.gateway is None:
        out.append(
            loaded.problem(
                ("models", name, "start"),
                "an on_demand model is started by the gateway: add a `gateway:` section",
            )
        )
    return out


# ------------------------------------------------------------------ collisions


def _overlap(a: str, b: str) -> bool:
    wildcard = ("0.0.0.0", "::", "")
    return a == b or a in wildcard or b in wildcard


def _check_ports(loaded: LoadedManifest, launches: list[Launch]) -> list[Problem]:
    taken: list[tuple[str, int, str, tuple[str | int, ...]]] = []
    gw = loaded.manifest.gateway
    if gw is not None:
        taken.append((gw.host, gw.port, "the gateway", ("gateway", "port")))
    out = []
    for la in launches:
        path = ("models", la.unit, "port")
        for host, port, who, _ in taken:
            if port == la.port and _overlap(host, la.host):
                out.append(
                    loaded.problem(
                        path, f"{la.host}:{la.port} is already used by {who}; pick another port"
                    )
                )
                break
        taken.append((la.host, la.port, f"model {la.unit}", path))
    return out


def _check_served_names(
    loaded: LoadedManifest, launches: list[Launch], remotes: tuple[Remote, ...]
) -> list[Problem]:
    models = loaded.manifest.models
    names = [
        (model, REGISTRY[models[model].backend].served_names(models[model]))
        for la in launches
        for model in la.models
    ]
    names += [(r.name, list(r.served_names)) for r in remotes]  # the key by default
    owner: dict[str, str] = {}
    out = []
    for model, served_names in names:
        spec = models[model]
        for served in served_names:
            if served in owner and owner[served] != model:
                out.append(
                    loaded.problem(
                        ("models", model, REGISTRY[spec.backend].served_key(spec)),
                        f"served name {served!r} is already served by {owner[served]}; "
                        "requests could not tell them apart",
                    )
                )
            owner.setdefault(served, model)
    return out


def _check_remotes(loaded: LoadedManifest, remotes: tuple[Remote, ...]) -> list[Problem]:
    """Remote models are reached through the gateway, never through itself."""
    gw = loaded.manifest.gateway
    out = []
    for r in remotes:
        if gw is None:
            msg = "a remote model is reached through the gateway: add a `gateway:` section"
            out.append(loaded.problem(("models", r.name, "backend"), msg))
            continue
        for i, url in enumerate(r.urls):
            if remote.points_at(url, gw.host, gw.port):
                msg = (
                    f"{url} is this manifest's own gateway ({gw.host}:{gw.port}): "
                    "requests would go round in a loop; give another host's address"
                )
                out.append(loaded.problem(("models", r.name, "urls", i), msg))
    return out


def _check_gateway(
    loaded: LoadedManifest, launches: list[Launch], remotes: tuple[Remote, ...] = ()
) -> list[Problem]:
    gw = loaded.manifest.gateway
    if gw is None:
        return []
    served = {s for la in launches for s in la.served_names}
    served |= {s for r in remotes for s in r.served_names}
    out = []
    for alias, target in gw.aliases.items():
        path = ("gateway", "aliases", alias)
        if target not in served:
            known = ", ".join(sorted(served)) or "none"
            out.append(
                loaded.problem(path, f"alias target {target!r} is no served name (known: {known})")
            )
        if alias in served:
            out.append(loaded.problem(path, f"alias {alias!r} hides a served name of that name"))
    if not gw.api_keys and not gw.api_key_file and not _loopback(gw.host):
        out.append(
            loaded.problem(
                ("gateway", "host"),
                f"the gateway listens on {gw.host} with no api_keys: anyone who can reach "
                "it can use every model; add api_keys (or api_key_file), or listen on "
                "127.0.0.1",
                "warning",
            )
        )
    return out


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False
