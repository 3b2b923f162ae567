"""Validation policy: the spec renders into a plan; the plan and identity children exist; the
validation Job runs once and passes before the gang, and follows spec edits until the start."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from kubetune.api.status import FineTuneJobStatus
from kubetune.operator.lifecycle import Decision, JobState, job_state
from kubetune.operator.policies import validation
from kubetune.operator.render import render_plan, render_validation_job
from kubetune.operator.settings import Settings
from tests.policies import (
    NOW,
    ago,
    child,
    compressjob,
    condition,
    created,
    deleted,
    events,
    finetunejob,
    observe,
    wire,
)

pytestmark = pytest.mark.unit

JOB = finetunejob()
PLAN = render_plan(JOB, Settings(), "ml", "s3://models/base")
BASE = ["ConfigMap/ft-plan", "ServiceAccount/ft-runner"]
VALIDATED = {"type": "Validated", "status": "True", "reason": "Validated", "lastTransitionTime": ago(5)}


def rendered(**state: Any) -> JobState:
    """The validation Job as rendered from JOB, as the index observes it."""
    return dataclasses.replace(job_state(render_validation_job(JOB, Settings(), PLAN, "ml")), **state)


@pytest.mark.parametrize(
    ("status", "jobs", "creates", "phase", "settled", "validated"),
    [
        pytest.param({}, [], [*BASE, "Job/ft-validate"], "Validating", True, None, id="created"),
        pytest.param({}, [rendered(suspended=False, active=1)], BASE, "Validating", True, None, id="running"),
        pytest.param(
            {"startTime": ago(5)},
            [rendered(suspended=False, failed=True, failed_reason="PodFailurePolicy")],
            BASE,
            "Failed",
            True,
            "False",
            id="failed",
        ),
        pytest.param(
            {"startTime": ago(5)},
            [rendered(suspended=False, complete=True)],
            BASE,
            None,
            False,
            "True",
            id="passed",
        ),
        pytest.param(
            {"startTime": ago(5), "conditions": [VALIDATED]},
            [],
            BASE,
            None,
            False,
            "True",
            id="already-validated",
        ),
    ],
)
def test_the_validation_job_passes_before_the_gang(
    status: dict[str, Any],
    jobs: list[JobState],
    creates: list[str],
    phase: str | None,
    settled: bool,
    validated: str | None,
) -> None:
    obs = observe(JOB, status, jobs=jobs)
    decision = validation.validate(obs, obs.status, PLAN)
    assert created(decision) == creates
    assert wire(decision).get("phase") == phase
    assert decision.settled is settled
    assert (condition(decision, "Validated") or {}).get("status") == validated
    if validated == "True" and "conditions" not in status:
        assert events(decision) == [("Normal", "Validated")]


@pytest.mark.parametrize(
    ("status", "validation_job", "follows"),
    [
        pytest.param({}, None, True, id="nothing-yet"),
        pytest.param({}, child("ft-validate", "validate", suspended=True), True, id="validation-suspended"),
        pytest.param({}, child("ft-validate", "validate"), False, id="validation-running"),
        pytest.param({"startTime": ago(1)}, None, False, id="started"),
    ],
)
def test_the_plan_follows_the_spec_until_the_job_starts(
    status: dict[str, Any], validation_job: JobState | None, follows: bool
) -> None:
    obs = observe(JOB, status, jobs=[validation_job] if validation_job else [])
    assert validation.plan_follows_spec(obs) is follows
    decision = validation.validate(obs, obs.status, PLAN)
    assert [ref.name for ref in decision.update] == (["ft-plan"] if follows else [])


def test_a_suspended_validation_job_rendered_from_an_older_spec_is_replaced() -> None:
    old = rendered(suspended=True, spec_hash="older")
    obs = observe(finetunejob(suspend=True), {}, jobs=[old])
    decision = validation.validate(obs, obs.status, PLAN)
    assert deleted(decision) == ["Job/ft-validate"]
    assert "Job/ft-validate" not in created(decision)
    assert ("Normal", "SpecChanged") in events(decision)


def test_a_spec_that_does_not_render_fails_the_job() -> None:
    obs = observe(compressjob({"fromFineTuneJob": "ft"}))
    outcome = validation.plan_of(obs, obs.status, None)
    assert isinstance(outcome, Decision)
    failed = condition(outcome, "Failed")
    assert failed is not None
    assert failed["reason"] == "InvalidSpec"
    assert "is not resolved to a model URI yet" in failed["message"]
    assert outcome.settled
    assert not isinstance(validation.plan_of(observe(JOB), observe(JOB).status, None), Decision)


def test_a_spec_that_does_not_parse_fails_with_invalid_spec_once() -> None:
    status = validation.invalid_spec(FineTuneJobStatus(), "FineTuneJob ml/ft is invalid: spec.x: bad", NOW, 3)
    wire = status.to_wire()
    assert wire["phase"] == "Failed"
    assert wire["observedGeneration"] == 3
    assert wire["completionTime"] == ago(0)
    assert wire["conditions"][0]["reason"] == "InvalidSpec"
    later = validation.invalid_spec(status, "again", NOW.replace(year=2027), 4)
    assert later.completion_time == ago(0), "the first failure's time stays"
