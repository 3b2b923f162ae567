"""Tiny model builders that only the tests use, on top of :mod:`kubetune.trainer.tinymodel`.

The causal LM builder stays in the runtime package (``kubetune quickstart-data`` and the benchmarks
build with it); the sequence classifier is built for tests alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import torch
from tokenizers import processors
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedConfig,
    PreTrainedModel,
)

from kubetune.trainer.tinymodel import (
    BOS_TOKEN,
    EOS_TOKEN,
    build_tokenizer,
    config_kwargs,
    save_model,
    special_ids,
    wrap_tokenizer,
)


def build_tiny_classifier(
    out_dir: Path,
    corpus: Iterable[str],
    num_labels: int,
    *,
    labels: Sequence[str] | None = None,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position: int = 256,
    arch: Literal["llama", "bert"] = "llama",
    seed: int = 0,
) -> Path:
    """Write a randomly initialised sequence classifier plus its tokenizer to ``out_dir``.

    ``labels`` names the classes (``config.id2label``); default ``LABEL_0 ...``. A ``llama``
    classifier scores the last non-padding token; a ``bert`` one scores the first, so its tokenizer
    wraps every input as ``<s> text </s>``.
    """
    if num_labels < 1:
        raise ValueError(f"num_labels={num_labels} must be at least 1")
    names = list(labels) if labels is not None else [f"LABEL_{i}" for i in range(num_labels)]
    if len(names) != num_labels:
        raise ValueError(f"labels has {len(names)} names but num_labels={num_labels}")
    tokenizer = build_tokenizer(corpus, vocab_size)
    ids = special_ids(tokenizer)
    id2label = dict(enumerate(names))
    label2id = {name: i for i, name in enumerate(names)}
    config: PreTrainedConfig
    model: PreTrainedModel
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(
            **config_kwargs(tokenizer, ids, hidden_size, num_layers, num_heads, max_position),
            num_key_value_heads=num_heads,
            id2label=id2label,
            label2id=label2id,
        )
        config.num_labels = num_labels
        model = LlamaForSequenceClassification(config)  # type: ignore[no-untyped-call]
    elif arch == "bert":
        config = BertConfig(
            **config_kwargs(tokenizer, ids, hidden_size, num_layers, num_heads, max_position),
            id2label=id2label,
            label2id=label2id,
        )
        config.num_labels = num_labels
        model = BertForSequenceClassification(config)  # type: ignore[no-untyped-call]
        backend = tokenizer.backend_tokenizer
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
            pair=f"{BOS_TOKEN} $A {EOS_TOKEN} $B:1 {EOS_TOKEN}:1",
            special_tokens=[(BOS_TOKEN, ids.bos), (EOS_TOKEN, ids.eos)],
        )
        tokenizer = wrap_tokenizer(backend, cls_token=BOS_TOKEN, sep_token=EOS_TOKEN)
    else:
        raise ValueError(f"arch={arch!r} is not supported; allowed: 'llama', 'bert'")
    return save_model(out_dir, model, tokenizer, max_position)
