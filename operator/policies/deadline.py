"""``activeDeadlineSeconds``: the time a job may run, not counting the time it spent suspended.

The clock starts at ``status.startTime``. Each suspension's length is added to the annotation
kubetune.io/paused-seconds when the job resumes (see :mod:`.suspension`); a suspension in
progress counts from its ``Suspended`` condition's lastTransitionTime.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from kubetune.api import ConditionType
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


def paused_seconds(annotations: Mapping[str, str]) -> float:
    try:
        return float(annotations.get(ANNOTATION_PAUSED) or 0)
    except ValueError:
        return 0.0


def suspended_since(status: JobStatusBase) -> datetime | None:
    """When the suspension in progress began (None: the job is not suspended)."""
    cond = get_condition(status.conditions, ConditionType.suspended)
    if cond is None or cond.status != "True":
        return None
    return parse_time(cond.last_transition_time)


def active_seconds(status: JobStatusBase, annotations: Mapping[str, str], now: datetime) -> float | None:
    """Seconds the job has been running: since startTime, less the time spent suspended."""
    started = parse_time(status.start_time)
    if started is None:
        return None
    active = (now - started).total_seconds() - paused_seconds(annotations)
    since = suspended_since(status)
    if since is not None and since >= started:
        active -= (now - since).total_seconds()
    return active


def enforce(obs: Observation, status: JobStatusBase) -> Decision:
    """Fail a job that ran past its deadline, deleting the Jobs still running."""
    deadline = obs.job.spec.active_deadline_seconds
    if deadline is None or finished(status):
        return Decision(status=status)
    active = active_seconds(status, obs.annotations, obs.now)
    if active is None or active < deadline:
        return Decision(status=status)
    running = [ChildRef("batch/v1", "Job", j.name) for j in obs.jobs if not j.complete and not j.failed]
    message = f"ran {int(active)}s, longer than activeDeadlineSeconds {deadline}"
    return Decision(status=failed(obs, status, REASON_DEADLINE, message), delete=running, settled=True)


def due_in(obs: Observation, status: JobStatusBase, annotations: Mapping[str, str]) -> float | None:
    """Seconds until the deadline of a job in ``status`` passes; None while it cannot (no
    deadline, not started, suspended, or finished)."""
    deadline = obs.job.spec.active_deadline_seconds
    if deadline is None or finished(status) or suspended_since(status) is not None:
        return None
    active = active_seconds(status, annotations, obs.now)
    if active is None:
        return None
    return max(deadline - active, 0.0)
