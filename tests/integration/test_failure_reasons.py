# ruff: noqa: F811  (pytest fixtures are imported by name and then named as parameters)
"""The real operator against the Kubernetes emulator: failures the test plays as the kubelet and
scheduler would report them (an image that cannot be pulled, an eviction, an attempt that reports
no progress) end in the job's condition and Events with their reason and an actionable message.

The cluster tier (tests/cluster/test_failures_on_cluster.py) produces the others for real.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.integration.test_operator import FTJ, JOBS, condition, events, job_exists, reach, status, validated
from tests.kube import (  # noqa: F401  (fixtures)
    KubeEmulator,
    Operator,
    create,
    eventually,
    finetunejob,
    kube,
    kubeconfig,
    operator,
    patch,
    start_job,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

NS = "default"


async def gang_pod(kube: KubeEmulator, job_name: str, index: int, pod_status: dict[str, Any]) -> str:
    """Pod ``index`` of the Job, as its controller creates it, with the status a kubelet reports."""
    job = kube.get(JOBS, NS, job_name)
    assert job is not None, f"Job {job_name} does not exist"
    template = job["spec"]["template"]
    name = f"{job_name}-{index}-x{uuid.uuid4().hex[:4]}"
    labels = {
        **template["metadata"].get("labels", {}),
        "batch.kubernetes.io/job-name": job_name,
        "batch.kubernetes.io/job-completion-index": str(index),
    }
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": job_name, "uid": job["metadata"]["uid"]}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": labels, "ownerReferences": [owner]},
        "spec": template["spec"],
    }
    await create(kube, "v1/pods", pod)
    await patch(kube, "v1/pods", NS, name, {"status": pod_status}, "status")
    return name


async def test_an_image_that_cannot_be_pulled_fails_the_job_naming_the_image(
    kube: KubeEmulator, operator: Operator
) -> None:
    await create(
        kube, FTJ, finetunejob("pull", NS, resources={"workers": 2, "image": "registry.invalid/trainer:9"})
    )
    await validated(kube, NS, "pull")
    back_off = {
        "name": "trainer",
        "image": "registry.invalid/trainer:9",
        "state": {
            "waiting": {
                "reason": "ImagePullBackOff",
                "message": 'Back-off pulling image "registry.invalid/trainer:9"',
            }
        },
    }
    pod = await gang_pod(kube, "pull-train-r0", 0, {"phase": "Pending", "containerStatuses": [back_off]})
    # The Job controller counts the pod it created; the kubelet's later news changes nothing of
    # the Job, so the operator keeps looking at the pods while they are not ready.
    await patch(kube, JOBS, NS, "pull-train-r0", {"status": {"active": 1}}, "status")
    await reach(kube, NS, "pull", "Failed")
    failed = condition(kube, NS, "pull", "Failed")
    assert failed["reason"] == "ImagePullFailed"
    assert (
        f"container trainer of pod {pod} cannot pull image 'registry.invalid/trainer:9'" in failed["message"]
    )
    assert "spec.resources.image" in failed["message"]
    await eventually(lambda: events(kube, NS, "ImagePullFailed"), what="an ImagePullFailed Event")
    await eventually(lambda: kube.get(JOBS, NS, "pull-train-r0") is None, what="the gang deleted")


async def test_an_evicted_worker_restarts_the_gang_without_counting_against_max_restarts(
    kube: KubeEmulator, operator: Operator
) -> None:
    await create(kube, FTJ, finetunejob("evicted", NS, maxRestarts=0))
    await validated(kube, NS, "evicted")
    await start_job(kube, NS, "evicted-train-r0")
    evicted = {
        "phase": "Failed",
        "reason": "Evicted",
        "message": "The node was low on resource: memory.",
        "conditions": [
            {
                "type": "DisruptionTarget",
                "status": "True",
                "reason": "TerminationByKubelet",
                "message": "The node was low on resource: memory.",
            }
        ],
    }
    pod = await gang_pod(kube, "evicted-train-r0", 1, evicted)
    # The Job controller counts the pod gone: a Job event brings the operator to look.
    await patch(kube, JOBS, NS, "evicted-train-r0", {"status": {"active": 1, "ready": 1}}, "status")
    await job_exists(kube, NS, "evicted-train-r1")
    st = await eventually(lambda: (s := status(kube, NS, "evicted")).get("disruptions") == 1 and s)
    assert st["restarts"] == 1
    assert st["phase"] == "Running"
    restarted = await eventually(lambda: condition(kube, NS, "evicted", "Restarted"), what="Restarted")
    assert restarted["reason"] == "Disrupted"
    assert (
        f"pod {pod} was evicted or preempted (TerminationByKubelet: The node was low" in restarted["message"]
    )
    assert "not counted against maxRestarts (0 of 0 used)" in restarted["message"]
    await eventually(lambda: events(kube, NS, "Disrupted"), what="a Disrupted Event")


async def test_an_attempt_without_progress_ends_as_stalled_and_is_retried(
    kube: KubeEmulator, operator: Operator
) -> None:
    await create(kube, FTJ, finetunejob("silent", NS, progressDeadlineSeconds=1, maxRestarts=1))
    await validated(kube, NS, "silent")
    await start_job(kube, NS, "silent-train-r0")
    await job_exists(kube, NS, "silent-train-r1")
    restarted = await eventually(lambda: condition(kube, NS, "silent", "Restarted"), what="Restarted")
    assert restarted["reason"] == "Stalled"
    assert (
        "no progress report for 1s (progressDeadlineSeconds; none since the attempt started)"
        in (restarted["message"])
    )
    assert "restart 1 of maxRestarts 1" in restarted["message"]
    await eventually(lambda: events(kube, NS, "Stalled"), what="a Stalled Event")
    # The second attempt is as silent: the one restart allowed is spent.
    await start_job(kube, NS, "silent-train-r1")
    await reach(kube, NS, "silent", "Failed")
    failed = condition(kube, NS, "silent", "Failed")
    assert failed["reason"] == "RestartsExhausted"
    assert "no progress report for 1s" in failed["message"]
