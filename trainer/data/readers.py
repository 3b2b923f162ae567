"""Reading records from data files in object storage, with file and line in every problem.

Files: JSON Lines (``.jsonl``), JSON (``.json``: an array of objects, or one object per line),
CSV (``.csv``, header row) and Parquet (``.parquet``). A location is one file or a prefix whose
files are all read in lexical key order; names starting with ``_`` or ``.`` (``_SUCCESS``,
``.ipynb_checkpoints``) are skipped. ``fileFormat: auto`` picks the reader by extension.

The readers are our own rather than ``datasets.load_dataset``'s: those raise on the first
malformed line, while these note a malformed record as ``uri:line``, skip it and read on, so that
``validate`` lists every problem of the data in one pass.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from kubetune.api.spec import FileFormat
from kubetune.errors import StorageAccessError
from kubetune.storage import parse_uri

from .problems import ProblemLog

if TYPE_CHECKING:
    from kubetune.storage.base import ObjectStore

EXTENSIONS: Final = {
    ".jsonl": FileFormat.jsonl,
    ".ndjson": FileFormat.jsonl,
    ".json": FileFormat.jsonl,  # read as a JSON array when the file starts with "["
    ".csv": FileFormat.csv,
    ".parquet": FileFormat.parquet,
    ".pq": FileFormat.parquet,
}
_CSV_FIELD_LIMIT: Final = 2**31 - 1  # long documents in one cell are normal for text data


@dataclass(frozen=True)
class Record:
    """One record as read from a file. ``source`` is ``uri:line`` (``uri:row`` for Parquet, 1-based)."""

    source: str
    data: dict[str, Any]


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
                problems.add("malformed-record", f"{source}: expected a JSON object, got {json_type(value)}")
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
            problems.add("malformed-record", f"{source}: expected a JSON object, got {json_type(value)}")
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


def json_type(value: Any) -> str:
    """A JSON value's type as problems name it: "an array", "a string", "null"..."""
    return {
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
        dict: "an object",
    }.get(type(value), type(value).__name__)
