"""The tiny-model builder every test (and ``kubetune quickstart-data``) relies on."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from kubetune.trainer.tinymodel import IM_END, build_tiny_causal_lm, build_tokenizer, sample_corpus
from tests.tinymodels import build_tiny_classifier

pytestmark = pytest.mark.unit

CORPUS = sample_corpus(max_lines=400)


def test_sample_corpus_is_real_text() -> None:
    lines = sample_corpus(max_lines=50)
    assert len(lines) == 50
    assert all(line.strip() == line and line for line in lines)


def test_tokenizer_round_trips_any_text_including_unseen_unicode() -> None:
    tokenizer = build_tokenizer(CORPUS, vocab_size=400)
    text = "Permission is hereby granted — naïve café 🚀"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(tokenizer) == 400


def test_tokenizer_adds_no_special_tokens_and_renders_chatml() -> None:
    tokenizer = build_tokenizer(CORPUS)
    assert tokenizer("hello")["input_ids"][0] != tokenizer.bos_token_id
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_causal_lm_loads_with_auto_classes_and_generates(
    tmp_path: Path, arch: Literal["llama", "gpt2"]
) -> None:
    out = build_tiny_causal_lm(tmp_path / arch, CORPUS, arch=arch, hidden_size=32, num_layers=1)
    assert (out / "model.safetensors").is_file()
    # Any: transformers' own annotations of generate() do not accept the Auto class's return type.
    model: Any = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == arch
    assert tokenizer.convert_tokens_to_ids(IM_END) in model.generation_config.eos_token_id
    inputs = tokenizer(["The licence"], return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert output.shape == (1, inputs["input_ids"].shape[1] + 4)


def test_same_seed_gives_identical_weights_and_other_seed_differs(tmp_path: Path) -> None:
    a = load_file(build_tiny_causal_lm(tmp_path / "a", CORPUS, seed=7) / "model.safetensors")
    b = load_file(build_tiny_causal_lm(tmp_path / "b", CORPUS, seed=7) / "model.safetensors")
    c = load_file(build_tiny_causal_lm(tmp_path / "c", CORPUS, seed=8) / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_classifier_carries_label_names(tmp_path: Path, arch: Literal["llama", "bert"]) -> None:
    out = build_tiny_classifier(tmp_path / arch, CORPUS, 3, labels=["neg", "neu", "pos"], arch=arch)
    model = AutoModelForSequenceClassification.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    batch = tokenizer(["short", "a somewhat longer sentence"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 3)


def test_bert_classifier_tokenizer_wraps_inputs_in_bos_eos(tmp_path: Path) -> None:
    out = build_tiny_classifier(tmp_path / "bert", CORPUS, 2, arch="bert")
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("hello")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert ids[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: build_tokenizer(CORPUS, vocab_size=100), "too small"),
        (lambda: build_tokenizer(["", "  "]), "corpus is empty"),
        (lambda: build_tiny_causal_lm(Path("/nonexistent"), CORPUS, arch="t5"), "arch='t5'"),  # type: ignore[arg-type]
        (lambda: build_tiny_classifier(Path("/nonexistent"), CORPUS, 2, labels=["x"]), "1 names"),
    ],
)
def test_bad_arguments_are_rejected_with_a_reason(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
