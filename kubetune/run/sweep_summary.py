"""The MLflow summary of a FineTuneSweep that ended on a cluster: what the operator's Job
``<sweep>-summary`` hands the trainer's ``sweep-summary`` command.

In local mode whoever finished the sweep logs its best trial to the sweep's parent run
(``trainer/tracking/sweep.py``'s ``finish_sweep``). On a cluster the operator never talks to MLflow
(it never reads the tracking Secret), so it runs that call in a pod of its own: the target (never
credentials), the sweep's identity and search space, and the summary (``summary.json``'s form,
built from the sweep's status) travel as one JSON environment variable; the credentials reach the
pod by Secret reference, as they reach the trials'.
"""

from __future__ import annotations

from typing import Any, Final

from pydantic import Field

from kubetune.api.spec import MlflowTarget, MlflowTracking
from kubetune.api.sweep import FineTuneSweepSpec
from kubetune.run.plan import PlanModel, SweepRef

RUNTIME_SWEEP_SUMMARY: Final = "sweep-summary"
ENV_SWEEP_SUMMARY: Final = "KUBETUNE_SWEEP_SUMMARY"


class SweepSummaryPlan(PlanModel):
    """Everything ``python -m kubetune.trainer sweep-summary`` needs; no secrets."""

    tracking: MlflowTarget  # the experiment resolved as the trials' (<namespace>/<sweep>)
    sweep: SweepRef
    namespace: str
    summary: dict[str, Any] = Field(default_factory=dict)
    """objective, trials (number, name, parameters, state, objective, step, outputUri), bestTrial."""


def sweep_tracking(spec: FineTuneSweepSpec) -> MlflowTracking | None:
    """Where a sweep's trials are tracked: the sweep's own tracking, else its template's."""
    tracking = spec.tracking or spec.template.tracking
    return tracking.mlflow if tracking is not None else None
