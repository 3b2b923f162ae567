"""The model a job works on; a CompressJob with ``model.fromFineTuneJob`` waits for that job,
one with ``model.fromFineTuneSweep`` for that sweep, whose best trial's model it compresses.

The model is recorded in ``status.sourceModelUri`` once known, so a later change of the upstream
job (or its deletion) never changes what a started compression reads.
"""

from __future__ import annotations

from kubetune.api import CompressJob, FineTuneJob, Phase
from kubetune.api.status import CompressJobStatus, JobStatusBase
from kubetune.operator.lifecycle import (
    REASON_INVALID_INPUT,
    REASON_NO_BEST_TRIAL,
    REASON_UPSTREAM_FAILED,
    Decision,
    Observation,
    SweepUpstream,
    Upstream,
    failed,
    with_phase,
)
from kubetune.operator.render import Job
from kubetune.run.artifacts import AdapterOnlyUpstream, compressible_model_uri


def model_uri(job: Job, status: JobStatusBase) -> str | None:
    """The model to render the plan with, once :func:`resolve` has found it."""
    if isinstance(job, FineTuneJob):
        return str(job.spec.model.uri)
    return status.source_model_uri if isinstance(status, CompressJobStatus) else None


def resolve(obs: Observation, status: JobStatusBase) -> Decision:
    """Record the model a CompressJob compresses, or wait for (or fail with) its upstream job."""
    job = obs.job
    if not isinstance(job, CompressJob) or not isinstance(status, CompressJobStatus):
        return Decision(status=status)
    if status.source_model_uri:
        return Decision(status=status)
    if job.spec.model.uri:
        return Decision(status=status.model_copy(update={"source_model_uri": str(job.spec.model.uri)}))
    if job.spec.model.from_fine_tune_sweep:
        return _resolve_sweep(obs, status, job.spec.model.from_fine_tune_sweep)
    name = job.spec.model.from_fine_tune_job
    upstream = obs.upstream if isinstance(obs.upstream, Upstream) else None
    waiting = _until_succeeded(obs, status, f"FineTuneJob {name}", upstream)
    if waiting is not None or upstream is None:
        return waiting or Decision(status=status)
    if upstream.job is None:
        message = f"FineTuneJob {name} has no valid spec to take the model from"
        return Decision(status=failed(obs, status, REASON_INVALID_INPUT, message), settled=True)
    try:
        source = compressible_model_uri(upstream.job)
    except AdapterOnlyUpstream as refusal:
        return Decision(status=failed(obs, status, REASON_INVALID_INPUT, str(refusal)), settled=True)
    return Decision(status=status.model_copy(update={"source_model_uri": source}))


def _until_succeeded(
    obs: Observation,
    status: CompressJobStatus,
    what: str,
    upstream: Upstream | SweepUpstream | None,
) -> Decision | None:
    """Wait while ``what`` (e.g. "FineTuneJob NAME") is missing or unfinished, fail with it when it
    failed; None once it has Succeeded."""
    if upstream is None or not upstream.found:
        return Decision(
            status=with_phase(status, Phase.waiting, f"waiting for {what} to exist"), settled=True
        )
    if upstream.phase == Phase.failed.value:
        why = f": {upstream.message}" if upstream.message else ""
        return Decision(
            status=failed(obs, status, REASON_UPSTREAM_FAILED, f"{what} failed{why}"), settled=True
        )
    if upstream.phase != Phase.succeeded.value:
        return Decision(
            status=with_phase(status, Phase.waiting, f"waiting for {what} to succeed"), settled=True
        )
    return None


def _resolve_sweep(obs: Observation, status: CompressJobStatus, name: str) -> Decision:
    """The best trial's model of the FineTuneSweep ``name``, once it has Succeeded. The sweep
    names its winner only at the end; a best trial while it runs may still be overtaken."""
    upstream = obs.upstream if isinstance(obs.upstream, SweepUpstream) else None
    waiting = _until_succeeded(obs, status, f"FineTuneSweep {name}", upstream)
    if waiting is not None or upstream is None:
        return waiting or Decision(status=status)
    if upstream.model_uri is None:
        which = (
            "no trial completed"
            if upstream.best_trial is None
            else f"trial {upstream.best_trial} has no model"
        )
        message = f"FineTuneSweep {name} has no best trial's model to compress ({which})"
        return Decision(status=failed(obs, status, REASON_NO_BEST_TRIAL, message), settled=True)
    return Decision(status=status.model_copy(update={"source_model_uri": upstream.model_uri}))
