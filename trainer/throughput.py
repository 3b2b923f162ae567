"""How much of each training batch is useful: tokens per second and the padding share.

:class:`MeasuredTrainer` is the transformers Trainer that also counts, for every training
micro-batch, its token slots and the tokens that are not padding (all of them in a packed batch,
which has none). Every training log (``loggingEverySteps``) then carries, for all processes
together since the previous log, ``tokens_per_second`` (tokens that are not padding) and
``padding_share`` (padding over token slots); the progress reporter shows both, and
:attr:`MeasuredTrainer.padding_share` over the whole session goes into ``metrics.json``'s usage.

Packed batches carry no ``attention_mask``, so their padding is counted by the tokenizer's pad
token, as the Trainer counts ``num_input_tokens_seen``; a tokenizer without one pads with EOS
and its (few, packed windows being nearly full) padding tokens count as tokens.

The counts stay on the device until a log, so measuring adds no host synchronisation per step;
the log reduces them across processes at a point every process reaches together (the Trainer
gathers the loss there too).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from transformers import Trainer

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator


class _Window:
    """Token counts of the micro-batches since the last log."""

    def __init__(self) -> None:
        self.tokens: torch.Tensor | None = None
        self.slots: torch.Tensor | None = None
        self.started: float | None = None

    def add(self, inputs: dict[str, Any], pad_id: int | None) -> None:
        ids = inputs.get("input_ids")
        if ids is None:
            return
        # As the Trainer counts num_input_tokens_seen: packed batches have no attention_mask
        # (it would let records attend to each other), so their padding is told by its token.
        mask = inputs.get("attention_mask")
        if mask is not None:
            tokens = mask.sum()
        elif pad_id is not None:
            tokens = (ids != pad_id).sum()
        else:
            tokens = ids.new_tensor(ids.numel())
        slots = ids.new_tensor(ids.numel())
        self.tokens = tokens if self.tokens is None else self.tokens + tokens
        self.slots = slots if self.slots is None else self.slots + slots
        if self.started is None:
            self.started = time.monotonic()

    def flush(self, accelerator: Accelerator, device: torch.device) -> tuple[int, int, float]:
        """``(tokens, slots, seconds)`` of every process since the last flush; resets the window.
        Every process must call it at the same point (it is a collective)."""
        import torch

        counts = torch.stack(
            [
                (self.tokens if self.tokens is not None else torch.zeros((), dtype=torch.long)).to(device),
                (self.slots if self.slots is not None else torch.zeros((), dtype=torch.long)).to(device),
            ]
        ).to(torch.long)
        total = accelerator.reduce(counts, reduction="sum")
        seconds = time.monotonic() - self.started if self.started is not None else 0.0
        self.tokens = self.slots = self.started = None
        return int(total[0]), int(total[1]), seconds


class MeasuredTrainer(Trainer):
    """The Trainer, measuring its training batches (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._window = _Window()
        self.session_tokens = 0
        """Tokens that are not padding, all processes, this session."""
        self.session_slots = 0
        """Token slots of the training batches, all processes, this session."""

    @property
    def padding_share(self) -> float | None:
        """Padding over token slots of this session's training batches (``None`` before any)."""
        if not self.session_slots:
            return None
        return round(1 - self.session_tokens / self.session_slots, 4)

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        self._window.add(inputs, getattr(self.processing_class, "pad_token_id", None))
        return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # "loss": the periodic training log; "train_loss": the summary at the end of training.
        # Both are logged by every process at the same step.
        if "loss" in logs or "train_loss" in logs:
            logs = {**logs, **self._measured()}
        super().log(logs, start_time)

    def _measured(self) -> dict[str, float]:
        tokens, slots, seconds = self._window.flush(self.accelerator, self.args.device)
        self.session_tokens += tokens
        self.session_slots += slots
        if not slots:
            return {}
        measured = {"padding_share": round(1 - tokens / slots, 4)}
        if seconds > 0:
            measured["tokens_per_second"] = round(tokens / seconds, 2)
        return measured
