"""A sweep's trials in MLflow, the pure parts: what a trial's plan knows of its sweep, where it is
tracked, and the parent run's params."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api.sweep import FineTuneSweep
from kubetune.local.sweep import search_of, trial_job
from kubetune.operator.handlers import parse_job, snapshot
from kubetune.run.plan import plan_finetune
from kubetune.trainer.tracking.sweep import search_params

pytestmark = pytest.mark.unit

EXAMPLE = yaml.safe_load(
    (Path(__file__).resolve().parents[2] / "manifests/examples/sweep-lora.yaml").read_text()
)
SERVER = "http://mlflow.mlflow:5000"


def sweep(**spec: Any) -> FineTuneSweep:
    doc: dict[str, Any] = copy.deepcopy(EXAMPLE)
    doc["metadata"]["uid"] = "sweep-uid"
    doc["spec"].update(spec)
    return FineTuneSweep.model_validate(doc)


def test_a_trial_plan_names_its_sweep_and_is_tracked_in_the_sweeps_experiment() -> None:
    tuned = sweep(tracking={"mlflow": {"uri": SERVER}})
    plan = plan_finetune(trial_job(tuned, 3, {"hyperparameters.learningRate": 1e-4}), namespace="team")
    assert plan.sweep is not None
    assert (plan.sweep.name, plan.sweep.uid) == (tuned.metadata.name, "sweep-uid")
    assert plan.sweep.search == search_of(tuned.spec)
    assert plan.tracking is not None
    assert plan.tracking.uri == SERVER
    assert plan.tracking.experiment == f"team/{tuned.metadata.name}"
    assert plan.job.name == f"{tuned.metadata.name}-t3"


def test_a_trial_the_operator_reconciles_keeps_its_sweep_in_its_plan() -> None:
    """The operator plans a trial from its snapshot of the watched object: the owner reference
    naming the sweep must survive it, or a trial on a cluster logs to an experiment of its own."""
    tuned = sweep(tracking={"mlflow": {"uri": SERVER}})
    watched = trial_job(tuned, 1, {"hyperparameters.learningRate": 1e-4}).to_wire()
    plan = plan_finetune(parse_job(snapshot(watched)), namespace="team")
    assert plan.sweep is not None
    assert plan.sweep.uid == "sweep-uid"
    assert plan.tracking is not None
    assert plan.tracking.experiment == f"team/{tuned.metadata.name}"


def test_the_sweeps_tracking_wins_over_the_templates_and_trials_are_never_served() -> None:
    doc = copy.deepcopy(EXAMPLE["spec"]["template"])
    doc["tracking"] = {"mlflow": {"uri": "http://template:5000", "experiment": "template"}}
    doc["serve"] = {"enabled": True}
    tuned = sweep(template=doc, tracking={"mlflow": {"uri": SERVER}})
    job = trial_job(tuned, 0, {"hyperparameters.learningRate": 1e-4})
    assert job.spec.tracking is not None
    assert job.spec.tracking.mlflow is not None
    assert job.spec.tracking.mlflow.uri == SERVER
    assert not job.spec.serve.enabled
    # Without the sweep's own, trials inherit the template's.
    inherited = trial_job(sweep(template=doc), 0, {"hyperparameters.learningRate": 1e-4})
    assert (
        inherited.spec.tracking
        == FineTuneSweep.model_validate(
            {**EXAMPLE, "spec": {**EXAMPLE["spec"], "template": doc}}
        ).spec.template.tracking
    )


def test_a_job_of_no_sweep_has_none() -> None:
    tuned = sweep()
    job = trial_job(
        tuned.model_copy(update={"metadata": tuned.metadata.model_copy(update={"uid": None})}), 0, {}
    )
    assert plan_finetune(job).sweep is None


def test_the_parent_runs_params_name_each_parameter_by_its_path() -> None:
    params = search_params(
        {
            "parameters": [
                {
                    "path": "hyperparameters.learningRate",
                    "type": "float",
                    "min": 1e-5,
                    "max": 1e-3,
                    "log": True,
                },
                {"path": "method.lora.r", "type": "categorical", "values": [8, 16]},
            ],
            "objective": {"metric": "eval_loss", "direction": "minimize"},
            "maxTrials": 12,
        }
    )
    assert params == {
        "parameters.hyperparameters.learningRate.type": "float",
        "parameters.hyperparameters.learningRate.min": "1e-05",
        "parameters.hyperparameters.learningRate.max": "0.001",
        "parameters.hyperparameters.learningRate.log": "true",
        "parameters.method.lora.r.type": "categorical",
        "parameters.method.lora.r.values": "[8, 16]",
        "objective.metric": "eval_loss",
        "objective.direction": "minimize",
        "maxTrials": "12",
    }
