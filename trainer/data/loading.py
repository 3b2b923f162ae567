"""The plan's training and evaluation records: read, checked and split.

Everything is a pure function of the plan and the data, so every rank computes the same records
and the same split without talking to the others.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from kubetune.errors import InvalidInputError, StorageAccessError
from kubetune.run.plan import RunPlan
from kubetune.storage import open_store
from kubetune.trainer.runtime import storage_config

from .checks import RecordChecker
from .problems import ProblemLog
from .readers import Record, read_location


@dataclass(frozen=True)
class SplitRecords:
    train: list[Record]
    eval: list[Record] | None


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
        checker = RecordChecker(plan, problems)
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
