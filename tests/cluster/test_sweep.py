# ruff: noqa: F811  (pytest fixtures are imported by name and then named as parameters)
"""A FineTuneSweep on a real control plane: the operator under its own ServiceAccount creates the
trials, the real Job controller and the process kubelet run their trainers on the tiny model, and
an operator restart between trials neither repeats a trial nor loses the numbering."""

from __future__ import annotations

from typing import Any

import pytest

from tests.cluster import scenario
from tests.cluster.conftest import OPERATOR_USER
from tests.cluster.test_e2e import World, credentials, world  # noqa: F401  (fixtures)
from tests.e2e.scenario import finetunejob

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(900)]

FTS, FTJ = "finetunesweeps", "finetunejobs"


def sweep(inputs: World, name: str) -> dict[str, Any]:
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
            "parameters": [
                {"path": "hyperparameters.learningRate", "type": "categorical", "values": [0.02, 0.0001]}
            ],
            "algorithm": {"type": "grid", "seed": 3},
            "maxTrials": 2,
            "parallelism": 1,
        },
    }


def test_a_sweep_runs_its_trials_finds_the_best_and_survives_an_operator_restart(world: World) -> None:
    plane, namespace = world.plane, world.namespace
    scenario.create(plane, namespace, sweep(world, "lr"))
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
