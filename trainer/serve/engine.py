"""Dynamic batching: one worker thread owns the model and serves every request through it.

Generation uses continuous batching. Waiting sequences join the running batch between decoding
steps: they are prefilled together (left padded), and their KV cache is left padded to the running
batch's length and concatenated to it. Each step then runs one forward pass for every running
sequence. Finished or cancelled sequences leave the batch at once and their slot is reused.

Greedy decoding in a batch gives the same tokens as alone: padded key positions are masked out
and every row's ``position_ids`` count only its real tokens, which is exactly what
``model.generate`` does for left-padded batches.

Results cross from the worker thread into the event loop with one ``call_soon_threadsafe`` per
step, so a step's cost does not grow with the number of waiting HTTP handlers.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

log = logging.getLogger(__name__)

FINISH_STOP: Final = "stop"
FINISH_LENGTH: Final = "length"
FINISH_ERROR: Final = "error"


class QueueFullError(Exception):
    """The engine's waiting queue cannot take the request; the client should retry later."""


class EngineStoppedError(Exception):
    """The engine is shutting down and accepts no new work."""


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is decoded. ``temperature == 0`` means greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False


@dataclass
class StepOutput:
    """What one sequence got from one engine step."""

    index: int
    """The sequence's ``index`` (its choice number within its request)."""
    token_id: int | None
    finish_reason: str | None = None
    error: str | None = None


@dataclass(eq=False)
class GenerationSequence:
    """One sequence being generated (one choice of one request).

    ``outputs`` is filled in the event loop's thread and read by the handler that submitted the
    sequence; the choices of one request share it and tell their outputs apart by ``index``.
    ``cancel()`` may be called from any thread.
    """

    prompt_ids: list[int]
    params: SamplingParams
    outputs: asyncio.Queue[StepOutput] = field(default_factory=asyncio.Queue)
    index: int = 0
    # Engine-side state, touched only by the worker thread.
    generated: int = 0
    last_token: int = -1
    generator: torch.Generator | None = None
    cancelled: bool = False

    def cancel(self) -> None:
        # A plain bool write is atomic under the GIL; the worker checks it once per step.
        self.cancelled = True


@dataclass(eq=False)
class ClassificationJob:
    """One text to classify; ``result`` is resolved in the event loop with the probabilities."""

    input_ids: list[int]
    result: asyncio.Future[list[float]]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


EngineObserver = Callable[[str, int], None]
"""Called from the worker thread with ("prefill" | "decode" | "classify", batch size)."""


class _Worker(ABC):
    """A bounded waiting queue drained by one daemon thread that runs ``_work``."""

    def __init__(
        self, name: str, loop: asyncio.AbstractEventLoop, max_batch_size: int, max_queue: int
    ) -> None:
        self.loop = loop
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._waiting: deque[Any] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the work already accepted, then end the thread. New submissions are refused."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _submit(self, items: Sequence[Any]) -> None:
        # All choices of a request enter together or not at all, so a 429 never leaves half a
        # request running.
        with self._cond:
            if self._stopping:
                raise EngineStoppedError("the server is shutting down")
            if len(self._waiting) + len(items) > self.max_queue:
                raise QueueFullError(
                    f"the server's queue is full ({len(self._waiting)} waiting, limit {self.max_queue}); retry later"
                )
            self._waiting.extend(items)
            self._cond.notify()

    def _take(self, limit: int, block: bool) -> list[Any] | None:
        """Up to ``limit`` waiting items, skipping cancelled ones; None once stopped and drained."""
        with self._cond:
            while block and not self._waiting and not self._stopping:
                self._cond.wait()
            taken: list[Any] = []
            while self._waiting and len(taken) < limit:
                item = self._waiting.popleft()
                if not item.cancelled:
                    taken.append(item)
            if not taken and block and self._stopping and not self._waiting:
                return None
            return taken

    def _run(self) -> None:
        with torch.inference_mode():
            self._work()

    @abstractmethod
    def _work(self) -> None:
        """The worker thread's loop: take waiting requests, run them, answer them."""


class GenerationEngine(_Worker):
    """Continuous batching for a causal LM. Create it in the event loop that will read results."""

    def __init__(
        self,
        model: Any,
        *,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        max_context: int,
        loop: asyncio.AbstractEventLoop,
        max_batch_size: int = 16,
        max_queue: int = 256,
        observer: EngineObserver | None = None,
    ) -> None:
        super().__init__("generation-engine", loop, max_batch_size, max_queue)
        self.model = model
        self.device: torch.device = next(model.parameters()).device
        self.eos_token_ids = frozenset(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.max_context = max_context
        self._observer = observer
        # The running batch: one row per sequence, all rows left padded to the cache length.
        self._rows: list[GenerationSequence] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None
        # Caches with sliding-window or recurrent layers cannot be padded and joined; such models
        # admit new sequences only when the batch is empty (static batching).
        self._can_join: bool | None = None

    @property
    def running(self) -> int:
        return len(self._rows)

    def submit(self, sequences: Sequence[GenerationSequence]) -> None:
        """Queue sequences; raises QueueFullError or EngineStoppedError. Thread-safe."""
        for seq in sequences:
            if seq.params.seed is not None:
                seq.generator = torch.Generator(device=self.device).manual_seed(seq.params.seed)
        self._submit(sequences)

    def _work(self) -> None:
        while True:
            free = self.max_batch_size - len(self._rows)
            if self._rows and self._can_join is False:
                free = 0
            new = self._take(free, block=not self._rows) if free > 0 else []
            if new is None:
                return
            try:
                if new:
                    self._prefill(new)
                if self._rows:
                    self._decode()
            except Exception as exc:
                # A failing step (out of memory, a model bug) fails the sequences in it, never the
                # engine: later requests get a fresh batch.
                log.exception("generation step failed")
                failed = {id(s): s for s in (*self._rows, *(new or [])) if not s.cancelled}.values()
                error = f"{type(exc).__name__}: {exc}"
                self._deliver([(s, StepOutput(s.index, None, FINISH_ERROR, error)) for s in failed])
                self._rows, self._cache, self._mask = [], None, None

    def _prefill(self, new: list[GenerationSequence]) -> None:
        width = max(len(s.prompt_ids) for s in new)
        ids = torch.full((len(new), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(new), width), dtype=torch.long)
        for row, seq in enumerate(new):
            n = len(seq.prompt_ids)
            ids[row, width - n :] = torch.tensor(seq.prompt_ids, dtype=torch.long)
            mask[row, width - n :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=_positions(mask),
            past_key_values=cache,
            use_cache=True,
        )
        if self._can_join is None:
            self._can_join = all(type(layer) is DynamicLayer for layer in cache.layers)
        if self._observer:
            self._observer("prefill", len(new))
        keep = self._advance(new, out.logits[:, -1, :])
        if not keep:
            return
        index = torch.tensor(keep, device=self.device)
        new_rows = [new[i] for i in keep]
        if self._cache is None or self._mask is None:
            cache.batch_select_indices(index)
            self._rows, self._cache, self._mask = new_rows, cache, mask[index]
        else:
            self._cache, self._mask = _join(self._cache, self._mask, cache, mask, index)
            self._rows = self._rows + new_rows

    def _decode(self) -> None:
        assert self._cache is not None
        assert self._mask is not None
        ids = torch.tensor([[s.last_token] for s in self._rows], dtype=torch.long, device=self.device)
        mask = torch.cat([self._mask, self._mask.new_ones((len(self._rows), 1))], dim=1)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=mask.sum(dim=1, keepdim=True) - 1,
            past_key_values=self._cache,
            use_cache=True,
        )
        if self._observer:
            self._observer("decode", len(self._rows))
        keep = self._advance(self._rows, out.logits[:, -1, :])
        if len(keep) == len(self._rows):
            self._mask = mask
            return
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep, device=self.device)
        self._cache.batch_select_indices(index)
        self._rows, self._mask = [self._rows[i] for i in keep], mask[index]
        # Columns that are padding in every remaining row cost compute and hold no information.
        leading = int((self._mask.sum(dim=0) == 0).int().cumprod(dim=0).sum().item())
        if leading and self._can_join:
            self._mask = self._mask[:, leading:]
            for layer in _dynamic_layers(self._cache):
                layer.keys = _kv(layer)[0][..., leading:, :]
                layer.values = _kv(layer)[1][..., leading:, :]

    def _advance(self, rows: list[GenerationSequence], logits: torch.Tensor) -> list[int]:
        """Pick each row's next token, hand it to its reader, and return the rows that go on."""
        tokens = self._sample(rows, logits)
        keep: list[int] = []
        updates: list[tuple[GenerationSequence, StepOutput]] = []
        for i, (seq, token) in enumerate(zip(rows, tokens, strict=True)):
            if seq.cancelled:
                continue
            seq.generated += 1
            seq.last_token = token
            finish: str | None = None
            if token in self.eos_token_ids and not seq.params.ignore_eos:
                finish = FINISH_STOP
            elif (
                seq.generated >= seq.params.max_tokens
                or len(seq.prompt_ids) + seq.generated >= self.max_context
            ):
                finish = FINISH_LENGTH
            updates.append((seq, StepOutput(seq.index, token, finish)))
            if finish is None:
                keep.append(i)
        self._deliver(updates)
        return keep

    def _sample(self, rows: list[GenerationSequence], logits: torch.Tensor) -> list[int]:
        chosen = logits.argmax(dim=-1).tolist()
        for i, seq in enumerate(rows):
            if seq.params.temperature > 0 and not seq.cancelled:
                chosen[i] = _sample_one(logits[i], seq.params, seq.generator)
        return [int(t) for t in chosen]

    def _deliver(self, updates: list[tuple[GenerationSequence, StepOutput]]) -> None:
        if updates:
            self.loop.call_soon_threadsafe(_put_all, updates)


class ClassificationEngine(_Worker):
    """Batches waiting texts into one padded forward pass of a sequence classifier."""

    def __init__(
        self,
        model: Any,
        *,
        pad_token_id: int,
        multi_label: bool,
        loop: asyncio.AbstractEventLoop,
        max_batch_size: int = 16,
        max_queue: int = 256,
        observer: EngineObserver | None = None,
    ) -> None:
        super().__init__("classification-engine", loop, max_batch_size, max_queue)
        self.model = model
        self.device: torch.device = next(model.parameters()).device
        self.pad_token_id = pad_token_id
        self.multi_label = multi_label
        self._observer = observer

    @property
    def running(self) -> int:
        return 0

    def submit(self, jobs: Sequence[ClassificationJob]) -> None:
        """Queue jobs; raises QueueFullError or EngineStoppedError. Thread-safe."""
        self._submit(jobs)

    def _work(self) -> None:
        while True:
            jobs = self._take(self.max_batch_size, block=True)
            if jobs is None:
                return
            if not jobs:
                continue
            try:
                probs = self._classify(jobs)
            except Exception as exc:
                log.exception("classification step failed")
                self.loop.call_soon_threadsafe(_fail_all, jobs, exc)
            else:
                self.loop.call_soon_threadsafe(_resolve_all, jobs, probs)

    def _classify(self, jobs: list[ClassificationJob]) -> list[list[float]]:
        # Right padding: every classifier head in transformers finds its token (first, or last
        # non-padding) from the attention mask or pad_token_id either way.
        width = max(len(j.input_ids) for j in jobs)
        ids = torch.full((len(jobs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for row, job in enumerate(jobs):
            ids[row, : len(job.input_ids)] = torch.tensor(job.input_ids, dtype=torch.long)
            mask[row, : len(job.input_ids)] = 1
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits.float()
        if self._observer:
            self._observer("classify", len(jobs))
        probs = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
        result: list[list[float]] = probs.cpu().tolist()
        return result


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: real tokens count from 0; padding gets 1 (ignored)."""
    positions = mask.cumsum(dim=-1) - 1
    return positions.masked_fill(mask == 0, 1)


def _join(
    cache: DynamicCache,
    mask: torch.Tensor,
    new_cache: DynamicCache,
    new_mask: torch.Tensor,
    index: torch.Tensor,
) -> tuple[DynamicCache, torch.Tensor]:
    """The running batch's cache with rows ``index`` of a freshly prefilled cache appended."""
    width = max(mask.shape[1], new_mask.shape[1])
    layers = []
    for old, new in zip(_dynamic_layers(cache), _dynamic_layers(new_cache), strict=True):
        (old_keys, old_values), (new_keys, new_values) = _kv(old), _kv(new)
        keys = torch.cat([_pad_left(old_keys, width, dim=-2), _pad_left(new_keys[index], width, dim=-2)])
        values = torch.cat(
            [_pad_left(old_values, width, dim=-2), _pad_left(new_values[index], width, dim=-2)]
        )
        layers.append((keys, values))
    joined_mask = torch.cat([_pad_left(mask, width, dim=-1), _pad_left(new_mask[index], width, dim=-1)])
    return DynamicCache(ddp_cache_data=layers), joined_mask


def _dynamic_layers(cache: DynamicCache) -> list[DynamicLayer]:
    layers = []
    for layer in cache.layers:
        assert type(layer) is DynamicLayer, f"cannot join caches with {type(layer).__name__} layers"
        layers.append(layer)
    return layers


def _kv(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor]:
    assert layer.keys is not None
    assert layer.values is not None
    return layer.keys, layer.values


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _sample_one(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    scaled = logits.float() / params.temperature
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
        drop = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= params.top_p
        scaled = scaled.scatter(0, order[drop], float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def _put_all(updates: list[tuple[GenerationSequence, StepOutput]]) -> None:
    for seq, output in updates:
        seq.outputs.put_nowait(output)


def _resolve_all(jobs: list[ClassificationJob], probs: list[list[float]]) -> None:
    for job, p in zip(jobs, probs, strict=True):
        if not job.result.done():
            job.result.set_result(p)


def _fail_all(jobs: list[ClassificationJob], exc: Exception) -> None:
    for job in jobs:
        if not job.result.done():
            job.result.set_exception(RuntimeError(f"{type(exc).__name__}: {exc}"))
