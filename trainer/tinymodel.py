"""Tiny, randomly initialised transformers models with a freshly trained tokenizer.

Used by ``kubetune quickstart-data`` (a model a newcomer can fine-tune in seconds on a laptop), the
benchmarks and the test suite (no hub downloads are possible there; its classifier builder is in
``tests/tinymodels.py``). Everything is built locally: the tokenizer is
a byte-level BPE trained with the ``tokenizers`` library on a caller-given corpus, the weights are
random, and the output directory is a regular Hugging Face model directory (safetensors, config,
generation config, tokenizer with a ChatML chat template) that ``AutoModelFor*.from_pretrained``,
``AutoTokenizer.from_pretrained`` and vLLM load.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal, NamedTuple, TypedDict

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IM_START, IM_END)

# ChatML: the assistant turn ends with <|im_end|>, which the generation config lists as an end of
# sequence token so chat completions stop there.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LICENSES_DIR = Path("/usr/share/common-licenses")

# Used when the licence texts are absent (minimal container images strip /usr/share).
_FALLBACK_TEXT = """\
Kubernetes is an open source system for automating deployment, scaling and management of
containerized applications. It groups containers that make up an application into logical units
for easy management and discovery. A fine-tuning job reads a base model and a data set from object
storage, trains for a number of steps, writes checkpoints, and finally writes the trained model
back to object storage so that a serving deployment can load it and answer requests.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
"""


def sample_corpus(max_lines: int | None = None) -> list[str]:
    """Non-empty lines of real English text: the licence texts shipped by Debian-based systems.

    Falls back to a short built-in text when ``/usr/share/common-licenses`` is missing.
    """
    lines: list[str] = []
    if LICENSES_DIR.is_dir():
        for path in sorted(p for p in LICENSES_DIR.iterdir() if p.is_file()):
            text = path.read_text(encoding="utf-8", errors="replace")
            lines.extend(line.strip() for line in text.splitlines() if line.strip())
    if not lines:
        lines = [line.strip() for line in _FALLBACK_TEXT.splitlines() if line.strip()]
    return lines[:max_lines] if max_lines is not None else lines


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``corpus``.

    It never adds special tokens on its own (like GPT-2 and Qwen tokenizers), knows
    ``<s> </s> <pad> <unk> <|im_start|> <|im_end|>`` and carries a ChatML chat template.
    ``vocab_size`` includes the 256 byte symbols and the special tokens.
    """
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {minimum}")
    backend = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps offsets covering the leading space bytes, as GPT-2 does.
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_non_empty(corpus), trainer=trainer)
    return wrap_tokenizer(backend)


def build_tiny_causal_lm(
    out_dir: Path,
    corpus: Iterable[str],
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position: int = 256,
    arch: Literal["llama", "gpt2"] = "llama",
    seed: int = 0,
) -> Path:
    """Write a randomly initialised causal LM plus its tokenizer to ``out_dir`` and return it.

    Same arguments and seed give bit-identical weights.
    """
    tokenizer = build_tokenizer(corpus, vocab_size)
    ids = special_ids(tokenizer)
    config: PreTrainedConfig
    model: PreTrainedModel
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(
            **config_kwargs(tokenizer, ids, hidden_size, num_layers, num_heads, max_position),
            num_key_value_heads=num_heads,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_positions=max_position,
            bos_token_id=ids.bos,
            eos_token_id=ids.eos,
            pad_token_id=ids.pad,
        )
        model = GPT2LMHeadModel(config)  # type: ignore[no-untyped-call]
    else:
        raise ValueError(f"arch={arch!r} is not supported; allowed: 'llama', 'gpt2'")
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=ids.bos,
        eos_token_id=[ids.eos, _token_id(tokenizer, IM_END)],
        pad_token_id=ids.pad,
    )
    return save_model(out_dir, model, tokenizer, max_position)


class SpecialIds(NamedTuple):
    """The ids of ``<s>``, ``</s>`` and ``<pad>`` in a tokenizer from :func:`build_tokenizer`."""

    bos: int
    eos: int
    pad: int


class ConfigKwargs(TypedDict):
    """See :func:`config_kwargs`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int


def wrap_tokenizer(backend: Tokenizer, **extra_tokens: str) -> PreTrainedTokenizerFast:
    """A transformers tokenizer around ``backend`` with the special tokens and the ChatML template."""
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        **extra_tokens,
    )


def config_kwargs(
    tokenizer: PreTrainedTokenizerFast,
    ids: SpecialIds,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    max_position: int,
) -> ConfigKwargs:
    """The sizes and special-token ids that the Llama and BERT configs name alike."""
    return ConfigKwargs(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=max_position,
        bos_token_id=ids.bos,
        eos_token_id=ids.eos,
        pad_token_id=ids.pad,
    )


def special_ids(tokenizer: PreTrainedTokenizerFast) -> SpecialIds:
    """The special-token ids a model config names (see :class:`SpecialIds`)."""
    return SpecialIds(
        bos=_token_id(tokenizer, BOS_TOKEN),
        eos=_token_id(tokenizer, EOS_TOKEN),
        pad=_token_id(tokenizer, PAD_TOKEN),
    )


def _token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    assert isinstance(token_id, int), f"{token!r} must map to a single id"
    return token_id


def save_model(
    out_dir: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, max_position: int
) -> Path:
    """Save ``model`` and ``tokenizer`` (limited to ``max_position`` tokens) as a model directory."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.model_max_length = max_position
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _non_empty(corpus: Iterable[str]) -> Iterator[str]:
    seen = False
    for text in corpus:
        if text and not re.fullmatch(r"\s*", text):
            seen = True
            yield text
    if not seen:
        raise ValueError("the corpus is empty: the tokenizer needs some text to learn merges from")
