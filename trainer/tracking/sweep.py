"""A sweep in MLflow: one parent run per FineTuneSweep, one child run per trial.

No component needs a connection to MLflow beyond the trials' own rank 0: each trial finds the
sweep's parent run (a run of the trials' experiment tagged with the sweep's uid and the role
``sweep``) or creates it, then tags its own run ``mlflow.parentRunId``. Trials that start at once
may each create one; the rule that settles it is deterministic, so every trial picks the same
parent among those it sees: the earliest ``start_time``, then the lowest run id. A trial whose
created run lost deletes it; and as a creation still in flight may be missed by one search, each
trial looks again when it ends (relinking, and deleting its own run if that lost meanwhile), so
every trial ends under the one surviving parent. The creator of the parent logs the search space as its params;
whoever finishes the sweep logs the best trial with :func:`log_summary`: ``kubetune run`` in local
mode, and on a cluster the operator's ``<sweep>-summary`` Job (``kubetune.trainer sweep-summary``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from kubetune.api.spec import MlflowTarget
from kubetune.run.plan import SweepRef
from kubetune.trainer.tracking import content
from kubetune.trainer.tracking.guard import Guard
from kubetune.trainer.tracking.session import CLIENT_ENV, _experiment

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

ROLE_TAG: Final = content.TAG_PREFIX + "role"
SWEEP_ROLE: Final = "sweep"
PARENT_TAG: Final = "mlflow.parentRunId"


def parent_tags(sweep: SweepRef, namespace: str) -> dict[str, str]:
    return {
        content.TAG_PREFIX + "kind": "FineTuneSweep",
        content.TAG_PREFIX + "namespace": namespace,
        content.TAG_PREFIX + "name": sweep.name,
        content.UID_TAG: sweep.uid,
        ROLE_TAG: SWEEP_ROLE,
        "mlflow.runName": sweep.name,
    }


def search_params(search: Mapping[str, Any]) -> dict[str, str]:
    """The search space as params: ``parameters.<path>.<min|max|log|values...>``, ``objective.metric``,
    ``algorithm.type``, ``maxTrials`` (the list of parameters keyed by path, so each has a name)."""
    by_path = {
        str(p["path"]): {k: v for k, v in p.items() if k != "path"}
        for p in search.get("parameters") or []
        if isinstance(p, Mapping) and "path" in p
    }
    shaped = {**{k: v for k, v in search.items() if k != "parameters"}, "parameters": by_path}
    return {key[: content.MAX_KEY_LENGTH]: _text(value) for key, value in content.flatten(shaped)}


def _text(value: Any) -> str:
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return text[: content.MAX_PARAM_LENGTH]


def choose(runs: list[Run]) -> Run:
    """The parent every trial agrees on: the earliest start, then the lowest run id."""
    return min(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def _parents(client: MlflowClient, experiment_id: str, uid: str) -> list[Run]:
    uid = uid.replace("'", "")
    found: list[Run] = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{content.UID_TAG}` = '{uid}' and tags.`{ROLE_TAG}` = '{SWEEP_ROLE}'",
        max_results=100,
    )
    return found


def parent_run(
    client: MlflowClient, experiment_id: str, sweep: SweepRef, namespace: str, mine: str | None = None
) -> tuple[str, str | None]:
    """The sweep's parent run id, created (with the search space as params) when there is none,
    and the parent this caller created that is still alive (``mine``: pass it back on the next
    call). A run this caller created that lost to an earlier one is deleted."""
    found = _parents(client, experiment_id, sweep.uid)
    created = False
    if not found:
        mine = str(client.create_run(experiment_id, tags=parent_tags(sweep, namespace)).info.run_id)
        created = True
        # Search again: another trial may have created one at the same moment.
        found = _parents(client, experiment_id, sweep.uid) or [client.get_run(mine)]
    winner = str(choose(found).info.run_id)
    if mine is not None and winner != mine:
        if any(r.info.run_id == mine for r in found):
            client.delete_run(mine)
        return winner, None
    if created:
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in sorted(search_params(sweep.search).items())]
        for start in range(0, len(params), content.PARAMS_PER_BATCH):
            client.log_batch(winner, params=params[start : start + content.PARAMS_PER_BATCH])
    return winner, mine


def log_summary(client: MlflowClient, run_id: str, summary: Mapping[str, Any]) -> None:
    """The sweep's outcome on its parent run (``summary.json``'s form): the best trial's params as
    ``best.<path>``, its objective as the metric of that name, counts by state, and the run ended."""
    from mlflow.entities import Metric, Param

    best = summary.get("bestTrial") or None
    metric = str((summary.get("objective") or {}).get("metric") or "objective")
    trials = summary.get("trials") or []
    metrics: dict[str, float] = {
        f"trials.{state.lower()}": float(sum(t.get("state") == state for t in trials))
        for state in ("Complete", "Pruned", "Failed")
    }
    params: dict[str, str] = {}
    tags: dict[str, str] = {}
    if best is not None:
        if isinstance(best.get("objective"), int | float):
            metrics[metric] = float(best["objective"])
        params = {
            f"best.{k}"[: content.MAX_KEY_LENGTH]: _text(v) for k, v in (best.get("parameters") or {}).items()
        }
        tags = {
            content.TAG_PREFIX + "bestTrial": str(best.get("name")),
            content.TAG_PREFIX + "bestTrial.outputUri": str(best.get("outputUri")),
        }
    if summary.get("report"):
        tags[content.TAG_PREFIX + "artifacts.report"] = str(summary["report"])
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, now, 0) for k, v in content.numeric_metrics(metrics).items()],
        params=[Param(k, v) for k, v in sorted(params.items())],
    )
    for key, value in tags.items():
        client.set_tag(run_id, key, value[: content.MAX_TAG_LENGTH])
    client.set_terminated(run_id, status="FINISHED" if best is not None else "FAILED")


def finish_sweep(
    target: MlflowTarget,
    sweep: SweepRef,
    namespace: str,
    summary: Mapping[str, Any],
    on_degraded: Callable[[str], None],
) -> str | None:
    """Log a finished sweep's ``summary`` to its parent run (found or created), under the same rule
    as a trial's tracking: a server that is down is retried briefly, then ``on_degraded`` learns
    why and nothing fails. Returns the parent run's id, or None when tracking gave up."""
    for name, value in CLIENT_ENV.items():
        os.environ.setdefault(name, value)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=target.uri)
    guard = Guard(on_degraded)
    experiment = target.experiment or f"{namespace}/{sweep.name}"
    experiment_id = guard.call("opening the experiment", lambda: _experiment(client, experiment))
    if experiment_id is None:
        return None
    found = guard.call("finding the sweep's run", lambda: parent_run(client, experiment_id, sweep, namespace))
    if found is None:
        return None
    run_id = found[0]
    guard.call("logging the sweep's summary", lambda: log_summary(client, run_id, summary))
    return run_id if guard.active else None
