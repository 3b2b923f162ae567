"""Everything under manifests/ is valid Kubernetes (official schemas of a current minor), the
kustomization builds, the operator runs under Pod Security "restricted", every example is valid
against the generated CRDs, and the Dockerfiles install extras that exist."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv_utils

from kubetune.api import RESOURCES as KINDS
from kubetune.api.crd import generate_crds
from kubetune.api.validation import validate_document

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
EXAMPLES = MANIFESTS / "examples"
# The newest Kubernetes minor whose schemas the installed kubernetes-validate ships.
K8S_VERSION = kv_utils.latest_version()
SCHEMAS = {
    crd["spec"]["names"]["kind"]: crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for crd in generate_crds().values()
}


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def platform_documents() -> list[tuple[str, dict[str, Any]]]:
    """Every built-in-kind document under manifests/ (kubetune kinds are checked by the CRDs, the
    Prometheus Operator's kinds in manifests/monitoring by its CRDs in test_monitoring.py)."""
    found = []
    for path in sorted(MANIFESTS.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for index, doc in enumerate(documents(path)):
            prometheus_operator = str(doc.get("apiVersion", "")).startswith("monitoring.coreos.com/")
            if doc.get("kind") not in KINDS and not prometheus_operator:
                found.append((f"{path.relative_to(MANIFESTS)}#{index}", doc))
    return found


def kubernetes_check(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kubernetes_version_is_current() -> None:
    major, minor = (int(x) for x in kv_utils.major_minor(K8S_VERSION).split("."))
    assert (major, minor) >= (1, 33)


@pytest.mark.parametrize(("where", "doc"), platform_documents(), ids=[w for w, _ in platform_documents()])
def test_manifest_is_valid_kubernetes(where: str, doc: dict[str, Any]) -> None:
    kubernetes_check(doc)


@pytest.fixture(scope="module")
def built() -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; each file under manifests/ is still validated on its own")
    result = subprocess.run(
        [kubectl, "kustomize", str(MANIFESTS)], capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_kustomization_builds_valid_objects(built: list[dict[str, Any]]) -> None:
    for doc in built:
        kubernetes_check(doc)
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in built)
    assert kinds == [
        ("ClusterRole", "kubetune-operator"),
        ("ClusterRoleBinding", "kubetune-operator"),
        ("CustomResourceDefinition", "compressjobs.kubetune.io"),
        ("CustomResourceDefinition", "finetunejobs.kubetune.io"),
        ("CustomResourceDefinition", "finetunesweeps.kubetune.io"),
        ("Deployment", "kubetune-operator"),
        ("Namespace", "kubetune-system"),
        ("Service", "kubetune-operator-metrics"),
        ("ServiceAccount", "kubetune-operator"),
    ]
    namespaced = [d for d in built if d["kind"] in ("Deployment", "Service", "ServiceAccount")]
    assert {d["metadata"]["namespace"] for d in namespaced} == {"kubetune-system"}


def test_kustomization_ships_the_generated_crds(built: list[dict[str, Any]]) -> None:
    shipped = {d["metadata"]["name"]: d for d in built if d["kind"] == "CustomResourceDefinition"}
    for crd in generate_crds().values():
        labels = dict(crd["metadata"]["labels"])
        assert shipped[crd["metadata"]["name"]]["spec"] == crd["spec"]
        assert shipped[crd["metadata"]["name"]]["metadata"]["labels"] == labels


def load(relative: str) -> dict[str, Any]:
    [doc] = documents(MANIFESTS / relative)
    return doc


def test_namespace_enforces_restricted_pod_security() -> None:
    labels = load("namespace.yaml")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_operator_deployment_meets_pod_security_restricted() -> None:
    deployment = load("operator/deployment.yaml")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    [container] = pod["containers"]
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["runAsUser"] == 65532
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": 8080, "metrics": 9090}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KUBETUNE_TRAINER_IMAGE"] == "kubetune/trainer:0.1.0"
    assert env["KUBETUNE_VLLM_IMAGE"] == "vllm/vllm-openai:v0.11.0"
    assert env["KUBETUNE_NAMESPACES"] == ""
    assert env["KUBETUNE_LOG_FORMAT"] == "json"
    assert pod["serviceAccountName"] == load("operator/serviceaccount.yaml")["metadata"]["name"]


def test_operator_cannot_list_or_watch_secrets() -> None:
    """Only "get" on Secrets, which the operator sends as metadata-only requests (the
    integration RBAC test checks every one); never list or watch, which would stream values."""
    role = load("operator/clusterrole.yaml")
    for rule in role["rules"]:
        if "secrets" in rule.get("resources", []):
            assert rule["resources"] == ["secrets"], rule
            assert rule["verbs"] == ["get"], rule
        assert "*" not in rule.get("verbs", []), rule
        assert "*" not in rule.get("resources", []), rule


def test_binding_grants_the_role_to_the_operator() -> None:
    binding = load("operator/clusterrolebinding.yaml")
    assert binding["roleRef"]["name"] == load("operator/clusterrole.yaml")["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "kubetune-operator", "namespace": "kubetune-system"}
    ]


EXAMPLE_DOCS = [
    (f"{path.name}#{index}", doc)
    for path in sorted(EXAMPLES.glob("*.yaml"))
    for index, doc in enumerate(documents(path))
]


@pytest.mark.parametrize(("where", "doc"), EXAMPLE_DOCS, ids=[w for w, _ in EXAMPLE_DOCS])
def test_example_is_valid(where: str, doc: dict[str, Any]) -> None:
    if doc["kind"] in KINDS:
        jsonschema.Draft4Validator(SCHEMAS[doc["kind"]]).validate(doc)
        resource, errors = validate_document(doc)
        assert errors == []
        assert resource is not None
    else:
        kubernetes_check(doc)


def test_examples_cover_the_documented_scenarios() -> None:
    kinds = {where.split("#")[0]: doc["kind"] for where, doc in EXAMPLE_DOCS}
    assert kinds == {
        "compress-from-finetune.yaml": "CompressJob",
        "dpo-lora.yaml": "FineTuneJob",
        "finetune-full-classification.yaml": "FineTuneJob",
        "finetune-lora-causal-lm.yaml": "FineTuneJob",
        "quickstart.yaml": "FineTuneJob",
        "s3-secret.yaml": "Secret",
        "sweep-lora.yaml": "FineTuneSweep",
    }


def test_secret_template_holds_only_placeholders() -> None:
    secret = load("examples/s3-secret.yaml")
    assert set(secret["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(value.startswith("REPLACE-WITH-") for value in secret["stringData"].values())
    # Jobs may use it for storage credentials only with this opt-in label.
    assert secret["metadata"]["labels"] == {"kubetune.io/storage-credentials": "true"}


# --- Dockerfiles ------------------------------------------------------------------------------

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.mark.parametrize("dockerfile", ["operator/Dockerfile", "trainer/Dockerfile"])
def test_dockerfile_installs_extras_that_exist(dockerfile: str) -> None:
    text = (ROOT / dockerfile).read_text()
    extras = {e for group in re.findall(r"\.\[([a-z0-9_,-]+)\]", text) for e in group.split(",")}
    assert extras
    assert extras <= set(PYPROJECT["project"]["optional-dependencies"])


def test_operator_image_runs_the_operator_without_torch() -> None:
    text = (ROOT / "operator" / "Dockerfile").read_text()
    assert ".[operator]" in text
    assert not re.search(r"pip install[^\n]*torch", text)
    assert 'ENTRYPOINT ["kubetune", "operator"]' in text
    assert "USER 65532" in text


def test_trainer_image_pins_the_projects_torch() -> None:
    text = (ROOT / "trainer" / "Dockerfile").read_text()
    torch_pin = next(
        d for d in PYPROJECT["project"]["optional-dependencies"]["trainer"] if d.startswith("torch==")
    )
    assert torch_pin.split("==")[1] in text
    assert "--no-build-isolation" in text
    assert 'ENTRYPOINT ["python", "-m", "kubetune.trainer"]' in text
    assert "USER 65532" in text
