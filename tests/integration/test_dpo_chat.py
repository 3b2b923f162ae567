"""Preference pairs in conversation form: the prompt is a list of messages, chosen and rejected are
the assistant's turn (text or assistant messages), rendered with the tokenizer's chat template.

- The validation step (``python -m kubetune.trainer validate``, as the operator's Job runs it)
  names every bad record with its file and line: an answer holding a user turn, an answer given as
  messages to a text prompt, a conversation whose prompt fills maxSeqLength, and conversation pairs
  for a tokenizer without a chat template.
- A LoRA DPO run (two processes, ZeRO-2) trains on the rendered conversations: the reference's
  log-likelihood of the held-out chosen turns that trl logs is the base model's log-likelihood of
  those turns rendered with the chat template, so the template is what the pairs went through.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from tests.integration.test_dpo_support import dpo_history, licence_pairs, split_pairs, tiny_licence_lm
from tests.integration.test_finetune_support import run_finetune, write_jsonl, write_plan
from tests.integration.test_validate import run_validate

pytestmark = pytest.mark.integration

BETA = 0.1
HELD_OUT = 24  # three evaluation batches of 4 per process: trl's mean of batch means is the mean


def chat_pairs(pairs: Sequence[dict[str, str]]) -> list[dict[str, Any]]:
    """The licence pairs as conversations; every other pair gives its answers as assistant messages."""
    out: list[dict[str, Any]] = []
    for i, pair in enumerate(pairs):
        chosen, rejected = pair["chosen"].strip(), pair["rejected"].strip()
        if i % 2:
            chosen_turn: Any = [{"role": "assistant", "content": chosen}]
            rejected_turn: Any = [{"role": "assistant", "content": rejected}]
        else:
            chosen_turn, rejected_turn = chosen, rejected
        prompt = [{"role": "user", "content": pair["prompt"]}]
        out.append({"prompt": prompt, "chosen": chosen_turn, "rejected": rejected_turn})
    return out


def _ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], **kwargs: Any) -> list[int]:
    encoded: Any = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    return list(encoded["input_ids"])


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def chosen_turn_logprob(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, pair: dict[str, Any]
) -> float:
    """log p(chosen turn | prompt) with both rendered by the chat template, summed over the tokens
    the turn adds after the generation prompt (its text and end-of-turn marker)."""

    def turn(answer: Any) -> list[dict[str, str]]:
        return [{"role": "assistant", "content": answer}] if isinstance(answer, str) else list(answer)

    prompt = _ids(tokenizer, pair["prompt"], add_generation_prompt=True)
    chosen = _ids(tokenizer, pair["prompt"] + turn(pair["chosen"]))
    rejected = _ids(tokenizer, pair["prompt"] + turn(pair["rejected"]))
    start = min(_common_prefix(prompt, chosen), _common_prefix(prompt, rejected))
    ids = torch.tensor([chosen])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]
    logps = torch.log_softmax(logits.float(), dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return float(logps[start - 1 :].sum())


def read_json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def validate_plan(tmp: Path, model: Path, train: Path, *, max_seq_length: int = 96) -> Path:
    return write_plan(
        tmp / "plan.json",
        model_uri=model.as_uri(),
        train_uri=train.as_uri(),
        output_uri=(tmp / "out").as_uri(),
        dataset={"format": "preference", "evalFraction": None},
        method={"type": "lora", "objective": "dpo"},
        hyperparameters={"maxSeqLength": max_seq_length},
    )


def test_validation_names_each_bad_conversation_pair_with_file_and_line(tmp_path: Path) -> None:
    model = tiny_licence_lm(tmp_path)
    user = {"role": "user", "content": "Grant of"}
    long_user = {"role": "user", "content": " ".join(["licence"] * 80)}
    train = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": [user], "chosen": "Copyright License.", "rejected": "License. Copyright"},
            {"prompt": [user], "chosen": [{"role": "user", "content": "x"}], "rejected": "License."},
            {"prompt": [user], "chosen": [{"role": "assistant", "content": "  "}], "rejected": "License."},
            {"prompt": [user], "chosen": "Same", "rejected": [{"role": "assistant", "content": "Same"}]},
            {"prompt": [long_user], "chosen": "Copyright License.", "rejected": "License. Copyright"},
            {"prompt": "Grant of", "chosen": [{"role": "assistant", "content": "x"}], "rejected": "y"},
        ],
    )
    uri = train.as_uri()

    code, out, message = run_validate(validate_plan(tmp_path, model, train, max_seq_length=48), tmp_path)

    assert code == 2, out
    assert f"{uri}:2: field 'chosen': message 0 has role 'user'; an answer holds assistant turns only" in out
    assert f"{uri}:3: field 'chosen' has only empty assistant messages" in out
    assert f"{uri}:4: fields 'chosen' and 'rejected' are identical, so the pair prefers nothing" in out
    assert re.search(rf"{re.escape(uri)}:5: the prompt is \d+ tokens, which fills maxSeqLength 48", out)
    assert f"{uri}:6: field 'chosen' is a list of messages but the prompt is text" in out
    assert "problems (5):" in out
    assert message.startswith(f"validation failed with 5 problems: {uri}:2: ")


def test_conversation_pairs_need_a_tokenizer_with_a_chat_template(tmp_path: Path) -> None:
    model = tiny_licence_lm(tmp_path)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    pairs = chat_pairs(licence_pairs()[:3])
    train = write_jsonl(tmp_path / "pairs.jsonl", pairs)

    code, out, _ = run_validate(validate_plan(tmp_path, model, train), tmp_path)

    assert code == 2, out
    assert (
        f"{train.as_uri()}:1: a conversation needs the tokenizer's chat template, and this model's "
        "tokenizer has none" in out
    )


@pytest.mark.slow
def test_lora_dpo_on_conversations_trains_on_the_chat_template_rendering(tmp_path: Path) -> None:
    base = tiny_licence_lm(tmp_path)
    train, held_out = split_pairs(chat_pairs(licence_pairs()), held_out=HELD_OUT)
    out = tmp_path / "out"
    plan = write_plan(
        tmp_path / "plan.json",
        model_uri=base.as_uri(),
        train_uri=write_jsonl(tmp_path / "data" / "train.jsonl", train).as_uri(),
        output_uri=out.as_uri(),
        dataset={
            "format": "preference",
            "evalFraction": None,
            "eval": {"uri": write_jsonl(tmp_path / "data" / "eval.jsonl", held_out).as_uri()},
        },
        method={
            "type": "lora",
            "objective": "dpo",
            "dpo": {"beta": BETA},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        },
        hyperparameters={
            "maxSteps": 8,
            "maxSeqLength": 128,  # every rendered pair fits: none is truncated
            "learningRate": 0.01,
            "evalEverySteps": 8,
            "loggingEverySteps": 1,
        },
        checkpoint={"everySteps": 8, "keepLast": 1},
    )

    run_finetune(plan, tmp_path)

    metrics = read_json(out / "metrics.json")
    assert metrics["objective"] == "dpo"
    assert metrics["global_step"] == 8
    state = read_json(out / "checkpoints" / "step-8" / "trainer_state.json")
    step_one = next(e for e in state["log_history"] if e["step"] == 1 and "loss" in e)
    assert step_one["loss"] == pytest.approx(math.log(2), abs=1e-4)  # the adapters start at zero
    # The reference is the base with the adapters off, scoring the chat-template rendering.
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    expected = sum(chosen_turn_logprob(model, tokenizer, p) for p in held_out) / len(held_out)
    policy = dpo_history(state, "eval_logps/chosen")[8]
    rewards = dpo_history(state, "eval_rewards/chosen")[8]
    assert policy - rewards / BETA == pytest.approx(expected, rel=1e-3)
    assert (out / "adapter" / "adapter_config.json").is_file()
