"""Pruning policy: a trial its sweep annotated kubetune.io/prune ends Failed with reason Pruned
(kubetune.io/stop: with the reason the sweep names), its running Jobs deleted (its output, the
checkpoints, untouched); a finished job is left as it is."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.operator.lifecycle import ANNOTATION_PRUNE, ANNOTATION_STOP
from kubetune.operator.policies import pruning
from kubetune.operator.reconcile import decide
from tests.policies import ago, child, condition, deleted, finetunejob, observe, wire

pytestmark = pytest.mark.unit

RUNNING: dict[str, Any] = {"phase": "Running", "startTime": ago(100), "progress": {"step": 40}}


@pytest.mark.parametrize(
    ("status", "annotations", "pruned", "deletes"),
    [
        pytest.param(RUNNING, {}, False, [], id="not-asked"),
        pytest.param(RUNNING, {ANNOTATION_PRUNE: ""}, True, ["Job/ft-train-0"], id="asked-while-running"),
        pytest.param(
            {"phase": "Pending"},
            {ANNOTATION_PRUNE: "worse than the median"},
            True,
            [],
            id="asked-before-start",
        ),
        pytest.param(
            {"phase": "Succeeded", "completionTime": ago(1)}, {ANNOTATION_PRUNE: ""}, False, [], id="too-late"
        ),
    ],
)
def test_a_prune_request_ends_the_job(
    status: dict[str, Any], annotations: dict[str, str], pruned: bool, deletes: list[str]
) -> None:
    jobs = [child("ft-train-0")] if status["phase"] == "Running" else []
    obs = observe(finetunejob(), status, annotations=annotations, jobs=jobs)
    decision = pruning.enforce(obs, obs.status)
    assert deleted(decision) == deletes
    assert decision.settled == pruned
    failed = condition(decision, "Failed")
    if pruned:
        assert wire(decision)["phase"] == "Failed"
        assert failed is not None
        assert failed["reason"] == "Pruned"
        assert "checkpoints are kept" in failed["message"]
    else:
        assert failed is None


def test_the_message_gives_the_sweeps_reason() -> None:
    obs = observe(
        finetunejob(), RUNNING, annotations={ANNOTATION_PRUNE: "eval_loss 3.2 worse than median 2.1"}
    )
    message = wire(pruning.enforce(obs, obs.status))["message"]
    assert "eval_loss 3.2 worse than median 2.1" in message


def test_the_reconciler_prunes_and_never_restarts_a_pruned_job() -> None:
    obs = observe(finetunejob(), RUNNING, annotations={ANNOTATION_PRUNE: ""}, jobs=[child("ft-train-0")])
    first = decide(obs)
    assert deleted(first) == ["Job/ft-train-0"]
    assert first.create == []
    again = decide(observe(finetunejob(), wire(first), annotations={ANNOTATION_PRUNE: ""}))
    assert again.create == []
    assert wire(again)["phase"] == "Failed"


@pytest.mark.parametrize(
    ("value", "reason", "says"),
    [
        pytest.param("DeadlineExceeded: ran 70s", "DeadlineExceeded", "ran 70s", id="the-sweeps-reason"),
        pytest.param("no reason given", "StoppedBySweep", "no reason given", id="free-text"),
        pytest.param("", "StoppedBySweep", "the sweep ended", id="empty"),
    ],
)
def test_a_stop_request_ends_the_job_with_the_sweeps_reason(value: str, reason: str, says: str) -> None:
    obs = observe(finetunejob(), RUNNING, annotations={ANNOTATION_STOP: value}, jobs=[child("ft-train-0")])
    decision = pruning.enforce(obs, obs.status)
    assert deleted(decision) == ["Job/ft-train-0"]
    failed = condition(decision, "Failed")
    assert failed is not None
    assert failed["reason"] == reason
    assert says in failed["message"]
    assert "checkpoints are kept" in failed["message"]
