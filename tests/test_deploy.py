"""The deployment artefacts agree with the code: Dockerfile, compose, Kubernetes, dashboards.

Offline; every test but the last runs in seconds. Kubernetes manifests are rendered with
`kubectl kustomize` when kubectl is installed, else with a small renderer below that
knows only what our kustomizations use (it refuses anything else), and validated against
the Kubernetes JSON schemas that `kubernetes_validate` ships. KEDA's ScaledObject and
TriggerAuthentication are CRDs with no schema there: `_check_keda` checks their
structure instead (explicitly, not silently).

The last test runs real processes, a redis-server and a `swarm worker`, to show that the
liveness command (`swarm healthcheck`) passes on a live worker and fails once the broker
is gone (15-40 s, mostly Python start-up of the worker and of two probe runs).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import typer
import yaml

from swarm_workers.cli import app as cli_app
from swarm_workers.config import Settings, load_settings
from swarm_workers.localfleet import ProcessGroup
from swarm_workers.models import Priority
from swarm_workers.queues import ALL_PRIORITIES, queue_name

from .conftest import RedisServer, WorkerFactory, spawn_redis, wait_until

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "swarm-workers.json"

# A version kubernetes_validate ships schemas for (it has 1.33 to 1.37); the oldest one
# keeps the manifests valid on clusters that are not the newest.
K8S_VERSION = "1.33.0"
IMAGE = "swarm-workers"  # the name the manifests use; overlays rewrite it with `images:`
KEDA_API = "keda.sh/v1alpha1"

# The metric contract the dashboard is built on (name -> kind, labels).
METRICS: dict[str, tuple[str, set[str]]] = {
    "swarm_tasks_total": ("counter", {"role", "priority", "outcome"}),
    "swarm_task_queue_wait_seconds": ("histogram", {"role", "priority"}),
    "swarm_task_run_seconds": ("histogram", {"role", "priority"}),
    "swarm_llm_request_seconds": ("histogram", {"model"}),
    "swarm_llm_tokens_total": ("counter", {"model", "direction"}),
    "swarm_llm_cost_usd_total": ("counter", {"model"}),
    "swarm_tool_calls_total": ("counter", {"server", "outcome"}),
    "swarm_breaker_state": ("gauge", {"server"}),
    "swarm_bucket_wait_seconds": ("histogram", {"model", "priority"}),
    "swarm_llm_429_total": ("counter", {"model"}),
    "swarm_queue_depth": ("gauge", {"role", "priority"}),
}


# --------------------------------------------------------------------------- helpers


def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SWARM_* or REDIS_URL from the developer's shell leaks into load_settings."""
    for name in list(os.environ):
        if name.startswith("SWARM_") or name == "REDIS_URL":
            monkeypatch.delenv(name)


def _load_toml_text(text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    _clean_env(monkeypatch)
    path = tmp_path / "swarm.toml"
    path.write_text(text)
    return load_settings(path)


def _cli_commands() -> dict[str, Any]:
    """Registered `swarm` subcommands (typer ships its own click: duck-typed here)."""
    return dict(typer.main.get_command(cli_app).commands)  # type: ignore[attr-defined]


def _check_swarm_argv(argv: list[str], where: str) -> None:
    """argv (after the `swarm` entrypoint) names a registered command and its options."""
    assert argv, f"{where}: no swarm command"
    commands = _cli_commands()
    name = argv[0]
    if name not in commands:
        pytest.fail(f"{where}: `swarm {name}` is not a command; have {sorted(commands)}")
    command = commands[name]
    options = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    passes_extra = bool(command.context_settings.get("ignore_unknown_options"))
    for token in argv[1:]:
        if token.startswith("-"):
            option = token.split("=", 1)[0]
            assert option in options or passes_extra, (
                f"{where}: `swarm {name}` has no option {option}; it has {sorted(options)}"
            )


def _parse_worker_argv(argv: list[str]) -> tuple[list[str], list[Priority]]:
    """Roles and priorities of a `worker` argv, the way `swarm worker` reads them."""
    assert argv[0] == "worker", argv
    roles: list[str] = []
    priorities: list[Priority] = list(ALL_PRIORITIES)
    tokens = iter(argv[1:])
    for token in tokens:
        if token in ("--role", "-r"):
            roles.append(next(tokens))
        elif token == "--priorities":
            priorities = [Priority(p) for p in next(tokens).split(",") if p.strip()]
        elif token.startswith("--priorities="):
            priorities = [Priority(p) for p in token.split("=", 1)[1].split(",") if p.strip()]
        elif token.startswith("--role="):
            roles.append(token.split("=", 1)[1])
    assert roles, f"worker argv without --role: {argv}"
    return roles, priorities


def _duration_s(text: str | int | float) -> float:
    """Compose durations: '11m', '660s', '1h30m', or a bare number of seconds."""
    if isinstance(text, int | float):
        return float(text)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert "".join(n + u for n, u in parts) == text, f"bad duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


# --------------------------------------------------------------------------- kustomize


def _load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _kubectl_render(path: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


_SUPPORTED_KEYS = {
    "apiVersion",
    "kind",
    "resources",
    "components",
    "namespace",
    "patches",
    "images",
}
_CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "StorageClass"}


def _fallback_render(path: Path) -> list[dict[str, Any]]:
    """A tiny kustomize: resources, components, namespace, patches (strategic merge by
    name or target) and images. Anything else in a kustomization is refused."""
    kust = yaml.safe_load((path / "kustomization.yaml").read_text())
    unsupported = set(kust) - _SUPPORTED_KEYS
    assert not unsupported, f"{path}: the fallback renderer does not support {unsupported}"
    docs: list[dict[str, Any]] = []
    for entry in kust.get("resources", []):
        target = path / entry
        docs += _fallback_render(target) if target.is_dir() else _load_docs(target)
    for entry in kust.get("components", []):
        component = yaml.safe_load((path / entry / "kustomization.yaml").read_text())
        unsupported = set(component) - _SUPPORTED_KEYS
        assert not unsupported, f"{entry}: the fallback renderer does not support {unsupported}"
        for res in component.get("resources", []):
            docs += _load_docs(path / entry / res)
        docs = _apply_patches(docs, component.get("patches", []), path / entry)
    docs = _apply_patches(docs, kust.get("patches", []), path)
    if "namespace" in kust:
        for doc in docs:
            if doc["kind"] == "Namespace":
                doc["metadata"]["name"] = kust["namespace"]
            elif doc["kind"] not in _CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = kust["namespace"]
    for image in kust.get("images", []):
        for doc in docs:
            for container in _containers(doc):
                name = re.split(r"[:@]", container["image"], maxsplit=1)[0]
                if name == image["name"]:
                    tag = image.get("newTag")
                    container["image"] = image.get("newName", name) + (f":{tag}" if tag else "")
    return docs


def _apply_patches(
    docs: list[dict[str, Any]], patches: list[dict[str, Any]], base: Path
) -> list[dict[str, Any]]:
    for entry in patches:
        assert set(entry) <= {"path", "patch", "target"}, f"unsupported patch entry {entry}"
        text = (base / entry["path"]).read_text() if "path" in entry else entry["patch"]
        for patch in [p for p in yaml.safe_load_all(text) if p]:
            target = entry.get("target") or {
                "kind": patch["kind"],
                "name": patch["metadata"]["name"],
            }
            matched = [doc for doc in docs if _selected(doc, target)]
            assert matched, f"patch {entry} matches nothing"
            if patch.get("$patch") == "delete":
                docs = [doc for doc in docs if not any(doc is m for m in matched)]
                continue
            body = copy.deepcopy(patch)
            if "target" in entry:  # the patch's own name is a placeholder
                body["metadata"].pop("name", None)
            for doc in matched:
                merged = _merge(doc, body)
                doc.clear()
                doc.update(merged)
    return docs


def _selected(doc: dict[str, Any], target: dict[str, Any]) -> bool:
    if "kind" in target and doc["kind"] != target["kind"]:
        return False
    if "name" in target and doc["metadata"]["name"] != target["name"]:
        return False
    if "labelSelector" in target:
        labels = doc["metadata"].get("labels", {})
        for term in target["labelSelector"].split(","):
            key, value = term.split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
    return True


def _merge(base: Any, patch: Any) -> Any:
    """Strategic merge, the part we use: maps merge, lists of named maps merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(item, dict) and "name" in item for item in [*base, *patch])
    ):
        items = list(base)
        index = {item["name"]: i for i, item in enumerate(items)}
        for item in patch:
            if item["name"] in index:
                items[index[item["name"]]] = _merge(items[index[item["name"]]], item)
            else:
                items.append(copy.deepcopy(item))
        return items
    return copy.deepcopy(patch)


def render(path: Path) -> list[dict[str, Any]]:
    return _kubectl_render(path) if shutil.which("kubectl") else _fallback_render(path)


def _variant_dir(tmp_path: Path) -> Path:
    """The example overlay with every optional component switched on."""
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree)
    components = sorted(p.name for p in (K8S / "components").iterdir() if p.is_dir())
    variant = tree / "overlays" / "variant"
    variant.mkdir()
    (variant / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": "swarm",
                "resources": ["../example"],
                "components": [f"../../components/{name}" for name in components],
            }
        )
    )
    return variant


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    variant = _variant_dir(tmp_path_factory.mktemp("kustomize"))
    return {
        "base": render(K8S / "base"),
        "example": render(K8S / "overlays" / "example"),
        "variant": render(variant),
    }


def _find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = _find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        spec: dict[str, Any] = doc["spec"]["template"]["spec"]
        return spec
    return None


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = _pod_spec(doc)
    if spec is None:
        return []
    return [*spec.get("initContainers", []), *spec["containers"]]


def _workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if _pod_spec(d) is not None]


def _swarm_containers(docs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) for every container running our image."""
    return [
        (doc, c)
        for doc in _workloads(docs)
        for c in _containers(doc)
        if re.split(r"[:@]", c["image"].rsplit("/", 1)[-1], maxsplit=1)[0] == IMAGE
    ]


def _worker_deployments(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        d
        for d in _find(docs, "Deployment")
        if d["spec"]["template"]["spec"]["containers"][0].get("args", [""])[0] == "worker"
    ]


def _k8s_settings(
    docs: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    config = _one(docs, "ConfigMap", "swarm-config")
    return _load_toml_text(config["data"]["swarm.toml"], tmp_path, monkeypatch)


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        present, value = expr["key"] in labels, labels.get(expr["key"])
        op = expr["operator"]
        if (op == "In" and value not in expr["values"]) or (
            op == "NotIn" and value in expr["values"]
        ):
            return False
        if (op == "Exists" and not present) or (op == "DoesNotExist" and present):
            return False
    return True


def _pod_labels(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, str]]]:
    return [
        (d["metadata"]["name"], d["spec"]["template"]["metadata"]["labels"])
        for d in _workloads(docs)
    ]


# --------------------------------------------------------------------------- KEDA (CRDs)

_SCALED_OBJECT_SPEC = {
    "scaleTargetRef",
    "minReplicaCount",
    "maxReplicaCount",
    "idleReplicaCount",
    "pollingInterval",
    "cooldownPeriod",
    "initialCooldownPeriod",
    "fallback",
    "advanced",
    "triggers",
}
_REDIS_TRIGGER_METADATA = {
    "address",
    "addressFromEnv",
    "host",
    "port",
    "listName",
    "listLength",
    "activationListLength",
    "databaseIndex",
    "enableTLS",
    "unsafeSsl",
    "usernameFromEnv",
    "passwordFromEnv",
}


def _check_keda(doc: dict[str, Any], docs: list[dict[str, Any]]) -> None:
    """KEDA CRDs are not in kubernetes_validate: check the structure we rely on."""
    assert doc["apiVersion"] == KEDA_API, doc["apiVersion"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    spec = doc["spec"]
    if doc["kind"] == "TriggerAuthentication":
        assert set(spec) == {"secretTargetRef"}, set(spec)
        for ref in spec["secretTargetRef"]:
            assert set(ref) == {"parameter", "name", "key"}, ref
            assert all(isinstance(v, str) and v for v in ref.values()), ref
        return
    assert doc["kind"] == "ScaledObject", doc["kind"]
    assert set(spec) <= _SCALED_OBJECT_SPEC, set(spec) - _SCALED_OBJECT_SPEC
    assert isinstance(spec["scaleTargetRef"]["name"], str)
    assert _find(docs, "Deployment", spec["scaleTargetRef"]["name"]), spec["scaleTargetRef"]
    low, high = spec["minReplicaCount"], spec["maxReplicaCount"]
    assert isinstance(low, int)
    assert isinstance(high, int)
    assert 0 <= low <= high
    if "fallback" in spec:
        assert set(spec["fallback"]) == {"failureThreshold", "replicas"}
        assert low <= spec["fallback"]["replicas"] <= high
    behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
    if behavior is not None:  # the HPA's own schema: validate it as an HPA would be
        hpa = {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": doc["metadata"]["name"]},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
                "maxReplicas": high,
                "behavior": behavior,
            },
        }
        kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)
    assert spec["triggers"], "a ScaledObject needs triggers"
    for trigger in spec["triggers"]:
        assert set(trigger) <= {"type", "name", "metadata", "authenticationRef"}, trigger
        assert trigger["type"] == "redis", trigger["type"]
        metadata = trigger["metadata"]
        # KEDA's metadata is map[string]string: a YAML number here is rejected.
        assert all(isinstance(v, str) for v in metadata.values()), metadata
        assert set(metadata) <= _REDIS_TRIGGER_METADATA, set(metadata) - _REDIS_TRIGGER_METADATA
        assert metadata["listName"]
        assert int(metadata["listLength"]) > 0
        auth = trigger.get("authenticationRef", {}).get("name")
        assert auth or "address" in metadata or "addressFromEnv" in metadata, trigger
        if auth:
            assert _find(docs, "TriggerAuthentication", auth), f"no TriggerAuthentication {auth}"


# --------------------------------------------------------------------------- k8s: schema


@pytest.mark.parametrize("variant", ["base", "example", "variant"])
def test_every_manifest_is_valid_for_kubernetes(
    rendered: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    docs = rendered[variant]
    assert docs
    crds = 0
    for doc in docs:
        if doc["apiVersion"].startswith("keda.sh/"):
            _check_keda(doc, docs)  # CRD: structural check, not a schema
            crds += 1
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{variant}: {doc['kind']}/{doc['metadata']['name']}: {exc.message}")
    assert crds == len(_find(docs, "ScaledObject")) + len(_find(docs, "TriggerAuthentication"))


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("variant", ["base", "example", "variant"])
def test_fallback_renderer_agrees_with_kubectl(tmp_path: Path, variant: str) -> None:
    """The renderer used where kubectl is missing must not drift from kustomize."""
    path = {
        "base": K8S / "base",
        "example": K8S / "overlays" / "example",
        "variant": _variant_dir(tmp_path),
    }[variant]

    def key(doc: dict[str, Any]) -> tuple[str, str]:
        return doc["kind"], doc["metadata"]["name"]

    ours = sorted(_fallback_render(path), key=key)
    theirs = sorted(_kubectl_render(path), key=key)
    assert [key(d) for d in ours] == [key(d) for d in theirs]
    for mine, real in zip(ours, theirs, strict=True):
        assert mine == real, f"{key(real)} differs from kubectl kustomize"


@pytest.mark.parametrize("variant", ["example", "variant"])
def test_everything_lands_in_the_namespace(
    rendered: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    docs = rendered[variant]
    (namespace,) = _find(docs, "Namespace")
    name = namespace["metadata"]["name"]
    for doc in docs:
        if doc["kind"] not in _CLUSTER_SCOPED:
            assert doc["metadata"].get("namespace") == name, (
                f"{doc['kind']}/{doc['metadata']['name']} is not in namespace {name}"
            )


@pytest.mark.parametrize("variant", ["example", "variant"])
def test_references_resolve(rendered: dict[str, list[dict[str, Any]]], variant: str) -> None:
    """Secrets, ConfigMaps, service accounts and selectors point at objects that exist."""
    docs = rendered[variant]
    secrets = {d["metadata"]["name"]: d.get("stringData", {}) for d in _find(docs, "Secret")}
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in _find(docs, "ConfigMap")}
    accounts = {d["metadata"]["name"] for d in _find(docs, "ServiceAccount")}
    for workload in _workloads(docs):
        where = f"{workload['kind']}/{workload['metadata']['name']}"
        spec = _pod_spec(workload)
        assert spec is not None
        assert spec.get("serviceAccountName") in accounts, where
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        for volume in volumes.values():
            if "secret" in volume:
                name = volume["secret"]["secretName"]
                assert name in secrets, f"{where}: no Secret {name}"
                for item in volume["secret"].get("items", []):
                    assert item["key"] in secrets[name], f"{where}: no key {item['key']} in {name}"
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps, f"{where}: {volume}"
        for container in _containers(workload):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in claims, f"{where}: {mount}"
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    assert ref["key"] in secrets.get(ref["name"], {}), f"{where}: {ref}"
    for auth in _find(docs, "TriggerAuthentication"):
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["key"] in secrets.get(ref["name"], {}), ref
    pods = _pod_labels(docs)
    for kind in ("Service", "PodDisruptionBudget", "NetworkPolicy"):
        for doc in _find(docs, kind):
            selector = doc["spec"].get("selector") if kind != "NetworkPolicy" else None
            if kind == "NetworkPolicy":
                selector = doc["spec"]["podSelector"]
            elif kind == "Service":
                selector = {"matchLabels": selector}
            assert selector is not None
            assert any(_matches(selector, labels) for _, labels in pods), (
                f"{kind}/{doc['metadata']['name']} selects no pod"
            )


def test_example_secrets_hold_no_real_values(rendered: dict[str, list[dict[str, Any]]]) -> None:
    secrets = _find(rendered["example"], "Secret")
    assert {s["metadata"]["name"] for s in secrets} == {
        "swarm-redis",
        "swarm-llm",
        "swarm-mcp",
        "flower-auth",
    }
    for secret in secrets:
        assert "data" not in secret, "example secrets are plain stringData placeholders"
        for key, value in secret["stringData"].items():
            if key != "address":  # a host:port, not a secret
                assert "CHANGE-ME" in value, f"{secret['metadata']['name']}.{key} looks real"
    assert not _find(rendered["base"], "Secret"), "the base must not ship Secrets"


# --------------------------------------------------------------------------- k8s: behaviour


def test_config_map_is_a_valid_swarm_toml(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _k8s_settings(rendered["example"], tmp_path, monkeypatch)
    assert settings.llm.api_key is None, "the key comes from a mounted Secret, not the ConfigMap"
    assert settings.llm.api_key_file is not None
    mounts = {
        m["mountPath"]
        for _, c in _swarm_containers(rendered["example"])
        for m in c.get("volumeMounts", [])
    }
    assert str(settings.llm.api_key_file.parent) in mounts
    assert str(settings.worker.heartbeat_file.parent) == "/tmp"


def test_keda_scales_each_pool_on_the_queues_it_consumes(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KEDA's listName values are exactly the Redis lists the pool's worker drains."""
    docs = rendered["example"]
    settings = _k8s_settings(docs, tmp_path, monkeypatch)
    full_pools: set[str] = set()
    express: list[str] = []
    for deployment in _worker_deployments(docs):
        name = deployment["metadata"]["name"]
        roles, priorities = _parse_worker_argv(
            deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        )
        for role in roles:
            settings.role(role)  # every served role is configured
        scaled = [
            so for so in _find(docs, "ScaledObject") if so["spec"]["scaleTargetRef"]["name"] == name
        ]
        assert len(scaled) == 1, f"{name}: {len(scaled)} ScaledObjects"
        triggers = scaled[0]["spec"]["triggers"]
        lists = [t["metadata"]["listName"] for t in triggers]
        assert sorted(lists) == sorted({queue_name(p, r) for r in roles for p in priorities}), name
        if set(priorities) == set(ALL_PRIORITIES):
            full_pools.update(roles)
        if priorities == [Priority.P0]:
            express.append(name)
        assert scaled[0]["spec"]["minReplicaCount"] >= 1, f"{name} may scale to zero"
    assert full_pools == set(settings.roles), "every configured role needs a full worker pool"
    assert express, "an express P0 pool is expected"


def test_p0_weighs_most_in_every_scaled_object(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """A lower listLength target means more replicas per waiting task: P0 < P1 < P2."""
    for scaled in _find(rendered["example"], "ScaledObject"):
        targets = {
            t["metadata"]["listName"].split(".", 1)[0]: int(t["metadata"]["listLength"])
            for t in scaled["spec"]["triggers"]
        }
        order = [targets[p.queue_prefix] for p in ALL_PRIORITIES if p.queue_prefix in targets]
        strictly_rising = all(a < b for a, b in pairwise(order))
        assert strictly_rising, f"{scaled['metadata']['name']}: listLength by priority {targets}"


def test_worker_probes_read_the_heartbeat(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Liveness and readiness are `swarm healthcheck`, never `celery inspect`."""
    for deployment in _worker_deployments(rendered["example"]):
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            command = container[probe]["exec"]["command"]
            assert command[:2] == ["swarm", "healthcheck"], (deployment["metadata"]["name"], probe)
            assert "--max-age" in command
            assert not {"inspect", "celery", "ping"} & set(command)
            _check_swarm_argv(command[1:], f"{deployment['metadata']['name']} {probe}")
        liveness = container["livenessProbe"]["exec"]["command"]
        assert float(liveness[liveness.index("--max-age") + 1]) == 60
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["SWARM_WORKER_HEARTBEAT_FILE"].startswith("/tmp/")
        assert env["SWARM_WORKER_METRICS_PORT"] == "9808"
        ports = {p["containerPort"] for p in container["ports"]}
        assert 9808 in ports


def test_grace_period_outlasts_the_longest_task(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = rendered["example"]
    limit = _k8s_settings(docs, tmp_path, monkeypatch).worker.task_time_limit_s
    for deployment in _worker_deployments(docs):
        spec = deployment["spec"]["template"]["spec"]
        assert spec["terminationGracePeriodSeconds"] > limit, deployment["metadata"]["name"]
        # Replicas belong to KEDA: a `replicas` here would fight the HPA on every apply.
        assert "replicas" not in deployment["spec"]


def test_pods_are_locked_down(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for workload in _workloads(rendered["example"]):
        where = f"{workload['kind']}/{workload['metadata']['name']}"
        spec = _pod_spec(workload)
        assert spec is not None
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["automountServiceAccountToken"] is False, where
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in _containers(workload):
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert len(tmp) == 1, f"{where}: /tmp is not mounted"
            assert "emptyDir" in volumes[tmp[0]["name"]], f"{where}: /tmp is not an emptyDir"
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), where
            assert "memory" in resources["limits"], where


def test_swarm_containers_run_registered_commands(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """Our containers keep the image's entrypoint (tini -> swarm) and pass a command."""
    pairs = _swarm_containers(rendered["example"])
    assert pairs
    for workload, container in pairs:
        where = f"{workload['kind']}/{workload['metadata']['name']}"
        assert "command" not in container, f"{where}: `command` would replace tini + swarm"
        _check_swarm_argv(container["args"], where)


# The one reader from outside the namespace: KEDA's operator polls the Redis lists.
KEDA_OPERATOR_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "keda-operator"}},
}


def test_ingress_stays_inside_the_namespace(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """In the base, every pod is default-deny and only same-namespace pods get in (plus
    KEDA's operator, to Redis only)."""
    docs = rendered["base"]
    policies = _find(docs, "NetworkPolicy")
    for name, labels in _pod_labels(docs):
        selecting = [p for p in policies if _matches(p["spec"]["podSelector"], labels)]
        assert any("Ingress" in p["spec"]["policyTypes"] for p in selecting), name
        for policy in selecting:
            for rule in policy["spec"].get("ingress", []):
                assert rule.get("from"), f"{policy['metadata']['name']}: open to everyone"
                for peer in rule["from"]:
                    if peer == KEDA_OPERATOR_PEER:
                        assert [p["port"] for p in rule["ports"]] == [6379], rule
                        continue
                    assert set(peer) == {"podSelector"}, (
                        f"{policy['metadata']['name']} admits {peer} from outside the namespace"
                    )
    exposed = {
        port["containerPort"]
        for d in _workloads(docs)
        for c in _containers(d)
        for port in c.get("ports", [])
    }
    allowed = {
        port["port"]
        for p in policies
        for rule in p["spec"].get("ingress", [])
        for port in rule.get("ports", [])
    }
    assert exposed == allowed == {6379, 5555, 9808, 9809}


def test_redis_persists_and_can_be_swapped_for_a_managed_one(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["example"]
    redis_set = _one(docs, "StatefulSet", "redis")
    conf = _one(docs, "ConfigMap", "redis-config")["data"]["redis.conf"]
    assert re.search(r"^appendonly yes$", conf, re.M)
    assert re.search(r"^maxmemory-policy noeviction$", conf, re.M)
    (claim,) = redis_set["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in _containers(redis_set)[0]["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/data"
    managed = rendered["variant"]
    assert not _find(managed, "StatefulSet")
    assert not _find(managed, "Service", "redis")
    assert _worker_deployments(managed)
    assert _find(managed, "TriggerAuthentication")


def test_every_worker_pool_has_a_disruption_budget(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["example"]
    budgets = _find(docs, "PodDisruptionBudget")
    for deployment in _worker_deployments(docs):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        covering = [b for b in budgets if _matches(b["spec"]["selector"], labels)]
        assert len(covering) == 1, deployment["metadata"]["name"]
        assert covering[0]["spec"].get("maxUnavailable") == 1


# --------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return data


def _swarm_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in compose["services"].items()
        if str(svc.get("image", "")).startswith("${SWARM_IMAGE")
    }


def _compose_settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    _clean_env(monkeypatch)
    return load_settings(DEPLOY / "swarm.toml")


def test_deploy_swarm_toml_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _compose_settings(monkeypatch)
    assert set(settings.roles) == {"research", "summarize", "review"}
    assert settings.llm.api_key is None, "no key in a committed file"
    for role in settings.roles.values():
        for pattern in role.tools:
            assert pattern.split("__", 1)[0] in settings.tools.servers, pattern


def test_compose_services_use_one_image_and_real_commands(compose: dict[str, Any]) -> None:
    services = _swarm_services(compose)
    assert {"flower", "exporter", "fake-llm", "mcp-demo"} <= set(services)
    for name, svc in services.items():
        assert svc["build"] == ".", name
        if name == "mcp-demo":  # a module of the package, run with python -m
            entry = svc["entrypoint"]
            module = entry[entry.index("-m") + 1]
            assert module == "swarm_workers.fakes.mcp_server"
            assert (ROOT / (module.replace(".", "/") + ".py")).exists(), f"{module} is missing"
            continue
        assert "entrypoint" not in svc, name


@pytest.mark.parametrize(
    "service",
    sorted(_swarm_services(yaml.safe_load(COMPOSE_FILE.read_text())).keys() - {"mcp-demo"}),
)
def test_compose_command_is_registered(compose: dict[str, Any], service: str) -> None:
    _check_swarm_argv(compose["services"][service]["command"], f"compose service {service}")


def test_compose_has_a_scalable_pool_per_role(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _compose_settings(monkeypatch)
    pools: dict[str, tuple[list[str], list[Priority]]] = {}
    for name, svc in _swarm_services(compose).items():
        if svc.get("command", [""])[0] == "worker":
            pools[name] = _parse_worker_argv(svc["command"])
            assert not {"container_name", "ports"} & set(svc), f"{name} cannot --scale"
            test = svc["healthcheck"]["test"]
            assert test[:3] == ["CMD", "swarm", "healthcheck"], name
            assert _duration_s(svc["stop_grace_period"]) > settings.worker.task_time_limit_s
            assert svc["environment"]["SWARM_WORKER_METRICS_PORT"] == "9808"
    full = {
        r for roles, prios in pools.values() if set(prios) == set(ALL_PRIORITIES) for r in roles
    }
    assert full == set(settings.roles)
    for role in settings.roles:
        assert pools[f"worker-{role}"] == ([role], list(ALL_PRIORITIES))
    assert pools["worker-research-express"] == (["research"], [Priority.P0])


def test_compose_runs_a_demo_or_a_real_fleet(compose: dict[str, Any]) -> None:
    services = compose["services"]
    in_profiles = {name for name, svc in services.items() if svc.get("profiles")}
    assert in_profiles == {"fake-llm", "mcp-demo"}
    assert all(services[name]["profiles"] == ["demo"] for name in in_profiles)
    for name, svc in _swarm_services(compose).items():
        env = svc["environment"]
        # No value: taken from the shell or .env when set, absent otherwise.
        assert env["SWARM_LLM_BASE_URL"] is None, name
        assert env["SWARM_LLM_API_KEY"] is None, name
        assert env["SWARM_CONFIG"] == "/etc/swarm/swarm.toml"
        assert any(v.endswith(":/etc/swarm/swarm.toml:ro") for v in svc["volumes"]), name
        assert svc["read_only"] is True, name
        assert "/tmp" in svc["tmpfs"], name
        assert env["REDIS_URL"].startswith("redis://redis:")
        for dep in svc.get("depends_on", {}):
            assert dep not in in_profiles, f"{name} depends on a demo-only service"
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    assert redis_cmd[redis_cmd.index("--maxmemory-policy") + 1] == "noeviction"
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    config = ROOT / services["worker-research"]["volumes"][0].split(":-", 1)[1].split("}", 1)[0]
    assert config.resolve() == (DEPLOY / "swarm.toml").resolve()


def test_prometheus_scrapes_every_worker_pool_and_the_exporter(compose: dict[str, Any]) -> None:
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    services = compose["services"]
    workers = {n for n, s in _swarm_services(compose).items() if s["command"][0] == "worker"}
    (sd,) = jobs["swarm-worker"]["dns_sd_configs"]
    assert set(sd["names"]) == workers
    assert {str(sd["port"])} == {
        services[w]["environment"]["SWARM_WORKER_METRICS_PORT"] for w in workers
    }
    command = services["exporter"]["command"]
    (target,) = jobs["swarm-exporter"]["static_configs"][0]["targets"]
    assert target == f"exporter:{command[command.index('--port') + 1]}"
    mounted = {v.split(":")[0] for v in services["prometheus"]["volumes"]}
    assert "./deploy/prometheus/prometheus.yml" in mounted


# --------------------------------------------------------------------------- grafana


def _dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["definition"])
    return queries


def _metric_of(token: str) -> tuple[str, str]:
    """('swarm_x_bucket') -> ('swarm_x', '_bucket'), for names in METRICS only."""
    if token in METRICS:
        return token, ""
    for suffix in ("_bucket", "_sum", "_count"):
        base = token.removesuffix(suffix)
        if token.endswith(suffix) and METRICS.get(base, ("",))[0] == "histogram":
            return base, suffix
    raise AssertionError(f"dashboard uses unknown metric {token}")


def test_dashboard_uses_only_the_agreed_metrics_and_labels() -> None:
    used: set[str] = set()
    for query in _dashboard_queries():
        names = [_metric_of(t) for t in re.findall(r"\bswarm_[a-z0-9_]+", query)]
        assert names, f"query without a swarm metric: {query}"
        used.update(name for name, _ in names)
        known = set().union(*(METRICS[n][1] for n, _ in names)) | {"le"}
        for token, selector in re.findall(r"\b(swarm_[a-z0-9_]+)\{([^}]*)\}", query):
            name, suffix = _metric_of(token)
            labels = set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", selector))
            allowed = METRICS[name][1] | ({"le"} if suffix == "_bucket" else set())
            assert labels <= allowed, f"{token} has no label {labels - allowed}: {query}"
        for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", query):
            labels = {label.strip() for label in group.split(",") if label.strip()}
            assert labels <= known, f"grouping by unknown {labels - known}: {query}"
        for label in re.findall(r"label_values\(\s*swarm_[a-z0-9_]+\s*,\s*(\w+)\s*\)", query):
            assert label in known, query
    assert used == set(METRICS), f"metrics without a panel: {set(METRICS) - used}"


def test_dashboard_matches_the_metrics_module() -> None:
    """The names, kinds and labels of swarm_workers.metrics are the dashboard's contract."""
    from prometheus_client.metrics import MetricWrapperBase

    from swarm_workers import metrics

    defined: dict[str, tuple[str, set[str]]] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            kind = str(value._type)
            exposed = value._name + ("_total" if kind == "counter" else "")
            defined[exposed] = (kind, set(value._labelnames))
    assert defined == METRICS


def test_grafana_provisioning_finds_the_dashboard(compose: dict[str, Any]) -> None:
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "swarm.yml").read_text()
    )
    path = provider["providers"][0]["options"]["path"]
    volumes = {v.split(":")[0]: v.split(":")[1] for v in compose["services"]["grafana"]["volumes"]}
    assert volumes["./deploy/grafana/dashboards"] == path
    assert volumes["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"]
    assert dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


# --------------------------------------------------------------------------- image


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    logical = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")),
    )
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
        for line in logical.splitlines()
        if line.strip()
    ]


def test_dockerfile_is_slim_multistage_nonroot_and_swarm_first() -> None:
    steps = _dockerfile()
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for i, a in steps if i == "ARG" and "=" in a}
    froms = [a.split()[0] for i, a in steps if i == "FROM"]
    assert len(froms) >= 2, "multi-stage build"
    assert {re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], f) for f in froms} == {
        "python:3.11-slim"
    }
    users = [a for i, a in steps if i == "USER"]
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), "a numeric user: runAsNonRoot can only check a uid"
    assert int(uid) > 0, "not root"
    (entrypoint,) = [json.loads(a) for i, a in steps if i == "ENTRYPOINT"]
    assert entrypoint[0].endswith("tini"), entrypoint
    assert entrypoint[-1] == "swarm", entrypoint
    for instruction, arguments in steps:
        if instruction in ("ENV", "ARG"):
            for name in re.findall(r"(\w+)=", arguments):
                assert not re.search(r"(KEY|TOKEN|SECRET|PASSWORD)$", name, re.I), name
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    rules = [line for line in ignore if line and not line.startswith("#")]
    assert rules[0] == "*", "allow-list: only what the image needs enters the context"
    assert {"!pyproject.toml", "!swarm_workers/", "**/.env"} <= set(rules)


# --------------------------------------------------------------------------- docs


def test_deploy_docs_cover_scaling_and_redis_choices() -> None:
    text = (ROOT / "docs" / "deploy.md").read_text()
    for needle in (
        "--scale worker-research=4",
        "ScaledObject",
        "sentinel://",
        "visibility_timeout",
        "Redis Cluster",
        "terminationGracePeriodSeconds",
    ):
        assert needle in text, needle


# --------------------------------------------------------------------------- live probe


@pytest.fixture
def probe_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own: the test kills it."""
    with ProcessGroup() as group:
        yield spawn_redis(group, tmp_path)


def test_healthcheck_follows_the_worker_heartbeat(probe_redis: RedisServer, tmp_path: Path) -> None:
    """The liveness command passes on a live worker and fails once the broker is gone."""
    workers = WorkerFactory(
        redis_url=probe_redis.url, tmp_path=tmp_path, env={"SWARM_WORKER_HEARTBEAT_INTERVAL_S": "1"}
    )
    try:
        worker = workers(concurrency=2)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SWARM_")}
        env.update(REDIS_URL=probe_redis.url, SWARM_WORKER_HEARTBEAT_FILE=str(worker.heartbeat))

        def healthcheck(max_age: float) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "swarm_workers.cli",
                    "healthcheck",
                    "--max-age",
                    str(max_age),
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )

        time.sleep(3)  # older than --max-age unless the worker keeps touching it
        fresh = healthcheck(3)
        assert fresh.returncode == 0, fresh.stdout + fresh.stderr

        probe_redis.stop()  # the broker dies; the worker process lives on
        wait_until(
            lambda: time.time() - worker.heartbeat.stat().st_mtime > 4, 30, "a stale heartbeat"
        )
        stale = healthcheck(3)
        assert stale.returncode == 1, stale.stdout + stale.stderr
        assert "unhealthy" in stale.stdout + stale.stderr
        assert worker.proc.poll() is None, "the worker should still be running (reconnecting)"
    finally:
        workers.stop_all()
