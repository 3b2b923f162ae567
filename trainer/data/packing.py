"""Sample packing (``dataset.packing: true``): short records laid end to end in ``maxSeqLength``
windows instead of each padded to its batch's longest.

trl's :func:`~trl.data_utils.pack_dataset` builds the windows (best-fit decreasing, so a record is
never cut across windows) and records each one's ``seq_lengths``. :func:`packed_collator` then
keeps each window a row of the batch, ``position_ids`` restarting at every record and no
``attention_mask``, with the first label of every record masked (only the previous record's last
token would predict it), so a record's loss never reaches into its neighbour; every other label
is the record's own (response-only for instruction, assistant-only for chat, as :mod:`.formats`
made them). Not trl's padding-free collator itself: it flattens the whole batch into one row,
which suits varlen kernels but makes attention without them (sdpa, eager: CPU, and GPUs without
flash-attention) cost ``(batch x maxSeqLength)^2`` instead of ``batch x maxSeqLength^2``. Its
position-id helper is reused.

Records do not attend to each other: with flash-attention-2 the kernels take the record
boundaries from ``cu_seq_lens_q/k`` (over the batch's rows laid end to end, as its varlen path
flattens them); with sdpa and eager, transformers' mask builder sees the restarting
``position_ids`` without an ``attention_mask`` and builds a block-diagonal causal mask per row.
Both need a model run without a KV cache (a cache switches that detection off), which training
never uses: the collator passes ``use_cache=False``. The few padding tokens after a window's
records form a segment of their own, without loss.

Evaluation batches go through the same collator unpacked (one record per row), so the
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
    """Batches of packed windows (or of unpacked records, for evaluation), as the module
    docstring describes."""
    import torch
    from torch.nn.utils.rnn import pad_sequence
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    def collate(features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        lengths = [list(f.get("seq_lengths") or [len(f["input_ids"])]) for f in features]
        longest = max(sum(row) for row in lengths)
        # Padding after a window's records is a segment of its own.
        segments = [row + ([longest - sum(row)] if sum(row) < longest else []) for row in lengths]
        positions = DataCollatorForLanguageModeling.get_position_ids_from_packed_seq_lengths(segments)
        ids = pad_sequence(
            [torch.tensor(list(f["input_ids"]), dtype=torch.long) for f in features],
            batch_first=True,
            padding_value=pad_id,
        )
        labels = pad_sequence(
            [torch.tensor(list(f["labels"]), dtype=torch.long) for f in features],
            batch_first=True,
            padding_value=IGNORE_INDEX,
        )
        position_ids = torch.stack(positions)
        labels[position_ids == 0] = IGNORE_INDEX
        flat = [n for row in segments for n in row]
        cu_seq_lens = torch.tensor([0, *flat], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return {
            "input_ids": ids,
            "labels": labels,
            "position_ids": position_ids,
            "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": max(flat),
            "max_length_k": max(flat),
            "use_cache": False,
        }

    return collate


def loss_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """Labels that carry loss in a collated causal-LM batch (a causal LM never predicts a row's
    first token, so that label never counts)."""
    return int(batch["labels"][..., 1:].ne(IGNORE_INDEX).sum())
