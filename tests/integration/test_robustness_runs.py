"""Robustness options under DeepSpeed ZeRO-2 with two processes (CPU, gloo, tiny models).

Each option runs beside the same run without it at a learning rate too small to move the
weights, so both runs see the same weights and the same batches at every step: the training
losses differ only by the option, and the evaluations (which must not see it) are equal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_finetune_support import (
    alphabet_texts,
    run_finetune,
    tiny_causal_lm,
    write_jsonl,
    write_plan,
)
from tests.tinymodels import build_tiny_classifier

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 3
STILL = 1e-9  # learning rate: Adam moves each weight by about this much per step


def history(output: Path) -> list[dict[str, Any]]:
    state = json.loads((output / "checkpoints" / f"step-{STEPS}" / "trainer_state.json").read_text())
    entries: list[dict[str, Any]] = state["log_history"]
    return entries


def by_step(entries: list[dict[str, Any]], key: str) -> dict[int, float]:
    return {int(e["step"]): float(e[key]) for e in entries if key in e}


def run(tmp: Path, name: str, **spec: Any) -> list[dict[str, Any]]:
    output = tmp / name
    plan = write_plan(tmp / f"{name}.json", output_uri=output.as_uri(), **spec)
    run_finetune(plan, tmp, tag=name)
    return history(output)


def common(hyperparameters: dict[str, Any]) -> dict[str, Any]:
    return {
        "hyperparameters": {
            "maxSteps": STEPS,
            "learningRate": STILL,
            "loggingEverySteps": 1,
            "evalEverySteps": 1,
            **hyperparameters,
        },
        "checkpoint": {"everySteps": STEPS},
    }


def test_neftune_noise_changes_the_training_loss_and_never_the_evaluation(tmp_path: Path) -> None:
    model, data = tiny_causal_lm(tmp_path)
    sources = {"model_uri": model.as_uri(), "train_uri": data.as_uri()}
    plain = run(tmp_path, "plain", **sources, **common({}))
    noisy = run(tmp_path, "neftune", **sources, **common({"robustness": {"neftuneAlpha": 50.0}}))

    plain_loss, noisy_loss = by_step(plain, "loss"), by_step(noisy, "loss")
    assert set(noisy_loss) == set(plain_loss) == set(range(1, STEPS + 1))
    assert all(abs(noisy_loss[s] - plain_loss[s]) > 1e-3 for s in plain_loss), (plain_loss, noisy_loss)
    plain_eval, noisy_eval = by_step(plain, "eval_loss"), by_step(noisy, "eval_loss")
    assert noisy_eval == pytest.approx(plain_eval, rel=1e-6)
    assert len(noisy_eval) == STEPS


def test_adversarial_training_adds_the_logged_adversarial_loss_to_the_clean_loss(tmp_path: Path) -> None:
    positive = alphabet_texts(48, seed=1)
    negative = [" ".join(reversed(t.split())) for t in alphabet_texts(48, seed=2)]
    model = build_tiny_classifier(
        tmp_path / "classifier",
        positive + negative,
        2,
        vocab_size=300,
        hidden_size=32,
        num_heads=2,
        max_position=64,
    )
    records = [{"text": t, "label": 1} for t in positive] + [{"text": t, "label": 0} for t in negative]
    data = write_jsonl(tmp_path / "train.jsonl", records)
    sources = {
        "model_uri": model.as_uri(),
        "train_uri": data.as_uri(),
        "task": {"type": "sequence-classification", "numLabels": 2},
        "dataset": {"format": "classification"},
    }
    plain = run(tmp_path, "plain", **sources, **common({}))
    adversarial = run(
        tmp_path, "adversarial", **sources, **common({"robustness": {"adversarial": {"epsilon": 1.0}}})
    )

    clean, total, added = (
        by_step(plain, "loss"),
        by_step(adversarial, "loss"),
        by_step(adversarial, "adversarial_loss"),
    )
    assert set(added) == set(total) == set(clean) == set(range(1, STEPS + 1))
    for step in clean:
        # The perturbation goes up the loss's gradient, so the perturbed batch costs more.
        assert added[step] > clean[step]
        assert total[step] == pytest.approx(clean[step] + added[step], abs=1e-3)
    # Evaluation scores the clean inputs only.
    assert by_step(adversarial, "eval_loss") == pytest.approx(by_step(plain, "eval_loss"), rel=1e-6)
    assert "adversarial_loss" not in {k for e in adversarial if "eval_loss" in e for k in e}
