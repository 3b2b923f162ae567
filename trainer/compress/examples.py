"""The data a compression run needs: calibration sequences from ``dataset.train`` and held-out
examples for the before/after evaluation, read and tokenized by the fine-tuning data pipeline
(:mod:`kubetune.trainer.data`), so formats, field names and checks are the same as for training.

Both are truncated to ``calibration.maxSeqLength``. The held-out examples are ``dataset.eval``,
else the ``evalFraction`` of ``dataset.train`` split off with the training seed (the same split a
distillation run trains without), else, when the job names no held-out data, the first training
records (the report says so: such figures are optimistic for calibrated methods).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from kubetune.api.spec import Hyperparameters
from kubetune.errors import InvalidInputError
from kubetune.run.plan import RunPlan
from kubetune.trainer.data.formats import Example, tokenize_split
from kubetune.trainer.data.loading import load_records

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# When a job names no held-out data, this many training records stand in for it.
FALLBACK_EVAL_RECORDS: Final = 256


@dataclass(frozen=True)
class CompressionData:
    calibration: list[Example]
    """Tokenized training records (all of them; :func:`calibration_dataset` samples)."""
    evaluation: list[Example]
    eval_source: str
    """Where the held-out examples come from, in words, for the report."""
    max_length: int


def with_max_length(plan: RunPlan, max_length: int) -> RunPlan:
    """The plan with ``hyperparameters.maxSeqLength`` set, which is what the data pipeline
    truncates to (compress plans without distillation carry no hyperparameters)."""
    hp = plan.hyperparameters or Hyperparameters(max_steps=1)
    return plan.model_copy(update={"hyperparameters": hp.model_copy(update={"max_seq_length": max_length})})


def prepare(plan: RunPlan, tokenizer: PreTrainedTokenizerBase, scratch_dir: Path) -> CompressionData:
    compression = plan.compression
    assert compression is not None
    max_length = compression.calibration.max_seq_length
    sized = with_max_length(plan, max_length)
    try:
        records = load_records(sized, scratch_dir)
    except InvalidInputError as e:
        raise InvalidInputError(f"cannot build the calibration and evaluation sets: {e}") from e
    calibration = tokenize_split(records.train, sized, tokenizer)
    usable = [e for e in calibration.examples if len(e["input_ids"]) > 1]
    if not usable:
        raise InvalidInputError(
            f"the calibration set is empty: dataset.train {plan.dataset.train.uri} has no record with at "
            f"least two tokens within calibration.maxSeqLength {max_length}"
        )
    if plan.dataset.eval is not None:
        source = f"dataset.eval {plan.dataset.eval.uri}"
    elif plan.dataset.eval_fraction is not None:
        source = (
            f"dataset.evalFraction {plan.dataset.eval_fraction} of dataset.train {plan.dataset.train.uri}"
        )
    else:
        source = (
            f"dataset.train {plan.dataset.train.uri} (first {FALLBACK_EVAL_RECORDS} records: the job sets "
            "neither dataset.eval nor dataset.evalFraction, so these are not held out)"
        )
    if records.eval is not None:
        evaluation = tokenize_split(records.eval, sized, tokenizer).examples
    else:
        log.warning("no held-out data (dataset.eval or dataset.evalFraction): evaluating on training records")
        evaluation = usable[:FALLBACK_EVAL_RECORDS]
    evaluation = [e for e in evaluation if len(e["input_ids"]) > 1]
    if not evaluation:
        raise InvalidInputError(f"the evaluation data ({source}) has no record with at least two tokens")
    return CompressionData(usable, evaluation, source, max_length)


def sample(examples: list[Example], count: int, seed: int) -> list[Example]:
    """``count`` examples chosen by ``seed`` (all of them when there are fewer), in data order."""
    if len(examples) <= count:
        return list(examples)
    chosen = sorted(random.Random(seed).sample(range(len(examples)), count))
    return [examples[i] for i in chosen]


def calibration_dataset(examples: list[Example]) -> datasets.Dataset:
    """Token ids and attention masks in the shape ``llmcompressor.oneshot`` takes pre-tokenized
    data (labels are left out: calibration only runs forward passes)."""
    import datasets

    columns: dict[str, list[Any]] = {
        "input_ids": [list(e["input_ids"]) for e in examples],
        "attention_mask": [list(e["attention_mask"]) for e in examples],
    }
    return datasets.Dataset.from_dict(columns)
