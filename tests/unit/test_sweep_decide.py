"""The pure decision of a FineTuneSweep from its child FineTuneJobs."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api import FineTuneSweep, Phase
from kubetune.api.sweep import FineTuneSweepStatus
from kubetune.operator import sweep as decide_sweep
from kubetune.operator.sweep import SweepObservation, trial_from

pytestmark = pytest.mark.unit

EXAMPLE = yaml.safe_load(
    (Path(__file__).resolve().parents[2] / "manifests/examples/sweep-lora.yaml").read_text()
)
NOW = datetime(2025, 1, 1, tzinfo=UTC)


def sweep(**spec: Any) -> FineTuneSweep:
    doc = copy.deepcopy(EXAMPLE)
    doc["spec"].update(spec)
    doc["metadata"]["uid"] = "u-1"
    return FineTuneSweep.model_validate(doc)


def child(manifest: dict[str, Any], phase: str | None, **progress: Any) -> dict[str, Any]:
    """A created trial as the API server would later show it."""
    body = copy.deepcopy(manifest)
    body["status"] = {"phase": phase, "progress": progress} if phase else {}
    if phase == "Failed":
        body["status"]["conditions"] = [
            {"type": "Failed", "status": "True", "reason": progress.pop("reason", "X")}
        ]
    return body


def observe(
    s: FineTuneSweep, bodies: list[dict[str, Any]], evaluations: Any = None
) -> decide_sweep.SweepDecision:
    trials = [t for b in bodies if (t := trial_from(b, s.spec.objective.metric)) is not None]
    return decide_sweep.decide(
        SweepObservation(s, "default", NOW, FineTuneSweepStatus(), trials, evaluations or {})
    )


def test_a_new_sweep_creates_parallelism_trials_named_numbered_and_owned() -> None:
    decision = observe(sweep(), [])
    names = [m["metadata"]["name"] for m in decision.create]
    assert names == ["sweep-support-lora-t0", "sweep-support-lora-t1"]
    first = decision.create[0]
    assert first["metadata"]["labels"]["kubetune.io/trial"] == "0"
    assert first["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert first["spec"]["output"]["uri"] == "s3://runs/sweep-support-lora/trials/0"
    params = json.loads(first["metadata"]["annotations"]["kubetune.io/parameters"])
    assert first["spec"]["hyperparameters"]["learningRate"] == params["hyperparameters.learningRate"]
    assert decision.status.phase == Phase.running


def test_after_a_restart_numbering_continues_and_no_trial_is_created_twice() -> None:
    s = sweep()
    first = observe(s, []).create
    bodies = [child(first[0], "Succeeded", step=600, evalLoss=1.0), child(first[1], "Running", step=100)]
    again = observe(s, bodies)
    assert [m["metadata"]["name"] for m in again.create] == ["sweep-support-lora-t2"]
    # The same observation decided anew (a second operator process) asks for the same trial.
    assert observe(s, bodies).create == again.create


def test_a_trial_worse_than_the_median_is_pruned_once() -> None:
    s = sweep(parallelism=1, earlyStopping={"type": "median", "startupTrials": 2})
    made = [observe(s, []).create[0]]
    bodies = [child(made[0], "Succeeded", step=600, evalLoss=1.0)]
    made.append(observe(s, bodies).create[0])
    bodies.append(child(made[1], "Succeeded", step=600, evalLoss=1.2))
    made.append(observe(s, bodies).create[0])
    history = {0: {100: 2.0}, 1: {100: 2.2}}
    running = child(made[2], "Running", step=100, evalLoss=5.0)
    decision = observe(s, [*bodies, running], history)
    assert decision.prune == ["sweep-support-lora-t2"]
    assert decision.evaluations[2] == {100: 5.0}
    running["metadata"]["annotations"]["kubetune.io/prune"] = "median"
    assert observe(s, [*bodies, running], history).prune == []


def test_the_sweep_succeeds_with_the_best_trial_once_max_trials_finished() -> None:
    s = sweep(maxTrials=3, parallelism=3)
    made = observe(s, []).create
    bodies = [
        child(made[0], "Succeeded", step=600, evalLoss=0.9),
        child(made[1], "Succeeded", step=600, evalLoss=0.4),
        child(made[2], "Failed", step=100, evalLoss=3.0, reason="Pruned"),
    ]
    decision = observe(s, bodies)
    assert decision.create == []
    assert decision.status.phase == Phase.succeeded
    assert decision.status.best_trial is not None
    assert decision.status.best_trial.number == 1
    assert decision.status.trials_done == "3/3"
    assert decision.status.counts is not None
    assert (decision.status.counts.complete, decision.status.counts.pruned) == (2, 1)


def test_more_failures_than_allowed_fail_the_sweep_and_stop_creating() -> None:
    s = sweep(maxFailedTrials=0, parallelism=1)
    made = observe(s, []).create
    decision = observe(s, [child(made[0], "Failed", reason="InvalidInput")])
    assert decision.create == []
    assert decision.status.phase == Phase.failed
    assert decision.status.conditions is not None
    assert decision.status.conditions[0].reason == "TooManyFailedTrials"


def test_a_trial_whose_job_is_gone_is_remembered_from_the_status_and_never_created_again() -> None:
    s = sweep(parallelism=2)
    made = observe(s, []).create
    bodies = [child(made[0], "Succeeded", step=600, evalLoss=1.0), child(made[1], "Running", step=100)]
    status = observe(s, bodies).status
    # Both jobs gone (deleted by hand, or by the garbage collector of a sweep being deleted).
    remembered = decide_sweep.remembered_trials([], status)
    assert [(t.number, t.phase, t.reason) for t in remembered] == [
        (0, Phase.succeeded, None),
        (1, Phase.failed, decide_sweep.REASON_TRIAL_DELETED),
        (2, Phase.failed, decide_sweep.REASON_TRIAL_DELETED),
    ]
    assert remembered[0].objective == 1.0
    # Trial 2 was just created by this process, its watch event not seen yet: pending, not failed.
    pending = decide_sweep.remembered_trials([], status, in_flight={2})[2]
    assert (pending.phase, pending.reason) == (None, None)
