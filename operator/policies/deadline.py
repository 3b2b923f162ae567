"""``activeDeadlineSeconds``: the time a job may run, not counting the time it spent suspended.

The clock starts at ``status.startTime``. Each suspension's length is added to the annotation
kubetune.io/paused-seconds when the job resumes (see :mod:`.suspension`); a suspension in
progress counts from its ``Suspended`` condition's lastTransitionTime.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Protocol

from kubetune.api import Condition, ConditionType
from kubetune.api.status import JobStatusBase
from kubetune.operator.lifecycle import (
    ANNOTATION_PAUSED,
    REASON_DEADLINE,
    ChildRef,
    Decision,
    Observation,
    failed,
    finished,
    get_condition,
    parse_time,
)


class Clocked(Protocol):
    """What the clock reads of a status: a job's, or a FineTuneSweep's (the same rule for both)."""

    @property
    def start_time(self) -> str | None: ...

    @property
    def conditions(self) -> Sequence[Condition] | None: ...


def paused_seconds(annotations: Mapping[str, str]) -> float:
    try:
        return float(annotations.get(ANNOTATION_PAUSED) or 0)
    except ValueError:
        return 0.0


def suspended_since(status: Clocked) -> datetime | None:
    """When the suspension in progress began (None: the job is not suspended)."""
    cond = get_condition(status.conditions, ConditionType.suspended)
    if cond is None or cond.status != "True":
        return None
    return parse_time(cond.last_transition_time)


def active_seconds(status: Clocked, annotations: Mapping[str, str], now: datetime) -> float | None:
    """Seconds the job has been running: since startTime, less the time spent suspended."""
    started = parse_time(status.start_time)
    if started is None:
        return None
    active = (now - started).total_seconds() - paused_seconds(annotations)
    since = suspended_since(status)
    if since is not None and since >= started:
        active -= (now - since).total_seconds()
    return active


def paused_after_resuming(status: Clocked, annotations: Mapping[str, str], now: datetime) -> str | None:
    """The kubetune.io/paused-seconds to record when a suspension in progress ends now (None: it
    began before the start, which the clock does not count, or none is in progress)."""
    since, started = suspended_since(status), parse_time(status.start_time)
    if since is None or started is None or started > since:
        return None
    return str(int(paused_seconds(annotations) + (now - since).total_seconds()))


def overdue(
    deadline: int | None, status: Clocked, annotations: Mapping[str, str], now: datetime
) -> float | None:
    """The active seconds of a run past ``deadline`` (None: not past it, or no deadline)."""
    if deadline is None:
        return None
    active = active_seconds(status, annotations, now)
    return active if active is not None and active >= deadline else None


def remaining(
    deadline: int | None, status: Clocked, annotations: Mapping[str, str], now: datetime
) -> float | None:
    """Seconds until ``deadline`` passes; None while it cannot (no deadline, not started, suspended)."""
    if deadline is None or suspended_since(status) is not None:
        return None
    active = active_seconds(status, annotations, now)
    return None if active is None else max(deadline - active, 0.0)


def enforce(obs: Observation, status: JobStatusBase) -> Decision:
    """Fail a job that ran past its deadline, deleting the Jobs still running."""
    deadline = obs.job.spec.active_deadline_seconds
    active = None if finished(status) else overdue(deadline, status, obs.annotations, obs.now)
    if active is None:
        return Decision(status=status)
    running = [ChildRef("batch/v1", "Job", j.name) for j in obs.jobs if not j.complete and not j.failed]
    message = f"ran {int(active)}s, longer than activeDeadlineSeconds {deadline}"
    return Decision(status=failed(obs, status, REASON_DEADLINE, message), delete=running, settled=True)


def due_in(obs: Observation, status: JobStatusBase, annotations: Mapping[str, str]) -> float | None:
    """Seconds until the deadline of a job in ``status`` passes; None while it cannot (no
    deadline, not started, suspended, or finished)."""
    if finished(status):
        return None
    return remaining(obs.job.spec.active_deadline_seconds, status, annotations, obs.now)
