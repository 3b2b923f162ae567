"""Experiment tracking: rank 0 logs the run to MLflow (``spec.tracking.mlflow``).

What reaches MLflow: the resolved hyperparameters as params; the run plan as an artifact (plans
hold no secrets); training and evaluation metrics per logging step; tags with the job's
namespace, name and uid and the URIs of its artifacts in object storage; on success, with
``registeredModel``, a new model version whose source is the model's URI in object storage (the
weights are never copied into MLflow). A CompressJob adds its report's headline figures.

A tracking server that is down never fails training (:mod:`.guard`): a call is retried briefly,
then tracking is switched off for the rest of the run and ``status.tracking`` says why.

- :mod:`.content` — pure functions: what is logged (params, tags, metrics, version tags);
- :mod:`.guard` — the one rule for failures: bounded retries, then off;
- :mod:`.session` — :class:`TrackedRun`, the MLflow run of one job, and :func:`start_tracking`;
- :mod:`.callback` — the Trainer callback that forwards logged metrics.
"""

from __future__ import annotations

from kubetune.trainer.tracking.session import StatusSink, TrackedRun, start_tracking

__all__ = ["StatusSink", "TrackedRun", "start_tracking"]
