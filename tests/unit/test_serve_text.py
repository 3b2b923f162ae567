"""Streaming detokenization and stop strings (kubetune.trainer.serve.text)."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.trainer.serve.text import TextStream
from kubetune.trainer.tinymodel import build_tokenizer, sample_corpus

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tokenizer(sample_corpus(max_lines=300), vocab_size=300)


def stream_all(tokenizer: Any, text: str, stop: list[str]) -> tuple[list[str], str, bool]:
    stream = TextStream(tokenizer, stop)
    deltas = [stream.push(t) for t in tokenizer(text)["input_ids"]]
    deltas.append(stream.finish())
    return deltas, "".join(deltas), stream.stopped


@pytest.mark.parametrize(
    "text",
    [
        "Permission is hereby granted, free of charge.",
        "naïve café — 東京 🚀 done",
        "   leading spaces\nand lines",
    ],
)
def test_deltas_add_up_to_the_decoded_text(tokenizer: Any, text: str) -> None:
    deltas, joined, stopped = stream_all(tokenizer, text, [])
    assert joined == text
    assert not stopped
    # A byte-level tokenizer splits multi-byte characters; no delta may carry half a character.
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        (["granted"], "Permission is hereby "),
        (["free", "hereby"], "Permission is "),
        ([", free of"], "Permission is hereby granted"),
        (["P"], ""),
        (["not there"], "Permission is hereby granted, free of charge."),
    ],
)
def test_text_ends_before_the_first_stop_string(tokenizer: Any, stop: list[str], expected: str) -> None:
    _, joined, stopped = stream_all(tokenizer, "Permission is hereby granted, free of charge.", stop)
    assert joined == expected
    assert stopped == (expected != "Permission is hereby granted, free of charge.")


def test_possible_start_of_a_stop_string_is_held_back_then_released(tokenizer: Any) -> None:
    stream = TextStream(tokenizer, ["granted!"])
    released = "".join(stream.push(t) for t in tokenizer("hereby grant")["input_ids"])
    assert released == "hereby "  # "grant" may still become "granted!"
    released += "".join(stream.push(t) for t in tokenizer("ed, yes")["input_ids"])
    released += stream.finish()
    assert released == "hereby granted, yes"
    assert not stream.stopped


def test_nothing_is_released_after_a_stop(tokenizer: Any) -> None:
    stream = TextStream(tokenizer, ["b"])
    text = "".join(stream.push(t) for t in tokenizer("a b c d")["input_ids"])
    assert text == "a "
    assert stream.push(tokenizer("zzz")["input_ids"][0]) == ""
    assert stream.finish() == ""
    assert stream.text == "a "
