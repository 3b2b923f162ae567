"""Least privilege against the real authorizer: the operator works with exactly the ClusterRole in
manifests/operator/clusterrole.yaml, and a job's runner token patches that job's status and
nothing else."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import config

from kubetune.api import FineTuneJob
from kubetune.operator import render
from kubetune.run.plan import JobRef
from kubetune.trainer.progress import KubernetesStatusReporter
from tests.cluster.conftest import OPERATOR_USER, OperatorProcess, create_token, wait_for
from tests.cluster.controlplane import ControlPlane
from tests.kube import finetunejob

pytestmark = pytest.mark.cluster


def as_token(plane: ControlPlane, token: str, method: str, path: str, body: Any = None) -> int:
    """The HTTP status of one request made with ``token``."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {token}"}
    if data:
        headers["Content-Type"] = "application/merge-patch+json"
    request = urllib.request.Request(plane.server + path, data=data, method=method, headers=headers)
    context = ssl.create_default_context(cafile=str(plane.ca_file))
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def create_job(plane: ControlPlane, namespace: str, name: str, **spec: Any) -> dict[str, Any]:
    doc = finetunejob(name, namespace, **spec)
    status, body = plane.request(
        "POST", f"/apis/kubetune.io/v1alpha1/namespaces/{namespace}/finetunejobs", doc
    )
    assert status == 201, body
    return dict(body)


def job_path(namespace: str, name: str) -> str:
    return f"/apis/kubetune.io/v1alpha1/namespaces/{namespace}/finetunejobs/{name}"


def test_a_runner_token_patches_its_own_jobs_status_and_is_denied_elsewhere(
    kubetune_installed: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    plane = kubetune_installed
    # Suspended: the operator (if it runs in this session) leaves them alone.
    mine = create_job(plane, namespace, "mine", suspend=True)
    create_job(plane, namespace, "theirs", suspend=True)
    job = FineTuneJob.model_validate(mine)
    identity = [render.render_runner_account(job, namespace), *render.render_status_access(job, namespace)]
    plane.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(identity))
    token = create_token(plane, namespace, render.runner_account_name(job), duration="10m")

    kubeconfig = plane.token_kubeconfig(tmp_path / "runner.kubeconfig", token)
    api_client = config.new_client_from_config(config_file=str(kubeconfig))
    reporter = KubernetesStatusReporter(
        JobRef(api_version="kubetune.io/v1alpha1", kind="FineTuneJob", namespace=namespace, name="mine"),
        api_client=api_client,
    )
    try:
        reporter.report_checkpoint(5, "s3://runs/mine/checkpoints/step-5")
    finally:
        reporter.close()
    _, body = plane.request("GET", job_path(namespace, "mine"))
    assert body["status"]["checkpoints"] == {
        "latestStep": 5,
        "latestUri": "s3://runs/mine/checkpoints/step-5",
    }

    patch = {"status": {"checkpoints": {"latestStep": 9}}}
    assert as_token(plane, token, "PATCH", job_path(namespace, "mine") + "/status", patch) == 200
    assert as_token(plane, token, "PATCH", job_path(namespace, "theirs") + "/status", patch) == 403
    assert as_token(plane, token, "GET", job_path(namespace, "theirs") + "/status") == 403
    assert as_token(plane, token, "PATCH", job_path(namespace, "mine"), {"spec": {"suspend": False}}) == 403
    assert as_token(plane, token, "GET", f"/api/v1/namespaces/{namespace}/secrets") == 403
    assert as_token(plane, token, "GET", f"/api/v1/namespaces/{namespace}/pods") == 403


def test_the_operator_creates_a_jobs_children_under_its_own_rbac_and_the_gc_removes_them(
    operator_process: OperatorProcess, namespace: str
) -> None:
    plane = operator_process.plane
    create_job(plane, namespace, "rbac")
    names = render.child_names(FineTuneJob.model_validate(finetunejob("rbac", namespace)))

    def children() -> bool:
        configmap = plane.request("GET", f"/api/v1/namespaces/{namespace}/configmaps/{names.plan}")[0]
        validation = plane.request("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/{names.validate}")[0]
        return configmap == 200 and validation == 200

    wait_for(children, what="the plan ConfigMap and the validation Job")
    # The real Job controller creates the validation pod: Pod Security "restricted" admitted it.
    pods = wait_for(
        lambda: plane.request(
            "GET",
            f"/api/v1/namespaces/{namespace}/pods?labelSelector=batch.kubernetes.io/job-name={names.validate}",
        )[1]["items"],
        what="the validation pod",
    )
    assert pods[0]["spec"]["securityContext"]["runAsNonRoot"] is True
    phase = wait_for(
        lambda: (plane.request("GET", job_path(namespace, "rbac"))[1].get("status") or {}).get("phase"),
        what="a phase",
    )
    assert phase in ("Pending", "Validating")

    assert plane.request("DELETE", job_path(namespace, "rbac"))[0] == 200
    # The garbage collector watches a kind only after its next discovery pass (every 30 s), so
    # right after the CRDs are installed this can take that long.
    wait_for(
        lambda: (
            plane.request("GET", f"/api/v1/namespaces/{namespace}/configmaps/{names.plan}")[0] == 404
            and plane.request("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/{names.validate}")[0] == 404
        ),
        what="the garbage collector to delete the children",
    )

    operator_requests = [
        e for e in plane.audit_events() if e.get("user", {}).get("username") == OPERATOR_USER
    ]
    assert operator_requests, "the operator made no request under its own identity"
    denied = [
        (e["verb"], e.get("objectRef", {}).get("resource"), e.get("objectRef", {}).get("subresource"))
        for e in operator_requests
        # The authorizer's own verdict; a 403 from admission (a terminating namespace) is not RBAC's.
        if e.get("annotations", {}).get("authorization.k8s.io/decision") == "forbid"
    ]
    assert denied == [], f"the ClusterRole is missing what the operator does: {denied}"
