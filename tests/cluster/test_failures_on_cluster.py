# ruff: noqa: F811  (pytest fixtures are imported by name and then named as parameters)
"""Failures produced for real on a real control plane, each said in the job's condition and an
Event with its reason and what to do: a Secret key that does not exist (the kubelet cannot create
the container), a GPU request no node has (the real scheduler's message, while the job waits), a
memory limit the process kubelet enforces (OOMKilled), and a worker that never starts (the
attempt reports no progress: Stalled, naming the missing rank).

Tiny workloads: the model and data of the end-to-end scenarios; nothing trains.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.cluster import scenario
from tests.cluster.conftest import wait_for
from tests.cluster.test_e2e import FTJ, World, credentials, world  # noqa: F401  (fixtures)
from tests.e2e.scenario import finetunejob

SKIP_MEMORY_CHECK = "kubetune.io/skip-memory-check"
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(420)]


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def warned(world: World, job: str, reason: str) -> list[dict[str, Any]]:
    return [
        e
        for e in scenario.events(world.plane, world.namespace, job)
        if e.get("reason") == reason and e.get("type") == "Warning"
    ]


def test_a_missing_secret_key_fails_validation_naming_the_key(world: World) -> None:
    storage = scenario_storage(world, secretAccessKeyKey="no-such-key")
    job = finetunejob("nokey", world.bucket, world.model_uri, world.data_uri, storage=storage)
    scenario.create(world.plane, world.namespace, job)

    failed = scenario.reach(world.plane, FTJ, world.namespace, "nokey", "Failed", timeout=120)

    cond = condition(failed, "Failed")
    assert cond["reason"] == "ContainerConfigError"
    assert "container validate of pod nokey-validate-" in cond["message"]
    assert "'no-such-key'" in cond["message"]
    assert "s3-credentials" in cond["message"]
    assert condition(failed, "Validated")["reason"] == "ContainerConfigError"
    assert warned(world, "nokey", "ContainerConfigError")
    wait_for(lambda: scenario.get(world.plane, "jobs", world.namespace, "nokey-validate") is None)


def test_a_gpu_no_node_has_keeps_the_job_waiting_with_the_schedulers_message(world: World) -> None:
    resources = {"workers": 1, "processesPerWorker": 1, "gpusPerWorker": 1}
    job = finetunejob("nogpu", world.bucket, world.model_uri, world.data_uri, resources=resources)
    scenario.create(world.plane, world.namespace, job)

    def unschedulable() -> dict[str, Any]:
        cond = condition(scenario.status(world.plane, FTJ, world.namespace, "nogpu"), "PodsScheduled")
        return cond if cond.get("status") == "False" else {}

    cond = wait_for(unschedulable, timeout=240, what="PodsScheduled False")
    assert cond["reason"] == "Unschedulable"
    assert "cannot be scheduled: 0/1 nodes are available: 1 Insufficient nvidia.com/gpu" in cond["message"]
    assert scenario.status(world.plane, FTJ, world.namespace, "nogpu")["phase"] == "Running"
    wait_for(lambda: warned(world, "nogpu", "Unschedulable"), what="an Unschedulable Event")


def test_a_worker_over_its_memory_limit_is_oom_killed_and_the_job_says_what_to_change(
    world: World,
) -> None:
    resources = {
        "workers": 1,
        "processesPerWorker": 1,
        "requests": {"memory": "200Mi"},
        "limits": {"memory": "200Mi"},
    }
    job = finetunejob("oom", world.bucket, world.model_uri, world.data_uri, resources=resources)
    # The memory plan would refuse the limit before anything runs (WillNotFit); this test wants
    # the kill itself.
    job["metadata"]["annotations"] = {SKIP_MEMORY_CHECK: "true"}
    scenario.create(world.plane, world.namespace, job)

    failed = scenario.reach(world.plane, FTJ, world.namespace, "oom", "Failed", timeout=300)

    cond = condition(failed, "Failed")
    assert cond["reason"] == "OOMKilled", failed
    assert "container trainer of pod oom-train-r0-0-" in cond["message"]
    assert "(OOMKilled, exit code 137); its memory limit is 200Mi" in cond["message"]
    assert "zeroStage 3" in cond["message"]
    assert "perDeviceBatchSize (now 4)" in cond["message"]
    assert failed["restarts"] == 0, "the same settings would run out again"
    assert warned(world, "oom", "OOMKilled")


def test_a_worker_that_never_starts_stalls_the_attempt_naming_its_rank(world: World) -> None:
    # Two workers of 40 cores on a 64-core node: rank 1 never gets a place, rank 0 waits for it.
    resources = {"workers": 2, "processesPerWorker": 1, "requests": {"cpu": "40"}}
    job = finetunejob(
        "alone",
        world.bucket,
        world.model_uri,
        world.data_uri,
        resources=resources,
        progressDeadlineSeconds=20,
        maxRestarts=0,
    )
    scenario.create(world.plane, world.namespace, job)

    failed = scenario.reach(world.plane, FTJ, world.namespace, "alone", "Failed", timeout=300)

    cond = condition(failed, "Failed")
    assert cond["reason"] == "RestartsExhausted"
    assert "no progress report for 20s (progressDeadlineSeconds" in cond["message"]
    assert "workers that never started (the rendezvous waited for them): rank 1" in cond["message"]
    assert warned(world, "alone", "Unschedulable"), "the waiting worker was reported"
    wait_for(lambda: scenario.get(world.plane, "jobs", world.namespace, "alone-train-r0") is None)


def scenario_storage(world: World, **secret: str) -> dict[str, Any]:
    from tests.e2e.scenario import storage

    spec = storage(world.bucket)
    spec["secretRef"] = {**spec["secretRef"], **secret}
    return spec
