"""From a manifest to what to launch: cross-model checks and launch order.

Pure: `make_plan(loaded)` returns the launches, their order, and every problem
(errors and warnings) located in the manifest. Nothing here touches processes.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmsup.backends import Launch
from llmsup.backends import command as command_backend
from llmsup.backends import ollama as ollama_backend
from llmsup.backends import vllm as vllm_backend
from llmsup.backends.vllm_flags import FlagTable
from llmsup.backends.vllm_flags import for_path as vllm_flags_for_path
from llmsup.errors import ManifestError, Problem
from llmsup.manifest import CommandModel, LoadedManifest, OllamaModel, VllmModel

GPU_SHARE_WARN = 0.95  # each CUDA context costs a few hundred MiB on top
OLLAMA_ROOM_WARN = 0.85  # vLLM's shares of a GPU above which Ollama has little room


@dataclass(frozen=True)
class Plan:
    launches: tuple[Launch, ...]
    after: dict[str, tuple[str, ...]]  # unit -> units that must be ready first
    problems: tuple[Problem, ...] = field(default=())
    vllm_flags: FlagTable | None = None  # what vLLM flags were checked against
    swaps: dict[str, tuple[str, ...]] = field(default_factory=dict)  # never run together

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
                if la.backend == "vllm" and self.vllm_flags is not None:
                    out[-1]["vllm_flags"] = self.vllm_flags.describe()
        return out


def steps(la: Launch) -> list[str]:
    """What happens after the process starts, before it counts as ready."""
    out = [f"wait for GET {la.ready_path} = 200 on {la.host}:{la.port}"]
    for load in la.ollama_loads:
        out += [f"pull {load.model}", f"preload {load.model} (keep_alive {load.keep_alive})"]
    return out


def make_plan(loaded: LoadedManifest, vllm_flags: FlagTable | None = None) -> Plan:
    """`vllm_flags`: the table to check vLLM flags against; by default, that of the
    `vllm` on this process's PATH (found once per executable, see vllm_flags)."""
    m = loaded.manifest
    if vllm_flags is None and any(isinstance(s, VllmModel) for s in m.models.values()):
        vllm_flags = vllm_flags_for_path(os.environ.get("PATH"))
    launches: list[Launch] = []
    problems: list[Problem] = []
    ollama_groups: dict[tuple[str, int, str], list[str]] = {}
    for name, spec in m.models.items():
        if isinstance(spec, VllmModel):
            launches.append(vllm_backend.build(name, spec, m))
            assert vllm_flags is not None
            problems += _check_vllm(loaded, name, spec, vllm_flags)
        elif isinstance(spec, CommandModel):
            launches.append(command_backend.build(name, spec, m))
        elif isinstance(spec, OllamaModel):
            ollama_groups.setdefault(ollama_backend.server_key(name, spec, m), []).append(name)
        problems += _check_env(loaded, name)
        problems += _check_on_demand(loaded, name)
    for i, names in enumerate(ollama_groups.values()):
        problems += _check_ollama_group(loaded, names)
        launches.append(ollama_backend.build(names, m, noprune=i > 0))
    order = {name: i for i, name in enumerate(m.models)}
    launches.sort(key=lambda la: order[la.unit])

    problems += _check_ports(loaded, launches)
    problems += _check_served_names(loaded, launches)
    problems += _check_gpu_shares(loaded)
    problems += _check_ollama_room(loaded)
    problems += _check_gateway(loaded, launches)
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
        vllm_flags,
        _swaps(loaded, launches),
    )


def untrusted_problems(loaded: LoadedManifest) -> list[Problem]:
    """For a manifest from an untrusted place (`--untrusted`): only vLLM and Ollama
    may run, and no model repository's own code."""
    out = []
    for name, spec in loaded.manifest.models.items():
        if isinstance(spec, CommandModel):
            out.append(
                loaded.problem(
                    ("models", name, "backend"),
                    "a command backend runs any program: refused for an untrusted manifest",
                )
            )
        if isinstance(spec, VllmModel) and spec.trust_remote_code:
            out.append(
                loaded.problem(
                    ("models", name, "trust_remote_code"),
                    "runs the model repository's Python code: refused for an untrusted manifest",
                )
            )
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
        spec = loaded.manifest.models[name]
        command = isinstance(spec, CommandModel)
        out.append(
            loaded.problem(
                ("models", name, "command", 0) if command else ("models", name, "backend"),
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


def physical_gpus(loaded: LoadedManifest, name: str) -> tuple[str, ...]:
    """The GPUs a model will use, as ids comparable across models.

    A vLLM model without `gpus` uses the first TP x PP visible devices.
    """
    spec = loaded.manifest.models[name]
    if spec.gpus:
        return tuple(str(g) for g in spec.gpus)
    if isinstance(spec, VllmModel):
        n = vllm_backend.tensor_parallel(spec) * (spec.pipeline_parallel_size or 1)
        return tuple(str(i) for i in range(n))
    return ()


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
    """GPU -> {vLLM model: share of that GPU's memory it asks for}."""
    shares: dict[str, dict[str, float]] = {}
    for name, spec in loaded.manifest.models.items():
        if isinstance(spec, VllmModel):
            util = spec.gpu_memory_utilization or vllm_backend.DEFAULT_GPU_MEMORY_UTILIZATION
            for gpu in physical_gpus(loaded, name):
                shares.setdefault(gpu, {})[name] = util
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


def _check_ollama_room(loaded: LoadedManifest) -> list[Problem]:
    """An Ollama server loads onto any GPU it sees (every one, without `gpus`): warn
    when each of those that vLLM models use is already nearly all asked for."""
    models = loaded.manifest.models
    out = []
    gpu_users = _utilizations(loaded)
    near: dict[str, float] = {}
    for gpu, users in gpu_users.items():
        always = [u for n, u in users.items() if models[n].start == "always"]
        on_demand = [u for n, u in users.items() if models[n].start == "on_demand"]
        near[gpu] = sum(always) + max(on_demand, default=0.0)
    for name, spec in models.items():
        if not isinstance(spec, OllamaModel):
            continue
        sees = [str(g) for g in spec.gpus] or list(near)
        if not sees or any(near.get(g, 0.0) <= OLLAMA_ROOM_WARN for g in sees):
            continue
        full = "; ".join(f"GPU {g} at {near[g]:.2f} ({', '.join(gpu_users[g])})" for g in sees)
        where = "the GPUs in its gpus" if spec.gpus else "every GPU the vLLM models use"
        out.append(
            loaded.problem(
                ("models", name, "gpus") if spec.gpus else ("models", name),
                f"Ollama would load {spec.model} onto {where}, and vLLM models already "
                f"ask for nearly all of them: {full}; one of them will not find its "
                "memory (or Ollama runs on the CPU): give this model gpus with room, "
                "or lower the vLLM models' gpu_memory_utilization",
                "warning",
                key=not spec.gpus,
            )
        )
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


# ------------------------------------------------------------- per-model checks


def _check_vllm(loaded: LoadedManifest, name: str, m: VllmModel, flags: FlagTable) -> list[Problem]:
    out: list[Problem] = []
    at = ("models", name)
    if m.gpus:
        seen: set[str] = set()
        for i, g in enumerate(m.gpus):
            if str(g) in seen:
                out.append(loaded.problem((*at, "gpus", i), f"GPU {g} is listed twice"))
            seen.add(str(g))
        tp, pp = vllm_backend.tensor_parallel(m), m.pipeline_parallel_size or 1
        if tp * pp != len(m.gpus):
            out.append(
                loaded.problem(
                    (*at, "tensor_parallel_size"),
                    f"tensor_parallel_size x pipeline_parallel_size = {tp} x {pp} = {tp * pp}, "
                    f"but {len(m.gpus)} GPU(s) are listed in gpus; make them equal",
                )
            )
    values, version = flags.values, flags.version
    if m.kv_cache_dtype and m.kv_cache_dtype not in values["kv_cache_dtype"]:
        out.append(
            loaded.problem(
                (*at, "kv_cache_dtype"),
                f"vLLM {version} does not know kv_cache_dtype {m.kv_cache_dtype!r} "
                f"(known: {', '.join(values['kv_cache_dtype'])}); vLLM fails only after loading",
                "warning",
            )
        )
    if m.tool_call_parser and m.tool_call_parser not in values["tool_call_parsers"]:
        out.append(
            loaded.problem(
                (*at, "tool_call_parser"),
                f"vLLM {version} does not know tool_call_parser {m.tool_call_parser!r} "
                f"(e.g. hermes, llama3_json, mistral, qwen3_xml)",
                "warning",
            )
        )
    out += _check_extra_args(loaded, name, m, flags)
    return out


def _check_extra_args(
    loaded: LoadedManifest, name: str, m: VllmModel, flags: FlagTable
) -> list[Problem]:
    by_flag = {f: fld for fld, fs in vllm_backend.FIELD_FLAGS.items() for f in fs}
    out = []
    for i, arg in enumerate(m.extra_args):
        if not arg.startswith("-") or _is_number(arg):
            continue
        # As vLLM reads it (`--worker_cls` is `--worker-cls`, prefixes expand).
        flag = flags.resolve(arg) or arg.split("=", 1)[0]
        path = ("models", name, "extra_args", i)
        if flag in vllm_backend.CODE_FLAGS:
            msg = (
                f"{flag} makes vLLM load code named in the manifest; a vllm entry runs "
                "vLLM only: use `backend: command` to run a server you configure freely"
            )
            out.append(loaded.problem(path, msg))
        elif flag in vllm_backend.SECRET_FLAGS:
            use = vllm_backend.SECRET_FLAGS[flag]
            msg = f"{flag} would put a secret on the command line, visible in `ps`; use {use}"
            out.append(loaded.problem(path, msg))
        elif flag in by_flag:
            msg = f"{flag} duplicates the field `{by_flag[flag]}`; set that field instead"
            out.append(loaded.problem(path, msg))
        elif flag == "--enable-auto-tool-choice" and not m.tool_call_parser:
            msg = "--enable-auto-tool-choice needs a parser: set tool_call_parser (e.g. hermes)"
            out.append(loaded.problem(path, msg))
        elif flag == "--enable-auto-tool-choice":
            msg = "--enable-auto-tool-choice is implied by tool_call_parser; remove it"
            out.append(loaded.problem(path, msg, "warning"))
        elif flag not in flags.flags:
            out.append(_unknown_flag(loaded, path, flag, flags))
    return out


def _unknown_flag(
    loaded: LoadedManifest, path: tuple[str | int, ...], flag: str, flags: FlagTable
) -> Problem:
    """An error when the table is the installed vLLM's; a warning when it is a guess."""
    hint = f" (did you mean {s}?)" if (s := flags.suggest(flag)) else ""
    if flags.exact:
        msg = f"the installed vLLM {flags.version} has no flag {flag}{hint}: `vllm serve` exits 2"
        return loaded.problem(path, msg)
    msg = f"vLLM {flags.version} has no flag {flag}{hint}; `vllm serve` would exit ({flags.why})"
    return loaded.problem(path, msg, "warning")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_env(loaded: LoadedManifest, name: str) -> list[Problem]:
    spec = loaded.manifest.models[name]
    out = []
    owned = {"CUDA_VISIBLE_DEVICES": "gpus", "CUDA_DEVICE_ORDER": "gpus"} if spec.gpus else {}
    if isinstance(spec, OllamaModel):
        owned["OLLAMA_HOST"] = "host and port"
        owned.update({var: fld for fld, var in ollama_backend.KNOBS.items()})
    if isinstance(spec, VllmModel):
        owned["VLLM_API_KEY"] = "api_key or api_key_file"
    for var in spec.env:
        if var in vllm_backend.CODE_ENV and not isinstance(spec, CommandModel):
            out.append(
                loaded.problem(
                    ("models", name, "env", var),
                    f"{var} would change which code the server loads or runs; a "
                    f"{spec.backend} entry runs {spec.backend} only (use `backend: command`)",
                    key=True,
                )
            )
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", var):
            msg = f"{var!r} is not a valid environment variable name"
            out.append(loaded.problem(("models", name, "env", var), msg, key=True))
    for var, fld in owned.items():
        if var in spec.env:
            out.append(
                loaded.problem(
                    ("models", name, "env", var), f"{var} is set by llmsup from {fld}; set that"
                )
            )
    return out


def _check_ollama_group(loaded: LoadedManifest, names: list[str]) -> list[Problem]:
    """Models sharing one `ollama serve` must agree on its server-wide settings."""
    out = []
    models = [loaded.manifest.models[n] for n in names]
    first = models[0]
    assert isinstance(first, OllamaModel)
    base = ollama_backend.knob_env(first)
    for n, m in zip(names[1:], models[1:], strict=True):
        assert isinstance(m, OllamaModel)
        for fld, var in ollama_backend.KNOBS.items():
            mine = ollama_backend.knob_env(m).get(var)
            if mine is not None and base.get(var) not in (None, mine):
                out.append(
                    loaded.problem(
                        ("models", n, fld),
                        f"shares one `ollama serve` with {names[0]} (same host, port, gpus), "
                        f"which sets {fld} to {getattr(first, fld)!r}; server-wide settings "
                        "must agree, or give this model its own port",
                    )
                )
    for n, m in zip(names, models, strict=True):
        assert isinstance(m, OllamaModel)
        if m.kv_cache_type and m.kv_cache_type != "f16" and not m.flash_attention:
            out.append(
                loaded.problem(
                    ("models", n, "kv_cache_type"),
                    "Ollama ignores kv_cache_type without flash attention; "
                    "set flash_attention: true",
                    "warning",
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


def _check_served_names(loaded: LoadedManifest, launches: list[Launch]) -> list[Problem]:
    owner: dict[str, str] = {}
    out = []
    for la in launches:
        for model in la.models:
            spec = loaded.manifest.models[model]
            for served in spec.served_names:
                if served in owner and owner[served] != model:
                    named = isinstance(spec, VllmModel | CommandModel) and spec.served_name
                    out.append(
                        loaded.problem(
                            ("models", model, "served_name" if named else "model"),
                            f"served name {served!r} is already served by {owner[served]}; "
                            "requests could not tell them apart",
                        )
                    )
                owner.setdefault(served, model)
    return out


def _check_gateway(loaded: LoadedManifest, launches: list[Launch]) -> list[Problem]:
    gw = loaded.manifest.gateway
    if gw is None:
        return []
    served = {s for la in launches for s in la.served_names}
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
