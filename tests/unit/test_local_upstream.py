"""Local mode's chained jobs: a CompressJob compresses the model of a FineTuneJob, or of a
FineTuneSweep's best trial, run earlier in the same invocation (``kubetune run`` of one file)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.api import CompressJob
from kubetune.api.sweep import FineTuneSweep
from kubetune.local.runner import LocalRunner, RunOptions
from kubetune.local.sweep import trial_job
from tests.documents import edited, example

pytestmark = pytest.mark.unit

SWEEP = FineTuneSweep.model_validate(example("sweep-lora.yaml"))
FROM_SWEEP = CompressJob.model_validate(
    edited(example("compress-from-finetune.yaml"), spec__model={"fromFineTuneSweep": "sweep-support-lora"})
)


def runner(tmp_path: Path) -> LocalRunner:
    return LocalRunner(RunOptions(workdir=tmp_path, serve=False, accelerator="cpu"))


def test_a_compressjob_takes_the_best_trial_of_a_sweep_run_before_it(tmp_path: Path) -> None:
    local = runner(tmp_path)
    params = {"hyperparameters.learningRate": 3e-4, "method.lora.r": 8, "hyperparameters.warmupSteps": 25}
    local.sweep_winners["sweep-support-lora"] = trial_job(SWEEP, 3, params)
    plan = local.plan_for(FROM_SWEEP)
    # The example's LoRA template merges its adapter, so the trial writes a full model.
    assert plan.model_uri == "s3://runs/sweep-support-lora/trials/3/model"


def test_a_sweep_that_has_not_run_here_is_named_with_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(LookupError) as refused:
        runner(tmp_path).plan_for(FROM_SWEEP)
    assert str(refused.value).startswith(
        "spec.model.fromFineTuneSweep: FineTuneSweep 'sweep-support-lora' has not run in this invocation "
        "with a completed trial; put it before the CompressJob in the same file, or use spec.model.uri"
    )
