"""Before/after measurements of a model directory: quality on held-out data, size on disk,
parameter count.

Quality is measured by loading the directory with ``from_pretrained`` (so the figures are those of
what a user downloads, compressed-tensors and torchao checkpoints decompressed or dispatched by
transformers exactly as at serving time) on the same examples for both models:

- causal LM: mean next-token negative log-likelihood over every label token of every example
  (token-weighted, padding and prompt tokens excluded) and its exponential, the perplexity;
- sequence classification: accuracy and macro-F1 of the argmax class, and the mean cross-entropy.

Sizes: ``size_bytes`` is the sum of the weight files (``*.safetensors``, ``*.bin``, ``*.pt``,
``*.pth``) in the directory, i.e. what is stored and downloaded; config and tokenizer files are
left out since compression does not change them. ``linear_weight_bytes`` restricts that to the
tensors of the linear layers that quantization targets (their weights and, once quantized, their
packed weights, scales, zero points and group indices, or torchao's flattened int8 data and
scales), read from the safetensors headers
without loading any tensor: with a small vocabulary-heavy model the embeddings dominate the file,
and this figure shows what the quantizer itself achieved.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from kubetune.api.spec import TaskType
from kubetune.errors import InvalidInputError
from kubetune.trainer.data.formats import IGNORE_INDEX

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES: Final = (".safetensors", ".bin", ".pt", ".pth")
# exp() of a larger mean loss overflows a double, and JSON has no infinity.
_MAX_LOG_PERPLEXITY: Final = 700.0
# Tensors a compressed linear layer stores in place of ``weight`` (compressed-tensors formats).
_LINEAR_TENSOR_NAMES: Final = frozenset(
    {
        "weight",
        "weight_packed",
        "weight_scale",
        "weight_zero_point",
        "weight_g_idx",
        "weight_shape",
        "weight_global_scale",
        "input_scale",
        "input_zero_point",
        "compressed",
        "bitmask",
        "row_offsets",
        "shape",
        "meta",
    }
)


@dataclass
class ModelMeasures:
    """One side of the report (``original`` or ``compressed``)."""

    size_bytes: int
    parameters: int
    nonzero_parameters: int
    linear_weight_bytes: int | None
    metrics: dict[str, float]
    weight_files: list[str] = field(default_factory=list)
    dtype: str | None = None
    format: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def weight_files(model_dir: Path) -> list[Path]:
    return sorted(p for p in model_dir.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def size_on_disk(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in weight_files(model_dir))


def _safetensors_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header: dict[str, Any] = json.loads(f.read(length))
    return header


def tensor_bytes(model_dir: Path) -> dict[str, int] | None:
    """Stored bytes of every tensor, by name, from the safetensors headers; ``None`` when the
    weights are not (only) in safetensors files."""
    files = weight_files(model_dir)
    if not files or any(not p.name.endswith(".safetensors") for p in files):
        return None
    sizes: dict[str, int] = {}
    for path in files:
        for name, info in _safetensors_header(path).items():
            if name != "__metadata__":
                start, end = info["data_offsets"]
                sizes[name] = int(end) - int(start)
    return sizes


def linear_weight_bytes(model_dir: Path, modules: Iterable[str]) -> int | None:
    """Bytes of the tensors that belong to the named linear modules (see the module docstring)."""
    sizes = tensor_bytes(model_dir)
    if sizes is None:
        return None
    wanted = set(modules)
    total = 0
    for name, size in sizes.items():
        module, _, tensor = name.rpartition(".")
        # torchao's safetensors flatten a quantized weight into ``_weight_qdata``, ``_weight_scale``...
        if module in wanted and (tensor in _LINEAR_TENSOR_NAMES or tensor.startswith("_weight_")):
            total += size
    return total


def checkpoint_format(model_dir: Path) -> str:
    """``compressed-tensors``, ``torchao`` or ``dense`` (plain safetensors/bin weights)."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "dense"
    method = (config.get("quantization_config") or {}).get("quant_method")
    return str(method) if method else "dense"


# --- loading -------------------------------------------------------------------------------------


def load_for_task(
    model_dir: Path, task: TaskType, *, dtype: torch.dtype | str, device: str, what: str
) -> PreTrainedModel:
    """The model in ``model_dir`` with the task's head, in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto: Any = (
        AutoModelForSequenceClassification
        if task == TaskType.sequence_classification
        else AutoModelForCausalLM
    )
    try:
        model = auto.from_pretrained(model_dir, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise InvalidInputError(f"{what}: cannot load it as a {task.value} model: {e}") from e
    model.to(device)
    model.eval()
    loaded: PreTrainedModel = model
    return loaded


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters) as the model's layers see them: a quantized weight counts
    as its logical shape (compressed-tensors decompresses on the first forward pass, torchao
    tensors report their logical shape), and quantization scales and zero points are not counted."""
    total = 0
    nonzero = 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if name in _QUANTIZATION_AUX or not (p.is_floating_point() or hasattr(p, "dequantize")):
                continue
            total += p.numel()
            dense = p.dequantize() if type(p.data) is not _tensor_type() and hasattr(p, "dequantize") else p
            nonzero += int(dense.count_nonzero().item())
    return total, nonzero


def _tensor_type() -> type:
    import torch

    return torch.Tensor


# Parameters that describe a quantized weight rather than being weights of the network.
_QUANTIZATION_AUX: Final = frozenset(
    {
        "weight_scale",
        "weight_zero_point",
        "weight_g_idx",
        "weight_shape",
        "weight_global_scale",
        "input_scale",
        "input_zero_point",
        "input_global_scale",
        "output_scale",
        "output_zero_point",
    }
)


# --- quality -------------------------------------------------------------------------------------


def _batches(examples: Sequence[Mapping[str, Any]], batch_size: int) -> Iterable[Sequence[Mapping[str, Any]]]:
    # Longest first: similar lengths share a batch, so little compute is spent on padding.
    ordered = sorted(examples, key=lambda e: len(e["input_ids"]), reverse=True)
    for start in range(0, len(ordered), batch_size):
        yield ordered[start : start + batch_size]


def _pad(rows: Sequence[Sequence[int]], value: int) -> list[list[int]]:
    width = max(len(r) for r in rows)
    return [list(r) + [value] * (width - len(r)) for r in rows]


def _scored_batches(
    model: torch.nn.Module,
    examples: Sequence[Mapping[str, Any]],
    pad_id: int,
    device: str,
    batch_size: int,
) -> Iterator[tuple[Sequence[Mapping[str, Any]], torch.Tensor]]:
    """Each batch of examples with the model's float32 logits for it (inputs padded with ``pad_id``)."""
    import torch

    for batch in _batches(examples, batch_size):
        ids = torch.tensor(_pad([e["input_ids"] for e in batch], pad_id), device=device)
        mask = torch.tensor(_pad([e["attention_mask"] for e in batch], 0), device=device)
        yield batch, model(input_ids=ids, attention_mask=mask).logits.float()


def causal_lm_metrics(
    model: torch.nn.Module,
    examples: Sequence[Mapping[str, Any]],
    *,
    pad_id: int,
    device: str,
    batch_size: int = 8,
) -> tuple[dict[str, float], int]:
    """(``{eval_loss, perplexity}``, scored tokens): token-weighted over every label token."""
    import torch
    import torch.nn.functional as F

    total = 0.0
    tokens = 0
    with torch.inference_mode():
        for batch, logits in _scored_batches(model, examples, pad_id, device, batch_size):
            labels = torch.tensor(_pad([e["labels"] for e in batch], IGNORE_INDEX), device=device)
            shifted = labels[:, 1:]
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                shifted.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            total += float(loss)
            tokens += int((shifted != IGNORE_INDEX).sum())
    if tokens == 0:
        raise InvalidInputError(
            "the evaluation data has no tokens to score (every record is empty after tokenization)"
        )
    mean = total / tokens
    return {"eval_loss": mean, "perplexity": math.exp(min(mean, _MAX_LOG_PERPLEXITY))}, tokens


def classification_metrics(
    model: torch.nn.Module,
    examples: Sequence[Mapping[str, Any]],
    *,
    pad_id: int,
    device: str,
    batch_size: int = 16,
) -> tuple[dict[str, float], int]:
    """(``{eval_loss, accuracy, f1_macro}``, examples scored)."""
    import torch
    import torch.nn.functional as F
    from sklearn.metrics import accuracy_score, f1_score

    predicted: list[int] = []
    truth: list[int] = []
    total = 0.0
    with torch.inference_mode():
        for batch, logits in _scored_batches(model, examples, pad_id, device, batch_size):
            labels = torch.tensor([int(e["labels"]) for e in batch], device=device)
            total += float(F.cross_entropy(logits, labels, reduction="sum"))
            predicted.extend(logits.argmax(dim=-1).tolist())
            truth.extend(labels.tolist())
    if not truth:
        raise InvalidInputError("the evaluation data has no examples")
    metrics = {
        "eval_loss": total / len(truth),
        "accuracy": float(accuracy_score(truth, predicted)),
        "f1_macro": float(f1_score(truth, predicted, average="macro", zero_division=0)),
    }
    return metrics, len(truth)


def measure(
    model_dir: Path,
    *,
    task: TaskType,
    examples: Sequence[Mapping[str, Any]],
    pad_id: int,
    ignore: Sequence[str],
    dtype: torch.dtype | str,
    device: str,
    what: str,
) -> tuple[ModelMeasures, int]:
    """Load ``model_dir`` and measure it; returns the measures and the number of tokens (causal
    LM) or examples (classification) scored. ``ignore`` names the linear layers quantization
    leaves alone (left out of ``linear_weight_bytes``)."""
    from compressed_tensors.utils import match_named_modules

    model = load_for_task(model_dir, task, dtype=dtype, device=device, what=what)
    linear_modules = [name for name, _ in match_named_modules(model, ["Linear"], list(ignore))]
    if task == TaskType.sequence_classification:
        metrics, scored = classification_metrics(model, examples, pad_id=pad_id, device=device)
    else:
        metrics, scored = causal_lm_metrics(model, examples, pad_id=pad_id, device=device)
    # After the forward passes: compressed-tensors weights are decompressed by then.
    parameters, nonzero = count_parameters(model)
    model_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    del model
    measures = ModelMeasures(
        size_bytes=size_on_disk(model_dir),
        parameters=parameters,
        nonzero_parameters=nonzero,
        linear_weight_bytes=linear_weight_bytes(model_dir, linear_modules),
        metrics=metrics,
        weight_files=[p.relative_to(model_dir).as_posix() for p in weight_files(model_dir)],
        dtype=_stored_dtype(model_dir) or model_dtype,
        format=checkpoint_format(model_dir),
    )
    log.info("%s: %s", what, {k: round(v, 4) for k, v in metrics.items()})
    return measures, scored


def _stored_dtype(model_dir: Path) -> str | None:
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = config.get("dtype") or config.get("torch_dtype")
    return str(value) if value else None
