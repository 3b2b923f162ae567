"""``ttlSecondsAfterFinished``: once that long has passed since completionTime, the children only
the run needed are deleted (once: kubetune.io/children-deleted). Artifacts in object storage are
never deleted, and serving stays while the job exists."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

from kubetune.api.status import JobStatusBase
from kubetune.operator.lifecycle import (
    ANNOTATION_CLEANED,
    ChildRef,
    Decision,
    Event,
    JobState,
    Observation,
    parse_time,
)
from kubetune.operator.render import Job, child_names


def expiry(obs: Observation, status: JobStatusBase, annotations: Mapping[str, str]) -> datetime | None:
    """When the children of a finished job are due to go (None: never, or they went)."""
    return expiry_at(obs.job.spec.ttl_seconds_after_finished, status.completion_time, annotations)


def expiry_at(
    ttl: int | None, completion_time: str | None, annotations: Mapping[str, str]
) -> datetime | None:
    """When the children of whatever finished at ``completion_time`` are due to go: a job's, or a
    FineTuneSweep's trials (None: never, or they went)."""
    finished_at = parse_time(completion_time)
    if ttl is None or finished_at is None or annotations.get(ANNOTATION_CLEANED) == "true":
        return None
    return finished_at + timedelta(seconds=ttl)


def due_in(obs: Observation, status: JobStatusBase, annotations: Mapping[str, str]) -> float | None:
    """Seconds until :func:`clean_up` deletes something (0: now), None if it never will."""
    due = expiry(obs, status, annotations)
    return None if due is None else max((due - obs.now).total_seconds(), 0.0)


def clean_up(obs: Observation, status: JobStatusBase) -> Decision:
    """Delete the workload children of a finished job whose TTL has passed."""
    due = expiry(obs, status, obs.annotations)
    if due is None or obs.now < due:
        return Decision(status=status)
    ttl = obs.job.spec.ttl_seconds_after_finished
    return Decision(
        status=status,
        delete=workload_refs(obs.job, obs.jobs),
        annotations={ANNOTATION_CLEANED: "true"},
        events=[
            Event("Normal", "ChildrenDeleted", f"ttlSecondsAfterFinished ({ttl}s) passed; artifacts are kept")
        ],
    )


def workload_refs(job: Job, jobs: Sequence[JobState]) -> list[ChildRef]:
    """Children that only the run needs (serving objects stay while the job exists)."""
    names = child_names(job)
    refs = [ChildRef("batch/v1", "Job", j.name) for j in jobs]
    if names.validate not in {j.name for j in jobs}:
        refs.append(ChildRef("batch/v1", "Job", names.validate))
    return [
        *refs,
        ChildRef("v1", "ConfigMap", names.plan),
        ChildRef("v1", "Service", names.workers),
        ChildRef("rbac.authorization.k8s.io/v1", "RoleBinding", names.runner),
        ChildRef("rbac.authorization.k8s.io/v1", "Role", names.runner),
        # Never the user's own ServiceAccount (spec.storage.serviceAccountName).
        *([] if job.spec.storage.service_account_name else [ChildRef("v1", "ServiceAccount", names.runner)]),
    ]
