"""``kubetune.io/prune``: a sweep stops a trial its pruner judges hopeless.

The FineTuneSweep annotates its trial; the trial's own reconcile ends it: the running gang goes,
the job ends Failed with reason Pruned (terminal, so never retried), and its output -- the
checkpoints it committed -- stays. Only the sweep reads the reason: for it a pruned trial is a
result, not a failure (it does not count towards maxFailedTrials).
"""

from __future__ import annotations

from typing import Final

from kubetune.api.status import JobStatusBase
from kubetune.operator.lifecycle import ANNOTATION_PRUNE, ChildRef, Decision, Observation, failed, finished

REASON_PRUNED: Final = "Pruned"


def enforce(obs: Observation, status: JobStatusBase) -> Decision:
    """End a job its sweep asked to stop, deleting the Jobs still running."""
    if ANNOTATION_PRUNE not in obs.annotations or finished(status):
        return Decision(status=status)
    why = obs.annotations[ANNOTATION_PRUNE].strip()
    # The annotation's value is the sweep's reason (the objective against the others' at its step).
    message = f"stopped early by its sweep: {why or 'its objective is worse than the earlier trials'}"
    message += "; its checkpoints are kept"
    running = [ChildRef("batch/v1", "Job", j.name) for j in obs.jobs if not j.complete and not j.failed]
    return Decision(status=failed(obs, status, REASON_PRUNED, message), delete=running, settled=True)
