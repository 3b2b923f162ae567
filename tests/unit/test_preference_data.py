"""The preference format: each bad record is named with its file, line and field; the pairs are
measured as trl tokenizes them, and a prompt that fills maxSeqLength is refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.resources import FineTuneJob
from kubetune.errors import InvalidInputError
from kubetune.run.plan import RunPlan, plan_finetune
from kubetune.trainer.data import ProblemLog, collect_records, tokenize_split
from kubetune.trainer.tinymodel import build_tokenizer, sample_corpus

pytestmark = pytest.mark.unit


def plan_for(train: str, *, fields: dict[str, str] | None = None, max_seq_length: int = 64) -> RunPlan:
    dataset: dict[str, Any] = {"train": {"uri": train}, "format": "preference"}
    if fields:
        dataset["fields"] = fields
    job = FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "pairs", "namespace": "ml"},
            "spec": {
                "model": {"uri": "file:///unused/model"},
                "dataset": dataset,
                "method": {"type": "lora", "objective": "dpo"},
                "output": {"uri": "file:///unused/output"},
                "hyperparameters": {"maxSteps": 10, "maxSeqLength": max_seq_length},
            },
        }
    )
    return plan_finetune(job)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path.as_uri()


def problems_of(plan: RunPlan, tmp: Path) -> list[tuple[str, str]]:
    problems = ProblemLog()
    collect_records(plan, tmp / "scratch", problems)
    return [(p.kind, p.message) for p in problems.problems()]


def test_each_bad_pair_is_named_with_file_line_and_field(tmp_path: Path) -> None:
    uri = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "The licence", "chosen": " grants rights", "rejected": " rights grants"},
            {"prompt": "The licence", "chosen": " grants rights"},
            {"prompt": "The licence", "chosen": " same", "rejected": " same"},
            {"prompt": "The licence", "chosen": "", "rejected": " x"},
            {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello", "rejected": "Go away"},
        ],
    )
    assert problems_of(plan_for(uri), tmp_path) == [
        ("missing-field", f"{uri}:2: field 'rejected' is missing (the record has: chosen, prompt)"),
        (
            "identical-pair",
            f"{uri}:3: fields 'chosen' and 'rejected' are identical, so the pair prefers nothing",
        ),
        ("invalid-value", f"{uri}:4: field 'chosen' is empty"),
        (
            "mixed-forms",
            f"{uri}:5: field 'prompt' is a conversation, but in {uri}:1 it is text; every record of a "
            "preference dataset must use the same form",
        ),
    ]


def test_mapped_fields_are_the_ones_named(tmp_path: Path) -> None:
    uri = write_jsonl(tmp_path / "pairs.jsonl", [{"q": "Why", "good": " because", "bad": " because"}])
    plan = plan_for(uri, fields={"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert problems_of(plan, tmp_path) == [
        ("identical-pair", f"{uri}:1: fields 'good' and 'bad' are identical, so the pair prefers nothing")
    ]


def test_a_prompt_that_fills_max_seq_length_is_refused_with_its_line(tmp_path: Path) -> None:
    tokenizer = build_tokenizer(sample_corpus(300))
    long_prompt = " ".join(["licence"] * 40)
    uri = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "Short", "chosen": " in order", "rejected": " order in"},
            {"prompt": long_prompt, "chosen": " in order", "rejected": " order in"},
        ],
    )
    plan = plan_for(uri, max_seq_length=16)
    records = collect_records(plan, tmp_path / "scratch", ProblemLog()).train
    problems = ProblemLog()
    measured = tokenize_split(records, plan, tokenizer, problems)
    assert [row["prompt"] for row in measured.examples] == ["Short"]
    assert [p.kind for p in problems.problems()] == ["too-long"]
    assert problems.problems()[0].message.startswith(f"{uri}:2: the prompt is ")
    with pytest.raises(
        InvalidInputError, match=rf"{uri}:2: the prompt is \d+ tokens, which fills maxSeqLength 16"
    ):
        tokenize_split(records, plan, tokenizer)


def test_a_conversation_pair_becomes_assistant_turns(tmp_path: Path) -> None:
    prompt = [{"role": "user", "content": "Say hello"}]
    uri = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": prompt, "chosen": "Hello", "rejected": "No"}])
    plan = plan_for(uri)
    records = collect_records(plan, tmp_path / "scratch", ProblemLog()).train
    measured = tokenize_split(records, plan, build_tokenizer(sample_corpus(300)))
    assert measured.examples == [
        {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": "Hello"}],
            "rejected": [{"role": "assistant", "content": "No"}],
        }
    ]
