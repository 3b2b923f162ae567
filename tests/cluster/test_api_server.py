"""kubetune's API on a real kube-apiserver: the generated CRDs install, every shipped example is
accepted, every document the API tests call invalid is rejected by the server naming the same
field as ``kubetune validate``, and the transition rules hold on updates of a started job."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api import API_VERSION
from kubetune.api.validation import validate_document
from tests.cluster.controlplane import REPO, ControlPlane
from tests.documents import edited
from tests.unit.test_api import INVALID, LORA

pytestmark = pytest.mark.cluster

EXAMPLES = sorted((REPO / "manifests" / "examples").glob("*.yaml"))
PLURALS = {"FineTuneJob": "finetunejobs", "CompressJob": "compressjobs", "FineTuneSweep": "finetunesweeps"}


def resource_path(doc: dict[str, Any], namespace: str, name: str | None = None) -> str:
    # A kind kubetune does not define is sent where a FineTuneJob would go, as kubectl would
    # after a typo in "kind" of a file that names FineTuneJob's endpoint.
    plural = PLURALS.get(doc["kind"], "finetunejobs")
    path = f"/apis/kubetune.io/v1alpha1/namespaces/{namespace}/{plural}"
    return f"{path}/{name}" if name else path


def server_errors(status: int, body: Any) -> list[str]:
    """The field paths the API server's Status names, as ``spec.x.y``."""
    assert status in (400, 422), (status, body)
    message = str(body.get("message"))
    # Strict field validation answers 400 with no causes: 'strict decoding error: unknown field
    # "spec.x", unknown field "spec.y"'; a version the CRD does not serve is refused the same way.
    if status == 400:
        if f'in version "{API_VERSION.split("/")[1]}"' not in message:
            return ["apiVersion"]
        return sorted(set(re.findall(r'unknown field "([^"]+)"', message)))
    causes = (body.get("details") or {}).get("causes") or []
    # "some validation rules were not checked because the object was invalid" names no field.
    # Type and anyOf errors come with a second cause whose field is "<nil>".
    named = [
        cause
        for cause in causes
        if "rules were not checked" not in str(cause.get("message")) and cause.get("field") != "<nil>"
    ]
    return sorted({str(cause.get("field") or "").removeprefix(".") for cause in named})


def dry_run_create(plane: ControlPlane, doc: dict[str, Any], namespace: str) -> tuple[int, Any]:
    doc = copy.deepcopy(doc)
    doc["metadata"].pop("namespace", None)
    return plane.request("POST", resource_path(doc, namespace) + "?dryRun=All&fieldValidation=Strict", doc)


def test_the_crds_install_established_and_explained(kubetune_installed: ControlPlane) -> None:
    crds = json.loads(kubetune_installed.kubectl("get", "crd", "-o", "json").stdout)["items"]
    names = {crd["metadata"]["name"] for crd in crds}
    assert {"finetunejobs.kubetune.io", "compressjobs.kubetune.io", "finetunesweeps.kubetune.io"} <= names
    for crd in crds:
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions.get("Established") == "True"
        assert conditions.get("NonStructuralSchema", "False") == "False"
    explained = kubetune_installed.kubectl("explain", "finetunejob.spec.deepspeed.zeroStage").stdout
    assert "ZeRO" in explained or "zero" in explained.lower()
    assert kubetune_installed.kubectl(
        "api-resources", "--categories=kubetune", "-o", "name"
    ).stdout.split() == [
        "compressjobs.kubetune.io",
        "finetunejobs.kubetune.io",
        "finetunesweeps.kubetune.io",
    ]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_passes_server_side_dry_run(kubetune_installed: ControlPlane, path: Path) -> None:
    result = kubetune_installed.kubectl("apply", "--dry-run=server", "-n", "default", "-f", str(path))
    assert "created (server dry run)" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize(("doc", "path"), [(c[1], c[2]) for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_documents_are_rejected_by_the_server_naming_the_same_field(
    kubetune_installed: ControlPlane, doc: dict[str, Any], path: str
) -> None:
    _, ours = validate_document(doc)
    assert [e.path for e in ours] == [path]
    status, body = dry_run_create(kubetune_installed, doc, "default")
    errors = server_errors(status, body)
    if path == "kind":
        # A kind the CRD does not define is never defaulted, so the server's CEL rules also
        # trip over the fields defaulting would have filled in; the kind is what it names first.
        assert errors[0] == "kind", body.get("message")
    else:
        assert errors == [path], body.get("message")


def test_the_server_defaults_what_the_example_leaves_out(kubetune_installed: ControlPlane) -> None:
    doc = edited(LORA, spec__deepspeed=None, spec__task=None)
    status, body = dry_run_create(kubetune_installed, doc, "default")
    assert status == 201, body
    ours = validate_document(doc)[0]
    assert ours is not None
    wire = ours.model_dump(by_alias=True, exclude_none=True, mode="json")["spec"]
    assert body["spec"]["deepspeed"] == wire["deepspeed"]
    assert body["spec"]["task"] == wire["task"]


def started(plane: ControlPlane, doc: dict[str, Any], namespace: str) -> dict[str, Any]:
    """The job created and marked started the way the operator does (status.startTime)."""
    doc = copy.deepcopy(doc)
    doc["metadata"].pop("namespace", None)
    status, body = plane.request("POST", resource_path(doc, namespace), doc)
    assert status == 201, body.get("message", body)
    name = body["metadata"]["name"]
    patch = {"status": {"startTime": "2026-01-01T00:00:00Z", "phase": "Running"}}
    status, body = plane.request_patch(resource_path(doc, namespace, name) + "/status", patch)
    assert status == 200, body
    return dict(body)


def test_a_started_job_refuses_changes_to_training_but_takes_serving_edits(
    kubetune_installed: ControlPlane, namespace: str
) -> None:
    job = started(kubetune_installed, edited(LORA, metadata__name="immutable"), namespace)
    path = resource_path(job, namespace, "immutable")

    status, body = kubetune_installed.request_patch(path, {"spec": {"hyperparameters": {"epochs": 7}}})
    assert status == 422, body
    assert "cannot change once the job has started" in body["message"]

    status, body = kubetune_installed.request_patch(path, {"spec": {"output": {"uri": "s3://elsewhere/run"}}})
    assert status == 422, body

    status, body = kubetune_installed.request_patch(path, {"spec": {"serve": {"replicas": 2}}})
    assert status == 200, body
    assert body["spec"]["serve"]["replicas"] == 2


def test_a_started_sweep_refuses_template_changes_but_takes_more_trials(
    kubetune_installed: ControlPlane, namespace: str
) -> None:
    sweep = yaml.safe_load((REPO / "manifests" / "examples" / "sweep-lora.yaml").read_text())
    doc = started(kubetune_installed, edited(sweep, metadata__name="study"), namespace)
    path = resource_path(doc, namespace, "study")

    patch = {"spec": {"template": {"storage": {"secretRef": {"name": "other-keys"}}}}}
    status, body = kubetune_installed.request_patch(path, patch)
    assert status == 422, body
    assert "cannot change once the sweep has started" in body["message"]

    status, body = kubetune_installed.request_patch(path, {"spec": {"maxTrials": 40}})
    assert status == 200, body
    assert body["spec"]["maxTrials"] == 40


def test_a_job_not_yet_started_takes_any_valid_edit(kubetune_installed: ControlPlane, namespace: str) -> None:
    doc = edited(LORA, metadata__name="editable")
    doc["metadata"].pop("namespace", None)
    status, body = kubetune_installed.request("POST", resource_path(doc, namespace), doc)
    assert status == 201, body
    status, body = kubetune_installed.request_patch(
        resource_path(doc, namespace, "editable"), {"spec": {"hyperparameters": {"epochs": 7}}}
    )
    assert status == 200, body


def test_status_written_into_the_spec_request_is_dropped(
    kubetune_installed: ControlPlane, namespace: str
) -> None:
    """The status subresource: a create or update of the main resource never sets status."""
    doc = yaml.safe_load(yaml.safe_dump(edited(LORA, metadata__name="no-status")))
    doc["metadata"].pop("namespace", None)
    doc["status"] = {"phase": "Succeeded"}
    status, body = kubetune_installed.request("POST", resource_path(doc, namespace), doc)
    assert status == 201, body
    assert "phase" not in (body.get("status") or {})
