"""A trial's evaluation history, one (step, objective) at a time.

A trial reports progress, not evaluations: every update (the FineTuneJob's status.progress, a line
of local mode's progress file) carries the *latest* evaluation results, repeated on the logging
updates that follow. The history the pruners need, the objective at each evaluated step, is rebuilt
by whoever watches the updates (the operator, into the sweep's status; local mode, in memory) with
:func:`observe`, the one rule both use.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

# Enough for the pruners (they compare trials at the steps they share, and rungs are few) while
# keeping a sweep's status far below the API server's object size limit: 100 trials x 64 entries.
MAX_EVALUATIONS: Final = 64


def objective_of(metric: str, progress: Mapping[str, Any]) -> float | None:
    """The objective ``metric`` in a progress update (wire form: evalLoss, or one of metrics)."""
    if metric == "eval_loss":
        value = progress.get("evalLoss")
    else:
        value = (progress.get("metrics") or {}).get(metric.removeprefix("eval_"))
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def observe(history: Mapping[int, float], step: int | None, objective: float | None) -> dict[int, float]:
    """``history`` with the evaluation an update shows, when it is a new one: a later step than any
    recorded, with another value than the latest recorded (the same value at a later step is the
    same evaluation, repeated by the logging updates after it). At most :data:`MAX_EVALUATIONS`
    entries: the earliest go first, the pruners judge a trial by its latest steps."""
    updated = dict(history)
    if step is None or objective is None:
        return updated
    if updated:
        last = max(updated)
        if step <= last or updated[last] == objective:
            return updated
    updated[step] = objective
    for old in sorted(updated)[: max(0, len(updated) - MAX_EVALUATIONS)]:
        del updated[old]
    return updated
