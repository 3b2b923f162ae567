"""Tokenization per data format (``dataset.format``), with the labels each one trains on.

- ``text``: causal LM on every token. Each record is one sequence (BOS if the tokenizer uses one,
  the text, EOS), **truncated** to ``maxSeqLength``. We truncate rather than pack: a record stays
  one training sequence, so documents never attend to each other, the number of sequences is known
  before training (steps, resume position), and ``validate`` can say exactly how many records are
  cut. Split long documents into several records when nothing may be lost.
- ``instruction``: ``prompt`` rendered with :data:`INSTRUCTION_TEMPLATE`, then ``response`` and
  EOS; loss on the response tokens only.
- ``chat``: a ``messages`` list of ``{role, content}`` rendered with the tokenizer's chat template;
  loss on assistant turns only (the assistant's text and the template's end-of-turn tokens, never
  the role headers). Templates with ``{% generation %}`` blocks give the assistant tokens directly;
  for any other template each assistant turn is located by rendering the conversation up to it.
- ``classification``: ``text`` and ``label``; a label is a name from ``task.labels`` or a class id
  in ``[0, numLabels)`` (CSV ids may be digit strings).
- ``preference``: ``prompt``, ``chosen`` and ``rejected`` (:mod:`.preference`), handed to trl's
  DPOTrainer untokenized: it tokenizes, truncates to ``maxSeqLength`` and trains on the answers.
  Here the pairs are only measured, and a prompt that fills ``maxSeqLength`` on its own is a
  problem: trl would drop the pair, which has nothing left to learn from.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from kubetune.api.spec import OBJECTIVE_MATCHES_FORMAT, DataFormat, Method, TaskType
from kubetune.errors import InvalidInputError
from kubetune.run.plan import RunPlan

from .checks import chat_messages, label_id
from .preference import PairLengths, PreferencePair, pair_lengths, preference_pair
from .problems import ProblemLog
from .readers import Record

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX: Final = -100
"""Label of tokens that carry no loss (the transformers and PyTorch cross-entropy convention)."""

INSTRUCTION_TEMPLATE: Final = "### Instruction:\n{prompt}\n\n### Response:\n"
"""How the instruction format shows a prompt to the model; serve prompts the same way."""

_CHUNK: Final = 1024  # records per batched tokenizer call


def render_instruction_prompt(prompt: str) -> str:
    """The instruction-format prompt text, as trained (serve completions the same way)."""
    return INSTRUCTION_TEMPLATE.format(prompt=prompt)


Example = dict[str, Any]
"""``input_ids``, ``attention_mask`` and ``labels`` (token labels, or a class id)."""


@dataclass
class Tokenized:
    examples: list[Example]
    lengths: list[int]
    """Token count of each record before truncation (the validation report's statistics)."""
    max_length: int
    dropped: list[str] = field(default_factory=list)
    """Sources of records left out because truncation left no tokens to learn from."""


def effective_max_length(plan: RunPlan, tokenizer: PreTrainedTokenizerBase) -> int:
    """``maxSeqLength``, capped by the tokenizer's ``model_max_length`` when it declares one."""
    wanted = plan.hyperparameters.max_seq_length if plan.hyperparameters else 512
    declared = getattr(tokenizer, "model_max_length", None)
    # Tokenizers without a limit report a huge sentinel (int(1e30)).
    if isinstance(declared, int) and 0 < declared < 10_000_000:
        return min(wanted, declared)
    return wanted


def _prefix_tokens(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens the tokenizer puts before a text (BOS, [CLS]...), found by comparison."""
    with_special: list[int] = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain: list[int] = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return with_special[:start]
    return []


def _batched(items: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    ids: list[list[int]] = []
    for start in range(0, len(items), _CHUNK):
        ids.extend(tokenizer(list(items[start : start + _CHUNK]), add_special_tokens=False)["input_ids"])
    return ids


def _add_causal(out: Tokenized, source: str, ids: list[int], labels: list[int]) -> None:
    """Add one causal-LM example cut to ``out.max_length``, or drop it when the cut leaves no label."""
    out.lengths.append(len(ids))
    ids, labels = ids[: out.max_length], labels[: out.max_length]
    # The first label never counts: a causal LM predicts each token from those before it.
    if any(label != IGNORE_INDEX for label in labels[1:]):
        out.examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    else:
        out.dropped.append(source)


def _eos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    eos = tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else []


def _tokenize_text(records: Sequence[Record], plan: RunPlan, tokenizer: PreTrainedTokenizerBase) -> Tokenized:
    max_length = effective_max_length(plan, tokenizer)
    prefix, eos = _prefix_tokens(tokenizer), _eos(tokenizer)
    bodies = _batched([r.data[plan.dataset.fields.text] for r in records], tokenizer)
    out = Tokenized([], [], max_length)
    for record, body in zip(records, bodies, strict=True):
        ids = prefix + body + eos
        _add_causal(out, record.source, ids, list(ids))
    return out


def _tokenize_instruction(
    records: Sequence[Record], plan: RunPlan, tokenizer: PreTrainedTokenizerBase
) -> Tokenized:
    max_length = effective_max_length(plan, tokenizer)
    fields = plan.dataset.fields
    prefix, eos = _prefix_tokens(tokenizer), _eos(tokenizer)
    # Prompt and response are tokenized apart so the boundary between them is exact; the template
    # ends the prompt with a newline, where byte-level BPE splits anyway.
    prompts = _batched([render_instruction_prompt(r.data[fields.prompt]) for r in records], tokenizer)
    responses = _batched([r.data[fields.response] for r in records], tokenizer)
    out = Tokenized([], [], max_length)
    for record, prompt, response in zip(records, prompts, responses, strict=True):
        prompt_ids, response_ids = prefix + prompt, response + eos
        ids = prompt_ids + response_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
        _add_causal(out, record.source, ids, labels)
    return out


def has_generation_blocks(template: str | None) -> bool:
    """Whether a chat template marks assistant output with ``{% generation %}`` blocks."""
    return bool(template) and re.search(r"\{%-?\s*generation\s*-?%\}", template or "") is not None


def chat_template_of(tokenizer: PreTrainedTokenizerBase) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one is what chat uses
        template = template.get("default")
    return template if isinstance(template, str) else None


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, prompt: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
    if not isinstance(text, str):
        raise InvalidInputError(f"the chat template rendered {type(text).__name__}, not text")
    return text


def tokenize_chat(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and their labels: the token itself on assistant turns,
    :data:`IGNORE_INDEX` everywhere else. Raises :class:`InvalidInputError` when the template
    cannot be used this way."""
    template = chat_template_of(tokenizer)
    if template is None:
        raise InvalidInputError(
            "the chat format needs a tokenizer with a chat template, and this model's tokenizer has none"
        )
    if has_generation_blocks(template):
        encoded: Any = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = list(encoded["input_ids"])
        mask = list(encoded["assistant_masks"])
        return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]

    full = _render(tokenizer, messages, prompt=False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # The assistant turn is what rendering it adds after the generation prompt: its text and
        # end-of-turn tokens, without the role header the model is given at inference time.
        before = _render(tokenizer, messages[:i], prompt=True) if i else ""
        through = _render(tokenizer, messages[: i + 1], prompt=False)
        if not through.startswith(before) or not full.startswith(through):
            raise InvalidInputError(
                "the tokenizer's chat template does not render a conversation as a prefix of its "
                "continuation, so assistant turns cannot be located; add {% generation %} blocks to it"
            )
        spans.append((len(before), len(through)))
    if tokenizer.is_fast:
        encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        offsets = encoded["offset_mapping"]
        labels = [
            token if any(a <= start < b for a, b in spans) else IGNORE_INDEX
            for token, (start, _end) in zip(ids, offsets, strict=True)
        ]
        return ids, labels
    # Slow tokenizers have no offsets: tokenize piece by piece at the span boundaries instead.
    ids, labels, position = [], [], 0
    for a, b in spans:
        context = tokenizer(full[position:a], add_special_tokens=False)["input_ids"] if a > position else []
        turn = tokenizer(full[a:b], add_special_tokens=False)["input_ids"]
        ids += context + turn
        labels += [IGNORE_INDEX] * len(context) + list(turn)
        position = b
    tail = tokenizer(full[position:], add_special_tokens=False)["input_ids"] if position < len(full) else []
    return ids + tail, labels + [IGNORE_INDEX] * len(tail)


def _tokenize_chat_records(
    records: Sequence[Record], plan: RunPlan, tokenizer: PreTrainedTokenizerBase, problems: ProblemLog | None
) -> Tokenized:
    max_length = effective_max_length(plan, tokenizer)
    out = Tokenized([], [], max_length)
    for record in records:
        messages = chat_messages(record.data[plan.dataset.fields.messages])
        try:
            ids, labels = tokenize_chat(messages, tokenizer)
        except Exception as e:  # the template is user data too: jinja errors, raise_exception()...
            reason = str(e) if isinstance(e, InvalidInputError) else f"the chat template failed: {e}"
            if problems is None:
                raise InvalidInputError(f"{record.source}: {reason}") from None
            problems.add("chat-template", f"{record.source}: {reason}")
            continue
        _add_causal(out, record.source, ids, labels)
    return out


def _tokenize_classification(
    records: Sequence[Record], plan: RunPlan, tokenizer: PreTrainedTokenizerBase
) -> Tokenized:
    max_length = effective_max_length(plan, tokenizer)
    task = plan.task
    texts = [r.data[plan.dataset.fields.text] for r in records]
    out = Tokenized([], [], max_length)
    for start in range(0, len(texts), _CHUNK):
        chunk = texts[start : start + _CHUNK]
        full = tokenizer(chunk, add_special_tokens=True)["input_ids"]
        cut = tokenizer(chunk, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
        for record, whole, ids in zip(records[start : start + _CHUNK], full, cut, strict=True):
            out.lengths.append(len(whole))
            label = label_id(record.data[plan.dataset.fields.label], task.labels, task.num_labels or 0)
            out.examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": label})
    return out


def _pair_lengths(pair: PreferencePair, tokenizer: PreTrainedTokenizerBase) -> PairLengths:
    """:func:`~.preference.pair_lengths`, raising :class:`InvalidInputError` for a conversation the
    tokenizer cannot render: it has no chat template, or the template fails (it is user data too)."""
    if pair.conversational and chat_template_of(tokenizer) is None:
        raise InvalidInputError(
            "a conversation needs the tokenizer's chat template, and this model's tokenizer has none "
            "(add chat_template to tokenizer_config.json or chat_template.jinja, or give the pairs as text)"
        )
    try:
        return pair_lengths(pair, tokenizer)
    except Exception as e:
        raise InvalidInputError(f"the chat template failed: {e}") from e


def _measure_preference(
    records: Sequence[Record], plan: RunPlan, tokenizer: PreTrainedTokenizerBase, problems: ProblemLog | None
) -> Tokenized:
    """The pairs as trl's rows (``prompt``, ``chosen``, ``rejected``) with their token counts."""
    max_length = effective_max_length(plan, tokenizer)
    out = Tokenized([], [], max_length)
    for record in records:
        pair = preference_pair(record.data, plan.dataset.fields)
        try:
            lengths = _pair_lengths(pair, tokenizer)
        except InvalidInputError as e:
            if problems is None:
                raise InvalidInputError(f"{record.source}: {e}") from None
            problems.add("chat-template", f"{record.source}: {e}")
            continue
        if lengths.prompt >= max_length:
            reason = (
                f"{record.source}: the prompt is {lengths.prompt} tokens, which fills maxSeqLength {max_length} "
                "and leaves no token of chosen or rejected to train on; shorten the prompt or raise maxSeqLength"
            )
            if problems is None:
                raise InvalidInputError(reason)
            problems.add("too-long", reason)  # a problem of its own: not also a dropped-records warning
            continue
        out.lengths.append(lengths.total)
        out.examples.append(pair.row())
    return out


def check_task_format(plan: RunPlan) -> None:
    """Raise :class:`InvalidInputError` when the data format cannot train the task."""
    classification = plan.task.type == TaskType.sequence_classification
    if classification != (plan.dataset.format == DataFormat.classification):
        raise InvalidInputError(
            f"dataset.format {plan.dataset.format} does not fit task {plan.task.type}: "
            "sequence-classification takes the classification format, causal-lm takes text, "
            "instruction, chat or (objective dpo) preference"
        )
    # The API's rule, applied to the plan (a plan can be written by hand): a plan has the spec's
    # method and dataset.
    if not OBJECTIVE_MATCHES_FORMAT.check(plan.model_copy(update={"method": plan.method or Method()})):
        raise InvalidInputError(OBJECTIVE_MATCHES_FORMAT.message)


def tokenize_split(
    records: Sequence[Record],
    plan: RunPlan,
    tokenizer: PreTrainedTokenizerBase,
    problems: ProblemLog | None = None,
) -> Tokenized:
    """Tokenize checked records (see :func:`tokenize_records`), with length statistics.

    With ``problems``, records the chat template cannot render (and preference pairs whose prompt
    fills ``maxSeqLength``) are recorded there and left out instead of raising.
    """
    check_task_format(plan)
    if plan.dataset.format == DataFormat.classification:
        return _tokenize_classification(records, plan, tokenizer)
    if plan.dataset.format == DataFormat.chat:
        return _tokenize_chat_records(records, plan, tokenizer, problems)
    if plan.dataset.format == DataFormat.preference:
        return _measure_preference(records, plan, tokenizer, problems)
    if plan.dataset.format == DataFormat.instruction:
        return _tokenize_instruction(records, plan, tokenizer)
    return _tokenize_text(records, plan, tokenizer)


def tokenize_records(
    records: Sequence[Record], plan: RunPlan, tokenizer: PreTrainedTokenizerBase
) -> list[Example]:
    """``input_ids``, ``attention_mask`` and ``labels`` per record, truncated to ``maxSeqLength``.

    Causal LM labels repeat the token ids with :data:`IGNORE_INDEX` where no loss is taken;
    classification labels are class ids. Records that truncation leaves with nothing to learn
    (an instruction prompt longer than ``maxSeqLength``) are left out.
    """
    return tokenize_split(records, plan, tokenizer).examples
