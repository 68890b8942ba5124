"""The deployment artefacts agree with the code: Dockerfile, compose, Kubernetes, dashboards.

Offline, in seconds. Kubernetes manifests are rendered with `kubectl kustomize` when
kubectl is installed, else with a small renderer below that knows only what our
kustomizations use (it refuses anything else), and validated against the Kubernetes
JSON schemas that `kubernetes_validate` ships (strict; 1.30 and the newest it has).
KEDA's ScaledObject and the Prometheus Operator's PodMonitor and PrometheusRule are
CRDs: they are validated against their published schemas, vendored in tests/crds/
(SOURCES.md), strictly (unknown fields refused).

Liveness on real processes: tests/test_liveness.py. The scaling formula on a live
Redis: tests/test_inflight.py.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils
import pytest
import typer
import yaml

from swarm_workers.cli import app as cli_app
from swarm_workers.config import Settings, load_settings
from swarm_workers.models import Priority
from swarm_workers.queues import ALL_PRIORITIES
from swarm_workers.worker import termination_grace_s

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DASHBOARD = K8S / "components" / "monitoring" / "dashboards" / "swarm-workers.json"
CRDS = Path(__file__).resolve().parent / "crds"

# The oldest Kubernetes we support and the newest schema kubernetes_validate ships.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
K8S_VERSION = K8S_VERSIONS[0]
IMAGE = "swarm-workers"  # the name the manifests use; overlays rewrite it with `images:`
KEDA_API = "keda.sh/v1alpha1"
EXPORTER_PORT = 9809

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
    "swarm_tasks_running": ("gauge", {"role", "priority"}),
    "swarm_queue_oldest_age_seconds": ("gauge", {"role", "priority"}),
    "swarm_dead_letters_total": ("counter", {"role", "error"}),
}
# Series the alerts use that come from elsewhere: the Redis exporter's.
ALERT_METRICS = {
    "redis_memory_used_bytes": ("gauge", set()),
    "redis_memory_max_bytes": ("gauge", set()),
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
    "configMapGenerator",
}
_GENERATED = re.compile(r"^(?P<base>.+)-[a-z0-9]{10}$")
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
    docs += _generate(kust.get("configMapGenerator", []), path, docs)
    for entry in kust.get("components", []):
        component = yaml.safe_load((path / entry / "kustomization.yaml").read_text())
        unsupported = set(component) - _SUPPORTED_KEYS
        assert not unsupported, f"{entry}: the fallback renderer does not support {unsupported}"
        for res in component.get("resources", []):
            docs += _load_docs(path / entry / res)
        docs += _generate(component.get("configMapGenerator", []), path / entry, docs)
        docs = _apply_patches(docs, component.get("patches", []), path / entry)
    docs = _apply_patches(docs, kust.get("patches", []), path)
    _rename_config_maps(docs)
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


def _generate(
    generators: list[dict[str, Any]], base: Path, docs: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """ConfigMaps from files, named `<name>-<hash of content>` unless told not to, and
    every configMap volume that names one rewritten (what makes an edit a rollout).
    The hash is not kustomize's own: `_same_modulo_generated_names` compares around it."""
    made: list[dict[str, Any]] = []
    for gen in generators:
        assert set(gen) <= {"name", "files", "options"}, f"unsupported generator {gen}"
        assert set(gen.get("options", {})) <= {"labels", "disableNameSuffixHash"}, gen
        data = {Path(f).name: (base / f).read_text() for f in gen["files"]}
        name = gen["name"]
        if not gen.get("options", {}).get("disableNameSuffixHash"):
            digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
            name = f"{name}-{digest[:10]}"
        metadata: dict[str, Any] = {"name": name}
        if gen.get("options", {}).get("labels"):
            metadata["labels"] = dict(gen["options"]["labels"])
        made.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    return made


def _rename_config_maps(docs: list[dict[str, Any]]) -> None:
    """Point configMap volumes at the generated names (after patches, as kustomize does)."""
    generated = {
        m["base"]: d["metadata"]["name"]
        for d in _find(docs, "ConfigMap")
        if (m := _GENERATED.match(d["metadata"]["name"]))
    }
    for doc in docs:
        for volume in (_pod_spec(doc) or {}).get("volumes", []):
            ref = volume.get("configMap")
            if ref and ref["name"] in generated:
                ref["name"] = generated[ref["name"]]


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


def _config_map(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The generated `swarm-config-<hash>` ConfigMap (configMapGenerator)."""
    found = [
        d
        for d in _find(docs, "ConfigMap")
        if (m := _GENERATED.match(d["metadata"]["name"])) and m["base"] == "swarm-config"
    ]
    assert len(found) == 1, [d["metadata"]["name"] for d in _find(docs, "ConfigMap")]
    return found[0]


def _k8s_settings(
    docs: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    return _load_toml_text(_config_map(docs)["data"]["swarm.toml"], tmp_path, monkeypatch)


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


# --------------------------------------------------------------------------- CRDs

_CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_v1alpha1_scaledobject.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_v1_podmonitor.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_v1_prometheusrule.json",
}


def _strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever it lists the known ones (the API
    server would prune them silently: a typo would vanish)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            out.get("type") == "object"
            and "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _crd_validator(api: str, kind: str) -> jsonschema.Draft4Validator:
    schema = json.loads((CRDS / _CRD_SCHEMAS[(api, kind)]).read_text())
    return jsonschema.Draft4Validator(_strict(schema))


def _check_crd(doc: dict[str, Any], docs: list[dict[str, Any]]) -> None:
    """A custom resource against its published schema, plus what the schema cannot say."""
    key = (doc["apiVersion"], doc["kind"])
    assert key in _CRD_SCHEMAS, f"no vendored schema for {key}"
    errors = sorted(_crd_validator(*key).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, f"{doc['kind']}/{doc['metadata']['name']}: " + "; ".join(
        f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors
    )
    if doc["kind"] != "ScaledObject":
        return
    spec = doc["spec"]
    assert _find(docs, "Deployment", spec["scaleTargetRef"]["name"]), spec["scaleTargetRef"]
    low, high = spec["minReplicaCount"], spec["maxReplicaCount"]
    assert 0 <= low <= high
    # Fallback holds the current size: never a drop to a fixed count while blind.
    assert spec["fallback"]["behavior"] == "currentReplicas", spec["fallback"]
    for trigger in spec["triggers"]:
        # KEDA refuses a fallback unless the trigger's target is an AverageValue.
        assert trigger["metricType"] == "AverageValue", trigger
        assert all(isinstance(v, str) for v in trigger["metadata"].values()), trigger
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


# --------------------------------------------------------------------------- k8s: schema


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
@pytest.mark.parametrize("variant", ["base", "example", "variant"])
def test_every_manifest_is_valid_for_kubernetes(
    rendered: dict[str, list[dict[str, Any]]], variant: str, k8s_version: str
) -> None:
    docs = rendered[variant]
    assert docs
    crds = 0
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in _CRD_SCHEMAS:
            _check_crd(doc, docs)
            crds += 1
            continue
        try:
            kubernetes_validate.validate(doc, k8s_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{variant}: {doc['kind']}/{doc['metadata']['name']}: {exc.message}")
    custom = sum(len(_find(docs, kind)) for _, kind in _CRD_SCHEMAS)
    assert crds == custom


def test_crd_schemas_are_strict() -> None:
    """The vendored schemas do refuse what a typo would produce."""
    bad = {
        "apiVersion": KEDA_API,
        "kind": "ScaledObject",
        "metadata": {"name": "x"},
        "spec": {"scaleTargetRef": {"name": "x"}, "triggers": [], "fallbak": {}},
    }
    assert list(_crd_validator(KEDA_API, "ScaledObject").iter_errors(bad))


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

    ours = sorted(_unhashed(_fallback_render(path)), key=key)
    theirs = sorted(_unhashed(_kubectl_render(path)), key=key)
    assert [key(d) for d in ours] == [key(d) for d in theirs]
    for mine, real in zip(ours, theirs, strict=True):
        assert mine == real, f"{key(real)} differs from kubectl kustomize"


def _unhashed(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The docs with generated ConfigMap names' hash suffix replaced by `-HASH`."""
    generated = {
        d["metadata"]["name"]
        for d in _find(docs, "ConfigMap")
        if _GENERATED.match(d["metadata"]["name"]) and "-config-" in d["metadata"]["name"]
    }
    text = json.dumps(docs)
    for name in generated:
        plain = _GENERATED.sub(r"\g<base>-HASH", name)
        text = text.replace(f'"{name}"', f'"{plain}"')
    result: list[dict[str, Any]] = json.loads(text)
    return result


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


def _pool_concurrency(deployment: dict[str, Any], settings: Settings) -> int:
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    for flag in ("--concurrency", "-n"):
        if flag in args:
            return int(args[args.index(flag) + 1])
    roles, _ = _parse_worker_argv(args)
    return max(settings.role(r).concurrency for r in roles)


def scaled_load(scaled: dict[str, Any]) -> tuple[str, list[Priority], str, int]:
    """(role, priorities, host, target) of a ScaledObject's metrics-api trigger."""
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "metrics-api", trigger
    metadata = trigger["metadata"]
    assert metadata["valueLocation"] == "load"
    match = re.fullmatch(
        r"http://(?P<host>[^/:]+):(?P<port>\d+)/load\?role=(?P<role>[a-z0-9_-]+)"
        r"&priorities=(?P<prios>[p0-2,]+)",
        metadata["url"],
    )
    assert match, metadata["url"]
    assert int(match["port"]) == EXPORTER_PORT
    priorities = [Priority(p) for p in match["prios"].split(",")]
    return match["role"], priorities, match["host"], int(metadata["targetValue"])


def replicas_asked(scaled: dict[str, Any], load: int) -> int:
    """What the HPA behind `scaled` asks for at this load: ceil(load / target), clamped."""
    _, _, _, target = scaled_load(scaled)
    spec = scaled["spec"]
    low, high = int(spec["minReplicaCount"]), int(spec["maxReplicaCount"])
    return min(high, max(low, math.ceil(load / target)))


@pytest.mark.parametrize("variant", ["example", "variant"])
def test_one_scaled_object_per_pool_on_queued_plus_running(
    rendered: dict[str, list[dict[str, Any]]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    variant: str,
) -> None:
    """Each pool scales on (queued + running) / concurrency of lists it drains; each
    (role, priority) drives exactly one ScaledObject; P0 stays warm."""
    docs = rendered[variant]
    settings = _k8s_settings(docs, tmp_path, monkeypatch)
    (namespace,) = _find(docs, "Namespace")
    owners: dict[tuple[str, Priority], str] = {}
    full_pools: set[str] = set()
    for deployment in _worker_deployments(docs):
        name = deployment["metadata"]["name"]
        roles, priorities = _parse_worker_argv(
            deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        )
        scaled = [
            so for so in _find(docs, "ScaledObject") if so["spec"]["scaleTargetRef"]["name"] == name
        ]
        assert len(scaled) == 1, f"{name}: {len(scaled)} ScaledObjects"
        role, levels, host, target = scaled_load(scaled[0])
        assert roles == [role], name
        assert set(levels) <= set(priorities), f"{name} scales on lists it does not drain"
        assert host == f"swarm-exporter.{namespace['metadata']['name']}.svc.cluster.local"
        assert target == _pool_concurrency(deployment, settings), name
        for level in levels:
            assert (role, level) not in owners, f"{role} {level} drives {owners[(role, level)]}"
            owners[(role, level)] = name
        if Priority.P0 in levels:
            assert scaled[0]["spec"]["minReplicaCount"] >= 1, f"{name}: P0 must stay warm"
        if set(priorities) == set(ALL_PRIORITIES):
            full_pools.add(role)
    assert full_pools == set(settings.roles), "every configured role needs a full worker pool"
    assert set(owners) == {(r, p) for r in settings.roles for p in ALL_PRIORITIES}
    if variant == "variant":  # with components/scale-to-zero
        assert any(so["spec"]["minReplicaCount"] == 0 for so in _find(docs, "ScaledObject"))


def test_exporter_serves_the_scaled_objects(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The host and port KEDA calls are the exporter's Service and container port."""
    docs = rendered["example"]
    service = _one(docs, "Service", "swarm-exporter")
    assert [p["port"] for p in service["spec"]["ports"]] == [EXPORTER_PORT]
    exporter = _one(docs, "Deployment", "swarm-exporter")
    args = _containers(exporter)[0]["args"]
    assert int(args[args.index("--port") + 1]) == EXPORTER_PORT
    for scaled in _find(docs, "ScaledObject"):
        assert scaled_load(scaled)[2].split(".")[0] == service["metadata"]["name"]


def test_worker_probes_read_the_heartbeat(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Liveness and readiness are `swarm healthcheck`, never `celery inspect`."""
    for deployment in _worker_deployments(rendered["example"]):
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            command = container[probe]["exec"]["command"]
            assert command[:2] == ["swarm", "healthcheck"], (deployment["metadata"]["name"], probe)
            assert "--max-age" in command
            assert not {"inspect", "celery", "ping", "--config", "-c"} & set(command)
            assert ("--ready" in command) == (probe == "readinessProbe"), probe
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
    """Grace = task_time_limit_s + the drain margin, from the ConfigMap's swarm.toml; and
    neither Cluster Autoscaler nor Karpenter evicts a worker to shrink a node pool."""
    docs = rendered["example"]
    grace = termination_grace_s(_k8s_settings(docs, tmp_path, monkeypatch))
    for deployment in _worker_deployments(docs):
        template = deployment["spec"]["template"]
        spec = template["spec"]
        assert spec["terminationGracePeriodSeconds"] == grace, deployment["metadata"]["name"]
        annotations = template["metadata"]["annotations"]
        assert annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
        assert annotations["karpenter.sh/do-not-disrupt"] == "true"
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
    KEDA's operator, to the exporter's /load only)."""
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
                        assert [p["port"] for p in rule["ports"]] == [EXPORTER_PORT], rule
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


# RFC 5737 documentation ranges: the base's placeholders, which match no real host.
_PLACEHOLDER_NETS = {"192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"}


@pytest.mark.parametrize("variant", ["base", "example", "variant"])
def test_egress_is_default_deny_and_named(
    rendered: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    """Every pod is egress-default-deny with DNS allowed; no rule opens egress to
    everyone; workers reach the LLM and MCP CIDRs, which the example overlay sets."""
    docs = rendered[variant]
    policies = [p for p in _find(docs, "NetworkPolicy") if "Egress" in p["spec"]["policyTypes"]]
    for name, labels in _pod_labels(docs):
        selecting = [p for p in policies if _matches(p["spec"]["podSelector"], labels)]
        assert selecting, f"{name}: egress is open"
        dns = [
            rule
            for p in selecting
            for rule in p["spec"].get("egress", [])
            if {port["port"] for port in rule.get("ports", [])} == {53}
        ]
        assert dns, f"{name}: no DNS"
    for policy in policies:
        for rule in policy["spec"].get("egress", []):
            assert rule.get("to"), f"{policy['metadata']['name']}: egress to everyone"
            assert rule.get("ports"), f"{policy['metadata']['name']}: every port"
            for peer in rule["to"]:
                assert peer.get("ipBlock", {}).get("cidr") not in ("0.0.0.0/0", "::/0"), peer
    if variant == "base":
        return
    for name in ("worker-egress-llm", "worker-egress-mcp"):
        (policy,) = [p for p in policies if p["metadata"]["name"] == name]
        cidrs = {peer["ipBlock"]["cidr"] for r in policy["spec"]["egress"] for peer in r["to"]}
        assert not cidrs & _PLACEHOLDER_NETS, f"{name}: the overlay must set its CIDRs"


def test_redis_persists_and_can_be_swapped_for_a_managed_one(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["example"]
    redis_set = _one(docs, "StatefulSet", "redis")
    for container in _containers(redis_set):  # the password never on an argv
        argv = [*container.get("command", []), *container.get("args", [])]
        assert not any("requirepass" in a and "$REDIS_PASSWORD" not in a for a in argv), argv
        assert not any("$(REDIS_PASSWORD)" in a for a in argv), argv
    conf = _one(docs, "ConfigMap", "redis-config")["data"]["redis.conf"]
    assert re.search(r"^appendonly yes$", conf, re.M)
    assert re.search(r"^maxmemory-policy noeviction$", conf, re.M)
    (claim,) = redis_set["spec"]["volumeClaimTemplates"]
    mounts = {
        m["name"]: m["mountPath"]
        for m in redis_set["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    }
    assert mounts[claim["metadata"]["name"]] == "/data"
    managed = rendered["variant"]
    assert not _find(managed, "StatefulSet")
    assert not _find(managed, "Service", "redis")
    assert _worker_deployments(managed)
    (egress,) = [
        p for p in _find(managed, "NetworkPolicy") if p["metadata"]["name"] == "egress-redis"
    ]
    assert all("ipBlock" in peer for rule in egress["spec"]["egress"] for peer in rule["to"])


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
    demo = load_settings(DEPLOY / "swarm.demo.toml")
    for config in (settings, demo):
        assert set(config.roles) == {"research", "summarize", "review"}
        assert config.llm.api_key is None, "no key in a committed file"
        for role in config.roles.values():
            for pattern in role.tools:
                assert pattern.split("__", 1)[0] in config.tools.servers, pattern
    assert demo.worker == settings.worker, "one grace period serves both"
    # The real fleet's file names no demo endpoint.
    text = (DEPLOY / "swarm.toml").read_text()
    assert not re.search(r"^[^#]*(fake-llm|mcp-demo)", text, re.M)


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
            assert _duration_s(svc["stop_grace_period"]) == termination_grace_s(settings)
            assert svc["environment"]["SWARM_WORKER_METRICS_PORT"] == "9808"
    full = {
        r for roles, prios in pools.values() if set(prios) == set(ALL_PRIORITIES) for r in roles
    }
    assert full == set(settings.roles)
    for role in settings.roles:
        assert pools[f"worker-{role}"] == ([role], list(ALL_PRIORITIES))
    assert pools["worker-research-express"] == (["research"], [Priority.P0])


def _dotenv(path: Path) -> dict[str, str]:
    lines = [line.split("=", 1) for line in path.read_text().splitlines()]
    return {k.strip(): v.strip() for k, v in (pair for pair in lines if len(pair) == 2)}


def test_compose_runs_a_demo_or_a_real_fleet(compose: dict[str, Any]) -> None:
    services = compose["services"]
    profiles = {name: svc["profiles"] for name, svc in services.items() if svc.get("profiles")}
    assert profiles == {
        "fake-llm": ["demo"],
        "mcp-demo": ["demo"],
        "prometheus": ["monitoring"],
        "grafana": ["monitoring"],
    }
    for name, svc in _swarm_services(compose).items():
        env = svc["environment"]
        # Required (${VAR:?...}): without the demo's env file, no fake provider.
        assert re.fullmatch(r"\$\{SWARM_LLM_BASE_URL:\?.+\}", env["SWARM_LLM_BASE_URL"]), name
        assert env["SWARM_LLM_API_KEY"] is None, name
        assert env["SWARM_CONFIG"] == "/etc/swarm/swarm.toml"
        assert any(v.endswith(":/etc/swarm/swarm.toml:ro") for v in svc["volumes"]), name
        assert svc["read_only"] is True, name
        assert "/tmp" in svc["tmpfs"], name
        assert env["REDIS_URL"].startswith("redis://redis:")
        for dep in svc.get("depends_on", {}):
            assert dep not in profiles, f"{name} depends on an optional service"
    demo = _dotenv(DEPLOY / "demo.env")
    assert demo["COMPOSE_PROFILES"] == "demo"
    assert demo["SWARM_LLM_BASE_URL"].startswith("http://fake-llm:")
    assert (ROOT / demo["SWARM_CONFIG_FILE"]).resolve() == (DEPLOY / "swarm.demo.toml").resolve()
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    assert redis_cmd[redis_cmd.index("--maxmemory-policy") + 1] == "noeviction"
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    config = ROOT / services["worker-research"]["volumes"][0].split(":-", 1)[1].split("}", 1)[0]
    assert config.resolve() == (DEPLOY / "swarm.toml").resolve()
    grafana = services["grafana"]["environment"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert re.fullmatch(
        r"\$\{GF_SECURITY_ADMIN_PASSWORD:\?.+\}", grafana["GF_SECURITY_ADMIN_PASSWORD"]
    )


_DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


def test_every_image_is_pinned_by_digest(
    compose: dict[str, Any], rendered: dict[str, list[dict[str, Any]]]
) -> None:
    for name, svc in compose["services"].items():
        if name not in _swarm_services(compose):
            assert _DIGEST.search(svc["image"]), f"compose {name}: {svc['image']}"
    for doc in rendered["variant"]:
        for container in _containers(doc):
            if container["image"].rsplit("/", 1)[-1].split(":")[0] != IMAGE:
                assert _DIGEST.search(container["image"]), container["image"]


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

    from swarm_workers import exporter, metrics

    defined: dict[str, tuple[str, set[str]]] = {}
    for value in [*vars(metrics).values(), *vars(exporter).values()]:
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
    assert (ROOT / next(k for k, v in volumes.items() if v == path)).resolve() == DASHBOARD.parent
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
    bases = {re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], f) for f in froms}
    assert len(bases) == 1
    (base,) = bases
    assert base.startswith("python:3.11-slim@sha256:"), base
    assert _DIGEST.search(base), "the base image is pinned by digest"
    runs = [a for i, a in steps if i == "RUN"]
    assert not any("pip install --upgrade" in r or "pip install -U" in r for r in runs)
    installs = [r for r in runs if "pip install" in r]
    assert "--require-hashes" in installs[0] and "requirements.lock" in installs[0]
    assert all("--no-deps" in r for r in installs), "nothing resolved outside the lock"
    copies = [(n, a) for n, (i, a) in enumerate(steps) if i == "COPY"]
    lock_at = next(n for n, a in copies if "requirements.lock" in a)
    source_at = next(n for n, a in copies if a.startswith("swarm_workers"))
    deps_at = next(n for n, (i, a) in enumerate(steps) if i == "RUN" and "requirements.lock" in a)
    assert lock_at < deps_at < source_at, "dependencies are a layer of their own, before source"
    env = " ".join(a for i, a in steps if i == "ENV")
    assert "PIP_NO_CACHE_DIR" not in env, "it would defeat the pip cache mount"
    tiktoken_dirs = set(re.findall(r"TIKTOKEN_CACHE_DIR=(\S+)", env))
    assert len(tiktoken_dirs) == 1
    (cache,) = tiktoken_dirs
    assert not cache.startswith("/tmp"), "an emptyDir/tmpfs over /tmp would hide the encodings"
    assert any("tiktoken.get_encoding" in r for r in runs), "the encodings are baked in"
    assert any(f"--from=build {cache}" in a for _, a in copies)
    lock = (ROOT / "requirements.lock").read_text()
    pins = re.findall(r"^([A-Za-z0-9_.-]+)==\S+ \\$", lock, re.M)
    assert pins
    assert lock.count("--hash=sha256:") >= len(pins)
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
    assert {"!pyproject.toml", "!requirements.lock", "!swarm_workers/", "**/.env"} <= set(rules)


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


# --------------------------------------------------------------------------- monitoring


def test_alerts_use_known_metrics_and_have_a_runbook(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """Each alert's series exist (the metric contract, the dead-letter counter, the Redis
    exporter's) and docs/operations.md explains it under its own heading."""
    (rule,) = _find(rendered["variant"], "PrometheusRule")
    known = {**METRICS, **ALERT_METRICS}
    operations = (ROOT / "docs" / "operations.md").read_text()
    headings = {h.strip().lower() for h in re.findall(r"^#+ (.+)$", operations, re.M)}
    alerts = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    for alert in alerts:
        names = re.findall(r"\b((?:swarm|redis)_[a-z0-9_]+)", alert["expr"])
        assert names, alert["alert"]
        for token in names:
            base = re.sub(r"_(bucket|sum|count)$", "", token)
            assert token in known or base in known, f"{alert['alert']}: unknown {token}"
        assert alert["alert"].lower() in headings, f"docs/operations.md: no ## {alert['alert']}"
        anchor = alert["annotations"]["runbook_url"].rsplit("#", 1)[1]
        assert anchor == alert["alert"].lower()
    assert len(alerts) >= 7


def test_dashboard_config_map_is_the_compose_dashboard(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    (config,) = [
        d
        for d in _find(rendered["variant"], "ConfigMap")
        if "grafana_dashboard" in d["metadata"].get("labels", {})
    ]
    assert config["data"] == {DASHBOARD.name: DASHBOARD.read_text()}
