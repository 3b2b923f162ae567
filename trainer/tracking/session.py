"""The MLflow run of one job, as rank 0 keeps it.

Why not transformers' own ``MLflowCallback``: it is configured through process-wide environment
variables and MLflow's global "active run", logs TrainingArguments and the model config rather
than the job's resolved settings, logs asynchronously (a dead server's errors surface later, on
another thread, or as an exception in the training loop), knows nothing of restarts, artifact
URIs or the registry, and would have to be guarded against every rank. This module uses an
explicit ``MlflowClient`` and run id instead; :mod:`.callback` only forwards the Trainer's logs.

One job, one MLflow run: a gang restarted after a failure finds its run again by the job's uid
tag and continues it, so the metrics of every attempt land in one place.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Protocol

from kubetune.api.spec import MlflowTarget
from kubetune.run.plan import RunPlan
from kubetune.trainer.tracking import content
from kubetune.trainer.tracking.guard import Guard

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from transformers import TrainerCallback

log = logging.getLogger(__name__)

# MLflow's client retries a failed request 7 times with exponential backoff (minutes) and waits
# 120 s for an answer: a dead server would stall the training loop for that long per call. The
# guard retries instead, briefly, so the client gets one attempt with a short timeout. Set only
# when unset, so a deployment may still choose its own.
CLIENT_ENV: Final = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    # The client prints "View run at ..." to stdout when a run ends; the log says it once instead.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


class StatusSink(Protocol):
    """Where ``status.tracking`` goes (the progress reporter of rank 0)."""

    def report_tracking(self, tracking: Mapping[str, Any]) -> None: ...


class TrackedRun:
    """One job's MLflow run; every method is a no-op once tracking is off (or was never on)."""

    def __init__(
        self, client: MlflowClient | None, target: MlflowTarget | None, plan: RunPlan, sink: StatusSink
    ) -> None:
        self._client = client
        self._target = target
        self._plan = plan
        self._sink = sink
        self._guard = Guard(self._report_degraded)
        self.experiment_id: str | None = None
        self.run_id: str | None = None
        self.model_version: str | None = None
        self._sweep_run_created: str | None = None  # the sweep's parent run, if this trial created it

    @classmethod
    def off(cls, plan: RunPlan, sink: StatusSink) -> TrackedRun:
        return cls(None, None, plan, sink)

    @property
    def active(self) -> bool:
        return self.run_id is not None and self._guard.active

    @property
    def failure(self) -> str | None:
        return self._guard.failure

    def callbacks(self) -> list[TrainerCallback]:
        """The Trainer callbacks that forward training and evaluation metrics (none when off)."""
        if self._client is None:
            return []
        from kubetune.trainer.tracking.callback import MetricsCallback

        return [MetricsCallback(self)]

    # --- the run -----------------------------------------------------------------------------

    def begin(self, resolved: Mapping[str, Any]) -> None:
        """Find or create the experiment and this job's run; log params, tags and the plan."""
        if self._client is None or self._target is None:
            return
        client, plan = self._client, self._plan
        experiment = self._target.experiment or f"{plan.job.namespace}/{plan.job.name}"
        self.experiment_id = self._guard.call(
            "opening the experiment", lambda: _experiment(client, experiment)
        )
        if self.experiment_id is None:
            return
        experiment_id = self.experiment_id
        found = self._guard.call("looking up the job's run", lambda: _job_run(client, experiment_id, plan))
        if not self._guard.active:
            return
        logged: Mapping[str, str] = {}
        if found is not None:
            self.run_id, logged = found.info.run_id, found.data.params
            run_id = self.run_id
            self._guard.call("resuming the run", lambda: client.update_run(run_id, status="RUNNING"))
        else:
            tags = {**content.run_tags(plan), "mlflow.runName": plan.job.name}
            self.run_id = self._guard.call(
                "creating the run", lambda: client.create_run(experiment_id, tags=tags).info.run_id
            )
        if self.run_id is None:
            return
        # A param cannot change once logged; a resumed run logs only the ones it lacks.
        params = {k: v for k, v in content.run_params(plan, resolved).items() if k not in logged}
        self._log_params(params)
        run_id = self.run_id
        plan_json = plan.model_dump(mode="json", exclude_none=True)
        self._guard.call(
            "logging the plan", lambda: client.log_dict(run_id, plan_json, content.PLAN_ARTIFACT)
        )
        self._link_to_sweep()
        if self._guard.active:
            log.info("MLflow: logging to run %s of experiment %r at %s", run_id, experiment, self._target.uri)
            self._report()

    def log_metrics(self, metrics: Mapping[str, float], step: int | None) -> None:
        if (live := self._live()) is None or not metrics:
            return
        from mlflow.entities import Metric

        client, run_id = live
        now = int(time.time() * 1000)
        entries = [Metric(key, value, now, step or 0) for key, value in metrics.items()]
        for batch in _batches(entries, content.METRICS_PER_BATCH):
            self._guard.call("logging metrics", partial(client.log_batch, run_id, metrics=batch))

    def succeeded(
        self,
        *,
        metrics: Mapping[str, Any] | None = None,
        step: int | None = None,
        report: Mapping[str, Any] | None = None,
        results: Mapping[str, Any] | None = None,
    ) -> None:
        """After the outputs are in object storage: final metrics, a CompressJob's report and
        headline figures, the registered model version, and the run marked finished."""
        if (live := self._live()) is None:
            return
        client, run_id = live
        self.log_metrics(content.numeric_metrics(metrics or {}), step)
        if results is not None:
            self.log_metrics(content.compression_metrics(results), step)
        if report is not None:
            body = dict(report)
            self._guard.call(
                "logging the compression report",
                lambda: client.log_dict(run_id, body, content.REPORT_ARTIFACT),
            )
        self._register(results)
        # Again at the end: a trial that raced another to create the sweep's run may have seen
        # only its own at first (see :mod:`.sweep`).
        self._link_to_sweep()
        self._guard.call("finishing the run", lambda: client.set_terminated(run_id, status="FINISHED"))
        if self._guard.active:
            self._report()

    def failed(self) -> None:
        """The attempt ended with an error; a restarted gang resumes the run."""
        if (live := self._live()) is not None:
            client, run_id = live
            self._guard.call("marking the run failed", lambda: client.set_terminated(run_id, status="FAILED"))

    # --- internals ---------------------------------------------------------------------------

    def _live(self) -> tuple[MlflowClient, str] | None:
        """The client and run id while tracking is on."""
        if self._client is None or self.run_id is None or not self._guard.active:
            return None
        return self._client, self.run_id

    def _link_to_sweep(self) -> None:
        """A trial's run becomes a child of its sweep's run (found or created)."""
        sweep = self._plan.sweep
        if sweep is None or self.experiment_id is None or (live := self._live()) is None:
            return
        from kubetune.trainer.tracking.sweep import PARENT_TAG, parent_run

        (client, run_id), experiment_id = live, self.experiment_id
        namespace = self._plan.job.namespace
        mine = self._sweep_run_created
        found = self._guard.call(
            "finding the sweep's run", lambda: parent_run(client, experiment_id, sweep, namespace, mine)
        )
        if found is not None:
            parent, self._sweep_run_created = found
            self._guard.call("linking to the sweep's run", lambda: client.set_tag(run_id, PARENT_TAG, parent))

    def _log_params(self, params: Mapping[str, str]) -> None:
        if (live := self._live()) is None:
            return
        from mlflow.entities import Param

        client, run_id = live
        entries = [Param(key, value) for key, value in sorted(params.items())]
        for batch in _batches(entries, content.PARAMS_PER_BATCH):
            self._guard.call("logging params", partial(client.log_batch, run_id, params=batch))

    def _register(self, results: Mapping[str, Any] | None) -> None:
        name = self._target.registered_model if self._target is not None else None
        if name is None or (live := self._live()) is None:
            return
        (client, run_id), plan = live, self._plan
        self._guard.call("creating the registered model", lambda: _ensure_registered_model(client, name))
        version = self._guard.call(
            "registering a model version",
            lambda: client.create_model_version(
                name,
                source=content.registered_source(plan),
                run_id=run_id,
                tags=content.version_tags(plan, results),
                description=f"{plan.job.kind} {plan.job.namespace}/{plan.job.name}",
                # The source is in object storage, never uploaded: the version is ready at once.
                await_creation_for=0,
            ),
        )
        if version is not None:
            self.model_version = str(version.version)
            log.info("MLflow: registered %s version %s (%s)", name, version.version, version.source)

    def _report(self) -> None:
        self._send(
            {"experimentId": self.experiment_id, "runId": self.run_id, "modelVersion": self.model_version}
        )

    def _report_degraded(self, message: str) -> None:
        self._send(
            {
                "experimentId": self.experiment_id,
                "runId": self.run_id,
                "degraded": True,
                "message": f"MLflow at {self._target.uri if self._target else '?'}: {message}; "
                "tracking is off for the rest of this run, training goes on",
            }
        )

    def _send(self, tracking: Mapping[str, Any]) -> None:
        try:
            self._sink.report_tracking({k: v for k, v in tracking.items() if v is not None})
        except Exception as e:  # status is best effort
            log.warning("cannot report the tracking status: %s", e)


def start_tracking(
    plan: RunPlan,
    target: MlflowTarget | None,
    *,
    rank: int,
    sink: StatusSink,
    resolved: Mapping[str, Any] | None = None,
) -> TrackedRun:
    """The job's MLflow run for rank 0 when the plan asks for tracking; an inert one otherwise
    (other ranks never import MLflow)."""
    if target is None or rank != 0:
        return TrackedRun.off(plan, sink)
    for name, value in CLIENT_ENV.items():
        os.environ.setdefault(name, value)
    from mlflow import MlflowClient

    # Credentials (MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN) come from the
    # environment, where the pod spec puts them by reference to the user's Secret.
    run = TrackedRun(MlflowClient(tracking_uri=target.uri, registry_uri=target.uri), target, plan, sink)
    run.begin(resolved or {})
    return run


def _experiment(client: MlflowClient, name: str) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    try:
        return str(client.create_experiment(name))
    except MlflowException as e:
        # Another job created it in between.
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        again = client.get_experiment_by_name(name)
        if again is None:
            raise
        return str(again.experiment_id)


def _job_run(client: MlflowClient, experiment_id: str, plan: RunPlan) -> Any:
    """The run an earlier attempt of this job created (found by uid), if any."""
    if not plan.job.uid:
        return None
    uid = plan.job.uid.replace("'", "")
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{content.UID_TAG}` = '{uid}'", max_results=1
    )
    return runs[0] if runs else None


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, tags={content.TAG_PREFIX + "managedBy": "kubetune"})
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
