"""Progress updates: the wire form of ``status.progress``, the file and log reporters, the choice
of reporter by environment, and the Trainer callback that feeds them."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from kubetune.api.resources import FineTuneJob
from kubetune.api.status import Progress
from kubetune.local.display import ProgressFile
from kubetune.run.plan import RunPlan, plan_finetune
from kubetune.trainer.progress import (
    FileReporter,
    KubernetesStatusReporter,
    LogReporter,
    MultiReporter,
    NullReporter,
    ProgressCallback,
    ProgressReporter,
    ProgressUpdate,
    format_duration,
    make_reporter,
)

pytestmark = pytest.mark.unit

AT = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def full_update(**changes: Any) -> ProgressUpdate:
    values: dict[str, Any] = {
        "step": 250,
        "total_steps": 1000,
        "epoch": 0.5,
        "loss": 2.25,
        "eval_loss": 2.5,
        "learning_rate": 1e-4,
        "metrics": {"accuracy": 0.75},
        "samples_per_second": 12.5,
        "eta_seconds": 3723,
        "updated_at": AT,
    }
    return ProgressUpdate(**{**values, **changes})


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (12.4, "12s"), (240, "4m0s"), (3723, "1h2m3s"), (90061, "25h1m1s")]
)
def test_durations_read_like_kubectl(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_the_wire_form_is_status_progress_in_camel_case() -> None:
    wire = full_update().to_wire()
    assert wire == {
        "step": 250,
        "totalSteps": 1000,
        "epoch": 0.5,
        "loss": 2.25,
        "evalLoss": 2.5,
        "learningRate": 1e-4,
        "metrics": {"accuracy": 0.75},
        "samplesPerSecond": 12.5,
        "percent": 25,
        "eta": "1h2m3s",
        "updatedAt": "2025-01-02T03:04:05Z",
    }
    # Every field of the API type, and nothing else.
    assert set(wire) == {field.alias or name for name, field in Progress.model_fields.items()}


def test_finished_runs_have_no_time_left() -> None:
    update = full_update(step=1000, eta_seconds=None)
    assert (update.percent, update.eta) == (100, "0s")


def test_values_json_cannot_carry_are_left_out() -> None:
    wire = full_update(loss=math.nan, metrics={"accuracy": math.inf, "f1": 0.5}, total_steps=None).to_wire()
    assert "loss" not in wire
    assert wire["metrics"] == {"f1": 0.5}
    assert "percent" not in wire
    json.dumps(wire, allow_nan=False)


def test_file_reporter_appends_lines_local_mode_can_follow(tmp_path: Path) -> None:
    path = tmp_path / "run" / "progress.jsonl"
    reporter = FileReporter(path)
    reporter.report(full_update(step=10, eval_loss=None))
    reporter.report(full_update(step=20))
    reporter.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["step"] for line in lines] == [10, 20]
    follower = ProgressFile(path)
    assert follower.poll() == lines[-1]
    assert follower.latest["evalLoss"] == 2.5


def test_file_reporter_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "file").write_text("")
    reporter = FileReporter(tmp_path / "file" / "progress.jsonl")  # its parent is a file
    reporter.report(full_update())
    reporter.report(full_update())
    assert caplog.text.count("cannot write progress") == 1


def test_log_reporter_writes_one_readable_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    LogReporter().report(full_update())
    assert caplog.messages == [
        "step 250/1000 (25%) epoch 0.50 loss 2.25 lr 0.0001 eval_loss 2.5 accuracy 0.75 "
        "12.5 samples/s eta 1h2m3s"
    ]


def plan() -> RunPlan:
    job = FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "progress", "namespace": "ml"},
            "spec": {
                "model": {"uri": "file:///unused/model"},
                "dataset": {"train": {"uri": "file:///unused/train.jsonl"}},
                "output": {"uri": "file:///unused/output"},
                "hyperparameters": {"maxSteps": 10},
            },
        }
    )
    return plan_finetune(job)


def test_reporters_are_chosen_by_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBETUNE_PROGRESS", raising=False)
    assert isinstance(make_reporter(plan(), rank=0), LogReporter)
    monkeypatch.setenv("KUBETUNE_PROGRESS", f"file:{tmp_path / 'p.jsonl'}")
    file_reporter = make_reporter(plan(), rank=0)
    assert isinstance(file_reporter, FileReporter)
    assert file_reporter.path == tmp_path / "p.jsonl"
    assert isinstance(make_reporter(plan(), rank=1), NullReporter)
    monkeypatch.setenv("KUBETUNE_PROGRESS", f"kubernetes, file:{tmp_path / 'p.jsonl'}, log")
    several = make_reporter(plan(), rank=0)
    assert isinstance(several, MultiReporter)
    assert [type(r) for r in several.reporters] == [KubernetesStatusReporter, FileReporter, LogReporter]
    kubernetes = several.reporters[0]
    assert isinstance(kubernetes, KubernetesStatusReporter)
    assert (kubernetes.group, kubernetes.version, kubernetes.plural) == (
        "kubetune.io",
        "v1alpha1",
        "finetunejobs",
    )
    several.close()  # nothing reported: nothing is sent


def test_an_unknown_reporter_falls_back_to_the_log(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("KUBETUNE_PROGRESS", "carrier-pigeon")
    assert isinstance(make_reporter(plan(), rank=0), LogReporter)
    assert "ignoring KUBETUNE_PROGRESS entry 'carrier-pigeon'" in caplog.text


class Recorder:
    """The receiving end of the reporter interface."""

    def __init__(self) -> None:
        self.updates: list[ProgressUpdate] = []
        self.results: list[dict[str, object]] = []

    def report(self, update: ProgressUpdate) -> None:
        self.updates.append(update)

    def report_results(self, results: Mapping[str, object]) -> None:
        self.results.append(dict(results))

    def report_checkpoint(self, step: int, uri: str) -> None:
        self.results.append({"checkpoint": step, "uri": uri})

    def report_tracking(self, tracking: Mapping[str, object]) -> None:
        self.results.append({"tracking": dict(tracking)})

    def report_usage(self, usage: Mapping[str, object]) -> None:
        self.results.append({"usage": dict(usage)})

    def close(self) -> None:
        pass


def test_the_callback_turns_trainer_events_into_complete_updates(tmp_path: Path) -> None:
    recorder = Recorder()
    assert isinstance(recorder, ProgressReporter)
    callback = ProgressCallback(recorder)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, report_to=[]
    )
    state = TrainerState(max_steps=100, global_step=20)  # resumed at step 20
    control = TrainerControl()

    callback.on_train_begin(args, state, control)
    state.global_step, state.epoch = 30, 0.3
    callback.on_log(args, state, control, logs={"loss": 2.0, "learning_rate": 1e-4, "grad_norm": 1.0})
    evaluation = {"eval_loss": 1.5, "eval_accuracy": 0.5, "eval_runtime": 2.0, "eval_samples_per_second": 9.0}
    callback.on_log(args, state, control, logs=evaluation)
    callback.on_evaluate(args, state, control, metrics=evaluation)  # the same news: not sent twice
    state.global_step, state.epoch = 40, 0.4
    callback.on_log(args, state, control, logs={"loss": 1.8, "learning_rate": 9e-5})
    state.global_step, state.epoch = 100, 1.0
    callback.on_train_end(args, state, control)

    updates = recorder.updates
    assert [(u.step, u.loss, u.eval_loss) for u in updates] == [
        (30, 2.0, None),
        (30, 2.0, 1.5),
        (40, 1.8, 1.5),  # the latest evaluation travels with later updates
        (100, 1.8, 1.5),
    ]
    assert updates[1].metrics == {"accuracy": 0.5}
    assert all(u.total_steps == 100 for u in updates)
    assert updates[2].learning_rate == 9e-5
    assert updates[2].samples_per_second is not None
    assert updates[2].samples_per_second > 0
    assert updates[2].eta is not None
    assert updates[-1].percent == 100
    assert updates[-1].eta == "0s"


def test_results_go_to_the_progress_file_as_one_line(tmp_path: Path) -> None:
    reporter = FileReporter(tmp_path / "progress.jsonl")
    reporter.report_results({"sizeRatio": 3.2, "metricsAfter": {"perplexity": 12.5}})
    lines = (tmp_path / "progress.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"results": {"metricsAfter": {"perplexity": 12.5}, "sizeRatio": 3.2}}
    ]


def test_dpo_rewards_are_reported_for_training_and_for_the_held_out_pairs(tmp_path: Path) -> None:
    recorder = Recorder()
    callback = ProgressCallback(recorder)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    state = TrainerState(max_steps=10, global_step=0)
    control = TrainerControl()
    callback.on_train_begin(args, state, control)
    state.global_step = 5
    trained = {
        "rewards/chosen": 0.2,
        "rewards/rejected": -0.1,
        "rewards/accuracies": 0.75,
        "rewards/margins": 0.3,
    }
    callback.on_log(args, state, control, logs={"loss": 0.6, **trained, "logps/chosen": -40.0})
    held_out = {"eval_loss": 0.65, "eval_rewards/accuracies": 0.7, "eval_rewards/margins": 0.25}
    callback.on_evaluate(args, state, control, metrics=held_out)

    first, last = recorder.updates[0], recorder.updates[-1]
    assert first.loss == 0.6
    assert first.metrics == {f"train_{key}": value for key, value in trained.items()}
    assert last.eval_loss == 0.65
    assert last.metrics is not None
    assert last.metrics["rewards/accuracies"] == 0.7
    assert last.metrics["rewards/margins"] == 0.25
    assert last.metrics["train_rewards/margins"] == 0.3
