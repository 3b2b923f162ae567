"""kopf handlers of FineTuneSweep: thin glue between watch events and the pure sweep decision.

Every trigger ends in :func:`reconcile_sweep` of one sweep: a watch event of the sweep itself, or
one of a trial's (a FineTuneJob labelled ``kubetune.io/sweep``). Reconciling gathers the sweep's
owned trials from a kopf index (no API reads), rebuilds the study with
:func:`kubetune.operator.sweep.decide` and applies the decision: trials created (deterministic
names, so 409 AlreadyExists is success), trials annotated ``kubetune.io/prune``, the Job
``<sweep>-summary`` of an ended sweep tracked in MLflow (its state comes back through an index of
its own), the status written -- including each trial's evaluation history, which only the sweep
keeps. Imported by
:mod:`kubetune.operator.handlers`, so ``kopf run -m kubetune.operator.handlers`` runs both.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import kopf
from pydantic import ValidationError

from kubetune.api import API_VERSION, GROUP, VERSION, FineTuneSweep
from kubetune.api.sweep import FineTuneSweepStatus
from kubetune.errors import describe_validation_error
from kubetune.operator import credentials, lifecycle
from kubetune.operator.kube import ApiError
from kubetune.operator.lifecycle import ANNOTATION_PRUNE
from kubetune.operator.render import COMPONENT_SERVE, COMPONENT_SWEEP_SUMMARY, LABEL_COMPONENT, LABEL_SWEEP
from kubetune.operator.settings import Settings
from kubetune.operator.sweep import (
    CONDITION_TRACKING_SUMMARIZED,
    LABEL_TRIAL,
    SweepObservation,
    decide,
    evaluations_of,
    invalid,
    remembered_trials,
    trial_from,
)
from kubetune.run.sweep_summary import sweep_tracking

logger = logging.getLogger("kubetune.operator.sweep")

RETRY_DELAY: Final = 10.0
SweepKey = tuple[str, str]  # (namespace, name)


@dataclass
class SweepRuntime:
    """Per-operator state of the sweep handlers (kept in kopf's memo)."""

    locks: dict[SweepKey, asyncio.Lock] = field(default_factory=dict)
    # The status as last written, by sweep uid: a reconcile that runs before the watch delivers
    # our own write must not lose the evaluations that write recorded.
    written: dict[str, FineTuneSweepStatus] = field(default_factory=dict)
    retries: dict[SweepKey, asyncio.Task[None]] = field(default_factory=dict)
    # Trials this process created whose watch event has not reached the index yet, by sweep uid.
    in_flight: dict[str, set[int]] = field(default_factory=dict)
    # Tracking Secrets found opted in (see operator/credentials.py).
    allowed_secrets: credentials.AllowedSecrets = field(default_factory=set)
    # The sweep's own annotations as last written (time suspended, trials deleted), by uid.
    written_annotations: dict[str, dict[str, str]] = field(default_factory=dict)

    def lock(self, key: SweepKey) -> asyncio.Lock:
        return self.locks.setdefault(key, asyncio.Lock())


def sweep_runtime(memo: kopf.Memo) -> SweepRuntime:
    rt = memo.get("sweeps")
    if not isinstance(rt, SweepRuntime):
        raise kopf.TemporaryError("the operator is still starting", delay=1)
    return rt


@kopf.on.startup()
async def start_sweeps(memo: kopf.Memo, **_: Any) -> None:
    # In the operator's own memo, before kopf gives each object a shallow copy of it: a runtime
    # created in a handler would be one object's, and the sweep's events and its trials' would
    # each reconcile under a lock of their own.
    memo["sweeps"] = SweepRuntime()


def _snapshot(body: Mapping[str, Any]) -> dict[str, Any]:
    from kubetune.operator.handlers import snapshot  # one rule for what reconciling reads

    return snapshot(body)


def _sweep_snapshot(body: Mapping[str, Any]) -> dict[str, Any]:
    """A sweep as reconciling reads it; with its deletionTimestamp, since a sweep being deleted
    (foreground: its trials go first) must create nothing."""
    sweep = _snapshot(body)
    deleting = (body.get("metadata") or {}).get("deletionTimestamp")
    if deleting:
        sweep["metadata"]["deletionTimestamp"] = deleting
    return sweep


def _trial_snapshot(body: Mapping[str, Any]) -> dict[str, Any]:
    """A trial as reconciling its sweep reads it: a job's snapshot plus its ownerReferences,
    which say whether the sweep of its label owns it (a FineTuneJob labelled by hand does not
    count; without them no trial would ever be seen to progress)."""
    trial = _snapshot(body)
    refs = (body.get("metadata") or {}).get("ownerReferences") or []
    trial["metadata"]["ownerReferences"] = [dict(ref) for ref in refs]
    return trial


@kopf.on.cleanup()
async def cancel_retries(memo: kopf.Memo, **_: Any) -> None:
    for task in sweep_runtime(memo).retries.values():
        task.cancel()


@kopf.index(GROUP, VERSION, FineTuneSweep.plural)
def finetunesweep_index(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> dict[Any, Any]:
    return {(namespace or "", name): _sweep_snapshot(body)}


@kopf.index(GROUP, VERSION, "finetunejobs", labels={LABEL_SWEEP: kopf.PRESENT})
def trials_by_sweep(body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any) -> dict[Any, Any]:
    return {(namespace or "", labels[LABEL_SWEEP]): _trial_snapshot(body)}


SERVING_LABELS: Final[dict[str, Any]] = {LABEL_SWEEP: kopf.PRESENT, LABEL_COMPONENT: COMPONENT_SERVE}


@kopf.index("apps", "v1", "deployments", labels=SERVING_LABELS)
def sweep_serving_index(
    body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any
) -> dict[Any, Any]:
    return {(namespace or "", labels[LABEL_SWEEP]): lifecycle.deployment_state(body)}


@kopf.on.event("apps", "v1", "deployments", labels=SERVING_LABELS)
async def sweep_serving_event(
    labels: kopf.Labels, namespace: str | None, memo: kopf.Memo, **kwargs: Any
) -> None:
    await reconcile_key(memo, (namespace or "", str(labels[LABEL_SWEEP])), kwargs)


SUMMARY_LABELS: Final[dict[str, Any]] = {LABEL_SWEEP: kopf.PRESENT, LABEL_COMPONENT: COMPONENT_SWEEP_SUMMARY}


@kopf.index("batch", "v1", "jobs", labels=SUMMARY_LABELS)
def sweep_summary_index(
    body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any
) -> dict[Any, Any]:
    return {(namespace or "", labels[LABEL_SWEEP]): lifecycle.job_state(body)}


@kopf.on.event("batch", "v1", "jobs", labels=SUMMARY_LABELS)
async def sweep_summary_event(
    labels: kopf.Labels, namespace: str | None, memo: kopf.Memo, **kwargs: Any
) -> None:
    await reconcile_key(memo, (namespace or "", str(labels[LABEL_SWEEP])), kwargs)


@kopf.on.event(GROUP, VERSION, FineTuneSweep.plural)
async def finetunesweep_event(
    event: kopf.RawEvent, body: kopf.Body, namespace: str | None, name: str, memo: kopf.Memo, **kwargs: Any
) -> None:
    if event.get("type") == "DELETED":  # its trials go by garbage collection (ownerReferences)
        rt = sweep_runtime(memo)
        uid = str((body.get("metadata") or {}).get("uid") or "")
        rt.written.pop(uid, None)
        rt.in_flight.pop(uid, None)
        rt.written_annotations.pop(uid, None)
        rt.allowed_secrets = {item for item in rt.allowed_secrets if item[0] != uid}
        rt.locks.pop((namespace or "", name), None)
        return
    await reconcile_key(memo, (namespace or "", name), kwargs)


@kopf.on.event(GROUP, VERSION, "finetunejobs", labels={LABEL_SWEEP: kopf.PRESENT})
async def trial_event(
    event: kopf.RawEvent, labels: kopf.Labels, namespace: str | None, memo: kopf.Memo, **kwargs: Any
) -> None:
    key = (namespace or "", str(labels[LABEL_SWEEP]))
    if event.get("type") == "DELETED":
        # Most often the garbage collector removing the trials of a sweep just deleted, whose own
        # DELETED event may come later on its own watch: look once that has had time to arrive.
        from kubetune.operator.handlers import runtime_of

        delay = runtime_of(memo).settings.resync_seconds
        _retry_later(sweep_runtime(memo), key, lambda: reconcile_key(memo, key, kwargs), delay)
        return
    await reconcile_key(memo, key, kwargs)


async def reconcile_key(memo: kopf.Memo, key: SweepKey, kwargs: Mapping[str, Any]) -> None:
    """Reconcile a sweep; kopf does not retry event handlers, so a failure schedules a retry."""
    store = kwargs["finetunesweep_index"].get(key)
    owner = next(iter(store), None) if store else None
    if owner is None:
        return
    from kubetune.operator.handlers import runtime_of

    operator = runtime_of(memo)
    rt = sweep_runtime(memo)
    try:
        async with rt.lock(key):
            recheck = await reconcile_sweep(
                rt,
                operator.client,
                owner,
                list(kwargs["trials_by_sweep"].get(key, [])),
                operator.settings,
                next(iter(kwargs["sweep_serving_index"].get(key, [])), None),
                next(iter(kwargs["sweep_summary_index"].get(key, [])), None),
            )
    except kopf.PermanentError:
        return
    except Exception:
        logger.exception("FineTuneSweep %s/%s: reconcile failed; will retry in %ss", *key, RETRY_DELAY)
        _retry_later(rt, key, lambda: reconcile_key(memo, key, kwargs))
        return
    if recheck is not None:
        # A deadline or TTL falls due: look then (at the latest after resync_seconds, as for jobs).
        delay = min(recheck, operator.settings.resync_seconds)
        _retry_later(rt, key, lambda: reconcile_key(memo, key, kwargs), delay)


def _retry_later(rt: SweepRuntime, key: SweepKey, again: Any, delay: float = RETRY_DELAY) -> None:
    if key in rt.retries and not rt.retries[key].done():
        return

    async def retry() -> None:
        await asyncio.sleep(delay)
        rt.retries.pop(key, None)
        await again()

    rt.retries[key] = asyncio.create_task(retry(), name=f"kubetune sweep retry {key}")


async def _tracking_secret(
    rt: SweepRuntime, client: Any, sweep: FineTuneSweep, status: FineTuneSweepStatus
) -> lifecycle.SecretAccess | None:
    """The MLflow credentials Secret <sweep>-summary would take, looked at until the summary is
    decided (the sweep may end in any reconcile, and its summary is decided in the same one)."""
    mlflow = sweep_tracking(sweep.spec)
    ref = mlflow.secret_ref if mlflow is not None else None
    if ref is None or lifecycle.get_condition(status.conditions, CONDITION_TRACKING_SUMMARIZED) is not None:
        return None
    return await credentials.opted_in(
        client,
        rt.allowed_secrets,
        str(sweep.metadata.uid or ""),
        str(sweep.metadata.namespace),
        ref.name,
        lifecycle.LABEL_TRACKING_CREDENTIALS,
    )


def sweep_status(rt: SweepRuntime, owner: Mapping[str, Any]) -> FineTuneSweepStatus:
    uid = str(owner["metadata"].get("uid") or "")
    written = rt.written.get(uid)
    if written is not None:
        return written
    wire = {k: v for k, v in (owner.get("status") or {}).items() if v is not None}
    try:
        return FineTuneSweepStatus.model_validate(wire)
    except ValidationError:
        logger.warning("FineTuneSweep %s: its status is not ours to read; starting afresh", uid)
        return FineTuneSweepStatus()


def owned(child: Mapping[str, Any], uid: str) -> bool:
    refs = (child.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid and ref.get("controller") for ref in refs)


async def reconcile_sweep(
    rt: SweepRuntime,
    client: Any,
    owner: Mapping[str, Any],
    children: list[Mapping[str, Any]],
    settings: Settings,
    deployment: lifecycle.DeploymentState | None = None,
    summary_job: lifecycle.JobState | None = None,
) -> float | None:
    """Observe, decide, apply. Returns the seconds after which time alone changes the sweep."""
    meta = owner["metadata"]
    namespace, name, uid = meta["namespace"], meta["name"], str(meta.get("uid") or "")
    if meta.get("deletionTimestamp"):
        return None
    annotations = {**(meta.get("annotations") or {}), **rt.written_annotations.get(uid, {})}
    status = sweep_status(rt, owner)
    now = datetime.now(UTC)
    try:
        sweep = FineTuneSweep.model_validate(
            {k: owner[k] for k in ("apiVersion", "kind", "metadata", "spec")}
        )
    except ValidationError as exc:
        message = f"FineTuneSweep {namespace}/{name} is invalid: {describe_validation_error(exc, limit=3)}"
        if status.phase is None or not status.phase.finished:
            new = invalid(status, message, now, meta.get("generation"))
            await _write_status(rt, client, owner, status, new)
            kopf.event(owner, type="Warning", reason="InvalidSpec", message=message)  # type: ignore[arg-type]
        raise kopf.PermanentError(message) from exc

    metric = sweep.spec.objective.metric
    found = [t for c in children if owned(c, uid) and (t := trial_from(c, metric)) is not None]
    in_flight = rt.in_flight.setdefault(uid, set())
    in_flight -= {t.number for t in found}
    obs = SweepObservation(
        tracking_secret=await _tracking_secret(rt, client, sweep, status),
        sweep=sweep,
        namespace=namespace,
        now=now,
        status=status,
        trials=remembered_trials(found, status, in_flight),
        evaluations=evaluations_of(status),
        annotations=annotations,
        settings=settings,
        deployment=deployment,
        summary_job=summary_job,
    )
    decision = decide(obs)
    for manifest in decision.create:
        try:
            await client.create(manifest)
        except ApiError as exc:
            if exc.status != 409:  # 409: created before (the name is the trial number's)
                raise
        in_flight.add(int(manifest["metadata"]["labels"][LABEL_TRIAL]))
    for trial in decision.prune:
        await client.merge_patch(
            API_VERSION,
            "FineTuneJob",
            namespace,
            trial,
            {
                "metadata": {
                    "annotations": {ANNOTATION_PRUNE: "its objective is worse than the other trials'"}
                }
            },
        )
    for trial, body in decision.patch.items():
        try:
            await client.merge_patch(API_VERSION, "FineTuneJob", namespace, trial, body)
        except ApiError as exc:
            if exc.status != 404:  # gone meanwhile: its watch event says so
                raise
    for trial in decision.delete:
        try:
            await client.delete(API_VERSION, "FineTuneJob", namespace, trial)
        except ApiError as exc:
            if exc.status != 404:
                raise
    if decision.serving is not None:
        await _apply_serving(client, namespace, owner, decision.serving)
    if decision.create_summary is not None:
        try:
            await client.create(decision.create_summary)
        except ApiError as exc:
            if exc.status != 409:  # 409: created before (its name is the sweep's)
                raise
    if decision.delete_summary is not None:
        await client.delete("batch/v1", "Job", namespace, decision.delete_summary)
    if decision.annotations:
        body = {"metadata": {"annotations": decision.annotations}}
        await client.merge_patch(str(owner["apiVersion"]), "FineTuneSweep", namespace, name, body)
        rt.written_annotations.setdefault(uid, {}).update(decision.annotations)
    await _write_status(rt, client, owner, status, decision.status)
    return decision.recheck_after


async def _apply_serving(
    client: Any, namespace: str, owner: Mapping[str, Any], serving: lifecycle.Decision
) -> None:
    """The promoted model's serving objects, as the jobs' handlers apply a serving decision."""
    for manifest in serving.create:
        try:
            await client.create(manifest)
        except ApiError as exc:
            if exc.status != 409:  # 409: there already (the Service is rendered every time)
                raise
    for patch in serving.patch:
        ref = patch.ref
        send = client.json_patch if patch.json_patch else client.merge_patch
        await send(ref.api_version, ref.kind, namespace, ref.name, patch.body)
    for ref in serving.delete:
        await client.delete(ref.api_version, ref.kind, namespace, ref.name)
    for event in serving.events:
        kopf.event(owner, type=event.type, reason=event.reason, message=event.message[:1024])  # type: ignore[arg-type]


def replacing(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch from ``before`` to ``after``: a key no longer set is sent as null (a merge
    patch would otherwise keep it, also inside an object such as bestTrial)."""
    patch: dict[str, Any] = {}
    for key in before.keys() | after.keys():
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            patch[key] = replacing(old, new)
        else:
            patch[key] = new
    return patch


async def _write_status(
    rt: SweepRuntime,
    client: Any,
    owner: Mapping[str, Any],
    old: FineTuneSweepStatus,
    new: FineTuneSweepStatus,
) -> None:
    patch = replacing(old.to_wire(), new.to_wire())
    if not patch:
        return
    meta = owner["metadata"]
    await client.merge_patch(
        str(owner["apiVersion"]),
        "FineTuneSweep",
        meta["namespace"],
        meta["name"],
        {"status": patch},
        subresource="status",
    )
    rt.written[str(meta.get("uid") or "")] = new
