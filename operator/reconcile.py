"""The reconciler: the lifecycle policies (:mod:`kubetune.operator.policies`) composed.

:func:`decide` runs them in the order a job lives through them, each on the status the ones
before it left; the first that settles the reconcile ends it (the next watch event or recheck
moves the job on). The decision also says when time alone will change it: the earliest of
the policies' rechecks and the deadline still running.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kubetune.api import ConditionType, Phase
from kubetune.api.status import JobStatusBase
from kubetune.operator.lifecycle import (
    Decision,
    Event,
    Observation,
    earliest,
    failed,
    finished,
    get_condition,
    with_condition,
    with_phase,
)
from kubetune.operator.policies import (
    acceptance,
    deadline,
    gang,
    pruning,
    serving,
    ttl,
    upstream,
    validation,
)

Policy = Callable[[Observation, JobStatusBase], Decision]


def decide(obs: Observation) -> Decision:
    """The next step of the job's lifecycle."""
    status = obs.status.model_copy(
        update={"observed_generation": obs.generation, "restarts": obs.status.restarts or 0}
    )
    if status.phase is None:
        status = with_phase(status, Phase.pending, "accepted")
    decision = Decision(status=status)
    if not finished(decision.status):
        decision = decision.then(_active(obs, decision.status))
    if finished(decision.status):
        decision = decision.then(_finished(obs, decision.status))
    return decision.then(phase_events(obs, decision.status)).then(_clocks(obs, decision))


def _active(obs: Observation, status: JobStatusBase) -> Decision:
    resolved = upstream.resolve(obs, status)
    if resolved.settled:
        return resolved
    plan = validation.plan_of(obs, resolved.status, upstream.model_uri(obs.job, resolved.status))
    if isinstance(plan, Decision):
        return resolved.then(plan)
    return _until_settled(
        obs,
        resolved,
        [
            pruning.enforce,
            deadline.enforce,
            acceptance.admit,
            lambda o, s: validation.validate(o, s, plan),
            lambda o, s: gang.run(o, s, plan),
        ],
    )


def _finished(obs: Observation, status: JobStatusBase) -> Decision:
    policies: list[Policy] = [serving.serve] if status.phase == Phase.succeeded else []
    return _until_settled(obs, Decision(status=status), [*policies, ttl.clean_up])


def _until_settled(obs: Observation, decision: Decision, policies: Sequence[Policy]) -> Decision:
    for policy in policies:
        decision = decision.then(policy(obs, decision.status))
        if decision.settled:
            break
    return decision


def _clocks(obs: Observation, decision: Decision) -> Decision:
    """When time alone changes the job as ``decision`` leaves it: its deadline or its TTL."""
    annotations = {**obs.annotations, **decision.annotations}
    due = earliest(
        deadline.due_in(obs, decision.status, annotations), ttl.due_in(obs, decision.status, annotations)
    )
    return Decision(status=decision.status, recheck_after=due)


def phase_events(obs: Observation, status: JobStatusBase) -> Decision:
    """An Event named after each new phase; a Warning named after the reason of a failure."""
    if obs.status.phase == status.phase or status.phase is None:
        return Decision(status=status)
    message = status.message or ""
    if status.phase == Phase.failed:
        cond = get_condition(status.conditions, ConditionType.failed)
        event = Event("Warning", cond.reason if cond is not None else "Failed", message)
    else:
        event = Event("Normal", str(status.phase), message)
    return Decision(status=status, events=[event])


def child_failure(obs: Observation, decided: Decision, reason: str, message: str) -> Decision:
    """A child could not be created or updated, and never will be as the spec stands (its name is
    taken: NameConflict; the API server rejected it: InvalidChild): the job fails, or, once it
    has succeeded (possibly in ``decided`` itself), only its serving does. Nothing more is done."""
    status = decided.status
    if status.phase == Phase.succeeded:
        status = with_condition(obs, status, ConditionType.serving_ready, False, reason, message)
        events = [Event("Warning", reason, message)]
    else:
        status = failed(obs, status, reason, message)
        events = []
    settled = Decision(status=status, events=events, annotations=dict(decided.annotations))
    return settled.then(phase_events(obs, status)).then(_clocks(obs, settled))
