"""The Helm chart (charts/kubetune) installs exactly what `kubectl apply -k manifests` installs, its
CRDs are the generated ones, it lints, and its values reach the objects they name.

helm and kubectl come from `make testbin` (tests/testbin/helm.sh, tests/testbin/build.sh); `make
test` builds them first, so in CI these tests always run."""

from __future__ import annotations

import json
import subprocess
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune import __version__
from kubetune.api.crd import render_crds
from kubetune.operator.settings import ENVIRONMENT, Settings
from tests.built_binaries import built_binary

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubetune"
MANIFESTS = ROOT / "manifests"
# The namespace manifests/kustomization.yaml installs into.
NAMESPACE = "kubetune-system"
Key = tuple[str, str, str | None, str]


@pytest.fixture(scope="module")
def helm() -> Path:
    return built_binary("helm", "helm.sh")


@pytest.fixture(scope="module")
def kubectl() -> Path:
    return built_binary("kubectl", "build.sh")


def run(command: Sequence[str | Path]) -> str:
    result = subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def objects(stream: str) -> dict[Key, dict[str, Any]]:
    """Every object of a YAML stream by (apiVersion, kind, namespace, name)."""
    found: dict[Key, dict[str, Any]] = {}
    for doc in yaml.safe_load_all(stream):
        if doc:
            meta = doc["metadata"]
            found[(doc["apiVersion"], doc["kind"], meta.get("namespace"), meta["name"])] = doc
    return found


def template(helm: Path, *values: str, namespace: str = NAMESPACE) -> dict[Key, dict[str, Any]]:
    """`helm template` of the chart with `--set`/`--set-json` arguments."""
    return objects(
        run([helm, "template", "kubetune", CHART, "--namespace", namespace, "--include-crds", *values])
    )


def kustomize(kubectl: Path, directory: Path) -> dict[Key, dict[str, Any]]:
    return objects(run([kubectl, "kustomize", directory]))


def only(rendered: dict[Key, dict[str, Any]], kind: str) -> dict[str, Any]:
    [found] = [doc for (_, k, _, _), doc in rendered.items() if k == kind]
    return found


def operator_container(rendered: dict[Key, dict[str, Any]]) -> dict[str, Any]:
    [container] = only(rendered, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def env(rendered: dict[Key, dict[str, Any]]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in operator_container(rendered)["env"]}


# --- the same objects as kustomize ------------------------------------------------------------


def test_chart_renders_exactly_the_kustomization(helm: Path, kubectl: Path) -> None:
    """With the Namespace rendered too (namespace.create), every object is identical, labels included."""
    assert template(helm, "--set", "namespace.create=true") == kustomize(kubectl, MANIFESTS)


def test_default_values_render_the_kustomization_less_its_namespace(helm: Path, kubectl: Path) -> None:
    """`helm install --create-namespace` makes the namespace, so by default the chart leaves it out."""
    expected = {key: doc for key, doc in kustomize(kubectl, MANIFESTS).items() if key[1] != "Namespace"}
    assert template(helm) == expected


def test_monitoring_renders_exactly_manifests_monitoring(helm: Path, kubectl: Path) -> None:
    monitoring = {
        key: doc
        for key, doc in template(helm, "--set", "monitoring.enabled=true").items()
        if key not in template(helm)
    }
    assert monitoring == kustomize(kubectl, MANIFESTS / "monitoring")


def test_monitoring_is_off_by_default(helm: Path) -> None:
    kinds = {kind for (_, kind, _, _) in template(helm)}
    assert kinds.isdisjoint({"ServiceMonitor", "PodMonitor", "ConfigMap"})


def test_chart_crds_are_the_generated_ones() -> None:
    """Written by `kubetune crds` with manifests/crds; `make crds` rewrites all copies."""
    shipped = {p.name: p.read_text() for p in (CHART / "crds").iterdir()}
    assert shipped == render_crds(), "charts/kubetune/crds is stale; run `make crds`"


def test_dashboard_copy_is_the_dashboard() -> None:
    """Helm reads files only inside the chart, so it ships a copy of manifests/monitoring's."""
    copy = CHART / "files" / "grafana-dashboard.json"
    assert copy.read_text() == (MANIFESTS / "monitoring" / "grafana-dashboard.json").read_text(), (
        "cp manifests/monitoring/grafana-dashboard.json charts/kubetune/files/"
    )


def test_chart_version_follows_kubetune() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == __version__
    assert chart["name"] == "kubetune"


# --- lint and values ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [[], ["--set", "monitoring.enabled=true,namespace.create=true,logLevel=debug"]],
    ids=["default", "all-on"],
)
def test_chart_lints_strictly(helm: Path, values: list[str]) -> None:
    run([helm, "lint", "--strict", CHART, *values])


def test_namespace_value_moves_every_namespaced_object(helm: Path) -> None:
    rendered = template(
        helm, "--set", "namespace.name=ml-platform,namespace.create=true,monitoring.enabled=true"
    )
    namespaced = {(kind, ns) for (_, kind, ns, _) in rendered if ns is not None}
    assert namespaced == {
        (kind, "ml-platform")
        for kind in ("ServiceAccount", "Service", "Deployment", "ServiceMonitor", "PodMonitor", "ConfigMap")
    }
    assert only(rendered, "Namespace")["metadata"]["name"] == "ml-platform"
    assert only(rendered, "ClusterRoleBinding")["subjects"] == [
        {"kind": "ServiceAccount", "name": "kubetune-operator", "namespace": "ml-platform"}
    ]


def test_release_namespace_is_the_default(helm: Path) -> None:
    rendered = template(helm, namespace="kubetune")
    assert only(rendered, "Deployment")["metadata"]["namespace"] == "kubetune"
    assert only(rendered, "ClusterRoleBinding")["subjects"][0]["namespace"] == "kubetune"


def test_values_reach_the_operator_settings(helm: Path) -> None:
    rendered = template(
        helm,
        "--set-json",
        'watchNamespaces=["team-a","team-b"]',
        "--set-json",
        'allowedImagePrefixes=["registry.example.com/ml/","ghcr.io/acme"]',
        "--set",
        "images.operator=registry.example.com/kubetune/operator:0.2.0",
        "--set",
        "images.trainer=registry.example.com/kubetune/trainer:0.2.0",
        "--set",
        "storageEndpoint=http://minio.storage.svc:9000,logFormat=text",
    )
    variables = env(rendered)
    assert variables["KUBETUNE_NAMESPACES"] == "team-a,team-b"
    assert variables["KUBETUNE_ALLOWED_IMAGE_PREFIXES"] == "registry.example.com/ml/,ghcr.io/acme"
    assert variables["KUBETUNE_TRAINER_IMAGE"] == "registry.example.com/kubetune/trainer:0.2.0"
    assert variables["KUBETUNE_SERVE_IMAGE"] == "registry.example.com/kubetune/trainer:0.2.0"
    assert operator_container(rendered)["image"] == "registry.example.com/kubetune/operator:0.2.0"
    # The operator reads them back as intended.
    settings = Settings.from_env({k: v for k, v in variables.items() if isinstance(v, str)})
    assert settings.namespaces == ("team-a", "team-b")
    assert settings.allowed_image_prefixes == ("registry.example.com/ml/", "ghcr.io/acme")
    assert settings.storage_endpoint == "http://minio.storage.svc:9000"
    assert settings.log_format == "text"


def test_every_variable_the_chart_sets_is_an_operator_setting(helm: Path) -> None:
    settable = set(ENVIRONMENT) | {"POD_NAME", "POD_NAMESPACE"}
    assert set(env(template(helm))) <= settable


def test_serve_image_overrides_the_trainer_image(helm: Path) -> None:
    variables = env(template(helm, "--set", "images.serve=kubetune/server:1"))
    assert variables["KUBETUNE_SERVE_IMAGE"] == "kubetune/server:1"
    assert variables["KUBETUNE_TRAINER_IMAGE"] == "kubetune/trainer:0.1.0"


@pytest.mark.parametrize(
    ("level", "command"),
    [
        ("info", ["kubetune", "operator"]),
        ("verbose", ["kubetune", "operator", "--verbose"]),
        ("debug", ["kubetune", "operator", "--debug"]),
    ],
)
def test_log_level_picks_the_operator_flag(helm: Path, level: str, command: list[str]) -> None:
    assert operator_container(template(helm, "--set", f"logLevel={level}"))["command"] == command


def test_resources_merge_over_the_defaults(helm: Path) -> None:
    """Helm merges maps: set what changes; null removes a default."""
    rendered = template(
        helm,
        "--set-json",
        'resources={"requests": {"cpu": "250m"}, "limits": {"memory": "1Gi", "cpu": null}}',
    )
    assert operator_container(rendered)["resources"] == {
        "requests": {"cpu": "250m", "memory": "256Mi"},
        "limits": {"memory": "1Gi"},
    }


def test_monitoring_values(helm: Path) -> None:
    rendered = template(
        helm,
        "--set",
        "monitoring.enabled=true",
        "--set-json",
        'monitoring.labels={"release":"prometheus"}',
        "--set-json",
        'watchNamespaces=["team-a"]',
    )
    for kind in ("ServiceMonitor", "PodMonitor"):
        assert only(rendered, kind)["metadata"]["labels"]["release"] == "prometheus"
    # Serving pods exist only where the operator watches.
    assert only(rendered, "PodMonitor")["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}
    assert "release" not in only(rendered, "ConfigMap")["metadata"]["labels"]


@pytest.mark.parametrize(
    ("values", "refusal"),
    [
        (["--set", "logLevel=loud"], "at '/logLevel'"),
        (["--set", "logFormat=xml"], "at '/logFormat'"),
        (["--set-json", 'allowedImagePrefixes=["a/,b/"]'], "at '/allowedImagePrefixes/0'"),
        (["--set", "namespace.name=Not_A_Namespace"], "at '/namespace/name'"),
        (["--set", "imagess.operator=typo"], "additional properties 'imagess' not allowed"),
    ],
    ids=["log-level", "log-format", "comma-in-prefix", "namespace-name", "unknown-value"],
)
def test_values_schema_refuses_mistakes(helm: Path, values: list[str], refusal: str) -> None:
    result = subprocess.run(
        [str(helm), "template", "kubetune", str(CHART), *values], capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert refusal in result.stderr


def test_schema_log_formats_are_the_operators() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    formats = typing.get_args(Settings.model_fields["log_format"].annotation)
    assert set(schema["properties"]["logFormat"]["enum"]) == set(formats)
