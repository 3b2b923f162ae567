"""Loading a downloaded model (or a base model plus a LoRA adapter) for serving."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from kubetune.errors import InvalidInputError

log = logging.getLogger(__name__)

Task = Literal["generate", "classify"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Classification heads that peft keeps whole (modules_to_save) when it trains a LoRA classifier.
_HEAD_SUFFIXES = ("score.weight", "classifier.weight", "classifier.out_proj.weight")


@dataclass
class LoadedModel:
    """A model ready to serve."""

    model: Any  # a transformers PreTrainedModel in eval mode
    tokenizer: PreTrainedTokenizerBase
    task: Task
    max_context: int
    """Longest prompt plus completion the model's positions allow."""
    eos_token_ids: list[int]
    pad_token_id: int
    id2label: dict[int, str]
    multi_label: bool


def load(
    model_dir: Path,
    adapter_dir: Path | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
) -> LoadedModel:
    """Load a model directory (optionally with a peft LoRA adapter merged into it) for serving.

    Raises InvalidInputError with the directory and the reason when it is not a usable model.
    """
    target = _device(device)
    config = _read_config(model_dir)
    adapter = _read_adapter_config(adapter_dir) if adapter_dir is not None else None
    task = _task(config, adapter)
    tokenizer = _load_tokenizer(adapter_dir if adapter_dir and _has_tokenizer(adapter_dir) else model_dir)
    kwargs: dict[str, Any] = {"dtype": _dtype(dtype, target, config)}
    if task == "classify" and adapter_dir is not None:
        # A LoRA classifier's head is trained from scratch, so its size comes from the adapter.
        num_labels = _adapter_num_labels(adapter_dir)
        if num_labels is not None and num_labels != getattr(config, "num_labels", None):
            kwargs["num_labels"] = num_labels
        # Label names, when the fine-tuning run saved its config next to the adapter.
        labels = _adapter_labels(adapter_dir)
        if labels and len(labels) == kwargs.get("num_labels", getattr(config, "num_labels", None)):
            kwargs["id2label"] = labels
            kwargs["label2id"] = {name: i for i, name in labels.items()}
    auto = AutoModelForSequenceClassification if task == "classify" else AutoModelForCausalLM
    model: Any  # transformers' annotations of from_pretrained disagree with its other methods'
    try:
        model = auto.from_pretrained(str(model_dir), **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise InvalidInputError(f"{model_dir}: cannot load the model: {exc}") from exc
    if adapter_dir is not None:
        model = _merge_adapter(model, adapter_dir, tokenizer)
    model.to(target).eval()
    pad_token_id = _pad_id(tokenizer)
    if getattr(model.config, "pad_token_id", None) is None:
        # Classifiers find each row's last real token through the pad id; batches need one.
        model.config.pad_token_id = pad_token_id
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        task=task,
        max_context=_max_context(model.config, tokenizer),
        eos_token_ids=_eos_ids(model, tokenizer),
        pad_token_id=pad_token_id,
        id2label={int(k): str(v) for k, v in (model.config.id2label or {}).items()},
        multi_label=getattr(model.config, "problem_type", None) == "multi_label_classification",
    )


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInputError(f"--device {device}: no CUDA device is available")
    return torch.device(device)


def _dtype(dtype: str, device: torch.device, config: Any) -> torch.dtype | str:
    if dtype != "auto":
        return getattr(torch, dtype)  # type: ignore[no-any-return]
    if device.type == "cpu":
        # Half precision on CPU is slower than float32 and loses accuracy; quantized checkpoints
        # keep their own storage format whatever is asked here.
        return torch.float32
    return "auto" if getattr(config, "dtype", None) not in (None, torch.float32) else torch.bfloat16


def _read_config(model_dir: Path) -> Any:
    if not (model_dir / "config.json").exists():
        found = sorted(p.name for p in model_dir.iterdir())[:10] if model_dir.is_dir() else []
        raise InvalidInputError(
            f"{model_dir}: not a Hugging Face model directory (no config.json; found {found or 'nothing'})"
        )
    try:
        return AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidInputError(f"{model_dir}/config.json: {exc}") from exc


def _read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise InvalidInputError(f"{adapter_dir}: not a peft adapter directory (no adapter_config.json)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise InvalidInputError(f"{path}: expected a JSON object")
    return data


def _task(config: Any, adapter: dict[str, Any] | None) -> Task:
    if adapter is not None and adapter.get("task_type"):
        return "classify" if adapter["task_type"] == "SEQ_CLS" else "generate"
    architectures = getattr(config, "architectures", None) or []
    return "classify" if any(a.endswith("ForSequenceClassification") for a in architectures) else "generate"


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in _TOKENIZER_FILES)


def _load_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    if not _has_tokenizer(directory):
        raise InvalidInputError(
            f"{directory}: no tokenizer files (expected one of {', '.join(_TOKENIZER_FILES)})"
        )
    try:
        tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidInputError(f"{directory}: cannot load the tokenizer: {exc}") from exc
    return tokenizer


def _adapter_num_labels(adapter_dir: Path) -> int | None:
    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open objects are not iterable)
            if key.endswith(_HEAD_SUFFIXES) and "lora_" not in key:
                return int(f.get_slice(key).get_shape()[0])
    return None


def _adapter_labels(adapter_dir: Path) -> dict[int, str] | None:
    path = adapter_dir / "config.json"
    if not path.is_file():
        return None
    try:
        id2label = json.loads(path.read_text()).get("id2label")
    except (json.JSONDecodeError, AttributeError):
        return None
    return {int(k): str(v) for k, v in id2label.items()} if isinstance(id2label, dict) else None


def _merge_adapter(model: Any, adapter_dir: Path, tokenizer: PreTrainedTokenizerBase) -> Any:
    from peft import PeftModel

    # Tokens added during fine-tuning (and saved with the adapter's tokenizer) need rows in the
    # embedding matrix before the adapter's weights fit.
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise InvalidInputError(f"{adapter_dir}: cannot apply the adapter to the base model: {exc}") from exc
    # Merged weights serve at the base model's speed; the adapter is never changed while serving.
    return peft_model.merge_and_unload()


def _max_context(config: Any, tokenizer: PreTrainedTokenizerBase) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    return 4096


def _eos_ids(model: Any, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids: set[int] = set()
    generation_config = getattr(model, "generation_config", None)
    for source in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list):
            ids.update(int(i) for i in source)
    return sorted(ids)


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if isinstance(candidate, int):
            return candidate
    return 0
