"""The run plan as the runtimes receive it: one loader with one-line reasons, the DeepSpeed config
resolved from the spec with only the hardware's part left to the node, and the plan's artifacts
and distribution decided by kubetune.run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune.api import CompressJob, FineTuneJob
from kubetune.api.spec import Precision
from kubetune.errors import InvalidInputError
from kubetune.run.deepspeed import config_for_hardware
from kubetune.run.plan import RunPlan, plan_compress, plan_finetune
from kubetune.run.workloads import main_workload, runs_distributed

pytestmark = pytest.mark.unit


def finetune(**spec: Any) -> FineTuneJob:
    return FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "tune", "namespace": "ml"},
            "spec": {
                "model": {"uri": "s3://models/base"},
                "dataset": {"train": {"uri": "s3://data/train.jsonl"}},
                "hyperparameters": {"epochs": 1, "perDeviceBatchSize": 4},
                "output": {"uri": "s3://runs/tune"},
                **spec,
            },
        }
    )


def compress(**spec: Any) -> CompressJob:
    return CompressJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "CompressJob",
            "metadata": {"name": "squeeze", "namespace": "ml"},
            "spec": {
                "model": {"uri": "s3://models/base"},
                "dataset": {"train": {"uri": "s3://data/train.jsonl"}},
                "output": {"uri": "s3://runs/squeeze"},
                **spec,
            },
        }
    )


def test_a_plan_file_round_trips(tmp_path: Path) -> None:
    plan = plan_finetune(finetune())
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    assert RunPlan.from_file(path) == plan


def test_an_unreadable_plan_is_invalid_input_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(InvalidInputError, match=f"cannot read the run plan {missing}: No such file"):
        RunPlan.from_file(missing)


def test_an_invalid_plan_is_refused_in_one_line_naming_the_fields(tmp_path: Path) -> None:
    raw = json.loads(plan_finetune(finetune()).to_json())
    raw["world"]["workers"] = 0
    del raw["output_uri"]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(InvalidInputError) as refusal:
        RunPlan.from_file(path)
    message = str(refusal.value)
    assert message.startswith(f"the run plan {path} is invalid: ")
    assert "output_uri: Field required" in message
    assert "world.workers: Input should be greater than or equal to 1" in message
    assert "\n" not in message


def test_zero_3_gathers_the_weights_on_save_whichever_way_it_was_chosen() -> None:
    by_stage = plan_finetune(finetune(deepspeed={"zeroStage": 3}))
    by_config = plan_finetune(
        finetune(deepspeed={"zeroStage": 2, "config": {"zero_optimization": {"stage": 3}}})
    )
    for plan in (by_stage, by_config):
        assert plan.deepspeed_config is not None
        assert plan.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_the_plan_carries_the_batch_geometry_and_the_node_only_its_hardware() -> None:
    plan = plan_finetune(
        finetune(deepspeed={"zeroStage": 3, "offloadOptimizer": True, "offloadParams": True})
    )
    config = plan.deepspeed_config
    assert config is not None
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}

    on_gpu = config_for_hardware(config, precision=Precision.bf16, accelerator="cuda")
    assert on_gpu["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    on_cpu = config_for_hardware(config, precision=Precision.fp32, accelerator="cpu")
    assert on_cpu["zero_optimization"]["offload_param"] == {"device": "cpu"}, "nothing to pin without a GPU"
    assert config["zero_optimization"]["offload_param"]["pin_memory"] is True, "the plan is left as it was"


def test_the_plan_knows_its_artifacts() -> None:
    adapter_only = plan_finetune(finetune(method={"type": "lora", "mergeAdapter": False}))
    assert adapter_only.artifacts.model_uri is None
    assert adapter_only.artifacts.served.model_uri == "s3://models/base"
    assert adapter_only.artifacts.served.adapter_uri == "s3://runs/tune/adapter"
    squeezed = plan_compress(
        compress(quantization={"method": "rtn", "scheme": "W8A16"}), model_uri="s3://models/base"
    )
    assert squeezed.artifacts.model_uri == "s3://runs/squeeze/model"
    assert squeezed.artifacts.report_uri == "s3://runs/squeeze/compression_report.json"


@pytest.mark.parametrize(
    ("plan", "distributed"),
    [
        (plan_finetune(finetune()), True),
        (
            plan_compress(compress(quantization={"method": "rtn", "scheme": "W8A16"}), model_uri="s3://m"),
            False,
        ),
        (
            plan_compress(
                compress(distillation={"student": {"layerStride": 2}, "hyperparameters": {"maxSteps": 10}}),
                model_uri="s3://m",
            ),
            True,
        ),
    ],
    ids=["finetune", "quantize", "distill"],
)
def test_whatever_trains_runs_as_a_gang(plan: RunPlan, distributed: bool) -> None:
    assert runs_distributed(plan) is distributed
    assert main_workload(plan).distributed is distributed
