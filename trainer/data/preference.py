"""The preference format (``dataset.format: preference``): a prompt with a chosen and a rejected answer.

A record holds ``prompt``, ``chosen`` and ``rejected`` (names mapped by ``dataset.fields``), in one
of two forms, the same for every record of a dataset:

- **text**: three strings. trl appends EOS to each answer and trains on ``prompt + answer``.
- **conversation**: ``prompt`` is a list of ``{role, content}`` messages, ``chosen`` and ``rejected``
  are the assistant's answer, as a string or a list of assistant messages; rendered with the
  tokenizer's chat template (the prompt with the generation prompt, the answers as the assistant's
  turn).

kubetune checks the pairs and counts their tokens; trl's DPOTrainer tokenizes and batches them. The
token counts here follow trl's own tokenization (prompt alone, prompt + answer), so that a prompt
reported as filling ``maxSeqLength`` is exactly one trl would drop with nothing to learn from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kubetune.api.spec import DataFields

from .readers import json_type

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Message = dict[str, str]
Turns = str | list[Message]
"""A prompt or an answer: text, or messages (conversation form)."""


class IdenticalPairError(ValueError):
    """Chosen and rejected are the same answer: the pair prefers nothing (and trains nothing)."""


@dataclass(frozen=True)
class PreferencePair:
    """One checked record in the form trl's DPOTrainer reads."""

    prompt: Turns
    chosen: Turns
    rejected: Turns

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)

    def row(self) -> dict[str, Turns]:
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}


def _messages(value: list[Any], name: str, *, assistant_only: bool) -> list[Message]:
    messages: list[Message] = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ValueError(f"field {name!r}: message {i} must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role or not isinstance(content, str):
            raise ValueError(f"field {name!r}: message {i} needs a string role and a string content")
        if assistant_only and role != "assistant":
            raise ValueError(
                f"field {name!r}: message {i} has role {role!r}; an answer holds assistant turns only"
            )
        messages.append({"role": role, "content": content})
    if not messages:
        raise ValueError(f"field {name!r} is an empty list of messages")
    return messages


def _answer(value: Any, name: str, *, conversational: bool) -> Turns:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"field {name!r} is empty")
        return [{"role": "assistant", "content": value}] if conversational else value
    if isinstance(value, list):
        if not conversational:
            raise ValueError(
                f"field {name!r} is a list of messages but the prompt is text: give a conversation as the "
                "prompt, or the answer as text"
            )
        answer = _messages(value, name, assistant_only=True)
        if not any(m["content"].strip() for m in answer):
            raise ValueError(f"field {name!r} has only empty assistant messages")
        return answer
    raise ValueError(f"field {name!r} must be text or a list of assistant messages, got {json_type(value)}")


def preference_pair(data: Mapping[str, Any], fields: DataFields) -> PreferencePair:
    """The pair in a record whose three fields are present. Raises :class:`ValueError` saying which
    field is wrong and how (including a chosen answer identical to the rejected one)."""
    prompt = data[fields.prompt]
    if isinstance(prompt, list):
        turns: Turns = _messages(prompt, fields.prompt, assistant_only=False)
    elif isinstance(prompt, str):
        turns = prompt
    else:
        raise ValueError(
            f"field {fields.prompt!r} must be text or a list of messages, got {json_type(prompt)}"
        )
    conversational = isinstance(turns, list)
    chosen = _answer(data[fields.chosen], fields.chosen, conversational=conversational)
    rejected = _answer(data[fields.rejected], fields.rejected, conversational=conversational)
    if chosen == rejected:
        raise IdenticalPairError(
            f"fields {fields.chosen!r} and {fields.rejected!r} are identical, so the pair prefers nothing"
        )
    return PreferencePair(turns, chosen, rejected)


def _token_ids(
    tokenizer: PreTrainedTokenizerBase, turns: Turns, *, generation_prompt: bool = False
) -> list[int]:
    # As trl.data_utils._tokenize does: the chat template for messages, the tokenizer for text.
    if isinstance(turns, list):
        encoded: Any = tokenizer.apply_chat_template(
            turns, tokenize=True, return_dict=True, add_generation_prompt=generation_prompt
        )
        return list(encoded["input_ids"])
    return list(tokenizer(text=turns)["input_ids"])


def _joined(prompt: Turns, answer: Turns) -> Turns:
    if isinstance(prompt, list) and isinstance(answer, list):
        return prompt + answer
    assert isinstance(prompt, str)
    assert isinstance(answer, str)
    return prompt + answer


@dataclass(frozen=True)
class PairLengths:
    prompt: int
    """Tokens of the prompt alone (with the generation prompt for a conversation)."""
    total: int
    """Tokens of the prompt with the longer answer: the longest sequence the pair trains on."""


def pair_lengths(pair: PreferencePair, tokenizer: PreTrainedTokenizerBase) -> PairLengths:
    """Token counts of a pair, tokenized as trl tokenizes it (EOS, which trl adds to text answers,
    included)."""
    prompt = _token_ids(tokenizer, pair.prompt, generation_prompt=pair.conversational)
    eos = 0 if pair.conversational or tokenizer.eos_token is None else 1
    answers = [
        len(_token_ids(tokenizer, _joined(pair.prompt, a))) + eos for a in (pair.chosen, pair.rejected)
    ]
    return PairLengths(prompt=len(prompt), total=max(answers))
