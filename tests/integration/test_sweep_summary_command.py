"""The summary Job of a FineTuneSweep that ended on a cluster, run for real: what the operator
renders into ``<sweep>-summary`` (its KUBETUNE_SWEEP_SUMMARY) handed to
``python -m kubetune.trainer sweep-summary`` in a subprocess, against a real MLflow tracking
server on loopback. The sweep's parent run, left RUNNING by its trials, ends FINISHED with the
best trial; a server that is down fails the command (retriable) and says why in the termination
log (those two in this process, by the command's main)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from kubetune.api import FineTuneSweep, Phase
from kubetune.api.sweep import FineTuneSweepStatus, TrialState, TrialStatus
from kubetune.operator.sweep import SweepObservation, decide, remembered_trials
from kubetune.run.plan import SweepRef
from kubetune.run.sweep_summary import ENV_SWEEP_SUMMARY
from kubetune.run.workloads import ENV_DS_ACCELERATOR, ENV_TERMINATION_LOG
from kubetune.sweep.space import search_of
from kubetune.trainer.sweep_summary import main as sweep_summary_main
from kubetune.trainer.tracking.sweep import parent_run
from tests.kube import finetunejob
from tests.mlflow_server import MlflowServer, free_port

pytestmark = pytest.mark.integration

LR = "hyperparameters.learningRate"
NS = "team-a"


def ended_sweep(name: str, mlflow_uri: str) -> FineTuneSweep:
    return FineTuneSweep.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneSweep",
            "metadata": {"name": name, "namespace": NS, "uid": str(uuid.uuid4())},
            "spec": {
                "template": finetunejob(name)["spec"],
                "parameters": [{"path": LR, "type": "categorical", "values": [1e-4, 3e-4]}],
                "algorithm": {"type": "grid"},
                "maxTrials": 2,
                "tracking": {"mlflow": {"uri": mlflow_uri}},
            },
        }
    )


def trial(name: str, number: int, rate: float, loss: float) -> TrialStatus:
    return TrialStatus(
        number=number,
        name=f"{name}-t{number}",
        parameters={LR: rate},
        state=TrialState.complete,
        objective=loss,
        step=20,
        model_uri=f"s3://runs/{name}/trials/{number}/model",
    )


def summary_env(sweep: FineTuneSweep) -> str:
    """The KUBETUNE_SWEEP_SUMMARY of the Job the operator creates when ``sweep`` has ended with
    trial 1 the best, as its handler would decide it from the sweep's status."""
    name = str(sweep.metadata.name)
    rows = [trial(name, 0, 1e-4, 1.3), trial(name, 1, 3e-4, 0.7)]
    status = FineTuneSweepStatus(
        phase=Phase.succeeded, completion_time="2025-01-01T00:00:00Z", trials=rows, best_trial=rows[1]
    )
    now = datetime.now(UTC)
    decision = decide(SweepObservation(sweep, NS, now, status, remembered_trials([], status)))
    assert decision.create_summary is not None
    container = decision.create_summary["spec"]["template"]["spec"]["containers"][0]
    return str(next(e["value"] for e in container["env"] if e["name"] == ENV_SWEEP_SUMMARY))


def sweep_summary(summary: str, termination_log: Path) -> subprocess.CompletedProcess[str]:
    env: dict[str, Any] = {
        **os.environ,
        ENV_SWEEP_SUMMARY: summary,
        ENV_TERMINATION_LOG: str(termination_log),
        ENV_DS_ACCELERATOR: "cpu",  # as in its pod
    }
    return subprocess.run(
        [sys.executable, "-m", "kubetune.trainer", "sweep-summary"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_summary_command_ends_the_sweeps_parent_run_with_its_best_trial(
    tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    name = f"sum-{uuid.uuid4().hex[:8]}"
    sweep = ended_sweep(name, mlflow_server.uri)
    client = MlflowClient(mlflow_server.uri)
    # The parent run as the trials' rank 0 left it: in <namespace>/<sweep>, still RUNNING.
    experiment_id = client.create_experiment(f"{NS}/{name}")
    ref = SweepRef(name=name, uid=str(sweep.metadata.uid), search=search_of(sweep.spec))
    parent_id, _ = parent_run(client, experiment_id, ref, NS)
    assert client.get_run(parent_id).info.status == "RUNNING"

    done = sweep_summary(summary_env(sweep), tmp_path / "termination-log")
    assert done.returncode == 0, done.stderr

    runs = client.search_runs([experiment_id])
    assert [r.info.run_id for r in runs] == [parent_id], "the trials' parent, no second one"
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert float(parent.data.params[f"best.{LR}"]) == 3e-4
    assert parent.data.metrics["eval_loss"] == 0.7
    assert parent.data.metrics["trials.complete"] == 2
    assert parent.data.tags["kubetune.io/bestTrial"] == f"{name}-t1"
    assert parent.data.tags["kubetune.io/bestTrial.outputUri"] == f"s3://runs/{name}/trials/1"
    assert parent.data.params["maxTrials"] == "2", "the search space its creator logged stays"


# The failures run the command's own main in this process: a subprocess would add only its start.
def test_a_tracking_server_that_is_down_fails_the_command_retriably_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    log = tmp_path / "termination-log"
    monkeypatch.setenv(ENV_SWEEP_SUMMARY, summary_env(ended_sweep("down", down)))
    monkeypatch.setenv(ENV_TERMINATION_LOG, str(log))
    assert sweep_summary_main([]) == 1
    assert log.read_text().startswith(f"MLflow at {down}: opening the experiment failed")


def test_without_its_summary_the_command_exits_as_invalid_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "termination-log"
    monkeypatch.setenv(ENV_SWEEP_SUMMARY, '{"sweep": {}}')
    monkeypatch.setenv(ENV_TERMINATION_LOG, str(log))
    assert sweep_summary_main([]) == 2
    assert "KUBETUNE_SWEEP_SUMMARY is not a sweep summary" in log.read_text()
    monkeypatch.delenv(ENV_SWEEP_SUMMARY)
    assert sweep_summary_main([]) == 2
    assert "KUBETUNE_SWEEP_SUMMARY is not set" in log.read_text()
