"""``python -m kubetune.trainer sweep-summary``: log a finished FineTuneSweep to its MLflow parent
run (the best trial's params ``best.<path>``, its objective, trial counts) and end that run.

The operator's Job ``<sweep>-summary`` runs it once the sweep has ended, with the
:class:`~kubetune.run.sweep_summary.SweepSummaryPlan` in ``KUBETUNE_SWEEP_SUMMARY`` and the
tracking credentials (if any) in MLflow's own variables. Exits 0 when the summary is logged, 2
when the variable is missing or invalid, and 1 (retriable) when the tracking server could not be
reached, with the reason in the termination log for the sweep's ``TrackingSummarized`` condition.
"""

from __future__ import annotations

import logging
import os
import sys

from pydantic import ValidationError

from kubetune.errors import InvalidInputError
from kubetune.run.sweep_summary import ENV_SWEEP_SUMMARY, SweepSummaryPlan
from kubetune.trainer.runtime import run_main, write_termination_message
from kubetune.trainer.tracking.sweep import finish_sweep

log = logging.getLogger("kubetune.trainer.sweep_summary")
EXIT_UNREACHABLE = 1


def read_plan() -> SweepSummaryPlan:
    raw = os.environ.get(ENV_SWEEP_SUMMARY)
    if not raw:
        raise InvalidInputError(f"{ENV_SWEEP_SUMMARY} is not set: it carries the sweep's summary")
    try:
        return SweepSummaryPlan.model_validate_json(raw)
    except ValidationError as exc:
        raise InvalidInputError(f"{ENV_SWEEP_SUMMARY} is not a sweep summary: {exc}") from exc


def summarize() -> int:
    plan = read_plan()
    reasons: list[str] = []
    run_id = finish_sweep(plan.tracking, plan.sweep, plan.namespace, plan.summary, reasons.append)
    if run_id is None:
        reason = f"MLflow at {plan.tracking.uri}: {'; '.join(reasons) or 'tracking gave up'}"
        log.error("%s", reason)
        write_termination_message(reason)
        return EXIT_UNREACHABLE
    best = plan.summary.get("bestTrial") or {}
    log.info(
        "FineTuneSweep %s/%s: run %s in experiment %r at %s ended, best trial %s",
        plan.namespace,
        plan.sweep.name,
        run_id,
        plan.tracking.experiment,
        plan.tracking.uri,
        best.get("name", "none"),
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv:
        print(
            f"sweep-summary takes no arguments (its input is {ENV_SWEEP_SUMMARY}), got {argv}",
            file=sys.stderr,
        )
        return 2
    return run_main(summarize)
