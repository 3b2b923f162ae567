"""Tokenized datasets for the Trainer, their statistics, and the collator that pads batches."""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.api.spec import DataFormat, TaskType
from kubetune.errors import InvalidInputError
from kubetune.run.plan import RunPlan

from .formats import IGNORE_INDEX, Example, tokenize_split
from .loading import LoadReport, collect_records
from .packing import pack_examples, packed_collator, packing_stats, packs
from .problems import ProblemLog

if TYPE_CHECKING:
    import datasets
    import torch
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LengthStats:
    """Token counts per record before truncation."""

    count: int
    max: int
    mean: float
    p95: int
    truncated: int
    max_length: int
    tokens: int
    """Tokens trained on after truncation."""

    @classmethod
    def of(cls, lengths: Sequence[int], max_length: int) -> LengthStats:
        if not lengths:
            return cls(0, 0, 0.0, 0, 0, max_length, 0)
        ordered = sorted(lengths)
        p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
        return cls(
            count=len(lengths),
            max=ordered[-1],
            mean=sum(lengths) / len(lengths),
            p95=p95,
            truncated=sum(1 for n in lengths if n > max_length),
            max_length=max_length,
            tokens=sum(min(n, max_length) for n in lengths),
        )


@dataclass(frozen=True)
class DataStats:
    train_records: int
    eval_records: int | None
    train_lengths: LengthStats
    eval_lengths: LengthStats | None
    dropped: int
    """Records left out because truncation left nothing to learn."""
    label_counts: dict[str, int] | None = None
    """Training records per class (classification)."""
    train_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    packed_windows: int | None = None
    """Training windows the records were packed into (``dataset.packing``)."""
    packed_fill: float | None = None
    """Share of the windows' token slots that records fill."""


@dataclass(frozen=True)
class PreparedData:
    train: datasets.Dataset
    eval: datasets.Dataset | None
    label_names: list[str] | None
    """``task.labels`` for classification (``None`` when labels are given as ids only)."""
    stats: DataStats


def label_counts(examples: Sequence[Example], names: Sequence[str] | None) -> dict[str, int]:
    counts = Counter(int(e["labels"]) for e in examples)
    return {(names[i] if names and i < len(names) else str(i)): n for i, n in sorted(counts.items())}


def _to_dataset(examples: list[Example], plan: RunPlan) -> datasets.Dataset:
    import datasets

    # Preference pairs stay text (or messages): trl's DPOTrainer tokenizes them itself.
    if plan.dataset.format == DataFormat.preference:
        columns: tuple[str, ...] = ("prompt", "chosen", "rejected")
    else:
        columns = ("input_ids", "attention_mask", "labels")
    return datasets.Dataset.from_dict({c: [e[c] for e in examples] for c in columns})


def prepare_datasets(plan: RunPlan, tokenizer: PreTrainedTokenizerBase, scratch_dir: Path) -> PreparedData:
    """Read, check, split and tokenize the plan's data into ``datasets.Dataset`` objects.

    Raises :class:`InvalidInputError` or :class:`StorageAccessError` like :func:`load_records`,
    and when nothing is left to train on after truncation.
    """
    problems = ProblemLog()
    report = LoadReport()
    records = collect_records(plan, scratch_dir, problems, report)
    problems.raise_if_any()
    train = tokenize_split(records.train, plan, tokenizer)
    evaluation = tokenize_split(records.eval, plan, tokenizer) if records.eval is not None else None
    dropped = len(train.dropped) + (len(evaluation.dropped) if evaluation else 0)
    if dropped:
        log.warning(
            "left out %d records with nothing to learn after truncation to %d tokens (first: %s)",
            dropped,
            train.max_length,
            (train.dropped or (evaluation.dropped if evaluation else []))[0],
        )
    if not train.examples:
        raise InvalidInputError(
            f"no training record has tokens to learn from within maxSeqLength {train.max_length} "
            f"({len(train.dropped)} records left out); raise maxSeqLength or shorten the prompts"
        )
    if evaluation is not None and not evaluation.examples:
        raise InvalidInputError(
            f"no evaluation record has tokens to learn from within maxSeqLength {evaluation.max_length}"
        )
    classification = plan.task.type == TaskType.sequence_classification
    names = list(plan.task.labels) if classification and plan.task.labels else None
    if packs(plan):
        eos = tokenizer.eos_token_id
        train_set = pack_examples(train.examples, train.max_length, eos if isinstance(eos, int) else None)
        packing = packing_stats(train_set, train.max_length)
        log.info(
            "packed %d training records into %d windows of %d tokens (%.0f%% filled)",
            packing.records,
            packing.windows,
            packing.max_length,
            100 * packing.fill,
        )
    else:
        train_set, packing = _to_dataset(train.examples, plan), None
    stats = DataStats(
        train_records=len(train.examples),
        eval_records=len(evaluation.examples) if evaluation else None,
        train_lengths=LengthStats.of(train.lengths, train.max_length),
        eval_lengths=LengthStats.of(evaluation.lengths, evaluation.max_length) if evaluation else None,
        dropped=dropped,
        label_counts=label_counts(train.examples, names) if classification else None,
        train_files=report.train_files,
        eval_files=report.eval_files,
        packed_windows=packing.windows if packing else None,
        packed_fill=round(packing.fill, 4) if packing else None,
    )
    return PreparedData(
        train=train_set,
        eval=_to_dataset(evaluation.examples, plan) if evaluation else None,
        label_names=names,
        stats=stats,
    )


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id padding uses: the pad token, else EOS (padding is masked out either way), else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(candidate, int):
            return candidate
    return 0


def make_collator(
    tokenizer: PreTrainedTokenizerBase, plan: RunPlan
) -> Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]]:
    """Pads a batch on the right to its longest sequence: ``input_ids`` with the pad token,
    ``attention_mask`` with 0, causal-LM ``labels`` with :data:`IGNORE_INDEX`; classification
    labels become one class id per row. Right padding keeps absolute positions correct in
    training. With ``dataset.packing`` batches are flattened instead (:mod:`.packing`)."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    # Not transformers' DataCollatorForSeq2Seq / DataCollatorWithPadding: they pad through
    # tokenizer.pad, which refuses a tokenizer without a pad token (most causal LMs have none; we
    # pad with EOS without changing the tokenizer that is saved with the model) and pads on the
    # tokenizer's padding_side, which some models set to the left.
    pad = pad_token_id(tokenizer)
    if packs(plan):
        return packed_collator(pad)
    classification = plan.task.type == TaskType.sequence_classification

    def padded(features: Sequence[Mapping[str, Any]], key: str, value: int) -> torch.Tensor:
        rows = [torch.tensor(list(f[key]), dtype=torch.long) for f in features]
        return pad_sequence(rows, batch_first=True, padding_value=value)

    def collate(features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {
            "input_ids": padded(features, "input_ids", pad),
            "attention_mask": padded(features, "attention_mask", 0),
        }
        if classification:
            batch["labels"] = torch.tensor([int(f["labels"]) for f in features], dtype=torch.long)
        else:
            batch["labels"] = padded(features, "labels", IGNORE_INDEX)
        return batch

    return collate
