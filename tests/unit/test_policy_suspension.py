"""Suspension policy: spec.suspend suspends and resumes a step's Job; with spec.queueName Kueue
unsuspends it, and a job it has not admitted yet is Pending (Suspended once it ever started).
Resuming adds the suspension's length to the deadline's allowance."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.api import Phase
from kubetune.operator.lifecycle import ANNOTATION_PAUSED, ChildPatch, ChildRef
from kubetune.operator.policies import suspension
from tests.policies import ago, child, condition, finetunejob, observe, wire

pytestmark = pytest.mark.unit

SUSPEND = ChildPatch(ChildRef("batch/v1", "Job", "ft-train-r0"), {"spec": {"suspend": True}})
UNSUSPEND = ChildPatch(ChildRef("batch/v1", "Job", "ft-train-r0"), {"spec": {"suspend": False}})
STARTED = {"startTime": ago(100)}


def suspended_for(seconds: float, reason: str = "Suspended") -> dict[str, Any]:
    condition = {"type": "Suspended", "status": "True", "reason": reason, "lastTransitionTime": ago(seconds)}
    return {**STARTED, "conditions": [condition]}


@pytest.mark.parametrize(
    ("spec", "status", "job_suspended", "patch", "phase", "suspended_reason"),
    [
        pytest.param({}, STARTED, False, [], "Running", None, id="runs"),
        pytest.param({"suspend": True}, STARTED, False, [SUSPEND], "Suspended", "Suspended", id="suspend"),
        pytest.param(
            {"suspend": True}, suspended_for(5), True, [], "Suspended", "Suspended", id="stays-suspended"
        ),
        pytest.param({}, suspended_for(30), True, [UNSUSPEND], "Running", "Resumed", id="resume"),
        pytest.param({"queueName": "gpus"}, {}, True, [], "Pending", "Queued", id="queued-before-start"),
        pytest.param(
            {"queueName": "gpus"}, STARTED, True, [], "Suspended", "Queued", id="queued-after-start"
        ),
        pytest.param(
            {"queueName": "gpus"}, suspended_for(30, "Queued"), False, [], "Running", "Resumed", id="admitted"
        ),
        pytest.param(
            {"queueName": "gpus", "suspend": True},
            STARTED,
            False,
            [SUSPEND],
            "Suspended",
            "Suspended",
            id="both",
        ),
    ],
)
def test_a_step_runs_or_is_suspended(
    spec: dict[str, Any],
    status: dict[str, Any],
    job_suspended: bool,
    patch: list[ChildPatch],
    phase: str,
    suspended_reason: str | None,
) -> None:
    obs = observe(finetunejob(**spec), status)
    job = child("ft-train-r0", suspended=job_suspended)
    decision = suspension.step(obs, obs.status, Phase.running, "training started", job=job)
    assert decision.patch == patch
    assert wire(decision)["phase"] == phase
    suspended = condition(decision, "Suspended")
    assert (suspended or {}).get("reason") == suspended_reason
    running = condition(decision, "Running")
    if phase == "Running":
        assert running is not None
        assert running["status"] == "True"
        assert wire(decision)["message"] == "training started"


@pytest.mark.parametrize(
    ("status", "paused_before", "paused_after"),
    [
        pytest.param(suspended_for(30), None, "30", id="first-pause"),
        pytest.param(suspended_for(30), "50", "80", id="adds-up"),
        pytest.param({"conditions": suspended_for(30)["conditions"]}, None, None, id="never-started"),
    ],
)
def test_resuming_extends_the_deadline_allowance(
    status: dict[str, Any], paused_before: str | None, paused_after: str | None
) -> None:
    annotations = {ANNOTATION_PAUSED: paused_before} if paused_before else {}
    obs = observe(finetunejob(), status, annotations=annotations)
    decision = suspension.resume(obs, obs.status)
    assert decision.annotations == ({ANNOTATION_PAUSED: paused_after} if paused_after else {})
    assert (condition(decision, "Suspended") or {})["status"] == "False"


def test_a_job_created_now_is_suspended_as_rendered_and_starts_the_clock_only_when_it_runs() -> None:
    queued = observe(finetunejob(queueName="gpus"))
    pending = suspension.step(queued, queued.status, Phase.validating, "validating", suspended=True)
    assert "startTime" not in wire(pending)
    assert wire(pending)["phase"] == "Pending"
    plain = observe(finetunejob())
    running = suspension.step(plain, plain.status, Phase.validating, "validating", suspended=False)
    assert wire(running)["startTime"] == ago(0)
    assert wire(running)["phase"] == "Validating"
    assert condition(running, "Suspended") is None, "a job never suspended has no Suspended condition"
    assert condition(running, "Running") is None, "only the gang's step says Running"
