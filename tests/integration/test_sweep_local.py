"""`kubetune run` of a FineTuneSweep: tiny trials of the tiny causal LM, one process each and two at
once, where the learning rate decides the evaluation loss; the study, pruning and the report as a
user sees them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api import FineTuneJob
from kubetune.local import cli
from kubetune.local.quickstart import prepare
from kubetune.local.runner import LocalRunner, RunOptions
from kubetune.sweep.evaluations import objective_of

TEMPLATE_LEARNING_RATE = 1e-5


def template(root: Path, model: Path, data: Path) -> dict[str, Any]:
    return {
        "model": {"uri": model.as_uri()},
        "dataset": {"train": {"uri": data.as_uri()}, "evalFraction": 0.1, "format": "text"},
        "method": {"type": "full"},
        "hyperparameters": {
            "maxSteps": 12,
            "learningRate": TEMPLATE_LEARNING_RATE,
            "perDeviceBatchSize": 4,
            "maxSeqLength": 64,
            "evalEverySteps": 3,
            "loggingEverySteps": 2,
            "precision": "fp32",
        },
        "resources": {"workers": 1, "processesPerWorker": 1},
        "output": {"uri": (root / "out").as_uri()},
    }


def eval_loss_of(job: FineTuneJob, workdir: Path) -> float:
    """The template run as a plain FineTuneJob: its final evaluation loss."""
    seen: list[float] = []

    def collect(update: dict[str, Any]) -> None:
        value = objective_of("eval_loss", update)
        if value is not None:
            seen.append(value)

    outcome = LocalRunner(RunOptions(workdir=workdir, serve=False, accelerator="cpu")).run(job, collect)
    assert outcome.exit_code == 0
    return seen[-1]


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One sweep of 6 trials with the median pruner, and the template's own run as a baseline."""
    root = tmp_path_factory.mktemp("sweep")
    model, data = prepare(root / "quickstart")
    baseline_spec = template(root, model, data) | {"output": {"uri": (root / "baseline").as_uri()}}
    baseline = eval_loss_of(
        FineTuneJob.model_validate(
            {
                "apiVersion": "kubetune.io/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": "base"},
                "spec": baseline_spec,
            }
        ),
        root / "work",
    )
    manifest = root / "sweep.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kubetune.io/v1alpha1",
                "kind": "FineTuneSweep",
                "metadata": {"name": "lr"},
                "spec": {
                    "template": template(root, model, data),
                    "parameters": [
                        {
                            "path": "hyperparameters.learningRate",
                            "type": "float",
                            "min": 1e-5,
                            "max": 5e-2,
                            "log": True,
                        }
                    ],
                    "objective": {"metric": "eval_loss", "direction": "minimize"},
                    "algorithm": {"type": "tpe", "seed": 3},
                    "maxTrials": 6,
                    "parallelism": 2,
                    "earlyStopping": {"type": "median", "startupTrials": 2, "warmupSteps": 0},
                },
            }
        )
    )
    return {"root": root, "baseline": baseline, "manifest": manifest}


def test_a_sweep_runs_its_trials_prunes_the_poor_ones_and_reports_the_best(
    swept: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    root: Path = swept["root"]
    args = argparse.Namespace(
        file=swept["manifest"],
        workdir=root / "work",
        no_serve=False,
        exit_after_serve_check=False,
        port=None,
        accelerator="cpu",
    )
    assert cli.run(args) == 0
    screen = capsys.readouterr().out
    summary = json.loads((root / "out" / "sweep" / "summary.json").read_text())
    trials = summary["trials"]

    assert [t["number"] for t in trials] == list(range(6))
    # Two trials ran at once: the second started before the first ended.
    assert trials[1]["startTime"] < trials[0]["completionTime"]
    complete = [t for t in trials if t["state"] == "Complete"]
    best = summary["bestTrial"]
    assert best["objective"] == min(t["objective"] for t in complete)
    assert best["objective"] < swept["baseline"]
    assert f"best trial {best['number']}" in screen

    # The median pruner stopped at least one trial before its last step, and said so.
    pruned = [t for t in trials if t["state"] == "Pruned"]
    assert pruned, screen
    assert all(max(map(int, t["evaluations"])) < 12 for t in pruned)
    assert f"trial {pruned[0]['number']} pruned at step" in screen
    # Each trial's evaluations are its own history, one per evaluated step.
    assert all(set(t["evaluations"]) <= {"3", "6", "9", "12"} for t in trials)
    assert set(complete[0]["evaluations"]) == {"3", "6", "9", "12"}

    report = (root / "out" / "sweep" / "report.html").read_text()
    assert str(root / "out" / "sweep" / "report.html") in screen.replace("\n", "")
    assert "Optimization history" in report
    assert "Intermediate values" in report
    # plotly.js is inline, once: the report opens offline.
    assert "<script src=" not in report
    assert report.count("Plotly=") + report.count("plotly.js v") >= 1
