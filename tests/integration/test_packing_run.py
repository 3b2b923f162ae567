"""A packed fine-tuning run end to end (two processes, ZeRO-2 on CPU): the same records as the
unpacked run in fewer batches with little padding, to a loss within a small tolerance of it."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest

from kubetune.trainer.tinymodel import build_tiny_causal_lm
from tests.integration.test_finetune_support import LETTERS, run_finetune, write_jsonl, write_plan

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EPOCHS = 3
# Records per process per step unpacked, windows packed: a 64-token window holds about four of
# these records, so both runs take about as many steps of about as many tokens.
BATCH = {False: 4, True: 1}
MAX_SEQ_LENGTH = 64
VOCABULARY = 300


def skewed_alphabet(count: int, seed: int = 0) -> list[str]:
    """The alphabet pattern in records of skewed lengths: most short, a few long."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        start, length = rng.randrange(len(LETTERS)), min(40, 2 + int(rng.paretovariate(1.2) * 3))
        texts.append(" ".join(LETTERS[(start + i) % len(LETTERS)] for i in range(length)))
    return texts


def train(tmp: Path, model: Path, data: Path, *, packing: bool) -> dict[str, Any]:
    """metrics.json of a run of EPOCHS epochs, packed or not."""
    output = tmp / ("packed" if packing else "padded")
    plan = write_plan(
        tmp / f"plan-{packing}.json",
        model_uri=model.as_uri(),
        train_uri=data.as_uri(),
        output_uri=output.as_uri(),
        dataset={"packing": packing},
        hyperparameters={
            "maxSteps": None,
            "epochs": EPOCHS,
            "perDeviceBatchSize": BATCH[packing],
            "maxSeqLength": MAX_SEQ_LENGTH,
            "loggingEverySteps": 1,
        },
        checkpoint={"everySteps": 1000},
    )
    run_finetune(plan, tmp, tag=f"packing-{packing}")
    metrics: dict[str, Any] = json.loads((output / "metrics.json").read_text())
    return metrics


def test_a_packed_run_trains_on_the_same_records_without_padding_to_the_same_loss(tmp_path: Path) -> None:
    texts = skewed_alphabet(160)
    model = build_tiny_causal_lm(
        tmp_path / "base",
        texts,
        vocab_size=VOCABULARY,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        max_position=64,
    )
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in texts])

    padded = train(tmp_path, model, data, packing=False)
    packed = train(tmp_path, model, data, packing=True)

    # Every record's tokens (tests/unit/test_packing.py counts the loss-bearing ones exactly),
    # and at most a few repeated windows: the dataloader fills each epoch's last batch of every
    # process with windows from the start, and windows do not divide as evenly as records.
    tokens, padded_tokens = packed["usage"]["train_tokens"], padded["usage"]["train_tokens"]
    assert padded_tokens <= tokens <= padded_tokens + EPOCHS * 2 * BATCH[True] * MAX_SEQ_LENGTH
    assert packed["usage"]["padding_share"] < padded["usage"]["padding_share"] / 4  # windows are nearly full
    assert padded["usage"]["padding_share"] > 0.2
    assert packed["usage"]["tokens_per_second"] > 0
    # About as many steps over the same data, to nearly the same held-out loss: both learn the
    # pattern (from the uniform guess's log(vocabulary), 5.7), within a tenth of that of each other.
    assert packed["global_step"] == pytest.approx(padded["global_step"], rel=0.3)
    assert max(packed["eval_loss"], padded["eval_loss"]) < 1.0
    assert abs(packed["eval_loss"] - padded["eval_loss"]) < 0.1 * math.log(VOCABULARY)
