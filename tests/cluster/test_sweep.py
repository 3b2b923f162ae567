# ruff: noqa: F811  (pytest fixtures are imported by name and then named as parameters)
"""A FineTuneSweep on a real control plane: the operator under its own ServiceAccount creates the
trials, the real Job controller and the process kubelet run their trainers on the tiny model, and
an operator restart between trials neither repeats a trial nor loses the numbering. The sweep is
tracked in a real MLflow server: the trials' runs are children of one parent run, which the
operator's <sweep>-summary Job ends with the best trial once the sweep has ended."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.cluster import scenario
from tests.cluster.conftest import OPERATOR_USER
from tests.cluster.test_e2e import World, credentials, world  # noqa: F401  (fixtures)
from tests.e2e.scenario import finetunejob
from tests.mlflow_server import MlflowServer, sweep_runs

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(900)]

FTS, FTJ = "finetunesweeps", "finetunejobs"
LR = "hyperparameters.learningRate"


def sweep(inputs: World, name: str, mlflow_uri: str) -> dict[str, Any]:
    """Two trials of a few steps on one worker, one at a time, differing in learning rate."""
    template = finetunejob(name, inputs.bucket, inputs.model_uri, inputs.data_uri)["spec"]
    template["hyperparameters"] |= {"maxSteps": 4, "evalEverySteps": 2}
    template["resources"] = {"workers": 1, "processesPerWorker": 1}
    template["checkpoint"] = {"everySteps": 2, "keepLast": 1}
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneSweep",
        "metadata": {"name": name},
        "spec": {
            "template": template,
            "parameters": [{"path": LR, "type": "categorical", "values": [0.02, 0.0001]}],
            "tracking": {"mlflow": {"uri": mlflow_uri}},
            "algorithm": {"type": "grid", "seed": 3},
            "maxTrials": 2,
            "parallelism": 1,
        },
    }


def test_a_sweep_runs_its_trials_finds_the_best_and_survives_an_operator_restart(
    world: World, mlflow_server: MlflowServer
) -> None:
    plane, namespace = world.plane, world.namespace
    scenario.create(plane, namespace, sweep(world, "lr", mlflow_server.uri))
    scenario.reach(plane, FTJ, namespace, "lr-t0", "Running", timeout=300)

    world.operator.restart()

    done = scenario.reach(plane, FTS, namespace, "lr", "Succeeded", timeout=600)
    # Each trial created once, by the operator, in number order.
    assert scenario.created_by(plane, OPERATOR_USER, namespace, FTJ) == ["lr-t0", "lr-t1"]
    assert done["trialsDone"] == "2/2"
    assert done["counts"]["complete"] == 2
    objectives = {row["number"]: row["objective"] for row in done["trials"]}
    best = done["bestTrial"]
    assert best["objective"] == min(objectives.values())
    assert best["modelUri"].startswith(f"{world.bucket.uri}/runs/lr/trials/{best['number']}")
    # The trials' evaluations reached the sweep from their own status.progress.
    assert all(row["evaluations"] for row in done["trials"])

    # In MLflow: one parent run with a child per trial, ended by the <sweep>-summary Job.
    summarized = summarized_condition(plane, namespace, "lr", timeout=180)
    assert summarized["status"] == "True", summarized
    assert summarized["reason"] == "Summarized"
    parent, children = sweep_runs(mlflow_server.uri, f"{namespace}/lr")
    assert sorted(r.data.tags["kubetune.io/name"] for r in children) == ["lr-t0", "lr-t1"]
    assert parent.info.status == "FINISHED"
    assert float(parent.data.params[f"best.{LR}"]) == objectives_rate(done, best["number"])
    assert parent.data.metrics["eval_loss"] == pytest.approx(best["objective"])
    assert parent.data.metrics["trials.complete"] == 2
    assert parent.data.tags["kubetune.io/bestTrial"] == f"lr-t{best['number']}"


def summarized_condition(plane: Any, namespace: str, name: str, timeout: float) -> dict[str, Any]:
    """The sweep's TrackingSummarized condition once its summary Job has ended (True or False)."""
    deadline = time.monotonic() + timeout
    while True:
        conditions = scenario.status(plane, FTS, namespace, name).get("conditions") or []
        condition = next((c for c in conditions if c["type"] == "TrackingSummarized"), None)
        if condition is not None and condition["reason"] != "Summarizing":
            return dict(condition)
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}'s summary did not end within {timeout}s: {condition}")
        time.sleep(0.5)


def objectives_rate(status: dict[str, Any], number: int) -> float:
    """The learning rate trial ``number`` ran with."""
    return float(next(row for row in status["trials"] if row["number"] == number)["parameters"][LR])
