"""`llmsup export kubernetes`, offline: golden files of the root manifest and the
examples; every object valid for Kubernetes 1.30 and 1.33 (kubernetes-validate,
strict) and by our own checks; `kubectl kustomize` renders each directory; no
secret value in any file; every refused field located.

Regenerate the golden files with `LLMSUP_UPDATE_GOLDEN=1 pytest tests/test_export_kubernetes.py`.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from llmsup.cli import main
from llmsup.errors import ManifestError
from llmsup.export import kubernetes, write
from llmsup.export.refusals import FIELDS
from llmsup.manifest import LoadedManifest, parse_manifest
from llmsup.plan import make_plan
from tests.k8scheck import lws_problems, own_problems, schema_problems

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden" / "kubernetes"
UPDATE = os.environ.get("LLMSUP_UPDATE_GOLDEN") == "1"
VERSIONS = ("1.30", "1.33")

# Recognisable values of every secret the manifests read: none may reach a file.
SECRETS = {
    "LLMSUP_GATEWAY_KEY": "gw-key-never-written-1f2e",
    "VLLM_API_KEY": "vllm-key-never-written-3c4d",
    "HF_TOKEN": "hf-token-never-written-5a6b",
}
# The examples' other variables: unset, so that the golden files are everyone's.
UNSET = ("LLAMACPP_PYTHON", "LLAMACPP_SERVER", "MODEL_PORT", "GATEWAY_PORT", "LLMSUP_STATE_DIR")
ENV: dict[str, str | None] = {
    **SECRETS,
    **dict.fromkeys(UNSET),
    "GEMMA_GGUF": "/models/gemma3-270m.gguf",
}
CASES: dict[str, tuple[str, list[str]]] = {
    # The root example less `embed`, which shares GPU 4 with qwen2.5-7b (refused below).
    "models": ("models.yaml", ["qwen2.5-32b", "qwen2.5-7b", "llama3.2-1b"]),
    "fakes": ("examples/fakes.yaml", []),
    "cpu-real-model": (
        "examples/cpu-real-model.yaml",
        ["--image", "gemma3-270m=ghcr.io/example/llamacpp-server:1.0"],
    ),
    "kubernetes": ("examples/kubernetes.yaml", ["--namespace", "llm", "--always-on"]),
}


@dataclass(frozen=True)
class Exported:
    dir: Path
    stdout: str
    stderr: str

    def objects(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for path in sorted(self.dir.glob("*.yaml")):
            for obj in yaml.safe_load_all(path.read_text()):
                yield path.name, obj


def run(args: list[str], env: dict[str, str | None] | None = None) -> Any:
    return CliRunner().invoke(main, ["export", "kubernetes", *args], env=env or ENV)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    out = {}
    for case, (manifest, args) in CASES.items():
        path = tmp_path_factory.mktemp("export") / case
        r = run(["-f", str(ROOT / manifest), "-o", str(path), *args])
        assert r.exit_code == 0, r.output
        out[case] = Exported(path, r.stdout, r.stderr)
    return out


def loaded_of(text: str, env: dict[str, str] | None = None) -> LoadedManifest:
    return parse_manifest(textwrap.dedent(text), "m.yaml", {**SECRETS, **(env or {})})


def export_of(text: str, **options: Any) -> kubernetes.Export:
    return kubernetes.export(loaded_of(text), [], kubernetes.Options(**options))


def objects_of(result: kubernetes.Export) -> dict[tuple[str, str], dict[str, Any]]:
    objs = [o for objs in result.files.values() for o in objs if o["kind"] != "Kustomization"]
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


def container(obj: dict[str, Any]) -> dict[str, Any]:
    c: dict[str, Any] = obj["spec"]["template"]["spec"]["containers"][0]
    return c


# ---------------------------------------------------------------- golden files


@pytest.mark.parametrize("case", CASES)
def test_the_files_are_the_golden_ones(case: str, exported: dict[str, Exported]) -> None:
    got = {p.name: p.read_text() for p in exported[case].dir.glob("*.yaml")}
    golden = GOLDEN / case
    if UPDATE:
        shutil.rmtree(golden, ignore_errors=True)
        shutil.copytree(exported[case].dir, golden)
    want = {p.name: p.read_text() for p in golden.glob("*.yaml")}
    hint = "if the change is meant, regenerate: LLMSUP_UPDATE_GOLDEN=1 pytest " + __file__
    assert sorted(got) == sorted(want), hint
    for name in want:
        assert got[name] == want[name], f"{case}/{name} differs; {hint}"


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_is_valid_for_kubernetes(version: str, exported: dict[str, Exported]) -> None:
    objs = [obj for e in exported.values() for _, obj in e.objects()]
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "Service", "LeaderWorkerSet", "PersistentVolumeClaim"} <= kinds
    assert schema_problems(objs, version) == []


def test_every_object_passes_our_own_checks(exported: dict[str, Exported]) -> None:
    problems = [p for e in exported.values() for _, obj in e.objects() for p in own_problems(obj)]
    assert problems == []
    sets = [o for e in exported.values() for _, o in e.objects() if o["kind"] == "LeaderWorkerSet"]
    assert sets and all(lws_problems(o) == [] for o in sets)


def test_our_checks_catch_what_the_schema_lets_through() -> None:
    """kubernetes-validate takes an unknown enum value or a bad quantity: ours do not."""
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "cache"},
        "spec": {"accessModes": ["ReadWriteOnse"], "resources": {"requests": {"storage": "1X"}}},
    }
    res = {"requests": {"nvidia.com/gpu": "two"}, "limits": {"nvidia.com/gpu": "two"}}
    pod = {
        "containers": [{"name": "c", "image": "i", "resources": res}],
        "restartPolicy": "Sometimes",
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "d"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "template": {"metadata": {"labels": {"a": "b"}}, "spec": pod},
        },
    }
    assert schema_problems([claim, deployment], "1.33") == []
    assert len(own_problems(claim)) == 2
    assert len(own_problems(deployment)) == 3
    lws = {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet"}
    bad = {**lws, "spec": {"leaderWorkerTemplate": {"size": 0, "leaderTemplat": {}}}}
    assert len(lws_problems(bad)) == 3  # unknown field, no workerTemplate, size 0


def test_the_schema_check_is_strict() -> None:
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {"prots": []}}
    assert "'prots' was unexpected" in " ".join(schema_problems([svc], "1.30"))


@pytest.mark.parametrize("case", CASES)
def test_kubectl_kustomize_renders_the_directory(case: str, exported: dict[str, Exported]) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH: `kubectl kustomize` cannot be tried here")
    e = exported[case]
    r = subprocess.run(
        [kubectl, "kustomize", str(e.dir)], capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == 0, r.stderr
    rendered = list(yaml.safe_load_all(r.stdout))
    mine = [o for _, o in e.objects() if o["kind"] != "Kustomization"]
    assert sorted((o["kind"], o["metadata"]["name"]) for o in rendered) == sorted(
        (o["kind"], o["metadata"]["name"]) for o in mine
    )
    namespace = "llm" if "--namespace" in CASES[case][1] else None
    assert {o["metadata"].get("namespace") for o in rendered} == {namespace}


# --------------------------------------------------------------------- secrets


def test_no_secret_value_reaches_a_file_or_the_output(
    exported: dict[str, Exported], tmp_path: Path
) -> None:
    key_file = tmp_path / "vllm.key"
    key_file.write_text("file-key-never-written-7e8f\n")
    gw_keys = tmp_path / "gateway.keys"
    gw_keys.write_text("gw-file-key-never-written-9a0b\n")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        textwrap.dedent(f"""\
        gateway: {{port: 9000, api_key_file: {gw_keys}, api_keys: ["${{LLMSUP_GATEWAY_KEY}}"]}}
        models:
          a:
            backend: vllm
            model: org/a
            gpus: [0]
            api_key_file: {key_file}
            env: {{MY_PASSWORD: pw-never-written-c1d2, HF_TOKEN: "${{HF_TOKEN}}", PLAIN: x}}
          b:
            backend: vllm
            model: org/b
            gpus: [1]
            port: 8001
            api_key: ${{VLLM_API_KEY}}
        """)
    )
    out = tmp_path / "out"
    r = run(["-f", str(manifest), "-o", str(out)])
    assert r.exit_code == 0, r.output
    values = [*SECRETS.values(), "file-key-never-written", "gw-file-key", "pw-never-written"]
    places = [(p, p.read_text()) for e in [*exported.values()] for p in e.dir.glob("*")]
    places += [(p, p.read_text()) for p in out.glob("*")]
    places += [(Path(f"output of {c}"), e.stdout + e.stderr) for c, e in exported.items()]
    places += [(Path("output"), r.output)]
    leaks = [(str(p), v) for p, text in places for v in values if v in text]
    assert leaks == []
    # Each secret is read from the one Secret; the command to make it names the key
    # file the manifest gives, and a placeholder for each other value.
    deployments = {
        o["metadata"]["name"]: o
        for _, o in Exported(out, "", "").objects()
        if o["kind"] == "Deployment"
    }
    env = {e["name"]: e for e in container(deployments["a"])["env"]}
    assert env["MY_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "llmsup-secrets",
        "key": "MY_PASSWORD",
    }
    assert env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "a.VLLM_API_KEY"
    assert env["PLAIN"] == {"name": "PLAIN", "value": "x"}
    assert f"--from-file=a.VLLM_API_KEY={key_file}" in r.stdout
    assert "--from-literal=b.VLLM_API_KEY='<VLLM_API_KEY of b>'" in r.stdout
    assert "--from-literal=HF_TOKEN='<HF_TOKEN of a>'" in r.stdout
    assert f"those of {gw_keys} and of api_keys" in r.stdout


def test_equal_secrets_share_one_key() -> None:
    result = export_of("""\
        models:
          a: {backend: vllm, model: org/a, gpus: [0], api_key: same}
          b: {backend: vllm, model: org/b, gpus: [1], port: 8001, api_key: same}
        """)
    assert "--from-literal=VLLM_API_KEY='<VLLM_API_KEY of a, b>'" in (result.secret_command or "")


# ----------------------------------------------------------------- the mapping


def test_argv_and_env_are_the_plans_listening_on_all_addresses() -> None:
    loaded = loaded_of((ROOT / "examples/fakes.yaml").read_text())
    plan = make_plan(loaded)
    objs = objects_of(kubernetes.export(loaded, [], kubernetes.Options()))
    for la in plan.launches:
        c = container(objs[("Deployment", la.unit.replace(".", "-"))])
        assert c["command"] == [a.replace("127.0.0.1", "0.0.0.0") for a in la.argv]
        env = {e["name"]: e["value"] for e in c["env"]}
        want = {
            k: v.replace("127.0.0.1", "0.0.0.0")
            for k, v in la.env.items()
            if not k.startswith("CUDA_")
        }
        assert {k: env[k] for k in want} == want
        assert not {"CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"} & env.keys()
        assert env.keys() - want.keys() == (
            {"OLLAMA_MODELS"} if la.backend == "ollama" else {"HF_HOME"}
        )
        claims = c.get("resources", {}).get("limits", {})
        assert claims.get("nvidia.com/gpu", "0") == str(len(la.gpus))


def test_a_dollar_stays_a_dollar() -> None:
    """Kubernetes expands $(VAR) in command and env: the plan's `$` arrive as `$$`."""
    result = export_of("""\
        models:
          a:
            backend: vllm
            model: org/a
            extra_args: [--chat-template, "{{ $(x) }}"]
            env: {GREETING: "costs $5"}
        """)
    c = container(objects_of(result)[("Deployment", "a")])
    assert c["command"][-1] == "{{ $$(x) }}"
    assert {"name": "GREETING", "value": "costs $$5"} in c["env"]


@pytest.mark.parametrize(
    ("startup", "interval", "period", "threshold"),
    [("20m", "10s", 10, 120), ("95s", "10s", 10, 10), ("1m", "0.5s", 1, 60), ("7s", "3s", 3, 3)],
)
def test_the_startup_probe_allows_startup_timeout(
    startup: str, interval: str, period: int, threshold: int
) -> None:
    result = export_of(f"""\
        defaults:
          health: {{startup_timeout: {startup}, interval: {interval}, timeout: 2.5s, failures: 4}}
          stop_timeout: 7.5s
        models:
          a: {{backend: vllm, model: org/a}}
        """)
    c = container(objects_of(result)[("Deployment", "a")])
    start, alive = c["startupProbe"], c["livenessProbe"]
    assert (start["periodSeconds"], start["failureThreshold"]) == (period, threshold)
    seconds = kubernetes_seconds(startup)
    assert start["periodSeconds"] * start["failureThreshold"] >= seconds
    assert alive == {
        "httpGet": {"path": "/health", "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": 4,
    }
    assert c["readinessProbe"] == alive
    pod = objects_of(result)[("Deployment", "a")]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 8


def kubernetes_seconds(text: str) -> float:
    from llmsup.fields import parse_duration

    return math.ceil(parse_duration(text))


def test_gpus_become_a_count_and_shared_memory_above_one() -> None:
    result = export_of("""\
        models:
          one: {backend: vllm, model: org/a, gpus: [3]}
          tp: {backend: vllm, model: org/b, port: 8001, tensor_parallel_size: 2}
          cpu: {backend: ollama, model: qwen2.5:0.5b}
        """)
    objs = objects_of(result)

    def shape(name: str) -> tuple[str | None, bool]:
        c = container(objs[("Deployment", name)])
        gpus = c.get("resources", {}).get("requests", {}).get("nvidia.com/gpu")
        return gpus, any(m["mountPath"] == "/dev/shm" for m in c["volumeMounts"])

    assert shape("one") == ("1", False)
    assert shape("tp") == ("2", True)  # no gpus listed: TP x PP of them
    assert shape("cpu") == (None, False)
    assert "cpu asks for no GPU: its pod runs it on the CPU (list gpus to ask)" in result.notes
    assert any("GPU indices are not exported" in n and "gpu: one 1)" in n for n in result.notes)


def test_ollama_pulls_and_preloads_before_it_counts_as_started() -> None:
    result = export_of("""\
        models:
          a: {backend: ollama, model: "qwen2.5:7b", keep_alive: -1, num_parallel: 2}
          b: {backend: ollama, model: "hf.co/u/r:Q8_0", keep_alive: 10m}
        """)
    c = container(objects_of(result)[("Deployment", "a")])
    script = c["lifecycle"]["postStart"]["exec"]["command"]
    assert script[:2] == ["/bin/sh", "-c"]
    assert script[2].split(" && ")[1:] == [
        "ollama pull qwen2.5:7b",
        "ollama run --keepalive=-1s qwen2.5:7b ''",
        "ollama pull hf.co/u/r:Q8_0",
        "ollama run --keepalive=10m hf.co/u/r:Q8_0 ''",
    ]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["OLLAMA_NUM_PARALLEL"] == "2"
    assert env["OLLAMA_HOST"] == "0.0.0.0:11434"
    assert c["startupProbe"]["httpGet"]["path"] == "/"


def test_a_model_across_nodes_is_a_leader_worker_set(exported: dict[str, Exported]) -> None:
    objs = {
        (o["kind"], o["metadata"]["name"]): o
        for _, o in exported["kubernetes"].objects()
        if o["kind"] != "Kustomization"
    }
    lws = objs[("LeaderWorkerSet", "llama-405b")]
    lwt = lws["spec"]["leaderWorkerTemplate"]
    assert (lwt["size"], lwt["restartPolicy"]) == (2, "RecreateGroupOnPodRestart")
    leader = lwt["leaderTemplate"]["spec"]["containers"][0]
    worker = lwt["workerTemplate"]["spec"]["containers"][0]
    multi = ["--nnodes", "$(LWS_GROUP_SIZE)", "--node-rank", "$(LWS_WORKER_INDEX)"]
    multi += ["--master-addr", "$(LWS_LEADER_ADDRESS)"]
    assert " ".join(multi) in " ".join(leader["command"])
    assert leader["command"][-1] != "--headless" and worker["command"][-1] == "--headless"
    assert worker["command"][:-1] == leader["command"]
    assert "--pipeline-parallel-size 2 " in " ".join(leader["command"])  # one stage a node
    assert "startupProbe" in leader and "livenessProbe" in leader
    assert not {"startupProbe", "readinessProbe", "livenessProbe", "ports"} & worker.keys()
    assert leader["resources"]["limits"] == {"nvidia.com/gpu": "8"}  # gpus: on each node
    # LeaderWorkerSet makes a headless Service of the set's name for its pods: ours is
    # the leader's, apart.
    service = objs[("Service", "llama-405b-leader")]
    assert service["spec"]["selector"]["role"] == "leader"
    assert lwt["leaderTemplate"]["metadata"]["labels"]["role"] == "leader"


def test_the_gateway_routes_to_the_services_as_remote_models(
    exported: dict[str, Exported],
) -> None:
    objs = {
        (o["kind"], o["metadata"]["name"]): o
        for _, o in exported["kubernetes"].objects()
        if o["kind"] != "Kustomization"
    }
    config = yaml.safe_load(objs[("ConfigMap", "llmsup-gateway")]["data"]["models.yaml"])
    models = config["models"]
    assert models["llama-405b"]["backend"] == "remote"
    assert models["llama-405b"]["urls"] == ["http://llama-405b-leader.llm.svc:8000"]
    assert models["embed"]["urls"] == ["http://embed.llm.svc:11434"]
    assert models["llama-405b"]["served_name"] == ["llama-405b"]
    assert models["qwen3-8b"]["api_key"] == "${UPSTREAM_VLLM_API_KEY}"
    assert models["embed"]["health"] == {"interval": 10.0, "timeout": 5.0, "failures": 3}
    assert config["gateway"]["aliases"] == {"gpt-4o": "llama-405b"}
    assert config["gateway"]["host"] == "0.0.0.0"
    deployment = objs[("Deployment", "llmsup-gateway")]
    c = container(deployment)
    assert c["command"] == ["llmsup", "up", "-f", "/etc/llmsup/models.yaml"]
    upstream = {e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in c["env"]}
    model_env = lws_env(objs[("LeaderWorkerSet", "llama-405b")])
    assert upstream == {"UPSTREAM_VLLM_API_KEY": model_env["VLLM_API_KEY"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    key_path = volumes["keys"]["secret"]["items"][0]["path"]
    assert config["gateway"]["api_key_file"] == f"{mounts['keys']}/{key_path}"


def lws_env(obj: dict[str, Any]) -> dict[str, str]:
    c = obj["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]
    return {e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in c["env"] if "valueFrom" in e}


def test_images_follow_the_vllm_version() -> None:
    text = "models:\n  a: {backend: vllm, model: org/a}\n"
    default = export_of(text)
    assert (
        container(objects_of(default)[("Deployment", "a")])["image"] == "vllm/vllm-openai:v0.33.0"
    )
    assert default.vllm_flags.version == "0.33"
    older = export_of(text, images={"vllm": "vllm/vllm-openai:v0.32.0"})
    assert older.vllm_flags.version == "0.32" and older.vllm_flags.exact
    assert container(objects_of(older)[("Deployment", "a")])["image"] == "vllm/vllm-openai:v0.32.0"
    custom = export_of(text, images={"vllm": "registry.local/vllm:prod"})
    assert custom.vllm_flags.version == "0.33" and not custom.vllm_flags.exact
    assert any("its tag names no vLLM version" in n for n in custom.notes)


def test_on_demand_models_run_always_with_always_on() -> None:
    result = export_of(
        """\
        gateway: {port: 9000}
        models:
          a: {backend: vllm, model: org/a, start: on_demand, idle_timeout: 5m}
        """,
        always_on=True,
    )
    assert ("Deployment", "a") in objects_of(result)
    assert "a is on_demand: exported always on (--always-on), without its idle_timeout" in (
        result.notes
    )


def test_host_only_fields_are_noted_where_they_are_set() -> None:
    result = export_of("""\
        state_dir: /srv/llmsup
        defaults:
          restart: {backoff_initial: 2s, window: 5m}
        models:
          a: {backend: ollama, model: "qwen2.5:7b", gpu_memory: 6G}
        """)
    notes = [str(p) for p in result.problems if p.severity == "note"]
    assert notes == [
        "m.yaml:1:12: note: state_dir: not exported: a cluster keeps no daemon state",
        "m.yaml:3:30: note: defaults.restart.backoff_initial: not exported (nor restart.window): "
        "the kubelet's own restart backoff (10s doubling to 5m, never given up)",
        "m.yaml:5:57: note: models.a.gpu_memory: not exported: the scheduler gives whole GPUs",
    ]


def test_every_field_of_the_manifest_maps_or_is_refused() -> None:
    """FIELDS classifies each field of every manifest class, and nothing else."""
    from pydantic import BaseModel

    from llmsup.backends import REGISTRY
    from llmsup.fields import HealthOverride, ModelBase, RestartOverride
    from llmsup.manifest import Manifest

    def keys(cls: type[BaseModel], prefix: str) -> set[str]:
        out = set()
        for name, info in cls.model_fields.items():
            sub = [a for a in getattr(info.annotation, "__args__", (info.annotation,))]
            models = [a for a in sub if isinstance(a, type) and issubclass(a, BaseModel)]
            if name == "models":
                continue
            if models and models[0] not in (HealthOverride, RestartOverride):
                out |= keys(models[0], f"{prefix}{name}.")
            elif models:
                out |= {f"{name}.{f}" for f in models[0].model_fields}
            else:
                out.add(f"{prefix}{name}")
        return out

    want = keys(Manifest, "")
    for backend in REGISTRY.values():
        for name in backend.model.model_fields:
            if name in ("health", "restart"):
                continue
            shared = name in ModelBase.model_fields or name == "backend"
            want.add(f"{'model' if shared else backend.name}.{name}")
    assert sorted(want) == sorted(FIELDS)


# --------------------------------------------------------------------- refusals

BASE = """\
gateway: {port: 9000}
defaults:
  restart: {policy: on-failure}
models:
  a:
    backend: vllm
    model: org/a
    gpus: [0]
"""
B = "  b:\n    backend: vllm\n    model: org/b\n    port: 8001\n"
# case -> (manifest, the refused key path, a text on its line, the text it points at)
REFUSED = {
    "on_demand": (BASE + B + "    start: on_demand\n", "models.b.start", "start: on", "on_demand"),
    "idle_timeout": (
        BASE + B + "    start: on_demand\n    idle_timeout: 5m\n",
        "models.b.idle_timeout",
        "idle_timeout:",
        "5m",
    ),
    "exclusive": (
        BASE + B + "    start: on_demand\n    exclusive: big\n",
        "models.b.exclusive",
        "exclusive:",
        "big",
    ),
    "restart never": (
        BASE + B + "    restart: {policy: never}\n",
        "models.b.restart.policy",
        "{policy: never}",
        "never",
    ),
    "restart never by default": (
        BASE.replace("on-failure", "never") + B,
        "defaults.restart.policy",
        "{policy: never}",
        "never",
    ),
    "deep_probe": (
        BASE + B + "    health: {deep_probe: true}\n",
        "models.b.health.deep_probe",
        "deep_probe:",
        "true",
    ),
    "a GPU shared": (BASE + B + "    gpus: [1, 0]\n", "models.b.gpus[1]", "gpus: [1, 0]", "0"),
    "a command without image": (
        BASE
        + "  b:\n    backend: command\n    command: [server, --port, '8001']\n    port: 8001\n",
        "models.b.command",
        "command: [",
        "[",
    ),
    "two names, one DNS label": (
        BASE + "  A:\n    backend: vllm\n    model: org/b\n    port: 8001\n",
        "models.A",
        "  A:",
        "A",
    ),
    "a multi-node flag": (
        BASE + B + "    nodes: 2\n    extra_args: [--nnodes, '2']\n",
        "models.b.extra_args[0]",
        "extra_args:",
        "--nnodes",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_kubernetes_cannot_express_is_a_located_error(case: str) -> None:
    text, key, line_has, value = REFUSED[case]
    lines = text.splitlines()
    line = next(i for i, ln in enumerate(lines, 1) if line_has in ln)
    here = lines[line - 1]
    column = here.index(value, here.index(line_has)) + 1
    with pytest.raises(ManifestError) as e:
        kubernetes.export(loaded_of(text), [], kubernetes.Options())
    found = [(p.line, p.column) for p in e.value.errors if p.path == key]
    assert found == [(line, column)], [str(p) for p in e.value.problems]


def test_the_command_exits_2_with_file_line_column(tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(BASE + B + "    start: on_demand\n")
    r = run(["-f", str(manifest), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2
    assert f"{manifest}:13:12: models.b.start: on_demand: a Kubernetes Deployment" in r.stderr
    assert not (tmp_path / "out").exists()


def test_the_root_manifest_is_refused_for_its_shared_gpu(tmp_path: Path) -> None:
    r = run(["-f", str(ROOT / "models.yaml"), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2
    assert "models.yaml:58:12: models.embed.gpus[0]: GPU 4 is also in the gpus of qwen2.5-7b" in (
        r.stderr
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--models-pvc", "cache", "--pvc-size", "1Ti"], "exclude each other"),
        (["--pvc-size", "lots"], "'lots' is no Kubernetes quantity"),
        (["--namespace", "LLM"], "'LLM' is no namespace name"),
        (["--models-pvc", "My_Cache"], "'My_Cache' is no claim name"),
        (["--image", "vllm"], "'vllm' is not NAME=IMAGE"),
        (["--image", "nope=img:1"], "no model or image kind named nope"),
    ],
)
def test_bad_options_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    r = run(["-f", str(ROOT / "examples/fakes.yaml"), "-o", str(tmp_path / "o"), *args])
    assert r.exit_code == 2
    assert message in r.output


def test_an_existing_claim_is_mounted_and_none_written() -> None:
    result = export_of("models:\n  a: {backend: vllm, model: org/a}\n", models_pvc="shared.cache")
    assert "llmsup-models.yaml" not in result.files
    pod = objects_of(result)[("Deployment", "a")]["spec"]["template"]["spec"]
    assert pod["volumes"][0] == {
        "name": "models",
        "persistentVolumeClaim": {"claimName": "shared.cache"},
    }
    assert result.files["kustomization.yaml"][0]["resources"] == ["a.yaml"]


def test_unknown_models_are_named(tmp_path: Path) -> None:
    r = run(["-f", str(ROOT / "examples/fakes.yaml"), "-o", str(tmp_path / "o"), "nope"])
    assert r.exit_code == 1
    assert "no model named nope (known: qwen2.5-7b, embed, llama3.2-1b)" in r.output


# ------------------------------------------------------------------------ nodes


def test_nodes_above_one_is_a_located_error_on_one_host(tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text("models:\n  big:\n    backend: vllm\n    model: org/big\n    nodes: 2\n")
    r = CliRunner().invoke(main, ["plan", "-f", str(manifest)])
    assert r.exit_code == 2
    assert (
        f"{manifest}:5:12: models.big.nodes: nodes > 1 runs only under "
        "`llmsup export kubernetes`" in r.stderr
    )


def test_nodes_is_a_vllm_field() -> None:
    with pytest.raises(ManifestError) as e:
        loaded_of("models:\n  a: {backend: ollama, model: x, nodes: 2}\n")
    assert [(p.path, p.message) for p in e.value.problems] == [
        ("models.a", "unknown key 'nodes' (did you mean 'model'?)")
    ]


def test_nodes_multiply_the_gpus_tensor_and_pipeline_parallel_must_fill() -> None:
    text = "models:\n  big: {backend: vllm, model: org/big, nodes: 2, gpus: [0, 1], %s}\n"
    ok = make_plan(loaded_of(text % "tensor_parallel_size: 2"), one_host=False)
    assert ok.errors == []
    assert "--pipeline-parallel-size 2" in " ".join(ok.launches[0].argv)
    bad = make_plan(loaded_of(text % "pipeline_parallel_size: 1"), one_host=False)
    assert [p.message for p in bad.errors] == [
        "tensor_parallel_size x pipeline_parallel_size = 2 x 1 = 2, but 2 GPU(s) are listed "
        "in gpus, on each of 2 nodes (4 in all); make them equal"
    ]


# ----------------------------------------------------------------------- writer


def test_a_new_export_removes_what_an_earlier_one_wrote_and_nothing_else(tmp_path: Path) -> None:
    (tmp_path / "mine.yaml").write_text("kind: Note\n")
    write.write(tmp_path, {"a.yaml": [{"kind": "A"}], "b.yaml": [{"kind": "B"}]}, "m.yaml")
    write.write(tmp_path, {"a.yaml": [{"kind": "A2"}]}, "m.yaml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.yaml", "mine.yaml"]
    assert "kind: A2" in (tmp_path / "a.yaml").read_text()


def test_warnings_and_notes_say_what_the_cluster_changes(exported: dict[str, Exported]) -> None:
    real = exported["cpu-real-model"].stderr
    assert (
        "cpu-real-model.yaml:24:15: warning: models.gemma3-270m.command[7]: '127.0.0.1': a "
        "server that listens on loopback in its pod is out of its Service's reach" in real
    )
    assert "note: the gateway has no api_keys: whatever reaches its Service" in real
    assert "note: gemma3-270m asks for no GPU" in real
    assert "cpu-real-model.yaml:10:12: note: state_dir: not exported" in real
    out = exported["kubernetes"].stdout
    assert "kubectl create secret generic llmsup-secrets --namespace llm" in out
    assert "Then: kubectl apply -k " in out


def test_secrets_need_not_be_set_where_the_export_runs(tmp_path: Path) -> None:
    """The pods read secrets from the Secret: a `${VAR}` holding one may be unset on
    the exporting machine. One whose value an object would carry is refused, located."""
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        textwrap.dedent("""\
        gateway: {port: 9000, api_keys: ["${UNSET_GATEWAY_KEY}"]}
        models:
          a:
            backend: vllm
            model: org/a
            gpus: [0]
            api_key: ${UNSET_VLLM_KEY}
            env: {HF_TOKEN: "${UNSET_HF_TOKEN}"}
        """)
    )
    unset: dict[str, str | None] = {
        "UNSET_GATEWAY_KEY": None,
        "UNSET_VLLM_KEY": None,
        "UNSET_HF_TOKEN": None,
        "UNSET_MODEL": None,
    }
    out = tmp_path / "out"
    r = run(["-f", str(manifest), "-o", str(out)], env={**ENV, **unset})
    assert r.exit_code == 0, r.output
    assert "note: UNSET_VLLM_KEY is not set here: the pods read it from the Secret" in r.output
    assert not [p for p in out.glob("*") if "llmsup-unset" in p.read_text()]
    env = {
        e["name"]: e
        for e in container(
            next(o for _, o in Exported(out, "", "").objects() if o["kind"] == "Deployment")
        )["env"]
    }
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "HF_TOKEN"

    manifest.write_text(manifest.read_text().replace("model: org/a", "model: ${UNSET_MODEL}"))
    r = run(["-f", str(manifest), "-o", str(tmp_path / "out2")], env={**ENV, **unset})
    assert r.exit_code == 2, r.output
    assert f"{manifest}:5:12: models.a.model: environment variable UNSET_MODEL is not set" in (
        r.output
    )
    assert not (tmp_path / "out2").exists()
