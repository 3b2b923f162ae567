# ruff: noqa: F811  (pytest fixtures are imported by name and then named as parameters)
"""The real operator against the Kubernetes emulator: lifecycle, restarts, serving, RBAC.

The tests play the Job controller and the kubelet (tests.kube.complete_job, fail_job...). Each
scenario is a plain coroutine so the RBAC test can replay them all and audit every request.
"""

from __future__ import annotations

import functools
import json
import re
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.integration.test_sweep_operator import SCENARIOS as SWEEP_SCENARIOS
from tests.kube import (  # noqa: F401  (fixtures)
    TEST_SETTINGS,
    KubeEmulator,
    Operator,
    assert_secrets_read_as_metadata_only,
    complete_job,
    compressjob,
    create,
    delete,
    eventually,
    fail_job,
    finetunejob,
    kube,
    kubeconfig,
    operator,
    operator_requests,
    patch,
    secret,
    set_deployment_ready,
    start_job,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

FTJ = "kubetune.io/v1alpha1/finetunejobs"
CJ = "kubetune.io/v1alpha1/compressjobs"
JOBS = "batch/v1/jobs"
DEPLOYMENTS = "apps/v1/deployments"
CLUSTERROLE = Path(__file__).resolve().parents[2] / "manifests" / "operator" / "clusterrole.yaml"


def status(kube: KubeEmulator, ns: str, name: str, resource: str = FTJ) -> dict[str, Any]:
    return dict((kube.get(resource, ns, name) or {}).get("status") or {})


def condition(kube: KubeEmulator, ns: str, name: str, type_: str, resource: str = FTJ) -> dict[str, Any]:
    conds = status(kube, ns, name, resource).get("conditions") or []
    return next((c for c in conds if c["type"] == type_), {})


async def reach(kube: KubeEmulator, ns: str, name: str, phase: str, resource: str = FTJ) -> dict[str, Any]:
    await eventually(
        lambda: status(kube, ns, name, resource).get("phase") == phase, what=f"{name} -> {phase}"
    )
    return status(kube, ns, name, resource)


async def job_exists(kube: KubeEmulator, ns: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = await eventually(lambda: kube.get(JOBS, ns, name), what=f"Job {ns}/{name}")
    return found


def events(kube: KubeEmulator, ns: str, reason: str) -> list[dict[str, Any]]:
    out = []
    for name in kube.names("v1/events", ns):
        event = kube.get("v1/events", ns, name) or {}
        if event.get("reason") == reason:
            out.append(event)
    return out


async def validated(kube: KubeEmulator, ns: str, name: str) -> dict[str, Any]:
    """Let the validation Job pass; returns the first training Job."""
    await job_exists(kube, ns, f"{name}-validate")
    await complete_job(kube, ns, f"{name}-validate")
    return await job_exists(kube, ns, f"{name}-train-r0")


# --- Scenarios ------------------------------------------------------------------------------------


async def scenario_children_owned(kube: KubeEmulator, ns: str) -> None:
    created = await create(kube, FTJ, finetunejob("owned", ns))
    await job_exists(kube, ns, "owned-validate")
    uid = created["metadata"]["uid"]
    before_validation = [
        ("v1/configmaps", "owned-plan"),
        ("v1/serviceaccounts", "owned-runner"),
        (JOBS, "owned-validate"),
    ]
    gang = [
        ("v1/services", "owned-workers"),
        ("rbac.authorization.k8s.io/v1/roles", "owned-runner"),
        ("rbac.authorization.k8s.io/v1/rolebindings", "owned-runner"),
        (JOBS, "owned-train-r0"),
    ]
    for resource, name in before_validation:
        assert kube.get(resource, ns, name) is not None, f"{resource} {name} missing"
    for resource, name in gang:
        assert kube.get(resource, ns, name) is None, f"{resource} {name} exists before validation"
    st = await reach(kube, ns, "owned", "Validating")
    assert st["observedGeneration"] == 1
    assert st["startTime"]
    assert st["restarts"] == 0
    await validated(kube, ns, "owned")
    for resource, name in before_validation + gang:
        child = kube.get(resource, ns, name)
        assert child is not None, f"{resource} {name} missing"
        refs = child["metadata"]["ownerReferences"]
        assert refs == [
            {
                "apiVersion": "kubetune.io/v1alpha1",
                "kind": "FineTuneJob",
                "name": "owned",
                "uid": uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ], f"{resource} {name}"
    plan = json.loads(kube.get("v1/configmaps", ns, "owned-plan")["data"]["plan.json"])  # type: ignore[index]
    assert plan["job"] == {
        "api_version": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "namespace": ns,
        "name": "owned",
        "uid": uid,
    }


async def scenario_success_and_serving(kube: KubeEmulator, ns: str) -> None:
    await create(kube, FTJ, finetunejob("served", ns, serve={"enabled": True}))
    train = await validated(kube, ns, "served")
    assert train["spec"]["completions"] == train["spec"]["parallelism"] == 2
    await eventually(lambda: condition(kube, ns, "served", "Validated").get("status") == "True")
    await start_job(kube, ns, "served-train-r0")
    await eventually(lambda: "2/2 workers ready" in status(kube, ns, "served").get("message", ""))
    assert status(kube, ns, "served")["phase"] == "Running"
    await complete_job(kube, ns, "served-train-r0")
    st = await reach(kube, ns, "served", "Succeeded")
    assert st["artifacts"] == {
        "modelUri": "s3://runs/served/model",
        "adapterUri": "s3://runs/served/adapter",
        "metricsUri": "s3://runs/served/metrics.json",
        "logsUri": "s3://runs/served/logs",
    }
    assert st["completionTime"]
    assert condition(kube, ns, "served", "Complete")["status"] == "True"
    deployment = await eventually(lambda: kube.get(DEPLOYMENTS, ns, "served-serve"))
    assert kube.get("v1/services", ns, "served-serve") is not None
    await eventually(lambda: (status(kube, ns, "served").get("serving") or {}).get("url"))
    assert status(kube, ns, "served")["serving"]["ready"] is False
    await set_deployment_ready(kube, ns, "served-serve", 1)
    await eventually(lambda: status(kube, ns, "served")["serving"]["ready"] is True)
    assert status(kube, ns, "served")["serving"] == {
        "deployment": "served-serve",
        "service": "served-serve",
        "url": f"http://served-serve.{ns}.svc:8000/v1",
        "ready": True,
        "readyReplicas": 1,
    }
    assert condition(kube, ns, "served", "ServingReady")["status"] == "True"
    await eventually(lambda: events(kube, ns, "Succeeded") and events(kube, ns, "ServingReady"))
    assert deployment["metadata"]["ownerReferences"][0]["name"] == "served"


async def scenario_retriable_failures(kube: KubeEmulator, ns: str) -> None:
    await create(kube, FTJ, finetunejob("flaky", ns, maxRestarts=2))
    await validated(kube, ns, "flaky")
    await fail_job(kube, ns, "flaky-train-r0", exit_code=137, message="")
    await job_exists(kube, ns, "flaky-train-r1")
    await eventually(lambda: kube.get(JOBS, ns, "flaky-train-r0") is None, what="failed attempt deleted")
    st = await eventually(lambda: (s := status(kube, ns, "flaky")).get("restarts") == 1 and s)
    assert st["phase"] == "Running"
    assert st["activeJob"] == "flaky-train-r1"
    await eventually(
        lambda: any("exited with code 137" in e["message"] for e in events(kube, ns, "Restarting"))
    )
    await fail_job(kube, ns, "flaky-train-r1", exit_code=1, message="NCCL timeout")
    await job_exists(kube, ns, "flaky-train-r2")
    await fail_job(kube, ns, "flaky-train-r2", exit_code=1, message="NCCL timeout again")
    st = await reach(kube, ns, "flaky", "Failed")
    failed = condition(kube, ns, "flaky", "Failed")
    assert failed["reason"] == "RestartsExhausted"
    assert "NCCL timeout again" in failed["message"]
    assert st["restarts"] == 2
    assert kube.get(JOBS, ns, "flaky-train-r3") is None


async def scenario_invalid_input(kube: KubeEmulator, ns: str) -> None:
    await create(kube, FTJ, finetunejob("broken", ns))
    await validated(kube, ns, "broken")
    reason = "dataset.train: line 3: record has no field 'text' (fields: prompt, response)"
    await fail_job(kube, ns, "broken-train-r0", exit_code=2, message=reason, index=1)
    st = await reach(kube, ns, "broken", "Failed")
    failed = condition(kube, ns, "broken", "Failed")
    assert failed["reason"] == "InvalidInput"
    assert reason in failed["message"]
    assert reason in st["message"]
    assert st["restarts"] == 0
    assert kube.get(JOBS, ns, "broken-train-r1") is None
    await eventually(lambda: any(reason in e["message"] for e in events(kube, ns, "InvalidInput")))


async def scenario_validation_failure(kube: KubeEmulator, ns: str) -> None:
    await create(kube, FTJ, finetunejob("unreadable", ns))
    await job_exists(kube, ns, "unreadable-validate")
    reason = "s3://models/tiny-llama/config.json: access denied (403)"
    await fail_job(kube, ns, "unreadable-validate", exit_code=3, message=reason)
    await reach(kube, ns, "unreadable", "Failed")
    assert condition(kube, ns, "unreadable", "Failed")["reason"] == "StorageError"
    validated_condition = condition(kube, ns, "unreadable", "Validated")
    assert validated_condition["status"] == "False"
    assert validated_condition["reason"] == "StorageError"
    assert reason in validated_condition["message"]
    assert kube.get(JOBS, ns, "unreadable-train-r0") is None


async def scenario_suspend_resume(kube: KubeEmulator, ns: str) -> None:
    await create(kube, FTJ, finetunejob("pausable", ns))
    await validated(kube, ns, "pausable")
    await start_job(kube, ns, "pausable-train-r0")
    await reach(kube, ns, "pausable", "Running")
    await patch(kube, FTJ, ns, "pausable", {"spec": {"suspend": True}})
    await eventually(lambda: kube.get(JOBS, ns, "pausable-train-r0")["spec"]["suspend"] is True)  # type: ignore[index]
    await reach(kube, ns, "pausable", "Suspended")
    assert condition(kube, ns, "pausable", "Suspended")["status"] == "True"
    assert condition(kube, ns, "pausable", "Running")["status"] == "False"
    await patch(kube, FTJ, ns, "pausable", {"spec": {"suspend": False}})
    await eventually(lambda: kube.get(JOBS, ns, "pausable-train-r0")["spec"]["suspend"] is False)  # type: ignore[index]
    await reach(kube, ns, "pausable", "Running")
    assert condition(kube, ns, "pausable", "Suspended")["status"] == "False"
    assert kube.names(JOBS, ns) == ["pausable-train-r0", "pausable-validate"]


async def scenario_serve_edit(kube: KubeEmulator, ns: str) -> None:
    await create(kube, FTJ, finetunejob("editable", ns, serve={"enabled": True}))
    await validated(kube, ns, "editable")
    await complete_job(kube, ns, "editable-train-r0")
    before = await eventually(lambda: kube.get(DEPLOYMENTS, ns, "editable-serve"))
    await patch(
        kube, FTJ, ns, "editable", {"spec": {"serve": {"enabled": True, "replicas": 3, "maxBatchSize": 4}}}
    )

    def updated() -> dict[str, Any] | None:
        dep = kube.get(DEPLOYMENTS, ns, "editable-serve")
        return dep if dep and dep["spec"]["replicas"] == 3 else None

    after = await eventually(updated, what="Deployment patched")
    assert after["metadata"]["uid"] == before["metadata"]["uid"], "updated in place, not replaced"
    args = after["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--max-batch-size") + 1] == "4"
    await eventually(lambda: status(kube, ns, "editable").get("observedGeneration") == 2)
    await eventually(lambda: events(kube, ns, "ServingUpdated"))
    await patch(kube, FTJ, ns, "editable", {"spec": {"serve": {"enabled": False}}})
    await eventually(lambda: kube.get(DEPLOYMENTS, ns, "editable-serve") is None, what="serving removed")
    await eventually(
        lambda: kube.get("v1/services", ns, "editable-serve") is None, what="serving Service removed"
    )
    await eventually(lambda: "serving" not in status(kube, ns, "editable"), what="serving status cleared")


async def scenario_delete(kube: KubeEmulator, ns: str) -> None:
    await create(kube, FTJ, finetunejob("doomed", ns, serve={"enabled": True}))
    await validated(kube, ns, "doomed")
    await complete_job(kube, ns, "doomed-train-r0")
    await eventually(lambda: kube.get(DEPLOYMENTS, ns, "doomed-serve"))
    await delete(kube, FTJ, ns, "doomed")

    def gone(resource: str) -> bool:
        return not [n for n in kube.names(resource, ns) if n.startswith("doomed-")]

    for resource in ("v1/configmaps", "v1/services", "v1/serviceaccounts", JOBS, DEPLOYMENTS):
        await eventually(functools.partial(gone, resource), what=resource)


async def scenario_ttl(kube: KubeEmulator, ns: str) -> None:
    await create(kube, FTJ, finetunejob("shortlived", ns, ttlSecondsAfterFinished=0, serve={"enabled": True}))
    await validated(kube, ns, "shortlived")
    await complete_job(kube, ns, "shortlived-train-r0")
    await reach(kube, ns, "shortlived", "Succeeded")
    await eventually(
        lambda: kube.get("v1/configmaps", ns, "shortlived-plan") is None, what="children deleted"
    )
    assert kube.names(JOBS, ns) == []
    assert kube.get("v1/serviceaccounts", ns, "shortlived-runner") is None
    assert kube.get(DEPLOYMENTS, ns, "shortlived-serve") is not None, "serving stays while the job exists"
    assert status(kube, ns, "shortlived")["phase"] == "Succeeded"


async def scenario_deadline(kube: KubeEmulator, ns: str) -> None:
    await create(kube, FTJ, finetunejob("hasty", ns, activeDeadlineSeconds=2))
    await validated(kube, ns, "hasty")
    await reach(kube, ns, "hasty", "Running")
    # The operator's clock needs no finalizer: the job stays deletable without the operator.
    assert not kube.get(FTJ, ns, "hasty")["metadata"].get("finalizers")  # type: ignore[index]
    await reach(kube, ns, "hasty", "Failed")
    failed = condition(kube, ns, "hasty", "Failed")
    assert failed["reason"] == "DeadlineExceeded"
    assert "longer than activeDeadlineSeconds 2" in failed["message"]
    await eventually(lambda: kube.get(JOBS, ns, "hasty-train-r0") is None, what="the gang Job deleted")

    # Earlier versions ran the clock as kopf timers, which left this finalizer; it is released.
    legacy = finetunejob("legacy", ns, activeDeadlineSeconds=3600)
    legacy["metadata"]["finalizers"] = ["kubetune.io/finalizer"]
    await create(kube, FTJ, legacy)
    await eventually(
        lambda: not (kube.get(FTJ, ns, "legacy") or {})["metadata"].get("finalizers"),
        what="finalizer released",
    )


async def scenario_compress_waits(kube: KubeEmulator, ns: str) -> None:
    await create(kube, CJ, compressjob("squeeze", ns, model={"fromFineTuneJob": "base"}))
    st = await reach(kube, ns, "squeeze", "Waiting", CJ)
    assert "FineTuneJob base" in st["message"]
    await create(kube, FTJ, finetunejob("base", ns))
    await validated(kube, ns, "base")
    assert status(kube, ns, "squeeze", CJ)["phase"] == "Waiting"
    assert kube.names("v1/configmaps", ns) == ["base-plan"]
    await complete_job(kube, ns, "base-train-r0")
    await reach(kube, ns, "squeeze", "Validating", CJ)
    plan = json.loads(kube.get("v1/configmaps", ns, "squeeze-compress-plan")["data"]["plan.json"])  # type: ignore[index]
    assert plan["model_uri"] == "s3://runs/base/model"
    assert status(kube, ns, "squeeze", CJ)["sourceModelUri"] == "s3://runs/base/model"
    await complete_job(kube, ns, "squeeze-compress-validate")
    main = await job_exists(kube, ns, "squeeze-compress-r0")
    assert main["spec"]["template"]["spec"]["containers"][0]["command"] == ["python"]
    await complete_job(kube, ns, "squeeze-compress-r0")
    st = await reach(kube, ns, "squeeze", "Succeeded", CJ)
    assert st["artifacts"] == {
        "modelUri": "s3://runs/squeeze/model",
        "reportUri": "s3://runs/squeeze/compression_report.json",
    }


async def scenario_compress_upstream_failed(kube: KubeEmulator, ns: str) -> None:
    await create(kube, FTJ, finetunejob("doomedbase", ns))
    await create(
        kube,
        CJ,
        compressjob("orphan", ns, model={"fromFineTuneJob": "doomedbase"}, ttlSecondsAfterFinished=0),
    )
    await reach(kube, ns, "orphan", "Waiting", CJ)
    await job_exists(kube, ns, "doomedbase-validate")
    await fail_job(
        kube, ns, "doomedbase-validate", exit_code=2, message="model config.json is not valid JSON"
    )
    await reach(kube, ns, "orphan", "Failed", CJ)
    failed = condition(kube, ns, "orphan", "Failed", CJ)
    assert failed["reason"] == "UpstreamFailed"
    assert "FineTuneJob doomedbase failed" in failed["message"]
    assert "config.json is not valid JSON" in failed["message"]
    assert not [n for n in kube.names(JOBS, ns) if n.startswith("orphan")]

    # Its TTL applies to a failed CompressJob too: the operator marks the cleanup as done.
    def cleaned() -> bool:
        annotations = (kube.get(CJ, ns, "orphan") or {})["metadata"].get("annotations") or {}
        return annotations.get("kubetune.io/children-deleted") == "true"

    await eventually(cleaned, what="orphan's TTL cleanup")


def service_account(name: str, ns: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
    }


async def scenario_workload_identity(kube: KubeEmulator, ns: str) -> None:
    await create(kube, FTJ, finetunejob("irsa", ns, storage={"serviceAccountName": "team-s3"}))
    st = await reach(kube, ns, "irsa", "Waiting")
    assert "ServiceAccount team-s3 (spec.storage.serviceAccountName)" in st["message"]
    await create(kube, "v1/serviceaccounts", service_account("team-s3", ns, {"kubetune.io/runner": "true"}))
    validate = await job_exists(kube, ns, "irsa-validate")  # the operator looks again every 10 s
    assert validate["spec"]["template"]["spec"]["serviceAccountName"] == "team-s3"
    assert kube.get("v1/serviceaccounts", ns, "irsa-runner") is None, "no ServiceAccount of its own"

    await create(kube, "v1/serviceaccounts", service_account("deployer", ns))
    await create(kube, FTJ, finetunejob("borrower", ns, storage={"serviceAccountName": "deployer"}))
    await reach(kube, ns, "borrower", "Failed")
    assert condition(kube, ns, "borrower", "Failed")["reason"] == "ServiceAccountNotAllowed"
    assert not [n for n in kube.names(JOBS, ns) if n.startswith("borrower")]


def plan_of(kube: KubeEmulator, ns: str, name: str) -> dict[str, Any]:
    configmap = kube.get("v1/configmaps", ns, f"{name}-plan") or {}
    return dict(json.loads((configmap.get("data") or {}).get("plan.json") or "{}"))


def generation_of(obj: dict[str, Any] | None) -> str | None:
    return ((obj or {}).get("metadata", {}).get("annotations") or {}).get("kubetune.io/generation")


async def scenario_spec_edit_before_start(kube: KubeEmulator, ns: str) -> None:
    """A job created suspended already has its plan and validation Job; edits until it starts
    reach both (they used to keep the first plan while status advertised the new output)."""
    await create(kube, FTJ, finetunejob("drafted", ns, suspend=True))
    first = await job_exists(kube, ns, "drafted-validate")
    assert first["spec"]["suspend"] is True
    await reach(kube, ns, "drafted", "Suspended")
    assert plan_of(kube, ns, "drafted")["output_uri"] == "s3://runs/drafted"
    assert generation_of(kube.get("v1/configmaps", ns, "drafted-plan")) == "1"
    await patch(
        kube,
        FTJ,
        ns,
        "drafted",
        {
            "spec": {
                "output": {"uri": "s3://runs/drafted-v2"},
                "hyperparameters": {"maxSteps": 40},
                "resources": {"workers": 2, "image": "registry.example.com/ml/trainer:2"},
            }
        },
    )
    await eventually(
        lambda: plan_of(kube, ns, "drafted").get("output_uri") == "s3://runs/drafted-v2",
        what="the plan follows the edit",
    )
    assert plan_of(kube, ns, "drafted")["hyperparameters"]["max_steps"] == 40
    assert generation_of(kube.get("v1/configmaps", ns, "drafted-plan")) == "2"

    def recreated() -> dict[str, Any] | None:
        job = kube.get(JOBS, ns, "drafted-validate")
        return job if job and job["metadata"]["uid"] != first["metadata"]["uid"] else None

    second = await eventually(recreated, what="the validation Job recreated")
    assert generation_of(second) == "2"
    assert second["spec"]["suspend"] is True
    assert second["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example.com/ml/trainer:2"
    await eventually(lambda: events(kube, ns, "SpecChanged"))
    # Resuming (generation 3) renders nothing new: the Job is unsuspended in place, the job
    # starts and its plan is frozen.
    await patch(kube, FTJ, ns, "drafted", {"spec": {"suspend": False}})

    def started() -> dict[str, Any] | None:
        job = kube.get(JOBS, ns, "drafted-validate")
        return job if job and job["spec"]["suspend"] is False else None

    running = await eventually(started, what="the validation Job runs")
    assert running["metadata"]["uid"] == second["metadata"]["uid"]
    st = await reach(kube, ns, "drafted", "Validating")
    assert st["startTime"]
    await validated(kube, ns, "drafted")
    assert plan_of(kube, ns, "drafted")["output_uri"] == "s3://runs/drafted-v2"
    assert status(kube, ns, "drafted")["observedGeneration"] == 3


STORAGE_WITH_SECRET = {"endpoint": "http://minio.storage:9000", "secretRef": {"name": "team-keys"}}


async def scenario_storage_secret(kube: KubeEmulator, ns: str) -> None:
    """A Secret supplies storage credentials only once its owner labels it for kubetune."""
    await create(kube, FTJ, finetunejob("keyed", ns, storage=STORAGE_WITH_SECRET))
    st = await reach(kube, ns, "keyed", "Waiting")
    assert "Secret team-keys (spec.storage.secretRef)" in st["message"]
    assert kube.get(JOBS, ns, "keyed-validate") is None
    await create(kube, "v1/secrets", secret("team-keys", ns, {"kubetune.io/storage-credentials": "true"}))
    validate = await job_exists(kube, ns, "keyed-validate")  # the operator looks again every 10 s
    env = validate["spec"]["template"]["spec"]["containers"][0]["env"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in env if "valueFrom" in e}
    assert refs == {"AWS_ACCESS_KEY_ID": "team-keys", "AWS_SECRET_ACCESS_KEY": "team-keys"}

    await create(kube, "v1/secrets", secret("deploy-keys", ns))
    unlabelled = {**STORAGE_WITH_SECRET, "secretRef": {"name": "deploy-keys"}}
    await create(kube, FTJ, finetunejob("borrowed", ns, storage=unlabelled))
    await reach(kube, ns, "borrowed", "Failed")
    failed = condition(kube, ns, "borrowed", "Failed")
    assert failed["reason"] == "SecretNotAllowed"
    assert 'kubetune.io/storage-credentials: "true"' in failed["message"]
    assert not [n for n in kube.names(JOBS, ns) if n.startswith("borrowed")]
    await eventually(lambda: events(kube, ns, "SecretNotAllowed"))
    assert_secrets_read_as_metadata_only(kube)


REJECTION = (
    'Job.batch "picky-validate" is invalid: spec.template.spec.priorityClassName: Invalid value: '
    '"batch-low": denied by ValidatingAdmissionPolicy require-team-priority'
)


async def scenario_rejected_child(kube: KubeEmulator, ns: str) -> None:
    """A child the API server refuses (422) fails the job at once with the server's message; it
    used to be retried every 10 seconds forever with nothing on the job."""
    path = f"/apis/batch/v1/namespaces/{ns}/jobs"
    (
        kube[f"post {path}"]
        << 422
        << {
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure",
            "reason": "Invalid",
            "code": 422,
            "message": REJECTION,
        }
    )
    await create(kube, FTJ, finetunejob("picky", ns))
    st = await reach(kube, ns, "picky", "Failed")
    failed = condition(kube, ns, "picky", "Failed")
    assert failed["reason"] == "InvalidChild"
    assert failed["message"] == f"the API server rejected Job picky-validate: {REJECTION}"
    assert st["message"] == failed["message"]
    await eventually(lambda: any(REJECTION in e["message"] for e in events(kube, ns, "InvalidChild")))
    posts = [
        r
        for r in operator_requests(kube)
        if r.resource is not None
        and r.resource.plural == "jobs"
        and r.namespace == ns
        and not r.name
        and str(r.method.value if hasattr(r.method, "value") else r.method).upper() == "POST"
    ]
    assert len(posts) == 1, "tried once, not again"


async def scenario_restart_no_duplicates(kube: KubeEmulator, ns: str, running: Operator) -> None:
    await create(kube, FTJ, finetunejob("steady", ns, serve={"enabled": True}))
    await validated(kube, ns, "steady")
    await create(kube, FTJ, finetunejob("finished", ns, serve={"enabled": True}))
    await validated(kube, ns, "finished")
    await complete_job(kube, ns, "finished-train-r0")
    await eventually(lambda: kube.get(DEPLOYMENTS, ns, "finished-serve"))
    await eventually(lambda: (status(kube, ns, "finished").get("serving") or {}).get("url"))
    await eventually(lambda: status(kube, ns, "steady").get("activeJob") == "steady-train-r0")
    before = {name: status(kube, ns, name) for name in ("steady", "finished")}
    await running.restart()
    # After the restart the operator resumes both jobs; let the next step happen and compare.
    await start_job(kube, ns, "steady-train-r0")
    await eventually(lambda: "2/2 workers ready" in status(kube, ns, "steady").get("message", ""))
    creates = Counter(
        (plural, name)
        for _, action, plural, namespace, name in kube.journal
        if action == "create" and namespace == ns and plural not in ("events", "pods", "finetunejobs")
    )
    assert creates, "the scenario created children"
    assert max(creates.values()) == 1, f"created twice: {[k for k, v in creates.items() if v > 1]}"
    assert kube.names(JOBS, ns) == [
        "finished-train-r0",
        "finished-validate",
        "steady-train-r0",
        "steady-validate",
    ]
    assert status(kube, ns, "finished") == before["finished"]
    assert status(kube, ns, "steady")["restarts"] == before["steady"]["restarts"] == 0


async def scenario_name_conflict(kube: KubeEmulator, ns: str) -> None:
    """Children whose names are taken by objects the job does not own fail it, untouched."""
    foreign: list[tuple[str, dict[str, Any]]] = [
        (
            "v1/configmaps",
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "taken-plan"}, "data": {}},
        ),
        (JOBS, {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "clash-validate"}, "spec": {}}),
        (
            DEPLOYMENTS,
            {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "late-serve"}, "spec": {}},
        ),
    ]
    for resource, manifest in foreign:
        manifest["metadata"]["namespace"] = ns
        await create(kube, resource, manifest)
    await create(kube, FTJ, finetunejob("taken", ns))
    await create(kube, FTJ, finetunejob("clash", ns))
    await create(kube, FTJ, finetunejob("late", ns, serve={"enabled": True}))
    await validated(kube, ns, "late")
    await complete_job(kube, ns, "late-train-r0")
    conflicts = (
        ("taken", "Failed", "ConfigMap taken-plan"),
        ("clash", "Failed", "Job clash-validate"),
        # Training succeeded; only serving is impossible.
        ("late", "ServingReady", "Deployment late-serve"),
    )

    def conflicted(name: str, type_: str) -> bool:
        return condition(kube, ns, name, type_).get("reason") == "NameConflict"

    for name, type_, child in conflicts:
        await eventually(functools.partial(conflicted, name, type_), what=name)
        assert f"{child} already exists" in condition(kube, ns, name, type_)["message"]
    assert status(kube, ns, "late")["phase"] == "Succeeded"
    for resource, manifest in foreign:
        untouched = kube.get(resource, ns, manifest["metadata"]["name"]) or {}
        assert "ownerReferences" not in untouched["metadata"]


Scenario = Callable[[KubeEmulator, str], Awaitable[None]]
SCENARIOS: dict[str, Scenario] = {
    "children_owned": scenario_children_owned,
    "success_and_serving": scenario_success_and_serving,
    "retriable_failures": scenario_retriable_failures,
    "invalid_input": scenario_invalid_input,
    "validation_failure": scenario_validation_failure,
    "suspend_resume": scenario_suspend_resume,
    "serve_edit": scenario_serve_edit,
    "delete": scenario_delete,
    "ttl": scenario_ttl,
    "deadline": scenario_deadline,
    "compress_waits": scenario_compress_waits,
    "compress_upstream_failed": scenario_compress_upstream_failed,
    "name_conflict": scenario_name_conflict,
    "workload_identity": scenario_workload_identity,
    "spec_edit_before_start": scenario_spec_edit_before_start,
    "storage_secret": scenario_storage_secret,
    # Last: its reaction sends the emulator's later requests through KMock's slower matching.
    "rejected_child": scenario_rejected_child,
}


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_scenario(name: str, kube: KubeEmulator, operator: Operator) -> None:
    await SCENARIOS[name](kube, "team-a")


async def test_operator_restart_creates_no_duplicates(kube: KubeEmulator, operator: Operator) -> None:
    await scenario_restart_no_duplicates(kube, "team-a", operator)


async def test_namespaced_operator_ignores_other_namespaces(kube: KubeEmulator, kubeconfig: Path) -> None:
    for namespace in ("watched", "elsewhere"):
        await create(
            kube, "v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
        )
    running = Operator(settings=TEST_SETTINGS.model_copy(update={"namespaces": ("watched",)}))
    await running.start()
    try:
        await create(kube, FTJ, finetunejob("seen", "watched"))
        await create(kube, FTJ, finetunejob("unseen", "elsewhere"))
        await job_exists(kube, "watched", "seen-validate")
        await reach(kube, "watched", "seen", "Validating")
        assert status(kube, "elsewhere", "unseen") == {}
        assert kube.names(JOBS, "elsewhere") == []
    finally:
        await running.stop()


async def test_images_outside_the_allowed_prefixes_are_refused(kube: KubeEmulator, kubeconfig: Path) -> None:
    settings = TEST_SETTINGS.model_copy(update={"allowed_image_prefixes": ("registry.example.com/ml/",)})
    running = Operator(settings=settings)
    await running.start()
    ns = "team-a"
    try:
        rogue = {"workers": 2, "image": "docker.io/someone/miner:latest"}
        await create(kube, FTJ, finetunejob("rogue", ns, resources=rogue))
        await reach(kube, ns, "rogue", "Failed")
        failed = condition(kube, ns, "rogue", "Failed")
        assert failed["reason"] == "ImageNotAllowed"
        assert "spec.resources.image docker.io/someone/miner:latest is not allowed" in failed["message"]
        assert "registry.example.com/ml/ (KUBETUNE_ALLOWED_IMAGE_PREFIXES)" in failed["message"]
        assert not [n for n in kube.names(JOBS, ns) if n.startswith("rogue")]
        await eventually(lambda: events(kube, ns, "ImageNotAllowed"))
        vetted = {"workers": 2, "image": "registry.example.com/ml/trainer:2"}
        await create(kube, FTJ, finetunejob("vetted", ns, resources=vetted))
        validate = await job_exists(kube, ns, "vetted-validate")
        assert validate["spec"]["template"]["spec"]["containers"][0]["image"] == vetted["image"]
    finally:
        await running.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_metrics_and_liveness_endpoints(kube: KubeEmulator, kubeconfig: Path) -> None:
    metrics_port, health_port = free_port(), free_port()
    settings = TEST_SETTINGS.model_copy(update={"metrics_port": metrics_port, "health_port": health_port})
    running = Operator(settings=settings)
    await running.start()
    try:
        await create(kube, FTJ, finetunejob("measured", "team-a"))
        await reach(kube, "team-a", "measured", "Validating")
        async with aiohttp.ClientSession() as http:

            async def scrape() -> str:
                async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as response:
                    assert response.status == 200
                    return await response.text()

            gauge = 'kubetune_jobs{kind="FineTuneJob",phase="Validating"} 1.0'
            text = await eventually(lambda: scrape_if(scrape, gauge), what="phase gauge")
            assert 'kubetune_jobs{kind="CompressJob",phase="Running"} 0.0' in text
            assert "kubetune_reconcile_duration_seconds_count" in text
            assert (
                "kubetune_reconcile_errors_total" in text
                or "# TYPE kubetune_reconcile_errors counter" in text
            )
            async with http.get(f"http://127.0.0.1:{health_port}/healthz") as response:
                assert response.status == 200
    finally:
        await running.stop()


async def test_progress_reports_and_own_writes_trigger_no_reconcile(
    kube: KubeEmulator, kubeconfig: Path
) -> None:
    metrics_port = free_port()
    running = Operator(settings=TEST_SETTINGS.model_copy(update={"metrics_port": metrics_port}))
    await running.start()
    ns = "team-a"
    try:
        async with aiohttp.ClientSession() as http:

            async def reconciles() -> float:
                async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as response:
                    text = await response.text()
                counts = re.findall(
                    r'kubetune_reconcile_duration_seconds_count\{kind="FineTuneJob",trigger="event"\} (\S+)',
                    text,
                )
                return float(counts[0]) if counts else 0.0

            await create(kube, FTJ, finetunejob("chatty", ns))
            await validated(kube, ns, "chatty")
            await reach(kube, ns, "chatty", "Running")
            before = await reconciles()
            for step in range(1, 6):
                progress = {"status": {"progress": {"step": step, "totalSteps": 10, "loss": 2.0 / step}}}
                await patch(kube, FTJ, ns, "chatty", progress, "status")
            # A spec edit afterwards is the sync point: once it is handled, so are the reports.
            await patch(kube, FTJ, ns, "chatty", {"spec": {"serve": {"enabled": True}}})
            await eventually(
                lambda: status(kube, ns, "chatty").get("observedGeneration") == 2, what="edit handled"
            )
            assert await reconciles() == before + 1, "only the spec edit is reconciled"
    finally:
        await running.stop()


async def scrape_if(scrape: Callable[[], Awaitable[str]], needle: str) -> str | None:
    text = await scrape()
    return text if needle in text else None


# --- RBAC: the ClusterRole allows exactly what the operator does -----------------------------------

VERBS_BY_METHOD = {"POST": "create", "PATCH": "patch", "DELETE": "delete", "PUT": "update"}


def rbac_triples(requests: list[Any]) -> set[tuple[str, str, str]]:
    used = set()
    for request in requests:
        if request.resource is None or not request.resource.plural:
            continue  # discovery (/api, /apis, /version): allowed to every authenticated user
        group = request.resource.group or ""
        resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
        if request.method == "GET":
            verb = (
                "watch" if request.params.get("watch") in ("true", "1") else "get" if request.name else "list"
            )
        else:
            verb = VERBS_BY_METHOD[
                str(request.method.value if hasattr(request.method, "value") else request.method).upper()
            ]
        used.add((verb, group, resource))
    return used


def clusterrole_triples() -> set[tuple[str, str, str]]:
    role = yaml.safe_load(CLUSTERROLE.read_text())
    granted = set()
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    granted.add((verb, group, resource))
    return granted


def delegated_triples() -> set[tuple[str, str, str]]:
    """Permissions the operator needs without using them itself: RBAC only lets it create the
    runner Roles if it holds what they grant, and only lets it set blockOwnerDeletion on a
    child if it may update the owner's finalizers."""
    out = set()
    for plural in ("finetunejobs", "compressjobs"):
        out |= {("get", "kubetune.io", f"{plural}/status"), ("patch", "kubetune.io", f"{plural}/status")}
        out.add(("update", "kubetune.io", f"{plural}/finalizers"))
    out.add(("update", "kubetune.io", "finetunesweeps/finalizers"))  # a sweep's trials
    return out


async def test_clusterrole_allows_exactly_what_the_operator_uses(
    kube: KubeEmulator, kubeconfig: Path
) -> None:
    running = Operator()
    await running.start()
    try:
        # The sweeps' first: rejected_child, the last of the jobs', slows the emulator down.
        for index, scenario in enumerate(SWEEP_SCENARIOS.values()):
            await scenario(kube, f"rbac-sweep-{index}")
        for index, scenario in enumerate(SCENARIOS.values()):
            await scenario(kube, f"rbac-{index}")
        await scenario_restart_no_duplicates(kube, "rbac-restart", running)
    finally:
        await running.stop()
    await create(
        kube, "v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "rbac-ns"}}
    )
    namespaced = Operator(settings=TEST_SETTINGS.model_copy(update={"namespaces": ("rbac-ns",)}))
    await namespaced.start()
    try:
        await create(kube, FTJ, finetunejob("scoped", "rbac-ns"))
        await job_exists(kube, "rbac-ns", "scoped-validate")
    finally:
        await namespaced.stop()

    used = rbac_triples(operator_requests(kube))
    granted = clusterrole_triples()
    assert not used - granted, f"requests the ClusterRole does not allow: {sorted(used - granted)}"
    unused = granted - used - delegated_triples()
    assert not unused, f"ClusterRole rules never used: {sorted(unused)}"
    assert {t for t in granted if t[2] == "secrets"} == {("get", "", "secrets")}
    assert_secrets_read_as_metadata_only(kube)
    rendered_roles = [
        kube.get("rbac.authorization.k8s.io/v1/roles", "rbac-0", "owned-runner"),
    ]
    for role in rendered_roles:
        assert role is not None
        for rule in role["rules"]:
            for verb in rule["verbs"]:
                for resource in rule["resources"]:
                    assert (verb, rule["apiGroups"][0], resource) in granted, (
                        "the operator could not grant it"
                    )
