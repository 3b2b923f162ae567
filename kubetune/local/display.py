"""Terminal output of local mode: a live progress bar fed by the runtime's progress file, and
the final summary tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table


class ProgressFile:
    """Follows the JSON-lines file rank 0 appends progress updates to (KUBETUNE_PROGRESS=file:)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self.latest: dict[str, Any] = {}
        self.updates: list[dict[str, Any]] = []
        """Every complete update the last poll read, in order (a sweep watches each evaluation)."""

    def poll(self) -> dict[str, Any] | None:
        """The newest complete update written since the last poll, if any."""
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return None
        end = chunk.rfind(b"\n")
        if end < 0:
            return None
        self._offset += end + 1
        newest = None
        self.updates = []
        for line in chunk[: end + 1].splitlines():
            try:
                newest = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.updates.append(newest)
        if newest is not None:
            self.latest.update({k: v for k, v in newest.items() if v is not None})
        return newest


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


class TrainingProgress:
    """A rich progress bar with step, loss and ETA, driven by :class:`ProgressFile`."""

    def __init__(self, console: Console, description: str) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("step {task.fields[steps]}"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("eval {task.fields[eval_loss]}"),
            TextColumn("{task.fields[speed]}"),
            TimeElapsedColumn(),
            TextColumn("ETA {task.fields[eta]}"),
            console=console,
            transient=False,
        )
        self._task: TaskID = self._progress.add_task(
            description, total=None, steps="-", loss="-", eval_loss="-", speed="", eta="-"
        )

    def __enter__(self) -> TrainingProgress:
        self._progress.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._progress.stop()

    def update(self, state: dict[str, Any]) -> None:
        speed = state.get("samplesPerSecond")
        step, total = state.get("step") or 0, state.get("totalSteps")
        self._progress.update(
            self._task,
            completed=step,
            total=total,
            steps=f"{step}/{total}" if total else str(step),
            loss=_fmt(state.get("loss")),
            eval_loss=_fmt(state.get("evalLoss")),
            speed=f"{speed:.1f} samples/s" if isinstance(speed, int | float) else "",
            eta=state.get("eta") or "-",
        )


def summary_table(title: str, rows: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows.items():
        table.add_row(key, _fmt(value, 6) if not isinstance(value, str) else value)
    return table


def classification_table(report: dict[str, Any]) -> Table:
    """metrics.json's ``classification_report``: one row per class, then the averages."""
    table = Table(title="per class", title_justify="left")
    for name in ("class", "precision", "recall", "F1", "support"):
        table.add_column(name, justify="left" if name == "class" else "right")
    rows = [*(report.get("classes") or {}).items()]
    rows += [("macro avg", report.get("macro_avg")), ("weighted avg", report.get("weighted_avg"))]
    for name, row in rows:
        if isinstance(row, dict):
            table.add_row(
                str(name),
                *(_fmt(row.get(key), 4) for key in ("precision", "recall", "f1")),
                str(row.get("support", "")),
            )
    return table


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys, for one flat summary table."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif not isinstance(value, list):
            flat[name] = value
    return flat


def usage_rows(usage: dict[str, Any]) -> dict[str, str]:
    """metrics.json's ``usage`` block as readable rows: wall time per phase, requested hours,
    throughput and, on GPUs, MFU (or why it is absent)."""
    rows = {
        f"time.{phase}": f"{seconds:.1f}s" for phase, seconds in (usage.get("wall_seconds") or {}).items()
    }
    if usage.get("wall_seconds_total") is not None:
        rows["time (process)"] = f"{usage['wall_seconds_total']:.1f}s"
    for key, label in (
        ("gpu_hours_requested", "GPU-hours requested"),
        ("cpu_core_hours_requested", "CPU core-hours requested"),
    ):
        if usage.get(key) is not None:
            rows[label] = f"{usage[key]:.4f}"
    if usage.get("tokens_per_second") is not None:
        rows["tokens/s"] = f"{usage['tokens_per_second']:.1f}"
    if usage.get("mfu") is not None:
        rows["MFU"] = f"{100 * usage['mfu']:.1f}%"
    elif usage.get("mfu_note"):
        rows["MFU"] = str(usage["mfu_note"])
    return rows
