"""The spec renders, and the validation Job finds the model and data readable before the gang runs.

Until the job starts (no startTime, and the validation Job absent or still suspended) the plan
ConfigMap and the validation Job follow spec edits; afterwards the training fields are immutable
(the CRD's rule). A spec that does not even parse fails the job with :func:`invalid_spec`.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime

from kubetune.api import ConditionType, Phase
from kubetune.api.status import JobStatusBase
from kubetune.operator.lifecycle import (
    REASON_INVALID_SPEC,
    ChildRef,
    Decision,
    Event,
    Observation,
    StateReason,
    failed,
    is_true,
    ref_of,
    rfc3339,
    set_condition,
    spec_hash_of,
    with_condition,
)
from kubetune.operator.policies import diagnosis, failure, suspension
from kubetune.operator.render import (
    RenderError,
    child_names,
    initially_suspended,
    render_base,
    render_plan,
    render_validation_job,
)
from kubetune.run.plan import RunPlan

VALIDATING = "validating model and data"
VALIDATED = "model and data are readable and well-formed"


def plan_of(obs: Observation, status: JobStatusBase, model_uri: str | None) -> RunPlan | Decision:
    """The run plan, or the failure of a spec it cannot be rendered from."""
    try:
        return render_plan(obs.job, obs.settings, obs.namespace, model_uri)
    except (RenderError, ValueError) as exc:
        return Decision(status=failed(obs, status, REASON_INVALID_SPEC, str(exc)), settled=True)


def plan_follows_spec(obs: Observation) -> bool:
    """Whether the plan and the validation Job still follow spec edits: until the job starts."""
    if obs.status.start_time:
        return False
    validation = next((j for j in obs.jobs if j.name == child_names(obs.job).validate), None)
    return validation is None or validation.suspended


def validate(obs: Observation, status: JobStatusBase, plan: RunPlan) -> Decision:
    """The plan and identity children, then the validation Job; settled until it has passed."""
    base = render_base(obs.job, plan, obs.namespace)
    follows = plan_follows_spec(obs)
    # Until the job starts its spec may change: the plan follows it (ANNOTATION_GENERATION).
    update = [ref_of(m) for m in base if m["kind"] == "ConfigMap"] if follows else []
    decision = Decision(status=status, create=base, update=update)
    if is_true(status.conditions, ConditionType.validated):
        return decision
    return decision.then(_validation_job(obs, status, plan, follows))


def _validation_job(obs: Observation, status: JobStatusBase, plan: RunPlan, follows: bool) -> Decision:
    name = child_names(obs.job).validate
    validation = next((j for j in obs.jobs if j.name == name), None)
    wanted = render_validation_job(obs.job, obs.settings, plan, obs.namespace)
    if validation is not None and follows and validation.spec_hash != spec_hash_of(wanted):
        # Its pod template is immutable: replace it; the next reconcile (its deletion's watch
        # event) creates it from the current spec, which the plan already is. (Resuming alone
        # changes nothing rendered: suspension.step unsuspends it in place.)
        replaced = Decision(
            status=status.model_copy(update={"active_job": validation.name}),
            delete=[ChildRef("batch/v1", "Job", validation.name)],
            events=[
                Event(
                    "Normal",
                    "SpecChanged",
                    f"the spec changed before the job started (generation {obs.generation}): "
                    "the plan was updated and the validation Job is recreated",
                )
            ],
        )
        step = suspension.step(
            obs, replaced.status, Phase.validating, VALIDATING, suspended=initially_suspended(obs.job)
        )
        return _settled(replaced.then(step))
    if validation is None:
        created = Decision(status=status.model_copy(update={"active_job": name}), create=[wanted])
        step = suspension.step(
            obs, created.status, Phase.validating, VALIDATING, suspended=initially_suspended(obs.job)
        )
        return _settled(created.then(step))
    if validation.failed:
        return failure.validation_failed(obs, status, validation)
    if not validation.complete:
        finding = diagnosis.blocked(obs.pods.get(validation.name, ()))
        if finding is not None and finding.fatal:
            status = with_condition(
                obs, status, ConditionType.validated, False, finding.reason, finding.message
            )
            return failure.fail_workload(obs, status, validation, finding)
        status = status.model_copy(update={"active_job": validation.name})
        step = suspension.step(obs, status, Phase.validating, VALIDATING, job=validation)
        return _settled(step.then(diagnosis.report_waiting(obs, step.status, validation)))
    status = with_condition(obs, status, ConditionType.validated, True, StateReason.validated, VALIDATED)
    return Decision(status=status, events=[Event("Normal", "Validated", VALIDATED)])


def _settled(decision: Decision) -> Decision:
    return dataclasses.replace(decision, settled=True)


def invalid_spec(status: JobStatusBase, message: str, now: datetime, generation: int | None) -> JobStatusBase:
    """The status of a job whose spec does not parse (nothing else of it can be decided)."""
    conditions = set_condition(
        status.conditions, ConditionType.failed, True, REASON_INVALID_SPEC, message, now, generation
    )
    return status.model_copy(
        update={
            "phase": Phase.failed,
            "message": message,
            "observed_generation": generation,
            "completion_time": status.completion_time or rfc3339(now),
            "conditions": conditions,
        }
    )
