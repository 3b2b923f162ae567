"""The DPO reference model, end to end: two processes under torchrun, DeepSpeed on CPU.

trl logs, for each held-out evaluation, the policy's mean log-likelihood of the chosen answers
(``eval_logps/chosen``) and the mean reward ``beta * (policy - reference)`` of the same answers
(``eval_rewards/chosen``). Together they give the reference's mean log-likelihood, which these
tests compare with the one computed here from the model that was meant to be the reference: that
is the check that the run used the right reference, and used it intact.

- Under ZeRO-3 the frozen copy of the base is partitioned across the ranks like the policy (trl
  runs it as a DeepSpeed inference engine); a SIGKILLed gang resumes to the exact step and the
  reference is still the base.
- ``method.dpo.referenceModel.uri`` names another model in object storage (the S3 test server):
  it is downloaded and used, not the base. The validation step refuses a reference that is missing
  (exit code 3) or has another vocabulary than the base (exit code 2), naming the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kubetune.storage import open_store
from kubetune.trainer import validate
from kubetune.trainer.tinymodel import build_tiny_causal_lm
from tests.integration.test_dpo_support import (
    LICENCE,
    answer_logprob,
    dpo_history,
    licence_pairs,
    split_pairs,
    tiny_licence_lm,
    write_pairs,
)
from tests.integration.test_finetune_support import launch, run_finetune, wait_for, write_plan
from tests.s3server import S3Bucket

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BETA = 0.1
# 24 held-out pairs in evaluation batches of 4 per process: three full batches of 8, so trl's mean of
# batch means is the mean over all pairs.
HELD_OUT = 24


def read_json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def mean_chosen_logprob(model_dir: Path, pairs: Sequence[dict[str, str]]) -> float:
    """The model's mean log-likelihood of the chosen answers, as trl sums it per answer."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return sum(answer_logprob(model, tokenizer, p["prompt"], p["chosen"]) for p in pairs) / len(pairs)


def sharpened(model_dir: Path, scale: float = 30.0) -> Path:
    """The model with its output layer scaled up: random tiny models predict nearly uniformly, so
    any two score text alike; this one is confident, and its log-likelihoods stand apart."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    model.save_pretrained(model_dir)
    return model_dir


def reference_logprobs(trainer_state: dict[str, Any]) -> dict[int, float]:
    """Step -> the reference's mean log-likelihood of the held-out chosen answers, from trl's logs."""
    policy = dpo_history(trainer_state, "eval_logps/chosen")
    rewards = dpo_history(trainer_state, "eval_rewards/chosen")
    return {step: policy[step] - rewards[step] / BETA for step in policy}


def dpo_plan(
    tmp: Path, *, model_uri: str, train_uri: str, eval_uri: str, output_uri: str, **spec: Any
) -> Path:
    return write_plan(
        tmp / "plan.json",
        model_uri=model_uri,
        train_uri=train_uri,
        output_uri=output_uri,
        dataset={"format": "preference", "evalFraction": None, "eval": {"uri": eval_uri}},
        hyperparameters={
            "maxSteps": 8,
            "maxSeqLength": 96,
            "learningRate": 0.005,
            "evalEverySteps": 4,
            "loggingEverySteps": 1,
        },
        checkpoint={"everySteps": 4, "keepLast": 2},
        **spec,
    )


def test_zero3_partitions_the_frozen_reference_and_a_killed_gang_resumes_with_it(tmp_path: Path) -> None:
    base = tiny_licence_lm(tmp_path)
    train, held_out = split_pairs(licence_pairs(), held_out=HELD_OUT)
    out = tmp_path / "out"
    plan = dpo_plan(
        tmp_path,
        model_uri=base.as_uri(),
        train_uri=write_pairs(tmp_path, train, "train").as_uri(),
        eval_uri=write_pairs(tmp_path, held_out, "eval").as_uri(),
        output_uri=out.as_uri(),
        method={"type": "full", "objective": "dpo", "dpo": {"beta": BETA}},
        deepspeed={"zeroStage": 3},
    )

    gang = launch(plan, tmp_path, tag="first")
    wait_for((out / "checkpoints" / "step-4" / "_COMMITTED.json").is_file, 240, "the step-4 commit", gang)
    gang.kill()
    run_finetune(plan, tmp_path, tag="second")

    record = read_json(out / "run.json")
    assert record["resumed_from"]["step"] == 4
    assert record["global_step"] == 8
    first = read_json(out / "checkpoints" / "step-4" / "trainer_state.json")
    # The first step compares the untrained policy with its reference, the same weights: the loss
    # is -log sigmoid(0) and the rewards are zero.
    step_one = next(e for e in first["log_history"] if e["step"] == 1 and "loss" in e)
    assert step_one["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert step_one["rewards/chosen"] == pytest.approx(0.0, abs=1e-4)
    # Before and after the restart, the partitioned reference is the base itself.
    expected = mean_chosen_logprob(base, held_out)
    final = read_json(out / "checkpoints" / "step-8" / "trainer_state.json")
    assert reference_logprobs(final) == {
        4: pytest.approx(expected, rel=1e-3),
        8: pytest.approx(expected, rel=1e-3),
    }
    assert dpo_history(final, "eval_rewards/margins")[8] > 0
    assert (out / "model" / "model.safetensors").is_file()  # gathered from the shards


def test_a_reference_model_uri_in_object_storage_is_the_reference(
    tmp_path: Path, s3_bucket: S3Bucket
) -> None:
    base = tiny_licence_lm(tmp_path)
    other = sharpened(tiny_licence_lm(tmp_path / "other", seed=1))  # same tokenizer, other weights
    train, held_out = split_pairs(licence_pairs(), held_out=HELD_OUT)
    store = open_store(s3_bucket.uri)
    store.upload_dir(base, f"{s3_bucket.uri}/models/base")
    store.upload_dir(other, f"{s3_bucket.uri}/models/sft")
    store.upload_file(write_pairs(tmp_path, train, "train"), f"{s3_bucket.uri}/data/train.jsonl")
    store.upload_file(write_pairs(tmp_path, held_out, "eval"), f"{s3_bucket.uri}/data/eval.jsonl")
    output = f"{s3_bucket.uri}/runs/dpo"
    reference = {"uri": f"{s3_bucket.uri}/models/sft"}
    plan = dpo_plan(
        tmp_path,
        model_uri=f"{s3_bucket.uri}/models/base",
        train_uri=f"{s3_bucket.uri}/data/train.jsonl",
        eval_uri=f"{s3_bucket.uri}/data/eval.jsonl",
        output_uri=output,
        method={"type": "full", "objective": "dpo", "dpo": {"beta": BETA, "referenceModel": reference}},
    )

    run_finetune(plan, tmp_path, env=s3_bucket.env())

    local = tmp_path / "downloaded"
    store.download_prefix(f"{output}/checkpoints/step-8", local)
    state = read_json(local / "trainer_state.json")
    expected, base_logprob = mean_chosen_logprob(other, held_out), mean_chosen_logprob(base, held_out)
    assert abs(expected - base_logprob) > 10.0  # the two models are told apart by this measure
    assert reference_logprobs(state) == {
        4: pytest.approx(expected, rel=1e-3),
        8: pytest.approx(expected, rel=1e-3),
    }
    # The policy starts from the base, not from the reference: rewards are not zero at step 1.
    step_one = next(e for e in state["log_history"] if e["step"] == 1 and "loss" in e)
    assert abs(step_one["rewards/chosen"]) > 1e-3


@pytest.mark.parametrize("problem", ["missing", "other vocabulary"])
def test_validation_refuses_a_reference_that_is_missing_or_has_another_vocabulary(
    tmp_path: Path, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tiny_licence_lm(tmp_path)
    reference = tmp_path / "sft"
    if problem == "other vocabulary":
        lines = [line for line in LICENCE.read_text(encoding="utf-8").splitlines() if line.strip()]
        build_tiny_causal_lm(reference, lines, vocab_size=300, hidden_size=48, num_layers=1, num_heads=2)
    train = write_pairs(tmp_path, licence_pairs()[:8], "train")
    plan = dpo_plan(
        tmp_path,
        model_uri=base.as_uri(),
        train_uri=train.as_uri(),
        eval_uri=train.as_uri(),
        output_uri=(tmp_path / "out").as_uri(),
        method={"type": "full", "objective": "dpo", "dpo": {"referenceModel": {"uri": reference.as_uri()}}},
    )

    code = validate.main(["--plan", str(plan), "--json"])

    out = capsys.readouterr().out
    report = json.loads(out[out.index("{") :])  # after DeepSpeed's accelerator line, if it imports now
    messages = [p["message"] for p in report["problems"] if p["kind"] == "reference-model"]
    where = f"method.dpo.referenceModel.uri {reference.as_uri()}"
    if problem == "missing":
        assert code == 3
        assert messages == [
            f"{where}: no objects found there; it must be a model directory with config.json, "
            "weights and the base model's tokenizer"
        ]
    else:
        assert code == 2
        assert messages == [
            f"{where}: its vocabulary has 300 tokens but the base model's has 400; the reference must "
            "share the base model's tokenizer"
        ]
