"""Status on the wire: the operator reads its own fields of status as typed values, and writes
the merge patch of the fields that changed, camelCase, a field no longer set sent as null."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.api.status import CompressJobStatus, FineTuneJobStatus, ServingStatus
from kubetune.operator import lifecycle
from tests.policies import NOW, ago

pytestmark = pytest.mark.unit

RUNNING: dict[str, Any] = {
    "phase": "Running",
    "message": "training: 2/2 workers ready",
    "observedGeneration": 2,
    "startTime": ago(100),
    "restarts": 0,
    "activeJob": "ft-train-r0",
    "conditions": [
        {
            "type": "Running",
            "status": "True",
            "reason": "Running",
            "message": "training started",
            "lastTransitionTime": ago(100),
            "observedGeneration": 2,
        }
    ],
}


def test_the_operator_reads_only_the_fields_it_owns() -> None:
    wire = {**RUNNING, "progress": {"step": 3, "loss": 1.5}, "checkpoints": {"latestStep": 2}}
    status = lifecycle.observed_status("FineTuneJob", wire)
    assert isinstance(status, FineTuneJobStatus)
    assert status.progress is None, "the runtime's, never rewritten by the operator"
    assert lifecycle.operator_wire(status) == RUNNING
    assert isinstance(
        lifecycle.observed_status("CompressJob", {"sourceModelUri": "s3://m"}), CompressJobStatus
    )


@pytest.mark.parametrize(
    ("change", "patch"),
    [
        pytest.param({}, {}, id="nothing"),
        pytest.param({"restarts": 1}, {"restarts": 1}, id="a-field"),
        pytest.param({"active_job": None}, {"activeJob": None}, id="unset-is-null"),
        pytest.param(
            {"serving": ServingStatus(deployment="ft-serve", ready=False, ready_replicas=0)},
            {"serving": {"deployment": "ft-serve", "ready": False, "readyReplicas": 0}},
            id="nested-camel-case-without-unset-fields",
        ),
    ],
)
def test_a_status_patch_is_the_difference_of_two_statuses(
    change: dict[str, Any], patch: dict[str, Any]
) -> None:
    old = lifecycle.observed_status("FineTuneJob", RUNNING)
    new = old.model_copy(update=change)
    assert lifecycle.status_patch(old, new) == patch


def test_a_condition_is_written_whole_with_its_transition_time_kept_while_its_status_holds() -> None:
    old = lifecycle.observed_status("FineTuneJob", RUNNING)
    conditions = lifecycle.set_condition(old.conditions, "Running", True, "Running", "training: 1/2", NOW, 3)
    patch = lifecycle.status_patch(old, old.model_copy(update={"conditions": conditions}))
    assert patch == {
        "conditions": [
            {
                "type": "Running",
                "status": "True",
                "reason": "Running",
                "message": "training: 1/2",
                "lastTransitionTime": ago(100),
                "observedGeneration": 3,
            }
        ]
    }
