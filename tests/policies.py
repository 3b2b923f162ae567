"""Builders for the lifecycle policy specifications (tests/unit/test_policy_*.py): jobs, the
children a reconcile observes, and the status a decision writes, as the API server receives it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from kubetune.api import CompressJob, FineTuneJob
from kubetune.api.status import JobStatusBase
from kubetune.operator import lifecycle
from kubetune.operator.lifecycle import Decision, JobState, Observation
from kubetune.operator.settings import Settings

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def ago(seconds: float) -> str:
    return lifecycle.rfc3339(NOW - timedelta(seconds=seconds))


def finetunejob(**spec: Any) -> FineTuneJob:
    base: dict[str, Any] = {
        "model": {"uri": "s3://models/base"},
        "dataset": {"train": {"uri": "s3://data/train.jsonl"}},
        "hyperparameters": {"maxSteps": 10},
        "resources": {"workers": 2},
        "output": {"uri": "s3://runs/ft"},
    }
    return FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "ft", "namespace": "ml", "uid": "u1", "generation": 1},
            "spec": base | spec,
        }
    )


def compressjob(model: dict[str, Any], **spec: Any) -> CompressJob:
    base: dict[str, Any] = {
        "model": model,
        "dataset": {"train": {"uri": "s3://data/train.jsonl"}},
        "quantization": {"method": "rtn", "scheme": "W8A16"},
        "output": {"uri": "s3://runs/cj"},
    }
    return CompressJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "CompressJob",
            "metadata": {"name": "cj", "namespace": "ml", "uid": "u2", "generation": 1},
            "spec": base | spec,
        }
    )


def observe(
    job: FineTuneJob | CompressJob, status: dict[str, Any] | JobStatusBase | None = None, **kw: Any
) -> Observation:
    """What a reconcile of ``job`` sees, with its status as on the wire."""
    if not isinstance(status, JobStatusBase):
        status = lifecycle.observed_status(job.kind, status or {})
    kw.setdefault("settings", Settings())
    return Observation(job=job, namespace="ml", now=kw.pop("now", NOW), generation=1, status=status, **kw)


def child(name: str, component: str = "train", attempt: int = 0, **state: Any) -> JobState:
    return JobState(
        name=name, component=component, attempt=attempt, suspended=state.pop("suspended", False), **state
    )


def wire(decision: Decision) -> dict[str, Any]:
    """The operator's status fields a decision leaves, camelCase."""
    return lifecycle.operator_wire(decision.status)


def condition(decision: Decision, type_: str) -> dict[str, Any] | None:
    return next((c for c in wire(decision).get("conditions", []) if c["type"] == type_), None)


def deleted(decision: Decision) -> list[str]:
    return [f"{ref.kind}/{ref.name}" for ref in decision.delete]


def created(decision: Decision) -> list[str]:
    return [f"{m['kind']}/{m['metadata']['name']}" for m in decision.create]


def events(decision: Decision) -> list[tuple[str, str]]:
    return [(e.type, e.reason) for e in decision.events]
