"""The pure lifecycle of a FineTuneSweep: from its spec and its trials (owned FineTuneJobs
``<sweep>-t<N>``) to the status to write, the trials to create and those to stop.

Level-based like the jobs' reconciler: every decision is rebuilt from the children (their
``kubetune.io/trial`` label and the parameters in ``kubetune.io/parameters``) and the evaluations
recorded so far, so deciding twice, or after an operator restart, creates no trial twice and
continues the numbering. A trial to stop gets the annotation ``kubetune.io/prune``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

from kubetune.api import API_VERSION, GROUP, ConditionType, FineTuneJob, FineTuneSweep, Phase
from kubetune.api.spec import MlflowTracking, Serve
from kubetune.api.status import FineTuneJobStatus
from kubetune.api.sweep import Evaluation, FineTuneSweepStatus, TrialCounts, TrialState, TrialStatus
from kubetune.operator.admission import images_message
from kubetune.operator.lifecycle import (
    ANNOTATION_CLEANED,
    ANNOTATION_PAUSED,
    ANNOTATION_PRUNE,
    ANNOTATION_STOP,
    LABEL_TRACKING_CREDENTIALS,
    REASON_DEADLINE,
    REASON_IMAGE_NOT_ALLOWED,
    REASON_INVALID_SPEC,
    REASON_SECRET_NOT_ALLOWED,
    Decision,
    DeploymentState,
    JobState,
    Observation,
    SecretAccess,
    StateReason,
    get_condition,
    is_true,
    parse_time,
    rfc3339,
    secret_not_allowed,
    set_condition,
)
from kubetune.operator.policies import serving
from kubetune.operator.policies.deadline import overdue, paused_after_resuming, remaining
from kubetune.operator.policies.pruning import REASON_PRUNED, stop_annotation
from kubetune.operator.policies.suspension import SUSPENDED_MESSAGE
from kubetune.operator.policies.ttl import expiry_at
from kubetune.operator.render import (
    LABEL_JOB,
    LABEL_KIND,
    LABEL_MANAGED_BY,
    LABEL_SWEEP,
    MANAGER,
    Manifest,
    render_sweep_summary_job,
    sweep_owner_reference,
    sweep_summary_image,
    sweep_summary_name,
)
from kubetune.operator.settings import Settings
from kubetune.run.plan import SWEEP_SEARCH_ANNOTATION, SweepRef
from kubetune.run.sweep_summary import SweepSummaryPlan, sweep_tracking
from kubetune.sweep import study
from kubetune.sweep.evaluations import objective_of, observe
from kubetune.sweep.space import search_of, trial_name, trial_output, trial_spec
from kubetune.sweep.study import TrialRecord

LABEL_TRIAL: Final = f"{GROUP}/trial"
ANNOTATION_PARAMETERS: Final = f"{GROUP}/parameters"
REASON_TOO_MANY_FAILURES: Final = "TooManyFailedTrials"
# Whether the ended sweep's MLflow parent run carries its best trial and is ended (the Job
# <sweep>-summary): False with reason Summarizing while it runs, True Summarized, False
# SummaryFailed. It never changes the sweep's phase: tracking never fails training.
CONDITION_TRACKING_SUMMARIZED: Final = "TrackingSummarized"
REASON_SUMMARIZING: Final = "Summarizing"
REASON_SUMMARIZED: Final = "Summarized"
REASON_SUMMARY_FAILED: Final = "SummaryFailed"


@dataclass(frozen=True)
class Trial:
    """What the sweep reads of one child FineTuneJob."""

    number: int
    name: str
    params: Mapping[str, Any]
    phase: str | None = None
    reason: str | None = None  # of its Failed condition
    step: int | None = None
    total_steps: int | None = None
    objective: float | None = None  # the objective metric of its latest evaluation
    model_uri: str | None = None
    prune_requested: bool = False
    stop_requested: bool = False
    suspended: bool = False  # its spec.suspend
    remembered: bool = False  # rebuilt from the sweep's status: its FineTuneJob is gone


def trial_from(body: Mapping[str, Any], metric: str) -> Trial | None:
    """A child FineTuneJob as a trial; None for one without a trial number (not ours to count)."""
    meta = body.get("metadata") or {}
    number = str((meta.get("labels") or {}).get(LABEL_TRIAL, ""))
    if not number.isdigit():
        return None
    annotations = meta.get("annotations") or {}
    status = body.get("status") or {}
    progress = status.get("progress") or {}
    failed = next((c for c in status.get("conditions") or [] if c.get("type") == "Failed"), None)
    return Trial(
        number=int(number),
        name=str(meta.get("name", "")),
        params=json.loads(annotations.get(ANNOTATION_PARAMETERS) or "{}"),
        phase=status.get("phase"),
        reason=failed.get("reason") if failed and failed.get("status") == "True" else None,
        step=progress.get("step"),
        total_steps=progress.get("totalSteps"),
        objective=objective_of(metric, progress),
        model_uri=(status.get("artifacts") or {}).get("modelUri")
        or (status.get("artifacts") or {}).get("adapterUri"),
        prune_requested=ANNOTATION_PRUNE in annotations,
        stop_requested=ANNOTATION_STOP in annotations,
        suspended=bool((body.get("spec") or {}).get("suspend")),
    )


def state_of(trial: Trial) -> TrialState:
    if trial.phase == Phase.succeeded:
        return TrialState.complete
    if trial.phase == Phase.failed:
        return TrialState.pruned if trial.reason == REASON_PRUNED else TrialState.failed
    return TrialState.running if trial.phase == Phase.running else TrialState.pending


def evaluations_of(status: FineTuneSweepStatus) -> dict[int, dict[int, float]]:
    """The evaluation history the sweep's status recorded, by trial number."""
    return {
        row.number: {e.step: e.objective for e in row.evaluations}
        for row in status.trials or []
        if row.evaluations
    }


_PHASE_OF_STATE: Final = {
    TrialState.complete: (Phase.succeeded, None),
    TrialState.pruned: (Phase.failed, REASON_PRUNED),
    TrialState.failed: (Phase.failed, None),
}
REASON_TRIAL_DELETED: Final = "TrialDeleted"


def remembered_trials(
    children: Sequence[Trial], status: FineTuneSweepStatus, in_flight: Collection[int] = ()
) -> list[Trial]:
    """The trials to decide from: the child FineTuneJobs, plus the rows of the status whose job is
    gone. A finished trial deleted (say by the sweep's TTL) still counts: its number is taken and
    its result known. An unfinished one is either ``in_flight`` (just created, its watch event
    not here yet: pending) or was deleted while it ran, which ends it Failed; it is never created
    again, so a sweep being deleted (its trials going first) creates nothing."""
    seen = {t.number for t in children}
    trials = list(children)
    for row in status.trials or []:
        if row.number in seen:
            continue
        params = dict(row.parameters)
        if row.state in _PHASE_OF_STATE:
            phase, reason = _PHASE_OF_STATE[row.state]
        elif row.number in in_flight:
            phase, reason = None, None
        else:
            phase, reason = Phase.failed, REASON_TRIAL_DELETED
        trials.append(
            Trial(
                number=row.number,
                name=row.name,
                params=params,
                phase=phase,
                reason=reason,
                step=row.step,
                objective=row.objective,
                model_uri=row.model_uri,
                remembered=True,
            )
        )
    return sorted(trials, key=lambda t: t.number)


@dataclass
class SweepObservation:
    sweep: FineTuneSweep
    namespace: str
    now: datetime
    status: FineTuneSweepStatus
    trials: Sequence[Trial] = ()
    # The objective at each evaluated step of each trial, as recorded by earlier decisions (the
    # trials report only their latest evaluation).
    evaluations: Mapping[int, Mapping[int, float]] = field(default_factory=dict)
    # The sweep's own annotations (kubetune.io/paused-seconds, kubetune.io/children-deleted).
    annotations: Mapping[str, str] = field(default_factory=dict)
    settings: Settings = field(default_factory=Settings)
    deployment: DeploymentState | None = None  # the promoted model's serving Deployment
    summary_job: JobState | None = None  # <sweep>-summary, which logs the ended sweep to MLflow
    # The Secret of the sweep's spec.tracking.mlflow.secretRef, looked at before <sweep>-summary
    # is created (None: it names none, or the summary is decided already).
    tracking_secret: SecretAccess | None = None


@dataclass
class SweepDecision:
    status: FineTuneSweepStatus
    create: list[Manifest] = field(default_factory=list)
    prune: list[str] = field(default_factory=list)  # trial names to annotate kubetune.io/prune
    evaluations: dict[int, dict[int, float]] = field(default_factory=dict)
    # Merge patches of trials by name: suspending or resuming them, stopping them.
    patch: dict[str, Manifest] = field(default_factory=dict)
    delete: list[str] = field(default_factory=list)  # trial names (ttlSecondsAfterFinished)
    # Serving of the best trial (promote): children to create, patch or delete, as for a job's.
    serving: Decision | None = None
    annotations: dict[str, str] = field(default_factory=dict)  # of the sweep itself
    # The Job <sweep>-summary to create (MLflow tracking, the sweep ended), or to delete (TTL).
    create_summary: Manifest | None = None
    delete_summary: str | None = None
    recheck_after: float | None = None  # seconds after which time alone changes the decision


def render_trial(sweep: FineTuneSweep, namespace: str, number: int, params: Mapping[str, Any]) -> Manifest:
    """The FineTuneJob of trial ``number``: the template with its parameters, writing under
    <output>/trials/<number>/, owned by the sweep."""
    spec = sweep.spec
    name = str(sweep.metadata.name)
    meta: Manifest = {
        "name": trial_name(name, number),
        "namespace": namespace,
        "labels": {LABEL_MANAGED_BY: MANAGER, LABEL_SWEEP: name, LABEL_TRIAL: str(number)},
        "annotations": {
            ANNOTATION_PARAMETERS: json.dumps(dict(params), sort_keys=True),
            # The search space, for the trial's MLflow parent run (trainer/tracking/sweep.py).
            SWEEP_SEARCH_ANNOTATION: json.dumps(search_of(spec), sort_keys=True),
        },
    }
    if sweep.metadata.uid:
        meta["ownerReferences"] = [sweep_owner_reference(sweep)]
    job_spec = trial_spec(spec, params, trial_output(spec, number))
    # Each trial is its own Kueue workload in the sweep's queue, admitted on its own.
    if spec.queue_name:
        job_spec = job_spec.model_copy(update={"queue_name": spec.queue_name})
    return {"apiVersion": API_VERSION, "kind": "FineTuneJob", "metadata": meta, "spec": job_spec.to_wire()}


def records_of(obs: SweepObservation, evaluations: Mapping[int, Mapping[int, float]]) -> list[TrialRecord]:
    records = []
    for trial in obs.trials:
        state = state_of(trial)
        value = trial.objective if state == TrialState.complete else None
        records.append(
            TrialRecord(
                trial.number,
                trial.params,
                state,
                dict(evaluations.get(trial.number, {})),
                value,
                trial.total_steps,
            )
        )
    return records


def decide(obs: SweepObservation) -> SweepDecision:
    """The next step of a sweep."""
    spec = obs.sweep.spec
    status = obs.status.model_copy(update={"observed_generation": obs.sweep.metadata.generation})
    # Each trial's latest evaluation joins those recorded before, a finished trial's too: a trial
    # may report its last evaluation and end before any decision sees it running.
    evaluations = {n: dict(v) for n, v in obs.evaluations.items()}
    for trial in obs.trials:
        seen = observe(evaluations.get(trial.number, {}), trial.step, trial.objective)
        if seen:
            evaluations[trial.number] = seen
    records = records_of(obs, evaluations)
    decision = SweepDecision(status=status, evaluations=evaluations)
    if status.phase is None or not status.phase.finished:
        late = overdue(spec.active_deadline_seconds, status, obs.annotations, obs.now)
        if late is not None:
            message = f"ran {int(late)}s, longer than activeDeadlineSeconds {spec.active_deadline_seconds}"
            status = _finish(obs, status, Phase.failed, REASON_DEADLINE, message)
    if status.phase is not None and status.phase.finished:
        decision.status = _summarised(obs, status, records, evaluations)
        return _finished(obs, decision)
    if spec.suspend:
        return _suspended(obs, decision, records, evaluations)
    _resume(obs, decision)
    status = decision.status

    prune = set(study.to_prune(spec, records))
    names = {t.number: t.name for t in obs.trials}
    decision.prune = [
        names[n] for n in sorted(prune) if not next(t for t in obs.trials if t.number == n).prune_requested
    ]

    failed = sum(r.state == TrialState.failed for r in records)
    active = sum(not r.state.finished for r in records)
    new_records = list(records)
    if failed <= spec.max_failed_trials:
        while active < spec.parallelism and not study.exhausted(spec, new_records):
            number = study.next_number(new_records)
            params = study.next_parameters(spec, new_records)
            decision.create.append(render_trial(obs.sweep, obs.namespace, number, params))
            new_records.append(TrialRecord(number, params, TrialState.pending))
            active += 1
    status = _summarised(obs, status, new_records, evaluations)
    if status.start_time is None and new_records:
        status = status.model_copy(update={"start_time": rfc3339(obs.now)})
    if failed > spec.max_failed_trials:
        status = _finish(
            obs,
            status,
            Phase.failed,
            REASON_TOO_MANY_FAILURES,
            f"{failed} trials failed, more than maxFailedTrials ({spec.max_failed_trials})",
        )
    elif active == 0 and study.exhausted(spec, new_records):
        best = status.best_trial
        message = (
            f"best trial {best.number}: {spec.objective.metric} {best.objective}"
            if best
            else "no trial completed"
        )
        status = _finish(
            obs,
            status,
            Phase.succeeded if best else Phase.failed,
            "Succeeded" if best else "NoTrialCompleted",
            message,
        )
    else:
        status = status.model_copy(
            update={"phase": Phase.running, "message": f"{status.trials_done} trials finished"}
        )
    decision.status = status
    if status.phase is not None and status.phase.finished:
        return _finished(obs, decision)
    annotations = {**obs.annotations, **decision.annotations}
    decision.recheck_after = remaining(spec.active_deadline_seconds, status, annotations, obs.now)
    return decision


def _unfinished(obs: SweepObservation) -> list[Trial]:
    """The trials whose FineTuneJob exists and has not ended."""
    return [t for t in obs.trials if not t.remembered and not state_of(t).finished]


def _suspended(
    obs: SweepObservation,
    decision: SweepDecision,
    records: Sequence[TrialRecord],
    evaluations: Mapping[int, Mapping[int, float]],
) -> SweepDecision:
    """spec.suspend: no new trials; every unfinished trial suspended (its gang goes, its
    checkpoints stay); the deadline clock pauses from the Suspended condition's transition."""
    for trial in _unfinished(obs):
        if not trial.suspended:
            decision.patch[trial.name] = {"spec": {"suspend": True}}
    status = _summarised(obs, decision.status, records, evaluations)
    conditions = set_condition(
        status.conditions,
        ConditionType.suspended,
        True,
        StateReason.suspended,
        SUSPENDED_MESSAGE,
        obs.now,
        obs.sweep.metadata.generation,
    )
    decision.status = status.model_copy(
        update={"phase": Phase.suspended, "message": SUSPENDED_MESSAGE, "conditions": conditions}
    )
    return decision


def _resume(obs: SweepObservation, decision: SweepDecision) -> None:
    """Leaving suspension: the trials resumed, the time suspended added to the clock's allowance."""
    for trial in _unfinished(obs):
        if trial.suspended:
            decision.patch[trial.name] = {"spec": {"suspend": False}}
    status = decision.status
    if not is_true(status.conditions, ConditionType.suspended):
        return
    paused = paused_after_resuming(status, obs.annotations, obs.now)
    if paused is not None:
        decision.annotations[ANNOTATION_PAUSED] = paused
    conditions = set_condition(
        status.conditions,
        ConditionType.suspended,
        False,
        StateReason.resumed,
        "resumed",
        obs.now,
        obs.sweep.metadata.generation,
    )
    decision.status = status.model_copy(update={"conditions": conditions})


def _finished(obs: SweepObservation, decision: SweepDecision) -> SweepDecision:
    """A sweep that ended: a failed one stops its unfinished trials with its own reason (their
    checkpoints stay); ttlSecondsAfterFinished later deletes the trials, keeping the sweep."""
    status = decision.status
    failure = get_condition(status.conditions, ConditionType.failed)
    if status.phase == Phase.failed and failure is not None:
        for trial in _unfinished(obs):
            if not trial.stop_requested and not trial.prune_requested:
                meta = {
                    "annotations": stop_annotation(failure.reason, f"the sweep failed: {failure.message}")
                }
                decision.patch[trial.name] = {"metadata": meta}
    if status.phase == Phase.succeeded:
        decision.serving, status = promote(obs, status)
    status = _summarize_in_mlflow(obs, decision, status)
    decision.status = status
    annotations = {**obs.annotations, **decision.annotations}
    ttl = obs.sweep.spec.ttl_seconds_after_finished
    finished_at = parse_time(status.completion_time)
    job = obs.summary_job
    if (
        job is not None
        and (job.complete or job.failed)
        and ttl is not None
        and finished_at is not None
        and obs.now >= finished_at + timedelta(seconds=ttl)
    ):
        # Deleted with the trials, or once it ends if it outlives them (its end is an event).
        decision.delete_summary = job.name
    due = expiry_at(ttl, status.completion_time, annotations)
    if due is not None and obs.now >= due:
        decision.delete = [t.name for t in obs.trials if not t.remembered]
        decision.annotations[ANNOTATION_CLEANED] = "true"
    elif due is not None:
        decision.recheck_after = (due - obs.now).total_seconds()
    return decision


def tracking_summary(sweep: FineTuneSweep, status: FineTuneSweepStatus) -> dict[str, Any]:
    """The ended sweep as its MLflow parent run records it (``summary.json``'s form, which
    ``log_summary`` reads): the objective, every trial, the best one with where it wrote."""
    spec = sweep.spec

    def row(t: TrialStatus) -> dict[str, Any]:
        return {
            "number": t.number,
            "name": t.name,
            "parameters": dict(t.parameters),
            "state": str(t.state),
            "objective": t.objective,
            "step": t.step,
            "outputUri": trial_output(spec, t.number),
        }

    best = status.best_trial
    return {
        "name": sweep.metadata.name,
        "objective": spec.objective.to_wire(),
        "trials": [row(t) for t in status.trials or []],
        "bestTrial": row(best) if best is not None else None,
    }


def _summarize_in_mlflow(
    obs: SweepObservation, decision: SweepDecision, status: FineTuneSweepStatus
) -> FineTuneSweepStatus:
    """An ended sweep tracked in MLflow gets one Job <sweep>-summary, which logs its best trial to
    the parent run its trials share and ends that run (the operator itself never talks to MLflow).
    Created once: the TrackingSummarized condition remembers it, also after its Job is gone; a
    sweep that never created a trial has no run to end. The Job's end sets the condition."""
    sweep = obs.sweep
    mlflow = sweep_tracking(sweep.spec)
    if mlflow is None or not sweep.metadata.uid or not status.trials:
        return status
    condition = get_condition(status.conditions, CONDITION_TRACKING_SUMMARIZED)
    job = obs.summary_job
    name = sweep_summary_name(sweep)
    refused = _summary_refused(obs, mlflow) if job is None and condition is None else None
    if refused is not None:
        verdict = refused
    elif job is None and condition is None:
        sweep_name = str(sweep.metadata.name)
        plan = SweepSummaryPlan(
            tracking=mlflow.target(obs.namespace, sweep_name),
            sweep=SweepRef(name=sweep_name, uid=sweep.metadata.uid, search=search_of(sweep.spec)),
            namespace=obs.namespace,
            summary=tracking_summary(sweep, status),
        )
        decision.create_summary = render_sweep_summary_job(sweep, obs.settings, obs.namespace, plan, mlflow)
        verdict = (False, REASON_SUMMARIZING, f"Job {name} logs the best trial to MLflow at {mlflow.uri}")
    elif job is not None and job.complete:
        verdict = (
            True,
            REASON_SUMMARIZED,
            f"the sweep's MLflow run at {mlflow.uri} has its best trial and ended",
        )
    elif job is not None and job.failed:
        why = ": ".join(p for p in (job.failed_reason, job.failed_message) if p)
        verdict = (
            False,
            REASON_SUMMARY_FAILED,
            f"Job {name} failed ({why or 'no reason given'}); the sweep's MLflow run lacks its summary "
            f"(kubectl logs job/{name}); the sweep itself is unaffected",
        )
    else:
        return status
    conditions = set_condition(
        status.conditions, CONDITION_TRACKING_SUMMARIZED, *verdict, obs.now, sweep.metadata.generation
    )
    return status.model_copy(update={"conditions": conditions})


def _summary_refused(obs: SweepObservation, mlflow: MlflowTracking) -> tuple[bool, str, str] | None:
    """Why <sweep>-summary may not run, by the rules every job's pods obey (an allowed image, a
    credentials Secret its owner opted in), else None: a sweep whose trials were refused must not
    get, in their stead, a pod that sends the Secret's keys to the server the sweep names."""
    image = sweep_summary_image(obs.sweep, obs.settings)
    left = "; the sweep's MLflow run is left without its summary"
    if not obs.settings.image_allowed(image):
        return (
            False,
            REASON_IMAGE_NOT_ALLOWED,
            images_message([f"spec.template.resources.image {image}"], obs.settings) + left,
        )
    ref = mlflow.secret_ref
    if ref is None or obs.tracking_secret == SecretAccess.allowed:
        return None
    # The sweep's tracking, else the template's (sweep_tracking): name the field it came from.
    own = obs.sweep.spec.tracking is not None and obs.sweep.spec.tracking.mlflow is not None
    field_ = f"spec.{'' if own else 'template.'}tracking.mlflow.secretRef"
    if obs.tracking_secret == SecretAccess.missing:
        return (False, REASON_SUMMARY_FAILED, f"Secret {ref.name} ({field_}) does not exist" + left)
    message = secret_not_allowed(ref.name, field_, LABEL_TRACKING_CREDENTIALS, obs.namespace)
    return (False, REASON_SECRET_NOT_ALLOWED, message + left)


def invalid(
    status: FineTuneSweepStatus, message: str, now: datetime, generation: int | None
) -> FineTuneSweepStatus:
    """The status of a sweep whose spec only Python can find invalid (a value the template's own
    schema refuses): Failed with reason InvalidSpec, naming the parameter."""
    return finished_status(status, Phase.failed, REASON_INVALID_SPEC, message, now, generation)


def _finish(
    obs: SweepObservation, status: FineTuneSweepStatus, phase: Phase, reason: str, message: str
) -> FineTuneSweepStatus:
    return finished_status(status, phase, reason, message, obs.now, obs.sweep.metadata.generation)


def finished_status(
    status: FineTuneSweepStatus,
    phase: Phase,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None,
) -> FineTuneSweepStatus:
    """``status`` of a sweep that ended now: its phase, message, Complete or Failed condition."""
    conditions = set_condition(
        status.conditions,
        "Complete" if phase == Phase.succeeded else "Failed",
        True,
        reason,
        message,
        now,
        generation,
    )
    return status.model_copy(
        update={
            "phase": phase,
            "message": message,
            "conditions": conditions,
            "completion_time": status.completion_time or rfc3339(now),
        }
    )


def _summarised(
    obs: SweepObservation,
    status: FineTuneSweepStatus,
    records: Sequence[TrialRecord],
    evaluations: Mapping[int, Mapping[int, float]],
) -> FineTuneSweepStatus:
    spec = obs.sweep.spec
    by_number = {t.number: t for t in obs.trials}
    rows = []
    for r in sorted(records, key=lambda r: r.number):
        trial = by_number.get(r.number)
        latest = (
            r.value
            if r.value is not None
            else (r.intermediate[max(r.intermediate)] if r.intermediate else None)
        )
        rows.append(
            TrialStatus(
                number=r.number,
                name=trial_name(str(obs.sweep.metadata.name), r.number),
                parameters=dict(r.params),
                state=r.state,
                objective=latest,
                step=trial.step if trial else None,
                model_uri=trial.model_uri if trial and r.state == TrialState.complete else None,
                evaluations=[
                    Evaluation(step=step, objective=value)
                    for step, value in sorted(evaluations.get(r.number, {}).items())
                ]
                or None,
            )
        )
    winner = study.best(spec, records)
    counts = TrialCounts(
        created=len(records),
        running=sum(not r.state.finished for r in records),
        complete=sum(r.state == TrialState.complete for r in records),
        pruned=sum(r.state == TrialState.pruned for r in records),
        failed=sum(r.state == TrialState.failed for r in records),
    )
    done = counts.complete + counts.pruned + counts.failed
    return status.model_copy(
        update={
            "trials": rows,
            "counts": counts,
            "trials_done": f"{done}/{spec.max_trials}",
            "best_trial": next((row for row in rows if winner and row.number == winner.number), None),
        }
    )


def promoted_job(sweep: FineTuneSweep, namespace: str, best: TrialStatus) -> FineTuneJob:
    """The FineTuneJob whose serving serves the best trial's model: the trial's own spec (so what is
    served is decided as for the trial itself, run/artifacts), ``promote`` as its serve, named after
    the sweep (its serving is <sweep>-serve) and carrying the sweep's uid."""
    spec = sweep.spec
    job_spec = trial_spec(spec, best.parameters, trial_output(spec, best.number))
    job_spec = job_spec.model_copy(update={"serve": Serve.model_validate(spec.promote.to_wire())})
    meta = {"name": sweep.metadata.name, "namespace": namespace, "uid": sweep.metadata.uid}
    return FineTuneJob.model_validate(
        {"apiVersion": API_VERSION, "kind": "FineTuneJob", "metadata": meta, "spec": job_spec.to_wire()}
    )


def sweep_child(manifest: Manifest, sweep: FineTuneSweep) -> Manifest:
    """A serving object rendered for :func:`promoted_job`, made the sweep's: owned by it and
    labelled with it instead of a job (the jobs' handlers never take it for a job's); its pod
    template and selector, which the spec hash covers, stay as rendered."""
    out = copy.deepcopy(manifest)
    meta = out["metadata"]
    labels = {k: v for k, v in meta.get("labels", {}).items() if k not in (LABEL_JOB, LABEL_KIND)}
    meta["labels"] = {**labels, LABEL_SWEEP: str(sweep.metadata.name)}
    if sweep.metadata.uid:
        meta["ownerReferences"] = [sweep_owner_reference(sweep)]
    return out


def promote(
    obs: SweepObservation, status: FineTuneSweepStatus
) -> tuple[Decision | None, FineTuneSweepStatus]:
    """``promote``: the serving policy of a succeeded FineTuneJob applied to the best trial's model
    (Deployment and Service, updates when promote changes, removal when it is switched off,
    ServingReady and status.serving), its children made the sweep's."""
    best = status.best_trial
    if best is None or (not obs.sweep.spec.promote.enabled and not status.serving and obs.deployment is None):
        return None, status
    job = promoted_job(obs.sweep, obs.namespace, best)
    job_status = FineTuneJobStatus(
        phase=Phase.succeeded, conditions=status.conditions, serving=status.serving
    )
    job_obs = Observation(
        job=job,
        namespace=obs.namespace,
        settings=obs.settings,
        now=obs.now,
        status=job_status,
        generation=obs.sweep.metadata.generation,
        deployment=obs.deployment,
    )
    served = serving.serve(job_obs, job_status)
    served.create = [sweep_child(m, obs.sweep) for m in served.create]
    return served, status.model_copy(
        update={"serving": served.status.serving, "conditions": served.status.conditions}
    )
