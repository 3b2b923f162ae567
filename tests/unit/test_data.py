"""Training data: files and prefixes, the four formats with their loss masks, errors that name
the file and line, and a deterministic evaluation split."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from kubetune.api.resources import FineTuneJob
from kubetune.errors import InvalidInputError, StorageAccessError
from kubetune.run.plan import RunPlan, plan_finetune
from kubetune.trainer.data.checks import label_id
from kubetune.trainer.data.collation import LengthStats, make_collator, prepare_datasets
from kubetune.trainer.data.formats import (
    IGNORE_INDEX,
    has_generation_blocks,
    tokenize_records,
    tokenize_split,
)
from kubetune.trainer.data.loading import collect_records, load_records
from kubetune.trainer.data.problems import ProblemLog
from kubetune.trainer.data.readers import Record
from kubetune.trainer.tinymodel import IM_END, IM_START, build_tokenizer, sample_corpus

pytestmark = pytest.mark.unit

LABELS = ["negative", "positive"]
CHAT_TEMPLATE_WITH_GENERATION = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer(sample_corpus(300))


def make_plan(
    train: str,
    *,
    fmt: str = "text",
    eval_uri: str | None = None,
    eval_fraction: float | None = None,
    task: dict[str, Any] | None = None,
    fields: dict[str, str] | None = None,
    max_seq_length: int = 64,
    seed: int = 42,
    file_format: str = "auto",
) -> RunPlan:
    dataset: dict[str, Any] = {"train": {"uri": train}, "format": fmt, "fileFormat": file_format}
    if eval_uri is not None:
        dataset["eval"] = {"uri": eval_uri}
    if eval_fraction is not None:
        dataset["evalFraction"] = eval_fraction
    if fields is not None:
        dataset["fields"] = fields
    job = FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "data-test", "namespace": "ml"},
            "spec": {
                "model": {"uri": "file:///unused/model"},
                "task": task or {"type": "causal-lm"},
                "dataset": dataset,
                "output": {"uri": "file:///unused/output"},
                "hyperparameters": {"maxSteps": 10, "maxSeqLength": max_seq_length, "seed": seed},
            },
        }
    )
    return plan_finetune(job)


CLASSIFICATION = {"type": "sequence-classification", "numLabels": 2, "labels": LABELS}


def write_jsonl(path: Path, rows: list[Any]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return f"file://{path}"


def ids_of(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


# --- reading -------------------------------------------------------------------------------------


def test_jsonl_records_carry_their_file_and_line(tmp_path: Path) -> None:
    uri = write_jsonl(tmp_path / "train.jsonl", [{"text": "one"}, "", {"text": "three"}])
    records = load_records(make_plan(uri), tmp_path / "scratch")
    assert records.eval is None
    assert [(r.source, r.data) for r in records.train] == [
        (f"{uri}:1", {"text": "one"}),
        (f"{uri}:3", {"text": "three"}),
    ]


def test_json_csv_and_parquet_read_the_same_records(tmp_path: Path) -> None:
    rows = [{"text": "a first, quoted\nline", "label": "positive"}, {"text": "second", "label": "negative"}]
    (tmp_path / "train.json").write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
    with (tmp_path / "train.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")

    def read(name: str) -> list[tuple[str, dict[str, Any]]]:
        uri = f"file://{tmp_path / name}"
        plan = make_plan(uri, fmt="classification", task=CLASSIFICATION)
        return [(r.source.removeprefix(uri), r.data) for r in load_records(plan, tmp_path / "s").train]

    # Sources are file:line; the CSV's first record spans lines 2-3 and starts on line 2.
    assert read("train.json") == [(":2", rows[0]), (":3", rows[1])]
    assert read("train.csv") == [(":2", rows[0]), (":4", rows[1])]
    assert read("train.parquet") == [(":1", rows[0]), (":2", rows[1])]


def test_a_prefix_reads_every_visible_file_in_lexical_order(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data" / "b.jsonl", [{"text": "from b"}])
    write_jsonl(tmp_path / "data" / "a.jsonl", [{"text": "from a"}])
    write_jsonl(tmp_path / "data" / "sub" / "c.jsonl", [{"text": "from c"}])
    (tmp_path / "data" / "_SUCCESS").write_text("")
    write_jsonl(tmp_path / "data" / ".hidden" / "x.jsonl", [{"text": "never"}])
    records = load_records(make_plan(f"file://{tmp_path / 'data'}"), tmp_path / "scratch")
    assert [r.data["text"] for r in records.train] == ["from a", "from b", "from c"]


def test_a_file_with_an_unknown_extension_is_named(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data" / "a.jsonl", [{"text": "fine"}])
    (tmp_path / "data" / "notes.txt").write_text("hello")
    with pytest.raises(
        InvalidInputError, match=r"notes\.txt: cannot tell the file format.*dataset\.fileFormat"
    ):
        load_records(make_plan(f"file://{tmp_path / 'data'}"), tmp_path / "scratch")


def test_file_format_overrides_the_extension(tmp_path: Path) -> None:
    uri = write_jsonl(tmp_path / "train.txt", [{"text": "jsonl in disguise"}])
    records = load_records(make_plan(uri, file_format="jsonl"), tmp_path / "scratch")
    assert [r.data for r in records.train] == [{"text": "jsonl in disguise"}]


def test_missing_data_is_a_storage_error_naming_the_uri(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/nowhere/train.jsonl"
    with pytest.raises(StorageAccessError, match=r"nowhere/train\.jsonl"):
        load_records(make_plan(uri), tmp_path / "scratch")


# --- errors --------------------------------------------------------------------------------------


def test_every_malformed_line_is_reported_with_file_and_line(tmp_path: Path) -> None:
    uri = write_jsonl(
        tmp_path / "train.jsonl", [{"text": "ok"}, '{"text": "unterminated', {"text": "ok"}, "[1, 2]"]
    )
    with pytest.raises(InvalidInputError) as error:
        load_records(make_plan(uri), tmp_path / "scratch")
    message = str(error.value)
    assert f"{uri}:2: malformed JSON" in message
    assert f"{uri}:4: expected a JSON object, got an array" in message


def test_a_missing_field_names_the_field_the_line_and_what_is_there(tmp_path: Path) -> None:
    uri = write_jsonl(tmp_path / "train.jsonl", [{"text": "ok"}, {"body": "wrong name", "id": 7}])
    with pytest.raises(
        InvalidInputError, match=rf"{uri}:2: field 'text' is missing \(the record has: body, id\)"
    ):
        load_records(make_plan(uri), tmp_path / "scratch")


def test_a_field_missing_everywhere_suggests_the_field_mapping(tmp_path: Path) -> None:
    uri = write_jsonl(tmp_path / "train.jsonl", [{"content": "a"}, {"content": "b"}])
    problems = ProblemLog()
    collect_records(make_plan(uri), tmp_path / "scratch", problems)
    hints = [p.message for p in problems.problems() if p.kind == "field-mapping"]
    assert hints == [
        f"dataset.train {uri}: no record has field 'text'; the records have: content. "
        "Name the right one in dataset.fields"
    ]


def test_an_unknown_label_names_the_label_and_the_allowed_ones(tmp_path: Path) -> None:
    uri = write_jsonl(tmp_path / "train.jsonl", [{"text": "meh", "label": "neutral"}])
    plan = make_plan(uri, fmt="classification", task=CLASSIFICATION)
    with pytest.raises(
        InvalidInputError,
        match=rf"{uri}:1: unknown label 'neutral'; allowed: 'negative', 'positive' \(or ids 0..1\)",
    ):
        load_records(plan, tmp_path / "scratch")


def test_labels_are_names_or_ids_and_ids_need_no_names(tmp_path: Path) -> None:
    assert label_id("positive", LABELS, 2) == 1
    assert label_id(0, LABELS, 2) == 0
    assert label_id("1", None, 2) == 1  # CSV cells are strings
    assert label_id(1.0, None, 2) == 1  # Parquet columns may be floats
    for bad in (2, -1, True, "positive", 0.5):
        with pytest.raises(ValueError, match="unknown label"):
            label_id(bad, None, 2)


def test_an_empty_dataset_is_invalid(tmp_path: Path) -> None:
    uri = write_jsonl(tmp_path / "train.jsonl", ["", "  "])
    with pytest.raises(InvalidInputError, match=rf"dataset.train {uri} has no records"):
        load_records(make_plan(uri), tmp_path / "scratch")


def test_an_empty_eval_file_is_invalid(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}])
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [])
    with pytest.raises(InvalidInputError, match=rf"dataset.eval {evaluation} has no records"):
        load_records(make_plan(train, eval_uri=evaluation), tmp_path / "scratch")


def test_chat_records_need_a_list_of_messages_with_an_assistant_turn(tmp_path: Path) -> None:
    uri = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": "hello"},
            {"messages": [{"role": "user", "content": "hi"}]},
            {"messages": [{"role": "user"}]},
            {"messages": json.dumps(CONVERSATION)},  # a JSON string is fine (CSV cells)
        ],
    )
    problems = ProblemLog()
    records = collect_records(make_plan(uri, fmt="chat"), tmp_path / "scratch", problems)
    assert [r.source for r in records.train] == [f"{uri}:4"]
    assert [p.message for p in problems.problems()] == [
        f"{uri}:1: field 'messages': must be a list of {{role, content}} messages, got a string that is not JSON",
        f"{uri}:2: field 'messages': has no non-empty assistant message, so there is nothing to learn from it",
        f"{uri}:3: field 'messages': message 0 (user) must have string content, got null",
    ]


# --- evaluation split ----------------------------------------------------------------------------


def test_eval_fraction_split_is_deterministic_by_seed(tmp_path: Path) -> None:
    uri = write_jsonl(tmp_path / "train.jsonl", [{"text": f"record {i}"} for i in range(50)])

    def split(seed: int) -> tuple[list[str], list[str]]:
        records = load_records(make_plan(uri, eval_fraction=0.2, seed=seed), tmp_path / "scratch")
        assert records.eval is not None
        return [r.source for r in records.train], [r.source for r in records.eval]

    train, evaluation = split(seed=7)
    assert len(evaluation) == 10
    assert len(train) == 40
    assert sorted(train + evaluation, key=lambda s: int(s.rsplit(":", 1)[1])) == [
        f"{uri}:{i}" for i in range(1, 51)
    ]
    assert split(seed=7) == (train, evaluation)
    assert split(seed=8)[1] != evaluation


def test_eval_fraction_holds_out_at_least_one_record(tmp_path: Path) -> None:
    uri = write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}, {"text": "b"}, {"text": "c"}])
    records = load_records(make_plan(uri, eval_fraction=0.01), tmp_path / "scratch")
    assert records.eval is not None
    assert len(records.eval) == 1
    assert len(records.train) == 2


def test_eval_fraction_of_a_single_record_is_invalid(tmp_path: Path) -> None:
    uri = write_jsonl(tmp_path / "train.jsonl", [{"text": "alone"}])
    with pytest.raises(InvalidInputError, match="needs at least 2 usable training records"):
        load_records(make_plan(uri, eval_fraction=0.5), tmp_path / "scratch")


# --- formats and loss masks ----------------------------------------------------------------------


def test_text_trains_on_every_token_and_ends_with_eos(tokenizer: PreTrainedTokenizerFast) -> None:
    plan = make_plan("file:///unused.jsonl", max_seq_length=64)
    text = "The licence grants you the freedom to share and change it."
    [example] = tokenize_records([Record("x:1", {"text": text})], plan, tokenizer)
    expected = [*ids_of(tokenizer, text), tokenizer.eos_token_id]
    assert example == {"input_ids": expected, "attention_mask": [1] * len(expected), "labels": expected}


def test_text_is_truncated_to_max_seq_length(tokenizer: PreTrainedTokenizerFast) -> None:
    plan = make_plan("file:///unused.jsonl", max_seq_length=8)
    text = " ".join(sample_corpus(5))
    tokenized = tokenize_split([Record("x:1", {"text": text})], plan, tokenizer)
    [example] = tokenized.examples
    assert example["input_ids"] == ids_of(tokenizer, text)[:8]
    assert tokenized.lengths == [len(ids_of(tokenizer, text)) + 1]
    assert LengthStats.of(tokenized.lengths, 8).truncated == 1


def test_text_keeps_the_bos_a_tokenizer_adds(tokenizer: PreTrainedTokenizerFast) -> None:
    with_bos = build_tokenizer(sample_corpus(300))
    bos = with_bos.bos_token_id
    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    plan = make_plan("file:///unused.jsonl")
    [example] = tokenize_records([Record("x:1", {"text": "free software"})], plan, with_bos)
    assert example["input_ids"] == [bos, *ids_of(with_bos, "free software"), with_bos.eos_token_id]


def test_instruction_trains_on_the_response_only(tokenizer: PreTrainedTokenizerFast) -> None:
    plan = make_plan("file:///unused.jsonl", fmt="instruction", max_seq_length=128)
    record = Record("x:1", {"prompt": "Name a colour.", "response": "Blue."})
    [example] = tokenize_records([record], plan, tokenizer)
    prompt = ids_of(tokenizer, "### Instruction:\nName a colour.\n\n### Response:\n")
    response = [*ids_of(tokenizer, "Blue."), tokenizer.eos_token_id]
    assert example["input_ids"] == prompt + response
    assert example["labels"] == [IGNORE_INDEX] * len(prompt) + response
    assert tokenizer.decode(example["input_ids"]) == (
        "### Instruction:\nName a colour.\n\n### Response:\nBlue.</s>"
    )


def test_an_instruction_whose_prompt_fills_the_window_is_left_out(tokenizer: PreTrainedTokenizerFast) -> None:
    plan = make_plan("file:///unused.jsonl", fmt="instruction", max_seq_length=32)
    records = [
        Record("x:1", {"prompt": " ".join(sample_corpus(6)), "response": "Yes."}),
        Record("x:2", {"prompt": "", "response": "Yes."}),
    ]
    tokenized = tokenize_split(records, plan, tokenizer)
    assert tokenized.dropped == ["x:1"]
    assert len(tokenized.examples) == 1


def expected_chat(tokenizer: PreTrainedTokenizerFast) -> tuple[list[int], list[int]]:
    """Token ids and labels of CONVERSATION in ChatML, built piece by piece: headers and non-assistant
    turns carry no loss; assistant text and its end-of-turn tokens do."""
    ids: list[int] = []
    labels: list[int] = []
    for message in CONVERSATION:
        header = ids_of(tokenizer, f"{IM_START}{message['role']}\n")
        body = ids_of(tokenizer, f"{message['content']}{IM_END}\n")
        ids += header + body
        labels += [IGNORE_INDEX] * len(header)
        labels += body if message["role"] == "assistant" else [IGNORE_INDEX] * len(body)
    return ids, labels


@pytest.mark.parametrize("template", ["incremental rendering", "generation blocks"])
def test_chat_trains_on_assistant_turns_only(tokenizer: PreTrainedTokenizerFast, template: str) -> None:
    if template == "generation blocks":
        tokenizer = build_tokenizer(sample_corpus(300))
        tokenizer.chat_template = CHAT_TEMPLATE_WITH_GENERATION
        assert has_generation_blocks(tokenizer.chat_template)
    plan = make_plan("file:///unused.jsonl", fmt="chat", max_seq_length=256)
    [example] = tokenize_records([Record("x:1", {"messages": CONVERSATION})], plan, tokenizer)
    ids, labels = expected_chat(tokenizer)
    assert example["input_ids"] == ids
    for position, (label, wanted) in enumerate(zip(example["labels"], labels, strict=True)):
        assert label == wanted, f"token {position} ({tokenizer.decode([ids[position]])!r})"
    trained = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(trained) == f"Paris.{IM_END}\nRome.{IM_END}\n"


def test_chat_without_a_template_is_invalid(tmp_path: Path) -> None:
    no_template = build_tokenizer(sample_corpus(300))
    no_template.chat_template = None
    plan = make_plan("file:///unused.jsonl", fmt="chat")
    with pytest.raises(
        InvalidInputError, match="x:1: the chat format needs a tokenizer with a chat template"
    ):
        tokenize_records([Record("x:1", {"messages": CONVERSATION})], plan, no_template)


def test_classification_maps_labels_to_ids(tokenizer: PreTrainedTokenizerFast) -> None:
    plan = make_plan("file:///unused.jsonl", fmt="classification", task=CLASSIFICATION, max_seq_length=16)
    records = [
        Record("x:1", {"text": "great", "label": "positive"}),
        Record("x:2", {"text": "awful", "label": 0}),
        Record("x:3", {"text": " ".join(sample_corpus(3)), "label": "1"}),
    ]
    examples = tokenize_records(records, plan, tokenizer)
    assert [e["labels"] for e in examples] == [1, 0, 1]
    assert examples[0]["input_ids"] == ids_of(tokenizer, "great")
    assert len(examples[2]["input_ids"]) == 16


def test_the_format_must_fit_the_task(tokenizer: PreTrainedTokenizerFast) -> None:
    # The API rejects such specs; a hand-written plan file is checked again where it is used.
    causal = make_plan("file:///unused.jsonl")
    plan = causal.model_copy(
        update={"dataset": causal.dataset.model_copy(update={"format": "classification"})}
    )
    with pytest.raises(InvalidInputError, match="does not fit task causal-lm"):
        tokenize_records([], plan, tokenizer)


# --- datasets and batches ------------------------------------------------------------------------


def test_prepare_datasets_tokenizes_both_splits_with_stats(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    rows = [{"text": f"sample {i}", "label": LABELS[i % 2]} for i in range(20)]
    uri = write_jsonl(tmp_path / "train.jsonl", rows)
    plan = make_plan(uri, fmt="classification", task=CLASSIFICATION, eval_fraction=0.25)
    prepared = prepare_datasets(plan, tokenizer, tmp_path / "scratch")
    assert prepared.eval is not None
    assert (len(prepared.train), len(prepared.eval)) == (15, 5)
    assert prepared.train.column_names == ["input_ids", "attention_mask", "labels"]
    assert prepared.label_names == LABELS
    assert prepared.stats.train_records == 15
    assert prepared.stats.eval_records == 5
    assert prepared.stats.train_files == [uri]
    assert prepared.stats.label_counts is not None
    assert sum(prepared.stats.label_counts.values()) == 15
    again = prepare_datasets(plan, tokenizer, tmp_path / "scratch-again")
    assert again.train.to_list() == prepared.train.to_list()
    assert again.eval is not None
    assert again.eval.to_list() == prepared.eval.to_list()


def test_collator_pads_right_with_pad_zero_mask_and_ignored_labels(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    collate = make_collator(tokenizer, make_plan("file:///unused.jsonl"))
    batch = collate(
        [
            {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [5, 6, 7]},
            {"input_ids": [8], "attention_mask": [1], "labels": [IGNORE_INDEX]},
        ]
    )
    pad = tokenizer.pad_token_id
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, pad, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [IGNORE_INDEX] * 3]


def test_collator_gives_one_class_id_per_row(tokenizer: PreTrainedTokenizerFast) -> None:
    plan = make_plan("file:///unused.jsonl", fmt="classification", task=CLASSIFICATION)
    batch = make_collator(tokenizer, plan)(
        [
            {"input_ids": [5, 6], "attention_mask": [1, 1], "labels": 1},
            {"input_ids": [7], "attention_mask": [1], "labels": 0},
        ]
    )
    assert batch["labels"].tolist() == [1, 0]
    assert batch["input_ids"].shape == (2, 2)
