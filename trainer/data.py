"""Training data: read records from object storage, check them, tokenize them, batch them.

Files: JSON Lines (``.jsonl``), JSON (``.json``: an array of objects, or one object per line),
CSV (``.csv``, header row) and Parquet (``.parquet``). A location is one file or a prefix whose
files are all read in lexical key order; names starting with ``_`` or ``.`` (``_SUCCESS``,
``.ipynb_checkpoints``) are skipped. ``fileFormat: auto`` picks the reader by extension.

Formats (``dataset.format``):

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

Everything is a pure function of the plan and the data, so every rank computes the same records,
split and token ids without talking to the others.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from kubetune.api.spec import DataFormat, FileFormat, TaskType
from kubetune.errors import InvalidInputError, StorageAccessError
from kubetune.plan import RunPlan
from kubetune.storage import open_store, parse_uri
from kubetune.trainer.runtime import storage_config

if TYPE_CHECKING:
    import datasets
    import torch
    from transformers import PreTrainedTokenizerBase

    from kubetune.storage.base import ObjectStore

log = logging.getLogger(__name__)

IGNORE_INDEX: Final = -100
"""Label of tokens that carry no loss (the transformers and PyTorch cross-entropy convention)."""

INSTRUCTION_TEMPLATE: Final = "### Instruction:\n{prompt}\n\n### Response:\n"
"""How the instruction format shows a prompt to the model; serve prompts the same way."""

EXTENSIONS: Final = {
    ".jsonl": FileFormat.jsonl,
    ".ndjson": FileFormat.jsonl,
    ".json": FileFormat.jsonl,  # read as a JSON array when the file starts with "["
    ".csv": FileFormat.csv,
    ".parquet": FileFormat.parquet,
    ".pq": FileFormat.parquet,
}
_CSV_FIELD_LIMIT: Final = 2**31 - 1  # long documents in one cell are normal for text data
_CHUNK: Final = 1024  # records per batched tokenizer call


def render_instruction_prompt(prompt: str) -> str:
    """The instruction-format prompt text, as trained (serve completions the same way)."""
    return INSTRUCTION_TEMPLATE.format(prompt=prompt)


# --- records and problems ------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One record as read from a file. ``source`` is ``uri:line`` (``uri:row`` for Parquet, 1-based)."""

    source: str
    data: dict[str, Any]


@dataclass(frozen=True)
class SplitRecords:
    train: list[Record]
    eval: list[Record] | None


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input. ``storage`` problems (missing, denied) mean exit code 3."""

    kind: str
    message: str
    storage: bool = False


class ProblemLog:
    """Collects every problem, keeping the first ``cap`` messages of each kind and counting the rest."""

    def __init__(self, cap: int = 50) -> None:
        self.cap = cap
        self.counts: Counter[str] = Counter()
        self.shown: dict[str, list[Problem]] = {}
        self.storage_problems = 0

    def add(self, kind: str, message: str, *, storage: bool = False) -> None:
        self.counts[kind] += 1
        self.storage_problems += storage
        shown = self.shown.setdefault(kind, [])
        if len(shown) < self.cap:
            shown.append(Problem(kind, message, storage))

    def add_error(self, error: InvalidInputError | StorageAccessError, kind: str | None = None) -> None:
        storage = isinstance(error, StorageAccessError)
        self.add(kind or ("storage" if storage else "invalid-input"), str(error), storage=storage)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def has_storage_problems(self) -> bool:
        return self.storage_problems > 0

    def problems(self) -> list[Problem]:
        return [p for problems in self.shown.values() for p in problems]

    def __bool__(self) -> bool:
        return self.total > 0

    def summary(self, limit: int = 5) -> str:
        """The first ``limit`` problems and how many more there are, as one message."""
        problems = self.problems()
        text = "; ".join(p.message for p in problems[:limit])
        more = self.total - min(limit, len(problems))
        return f"{text} (and {more} more problems)" if more > 0 else text

    def raise_if_any(self) -> None:
        if not self:
            return
        error = StorageAccessError if self.has_storage_problems else InvalidInputError
        raise error(self.summary())


# --- reading files -------------------------------------------------------------------------------


def _hidden(key: str) -> bool:
    return any(part.startswith(("_", ".")) for part in key.split("/"))


def _file_format(uri: str, configured: FileFormat) -> FileFormat | None:
    if configured != FileFormat.auto:
        return configured
    return EXTENSIONS.get(Path(parse_uri(uri).name).suffix.lower())


def data_files(store: ObjectStore, uri: str) -> list[str]:
    """The data files at ``uri``: the object itself, or every visible object under it in key order.

    Raises :class:`StorageAccessError` when there is nothing there.
    """
    # A bucket or repository root (no key) can only be a prefix.
    if not uri.endswith("/") and parse_uri(uri).key and store.exists(uri):
        return [uri]
    prefix = uri.rstrip("/")
    files = [f"{prefix}/{obj.key}" for obj in store.list(prefix) if not _hidden(obj.key)]
    if not files:
        raise StorageAccessError(f"{uri}: no such data file, and no data files under it as a prefix")
    return sorted(files)


def _local_copy(store: ObjectStore, uri: str, scratch_dir: Path, index: int) -> Path:
    parsed = parse_uri(uri)
    if parsed.scheme == "file":
        return Path(parsed.local_path)  # read in place: no point copying a local file
    return store.download_file(uri, scratch_dir / f"{index:05d}-{parsed.name}")


def _iter_jsonl(path: Path, uri: str, problems: ProblemLog) -> Iterator[Record]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            source = f"{uri}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8").strip()
            except UnicodeDecodeError as e:
                problems.add("malformed-record", f"{source}: not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not line:
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                problems.add("malformed-record", f"{source}: malformed JSON: {e.msg} (column {e.colno})")
                continue
            if not isinstance(value, dict):
                problems.add("malformed-record", f"{source}: expected a JSON object, got {_json_type(value)}")
                continue
            yield Record(source, value)


def _iter_json(path: Path, uri: str, problems: ProblemLog) -> Iterator[Record]:
    """A JSON array of objects, each with the line it starts on; anything else is read as JSON Lines."""
    with path.open("rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")  # BOM and whitespace
    if not head.startswith(b"["):
        yield from _iter_jsonl(path, uri, problems)
        return
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        problems.add("malformed-record", f"{uri}: not valid UTF-8 ({e.reason} at byte {e.start})")
        return
    start = len(text) - len(text.lstrip())
    decoder = json.JSONDecoder()
    position = start + 1

    def skip_space(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    position = skip_space(position)
    if text.startswith("]", position):
        return
    while True:
        source = f"{uri}:{line_of(position)}"
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as e:
            problems.add("malformed-record", f"{uri}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})")
            return  # the rest of the array cannot be located reliably
        if isinstance(value, dict):
            yield Record(source, value)
        else:
            problems.add("malformed-record", f"{source}: expected a JSON object, got {_json_type(value)}")
        position = skip_space(position)
        if text.startswith(",", position):
            position = skip_space(position + 1)
        elif text.startswith("]", position):
            if skip_space(position + 1) != len(text):
                problems.add(
                    "malformed-record", f"{uri}:{line_of(position)}: unexpected data after the array"
                )
            return
        else:
            problems.add(
                "malformed-record",
                f"{uri}:{line_of(position)}: malformed JSON: expected ',' or ']' after an array element",
            )
            return


def _iter_csv(path: Path, uri: str, problems: ProblemLog) -> Iterator[Record]:
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            try:
                header = next(reader)
            except StopIteration:
                return
            if len(set(header)) != len(header):
                duplicates = sorted({name for name in header if header.count(name) > 1})
                problems.add("malformed-record", f"{uri}:1: duplicate column names: {', '.join(duplicates)}")
                return
            line = reader.line_num
            for row in reader:
                source = f"{uri}:{line + 1}"
                line = reader.line_num
                if not row:
                    continue
                if len(row) != len(header):
                    problems.add(
                        "malformed-record",
                        f"{source}: expected {len(header)} columns ({', '.join(header)}), got {len(row)}",
                    )
                    continue
                yield Record(source, dict(zip(header, row, strict=True)))
    except csv.Error as e:
        problems.add("malformed-record", f"{uri}:{reader.line_num}: malformed CSV: {e}")
    except UnicodeDecodeError as e:
        problems.add("malformed-record", f"{uri}: not valid UTF-8 ({e.reason} at byte {e.start})")


def _iter_parquet(path: Path, uri: str, problems: ProblemLog) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        row = 0
        for batch in parquet.iter_batches(batch_size=4096):
            for value in batch.to_pylist():
                row += 1
                yield Record(f"{uri}:{row}", value)
    except (pa.ArrowException, OSError) as e:
        problems.add("malformed-record", f"{uri}: not a readable Parquet file: {e}")


_READERS: Final[dict[FileFormat, Callable[[Path, str, ProblemLog], Iterator[Record]]]] = {
    FileFormat.jsonl: _iter_json,  # a .jsonl that happens to hold one array is read all the same
    FileFormat.csv: _iter_csv,
    FileFormat.parquet: _iter_parquet,
}


def read_location(
    store: ObjectStore,
    uri: str,
    file_format: FileFormat,
    scratch_dir: Path,
    problems: ProblemLog,
) -> tuple[list[Record], list[str]]:
    """Every record at ``uri`` (a file or a prefix) and the files read. Malformed records are
    recorded in ``problems`` and skipped; a missing location raises :class:`StorageAccessError`."""
    files = data_files(store, uri)
    records: list[Record] = []
    for index, file_uri in enumerate(files):
        chosen = _file_format(file_uri, file_format)
        if chosen is None:
            problems.add(
                "unknown-file-format",
                f"{file_uri}: cannot tell the file format from the extension "
                f"(known: {', '.join(sorted(EXTENSIONS))}); set dataset.fileFormat or remove the file",
            )
            continue
        path = _local_copy(store, file_uri, scratch_dir, index)
        records.extend(_READERS[chosen](path, file_uri, problems))
    return records, files


def _json_type(value: Any) -> str:
    return {
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
        dict: "an object",
    }.get(type(value), type(value).__name__)


# --- checking records ----------------------------------------------------------------------------


def _present(data: Mapping[str, Any]) -> str:
    return ", ".join(sorted(map(str, data))) or "no fields"


class _Checker:
    """Checks records against the plan's format, recording problems with file and line."""

    def __init__(self, plan: RunPlan, problems: ProblemLog) -> None:
        self.plan = plan
        self.fields = plan.dataset.fields
        self.format = plan.dataset.format
        self.problems = problems
        self.missing: Counter[str] = Counter()
        self.seen_fields: Counter[str] = Counter()

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
                "invalid-value", f"{record.source}: field {name!r} must be a string, got {_json_type(value)}"
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
        raise ValueError(f"must be a non-empty list of {{role, content}} messages, got {_json_type(value)}")
    messages: list[dict[str, str]] = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ValueError(
                f"message {i} must be an object with role and content, got {_json_type(message)}"
            )
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise ValueError(f"message {i} has no role (fields: {_present(message)})")
        if not isinstance(content, str):
            raise ValueError(f"message {i} ({role}) must have string content, got {_json_type(content)}")
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


# --- loading and splitting -----------------------------------------------------------------------


def split_eval(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Hold out ``fraction`` of the records (at least one) for evaluation, chosen by ``seed``.

    Both parts keep file order; the choice depends only on the record count and the seed.
    """
    count = len(records)
    held_out = min(count - 1, max(1, round(count * fraction)))
    if held_out < 1:
        raise InvalidInputError(
            f"dataset.evalFraction {fraction} needs at least 2 training records to hold one out, got {count}"
        )
    chosen = set(random.Random(seed).sample(range(count), held_out))
    train = [r for i, r in enumerate(records) if i not in chosen]
    evaluation = [r for i, r in enumerate(records) if i in chosen]
    return train, evaluation


@dataclass
class LoadReport:
    """What was read, for the validation report and the run record."""

    train_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    train_read: int = 0
    eval_read: int = 0


def collect_records(
    plan: RunPlan, scratch_dir: Path, problems: ProblemLog, report: LoadReport | None = None
) -> SplitRecords:
    """Read, check and split the plan's data, recording every problem instead of stopping at the
    first. Records with problems are left out of the result."""
    dataset = plan.dataset
    config = storage_config(plan)
    seed = plan.hyperparameters.seed if plan.hyperparameters else 42
    report = report if report is not None else LoadReport()

    def read(uri: str, what: str, subdir: str) -> list[Record] | None:
        directory = scratch_dir / subdir
        directory.mkdir(parents=True, exist_ok=True)
        before = problems.total
        try:
            store = open_store(uri, config)
            records, files = read_location(store, uri, dataset.file_format, directory, problems)
        except (StorageAccessError, InvalidInputError) as e:
            problems.add_error(e)
            return None
        if what == "dataset.train":
            report.train_files, report.train_read = files, len(records)
        else:
            report.eval_files, report.eval_read = files, len(records)
        checker = _Checker(plan, problems)
        valid = [r for r in records if checker.check(r)]
        checker.finish(f"{what} {uri}", len(records))
        if not records and problems.total == before:
            problems.add("empty-dataset", f"{what} {uri} has no records (files: {', '.join(files)})")
        return valid

    train = read(dataset.train.uri, "dataset.train", "train")
    evaluation = read(dataset.eval.uri, "dataset.eval", "eval") if dataset.eval is not None else None
    if train is None:
        return SplitRecords([], evaluation)
    if dataset.eval_fraction is not None and train:
        if len(train) < 2:
            problems.add(
                "empty-dataset",
                f"dataset.evalFraction {dataset.eval_fraction} needs at least 2 usable training records, "
                f"got {len(train)}",
            )
            return SplitRecords(train, None)
        train, evaluation = split_eval(train, dataset.eval_fraction, seed)
    return SplitRecords(train, evaluation)


def load_records(plan: RunPlan, scratch_dir: Path) -> SplitRecords:
    """Every training (and evaluation) record of the plan, checked against its format.

    Raises :class:`InvalidInputError` listing the problems found (malformed lines with file and
    line, missing fields, unknown labels, empty data), or :class:`StorageAccessError` when the data
    is missing or cannot be read.
    """
    problems = ProblemLog()
    records = collect_records(plan, scratch_dir, problems)
    problems.raise_if_any()
    return records


# --- tokenizing ----------------------------------------------------------------------------------

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


def check_task_format(plan: RunPlan) -> None:
    """Raise :class:`InvalidInputError` when the data format cannot train the task."""
    classification = plan.task.type == TaskType.sequence_classification
    if classification != (plan.dataset.format == DataFormat.classification):
        raise InvalidInputError(
            f"dataset.format {plan.dataset.format} does not fit task {plan.task.type}: "
            "sequence-classification takes the classification format, causal-lm takes text, "
            "instruction or chat"
        )


def tokenize_split(
    records: Sequence[Record],
    plan: RunPlan,
    tokenizer: PreTrainedTokenizerBase,
    problems: ProblemLog | None = None,
) -> Tokenized:
    """Tokenize checked records (see :func:`tokenize_records`), with length statistics.

    With ``problems``, records the chat template cannot render are recorded there and left out
    instead of raising.
    """
    check_task_format(plan)
    if plan.dataset.format == DataFormat.classification:
        return _tokenize_classification(records, plan, tokenizer)
    if plan.dataset.format == DataFormat.chat:
        return _tokenize_chat_records(records, plan, tokenizer, problems)
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


# --- datasets and batches ------------------------------------------------------------------------


@dataclass(frozen=True)
class LengthStats:
    """Token counts per record before truncation."""

    count: int
    max: int
    mean: float
    p95: int
    truncated: int
    max_length: int
    tokens: int
    """Tokens trained on after truncation."""

    @classmethod
    def of(cls, lengths: Sequence[int], max_length: int) -> LengthStats:
        if not lengths:
            return cls(0, 0, 0.0, 0, 0, max_length, 0)
        ordered = sorted(lengths)
        p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
        return cls(
            count=len(lengths),
            max=ordered[-1],
            mean=sum(lengths) / len(lengths),
            p95=p95,
            truncated=sum(1 for n in lengths if n > max_length),
            max_length=max_length,
            tokens=sum(min(n, max_length) for n in lengths),
        )


@dataclass(frozen=True)
class DataStats:
    train_records: int
    eval_records: int | None
    train_lengths: LengthStats
    eval_lengths: LengthStats | None
    dropped: int
    """Records left out because truncation left nothing to learn."""
    label_counts: dict[str, int] | None = None
    """Training records per class (classification)."""
    train_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PreparedData:
    train: datasets.Dataset
    eval: datasets.Dataset | None
    label_names: list[str] | None
    """``task.labels`` for classification (``None`` when labels are given as ids only)."""
    stats: DataStats


def label_counts(examples: Sequence[Example], names: Sequence[str] | None) -> dict[str, int]:
    counts = Counter(int(e["labels"]) for e in examples)
    return {(names[i] if names and i < len(names) else str(i)): n for i, n in sorted(counts.items())}


def _to_dataset(examples: list[Example]) -> datasets.Dataset:
    import datasets

    columns = ("input_ids", "attention_mask", "labels")
    return datasets.Dataset.from_dict({c: [e[c] for e in examples] for c in columns})


def prepare_datasets(plan: RunPlan, tokenizer: PreTrainedTokenizerBase, scratch_dir: Path) -> PreparedData:
    """Read, check, split and tokenize the plan's data into ``datasets.Dataset`` objects.

    Raises :class:`InvalidInputError` or :class:`StorageAccessError` like :func:`load_records`,
    and when nothing is left to train on after truncation.
    """
    problems = ProblemLog()
    report = LoadReport()
    records = collect_records(plan, scratch_dir, problems, report)
    problems.raise_if_any()
    train = tokenize_split(records.train, plan, tokenizer)
    evaluation = tokenize_split(records.eval, plan, tokenizer) if records.eval is not None else None
    dropped = len(train.dropped) + (len(evaluation.dropped) if evaluation else 0)
    if dropped:
        log.warning(
            "left out %d records with nothing to learn after truncation to %d tokens (first: %s)",
            dropped,
            train.max_length,
            (train.dropped or (evaluation.dropped if evaluation else []))[0],
        )
    if not train.examples:
        raise InvalidInputError(
            f"no training record has tokens to learn from within maxSeqLength {train.max_length} "
            f"({len(train.dropped)} records left out); raise maxSeqLength or shorten the prompts"
        )
    if evaluation is not None and not evaluation.examples:
        raise InvalidInputError(
            f"no evaluation record has tokens to learn from within maxSeqLength {evaluation.max_length}"
        )
    classification = plan.task.type == TaskType.sequence_classification
    names = list(plan.task.labels) if classification and plan.task.labels else None
    stats = DataStats(
        train_records=len(train.examples),
        eval_records=len(evaluation.examples) if evaluation else None,
        train_lengths=LengthStats.of(train.lengths, train.max_length),
        eval_lengths=LengthStats.of(evaluation.lengths, evaluation.max_length) if evaluation else None,
        dropped=dropped,
        label_counts=label_counts(train.examples, names) if classification else None,
        train_files=report.train_files,
        eval_files=report.eval_files,
    )
    return PreparedData(
        train=_to_dataset(train.examples),
        eval=_to_dataset(evaluation.examples) if evaluation else None,
        label_names=names,
        stats=stats,
    )


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id padding uses: the pad token, else EOS (padding is masked out either way), else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(candidate, int):
            return candidate
    return 0


def make_collator(
    tokenizer: PreTrainedTokenizerBase, plan: RunPlan
) -> Callable[[Sequence[Mapping[str, Any]]], dict[str, torch.Tensor]]:
    """Pads a batch on the right to its longest sequence: ``input_ids`` with the pad token,
    ``attention_mask`` with 0, causal-LM ``labels`` with :data:`IGNORE_INDEX`; classification
    labels become one class id per row. Right padding keeps absolute positions correct in
    training."""
    import torch

    pad = pad_token_id(tokenizer)
    classification = plan.task.type == TaskType.sequence_classification

    def collate(features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)

        def padded(key: str, value: int) -> torch.Tensor:
            rows = [list(f[key]) + [value] * (width - len(f[key])) for f in features]
            return torch.tensor(rows, dtype=torch.long)

        batch = {"input_ids": padded("input_ids", pad), "attention_mask": padded("attention_mask", 0)}
        if classification:
            batch["labels"] = torch.tensor([int(f["labels"]) for f in features], dtype=torch.long)
        else:
            batch["labels"] = padded("labels", IGNORE_INDEX)
        return batch

    return collate
