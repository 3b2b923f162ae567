"""Sample packing (``dataset.packing: true``): short records laid end to end in ``maxSeqLength``
windows instead of each padded to its batch's longest.

The machinery is trl's, not ours: :func:`trl.pack_dataset` (best-fit decreasing, so a record is
never cut across windows) builds the windows and records each one's ``seq_lengths``, and trl's
padding-free :class:`~trl.trainer.sft_trainer.DataCollatorForLanguageModeling` lays a batch's
windows out as one row whose ``position_ids`` restart at every record, with the varlen kernels'
``cu_seq_lens`` and no ``attention_mask``. It masks the first label of every record, which only
the previous record's last token would predict, so a record's loss never reaches into its
neighbour; every other label is the record's own (response-only for instruction,
assistant-only for chat, as :mod:`.formats` made them).

Records do not attend to each other: with flash-attention-2 the kernels take the record
boundaries from ``cu_seq_lens``; with sdpa and eager (CPU), transformers' mask builder sees the
restarting ``position_ids`` without an ``attention_mask`` and builds a block-diagonal causal
mask. Both need a model run without a KV cache (a cache switches that detection off), which
training never uses: the collator passes ``use_cache=False``.

Evaluation batches go through the same collator unpacked (one record per window), so the
evaluation loss is the same sum over the same tokens as without packing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from kubetune.api.spec import PACKABLE_FORMATS
from kubetune.errors import InvalidInputError
from kubetune.run.plan import RunPlan

from .formats import IGNORE_INDEX, Example

if TYPE_CHECKING:
    import datasets
    import torch

COLUMNS: Final = ("input_ids", "labels")
"""What a packed window carries besides its ``seq_lengths`` (attention is decided by positions)."""


def packs(plan: RunPlan) -> bool:
    """Whether the plan packs its training records; a hand-written plan that packs a format the
    API refuses is refused here too, naming the field."""
    if not plan.dataset.packing:
        return False
    if plan.dataset.format not in PACKABLE_FORMATS:
        raise InvalidInputError(
            f"dataset.packing is only for the text, instruction and chat formats, not {plan.dataset.format}"
        )
    return True


def with_separator(example: Example, eos_id: int | None, max_length: int) -> Example:
    """The record ending in EOS, so packed neighbours stay apart in the text as well as in the
    positions. A record that already ends in EOS (text and instruction records do, unless
    truncated) is unchanged; otherwise EOS is appended without loss, when the window has room,
    so packing trains on exactly the tokens an unpacked run trains on."""
    ids = list(example["input_ids"])
    if eos_id is None or (ids and ids[-1] == eos_id) or len(ids) >= max_length:
        return example
    return {
        "input_ids": [*ids, eos_id],
        "attention_mask": [*example["attention_mask"], 1],
        "labels": [*example["labels"], IGNORE_INDEX],
    }


def pack_examples(examples: Sequence[Example], max_length: int, eos_id: int | None) -> datasets.Dataset:
    """Training records packed into windows of at most ``max_length`` tokens (rows of
    ``input_ids``, ``labels`` and ``seq_lengths``), in the order trl's best-fit packing gives;
    the Trainer shuffles the windows."""
    import datasets
    from trl.data_utils import pack_dataset

    separated = [with_separator(e, eos_id, max_length) for e in examples]
    table = datasets.Dataset.from_dict({c: [e[c] for e in separated] for c in COLUMNS})
    packed: datasets.Dataset = pack_dataset(table, max_length, strategy="bfd")
    return packed


@dataclass(frozen=True)
class PackingStats:
    """How full the windows are: the share of window slots that records fill."""

    records: int
    windows: int
    tokens: int
    max_length: int

    @property
    def fill(self) -> float:
        return self.tokens / (self.windows * self.max_length) if self.windows else 0.0


def packing_stats(packed: datasets.Dataset, max_length: int) -> PackingStats:
    lengths = packed["seq_lengths"]
    return PackingStats(
        records=sum(len(row) for row in lengths),
        windows=len(lengths),
        tokens=sum(sum(row) for row in lengths),
        max_length=max_length,
    )


def packed_collator(pad_id: int) -> Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]]:
    """trl's padding-free collator, with the KV cache switched off (see the module docstring)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    flatten = DataCollatorForLanguageModeling(pad_token_id=pad_id, padding_free=True)

    def collate(features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = flatten(
            [{c: f[c] for c in (*COLUMNS, "seq_lengths") if c in f} for f in features]
        )
        batch["use_cache"] = False
        return batch

    return collate


def loss_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """Labels that carry loss in a collated causal-LM batch (a causal LM never predicts a row's
    first token, so that label never counts)."""
    return int(batch["labels"][..., 1:].ne(IGNORE_INDEX).sum())
