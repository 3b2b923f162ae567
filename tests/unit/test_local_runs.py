"""Local mode refuses what a cluster would: a second live run of one job (the run directory's
lock) and resuming an earlier run of a job whose training spec has changed since."""

from __future__ import annotations

import fcntl
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from kubetune.api import FineTuneJob
from kubetune.errors import EXIT_INVALID_INPUT
from kubetune.local.runner import LOCAL_NAMESPACE, LocalRunner, RunOptions, resume_changes
from kubetune.run.plan import plan_finetune

pytestmark = pytest.mark.unit


def make_job(output: Path, **hyperparameters: Any) -> FineTuneJob:
    return FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "tune"},
            "spec": {
                "model": {"uri": "file:///models/base"},
                "dataset": {"train": {"uri": "file:///data/train.jsonl"}},
                "hyperparameters": {"maxSteps": 10, "perDeviceBatchSize": 4, **hyperparameters},
                "output": {"uri": output.as_uri()},
            },
        }
    )


def runner(workdir: Path) -> tuple[LocalRunner, io.StringIO]:
    text = io.StringIO()
    console = Console(file=text, width=400, color_system=None)
    return LocalRunner(RunOptions(workdir=workdir, serve=False, accelerator="cpu"), console), text


def record_run(job: FineTuneJob) -> None:
    """What the runtime leaves in run.json when a run starts."""
    plan = plan_finetune(job, namespace=LOCAL_NAMESPACE)
    output = Path(plan.output_uri.removeprefix("file://"))
    output.mkdir(parents=True, exist_ok=True)
    record = {
        "job": {"namespace": LOCAL_NAMESPACE, "name": "tune", "uid": None},
        "plan": json.loads(plan.to_json()),
    }
    (output / "run.json").write_text(json.dumps(record))


def test_a_second_run_of_a_job_whose_run_directory_is_locked_is_refused(tmp_path: Path) -> None:
    job = make_job(tmp_path / "out")
    run_dir = tmp_path / "work" / "finetunejob-tune"
    run_dir.mkdir(parents=True)
    fd = os.open(run_dir / "lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"4242\n")
        local, text = runner(tmp_path / "work")
        outcome = local.run(job)
    finally:
        os.close(fd)
    assert outcome.exit_code == EXIT_INVALID_INPUT
    assert "in use by another kubetune run (pid 4242)" in text.getvalue()
    assert not (run_dir / "plan.json").exists(), "refused before anything started"


def test_resuming_with_a_changed_training_spec_is_refused_naming_the_fields(tmp_path: Path) -> None:
    before = make_job(tmp_path / "out", learningRate=1e-4)
    record_run(before)
    assert resume_changes(plan_finetune(before, namespace=LOCAL_NAMESPACE)) == []

    after = make_job(tmp_path / "out", learningRate=1e-3, maxSteps=20)
    changes = resume_changes(plan_finetune(after, namespace=LOCAL_NAMESPACE))
    assert changes == [
        "hyperparameters.learning_rate: 0.0001 -> 0.001",
        "hyperparameters.max_steps: 10 -> 20",
    ]

    local, text = runner(tmp_path / "work")
    outcome = local.run(after)
    assert outcome.exit_code == EXIT_INVALID_INPUT
    out = text.getvalue()
    assert "holds an earlier run of this job with another training spec" in out
    assert "hyperparameters.learning_rate: 0.0001 -> 0.001" in out
    assert f"to start over, delete {(tmp_path / 'out').as_uri()}" in out


def test_fields_a_newer_kubetune_added_with_their_defaults_are_no_change(tmp_path: Path) -> None:
    job = make_job(tmp_path / "out")
    record_run(job)
    record_file = tmp_path / "out" / "run.json"
    record = json.loads(record_file.read_text())
    # What an earlier kubetune wrote: before method.objective and the preference fields existed.
    del record["plan"]["method"]["objective"]
    for name in ("chosen", "rejected"):
        del record["plan"]["dataset"]["fields"][name]
    record_file.write_text(json.dumps(record))

    assert resume_changes(plan_finetune(job, namespace=LOCAL_NAMESPACE)) == []


def test_a_fresh_output_has_nothing_to_compare(tmp_path: Path) -> None:
    assert resume_changes(plan_finetune(make_job(tmp_path / "out"), namespace=LOCAL_NAMESPACE)) == []
