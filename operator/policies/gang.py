"""The gang: the training or compression Job of the current attempt, and its supporting children.

Attempt k runs as the Job ``N-train-rk`` (``N-compress-rk``); older attempts' Jobs go. A failed
attempt is :mod:`.failure`'s to judge; a complete one makes the job Succeeded with its artifacts
(:func:`kubetune.run.artifacts.artifacts_of`).
"""

from __future__ import annotations

from kubetune.api import ConditionType, Phase
from kubetune.api.status import JobStatusBase, ProcessLogsStatus
from kubetune.operator.lifecycle import (
    ChildRef,
    Decision,
    Observation,
    StateReason,
    rfc3339,
    with_condition,
    with_phase,
)
from kubetune.operator.policies import diagnosis, failure, suspension
from kubetune.operator.render import (
    child_names,
    initially_suspended,
    render_gang_support,
    render_main_job,
)
from kubetune.run.artifacts import artifacts_of
from kubetune.run.logs import attempt_logs_uri
from kubetune.run.plan import RunPlan


def run(obs: Observation, status: JobStatusBase, plan: RunPlan) -> Decision:
    names = child_names(obs.job)
    attempt = failure.current_attempt(obs.job, status, obs.jobs)
    name = names.main(attempt)
    stale = [
        ChildRef("batch/v1", "Job", j.name)
        for j in obs.jobs
        if j.component == names.main_component and j.attempt < attempt
    ]
    kept = ProcessLogsStatus(attempt=attempt, uri=attempt_logs_uri(plan.output_uri, attempt))
    status = status.model_copy(update={"restarts": attempt, "active_job": name, "logs": kept})
    current = next((j for j in obs.jobs if j.name == name), None)
    if current is not None and current.complete:
        return Decision(status=succeeded(obs, status), delete=stale)
    decision = Decision(status=status, create=render_gang_support(obs.job, obs.namespace), delete=stale)
    if current is None:
        created = Decision(
            status=status, create=[render_main_job(obs.job, obs.settings, plan, obs.namespace, attempt)]
        )
        step = suspension.step(
            obs, status, Phase.running, f"{obs.noun} started", suspended=initially_suspended(obs.job)
        )
        return decision.then(created).then(step)
    if current.failed:
        return decision.then(failure.gang_failed(obs, status, current, plan))
    watched = failure.watch_gang(obs, status, current, plan)
    if watched is not None:
        return decision.then(watched)
    message = f"{obs.noun}: {current.ready}/{plan.world.workers} workers ready"
    step = decision.then(suspension.step(obs, status, Phase.running, message, job=current))
    return step.then(diagnosis.report_waiting(obs, step.status, current))


def succeeded(obs: Observation, status: JobStatusBase) -> JobStatusBase:
    message = f"{obs.noun} finished"
    status = with_phase(status, Phase.succeeded, message)
    status = status.model_copy(
        update={"completion_time": rfc3339(obs.now), "artifacts": artifacts_of(obs.job).status()}
    )
    status = with_condition(obs, status, ConditionType.complete, True, StateReason.succeeded, message)
    return with_condition(obs, status, ConditionType.running, False, StateReason.succeeded, message)
