"""Helpers of the DPO tests (this module holds no tests): preference pairs from real text, a tiny
model that has read that text, and the log-likelihood comparison of chosen and rejected answers.

The pairs come from the Apache License 2.0 text kubetune ships (``kubetune/local/data``): each pair
is a window of the licence, its first words as the prompt, the rest in order as the chosen answer
and the same words shuffled as the rejected one. A model prefers the chosen answer exactly when it
has learnt something of English word order.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from kubetune.trainer.tinymodel import build_tiny_causal_lm
from tests.integration.test_finetune_support import write_jsonl

LICENCE = Path(__file__).resolve().parents[2] / "kubetune" / "local" / "data" / "apache-2.0.txt"
PROMPT_WORDS = 4
ANSWER_WORDS = 10


def licence_words() -> list[str]:
    return LICENCE.read_text(encoding="utf-8").split()


def shuffled(words: Sequence[str], rng: random.Random) -> list[str]:
    """``words`` in another order (never the same one: the pair would prefer nothing)."""
    out = list(words)
    while out == list(words):
        rng.shuffle(out)
    return out


def licence_pairs(*, stride: int = 7, seed: int = 0) -> list[dict[str, str]]:
    """Windows of the licence as text preference pairs (prompt, chosen, rejected)."""
    words = licence_words()
    rng = random.Random(seed)
    pairs = []
    size = PROMPT_WORDS + ANSWER_WORDS
    for start in range(0, len(words) - size, stride):
        prompt = words[start : start + PROMPT_WORDS]
        answer = words[start + PROMPT_WORDS : start + size]
        if len(set(answer)) < 3:
            continue
        pairs.append(
            {
                "prompt": " ".join(prompt),
                "chosen": " " + " ".join(answer),
                "rejected": " " + " ".join(shuffled(answer, rng)),
            }
        )
    return pairs


def split_pairs(pairs: list[dict[str, str]], held_out: int, seed: int = 1) -> tuple[list[Any], list[Any]]:
    rng = random.Random(seed)
    chosen = set(rng.sample(range(len(pairs)), held_out))
    return [p for i, p in enumerate(pairs) if i not in chosen], [
        p for i, p in enumerate(pairs) if i in chosen
    ]


def tiny_licence_lm(root: Path, *, seed: int = 0) -> Path:
    """A tiny Llama-style model whose tokenizer was trained on the licence (random weights)."""
    lines = [line.strip() for line in LICENCE.read_text(encoding="utf-8").splitlines() if line.strip()]
    return build_tiny_causal_lm(
        root / "base",
        lines,
        vocab_size=400,
        hidden_size=48,
        num_layers=2,
        num_heads=2,
        max_position=128,
        seed=seed,
    )


def write_pairs(root: Path, pairs: Sequence[dict[str, Any]], name: str) -> Path:
    return write_jsonl(root / "data" / f"{name}.jsonl", pairs)


def answer_logprob(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str
) -> float:
    """log p(answer | prompt), summed over the answer's tokens (EOS included, as DPO trains it)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    full = tokenizer(prompt + answer + (tokenizer.eos_token or ""))["input_ids"]
    ids = torch.tensor([full])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]
    logps = torch.log_softmax(logits.float(), dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return float(logps[len(prompt_ids) - 1 :].sum())


def preference_rate(
    model_dir: Path, pairs: Sequence[dict[str, str]], adapter_dir: Path | None = None
) -> float:
    """The share of pairs whose chosen answer the model finds more likely than the rejected one."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    wins = sum(
        answer_logprob(model, tokenizer, p["prompt"], p["chosen"])
        > answer_logprob(model, tokenizer, p["prompt"], p["rejected"])
        for p in pairs
    )
    return wins / len(pairs)


def dpo_history(trainer_state: dict[str, Any], key: str) -> dict[int, float]:
    """Step -> a logged DPO metric (``eval_rewards/accuracies``...), from trainer_state.json."""
    return {int(e["step"]): float(e[key]) for e in trainer_state["log_history"] if key in e}
