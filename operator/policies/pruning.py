"""``kubetune.io/prune`` and ``kubetune.io/stop``: a sweep ends a trial before its last step.

The FineTuneSweep annotates its trial; the trial's own reconcile ends it: the running gang goes,
the job ends Failed (terminal, so never retried), and its output -- the checkpoints it committed
-- stays. ``prune``: its pruner judges the trial hopeless, reason Pruned; only the sweep reads
that reason: for it a pruned trial is a result, not a failure (it does not count towards
maxFailedTrials). ``stop``: the sweep itself ended (its deadline passed), with the sweep's reason.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

from kubetune.api.status import JobStatusBase
from kubetune.operator.lifecycle import (
    ANNOTATION_PRUNE,
    ANNOTATION_STOP,
    ChildRef,
    Decision,
    Observation,
    failed,
    finished,
)

REASON_PRUNED: Final = "Pruned"
REASON_STOPPED: Final = "StoppedBySweep"
_REASON: Final = re.compile(r"^([A-Z][A-Za-z]{0,63}): (.*)$", re.DOTALL)


def stop_annotation(reason: str, message: str) -> dict[str, str]:
    """The annotation a sweep sets on a trial to end it with ``reason``."""
    return {ANNOTATION_STOP: f"{reason}: {message}"}


def requested_stop(annotations: Mapping[str, str]) -> tuple[str, str] | None:
    """The reason and message a sweep asked a job to end with, if it asked."""
    if ANNOTATION_PRUNE in annotations:
        why = annotations[ANNOTATION_PRUNE].strip()
        # The annotation's value is the sweep's reason (the objective against the others' at its step).
        return (
            REASON_PRUNED,
            f"stopped early by its sweep: {why or 'its objective is worse than the earlier trials'}",
        )
    if ANNOTATION_STOP in annotations:
        value = annotations[ANNOTATION_STOP].strip()
        match = _REASON.match(value)
        if match is None:
            return REASON_STOPPED, f"stopped by its sweep: {value or 'the sweep ended'}"
        return match.group(1), f"stopped by its sweep: {match.group(2)}"
    return None


def enforce(obs: Observation, status: JobStatusBase) -> Decision:
    """End a job its sweep asked to stop, deleting the Jobs still running."""
    stop = requested_stop(obs.annotations)
    if stop is None or finished(status):
        return Decision(status=status)
    reason, message = stop
    message += "; its checkpoints are kept"
    running = [ChildRef("batch/v1", "Job", j.name) for j in obs.jobs if not j.complete and not j.failed]
    return Decision(status=failed(obs, status, reason, message), delete=running, settled=True)
