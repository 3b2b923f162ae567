"""The memory plan's arithmetic (kubetune.run.memory) against DeepSpeed's own estimators, a known
model's parameter count, and the job fields that decide it; and ``kubetune plan`` on a manifest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.resources import FineTuneJob
from kubetune.api.spec import Precision, TaskType
from kubetune.cli import main
from kubetune.errors import InvalidInputError
from kubetune.run import memory
from kubetune.run.plan import plan_finetune

GIB = 1024**3
# Llama-2-7B's config.json (meta-llama/Llama-2-7b-hf): 6,738,415,616 parameters.
LLAMA_7B: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}
P7B = 6_738_415_616


def setup(**overrides: Any) -> memory.Setup:
    values: dict[str, Any] = {
        "world_size": 8,
        "zero_stage": 2,
        "offload_optimizer": False,
        "offload_params": False,
        "dtype_bytes": 2,
        "batch_size": 1,
        "seq_length": 8,
        "gradient_checkpointing": False,
        "lora": False,
        "on_gpu": True,
    }
    return memory.Setup(**{**values, **overrides})


def bytes_of(plan: memory.MemoryPlan, *names: str, where: str | None = None) -> int:
    return sum(r.bytes for r in plan.rows if r.what in names and (where is None or r.where == where))


MODEL_STATES = ("parameters", "gathered layer", "gradients", "optimizer states")


def test_a_llama_config_counts_its_parameters_exactly() -> None:
    shape = memory.ModelShape.from_config(LLAMA_7B)
    assert shape.parameters() == P7B
    # A classifier has a score head of labels x hidden instead of the vocabulary head.
    assert (
        shape.parameters(task=TaskType.sequence_classification, num_labels=3) == P7B - 32000 * 4096 + 3 * 4096
    )


@pytest.mark.parametrize("n", [1, 8, 64])
def test_zero2_model_states_on_the_device_are_deepspeeds_estimate(n: int) -> None:
    # stage_1_and_2.estimate_zero2_model_states_mem_needs, cpu_offload=False: 2P + 18P/N.
    shape = memory.ModelShape.from_config(LLAMA_7B)
    plan = memory.estimate(shape, setup(world_size=n))
    assert bytes_of(plan, *MODEL_STATES, where="device") == pytest.approx(2 * P7B + 18 * P7B / n, abs=4)
    # cpu_offload=True: only the 16-bit weights stay on the GPU.
    offloaded = memory.estimate(shape, setup(world_size=n, offload_optimizer=True))
    assert bytes_of(offloaded, *MODEL_STATES, where="device") == 2 * P7B
    assert bytes_of(offloaded, "optimizer states", where="host") == 16 * P7B // n


@pytest.mark.parametrize("n", [1, 8, 64])
def test_zero3_model_states_on_the_device_are_deepspeeds_estimate(n: int) -> None:
    # stage3.estimate_zero3_model_states_mem_needs: 4 x largest layer + 18P/N without offload,
    # + 2P/N with the optimizer offloaded, 4 x largest layer alone with the parameters offloaded too.
    shape = memory.ModelShape.from_config(LLAMA_7B)
    largest = 32000 * 4096  # the embedding
    assert shape.largest_layer() == largest
    plain = memory.estimate(shape, setup(world_size=n, zero_stage=3))
    assert bytes_of(plain, *MODEL_STATES, where="device") == pytest.approx(4 * largest + 18 * P7B / n, abs=4)
    opt = memory.estimate(shape, setup(world_size=n, zero_stage=3, offload_optimizer=True))
    assert bytes_of(opt, *MODEL_STATES, where="device") == pytest.approx(4 * largest + 2 * P7B / n, abs=1)
    both = memory.estimate(
        shape, setup(world_size=n, zero_stage=3, offload_optimizer=True, offload_params=True)
    )
    assert bytes_of(both, *MODEL_STATES, where="device") == 4 * largest
    assert bytes_of(both, *MODEL_STATES, where="host") == pytest.approx(18 * P7B / n, abs=2)
    # DeepSpeed's additional_buffer_factor of 1.5 on host memory.
    assert bytes_of(both, "host buffers") == pytest.approx(0.5 * 18 * P7B / n, rel=1e-6)


def test_zero1_shards_only_the_optimizer_and_no_zero_in_fp32_keeps_only_adams_moments() -> None:
    shape = memory.ModelShape.from_config(LLAMA_7B)
    zero1 = memory.estimate(shape, setup(zero_stage=1))
    assert bytes_of(zero1, "parameters", "gradients") == 4 * P7B
    assert bytes_of(zero1, "optimizer states") == 16 * P7B // 8
    fp32 = memory.estimate(shape, setup(zero_stage=0, dtype_bytes=4))
    assert bytes_of(fp32, "parameters", "gradients", "optimizer states") == (4 + 4 + 8) * P7B


def test_lora_trains_only_the_adapters() -> None:
    shape = memory.ModelShape.from_config(LLAMA_7B)
    plan = memory.estimate(shape, setup(lora=True, lora_rank=16, lora_targets=("q_proj", "v_proj")))
    adapters = 32 * 16 * ((4096 + 4096) + (4096 + 4096))
    assert plan.trainable == adapters
    assert bytes_of(plan, "parameters") == 2 * P7B  # the frozen base stays, in 16 bits
    assert bytes_of(plan, "gradients") == 2 * adapters // 8
    assert bytes_of(plan, "optimizer states") == 16 * adapters // 8
    everything = memory.estimate(shape, setup(lora=True, lora_rank=8))  # all-linear
    per_layer = 8 * (4 * (4096 + 4096) + 2 * (4096 + 11008) + (11008 + 4096))
    assert everything.trainable == 32 * per_layer
    unknown = memory.estimate(shape, setup(lora=True, lora_targets=("c_attn",)))
    assert unknown.trainable == 0
    assert any("c_attn" in note for note in unknown.notes)


def test_activations_per_layer_and_with_gradient_checkpointing() -> None:
    shape = memory.ModelShape.from_config(LLAMA_7B)
    s, b, h, a, layers = 2048, 4, 4096, 32, 32
    full = memory.estimate(shape, setup(seq_length=s, batch_size=b))
    # Korthikanti et al. 2022: s*b*h*(34 + 5*a*s/h) bytes per layer with 16-bit activations.
    assert bytes_of(full, "activations") == layers * int(s * b * h * (34 + 5 * a * s / h))
    checkpointed = memory.estimate(shape, setup(seq_length=s, batch_size=b, gradient_checkpointing=True))
    assert bytes_of(checkpointed, "activations") == layers * s * b * h * 2 + int(
        s * b * h * (34 + 5 * a * s / h)
    )
    assert bytes_of(checkpointed, "activations") < bytes_of(full, "activations") / 10
    # The logits: the working dtype, a 32-bit copy and its gradient per vocabulary entry.
    assert bytes_of(full, "logits") == b * s * 32000 * (2 + 8)
    dpo = memory.estimate(shape, setup(seq_length=s, batch_size=b, pairs=True))
    assert bytes_of(dpo, "activations") == 2 * bytes_of(full, "activations")


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [("64Gi", 64 * GIB), ("500M", 500_000_000), ("1073741824", GIB), ("1.5Gi", 3 * GIB // 2), ("lots", None)],
)
def test_memory_quantities(quantity: str, expected: int | None) -> None:
    assert memory.memory_bytes(quantity) == expected


def test_gpu_memory_from_the_product_label() -> None:
    assert memory.gpu_memory("NVIDIA-H100-80GB-HBM3") == 80 * GIB
    assert memory.gpu_memory("NVIDIA-A100-SXM4-40GB") == 40 * GIB
    assert memory.gpu_memory("NVIDIA-A100-SXM4-80GB") == 80 * GIB
    assert memory.gpu_memory("Tesla-T4") == 16 * GIB
    assert memory.gpu_memory("something-else") is None
    assert memory.dtype_bytes(Precision.auto, on_gpu=False) == 4
    assert memory.dtype_bytes(Precision.auto, on_gpu=True) == 2


def job(spec: dict[str, Any], annotations: dict[str, str] | None = None) -> FineTuneJob:
    metadata: dict[str, Any] = {
        "name": "big",
        "namespace": "ml",
        **({"annotations": annotations} if annotations else {}),
    }
    base: dict[str, Any] = {
        "model": {"uri": "s3://models/llama-7b"},
        "dataset": {"train": {"uri": "s3://data/train.jsonl"}},
        "output": {"uri": "s3://out/big"},
        "hyperparameters": {"maxSteps": 10, "perDeviceBatchSize": 4, "maxSeqLength": 2048},
    }
    return FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": metadata,
            "spec": {**base, **spec},
        }
    )


H100 = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}


def test_a_full_fine_tune_of_7b_on_one_h100_does_not_fit_and_says_what_to_change() -> None:
    plan = plan_finetune(
        job({"method": {"type": "full"}, "resources": {"gpusPerWorker": 1, "nodeSelector": H100}})
    )
    setup_ = memory.setup_of(plan)
    assert (setup_.zero_stage, setup_.dtype_bytes, setup_.world_size, setup_.lora) == (2, 2, 1, False)
    estimate = memory.estimate(memory.ModelShape.from_config(LLAMA_7B), setup_)
    found = memory.checks(plan, estimate)
    assert [(c.what, c.fits) for c in found] == [("gpu", False), ("memory", None)]
    reason = memory.will_not_fit(plan, estimate, found)
    assert reason is not None
    assert "each GPU needs 242.45 GiB" in reason
    assert "of 80.00 GiB (NVIDIA-H100-80GB-HBM3)" in reason
    assert "optimizer states 100.41 GiB" in reason  # 16 B x 6.74e9
    assert "method.type lora" in reason
    assert "kubetune.io/skip-memory-check" in reason


def test_lora_with_zero3_on_eight_h100_fits() -> None:
    plan = plan_finetune(
        job(
            {
                "deepspeed": {"zeroStage": 3},
                "hyperparameters": {
                    "maxSteps": 10,
                    "perDeviceBatchSize": 1,
                    "maxSeqLength": 2048,
                    "gradientCheckpointing": True,
                },
                "resources": {"gpusPerWorker": 8, "nodeSelector": H100, "limits": {"memory": "512Gi"}},
            }
        )
    )
    estimate = memory.estimate(memory.ModelShape.from_config(LLAMA_7B), memory.setup_of(plan))
    found = memory.checks(plan, estimate)
    assert [(c.what, c.fits) for c in found] == [("gpu", True), ("memory", True)]
    assert memory.will_not_fit(plan, estimate, found) is None


def test_the_memory_limit_is_shared_by_the_processes_of_a_pod() -> None:
    plan = plan_finetune(job({"resources": {"processesPerWorker": 4, "limits": {"memory": "8Gi"}}}))
    estimate = memory.estimate(memory.ModelShape.from_config(LLAMA_7B), memory.setup_of(plan))
    [check] = memory.checks(plan, estimate)
    assert check.needed == 4 * estimate.total("host")
    assert check.limit == 8 * GIB
    assert check.fits is False
    assert check.line.startswith("each pod needs 4 processes x ")


def test_the_annotation_marks_the_plan_and_a_config_without_sizes_is_refused() -> None:
    assert plan_finetune(job({})).skip_memory_check is None
    assert plan_finetune(job({}, {"kubetune.io/skip-memory-check": "true"})).skip_memory_check is True
    with pytest.raises(InvalidInputError, match="num_hidden_layers or n_layer"):
        memory.ModelShape.from_config({"hidden_size": 8, "num_attention_heads": 2, "vocab_size": 10})


def write_manifest(tmp_path: Path, config: dict[str, Any], resources: dict[str, Any]) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))
    manifest = tmp_path / "job.yaml"
    manifest.write_text(
        json.dumps(
            {
                "apiVersion": "kubetune.io/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": "big"},
                "spec": {
                    "model": {"uri": model.as_uri()},
                    "dataset": {"train": {"uri": "file:///data/train.jsonl"}},
                    "output": {"uri": "file:///out/big"},
                    "method": {"type": "full"},
                    "hyperparameters": {"maxSteps": 10},
                    "resources": resources,
                },
            }
        )
    )
    return manifest


def test_kubetune_plan_prints_the_table_and_fails_a_job_that_cannot_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = write_manifest(tmp_path, LLAMA_7B, {"gpusPerWorker": 1, "nodeSelector": H100})
    assert main(["plan", str(manifest)]) == 1
    out = capsys.readouterr().out
    assert "parameters 6,738,415,616, trainable 6,738,415,616" in out
    rows = {line[:18].strip(): line[19:].split(None, 2) for line in out.splitlines()[2:10]}
    assert rows["optimizer states"][:2] == ["device", "100.41"]
    assert "WillNotFit: each GPU needs" in out


def test_kubetune_plan_of_a_job_that_fits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    small = {
        **LLAMA_7B,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    }
    manifest = write_manifest(tmp_path, small, {"limits": {"memory": "4Gi"}})
    assert main(["plan", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "limit 4Gi: fits" in out
    assert "WillNotFit" not in out


def test_kubetune_plan_of_a_sweep_plans_its_template_and_lists_compression(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(LLAMA_7B))
    examples = Path(__file__).parents[2] / "manifests" / "examples"
    assert main(["plan", str(examples / "sweep-lora.yaml"), "--model-config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "(its template; trials differ only in the search space)" in out
    assert "parameters 6,738,415,616, trainable " in out
    assert main(["plan", str(examples / "compress-from-finetune.yaml"), "--model-config", str(config)]) == 0
    assert "compression trains nothing; no memory plan" in capsys.readouterr().out
