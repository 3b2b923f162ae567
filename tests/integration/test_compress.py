"""Compression end to end: a tiny llama trained here on real English (the licence texts), then
``python -m kubetune.trainer compress`` processes quantize, prune or distill it from run plans
rendered from CompressJobs, reading the model and data from object storage (the moto S3 server
or ``file://``) and writing the compressed model, recipe.yaml and compression_report.json.

Quality is perplexity on whole licences never seen in training or calibration. What "size" means:
``size_ratio`` is original / compressed bytes of the weight files, the original stored in bf16 as
real checkpoints are (an fp32 baseline would double every ratio); ``linear_weight_ratio`` counts
only the linear layers quantization targets (the bf16 embedding and head are ~7% of this model).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from pydantic import ValidationError

from kubetune.api.resources import CompressJob
from kubetune.api.status import CompressionResults
from kubetune.storage import open_store
from tests.integration.test_compress_support import (
    compress_job,
    cpu_env,
    generate,
    held_out_perplexity,
    random_student,
    read_report,
    run_compress,
    termination_message,
    train_teacher,
    uri,
    write_data,
    write_plan,
)
from tests.integration.test_finetune_support import write_jsonl
from tests.s3server import S3Bucket

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@dataclass(frozen=True)
class LicenceLM:
    model: Path
    train: Path
    eval: Path


@pytest.fixture(scope="session")
def licence_lm(tmp_path_factory: pytest.TempPathFactory) -> LicenceLM:
    """The model every test compresses, trained once per session (about a minute on 2 cores)."""
    root = tmp_path_factory.mktemp("licence-lm")
    train, held_out = write_data(root / "data")
    return LicenceLM(train_teacher(root / "teacher"), train, held_out)


def compress_locally(lm: LicenceLM, tmp_path: Path, **job: Any) -> tuple[Path, dict[str, Any]]:
    """Run one compress process on ``file://`` storage; returns the output folder and the report."""
    output = tmp_path / "out"
    plan = write_plan(
        tmp_path / "plan.json",
        compress_job(
            model_uri=uri(lm.model),
            train_uri=uri(lm.train),
            eval_uri=uri(lm.eval),
            output_uri=uri(output),
            **job,
        ),
    )
    result = run_compress(plan, tmp_path, env=cpu_env())
    assert result.returncode == 0, result.stderr[-8000:]
    return output, read_report(output)


def perplexities(report: dict[str, Any]) -> tuple[float, float]:
    return report["original"]["metrics"]["perplexity"], report["compressed"]["metrics"]["perplexity"]


def linear_sparsity(model_dir: Path) -> float:
    """Fraction of zeros in the weights of the linear layers of the decoder blocks."""
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    weights = [
        m.weight for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name
    ]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


# --- quantization --------------------------------------------------------------------------------


def test_rtn_w8a16_over_s3_costs_at_most_2_percent_perplexity(
    licence_lm: LicenceLM, s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    store = open_store(s3_bucket.uri)
    base = s3_bucket.uri
    store.upload_dir(licence_lm.model, f"{base}/models/teacher")
    store.upload_file(licence_lm.train, f"{base}/data/train.jsonl")
    store.upload_file(licence_lm.eval, f"{base}/data/eval.jsonl")
    job = compress_job(
        model_uri=f"{base}/models/teacher",
        train_uri=f"{base}/data/train.jsonl",
        eval_uri=f"{base}/data/eval.jsonl",
        output_uri=f"{base}/runs/w8a16",
        quantization={"method": "rtn", "scheme": "W8A16"},
    )
    result = run_compress(
        write_plan(tmp_path / "plan.json", job), tmp_path, env={**cpu_env(), **s3_bucket.env()}
    )
    assert result.returncode == 0, result.stderr[-8000:]
    out = tmp_path / "out"
    store.download_prefix(f"{base}/runs/w8a16", out)

    report = read_report(out)
    before, after = perplexities(report)
    assert report["steps"] == ["quantize"]
    assert after <= 1.02 * before, report["quality_delta_relative"]
    # The report's figures are those of the files: recomputed here, independently of the runtime.
    assert held_out_perplexity(licence_lm.model, licence_lm.eval) == pytest.approx(before, rel=1e-3)
    assert held_out_perplexity(out / "model", licence_lm.eval) == pytest.approx(after, rel=1e-3)
    assert report["evaluation"]["data"] == f"dataset.eval {base}/data/eval.jsonl"
    assert report["original"]["dtype"] == report["compressed"]["dtype"] == "bfloat16"
    # int8 values plus one bf16 scale per 128 weights, against bf16 weights.
    assert report["linear_weight_ratio"] == pytest.approx(16 / (8 + 16 / 128), rel=0.01)
    assert report["compressed"]["parameters"] == report["original"]["parameters"]
    # What it used: time per phase and of the process, no GPU-hours on a CPU, no token rate.
    usage = report["usage"]
    assert {"download", "compress", "evaluate_original", "evaluate_compressed"} <= set(usage["wall_seconds"])
    assert usage["wall_seconds_total"] >= sum(usage["wall_seconds"].values()) > 0
    assert usage["gpu_hours_requested"] == 0
    assert usage["tokens_per_second"] is None
    assert usage["parameters"] == report["original"]["parameters"]
    # And its one process kept its log.
    assert "compress.log" in {p.name for p in (out / "logs" / "attempt-0").iterdir()}

    config = json.loads((out / "model" / "config.json").read_text())
    weights = config["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert (weights["num_bits"], weights["group_size"]) == (8, 128)
    assert config["quantization_config"]["ignore"] == ["lm_head"]
    assert generate(out / "model", "This License").strip()

    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    [step] = recipe["steps"]
    assert step["step"] == "quantize"
    assert step["tool"].startswith("llmcompressor ")
    assert "QuantizationModifier" in step["recipe"]
    assert step["calibration"]["samples_used"] == 0  # round-to-nearest needs no data
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "succeeded"
    results = CompressionResults.model_validate(record["results"])
    assert results.size_ratio == report["size_ratio"]
    assert results.metrics_after == report["compressed"]["metrics"]


def test_gptq_w4a16_costs_at_most_10_percent_perplexity_and_shrinks_the_weights_3x(
    licence_lm: LicenceLM, tmp_path: Path
) -> None:
    out, report = compress_locally(
        licence_lm, tmp_path, quantization={"method": "gptq", "scheme": "W4A16", "groupSize": 128}
    )
    before, after = perplexities(report)
    assert after <= 1.10 * before, report["quality_delta_relative"]
    assert report["size_ratio"] >= 3.0  # whole weight files, bf16 embedding and head included
    assert report["linear_weight_ratio"] >= 3.8  # 16 bits -> 4 bits + a bf16 scale per 128
    [step] = report["steps_applied"]
    assert step["calibration"]["samples_used"] == 32
    assert 32 * 64 < step["calibration"]["tokens"] <= 32 * 128
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    assert held_out_perplexity(out / "model", licence_lm.eval) == pytest.approx(after, rel=1e-3)
    assert generate(out / "model", "This License").strip()
    # llm-compressor's own recipe travels with the model, for vLLM and for reproducing the run.
    assert "GPTQModifier" in (out / "model" / "recipe.yaml").read_text()


def test_torchao_int8_weight_only_loads_with_from_pretrained_and_generates(
    licence_lm: LicenceLM, tmp_path: Path
) -> None:
    out, report = compress_locally(
        licence_lm, tmp_path, quantization={"method": "torchao", "scheme": "INT8_WEIGHT_ONLY"}
    )
    before, after = perplexities(report)
    assert after <= 1.02 * before
    assert report["size_ratio"] >= 1.7
    assert report["compressed"]["format"] == "torchao"
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    assert config["quantization_config"]["modules_to_not_convert"] == ["lm_head"]
    assert generate(out / "model", "This License").strip()


# --- pruning -------------------------------------------------------------------------------------


def test_sparsegpt_50_percent_keeps_perplexity_within_15_percent(
    licence_lm: LicenceLM, tmp_path: Path
) -> None:
    out, report = compress_locally(licence_lm, tmp_path, pruning={"method": "sparsegpt", "sparsity": 0.5})
    before, after = perplexities(report)
    assert after <= 1.15 * before, report["quality_delta_relative"]
    assert linear_sparsity(out / "model") == pytest.approx(0.5, abs=0.005)
    zeros = report["compressed"]["parameters"] - report["compressed"]["nonzero_parameters"]
    assert zeros >= 0.45 * report["compressed"]["parameters"]
    # compressed-tensors 0.19 stores pruned weights dense: pruning alone does not shrink the files.
    assert report["size_ratio"] == pytest.approx(1.0, abs=0.01)
    assert generate(out / "model", "This License").strip()


def test_2_4_sparsegpt_then_w4a16_run_as_one_recipe_and_keep_the_2_4_pattern(
    licence_lm: LicenceLM, tmp_path: Path
) -> None:
    out, report = compress_locally(
        licence_lm,
        tmp_path,
        pruning={"method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4"},
        quantization={"method": "gptq", "scheme": "W4A16"},
    )
    before, after = perplexities(report)
    assert after <= 1.25 * before, report["quality_delta_relative"]
    [step] = report["steps_applied"]
    assert step["step"] == "prune+quantize"
    assert step["quantization_method_run"] == "rtn"  # GPTQ would move pruned weights off zero
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert "SparseGPTModifier" in recipe["steps"][0]["recipe"]
    assert "QuantizationModifier" in recipe["steps"][0]["recipe"]
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model: Any = AutoModelForCausalLM.from_pretrained(
        out / "model", dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    weight = model.model.layers[1].mlp.down_proj.weight
    assert int((weight.reshape(-1, 4) != 0).sum(dim=1).max()) <= 2  # at most 2 of every 4
    assert report["size_ratio"] >= 3.0
    assert generate(out / "model", "This License").strip()


def test_a_classifier_is_measured_by_accuracy_and_macro_f1(tmp_path: Path) -> None:
    from kubetune.trainer.tinymodel import sample_corpus
    from tests.tinymodels import build_tiny_classifier

    lines = sample_corpus(300)
    model = build_tiny_classifier(tmp_path / "model", lines, 2, labels=["short", "long"], hidden_size=64)
    records = [{"text": line, "label": "long" if len(line) > 50 else "short"} for line in lines]
    train = write_jsonl(tmp_path / "data" / "train.jsonl", records[:240])
    held_out = write_jsonl(tmp_path / "data" / "eval.jsonl", records[240:])
    job = CompressJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "CompressJob",
            "metadata": {"name": "classifier", "namespace": "default"},
            "spec": {
                "model": {"uri": uri(model)},
                "task": {"type": "sequence-classification", "numLabels": 2, "labels": ["short", "long"]},
                "dataset": {
                    "train": {"uri": uri(train)},
                    "eval": {"uri": uri(held_out)},
                    "format": "classification",
                },
                "pruning": {"sparsity": 0.5},
                "quantization": {"method": "rtn", "scheme": "W8A16", "groupSize": 64},
                "calibration": {"samples": 16, "maxSeqLength": 64},
                "output": {"uri": uri(tmp_path / "out")},
            },
        }
    )
    result = run_compress(write_plan(tmp_path / "plan.json", job), tmp_path, env=cpu_env())
    assert result.returncode == 0, result.stderr[-8000:]
    report = read_report(tmp_path / "out")
    for side in ("original", "compressed"):
        assert set(report[side]["metrics"]) == {"eval_loss", "accuracy", "f1_macro"}
    assert report["evaluation"]["scored"] == 60
    assert report["evaluation"]["scored_unit"] == "examples"
    from transformers import AutoModelForSequenceClassification

    loaded: Any = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "model")
    assert loaded.config.id2label == {0: "short", 1: "long"}


# --- distillation --------------------------------------------------------------------------------

DISTILL_STEPS = 60


def distillation(student: dict[str, Any], *, kd_weight: float, batch: int) -> dict[str, Any]:
    return {
        "student": student,
        "temperature": 2.0,
        "kdWeight": kd_weight,
        "hyperparameters": {
            "maxSteps": DISTILL_STEPS,
            "learningRate": 2e-3,
            "perDeviceBatchSize": batch,
            "maxSeqLength": 128,
            "loggingEverySteps": 10,
            "seed": 7,
        },
        "deepspeed": {"zeroStage": 2},
        "checkpoint": {"everySteps": 30, "keepLast": 1},
    }


def test_a_distilled_half_depth_student_beats_the_same_student_trained_from_scratch(
    licence_lm: LicenceLM, tmp_path: Path
) -> None:
    """Distillation: 2 processes (torchrun) with DeepSpeed ZeRO-2, 4 sequences each; the baseline:
    1 process with 8 sequences per step, so both see the same 8 sequences per optimizer step for
    the same number of steps. Both students have 2 of the teacher's 4 layers."""
    kd_dir, scratch_dir = tmp_path / "kd", tmp_path / "scratch"
    kd_job = compress_job(
        model_uri=uri(licence_lm.model),
        train_uri=uri(licence_lm.train),
        eval_uri=uri(licence_lm.eval),
        output_uri=uri(kd_dir / "out"),
        name="distil",
        distillation=distillation({"layerStride": 2}, kd_weight=0.5, batch=4),
        processes=2,
    )
    kd_plan = write_plan(tmp_path / "kd.json", kd_job)
    result = run_compress(kd_plan, tmp_path, nproc=2, env=cpu_env(), tag="kd")
    assert result.returncode == 0, result.stderr[-8000:]

    random_init = random_student(licence_lm.model, tmp_path / "random-student", num_layers=2)
    scratch_job = compress_job(
        model_uri=uri(licence_lm.model),
        train_uri=uri(licence_lm.train),
        eval_uri=uri(licence_lm.eval),
        output_uri=uri(scratch_dir / "out"),
        name="scratch",
        distillation=distillation({"uri": uri(random_init)}, kd_weight=0.0, batch=8),
    )
    result = run_compress(
        write_plan(tmp_path / "scratch.json", scratch_job), tmp_path, env=cpu_env(), tag="scratch"
    )
    assert result.returncode == 0, result.stderr[-8000:]

    kd, scratch = read_report(kd_dir / "out"), read_report(scratch_dir / "out")
    assert kd["steps"] == scratch["steps"] == ["distill"]
    kd_ppl, scratch_ppl = (
        kd["compressed"]["metrics"]["perplexity"],
        scratch["compressed"]["metrics"]["perplexity"],
    )
    assert kd_ppl < scratch_ppl, (kd_ppl, scratch_ppl)
    # Half the layers: the embedding and head are kept, so a little over half the parameters.
    assert 0.5 < kd["compressed"]["parameters"] / kd["original"]["parameters"] < 0.6
    assert kd["compressed"]["dtype"] == "bfloat16"
    assert kd["size_ratio"] > 1.6
    config = json.loads((kd_dir / "out" / "model" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    assert generate(kd_dir / "out" / "model", "This License").strip()

    # The fine-tuning checkpoint protocol: committed checkpoints, resumed from after a restart.
    record = json.loads((kd_dir / "out" / "run.json").read_text())
    assert record["distillation"]["checkpoints_committed"] == [30, DISTILL_STEPS]
    assert record["distillation"]["global_step"] == DISTILL_STEPS
    marker = json.loads(
        (kd_dir / "out" / "checkpoints" / f"step-{DISTILL_STEPS}" / "_COMMITTED.json").read_text()
    )
    assert marker["world_size"] == 2
    restarted = run_compress(kd_plan, tmp_path, nproc=2, env=cpu_env(), tag="kd-restart")
    assert restarted.returncode == 0, restarted.stderr[-8000:]
    again = json.loads((kd_dir / "out" / "run.json").read_text())
    assert again["distillation"]["resumed_from"]["step"] == DISTILL_STEPS
    assert again["distillation"]["checkpoints_committed"] == []  # nothing trained again
    assert read_report(kd_dir / "out")["compressed"]["metrics"] == kd["compressed"]["metrics"]


# --- bad input -----------------------------------------------------------------------------------


def test_the_schema_rejects_unknown_schemes_and_sparsity_outside_0_1() -> None:
    def job(**step: Any) -> None:
        compress_job(model_uri="s3://m/base", train_uri="s3://d/train.jsonl", output_uri="s3://o/out", **step)

    with pytest.raises(ValidationError, match="scheme"):
        job(quantization={"scheme": "W3A5"})
    for sparsity in (0.0, 1.0, 1.2):
        with pytest.raises(ValidationError, match="sparsity"):
            job(pruning={"sparsity": sparsity})


def _edited_plan(tmp_path: Path, lm: LicenceLM, edit: dict[str, Any], **job: Any) -> Path:
    plan = write_plan(
        tmp_path / "plan.json",
        compress_job(
            model_uri=uri(lm.model), train_uri=uri(lm.train), output_uri=uri(tmp_path / "out"), **job
        ),
    )
    raw = json.loads(plan.read_text())
    for dotted, value in edit.items():
        *path, last = dotted.split(".")
        node = raw
        for key in path:
            node = node[key]
        node[last] = value
    plan.write_text(json.dumps(raw))
    return plan


@pytest.mark.parametrize(
    ("job", "edit", "message"),
    [
        pytest.param(
            {"quantization": {"scheme": "W4A16"}},
            {"compression.quantization.scheme": "W3A5"},
            "compression.quantization.scheme: Input should be",
            id="unknown-scheme",
        ),
        pytest.param(
            {"pruning": {"sparsity": 0.5}},
            {"compression.pruning.sparsity": 1.5},
            "compression.pruning.sparsity: Input should be less than 1",
            id="sparsity-above-1",
        ),
        pytest.param(
            {"pruning": {"sparsity": 0.5}},
            {"compression.pruning.sparsity": 0},
            "compression.pruning.sparsity: Input should be greater than 0",
            id="sparsity-zero",
        ),
        pytest.param(
            {"quantization": {"method": "rtn", "scheme": "FP8"}},
            {"model_uri": "file:///nonexistent/model"},  # refused before any download (else exit 3)
            "FP8 needs a GPU with FP8 support",
            id="fp8-on-cpu",
        ),
        pytest.param(
            # The API refuses this pair; a plan written around it (an older operator) still is.
            {"quantization": {"method": "rtn", "scheme": "FP8"}},
            {"compression.quantization.method": "gptq"},
            "method gptq does not take scheme FP8",
            id="gptq-fp8",
        ),
        pytest.param(
            {"quantization": {"method": "gptq", "scheme": "W4A16", "groupSize": 96}},
            {},
            "groupSize 96 does not divide the input width of model.layers.0",
            id="group-size",
        ),
    ],
)
def test_a_plan_that_cannot_run_exits_2_with_a_clear_reason(
    licence_lm: LicenceLM, tmp_path: Path, job: dict[str, Any], edit: dict[str, Any], message: str
) -> None:
    plan = _edited_plan(tmp_path, licence_lm, edit, **job)
    result = run_compress(plan, tmp_path, env=cpu_env())
    assert result.returncode == 2, result.stderr[-8000:]
    reason = termination_message(tmp_path)
    assert reason.startswith("InvalidInput: ")
    assert message in reason


def test_an_empty_calibration_set_exits_2(licence_lm: LicenceLM, tmp_path: Path) -> None:
    empty = write_jsonl(tmp_path / "data" / "empty.jsonl", [])
    plan = write_plan(
        tmp_path / "plan.json",
        compress_job(
            model_uri=uri(licence_lm.model),
            train_uri=uri(empty),
            eval_uri=uri(licence_lm.eval),
            output_uri=uri(tmp_path / "out"),
            quantization={"method": "gptq", "scheme": "W4A16"},
        ),
    )
    result = run_compress(plan, tmp_path, env=cpu_env())
    assert result.returncode == 2, result.stderr[-8000:]
    reason = termination_message(tmp_path)
    assert "cannot build the calibration and evaluation sets" in reason
    assert "empty.jsonl has no records" in reason
    assert not (tmp_path / "out" / "model").exists()
