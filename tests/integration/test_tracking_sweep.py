"""A FineTuneSweep in MLflow: one parent run for the sweep (its search space, then its best trial)
and one child run per trial, against a real MLflow tracking server on loopback. The sweep runs in
local mode, two tiny trials at once, and its promote serves the winner; trials racing to create
the parent all settle on one. Everything is read back through ``MlflowClient``."""

from __future__ import annotations

import dataclasses
import io
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from mlflow import MlflowClient
from rich.console import Console

from kubetune.api.spec import MlflowTarget
from kubetune.api.sweep import FineTuneSweep
from kubetune.local.quickstart import prepare
from kubetune.local.runner import LocalRunner, RunOptions
from kubetune.local.sweep import SweepRunner
from kubetune.run.plan import SweepRef
from kubetune.trainer.tracking.sweep import finish_sweep, parent_run
from tests.mlflow_server import MlflowServer, free_port, sweep_runs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LR = "hyperparameters.learningRate"
RATES = [1e-5, 3e-2]


def lr_sweep(name: str, model: Path, data: Path, output: Path, mlflow_uri: str) -> FineTuneSweep:
    return FineTuneSweep.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneSweep",
            "metadata": {"name": name},
            "spec": {
                "template": {
                    "model": {"uri": model.as_uri()},
                    "dataset": {"train": {"uri": data.as_uri()}, "evalFraction": 0.1, "format": "text"},
                    "method": {"type": "full"},
                    "hyperparameters": {
                        "maxSteps": 4,
                        "learningRate": 1e-4,
                        "perDeviceBatchSize": 4,
                        "maxSeqLength": 64,
                        "evalEverySteps": 2,
                        "loggingEverySteps": 2,
                        "precision": "fp32",
                    },
                    "resources": {"workers": 1, "processesPerWorker": 1},
                    "output": {"uri": output.as_uri()},
                },
                "parameters": [{"path": LR, "type": "categorical", "values": RATES}],
                "objective": {"metric": "eval_loss", "direction": "minimize"},
                "algorithm": {"type": "grid"},
                "maxTrials": 2,
                "parallelism": 2,
                "promote": {"enabled": True},
                "tracking": {"mlflow": {"uri": mlflow_uri}},
            },
        }
    )


def test_a_sweep_is_a_parent_run_with_one_child_per_trial_and_its_winner_is_served(
    tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    model, data = prepare(tmp_path / "quickstart")
    name = f"lr-{uuid.uuid4().hex[:8]}"
    sweep = lr_sweep(name, model, data, tmp_path / "out", mlflow_server.uri)
    screen = io.StringIO()
    console = Console(file=screen, width=200)
    options = RunOptions(workdir=tmp_path / "work", accelerator="cpu", exit_after_serve_check=True)
    trials = LocalRunner(dataclasses.replace(options, serve=False), console)
    outcome = SweepRunner(trials, console, cores=2, server=LocalRunner(options, console)).run(sweep)
    shown = screen.getvalue()
    assert outcome.exit_code == 0, shown
    best = outcome.best
    assert best is not None

    # The trials share the sweep's experiment, <namespace>/<sweep> by default (local mode: local).
    parent, children = sweep_runs(mlflow_server.uri, f"local/{name}")
    assert parent.info.run_id == outcome.tracking_run_id
    assert sorted(c.info.run_name for c in children) == [f"{name}-t0", f"{name}-t1"]
    assert sorted(float(c.data.params[LR]) for c in children) == RATES

    # The parent: the sweep's identity and search space, then the best trial and its objective.
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == name
    assert parent.data.tags["kubetune.io/kind"] == "FineTuneSweep"
    assert parent.data.params[f"parameters.{LR}.type"] == "categorical"
    assert parent.data.params["objective.metric"] == "eval_loss"
    assert parent.data.params["maxTrials"] == "2"
    assert float(parent.data.params[f"best.{LR}"]) == best.params[LR]
    assert parent.data.tags["kubetune.io/bestTrial"] == best.name
    assert parent.data.metrics["trials.complete"] == 2
    best_child = next(c for c in children if c.info.run_name == best.name)
    assert parent.data.metrics["eval_loss"] == best.latest
    assert best_child.data.metrics["eval_loss"] == pytest.approx(best.latest)

    # promote: the winner is served and answers, and the screen says where.
    assert outcome.server_url is not None
    assert outcome.answer
    assert f"promoting trial {best.number}" in shown
    assert outcome.server_url in shown


def test_trials_racing_to_create_the_sweeps_run_settle_on_one(mlflow_server: MlflowServer) -> None:
    client = MlflowClient(mlflow_server.uri)
    experiment_id = client.create_experiment(f"race-{uuid.uuid4().hex[:8]}")
    sweep = SweepRef(name="race", uid=str(uuid.uuid4()), search={"maxTrials": 4})
    start = threading.Barrier(4)

    def trial(_: int) -> tuple[str, str]:
        own = MlflowClient(mlflow_server.uri)
        start.wait()
        first, mine = parent_run(own, experiment_id, sweep, "default")
        # As each trial does when it ends: look again, deleting its own run if that lost.
        last, _ = parent_run(own, experiment_id, sweep, "default", mine)
        return first, last

    with ThreadPoolExecutor(4) as pool:
        seen = list(pool.map(trial, range(4)))
    survivors = client.search_runs([experiment_id])
    assert len(survivors) == 1
    winner = survivors[0]
    assert {last for _, last in seen} == {winner.info.run_id}
    assert winner.data.params["maxTrials"] == "4"
    assert winner.data.tags["kubetune.io/uid"] == sweep.uid


def test_a_tracking_server_that_is_down_does_not_fail_the_sweep() -> None:
    said: list[str] = []
    target = MlflowTarget(uri=f"http://127.0.0.1:{free_port()}", experiment="down")
    sweep = SweepRef(name="down", uid=str(uuid.uuid4()))
    summary = {"objective": {"metric": "eval_loss"}, "trials": [], "bestTrial": None}
    assert finish_sweep(target, sweep, "local", summary, said.append) is None
    assert len(said) == 1
    assert "opening the experiment failed" in said[0]
