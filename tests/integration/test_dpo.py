"""Preference tuning end to end: ``python -m kubetune.trainer finetune`` with ``objective: dpo``,
two processes under torchrun, DeepSpeed ZeRO-2 on CPU, on pairs from the Apache licence text
(the passage in order is chosen, its words shuffled rejected; see test_dpo_support).

What a user is promised: the held-out reward accuracy rises well above chance and the margin grows,
the saved model prefers the chosen answer more often than the base did, the outputs have the
layout serving reads, and a SIGKILLed gang resumes from its committed checkpoint to the exact step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_dpo_support import (
    dpo_history,
    licence_pairs,
    preference_rate,
    split_pairs,
    tiny_licence_lm,
    write_pairs,
)
from tests.integration.test_finetune_support import launch, run_finetune, wait_for, write_plan

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 24


def dpo_plan(
    tmp: Path, method: dict[str, Any], *, learning_rate: float, **overrides: Any
) -> tuple[Path, list[Any]]:
    model = tiny_licence_lm(tmp)
    train, held_out = split_pairs(licence_pairs(), held_out=24)
    plan = write_plan(
        tmp / "plan.json",
        model_uri=model.as_uri(),
        train_uri=write_pairs(tmp, train, "train").as_uri(),
        output_uri=(tmp / "out").as_uri(),
        dataset={
            "format": "preference",
            "evalFraction": None,
            "eval": {"uri": write_pairs(tmp, held_out, "eval").as_uri()},
        },
        method={**method, "objective": "dpo"},
        hyperparameters={
            "maxSteps": STEPS,
            "maxSeqLength": 96,
            "learningRate": learning_rate,
            "evalEverySteps": 12,
        },
        checkpoint={"everySteps": 12, "keepLast": 2},
        **overrides,
    )
    return plan, held_out


def read_json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def test_full_dpo_learns_the_preference_and_the_saved_model_prefers_chosen(tmp_path: Path) -> None:
    plan, held_out = dpo_plan(tmp_path, {"type": "full", "dpo": {"beta": 0.1}}, learning_rate=0.005)
    base_rate = preference_rate(tmp_path / "base", held_out)

    run_finetune(plan, tmp_path)

    out = tmp_path / "out"
    metrics = read_json(out / "metrics.json")
    assert metrics["objective"] == "dpo"
    assert metrics["global_step"] == STEPS
    assert metrics["eval_rewards/accuracies"] >= 0.65  # 24 held-out pairs; chance is 0.5
    margins = dpo_history(
        read_json(out / "checkpoints" / f"step-{STEPS}" / "trainer_state.json"), "eval_rewards/margins"
    )
    assert list(margins) == [12, STEPS]
    assert 0 < margins[12] < margins[STEPS]  # the policy starts as the reference: margin 0
    # The model serving would load: a plain model directory, preferring chosen more than the base.
    assert preference_rate(out / "model", held_out) > base_rate


def test_lora_dpo_keeps_the_base_as_reference_and_writes_the_served_layout(tmp_path: Path) -> None:
    plan, held_out = dpo_plan(
        tmp_path,
        {"type": "lora", "dpo": {"beta": 0.5}, "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
        learning_rate=0.01,
    )
    base_rate = preference_rate(tmp_path / "base", held_out)

    run_finetune(plan, tmp_path)

    out = tmp_path / "out"
    metrics = read_json(out / "metrics.json")
    assert metrics["global_step"] == STEPS
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "model" / "config.json").is_file()  # merged: what the server loads
    assert metrics["eval_rewards/accuracies"] > 0.5
    margins = dpo_history(
        read_json(out / "checkpoints" / f"step-{STEPS}" / "trainer_state.json"), "eval_rewards/margins"
    )
    assert 0 < margins[12] < margins[STEPS]
    assert preference_rate(out / "model", held_out) > base_rate
    assert preference_rate(tmp_path / "base", held_out, adapter_dir=out / "adapter") == preference_rate(
        out / "model", held_out
    )


def test_a_killed_dpo_gang_resumes_from_its_committed_checkpoint_to_the_exact_step(tmp_path: Path) -> None:
    plan, _ = dpo_plan(tmp_path, {"type": "full"}, learning_rate=0.005)
    committed = tmp_path / "out" / "checkpoints" / "step-12" / "_COMMITTED.json"

    gang = launch(plan, tmp_path, tag="first")
    wait_for(committed.is_file, 240, "the step-12 commit", gang)
    gang.kill()
    assert not (tmp_path / "out" / "metrics.json").exists()

    run_finetune(plan, tmp_path, tag="second")

    record = read_json(tmp_path / "out" / "run.json")
    assert record["resumed_from"]["step"] == 12
    assert record["global_step"] == STEPS
    assert read_json(tmp_path / "out" / "metrics.json")["global_step"] == STEPS
