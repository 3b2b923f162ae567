"""Diagnosis: why a workload's pods cannot run, or why its attempt ended, in words a person can act on.

Pure functions of what the handlers observed of a workload Job's pods (:class:`PodState`) and of
the job's spec. Each finding names the reason the job's condition and Event carry
(docs/operations.md, "When a job fails"):

* ``OOMKilled``: a container ran out of memory; which container, its limit, what to change.
* ``Unschedulable``: the scheduler's message, while the job waits (it does not fail for it).
* ``ImagePullFailed``: the kubelet backed off pulling the image; the image is named.
* ``ContainerConfigError``: a container cannot be created (a Secret or key its environment names
  is missing); the kubelet's message names them.
* ``Disrupted``: a pod was evicted or preempted; the gang is replaced without counting against
  ``maxRestarts``.
* ``Stalled``: no progress report for ``progressDeadlineSeconds``; the attempt ends as retriable.

A gang's other failures name the workers whose pods never started, the ranks a rendezvous waits for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from kubetune.api import ConditionType, FineTuneJob
from kubetune.api.status import JobStatusBase
from kubetune.operator.lifecycle import (
    REASON_CONTAINER_CONFIG,
    REASON_DISRUPTED,
    REASON_IMAGE_PULL,
    REASON_SCHEDULED,
    REASON_UNSCHEDULABLE,
    Decision,
    Event,
    JobState,
    Observation,
    PodState,
    Termination,
    earliest,
    get_condition,
    parse_time,
    with_condition,
)
from kubetune.operator.render import COMPONENT_VALIDATE, Job

# How often the operator looks at the pods of a workload that is not yet all ready: pods that wait
# (unschedulable, pulling, missing a Secret) change nothing of their Job, so no watch event says so.
POD_CHECK_SECONDS: Final = 10.0
OOM_REASON: Final = "OOMKilled"
# The kubelet gave up pulling for now (it retries with back-off, but the same image fails again).
_PULL_FAILED: Final = ("ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")
_CONFIG_ERROR: Final = "CreateContainerConfigError"


@dataclass(frozen=True)
class Finding:
    """Why pods of a workload cannot run; ``fatal`` ones end the job, the others are reported."""

    reason: str
    message: str
    fatal: bool


def is_oom(term: Termination) -> bool:
    return term.reason == OOM_REASON


def memory_advice(job: Job, container: str) -> str:
    """What to change so that ``container`` of ``job`` needs less memory or gets more."""
    if container == COMPONENT_VALIDATE:
        return "raise the operator's KUBETUNE_VALIDATION_MEMORY (the validation pod's memory limit)"
    changes = ["raise spec.resources.limits.memory (and the request)"]
    if isinstance(job, FineTuneJob):
        spec = job.spec
        if spec.deepspeed.zero_stage < 3:
            changes.append(f"shard parameters with deepspeed.zeroStage 3 (now {spec.deepspeed.zero_stage})")
        if not spec.deepspeed.offload_optimizer:
            changes.append("offload optimizer states with deepspeed.offloadOptimizer")
        hp = spec.hyperparameters
        changes.append(f"lower hyperparameters.perDeviceBatchSize (now {hp.per_device_batch_size})")
        changes.append(f"lower hyperparameters.maxSeqLength (now {hp.max_seq_length})")
        if not hp.gradient_checkpointing:
            changes.append("turn on hyperparameters.gradientCheckpointing")
    return "; or ".join(changes)


def oom_message(job: Job, term: Termination, pods: Sequence[PodState]) -> str:
    """``term`` was an out-of-memory kill: which container, its memory limit, what to change."""
    limit = next((p.memory_limits.get(term.container) for p in pods if p.name == term.pod), None)
    where = (
        f"container {term.container} of pod {term.pod} ran out of memory and was killed "
        f"(OOMKilled, exit code {term.exit_code})"
    )
    bound = f"; its memory limit is {limit}" if limit else "; it has no memory limit: the node ran out"
    return f"{where}{bound}. To fit: {memory_advice(job, term.container)}"


def blocked(pods: Sequence[PodState]) -> Finding | None:
    """The first reason the pods cannot run: a container that cannot be created or whose image
    cannot be pulled after retries (fatal), else a pod no node fits (reported while it waits)."""
    notices: list[Finding] = []
    for pod in sorted(pods, key=lambda p: p.name):
        for wait in pod.waiting:
            where = f"container {wait.container} of pod {pod.name}"
            if wait.reason == _CONFIG_ERROR:
                message = (
                    f"{where} cannot be created: {wait.message or wait.reason}. Create the Secret "
                    "or key it names (spec.storage.secretRef, spec.tracking.mlflow.secretRef) and "
                    "recreate the job"
                )
                return Finding(REASON_CONTAINER_CONFIG, message, fatal=True)
            if wait.reason in _PULL_FAILED:
                message = (
                    f"{where} cannot pull image {wait.image!r} ({wait.reason}: {wait.message}). Check "
                    "spec.resources.image (or the operator's trainer image) and the registry's credentials"
                )
                return Finding(REASON_IMAGE_PULL, message, fatal=True)
        if pod.unschedulable is not None:
            message = (
                f"pod {pod.name} cannot be scheduled: {pod.unschedulable}. The job waits; lower "
                "spec.resources requests (or workers), or add nodes that have them"
            )
            notices.append(Finding(REASON_UNSCHEDULABLE, message, fatal=False))
    return notices[0] if notices else None


def disrupted(pods: Sequence[PodState]) -> Finding | None:
    """A pod evicted or preempted (a DisruptionTarget condition, or evicted by its kubelet)."""
    for pod in sorted(pods, key=lambda p: p.name):
        if pod.disruption is not None:
            message = f"pod {pod.name} was evicted or preempted ({pod.disruption})"
            return Finding(REASON_DISRUPTED, message, fatal=False)
    return None


def missing_ranks(pods: Sequence[PodState], workers: int) -> list[int]:
    """The node ranks of a gang of ``workers`` none of whose pods ever started a container."""
    started = {p.index for p in pods if p.started and p.index is not None}
    return [rank for rank in range(workers) if rank not in started]


def missing_note(pods: Sequence[PodState], workers: int) -> str:
    """ ", workers never started: ranks 1, 3" when some of the gang never ran, else ""."""
    missing = missing_ranks(pods, workers)
    if not missing or len(missing) == workers or not pods:
        return ""
    ranks = ", ".join(str(r) for r in missing)
    return f"; workers that never started (the rendezvous waited for them): rank{'s' if len(missing) > 1 else ''} {ranks}"


def stall_due_in(
    deadline: int | None, job: JobState, progress_at: datetime | None, now: datetime
) -> float | None:
    """Seconds until an attempt that reports no progress counts as stalled (<= 0: it has), from
    the newer of its Job's start and the last progress report; None without a deadline or while
    the Job has not started (suspended, or not yet running)."""
    if deadline is None or job.suspended or job.complete or job.failed:
        return None
    started = parse_time(job.started_at)
    if started is None:
        return None
    since = max(started, progress_at) if progress_at is not None else started
    return deadline - (now - since).total_seconds()


def stall_message(
    deadline: int, progress_at: datetime | None, job: JobState, pods: Sequence[PodState], workers: int
) -> str:
    started = parse_time(job.started_at)
    last = "none since the attempt started"
    if progress_at is not None and started is not None and progress_at > started:
        last = f"the last at {progress_at.strftime('%Y-%m-%dT%H:%M:%SZ')}"
    return (
        f"no progress report for {deadline}s (progressDeadlineSeconds; {last}){missing_note(pods, workers)}"
    )


def report_waiting(obs: Observation, status: JobStatusBase, current: JobState) -> Decision:
    """While ``current`` runs: the PodsScheduled condition (False with the scheduler's message
    while a pod cannot be placed, with a Warning Event when that news is new; True again once
    they are placed), and when to look again (pods that exist but are not all ready, a progress
    deadline)."""
    pods = obs.pods.get(current.name, ())
    finding = blocked(pods)
    old = get_condition(status.conditions, ConditionType.scheduled)
    events: list[Event] = []
    if finding is not None and finding.reason == REASON_UNSCHEDULABLE:
        if old is None or old.status != "False" or old.message != finding.message:
            events.append(Event("Warning", finding.reason, finding.message))
        status = with_condition(obs, status, ConditionType.scheduled, False, finding.reason, finding.message)
        status = status.model_copy(update={"message": finding.message})
    elif old is not None and old.status == "False" and pods and all(p.unschedulable is None for p in pods):
        status = with_condition(
            obs, status, ConditionType.scheduled, True, REASON_SCHEDULED, "all pods are scheduled"
        )
    # Until the Job controller has created pods, its own status updates bring the next look.
    waiting = pods and current.ready < current.parallelism and not current.suspended
    recheck = POD_CHECK_SECONDS if waiting else None
    deadline = obs.job.spec.progress_deadline_seconds if isinstance(obs.job, FineTuneJob) else None
    due = (
        stall_due_in(deadline, current, obs.progress_at, obs.now)
        if current.component != COMPONENT_VALIDATE
        else None
    )
    return Decision(
        status=status, events=events, recheck_after=earliest(recheck, None if due is None else max(due, 1.0))
    )
