"""TTL policy: ttlSecondsAfterFinished after completionTime, the children only the run needed go,
once; serving and the artifacts stay. Before that, it says when."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.operator.lifecycle import ANNOTATION_CLEANED
from kubetune.operator.policies import ttl
from tests.policies import ago, child, deleted, events, finetunejob, observe

pytestmark = pytest.mark.unit

WORKLOAD = [
    "Job/ft-train-r0",
    "Job/ft-validate",
    "ConfigMap/ft-plan",
    "Service/ft-workers",
    "RoleBinding/ft-runner",
    "Role/ft-runner",
    "ServiceAccount/ft-runner",
]


@pytest.mark.parametrize(
    ("spec", "finished_ago", "annotations", "delete", "due_in"),
    [
        pytest.param({}, 10, {}, [], None, id="no-ttl"),
        pytest.param({"ttlSecondsAfterFinished": 60}, None, {}, [], None, id="not-finished"),
        pytest.param({"ttlSecondsAfterFinished": 60}, 10, {}, [], 50.0, id="early"),
        pytest.param({"ttlSecondsAfterFinished": 5}, 10, {}, WORKLOAD, 0.0, id="due"),
        pytest.param({"ttlSecondsAfterFinished": 0}, 0, {}, WORKLOAD, 0.0, id="at-once"),
        pytest.param(
            {"ttlSecondsAfterFinished": 5}, 10, {ANNOTATION_CLEANED: "true"}, [], None, id="already-cleaned"
        ),
        pytest.param(
            {"ttlSecondsAfterFinished": 5, "storage": {"serviceAccountName": "team-s3"}},
            10,
            {},
            WORKLOAD[:-1],
            0.0,
            id="the-users-serviceaccount-stays",
        ),
    ],
)
def test_the_workload_children_go_once_the_ttl_has_passed(
    spec: dict[str, Any],
    finished_ago: float | None,
    annotations: dict[str, str],
    delete: list[str],
    due_in: float | None,
) -> None:
    status: dict[str, Any] = {"phase": "Failed", "restarts": 0}
    if finished_ago is not None:
        status["completionTime"] = ago(finished_ago)
    obs = observe(
        finetunejob(**spec), status, annotations=annotations, jobs=[child("ft-train-r0", failed=True)]
    )
    decision = ttl.clean_up(obs, obs.status)
    assert deleted(decision) == delete
    assert ttl.due_in(obs, obs.status, annotations) == due_in
    if delete:
        assert decision.annotations == {ANNOTATION_CLEANED: "true"}
        assert events(decision) == [("Normal", "ChildrenDeleted")]
        assert ttl.due_in(obs, obs.status, decision.annotations) is None, "nothing left to wait for"
    else:
        assert decision.annotations == {}
        assert decision.events == []
    assert decision.status == obs.status
    assert not any(ref.kind == "Deployment" for ref in decision.delete), "serving stays"
