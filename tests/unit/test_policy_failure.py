"""Failure policy: the exit-code contract (2 invalid input, 3 storage: never retried), restarts of
the gang up to spec.maxRestarts, and which failure explains a gang's end."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.operator.lifecycle import JobState, Termination
from kubetune.operator.policies import failure
from kubetune.operator.render import render_plan
from kubetune.operator.settings import Settings
from tests.policies import ago, child, condition, created, deleted, events, finetunejob, observe, wire

pytestmark = pytest.mark.unit

POLICY_FAILED = child("ft-train-r0", failed=True, failed_reason="PodFailurePolicy")
BACKOFF = child("ft-train-r0", failed=True, failed_reason="BackoffLimitExceeded", failed_message="backoff")


def term(code: int, message: str = "") -> Termination:
    return Termination("ft-train-r0-0", "trainer", code, "Error", message)


@pytest.mark.parametrize(
    ("termination", "state", "reason"),
    [
        pytest.param(term(2, "bad record"), POLICY_FAILED, "InvalidInput", id="exit-2"),
        pytest.param(term(3, "403"), POLICY_FAILED, "StorageError", id="exit-3"),
        pytest.param(
            term(2, "OutputConflict: s3://runs/ft is job x's"), POLICY_FAILED, "OutputConflict", id="conflict"
        ),
        pytest.param(
            term(2, "WillNotFit: each pod needs 2 processes x 3.1 GiB"),
            POLICY_FAILED,
            "WillNotFit",
            id="will-not-fit",
        ),
        pytest.param(term(137), BACKOFF, None, id="oom-is-retriable"),
        pytest.param(term(1), BACKOFF, None, id="crash-is-retriable"),
        pytest.param(
            None,
            child(
                "j",
                failed=True,
                failed_reason="PodFailurePolicy",
                failed_message="failed with exit code 3 matching",
            ),
            "StorageError",
            id="pods-gone-code-from-the-job",
        ),
        pytest.param(None, POLICY_FAILED, "InvalidInput", id="pods-gone-no-code"),
        pytest.param(None, BACKOFF, None, id="pods-gone-backoff"),
    ],
)
def test_exit_codes_of_the_contract_are_never_retried(
    termination: Termination | None, state: JobState, reason: str | None
) -> None:
    assert failure.failure_reason(termination, state) == reason


def pod(name: str, code: int, at: str, message: str = "", init: bool = False) -> dict[str, Any]:
    statuses = [
        {"name": "trainer", "state": {"terminated": {"exitCode": code, "finishedAt": at, "message": message}}}
    ]
    return {
        "metadata": {"name": name},
        "status": {"initContainerStatuses" if init else "containerStatuses": statuses},
    }


@pytest.mark.parametrize(
    ("pods", "explains"),
    [
        pytest.param([], None, id="none"),
        pytest.param([pod("a", 0, "t1")], None, id="all-succeeded"),
        pytest.param([pod("b", 1, "t5"), pod("a", 137, "t1")], "a", id="earliest"),
        pytest.param([pod("b", 1, "t1"), pod("d", 2, "t9", "bad data")], "d", id="contract-code-first"),
        pytest.param([pod("i", 3, "t2", init=True)], "i", id="init-container"),
    ],
)
def test_the_failure_that_explains_a_gang(pods: list[dict[str, Any]], explains: str | None) -> None:
    picked = failure.pick_termination(pods)
    assert (picked.pod if picked else None) == explains


RUNNING = {"phase": "Running", "startTime": ago(100), "restarts": 0}


@pytest.mark.parametrize(
    ("spec", "status", "termination", "reason", "replacement"),
    [
        pytest.param({}, RUNNING, term(2, "bad record"), "InvalidInput", None, id="invalid-input"),
        pytest.param({}, RUNNING, term(137), None, "ft-train-r1", id="restart"),
        pytest.param({"maxRestarts": 0}, RUNNING, term(137), "RestartsExhausted", None, id="no-restarts"),
        pytest.param(
            {"maxRestarts": 2},
            {**RUNNING, "restarts": 2},
            term(1),
            "RestartsExhausted",
            None,
            id="restarts-spent",
        ),
    ],
)
def test_a_failed_gang_fails_the_job_or_is_replaced(
    spec: dict[str, Any],
    status: dict[str, Any],
    termination: Termination,
    reason: str | None,
    replacement: str | None,
) -> None:
    job = finetunejob(**spec)
    obs = observe(job, status, jobs=[BACKOFF], terminations={"ft-train-r0": termination})
    decision = failure.gang_failed(
        obs, obs.status, BACKOFF, render_plan(job, Settings(), "ml", "s3://models/base")
    )
    if reason is None:
        assert created(decision) == [f"Job/{replacement}"], "the replacement comes first"
        assert deleted(decision) == ["Job/ft-train-r0"]
        assert wire(decision)["restarts"] == 1
        assert wire(decision)["activeJob"] == replacement
        assert wire(decision)["phase"] == "Running"
        assert events(decision) == [("Warning", "Restarting")]
        assert not decision.settled
    else:
        failed = condition(decision, "Failed")
        assert failed is not None
        assert failed["reason"] == reason
        assert decision.create == []
        assert decision.settled


@pytest.mark.parametrize(
    ("status", "jobs", "diagnose"),
    [
        pytest.param({}, [child("ft-validate", "validate", failed=True)], ["ft-validate"], id="validation"),
        pytest.param(
            {
                "conditions": [
                    {
                        "type": "Validated",
                        "status": "True",
                        "reason": "Validated",
                        "lastTransitionTime": ago(1),
                    }
                ]
            },
            [child("ft-validate", "validate", failed=True), child("ft-train-r0", failed=True)],
            ["ft-train-r0"],
            id="validated-then-the-gang",
        ),
        pytest.param(
            {"restarts": 1},
            [child("ft-train-r0", failed=True), child("ft-train-r1", attempt=1, failed=True)],
            ["ft-train-r1"],
            id="the-current-attempt-only",
        ),
        pytest.param({"phase": "Failed"}, [child("ft-train-r0", failed=True)], [], id="finished"),
    ],
)
def test_only_the_failed_jobs_that_decide_have_their_pods_read(
    status: dict[str, Any], jobs: list[JobState], diagnose: list[str]
) -> None:
    obs = observe(finetunejob(), status)
    assert failure.jobs_to_diagnose(obs.job, obs.status, jobs) == diagnose


def test_the_current_attempt_is_the_newest_recorded_or_created() -> None:
    obs = observe(finetunejob(), {"restarts": 1})
    assert failure.current_attempt(obs.job, obs.status, []) == 1
    assert failure.current_attempt(obs.job, obs.status, [child("ft-train-r2", attempt=2)]) == 2
    assert failure.current_attempt(obs.job, obs.status, [child("ft-validate", "validate", attempt=5)]) == 1
