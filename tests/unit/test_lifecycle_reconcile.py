"""The reconciler composes the policies and says when time alone changes the job: a running
deadline or a pending TTL falls due, a ServiceAccount no watch reports may have appeared."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.operator.lifecycle import ANNOTATION_CLEANED, RunnerAccount
from kubetune.operator.reconcile import decide
from tests.policies import ago, child, finetunejob, observe

pytestmark = pytest.mark.unit

VALIDATED = [{"type": "Validated", "status": "True", "reason": "Validated", "lastTransitionTime": ago(100)}]
RUNNING = {"phase": "Running", "startTime": ago(100), "restarts": 0, "conditions": VALIDATED}
DONE = {"phase": "Failed", "completionTime": ago(10), "restarts": 0}
GANG = [child("ft-train-r0", active=2)]


@pytest.mark.parametrize(
    ("spec", "status", "observed", "recheck"),
    [
        pytest.param({}, RUNNING, {"jobs": GANG}, None, id="nothing-timed"),
        pytest.param({"activeDeadlineSeconds": 600}, RUNNING, {"jobs": GANG}, 500.0, id="deadline-running"),
        pytest.param({"activeDeadlineSeconds": 600}, {}, {}, 600.0, id="deadline-starts-now"),
        pytest.param(
            {"activeDeadlineSeconds": 60, "queueName": "q"}, {}, {}, None, id="deadline-not-started"
        ),
        pytest.param(
            {"activeDeadlineSeconds": 600, "suspend": True},
            RUNNING,
            {"jobs": GANG},
            None,
            id="deadline-suspended",
        ),
        pytest.param({"activeDeadlineSeconds": 60}, RUNNING, {"jobs": GANG}, None, id="deadline-passed-now"),
        pytest.param({"ttlSecondsAfterFinished": 60}, DONE, {}, 50.0, id="ttl-pending"),
        pytest.param(
            {"ttlSecondsAfterFinished": 60},
            DONE,
            {"annotations": {ANNOTATION_CLEANED: "true"}},
            None,
            id="ttl-done",
        ),
        pytest.param({"ttlSecondsAfterFinished": 5}, DONE, {}, None, id="ttl-passed-now"),
        pytest.param(
            {"activeDeadlineSeconds": 60, "ttlSecondsAfterFinished": 30},
            RUNNING,
            {"jobs": GANG},
            30.0,
            id="failed-by-the-deadline-then-the-ttl",
        ),
        pytest.param(
            {"storage": {"serviceAccountName": "team-s3"}},
            {},
            {"runner_account": RunnerAccount.missing},
            10.0,
            id="waiting-for-a-serviceaccount",
        ),
    ],
)
def test_the_decision_says_when_to_look_again(
    spec: dict[str, Any], status: dict[str, Any], observed: dict[str, Any], recheck: float | None
) -> None:
    assert decide(observe(finetunejob(**spec), status, **observed)).recheck_after == recheck
