"""Checking records against the plan's data format: required fields, conversations, labels.

Every problem is recorded with the record's file and line; a record with a problem is left out.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Final

from kubetune.api.spec import DataFormat
from kubetune.run.plan import RunPlan

from .preference import IdenticalPairError, preference_pair
from .problems import ProblemLog
from .readers import Record, json_type


def _present(data: Mapping[str, Any]) -> str:
    return ", ".join(sorted(map(str, data))) or "no fields"


class RecordChecker:
    """Checks records against the plan's format, recording problems with file and line."""

    def __init__(self, plan: RunPlan, problems: ProblemLog) -> None:
        self.plan = plan
        self.fields = plan.dataset.fields
        self.format = plan.dataset.format
        self.problems = problems
        self.missing: Counter[str] = Counter()
        self.seen_fields: Counter[str] = Counter()
        # The first preference record's source and form (conversation or text): trl reads one form
        # per dataset, so a record of the other form is a problem of its own.
        self.preference_form: tuple[str, bool] | None = None

    def _missing(self, record: Record, name: str) -> bool:
        """Whether the field is absent or null; if so, count it and log the problem."""
        data = record.data
        if name in data and data[name] is not None:
            return False
        self.missing[name] += 1
        state = "missing" if name not in data else "null"
        self.problems.add(
            "missing-field",
            f"{record.source}: field {name!r} is {state} (the record has: {_present(data)})",
        )
        return True

    def _string(self, record: Record, name: str, *, allow_empty: bool = False) -> str | None:
        if self._missing(record, name):
            return None
        value = record.data[name]
        if not isinstance(value, str):
            self.problems.add(
                "invalid-value", f"{record.source}: field {name!r} must be a string, got {json_type(value)}"
            )
            return None
        if not allow_empty and not value.strip():
            self.problems.add("invalid-value", f"{record.source}: field {name!r} is empty")
            return None
        return value

    def check(self, record: Record) -> bool:
        self.seen_fields.update(map(str, record.data))
        if self.format == DataFormat.text:
            return self._string(record, self.fields.text) is not None
        if self.format == DataFormat.instruction:
            prompt = self._string(record, self.fields.prompt, allow_empty=True)
            response = self._string(record, self.fields.response)
            return prompt is not None and response is not None
        if self.format == DataFormat.chat:
            return self._messages(record) is not None
        if self.format == DataFormat.preference:
            return self._preference(record)
        text = self._string(record, self.fields.text)
        label = self._label(record)
        return text is not None and label is not None

    def _messages(self, record: Record) -> list[dict[str, str]] | None:
        name = self.fields.messages
        if self._missing(record, name):
            return None
        try:
            return chat_messages(record.data[name])
        except ValueError as e:
            self.problems.add("invalid-value", f"{record.source}: field {name!r}: {e}")
            return None

    def _preference(self, record: Record) -> bool:
        fields = self.fields
        missing = [self._missing(record, name) for name in (fields.prompt, fields.chosen, fields.rejected)]
        if any(missing):
            return False
        try:
            pair = preference_pair(record.data, fields)
        except IdenticalPairError as e:
            self.problems.add("identical-pair", f"{record.source}: {e}")
            return False
        except ValueError as e:
            self.problems.add("invalid-value", f"{record.source}: {e}")
            return False
        if self.preference_form is None:
            self.preference_form = (record.source, pair.conversational)
        elif self.preference_form[1] != pair.conversational:
            first, conversational = self.preference_form
            forms = ("text", "a conversation") if conversational else ("a conversation", "text")
            self.problems.add(
                "mixed-forms",
                f"{record.source}: field {fields.prompt!r} is {forms[0]}, but in {first} it is {forms[1]}; "
                "every record of a preference dataset must use the same form",
            )
            return False
        return True

    def _label(self, record: Record) -> int | None:
        name = self.fields.label
        if self._missing(record, name):
            return None
        try:
            return label_id(record.data[name], self.plan.task.labels, self.plan.task.num_labels or 0)
        except ValueError as e:
            self.problems.add("unknown-label", f"{record.source}: {e}")
            return None

    def finish(self, what: str, checked: int) -> None:
        """One hint per field that no record has: almost always a wrong ``dataset.fields`` name."""
        for name, count in sorted(self.missing.items()):
            if checked > 1 and count == checked:
                others = [f for f, _ in self.seen_fields.most_common(10)]
                self.problems.add(
                    "field-mapping",
                    f"{what}: no record has field {name!r}; the records have: "
                    f"{', '.join(others) or 'no fields'}. Name the right one in dataset.fields",
                )


def chat_messages(value: Any) -> list[dict[str, str]]:
    """A conversation as a list of ``{role, content}``; a JSON string is accepted (CSV cells).

    Raises :class:`ValueError` saying what is wrong.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(
                "must be a list of {role, content} messages, got a string that is not JSON"
            ) from None
    if not isinstance(value, list) or not value:
        raise ValueError(f"must be a non-empty list of {{role, content}} messages, got {json_type(value)}")
    messages: list[dict[str, str]] = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} must be an object with role and content, got {json_type(message)}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise ValueError(f"message {i} has no role (fields: {_present(message)})")
        if not isinstance(content, str):
            raise ValueError(f"message {i} ({role}) must have string content, got {json_type(content)}")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise ValueError("has no non-empty assistant message, so there is nothing to learn from it")
    return messages


_INT_RE: Final = re.compile(r"^\s*[+-]?\d+\s*$")


def label_id(value: Any, names: Sequence[str] | None, num_labels: int) -> int:
    """The class id of a label: a name from ``names``, or an id in ``[0, num_labels)``.

    Digit strings count as ids (CSV has no types) unless they are names. Raises
    :class:`ValueError` naming the label and what is allowed.
    """
    if isinstance(value, str) and names and value in names:
        return names.index(value)
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif (isinstance(value, float) and value.is_integer()) or (
        isinstance(value, str) and _INT_RE.match(value)
    ):
        number = int(value)
    if number is not None and 0 <= number < num_labels:
        return number
    ids = f"ids 0..{num_labels - 1}"
    if names:
        allowed = ", ".join(repr(n) for n in names[:20]) + (", ..." if len(names) > 20 else "")
        raise ValueError(f"unknown label {value!r}; allowed: {allowed} (or {ids})")
    raise ValueError(
        f"unknown label {value!r}; task.labels is not set, so labels must be class {ids} "
        "(set task.labels to use names)"
    )
