"""The compress runtime's pure parts: which plans it refuses and why, how a plan becomes an
llm-compressor recipe or a torchao config, the recipe file, the distillation loss, the student
derived from a teacher, and the measurements in the report."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from kubetune.api.resources import CompressJob, QuantizationMethod, QuantizationScheme
from kubetune.api.spec import TaskType
from kubetune.api.status import CompressionResults
from kubetune.errors import InvalidInputError
from kubetune.run.plan import RunPlan, plan_compress
from kubetune.trainer.compress import build_report, load_plan, results_summary
from kubetune.trainer.compress import recipes as r
from kubetune.trainer.compress.distill import derive_student, distillation_loss, kept_layers
from kubetune.trainer.compress.evaluate import (
    causal_lm_metrics,
    count_parameters,
    linear_weight_bytes,
    size_on_disk,
)
from kubetune.trainer.compress.examples import sample
from kubetune.trainer.tinymodel import build_tiny_causal_lm, sample_corpus

pytestmark = pytest.mark.unit


def plan(**spec: Any) -> RunPlan:
    body: dict[str, Any] = {
        "model": {"uri": "s3://models/base"},
        "dataset": {"train": {"uri": "s3://data/train.jsonl"}, "evalFraction": 0.1},
        "output": {"uri": "s3://runs/out"},
        **spec,
    }
    job = CompressJob.model_validate(
        {"apiVersion": "kubetune.io/v1alpha1", "kind": "CompressJob", "metadata": {"name": "c"}, "spec": body}
    )
    return plan_compress(job, model_uri="s3://models/base")


# --- which plans run -----------------------------------------------------------------------------


def test_steps_always_run_distill_then_prune_then_quantize() -> None:
    p = plan(
        quantization={"scheme": "W4A16"},
        pruning={"sparsity": 0.5},
        distillation={"student": {"layerStride": 2}, "hyperparameters": {"maxSteps": 10}},
    )
    assert p.compression is not None
    assert r.steps(p.compression) == ["distill", "prune", "quantize"]


@pytest.mark.parametrize(
    ("method", "scheme", "accepted"),
    [
        ("gptq", "W4A16", True),
        ("gptq", "W8A16", True),
        ("gptq", "W8A8", True),
        ("gptq", "FP8", False),  # FP8_DYNAMIC is data-free: rtn
        ("rtn", "W4A16", True),
        ("rtn", "W8A16", True),
        ("rtn", "W8A8", True),
        ("rtn", "FP8", True),
        ("smoothquant", "W8A8", True),
        ("torchao", "INT8_WEIGHT_ONLY", True),
        ("torchao", "INT8_DYNAMIC", True),
    ],
)
def test_the_runtime_runs_exactly_the_supported_method_scheme_pairs(
    method: str, scheme: str, accepted: bool
) -> None:
    if accepted:
        r.check_plan(plan(quantization={"method": method, "scheme": scheme}))
    else:
        # The API refuses the pair first, with the runtime's own words.
        with pytest.raises(
            ValueError, match=f"method {method} does not take scheme {scheme}.*use method rtn"
        ):
            plan(quantization={"method": method, "scheme": scheme})


def test_every_scheme_has_a_method_that_runs_it() -> None:
    runnable = {scheme for schemes in r.SUPPORTED_SCHEMES.values() for scheme in schemes}
    assert runnable == set(QuantizationScheme)
    assert set(r.SUPPORTED_SCHEMES) == set(QuantizationMethod)


def test_a_finetune_plan_is_not_a_compress_plan(tmp_path: Path) -> None:
    p = plan(quantization={"scheme": "W8A16"})
    stray = p.model_copy(update={"kind": "finetune"})
    path = tmp_path / "plan.json"
    path.write_text(stray.to_json())
    with pytest.raises(InvalidInputError, match="finetune plan, not a compress plan"):
        load_plan(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"scheme": "W3A5"}, r"compression\.quantization\.scheme: Input should be 'W4A16'"),
        ({"method": "awq"}, r"compression\.quantization\.method: Input should be 'gptq'"),
    ],
)
def test_a_plan_with_an_unknown_scheme_or_method_names_the_field(
    tmp_path: Path, change: dict[str, str], message: str
) -> None:
    raw = json.loads(plan(quantization={"scheme": "W8A16"}).to_json())
    raw["compression"]["quantization"].update(change)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(InvalidInputError, match=message):
        load_plan(path)


@pytest.mark.parametrize("sparsity", [0.0, 1.0, 1.5, -0.1])
def test_a_plan_with_sparsity_outside_0_1_is_refused(tmp_path: Path, sparsity: float) -> None:
    raw = json.loads(plan(pruning={"sparsity": 0.5}).to_json())
    raw["compression"]["pruning"]["sparsity"] = sparsity
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(
        InvalidInputError, match=r"compression\.pruning\.sparsity: Input should be (greater|less) than"
    ):
        load_plan(path)


def test_fp8_on_a_cpu_fails_fast_and_says_what_would_work() -> None:
    p = plan(quantization={"method": "rtn", "scheme": "FP8"})
    assert p.compression is not None
    with pytest.raises(InvalidInputError, match=r"FP8 needs a GPU with FP8 support.*CPU only.*W8A16"):
        r.check_hardware(p.compression, r.Hardware("cpu"))


def test_fp8_on_a_pre_ada_gpu_names_the_gpu_and_its_capability() -> None:
    p = plan(quantization={"method": "rtn", "scheme": "FP8"})
    assert p.compression is not None
    with pytest.raises(InvalidInputError, match=r"NVIDIA A100-SXM4-40GB \(compute capability 8\.0\)"):
        r.check_hardware(p.compression, r.Hardware("cuda", "NVIDIA A100-SXM4-40GB", (8, 0)))
    r.check_hardware(p.compression, r.Hardware("cuda", "NVIDIA L4", (8, 9)))
    r.check_hardware(p.compression, r.Hardware("cuda", "NVIDIA H100 80GB HBM3", (9, 0)))


def test_other_schemes_run_on_a_cpu() -> None:
    for scheme in ("W4A16", "W8A16", "W8A8"):
        p = plan(quantization={"method": "rtn", "scheme": scheme})
        assert p.compression is not None
        r.check_hardware(p.compression, r.Hardware("cpu"))


# --- recipes -------------------------------------------------------------------------------------


def _weights(modifier: Any) -> dict[str, Any]:
    group = modifier.config_groups["group_0"]
    weights = group["weights"] if isinstance(group, dict) else group.weights
    return dict(weights) if isinstance(weights, dict) else weights.model_dump()


def test_gptq_w4a16_is_a_group_wise_4_bit_gptq_recipe_that_keeps_the_head() -> None:
    from llmcompressor.modifiers.quantization import GPTQModifier

    p = plan(quantization={"method": "gptq", "scheme": "W4A16", "groupSize": 64})
    assert p.compression is not None
    [modifier] = r.llmcompressor_modifiers(p.compression)
    assert isinstance(modifier, GPTQModifier)
    weights = _weights(modifier)
    assert (weights["num_bits"], weights["strategy"], weights["group_size"], weights["symmetric"]) == (
        4,
        "group",
        64,
        True,
    )
    assert "lm_head" in modifier.ignore
    assert r.needs_calibration(p.compression)


def test_rtn_needs_no_calibration_data_and_w8a8_quantizes_activations_dynamically() -> None:
    from llmcompressor.modifiers.quantization import QuantizationModifier

    p = plan(quantization={"method": "rtn", "scheme": "W8A8"})
    assert p.compression is not None
    [modifier] = r.llmcompressor_modifiers(p.compression)
    assert isinstance(modifier, QuantizationModifier)
    assert not r.needs_calibration(p.compression)
    scheme = r.quantization_scheme(p.compression.quantization)  # type: ignore[arg-type]
    assert scheme["input_activations"]["num_bits"] == 8
    assert scheme["input_activations"]["dynamic"] is True
    assert scheme["weights"]["strategy"] == "channel"


def test_fp8_is_fp8_dynamic() -> None:
    p = plan(quantization={"method": "rtn", "scheme": "FP8"})
    assert p.compression is not None
    scheme = r.quantization_scheme(p.compression.quantization)  # type: ignore[arg-type]
    assert scheme["weights"]["type"] == scheme["input_activations"]["type"] == "float"
    assert scheme["input_activations"]["dynamic"] is True


def test_smoothquant_smooths_then_runs_gptq_w8a8() -> None:
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    p = plan(quantization={"method": "smoothquant", "scheme": "W8A8"})
    assert p.compression is not None
    smoothing, gptq = r.llmcompressor_modifiers(p.compression)
    assert isinstance(smoothing, SmoothQuantModifier)
    assert smoothing.smoothing_strength == r.SMOOTHING_STRENGTH
    assert isinstance(gptq, GPTQModifier)


@pytest.mark.parametrize(("pattern", "structure"), [("unstructured", "0:0"), ("2:4", "2:4")])
def test_sparsegpt_and_wanda_prune_every_linear_layer_but_the_heads(pattern: str, structure: str) -> None:
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    for method, kind in (("sparsegpt", SparseGPTModifier), ("wanda", WandaPruningModifier)):
        p = plan(pruning={"method": method, "sparsity": 0.5, "pattern": pattern})
        assert p.compression is not None
        [modifier] = r.llmcompressor_modifiers(p.compression)
        assert isinstance(modifier, kind)
        assert (modifier.sparsity, modifier.mask_structure) == (0.5, structure)
        assert "re:.*lm_head$" in modifier.ignore
        assert r.needs_calibration(p.compression)


def test_pruning_then_gptq_quantizes_round_to_nearest_in_the_same_recipe() -> None:
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    p = plan(pruning={"sparsity": 0.5, "pattern": "2:4"}, quantization={"method": "gptq", "scheme": "W4A16"})
    assert p.compression is not None
    prune, quantize = r.llmcompressor_modifiers(p.compression)
    assert isinstance(prune, SparseGPTModifier)
    assert type(quantize) is QuantizationModifier  # GPTQ's updates would move pruned weights off zero
    assert r.quantization_after_pruning(p.compression) == QuantizationMethod.rtn


def test_magnitude_pruning_needs_no_data_and_zeroes_the_smallest_weights() -> None:
    p = plan(pruning={"method": "magnitude", "sparsity": 0.25})
    assert p.compression is not None
    assert p.compression.pruning is not None
    assert r.llmcompressor_modifiers(p.compression) == []
    assert not r.needs_calibration(p.compression)
    model = torch.nn.Module()
    model.body = torch.nn.Linear(8, 4, bias=False)
    model.lm_head = torch.nn.Linear(4, 8, bias=False)
    with torch.no_grad():
        model.body.weight.copy_(torch.arange(1, 33, dtype=torch.float32).reshape(4, 8))
    head_before = model.lm_head.weight.clone()
    assert r.magnitude_prune(model, p.compression.pruning) == 8
    assert torch.equal(model.body.weight.flatten()[:8], torch.zeros(8))  # the 8 smallest of 32
    assert torch.equal(model.lm_head.weight, head_before)


def test_magnitude_2_4_keeps_the_two_largest_of_every_four() -> None:
    p = plan(pruning={"method": "magnitude", "sparsity": 0.5, "pattern": "2:4"})
    assert p.compression is not None
    assert p.compression.pruning is not None
    layer = torch.nn.Linear(8, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -4.0, 3.0, 2.0, 0.5, 0.125, -0.75, 0.25]]))
    model = torch.nn.Sequential(layer)
    r.magnitude_prune(model, p.compression.pruning)
    assert layer.weight.tolist() == [[0.0, -4.0, 3.0, 0.0, 0.5, 0.0, -0.75, 0.0]]


def test_group_size_must_divide_every_quantized_layer(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.Linear(64, 8))
    p = plan(quantization={"scheme": "W4A16", "groupSize": 64, "ignore": []})
    assert p.compression is not None
    with pytest.raises(
        InvalidInputError, match=r"groupSize 64 does not divide the input width of 0 \(96 inputs\)"
    ):
        r.check_group_size(model, p.compression)
    ok = plan(quantization={"scheme": "W4A16", "groupSize": 32, "ignore": []})
    assert ok.compression is not None
    r.check_group_size(model, ok.compression)


def test_torchao_schemes_map_to_their_configs() -> None:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    for scheme, kind in (
        ("INT8_WEIGHT_ONLY", Int8WeightOnlyConfig),
        ("INT8_DYNAMIC", Int8DynamicActivationInt8WeightConfig),
    ):
        p = plan(quantization={"method": "torchao", "scheme": scheme})
        assert p.compression is not None
        assert p.compression.quantization is not None
        assert isinstance(r.torchao_config(p.compression.quantization), kind)
        assert not r.uses_llmcompressor(p.compression)


def test_the_recipe_file_is_plain_yaml_with_the_llmcompressor_recipe_verbatim() -> None:
    from llmcompressor.recipe import Recipe

    p = plan(pruning={"sparsity": 0.5}, quantization={"method": "rtn", "scheme": "W8A16"})
    assert p.compression is not None
    text = r.llmcompressor_recipe_yaml(r.llmcompressor_modifiers(p.compression))
    document = r.recipe_document([{"step": "prune+quantize", "tool": "llmcompressor", "recipe": text}])
    loaded = yaml.safe_load(document)
    assert loaded["kubetune_recipe_version"] == 1
    assert loaded["steps"][0]["recipe"] == text
    assert "\n  recipe: |\n" in document
    reread = Recipe.create_instance(text)
    assert [type(m).__name__ for m in reread.modifiers] == ["SparseGPTModifier", "QuantizationModifier"]


# --- distillation --------------------------------------------------------------------------------


def test_the_kd_loss_is_zero_when_student_and_teacher_agree_and_ignores_unlabelled_positions() -> None:
    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 11)
    labels = torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 7, 8]])
    assert distillation_loss(
        teacher.clone(), teacher, labels, temperature=2.0, causal=True
    ).item() == pytest.approx(0.0, abs=1e-6)
    student = torch.randn(2, 5, 11)
    loss = distillation_loss(student, teacher, labels, temperature=2.0, causal=True)
    assert loss.item() > 0
    # Position 2 of row 0 predicts an unlabelled token, and the last position predicts nothing.
    changed = student.clone()
    changed[0, 2] += 5.0
    changed[:, 4] += 5.0
    assert distillation_loss(changed, teacher, labels, temperature=2.0, causal=True).item() == pytest.approx(
        loss.item()
    )


def test_the_kd_loss_is_t_squared_times_the_mean_kl_at_temperature_t() -> None:
    torch.manual_seed(1)
    student, teacher = torch.randn(3, 4), torch.randn(3, 4)
    t = 3.0
    p_teacher = torch.softmax(teacher / t, dim=-1)
    expected = (p_teacher * (p_teacher.log() - torch.log_softmax(student / t, dim=-1))).sum(-1).mean() * t * t
    got = distillation_loss(student, teacher, torch.zeros(3, dtype=torch.long), temperature=t, causal=False)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_stride_keeps_every_kth_layer_from_the_first() -> None:
    assert kept_layers(4, 2) == [0, 2]
    assert kept_layers(5, 2) == [0, 2, 4]
    assert kept_layers(6, 3) == [0, 3]


def test_a_derived_student_carries_the_teachers_kept_layers_and_generates(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher_dir = build_tiny_causal_lm(tmp_path / "teacher", sample_corpus(200), num_layers=4, hidden_size=32)
    assert derive_student(teacher_dir, 2, TaskType.causal_lm, tmp_path / "student") == [0, 2]
    teacher: Any = AutoModelForCausalLM.from_pretrained(teacher_dir)
    student: Any = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert student.config.num_hidden_layers == 2
    for new, old in ((0, 0), (1, 2)):
        for (name, a), (_, b) in zip(
            student.model.layers[new].named_parameters(),
            teacher.model.layers[old].named_parameters(),
            strict=True,
        ):
            assert torch.equal(a, b), name
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "student")
    batch = tokenizer(["the licence"], return_tensors="pt")
    out = student.generate(
        **batch, max_new_tokens=4, do_sample=False
    )  # uses the KV cache: layer numbers must fit
    assert out.shape[1] == batch["input_ids"].shape[1] + 4


def test_a_stride_that_keeps_every_layer_is_refused(tmp_path: Path) -> None:
    teacher_dir = build_tiny_causal_lm(tmp_path / "teacher", sample_corpus(100), num_layers=1, hidden_size=32)
    with pytest.raises(InvalidInputError, match="layerStride 2 keeps all 1 layers"):
        derive_student(teacher_dir, 2, TaskType.causal_lm, tmp_path / "student")


# --- measurements --------------------------------------------------------------------------------


def test_perplexity_is_the_token_weighted_next_token_nll(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model_dir = build_tiny_causal_lm(tmp_path / "m", sample_corpus(100), hidden_size=32)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir)
    examples = [
        {"input_ids": [5, 6, 7, 8], "attention_mask": [1, 1, 1, 1], "labels": [5, 6, 7, 8]},
        {"input_ids": [9, 10], "attention_mask": [1, 1], "labels": [-100, 10]},
    ]
    metrics, tokens = causal_lm_metrics(model, examples, pad_id=0, device="cpu", batch_size=2)
    with torch.no_grad():
        a = model(input_ids=torch.tensor([[5, 6, 7, 8]]), labels=torch.tensor([[5, 6, 7, 8]])).loss.item()
        b = model(input_ids=torch.tensor([[9, 10]]), labels=torch.tensor([[-100, 10]])).loss.item()
    assert tokens == 4
    assert metrics["eval_loss"] == pytest.approx((3 * a + b) / 4, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))


def test_sizes_count_weight_files_and_the_targeted_linear_tensors(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model_dir = build_tiny_causal_lm(tmp_path / "m", sample_corpus(100), hidden_size=32, num_layers=1)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir)
    assert size_on_disk(model_dir) == (model_dir / "model.safetensors").stat().st_size
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"]
    expected = sum(model.get_submodule(n).weight.numel() * 4 for n in names)  # fp32
    assert linear_weight_bytes(model_dir, names) == expected
    parameters, nonzero = count_parameters(model)
    assert parameters == sum(p.numel() for p in model.parameters())
    assert nonzero <= parameters


def test_calibration_samples_are_a_seeded_choice_in_data_order() -> None:
    examples = [{"input_ids": [i, i]} for i in range(100)]
    chosen = sample(examples, 10, seed=3)
    assert chosen == sample(examples, 10, seed=3)
    assert [e["input_ids"][0] for e in chosen] == sorted(e["input_ids"][0] for e in chosen)
    assert sample(examples[:5], 10, seed=3) == examples[:5]


def test_the_report_headline_maps_onto_the_compressjob_status_results() -> None:
    p = plan(quantization={"scheme": "W4A16"})
    side = {"size_bytes": 400, "parameters": 10, "nonzero_parameters": 10, "linear_weight_bytes": 300}
    report = build_report(
        p,
        original={**side, "metrics": {"perplexity": 10.0, "eval_loss": math.log(10)}},
        compressed={
            **side,
            "size_bytes": 100,
            "linear_weight_bytes": 75,
            "metrics": {"perplexity": 11.0, "eval_loss": math.log(11)},
        },
        entries=[],
        evaluation={},
        timings={},
    )
    assert report["size_ratio"] == 4.0
    assert report["linear_weight_ratio"] == 4.0
    assert report["quality_delta"]["perplexity"] == pytest.approx(1.0)
    assert report["quality_delta_relative"]["perplexity"] == pytest.approx(0.1)
    results = CompressionResults.model_validate(results_summary(report))
    assert results.original_size_bytes == 400
    assert results.compressed_size_bytes == 100
    assert results.size_ratio == 4.0
    assert results.metrics_after == {"perplexity": 11.0, "eval_loss": pytest.approx(math.log(11))}
