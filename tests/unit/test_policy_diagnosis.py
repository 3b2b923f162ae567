"""Diagnosis: each way a workload's pods cannot run, or its attempt ends, is said in the job's
condition and an Event with a reason and a message a person can act on; evictions are retried
without counting against maxRestarts, and an attempt without progress ends as Stalled."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.operator import lifecycle
from kubetune.operator.lifecycle import Decision, Observation, PodState, Termination
from kubetune.operator.policies import diagnosis, failure
from kubetune.operator.reconcile import decide
from tests.policies import NOW, ago, child, condition, created, deleted, events, finetunejob, observe, wire

pytestmark = pytest.mark.unit

VALIDATED = {
    "type": "Validated",
    "status": "True",
    "reason": "Validated",
    "message": "",
    "lastTransitionTime": ago(200),
}
RUNNING = {"phase": "Running", "startTime": ago(200), "restarts": 0, "conditions": [VALIDATED]}
GANG = child("ft-train-r0", active=2, ready=1, parallelism=2, started_at=ago(100))
FAILED_GANG = child("ft-train-r0", failed=True, failed_reason="BackoffLimitExceeded", parallelism=2)


def pod(name: str, index: int | None = 0, **status: Any) -> dict[str, Any]:
    """A pod of the gang as the API server returns it: its trainer container limited to 8Gi."""
    labels = {} if index is None else {"batch.kubernetes.io/job-completion-index": str(index)}
    container = {
        "name": "trainer",
        "image": "ghcr.io/acme/trainer:1",
        "resources": {"limits": {"memory": "8Gi"}},
    }
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [container]},
        "status": {"phase": "Pending", **status},
    }


def waiting(reason: str, message: str) -> dict[str, Any]:
    return {
        "containerStatuses": [
            {
                "name": "trainer",
                "image": "ghcr.io/acme/trainer:1",
                "state": {"waiting": {"reason": reason, "message": message}},
            }
        ]
    }


RUNNING_CONTAINER = {"containerStatuses": [{"name": "trainer", "state": {"running": {"startedAt": ago(90)}}}]}
UNSCHEDULABLE = {
    "conditions": [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.",
        }
    ]
}
PREEMPTED = {
    "phase": "Failed",
    "conditions": [
        {
            "type": "DisruptionTarget",
            "status": "True",
            "reason": "PreemptionByScheduler",
            "message": "Preempted in order to admit critical pod",
        }
    ],
}


def states(*pods: dict[str, Any]) -> list[PodState]:
    return [lifecycle.pod_state(p) for p in pods]


def gang_obs(
    gang: lifecycle.JobState, *pods: dict[str, Any], status: dict[str, Any] | None = None, **kw: Any
) -> Observation:
    spec = kw.pop("spec", {})
    return observe(finetunejob(**spec), status or RUNNING, jobs=[gang], pods={gang.name: states(*pods)}, **kw)


def failed_reason(decision: Decision) -> tuple[str, str]:
    cond = condition(decision, "Failed")
    assert cond is not None, wire(decision)
    assert cond["status"] == "True"
    assert wire(decision)["phase"] == "Failed"
    return cond["reason"], cond["message"]


def test_an_oom_kill_fails_at_once_naming_the_container_its_limit_and_what_to_change() -> None:
    oom = Termination("ft-train-r0-1-abc", "trainer", 137, "OOMKilled", "")
    obs = gang_obs(
        FAILED_GANG, pod("ft-train-r0-1-abc", 1, phase="Failed"), terminations={"ft-train-r0": oom}
    )
    decision = decide(obs)
    reason, message = failed_reason(decision)
    assert reason == "OOMKilled"
    assert "container trainer of pod ft-train-r0-1-abc ran out of memory" in message
    assert "its memory limit is 8Gi" in message
    for change in (
        "spec.resources.limits.memory",
        "zeroStage 3",
        "offloadOptimizer",
        "perDeviceBatchSize",
        "maxSeqLength",
    ):
        assert change in message
    assert ("Warning", "OOMKilled") in events(decision)
    assert not [c for c in created(decision) if c.startswith("Job/")], "the same settings would run out again"


def test_an_oom_kill_without_a_limit_says_the_node_ran_out() -> None:
    oom = Termination("p", "trainer", 137, "OOMKilled", "")
    message = diagnosis.oom_message(finetunejob(), oom, [])
    assert "no memory limit: the node ran out" in message


def test_an_unschedulable_pod_is_reported_while_the_job_waits_and_the_event_is_sent_once() -> None:
    obs = gang_obs(
        GANG, pod("ft-train-r0-0-a", 0, **RUNNING_CONTAINER), pod("ft-train-r0-1-b", 1, **UNSCHEDULABLE)
    )
    first = decide(obs)
    assert wire(first)["phase"] == "Running", "waiting for a node is not a failure"
    cond = condition(first, "PodsScheduled")
    assert cond is not None
    assert cond["status"] == "False"
    assert cond["reason"] == "Unschedulable"
    assert (
        "pod ft-train-r0-1-b cannot be scheduled: 0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
        in cond["message"]
    )
    assert "Insufficient nvidia.com/gpu" in wire(first)["message"]
    assert ("Warning", "Unschedulable") in events(first)
    assert first.recheck_after is not None
    assert first.recheck_after <= diagnosis.POD_CHECK_SECONDS
    again = decide(observe(obs.job, first.status, jobs=obs.jobs, pods=obs.pods))
    assert ("Warning", "Unschedulable") not in events(again), "the same news is not sent twice"
    scheduled = decide(
        observe(
            obs.job,
            first.status,
            jobs=obs.jobs,
            pods={"ft-train-r0": states(pod("ft-train-r0-1-b", 1, **RUNNING_CONTAINER))},
        )
    )
    cond = condition(scheduled, "PodsScheduled")
    assert cond is not None
    assert cond["status"] == "True"


@pytest.mark.parametrize(
    ("state", "reason", "named"),
    [
        pytest.param(
            waiting("ImagePullBackOff", 'Back-off pulling image "ghcr.io/acme/trainer:1"'),
            "ImagePullFailed",
            "cannot pull image 'ghcr.io/acme/trainer:1'",
            id="image-pull",
        ),
        pytest.param(
            waiting("CreateContainerConfigError", "couldn't find key AWS_SECRET_ACCESS_KEY in Secret ml/s3"),
            "ContainerConfigError",
            "couldn't find key AWS_SECRET_ACCESS_KEY in Secret ml/s3",
            id="missing-secret-key",
        ),
    ],
)
def test_pods_that_cannot_start_fail_the_job_naming_what_is_missing(
    state: dict[str, Any], reason: str, named: str
) -> None:
    decision = decide(gang_obs(GANG, pod("ft-train-r0-0-a", 0, **state)))
    got, message = failed_reason(decision)
    assert got == reason
    assert named in message
    assert "container trainer of pod ft-train-r0-0-a" in message
    assert deleted(decision) == ["Job/ft-train-r0"], "its pods stop holding their node"
    assert ("Warning", reason) in events(decision)


def test_a_validation_pod_missing_a_secret_key_fails_validation() -> None:
    validate = child("ft-validate", component="validate", active=1, parallelism=1)
    state = waiting("CreateContainerConfigError", "couldn't find key KEY in Secret ml/s3")
    decision = decide(
        observe(
            finetunejob(),
            {"phase": "Validating", "startTime": ago(10)},
            jobs=[validate],
            pods={"ft-validate": states(pod("ft-validate-x", None, **state))},
        )
    )
    reason, message = failed_reason(decision)
    assert reason == "ContainerConfigError"
    assert "couldn't find key KEY in Secret ml/s3" in message
    validated = condition(decision, "Validated")
    assert validated is not None
    assert validated["status"] == "False"
    assert validated["reason"] == reason


@pytest.mark.parametrize("gang", [GANG, FAILED_GANG], ids=["running", "failed"])
def test_an_evicted_or_preempted_gang_is_replaced_without_counting_against_max_restarts(
    gang: lifecycle.JobState,
) -> None:
    obs = gang_obs(gang, pod("ft-train-r0-0-a", 0, **PREEMPTED), spec={"maxRestarts": 0})
    decision = decide(obs)
    assert created(decision)[-1] == "Job/ft-train-r1"
    assert "Job/ft-train-r0" in deleted(decision)
    assert wire(decision)["restarts"] == 1
    assert wire(decision)["disruptions"] == 1
    cond = condition(decision, "Restarted")
    assert cond is not None
    assert cond["reason"] == "Disrupted"
    assert "PreemptionByScheduler" in cond["message"]
    assert "not counted against maxRestarts (0 of 0 used)" in cond["message"]
    assert ("Warning", "Disrupted") in events(decision)


def test_restarts_after_disruptions_leave_max_restarts_untouched() -> None:
    status = {**RUNNING, "restarts": 2, "disruptions": 2}
    gang = child("ft-train-r2", attempt=2, failed=True, failed_reason="BackoffLimitExceeded", parallelism=2)
    crash = Termination("p", "trainer", 1, "Error", "")
    decision = decide(
        observe(finetunejob(maxRestarts=1), status, jobs=[gang], terminations={"ft-train-r2": crash})
    )
    assert created(decision)[-1] == "Job/ft-train-r3"
    cond = condition(decision, "Restarted")
    assert cond is not None
    assert cond["reason"] == "AttemptFailed"
    assert "restart 1 of maxRestarts 1" in cond["message"]


def test_a_failed_gang_names_the_workers_that_never_started() -> None:
    crash = Termination("ft-train-r0-0-a", "trainer", 1, "Error", "rendezvous timed out")
    obs = gang_obs(
        FAILED_GANG,
        pod(
            "ft-train-r0-0-a",
            0,
            phase="Failed",
            containerStatuses=[{"name": "trainer", "state": {"terminated": {"exitCode": 1}}}],
        ),
        pod("ft-train-r0-1-b", 1, **UNSCHEDULABLE),
        terminations={"ft-train-r0": crash},
    )
    cond = condition(decide(obs), "Restarted")
    assert cond is not None
    assert "workers that never started (the rendezvous waited for them): rank 1" in cond["message"]


PROGRESS_SPEC = {"progressDeadlineSeconds": 60}


def test_an_attempt_without_progress_for_the_deadline_ends_as_stalled_and_is_retried() -> None:
    obs = gang_obs(
        GANG,
        pod("ft-train-r0-0-a", 0, **RUNNING_CONTAINER),
        spec=PROGRESS_SPEC,
        progress_at=NOW.replace(year=2025),
    )
    decision = decide(obs)
    assert created(decision)[-1] == "Job/ft-train-r1"
    cond = condition(decision, "Restarted")
    assert cond is not None
    assert cond["reason"] == "Stalled"
    assert (
        "no progress report for 60s (progressDeadlineSeconds; none since the attempt started)"
        in cond["message"]
    )
    assert "restart 1 of maxRestarts 3" in cond["message"]
    assert ("Warning", "Stalled") in events(decision)


def test_recent_progress_keeps_the_attempt_and_says_when_to_look_again() -> None:
    ready = child("ft-train-r0", active=2, ready=2, parallelism=2, started_at=ago(100))
    obs = observe(
        finetunejob(**PROGRESS_SPEC), RUNNING, jobs=[ready], progress_at=lifecycle.parse_time(ago(20))
    )
    decision = decide(obs)
    assert "Job/ft-train-r1" not in created(decision)
    assert condition(decision, "Restarted") is None
    assert decision.recheck_after == pytest.approx(40)


def test_a_suspended_gang_never_stalls() -> None:
    suspended = child("ft-train-r0", suspended=True, parallelism=2, started_at=ago(1000))
    assert diagnosis.stall_due_in(60, suspended, None, NOW) is None


def test_a_stalled_attempt_with_no_restarts_left_fails_and_its_gang_goes() -> None:
    obs = gang_obs(GANG, spec={**PROGRESS_SPEC, "maxRestarts": 0})
    decision = decide(obs)
    reason, message = failed_reason(decision)
    assert reason == "RestartsExhausted"
    assert "no progress report for 60s" in message
    assert "Job/ft-train-r0" in deleted(decision)


@pytest.mark.parametrize(
    ("gang", "read"),
    [
        pytest.param(child("ft-train-r0", active=2, ready=1, parallelism=2), True, id="a-pod-not-ready"),
        pytest.param(child("ft-train-r0", active=2, ready=2, parallelism=2), False, id="all-ready"),
        pytest.param(child("ft-train-r0", parallelism=2), False, id="no-pods-yet"),
        pytest.param(child("ft-train-r0", active=2, parallelism=2, suspended=True), False, id="suspended"),
        pytest.param(child("ft-train-r0", failed=True, parallelism=2), True, id="failed"),
    ],
)
def test_the_pods_of_a_gang_are_read_while_some_exist_and_are_not_ready(
    gang: lifecycle.JobState, read: bool
) -> None:
    obs = observe(finetunejob(), RUNNING, jobs=[gang])
    assert failure.jobs_to_diagnose(obs.job, obs.status, [gang]) == (["ft-train-r0"] if read else [])
