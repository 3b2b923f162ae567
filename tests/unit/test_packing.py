"""Sample packing (``dataset.packing``): windows of whole records, the same loss-bearing tokens as
without packing, loss masks that stay inside their record, and records that do not attend to
each other (sdpa on CPU, the attention the tests run)."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from kubetune.api.resources import FineTuneJob
from kubetune.errors import InvalidInputError
from kubetune.run.plan import RunPlan, plan_finetune
from kubetune.trainer.data.collation import PreparedData, make_collator, prepare_datasets
from kubetune.trainer.data.formats import IGNORE_INDEX, render_instruction_prompt
from kubetune.trainer.data.packing import loss_tokens, packs
from kubetune.trainer.tinymodel import build_tiny_causal_lm, sample_corpus

pytestmark = pytest.mark.unit

MAX_SEQ_LENGTH = 128
BATCH = 4
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "small",
    "birds",
    "sing",
]


def skewed_texts(count: int, seed: int = 0) -> list[str]:
    """Mostly short records with a long tail, as instruction and chat data usually are."""
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(min(14, int(rng.paretovariate(1.3))))) for _ in range(count)
    ]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The instruction template in the corpus, so the tiny tokenizer spends few tokens on it.
    corpus = sample_corpus(200) + skewed_texts(50) + [render_instruction_prompt(t) for t in WORDS] * 20
    return build_tiny_causal_lm(
        tmp_path_factory.mktemp("packing") / "model", corpus, vocab_size=300, hidden_size=32, num_heads=2
    )


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> PreTrainedTokenizerFast:
    loaded: PreTrainedTokenizerFast = PreTrainedTokenizerFast.from_pretrained(model_dir)
    return loaded


def records_for(fmt: str, count: int = 40) -> list[dict[str, Any]]:
    texts = skewed_texts(2 * count, seed=1)
    if fmt == "text":
        return [{"text": t} for t in texts[:count]]
    if fmt == "instruction":
        return [{"prompt": a, "response": b or "yes"} for a, b in zip(texts[::2], texts[1::2], strict=True)]
    return [
        {"messages": [{"role": "user", "content": a}, {"role": "assistant", "content": b or "yes"}]}
        for a, b in zip(texts[::2], texts[1::2], strict=True)
    ]


def plan_for(tmp: Path, fmt: str, *, packing: bool | None, task: Mapping[str, Any] | None = None) -> RunPlan:
    data = tmp / f"{fmt}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records_for(fmt)))
    dataset: dict[str, Any] = {"train": {"uri": f"file://{data}"}, "format": fmt}
    if packing is not None:
        dataset["packing"] = packing
    return plan_finetune(
        FineTuneJob.model_validate(
            {
                "apiVersion": "kubetune.io/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": "packing", "namespace": "ml"},
                "spec": {
                    "model": {"uri": "file:///unused"},
                    "dataset": dataset,
                    "output": {"uri": "file:///unused/out"},
                    "hyperparameters": {"maxSteps": 1, "maxSeqLength": MAX_SEQ_LENGTH},
                },
            }
        )
    )


def prepared(
    tmp: Path, tokenizer: PreTrainedTokenizerFast, fmt: str, packing: bool
) -> tuple[RunPlan, PreparedData]:
    plan = plan_for(tmp, fmt, packing=packing)
    return plan, prepare_datasets(plan, tokenizer, tmp / f"scratch-{fmt}-{packing}")


def batches(
    plan: RunPlan, data: PreparedData, tokenizer: PreTrainedTokenizerFast
) -> Iterator[dict[str, Any]]:
    collate = make_collator(tokenizer, plan)
    rows = [data.train[i] for i in range(len(data.train))]
    for start in range(0, len(rows), BATCH):
        yield collate(rows[start : start + BATCH])


def loss_labels(batch: Mapping[str, torch.Tensor]) -> list[int]:
    """The label ids that carry loss, in order."""
    labels = batch["labels"][..., 1:]
    return [int(t) for t in labels[labels != IGNORE_INDEX]]


FORMATS = ("text", "instruction", "chat")


@pytest.mark.parametrize("fmt", FORMATS)
def test_windows_hold_whole_records_within_max_seq_length(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast, fmt: str
) -> None:
    _, unpacked = prepared(tmp_path, tokenizer, fmt, packing=False)
    _, packed = prepared(tmp_path, tokenizer, fmt, packing=True)
    windows = packed.train["seq_lengths"]
    assert all(sum(w) <= MAX_SEQ_LENGTH for w in windows)
    assert sum(len(w) for w in windows) == len(unpacked.train)  # every record, none split
    assert len(windows) < len(unpacked.train)
    assert packed.stats.packed_windows == len(windows)
    eos = tokenizer.eos_token_id
    for row in packed.train:
        starts = [0]
        for n in row["seq_lengths"]:
            starts.append(starts[-1] + n)
        for end in starts[1:]:
            # An EOS between records, unless the record already fills maxSeqLength.
            assert row["input_ids"][end - 1] == eos or end - starts[starts.index(end) - 1] == MAX_SEQ_LENGTH


@pytest.mark.parametrize("fmt", FORMATS)
def test_packing_trains_on_exactly_the_loss_tokens_of_the_unpacked_run(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast, fmt: str
) -> None:
    plan, unpacked = prepared(tmp_path, tokenizer, fmt, packing=False)
    packed_plan, packed = prepared(tmp_path, tokenizer, fmt, packing=True)
    plain = list(batches(plan, unpacked, tokenizer))
    flat = list(batches(packed_plan, packed, tokenizer))
    assert sum(loss_tokens(b) for b in flat) == sum(loss_tokens(b) for b in plain) > 0
    assert Counter(t for b in flat for t in loss_labels(b)) == Counter(
        t for b in plain for t in loss_labels(b)
    )
    # Fewer, fuller batches; no attention_mask, which would let records attend to each other.
    assert len(flat) < len(plain)
    assert all("attention_mask" not in b for b in flat)
    assert padding(flat, tokenizer.pad_token_id) < padding(plain, tokenizer.pad_token_id) / 2


def padding(batches: list[dict[str, Any]], pad_id: int) -> float:
    """Share of the batches' token slots that are padding (the tiny tokenizer has a pad token)."""
    return sum(int((b["input_ids"] == pad_id).sum()) for b in batches) / sum(
        b["input_ids"].numel() for b in batches
    )


@pytest.mark.parametrize("fmt", ["instruction", "chat"])
def test_no_record_loss_mask_leaks_into_its_neighbour(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast, fmt: str
) -> None:
    """Inside a packed batch each record's labels are its own (response or assistant tokens only)
    and a record's first token is never a target: only its neighbour's last token precedes it."""
    _, unpacked = prepared(tmp_path, tokenizer, fmt, packing=False)
    packed_plan, packed = prepared(tmp_path, tokenizer, fmt, packing=True)
    own = {tuple(r["input_ids"]): r["labels"] for r in unpacked.train}
    checked = 0
    pad = tokenizer.pad_token_id
    for batch in batches(packed_plan, packed, tokenizer):
        for row in range(batch["input_ids"].shape[0]):
            ids, labels, positions = (batch[k][row].tolist() for k in ("input_ids", "labels", "position_ids"))
            starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
            for a, b in itertools.pairwise(starts):
                record, record_labels = tuple(ids[a:b]), labels[a:b]
                if set(record) == {pad}:  # the padding after the window's records: no loss
                    assert set(record_labels) == {IGNORE_INDEX}
                    continue
                expected = own.get(record) or own[record[:-1]] + [IGNORE_INDEX]  # or with its separator
                assert record_labels[0] == IGNORE_INDEX
                assert record_labels[1:] == list(expected)[1:]
                checked += 1
    assert checked == len(unpacked.train)


def summed_loss(model: torch.nn.Module, batch: Mapping[str, Any]) -> float:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs).logits
    labels = batch["labels"][..., 1:]
    return float(
        torch.nn.functional.cross_entropy(
            logits[..., :-1, :].flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
    )


def test_records_do_not_attend_to_each_other(
    tmp_path: Path, model_dir: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    """Same weights, same tokens: the summed loss over the packed batches equals the unpacked
    one, which it could not if a record saw its neighbours (or its positions did not restart)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    model.train(False)
    with (
        torch.no_grad()
    ):  # sharper attention and larger values, so a random model's output depends on context
        for name, weight in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "lm_head.weight")):
                weight.mul_(8)
    plan, unpacked = prepared(tmp_path, tokenizer, "instruction", packing=False)
    packed_plan, packed = prepared(tmp_path, tokenizer, "instruction", packing=True)
    plain = sum(summed_loss(model, b) for b in batches(plan, unpacked, tokenizer))
    flat = sum(summed_loss(model, b) for b in batches(packed_plan, packed, tokenizer))
    assert flat == pytest.approx(plain, rel=1e-5)
    # And it matters: the same rows with one position sequence (records attending to each other) differ.
    leaky = 0.0
    for b in batches(packed_plan, packed, tokenizer):
        b = {**b, "position_ids": torch.arange(b["input_ids"].shape[1])[None]}
        leaky += summed_loss(model, b)
    assert abs(leaky - plain) > 1e-3 * plain  # 100 times the tolerance above


def test_a_hand_written_plan_cannot_pack_classification_records(tmp_path: Path) -> None:
    plan = plan_for(tmp_path, "text", packing=True)
    classification = plan.model_copy(
        update={"dataset": plan.dataset.model_copy(update={"format": "classification"})}
    )
    with pytest.raises(InvalidInputError, match=r"dataset\.packing"):
        packs(classification)
    assert packs(plan)
    assert not packs(plan_for(tmp_path, "text", packing=None))
