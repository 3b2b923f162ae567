"""Deadline policy: activeDeadlineSeconds counts the time since startTime that was not spent
suspended; past it the job fails and its running Jobs go; before it, it says when it falls due."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.operator.lifecycle import ANNOTATION_PAUSED
from kubetune.operator.policies import deadline
from tests.policies import NOW, ago, child, condition, deleted, finetunejob, observe, wire

pytestmark = pytest.mark.unit


def suspended_since(seconds: float) -> list[dict[str, Any]]:
    return [
        {"type": "Suspended", "status": "True", "reason": "Suspended", "lastTransitionTime": ago(seconds)}
    ]


@pytest.mark.parametrize(
    ("status", "paused", "active"),
    [
        pytest.param({}, None, None, id="not-started"),
        pytest.param({"startTime": ago(100)}, None, 100.0, id="running"),
        pytest.param({"startTime": ago(100)}, "30", 70.0, id="paused-before"),
        pytest.param({"startTime": ago(100)}, "junk", 100.0, id="unreadable-annotation"),
        pytest.param(
            {"startTime": ago(100), "conditions": suspended_since(40)}, None, 60.0, id="suspended-now"
        ),
        pytest.param(
            {"startTime": ago(100), "conditions": suspended_since(40)}, "30", 30.0, id="paused-and-suspended"
        ),
        pytest.param(
            {"startTime": ago(100), "conditions": suspended_since(200)},
            None,
            100.0,
            id="suspended-before-start",
        ),
    ],
)
def test_active_time_leaves_out_suspensions(
    status: dict[str, Any], paused: str | None, active: float | None
) -> None:
    annotations = {ANNOTATION_PAUSED: paused} if paused is not None else {}
    obs = observe(finetunejob(), status)
    assert deadline.active_seconds(obs.status, annotations, NOW) == active


@pytest.mark.parametrize(
    ("spec", "status", "annotations", "fails", "due_in"),
    [
        pytest.param({}, {"startTime": ago(100)}, {}, False, None, id="no-deadline"),
        pytest.param({"activeDeadlineSeconds": 60}, {}, {}, False, None, id="not-started"),
        pytest.param({"activeDeadlineSeconds": 600}, {"startTime": ago(100)}, {}, False, 500.0, id="before"),
        pytest.param({"activeDeadlineSeconds": 60}, {"startTime": ago(100)}, {}, True, 0.0, id="after"),
        pytest.param(
            {"activeDeadlineSeconds": 60},
            {"startTime": ago(100)},
            {ANNOTATION_PAUSED: "50"},
            False,
            10.0,
            id="paused-time-is-allowed",
        ),
        pytest.param(
            {"activeDeadlineSeconds": 600},
            {"startTime": ago(100), "conditions": suspended_since(10)},
            {},
            False,
            None,
            id="suspended-clock-stands",
        ),
        pytest.param(
            {"activeDeadlineSeconds": 60},
            {"phase": "Succeeded", "startTime": ago(100), "completionTime": ago(1)},
            {},
            False,
            None,
            id="finished-never-due",
        ),
    ],
)
def test_the_deadline_fails_the_job_or_says_when_it_falls_due(
    spec: dict[str, Any],
    status: dict[str, Any],
    annotations: dict[str, str],
    fails: bool,
    due_in: float | None,
) -> None:
    obs = observe(finetunejob(**spec), status, annotations=annotations, jobs=[child("ft-train-r0", active=2)])
    decision = deadline.enforce(obs, obs.status)
    assert decision.settled is fails
    assert deadline.due_in(obs, obs.status, annotations) == due_in
    if fails:
        failed = condition(decision, "Failed")
        assert failed is not None
        assert failed["reason"] == "DeadlineExceeded"
        assert f"longer than activeDeadlineSeconds {spec['activeDeadlineSeconds']}" in failed["message"]
        assert wire(decision)["completionTime"] == ago(0)
    else:
        assert decision.status == obs.status


def test_past_the_deadline_only_the_jobs_still_running_are_deleted() -> None:
    jobs = [
        child("ft-validate", "validate", complete=True),
        child("ft-train-r0", failed=True),
        child("ft-train-r1", attempt=1, active=2),
    ]
    obs = observe(finetunejob(activeDeadlineSeconds=1), {"startTime": ago(10)}, jobs=jobs)
    assert deleted(deadline.enforce(obs, obs.status)) == ["Job/ft-train-r1"]
