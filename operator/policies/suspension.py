"""``spec.suspend`` and Kueue: whether a step's Job runs, and the phase that says so.

A job with ``spec.queueName`` creates its Jobs suspended and leaves unsuspending them to Kueue;
``spec.suspend`` suspends and resumes them itself. Leaving a suspension adds its length to the
deadline clock's allowance (:mod:`.deadline`).
"""

from __future__ import annotations

from kubetune.api import ConditionType, Phase
from kubetune.api.status import JobStatusBase
from kubetune.operator.lifecycle import (
    ANNOTATION_PAUSED,
    ChildPatch,
    ChildRef,
    Decision,
    JobState,
    Observation,
    StateReason,
    get_condition,
    rfc3339,
    with_condition,
    with_phase,
)
from kubetune.operator.policies.deadline import paused_after_resuming

SUSPENDED_MESSAGE = "spec.suspend is true; resuming continues from the last checkpoint"


def step(
    obs: Observation,
    status: JobStatusBase,
    phase: Phase,
    message: str,
    *,
    job: JobState | None = None,
    suspended: bool | None = None,
) -> Decision:
    """Phase bookkeeping for a step whose Job exists (``job``) or is being created, suspended or
    not (``suspended``): ``phase`` if it runs, else Suspended, or Pending while Kueue has not
    admitted a job that never started."""
    spec = obs.job.spec
    queue = spec.queue_name
    is_suspended = job.suspended if job is not None else bool(suspended)
    patches: list[ChildPatch] = []
    if job is not None and spec.suspend and not job.suspended:
        patches.append(ChildPatch(ChildRef("batch/v1", "Job", job.name), {"spec": {"suspend": True}}))
        is_suspended = True
    elif job is not None and not spec.suspend and job.suspended and queue is None:
        patches.append(ChildPatch(ChildRef("batch/v1", "Job", job.name), {"spec": {"suspend": False}}))
        is_suspended = False
    if spec.suspend:
        return Decision(status=suspend(obs, status, StateReason.suspended, SUSPENDED_MESSAGE), patch=patches)
    if is_suspended and queue is not None:
        note = f"waiting for admission by Kueue LocalQueue {queue}"
        if status.start_time:
            return Decision(status=suspend(obs, status, StateReason.queued, note), patch=patches)
        status = with_phase(status, Phase.pending, note)
        return Decision(
            status=_suspended_condition(obs, status, True, StateReason.queued, note), patch=patches
        )
    resumed = resume(obs, status)
    status = resumed.status
    if not status.start_time:
        status = status.model_copy(update={"start_time": rfc3339(obs.now)})
    status = with_phase(status, phase, message)
    if phase == Phase.running:
        status = with_condition(obs, status, ConditionType.running, True, StateReason.running, message)
    return Decision(status=status, patch=patches, annotations=resumed.annotations)


def suspend(obs: Observation, status: JobStatusBase, reason: str, message: str) -> JobStatusBase:
    status = with_phase(status, Phase.suspended, message)
    status = _suspended_condition(obs, status, True, reason, message)
    if get_condition(status.conditions, ConditionType.running):
        status = with_condition(obs, status, ConditionType.running, False, StateReason.suspended, message)
    return status


def resume(obs: Observation, status: JobStatusBase) -> Decision:
    """Leaving suspension: add the paused time to the deadline clock's allowance."""
    cond = get_condition(status.conditions, ConditionType.suspended)
    if cond is None or cond.status != "True":
        return Decision(status=status)
    paused = paused_after_resuming(status, obs.annotations, obs.now)
    annotations = {ANNOTATION_PAUSED: paused} if paused is not None else {}
    status = _suspended_condition(obs, status, False, StateReason.resumed, "resumed")
    return Decision(status=status, annotations=annotations)


def _suspended_condition(
    obs: Observation, status: JobStatusBase, suspended: bool, reason: str, message: str
) -> JobStatusBase:
    """The Suspended condition, which a job that was never suspended does not carry."""
    if get_condition(status.conditions, ConditionType.suspended) is None and not suspended:
        return status
    return with_condition(obs, status, ConditionType.suspended, suspended, reason, message)
