"""Failure policy: what a failed Job means, by the runtimes' exit-code contract (kubetune.errors).

Exit codes 2 (invalid input) and 3 (storage) and out-of-memory kills fail the job at once; any
other failure of the gang is retriable: the gang is replaced by the next attempt, which resumes
from the newest checkpoint, until ``spec.maxRestarts`` restarts are spent. An attempt ended by an
eviction or preemption is replaced without counting against maxRestarts (``status.disruptions``);
one that reports no progress for ``progressDeadlineSeconds`` ends as retriable (``Stalled``).
:mod:`.diagnosis` says why, in words. The reason of a failure is read from the failed
container's termination message (or, when its pods are gone, from the Job's own condition).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

from kubetune.api import ConditionType, FineTuneJob, Phase
from kubetune.api.status import JobStatusBase
from kubetune.errors import EXIT_INVALID_INPUT, EXIT_STORAGE, NON_RETRIABLE_EXIT_CODES
from kubetune.operator.lifecycle import (
    REASON_ATTEMPT_FAILED,
    REASON_INVALID_INPUT,
    REASON_OOM_KILLED,
    REASON_OUTPUT_CONFLICT,
    REASON_RESTARTS_EXHAUSTED,
    REASON_STALLED,
    REASON_STORAGE,
    REASON_VALIDATION_FAILED,
    REASON_WILL_NOT_FIT,
    ChildRef,
    Decision,
    Event,
    JobState,
    Observation,
    Termination,
    failed,
    finished,
    is_true,
    terminations_of,
    with_condition,
)
from kubetune.operator.policies import diagnosis, suspension
from kubetune.operator.render import Job, child_names, initially_suspended, render_main_job
from kubetune.run.plan import RunPlan

_EXIT_CODE_IN_MESSAGE: Final = re.compile(r"exit code (\d+)")


def pick_termination(pods: Sequence[Mapping[str, Any]]) -> Termination | None:
    """The failure that explains a gang's end: an exit code of the contract (2, 3) if any pod had
    one, else the earliest failure (the others usually died because their peer did)."""
    found = terminations_of(pods)
    if not found:
        return None
    contract = [t for t in found if t.exit_code in NON_RETRIABLE_EXIT_CODES]
    return min(contract or found, key=lambda t: (t.finished_at or "", t.pod))


def failure_reason(term: Termination | None, state: JobState) -> str | None:
    """InvalidInput/StorageError for the non-retriable exit codes of the runtimes, else None."""
    code = term.exit_code if term is not None else None
    if code is None and state.failed_reason == "PodFailurePolicy":
        match = _EXIT_CODE_IN_MESSAGE.search(state.failed_message or "")
        code = int(match.group(1)) if match else EXIT_INVALID_INPUT
    if code == EXIT_INVALID_INPUT:
        # The runtimes prefix their message with the error's reason (kubetune.ownership's
        # OutputConflictError: the output prefix belongs to, or overlaps, another job).
        # kubetune.trainer.validate's WillNotFit: the memory plan does not fit.
        for named in (REASON_OUTPUT_CONFLICT, REASON_WILL_NOT_FIT):
            if term is not None and (term.message or "").startswith(f"{named}:"):
                return named
        return REASON_INVALID_INPUT
    if code == EXIT_STORAGE:
        return REASON_STORAGE
    return None


def current_attempt(job: Job, status: JobStatusBase, jobs: Sequence[JobState]) -> int:
    """The gang's attempt: the restarts recorded, or a newer attempt's Job already created."""
    main = child_names(job).main_component
    attempts = [j.attempt for j in jobs if j.component == main]
    return max([status.restarts or 0, *attempts])


def jobs_to_diagnose(job: Job, status: JobStatusBase, jobs: Sequence[JobState]) -> list[str]:
    """The Jobs whose pods the operator must read to decide: failed ones (exit code, termination
    message, evictions) and running ones with pods (``active`` counts pending ones) not all ready:
    pods that cannot be scheduled, pulled or created; evictions."""
    if finished(status):
        return []
    names = child_names(job)
    wanted = {names.main(current_attempt(job, status, jobs))}
    if not is_true(status.conditions, ConditionType.validated):
        wanted.add(names.validate)
    return sorted(
        j.name
        for j in jobs
        if j.name in wanted
        and (j.failed or (not j.complete and not j.suspended and j.active > 0 and j.ready < j.parallelism))
    )


def validation_failed(obs: Observation, status: JobStatusBase, validation: JobState) -> Decision:
    term = obs.terminations.get(validation.name)
    reason = failure_reason(term, validation) or REASON_VALIDATION_FAILED
    message = term.describe() if term else (validation.failed_message or "the validation Job failed")
    if term is not None and reason == REASON_VALIDATION_FAILED and diagnosis.is_oom(term):
        reason = REASON_OOM_KILLED
        message = diagnosis.oom_message(obs.job, term, obs.pods.get(validation.name, ()))
    message = message.removeprefix(f"{reason}: ")
    status = with_condition(obs, status, ConditionType.validated, False, reason, message)
    return Decision(status=failed(obs, status, reason, message), settled=True)


def gang_failed(obs: Observation, status: JobStatusBase, current: JobState, plan: RunPlan) -> Decision:
    """Fail on a non-retriable exit code, an out-of-memory kill or when the restarts are spent,
    else replace the gang; a gang that failed because a pod was evicted or preempted is replaced
    without counting against maxRestarts."""
    term = obs.terminations.get(current.name)
    pods = obs.pods.get(current.name, ())
    reason = failure_reason(term, current)
    detail = term.describe() if term else (current.failed_message or f"Job {current.name} failed")
    if reason is not None:
        return Decision(status=failed(obs, status, reason, detail), settled=True)
    if term is not None and diagnosis.is_oom(term):
        message = diagnosis.oom_message(obs.job, term, pods)
        return Decision(status=failed(obs, status, REASON_OOM_KILLED, message), settled=True)
    disruption = diagnosis.disrupted(pods)
    if disruption is not None:
        return restart(obs, status, current, plan, disruption.reason, disruption.message, counted=False)
    detail += diagnosis.missing_note(pods, plan.world.workers)
    return restart(obs, status, current, plan, REASON_ATTEMPT_FAILED, detail)


def watch_gang(obs: Observation, status: JobStatusBase, current: JobState, plan: RunPlan) -> Decision | None:
    """A gang that has not failed (yet) but will not get anywhere: a pod evicted or preempted
    (replaced at once, not counted), pods that cannot start (the job fails), or no progress
    report for progressDeadlineSeconds (a counted, retriable restart). None: nothing to act on."""
    pods = obs.pods.get(current.name, ())
    disruption = diagnosis.disrupted(pods)
    if disruption is not None:
        return restart(obs, status, current, plan, disruption.reason, disruption.message, counted=False)
    finding = diagnosis.blocked(pods)
    if finding is not None and finding.fatal:
        return fail_workload(obs, status, current, finding)
    deadline = obs.job.spec.progress_deadline_seconds if isinstance(obs.job, FineTuneJob) else None
    due = diagnosis.stall_due_in(deadline, current, obs.progress_at, obs.now)
    if deadline is not None and due is not None and due <= 0:
        message = diagnosis.stall_message(deadline, obs.progress_at, current, pods, plan.world.workers)
        return restart(obs, status, current, plan, REASON_STALLED, message)
    return None


def fail_workload(
    obs: Observation, status: JobStatusBase, current: JobState, finding: diagnosis.Finding
) -> Decision:
    """The job fails for ``finding``; its Job goes, so its pods stop holding their nodes."""
    return Decision(
        status=failed(obs, status, finding.reason, finding.message),
        delete=[ChildRef("batch/v1", "Job", current.name)],
        settled=True,
    )


def restart(
    obs: Observation,
    status: JobStatusBase,
    current: JobState,
    plan: RunPlan,
    reason: str,
    detail: str,
    *,
    counted: bool = True,
) -> Decision:
    """Replace the gang by the next attempt, which resumes from the newest checkpoint; the job
    fails instead when a counted restart would exceed maxRestarts."""
    spec = obs.job.spec
    restarts = status.restarts or 0
    disruptions = status.disruptions or 0
    used = restarts - disruptions  # restarts that count against maxRestarts
    if counted and used >= spec.max_restarts:
        message = f"{obs.noun} failed {used + 1} times (maxRestarts {spec.max_restarts}); last: {detail}"
        # A stalled attempt still runs: its pods stop holding their nodes.
        still_running = [] if current.failed else [ChildRef("batch/v1", "Job", current.name)]
        return Decision(
            status=failed(obs, status, REASON_RESTARTS_EXHAUSTED, message), delete=still_running, settled=True
        )
    attempt = current.attempt + 1
    replacement = render_main_job(obs.job, obs.settings, plan, obs.namespace, attempt)
    update: dict[str, object] = {"restarts": attempt, "active_job": replacement["metadata"]["name"]}
    if counted:
        budget = f"restart {used + 1} of maxRestarts {spec.max_restarts}"
    else:
        update["disruptions"] = disruptions + 1
        budget = f"not counted against maxRestarts ({used} of {spec.max_restarts} used)"
    status = status.model_copy(update=update)
    ended = "failed" if reason == REASON_ATTEMPT_FAILED else "ended"
    message = f"attempt {current.attempt} {ended} ({detail}); {budget}, resuming from the newest checkpoint"
    status = with_condition(obs, status, ConditionType.restarted, True, reason, message)
    restarted = Decision(
        status=status,
        # Create the replacement before deleting the failed Job: an operator that dies in between
        # still finds the newer attempt and never goes back to the old one.
        create=[replacement],
        delete=[ChildRef("batch/v1", "Job", current.name)],
        events=[Event("Warning", "Restarting" if reason == REASON_ATTEMPT_FAILED else reason, message)],
    )
    running = suspension.step(
        obs,
        status,
        Phase.running,
        f"{obs.noun} restarted (restart {attempt})",
        suspended=initially_suspended(obs.job),
    )
    return restarted.then(running)
