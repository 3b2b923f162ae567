"""kopf handlers: thin glue between watch events and the pure lifecycle.

Every trigger ends in :func:`reconcile` of one job: a watch event of the job itself (creation,
spec edit, first sight after a start), an event of one of its batch Jobs or its serving
Deployment, a terminal phase of the FineTuneJob a CompressJob waits for, or the time a decision
said to look again (a deadline or TTL falling due, a ServiceAccount or Secret no watch reports).
Reconciling gathers the observed state from kopf indices (no API reads except a failed Job's
pods, a ServiceAccount named by the spec and the metadata of a Secret it names), calls
:func:`kubetune.operator.reconcile.decide` and applies the decision. Run with
``kopf run -m kubetune.operator.handlers -A`` or ``kubetune operator``.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, cast

import kopf
from pydantic import ValidationError

from kubetune.api import GROUP, KINDS, VERSION, CompressJob, FineTuneJob, Phase
from kubetune.api.status import JobStatusBase
from kubetune.api.sweep import FineTuneSweep
from kubetune.errors import describe_validation_error
from kubetune.operator import credentials, lifecycle, render
from kubetune.operator.kube import ApiError, KubeClient, connection
from kubetune.operator.lifecycle import Decision, Observation
from kubetune.operator.metrics import Metrics, jobs_of, status_change
from kubetune.operator.policies import failure, validation
from kubetune.operator.reconcile import child_failure, decide
from kubetune.operator.render import (
    COMPONENT_SERVE,
    LABEL_COMPONENT,
    LABEL_JOB,
    LABEL_KIND,
    LABEL_MANAGED_BY,
    LABEL_RUNNER,
    LABEL_STORAGE_CREDENTIALS,
    MANAGER,
    Job,
    Manifest,
)
from kubetune.operator.settings import Settings

CHILD_LABELS: Final[dict[str, Any]] = {
    LABEL_MANAGED_BY: MANAGER,
    LABEL_JOB: kopf.PRESENT,
    LABEL_KIND: kopf.PRESENT,
}
RETRY_DELAY: Final = 10.0
WORKLOAD_KINDS: Final = ("Job", "Deployment")

Key = tuple[str, str, str]  # (kind, namespace, name)


def creation_stages(
    manifests: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """The order children are created in: the plan, Services, ServiceAccount and Role together;
    then RoleBindings, because the API server authorizes a binding by resolving its Role (an
    operator without the "bind" verb gets 404 for a Role created in the same instant); workload
    Jobs and Deployments last, since their pods mount and use everything before them."""
    workloads = [m for m in manifests if m["kind"] in WORKLOAD_KINDS]
    bindings = [m for m in manifests if m["kind"] == "RoleBinding"]
    supporting = [m for m in manifests if m["kind"] not in WORKLOAD_KINDS and m["kind"] != "RoleBinding"]
    return supporting, bindings, workloads


logger = logging.getLogger("kubetune.operator")


@dataclass
class Runtime:
    """Operator-wide state shared by all handlers (kept in kopf's memo)."""

    settings: Settings
    client: KubeClient
    metrics: Metrics
    locks: dict[Key, asyncio.Lock] = field(default_factory=dict)
    # The operator-owned status fields and annotations as last written, by job uid: a reconcile
    # that runs before the watch delivers our own write must not act on the older state.
    written_status: dict[str, JobStatusBase] = field(default_factory=dict)
    written_annotations: dict[str, dict[str, str]] = field(default_factory=dict)
    # Children created (or found owned) per (job uid, kind, name), for kinds no index tracks, with
    # the job generation they were brought up to date with (see lifecycle.Decision.update).
    ensured: dict[tuple[str, str, str], str | None] = field(default_factory=dict)
    # What mattered of each workload Job when its owner was last reconciled on its behalf (or
    # when we created it), by (namespace, Job name): watch events that change nothing of it --
    # the echo of our own create, label or annotation edits -- need no reconcile.
    job_states: dict[tuple[str, str], lifecycle.JobState] = field(default_factory=dict)
    # The owner signature (lifecycle.owner_signature) of each job as last reconciled or written.
    signatures: dict[Key, tuple[Any, ...]] = field(default_factory=dict)
    # (job uid, ServiceAccount) pairs found labelled kubetune.io/runner: "true".
    allowed_accounts: set[tuple[str, str]] = field(default_factory=set)
    # (job uid, Secret, opt-in label) found labelled "true".
    allowed_secrets: credentials.AllowedSecrets = field(default_factory=set)

    # The pending look-again of each job, and when it is due (the event loop's clock).
    retries: dict[Key, tuple[asyncio.Task[None], float]] = field(default_factory=dict)

    def retry_later(self, key: Key, delay: float, again: Callable[[], Awaitable[None]]) -> None:
        """Run ``again`` after ``delay`` seconds, unless a look at this job is already due by then
        (that one decides anew, and asks for the next)."""
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        pending = self.retries.get(key)
        if pending is not None:
            if pending[1] <= due:
                return
            pending[0].cancel()

        async def retry() -> None:
            await asyncio.sleep(delay)
            self.retries.pop(key, None)
            await again()

        self.retries[key] = (asyncio.create_task(retry(), name=f"kubetune retry {key}"), due)

    def cancel_retry(self, key: Key) -> None:
        pending = self.retries.pop(key, None)
        if pending is not None:
            pending[0].cancel()

    def lock(self, key: Key) -> asyncio.Lock:
        return self.locks.setdefault(key, asyncio.Lock())

    def forget(self, key: Key, uid: str | None) -> None:
        self.cancel_retry(key)
        self.locks.pop(key, None)
        self.signatures.pop(key, None)
        if uid:
            self.written_status.pop(uid, None)
            self.written_annotations.pop(uid, None)
            self.allowed_accounts = {item for item in self.allowed_accounts if item[0] != uid}
            self.allowed_secrets = {item for item in self.allowed_secrets if item[0] != uid}
            self.ensured = {key: value for key, value in self.ensured.items() if key[0] != uid}


class ChildConflict(Exception):
    """A child's name is taken by an object this job does not own."""


class ChildRejected(Exception):
    """The API server refused a child as invalid (422): retrying the same object cannot help."""


def rejected(manifest_kind: str, name: str, exc: ApiError) -> ChildRejected:
    return ChildRejected(f"the API server rejected {manifest_kind} {name}: {exc.message}")


def runtime_of(memo: kopf.Memo) -> Runtime:
    rt = memo.get("runtime")
    if not isinstance(rt, Runtime):
        raise kopf.TemporaryError("the operator is still starting", delay=1)
    return rt


def configure_kopf(settings: kopf.OperatorSettings) -> None:
    """Only raw-event handlers and indices: kopf keeps no per-object state (no progress or diff-base
    annotations). The finalizer's name is the one earlier versions added, so kopf releases it."""
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.posting.enabled = True
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    settings.networking.error_backoffs = [1, 2, 5, 10]


# --- Lifecycle of the operator ------------------------------------------------------------------


@kopf.on.startup()
async def startup(
    settings: kopf.OperatorSettings,
    memo: kopf.Memo,
    logger: kopf.Logger,
    **kwargs: Any,
) -> None:
    config = memo.get("config")
    if not isinstance(config, Settings):
        config = Settings.from_env()
    configure_kopf(settings)
    # kopf hands every index to every handler; the job gauges read the owner indices.
    indices = {"FineTuneJob": kwargs["finetunejob_index"], "CompressJob": kwargs["compressjob_index"]}
    metrics = Metrics(lambda: jobs_of(indices))
    client = KubeClient(lambda: connection(settings, logger))
    memo["runtime"] = Runtime(settings=config, client=client, metrics=metrics)
    if config.metrics_port:
        await metrics.serve(config.metrics_port)
    logger.info(
        "kubetune operator started",
        extra={"namespaces": list(config.namespaces) or "all", "trainer_image": config.trainer_image},
    )


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    rt = memo.get("runtime")
    if isinstance(rt, Runtime):
        for key in list(rt.retries):
            rt.cancel_retry(key)
        await rt.client.close()
        await rt.metrics.stop()


@kopf.on.login()
def login(settings: kopf.OperatorSettings, logger: kopf.Logger, **_: Any) -> kopf.ConnectionInfo:
    return connection(settings, logger)


# --- Indices: the observed state, kept current by kopf's watches ----------------------------------


def snapshot(body: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a job reconciling reads, detached from kopf's live body."""
    meta = body.get("metadata") or {}
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {
            key: copy.deepcopy(meta[key])
            for key in (
                "name",
                "namespace",
                "uid",
                "generation",
                "creationTimestamp",
                "labels",
                "annotations",
                # A trial's plan names its sweep from these (its MLflow parent run and experiment).
                "ownerReferences",
            )
            if key in meta
        },
        "spec": copy.deepcopy(dict(body.get("spec") or {})),
        "status": copy.deepcopy(dict(body.get("status") or {})),
    }


@kopf.index(GROUP, VERSION, FineTuneJob.plural)
def finetunejob_index(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> dict[Any, Any]:
    return {(namespace, name): snapshot(body)}


@kopf.index(GROUP, VERSION, CompressJob.plural)
def compressjob_index(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> dict[Any, Any]:
    return {(namespace, name): snapshot(body)}


@kopf.index(GROUP, VERSION, CompressJob.plural)
def compressjobs_by_upstream(spec: kopf.Spec, namespace: str | None, name: str, **_: Any) -> dict[Any, Any]:
    upstream = (spec.get("model") or {}).get("fromFineTuneJob")
    return {(namespace, upstream): name} if upstream else {}


@kopf.index(GROUP, VERSION, FineTuneSweep.plural)
def upstream_sweep_index(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> dict[Any, Any]:
    """What a CompressJob with model.fromFineTuneSweep reads of the sweep: its phase and best trial."""
    status = body.get("status") or {}
    return {
        (namespace, name): {key: copy.deepcopy(status.get(key)) for key in ("phase", "message", "bestTrial")}
    }


@kopf.index(GROUP, VERSION, CompressJob.plural)
def compressjobs_by_sweep(spec: kopf.Spec, namespace: str | None, name: str, **_: Any) -> dict[Any, Any]:
    sweep = (spec.get("model") or {}).get("fromFineTuneSweep")
    return {(namespace, sweep): name} if sweep else {}


@kopf.index("batch", "v1", "jobs", labels=CHILD_LABELS)
def workload_job_index(
    body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any
) -> dict[Any, Any]:
    return {(labels[LABEL_KIND], namespace or "", labels[LABEL_JOB]): lifecycle.job_state(body)}


@kopf.index("apps", "v1", "deployments", labels=CHILD_LABELS)
def serving_deployment_index(
    body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any
) -> dict[Any, Any]:
    return {(labels[LABEL_KIND], namespace or "", labels[LABEL_JOB]): lifecycle.deployment_state(body)}


@dataclass(frozen=True)
class Indices:
    owners: Mapping[str, kopf.Index[Any, Any]]
    jobs: kopf.Index[Any, Any]
    deployments: kopf.Index[Any, Any]
    sweeps: kopf.Index[Any, Any]

    @classmethod
    def of(cls, kwargs: Mapping[str, Any]) -> Indices:
        return cls(
            owners={"FineTuneJob": kwargs["finetunejob_index"], "CompressJob": kwargs["compressjob_index"]},
            jobs=kwargs["workload_job_index"],
            deployments=kwargs["serving_deployment_index"],
            sweeps=kwargs["upstream_sweep_index"],
        )

    def owner(self, key: Key) -> dict[str, Any] | None:
        kind, namespace, name = key
        store = self.owners[kind].get((namespace, name))
        return next(iter(store), None) if store else None

    def sweep(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The FineTuneSweep as :func:`upstream_sweep_index` keeps it: ``{"status": ...}``."""
        store = self.sweeps.get((namespace, name))
        return {"status": next(iter(store))} if store else None


# --- Triggers ------------------------------------------------------------------------------------


@kopf.on.event(GROUP, VERSION, FineTuneJob.plural)
async def finetunejob_event(
    event: kopf.RawEvent, body: kopf.Body, namespace: str | None, name: str, memo: kopf.Memo, **kwargs: Any
) -> None:
    await job_event(memo, ("FineTuneJob", namespace or "", name), event, body, kwargs)
    if event.get("type") == "DELETED":
        return
    phase = (body.get("status") or {}).get("phase")
    if phase not in (Phase.succeeded.value, Phase.failed.value):
        return
    # CompressJobs waiting for this FineTuneJob move on (or fail) as soon as it finishes.
    for dependent in kwargs["compressjobs_by_upstream"].get((namespace or "", name), []):
        await reconcile_key(memo, ("CompressJob", namespace or "", dependent), kwargs, trigger="upstream")


@kopf.on.event(GROUP, VERSION, FineTuneSweep.plural)
async def upstream_sweep_event(
    event: kopf.RawEvent, body: kopf.Body, namespace: str | None, name: str, memo: kopf.Memo, **kwargs: Any
) -> None:
    """CompressJobs waiting for this sweep move on (or fail) as soon as it finishes, and say
    what they wait for once it exists."""
    finished = (body.get("status") or {}).get("phase") in (Phase.succeeded.value, Phase.failed.value)
    if event.get("type") != "ADDED" and not finished:
        return
    for dependent in kwargs["compressjobs_by_sweep"].get((namespace or "", name), []):
        await reconcile_key(memo, ("CompressJob", namespace or "", dependent), kwargs, trigger="upstream")


@kopf.on.event(GROUP, VERSION, CompressJob.plural)
async def compressjob_event(
    event: kopf.RawEvent, body: kopf.Body, namespace: str | None, name: str, memo: kopf.Memo, **kwargs: Any
) -> None:
    await job_event(memo, ("CompressJob", namespace or "", name), event, body, kwargs)


async def job_event(
    memo: kopf.Memo, key: Key, event: kopf.RawEvent, body: kopf.Body, kwargs: Mapping[str, Any]
) -> None:
    """Reconcile a FineTuneJob or CompressJob on a watch event of its own, unless nothing its
    decision depends on changed.

    Raw watch events instead of kopf's create/update/resume handlers: those keep a copy of every
    object's spec in an annotation, which costs a PATCH and one more watch event per change --
    a third of the operator's work for a burst of new jobs (bench/bench_operator.py). What they
    would tell apart is in the signature: the spec (``metadata.generation``), what the operator
    wrote itself, and deletion. The first event of each object after a start (kopf's initial
    listing) always reconciles, which is what resuming needs.
    """
    rt = runtime_of(memo)
    meta = body.get("metadata") or {}
    if event.get("type") == "DELETED":
        rt.forget(key, meta.get("uid"))
        return
    signature = lifecycle.owner_signature(meta, body.get("status") or {}, meta.get("annotations") or {})
    if rt.signatures.get(key) == signature:
        return
    rt.signatures[key] = signature
    await reconcile_key(memo, key, kwargs, trigger="event")


@kopf.on.event("batch", "v1", "jobs", labels=CHILD_LABELS)
async def workload_job_event(
    event: kopf.RawEvent,
    body: kopf.Body,
    labels: kopf.Labels,
    namespace: str | None,
    name: str,
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    rt = runtime_of(memo)
    job_key = (namespace or "", name)
    if event.get("type") == "DELETED":
        rt.job_states.pop(job_key, None)
    else:
        state = lifecycle.job_state(body)
        if rt.job_states.get(job_key) == state:
            return
        rt.job_states[job_key] = state
    await reconcile_key(memo, (labels[LABEL_KIND], namespace or "", labels[LABEL_JOB]), kwargs, trigger="job")


@kopf.on.event("apps", "v1", "deployments", labels={**CHILD_LABELS, LABEL_COMPONENT: COMPONENT_SERVE})
async def serving_deployment_event(
    labels: kopf.Labels, namespace: str | None, memo: kopf.Memo, **kwargs: Any
) -> None:
    await reconcile_key(
        memo, (labels[LABEL_KIND], namespace or "", labels[LABEL_JOB]), kwargs, trigger="deployment"
    )


async def reconcile_key(memo: kopf.Memo, key: Key, kwargs: Mapping[str, Any], trigger: str) -> None:
    """Reconcile a job on a watch event (its own or a child's). kopf does not retry event
    handlers, so a failure here schedules a retry of its own (a detached task, never a sleep in
    the handler); the job's own watch events and the next child event may come first."""
    indices = Indices.of(kwargs)
    owner = indices.owner(key)
    if owner is None:  # the job is gone (its children follow by garbage collection)
        return
    rt = runtime_of(memo)
    try:
        recheck = await reconcile(rt, owner, indices, trigger=trigger)
        if recheck is not None:
            # A wall-clock jump (the deadline and TTL are wall-clock times; sleeps are not) delays
            # a look by at most resync_seconds.
            delay = min(recheck, rt.settings.resync_seconds)
            rt.retry_later(key, delay, lambda: reconcile_key(memo, key, kwargs, "recheck"))
    except kopf.PermanentError:
        return  # the job's status says why (e.g. an invalid spec); nothing to retry
    except kopf.TemporaryError as exc:
        logger.warning("%s %s/%s: will retry in %ss: %s", *key, exc.delay, exc)
        rt.retry_later(key, exc.delay or RETRY_DELAY, lambda: reconcile_key(memo, key, kwargs, "retry"))
    except Exception:
        logger.exception("%s %s/%s: reconcile failed; will retry in %ss", *key, RETRY_DELAY)
        rt.retry_later(key, RETRY_DELAY, lambda: reconcile_key(memo, key, kwargs, "retry"))


# --- Reconciling ---------------------------------------------------------------------------------


async def reconcile(rt: Runtime, owner: Mapping[str, Any], indices: Indices, *, trigger: str) -> float | None:
    """Bring one job a step forward. Serialised per job; errors become kopf retries. Returns the
    seconds after which to look again, if time alone changes the job (see _reconcile_locked)."""
    kind = str(owner["kind"])
    meta = owner["metadata"]
    key: Key = (kind, meta["namespace"], meta["name"])
    started = time.perf_counter()
    try:
        async with rt.lock(key):
            return await _reconcile_locked(rt, owner, indices, key)
    except ApiError as exc:
        rt.metrics.reconcile_errors.labels(kind, f"Api{exc.status}").inc()
        if exc.status == 404:
            # The job was deleted while we worked, or something a child refers to is missing
            # (RBAC answers 404 for a RoleBinding whose Role it cannot find): look again soon; a
            # job that is gone ends the retries (reconcile_key finds no owner).
            return RETRY_DELAY
        raise kopf.TemporaryError(str(exc), delay=RETRY_DELAY) from exc
    except (kopf.PermanentError, kopf.TemporaryError) as exc:
        rt.metrics.reconcile_errors.labels(kind, type(exc).__name__).inc()
        raise
    except Exception as exc:
        rt.metrics.reconcile_errors.labels(kind, type(exc).__name__).inc()
        raise
    finally:
        rt.metrics.reconcile_seconds.labels(kind, trigger).observe(time.perf_counter() - started)


def as_body(owner: Mapping[str, Any]) -> kopf.Body:
    """kopf's event poster reads apiVersion, kind and metadata from any mapping."""
    return cast(kopf.Body, owner)


def parse_job(owner: Mapping[str, Any]) -> Job:
    cls = KINDS[str(owner["kind"])]
    return cls.model_validate({k: owner[k] for k in ("apiVersion", "kind", "metadata", "spec")})


def job_status(rt: Runtime, owner: Mapping[str, Any]) -> JobStatusBase:
    """The operator's fields of the job's status: as we last wrote them, else as observed."""
    uid = str(owner["metadata"].get("uid") or "")
    written = rt.written_status.get(uid)
    if written is not None:
        return written
    return lifecycle.observed_status(str(owner["kind"]), owner.get("status") or {})


async def _reconcile_locked(
    rt: Runtime, owner: Mapping[str, Any], indices: Indices, key: Key
) -> float | None:
    """Observe, decide, apply. Returns the seconds after which to look again when time alone
    changes the job (a deadline or TTL falls due, a ServiceAccount or Secret may appear), else None."""
    kind, namespace, name = key
    meta = owner["metadata"]
    uid = str(meta.get("uid") or "")
    status = job_status(rt, owner)
    annotations = {**(meta.get("annotations") or {}), **rt.written_annotations.get(uid, {})}
    now = datetime.now(UTC)
    try:
        job = parse_job(owner)
    except ValidationError as exc:
        message = f"{kind} {namespace}/{name} is invalid: {describe_validation_error(exc, limit=3)}"
        if status.phase != Phase.failed:
            new = validation.invalid_spec(status, message, now, meta.get("generation"))
            await _write_status(rt, owner, status, new)
            kopf.event(as_body(owner), type="Warning", reason=lifecycle.REASON_INVALID_SPEC, message=message)
        raise kopf.PermanentError(message) from exc

    jobs = list(indices.jobs.get(key, []))
    deployments = list(indices.deployments.get(key, []))
    upstream: lifecycle.Upstream | lifecycle.SweepUpstream | None = None
    if isinstance(job, CompressJob) and job.spec.model.from_fine_tune_job:
        upstream_name = job.spec.model.from_fine_tune_job
        upstream = lifecycle.upstream_from(
            upstream_name, indices.owner(("FineTuneJob", namespace, upstream_name))
        )
    elif isinstance(job, CompressJob) and job.spec.model.from_fine_tune_sweep:
        sweep_name = job.spec.model.from_fine_tune_sweep
        upstream = lifecycle.sweep_upstream_from(sweep_name, indices.sweep(namespace, sweep_name))
    terminations = {}
    pods: dict[str, list[lifecycle.PodState]] = {}
    failed_jobs = {j.name for j in jobs if j.failed}
    for observed in failure.jobs_to_diagnose(job, status, jobs):
        found = await _job_pods(rt, namespace, observed)
        pods[observed] = [lifecycle.pod_state(pod) for pod in found]
        term = failure.pick_termination(found) if observed in failed_jobs else None
        if term is not None:
            terminations[observed] = term
    progress = (owner.get("status") or {}).get("progress") or {}
    runner_account = storage_secret = tracking_secret = None
    if not lifecycle.finished(status):
        runner_account = await _runner_account(rt, job, namespace, uid)
        storage = job.spec.storage.secret_ref
        if storage is not None:
            storage_secret = await _secret_access(rt, namespace, uid, storage.name, LABEL_STORAGE_CREDENTIALS)
        tracking = job.spec.tracking.mlflow if job.spec.tracking else None
        if tracking is not None and tracking.secret_ref is not None:
            tracking_secret = await _secret_access(
                rt, namespace, uid, tracking.secret_ref.name, lifecycle.LABEL_TRACKING_CREDENTIALS
            )
    obs = Observation(
        job=job,
        namespace=namespace,
        settings=rt.settings,
        now=now,
        generation=meta.get("generation"),
        status=status,
        annotations=annotations,
        jobs=jobs,
        deployment=deployments[0] if deployments else None,
        terminations=terminations,
        pods=pods,
        progress_at=lifecycle.parse_time(progress.get("updatedAt")),
        upstream=upstream,
        runner_account=runner_account,
        storage_secret=storage_secret,
        tracking_secret=tracking_secret,
    )
    decision = decide(obs)
    supporting, bindings, workloads = creation_stages(decision.create)
    try:
        for stage in (supporting, bindings):
            await asyncio.gather(
                *(
                    _ensure(rt, manifest, uid, owner, update=lifecycle.ref_of(manifest) in decision.update)
                    for manifest in stage
                )
            )
        for manifest in workloads:
            await _ensure(rt, manifest, uid, owner)
        for patch in decision.patch:
            await _patch_child(rt, namespace, patch)
    except ChildConflict as conflict:
        decision = child_failure(obs, decision, lifecycle.REASON_NAME_CONFLICT, str(conflict))
    except ChildRejected as invalid:
        decision = child_failure(obs, decision, lifecycle.REASON_INVALID_CHILD, str(invalid))
    for ref in decision.delete:
        await rt.client.delete(ref.api_version, ref.kind, namespace, ref.name)
        rt.ensured.pop((uid, ref.kind, ref.name), None)
    if decision.annotations:
        await rt.client.merge_patch(
            str(owner["apiVersion"]),
            kind,
            namespace,
            name,
            {"metadata": {"annotations": decision.annotations}},
        )
        rt.written_annotations.setdefault(uid, {}).update(decision.annotations)
    await _write_status(rt, owner, status, decision.status)
    # The watch echoes these writes back; that event brings nothing this decision did not know.
    rt.signatures[key] = lifecycle.owner_signature(
        meta, lifecycle.operator_wire(decision.status), {**annotations, **decision.annotations}
    )
    _emit(rt, owner, decision)
    return decision.recheck_after


async def _runner_account(rt: Runtime, job: Job, namespace: str, uid: str) -> lifecycle.RunnerAccount | None:
    """Whether the job may run as the ServiceAccount it names (None: it names none)."""
    name = job.spec.storage.service_account_name
    if not name:
        return None
    if (uid, name) in rt.allowed_accounts:
        return lifecycle.RunnerAccount.allowed
    try:
        account = await rt.client.get("v1", "ServiceAccount", namespace, name)
    except ApiError as exc:
        if exc.status == 404:
            return lifecycle.RunnerAccount.missing
        raise
    if ((account.get("metadata") or {}).get("labels") or {}).get(LABEL_RUNNER) != "true":
        return lifecycle.RunnerAccount.not_allowed
    rt.allowed_accounts.add((uid, name))
    return lifecycle.RunnerAccount.allowed


async def _secret_access(
    rt: Runtime, namespace: str, uid: str, name: str, label: str
) -> lifecycle.SecretAccess:
    """Whether the job may hand its pods keys of Secret ``name`` (its owner opts it in with
    ``label: "true"``)."""
    return await credentials.opted_in(rt.client, rt.allowed_secrets, uid, namespace, name, label)


async def _write_status(
    rt: Runtime, owner: Mapping[str, Any], old: JobStatusBase, new: JobStatusBase
) -> None:
    patch = lifecycle.status_patch(old, new)
    if not patch:
        return
    meta = owner["metadata"]
    await rt.client.merge_patch(
        str(owner["apiVersion"]),
        str(owner["kind"]),
        meta["namespace"],
        meta["name"],
        {"status": patch},
        subresource="status",
    )
    rt.written_status[str(meta.get("uid") or "")] = new
    rt.metrics.record(str(owner["kind"]), status_change(old, new, meta.get("creationTimestamp")))


def _emit(rt: Runtime, owner: Mapping[str, Any], decision: Decision) -> None:
    for event in decision.events:
        kopf.event(as_body(owner), type=event.type, reason=event.reason, message=event.message[:1024])
        log = logger.warning if event.type == "Warning" else logger.info
        meta = owner["metadata"]
        log(
            "%s %s/%s: %s: %s",
            owner["kind"],
            meta["namespace"],
            meta["name"],
            event.reason,
            event.message,
            extra={
                "job_kind": owner["kind"],
                "job_namespace": meta["namespace"],
                "job_name": meta["name"],
                "reason": event.reason,
            },
        )
    phase = decision.status.phase
    if phase is not None and any(e.reason == phase for e in decision.events):
        rt.metrics.transitions.labels(str(owner["kind"]), str(phase)).inc()


async def _ensure(
    rt: Runtime, manifest: Manifest, uid: str, owner: Mapping[str, Any], *, update: bool = False
) -> None:
    """Create a child unless it exists; a 409 is fine if the existing object is ours. With
    ``update`` (a ConfigMap), an existing one rendered from another generation of the job's spec
    is brought up to date. A child the API server refuses as invalid raises ChildRejected."""
    kind, name = manifest["kind"], manifest["metadata"]["name"]
    namespace = manifest["metadata"]["namespace"]
    generation = render.rendered_generation(manifest) if update else None
    key = (uid, kind, name)
    if key in rt.ensured and rt.ensured[key] == generation:
        return
    try:
        await rt.client.create(manifest)
        if kind == "Job":
            rt.job_states[(namespace, name)] = lifecycle.job_state(manifest)
    except ApiError as exc:
        if exc.status == 422:
            raise rejected(kind, name, exc) from exc
        if exc.status != 409:
            raise
        existing = await rt.client.get(manifest["apiVersion"], kind, namespace, name)
        owners = (existing.get("metadata") or {}).get("ownerReferences") or []
        if not any(ref.get("uid") == uid for ref in owners):
            raise ChildConflict(
                f"{kind} {name} already exists and does not belong to {owner['kind']} "
                f"{owner['metadata']['name']}; delete it or choose another job name"
            ) from exc
        if update and render.rendered_generation(existing) != generation:
            await _refresh_configmap(rt, manifest, existing)
    # Jobs and Deployments are tracked by the indices; remembering them here would hide a
    # deletion by someone else.
    if kind not in WORKLOAD_KINDS:
        rt.ensured[key] = generation


async def _refresh_configmap(rt: Runtime, manifest: Manifest, existing: Mapping[str, Any]) -> None:
    """Replace an owned ConfigMap's data with the newly rendered one (keys it no longer has go)."""
    if manifest["kind"] != "ConfigMap":
        raise ValueError(f"only ConfigMaps are brought up to date in place, not {manifest['kind']}")
    meta = manifest["metadata"]
    data = {key: None for key in existing.get("data") or {}} | dict(manifest.get("data") or {})
    body = {"metadata": {"annotations": dict(meta.get("annotations") or {})}, "data": data}
    try:
        await rt.client.merge_patch("v1", "ConfigMap", meta["namespace"], meta["name"], body)
    except ApiError as exc:
        if exc.status == 422:
            raise rejected("ConfigMap", meta["name"], exc) from exc
        raise


async def _patch_child(rt: Runtime, namespace: str, patch: lifecycle.ChildPatch) -> None:
    ref = patch.ref
    try:
        if patch.json_patch:
            await rt.client.json_patch(ref.api_version, ref.kind, namespace, ref.name, patch.body)
        else:
            await rt.client.merge_patch(ref.api_version, ref.kind, namespace, ref.name, patch.body)
    except ApiError as exc:
        if exc.status == 422:
            raise rejected(ref.kind, ref.name, exc) from exc
        if exc.status != 404:  # gone meanwhile: the next event shows it
            raise


async def _job_pods(rt: Runtime, namespace: str, job_name: str) -> list[dict[str, Any]]:
    """The pods of a workload Job (their exit codes and termination messages, why they wait)."""
    pods = await rt.client.list_objects(
        "v1", "Pod", namespace, label_selector=f"batch.kubernetes.io/job-name={job_name}"
    )
    return [
        pod
        for pod in pods
        if job_name
        in {
            ((pod.get("metadata") or {}).get("labels") or {}).get("batch.kubernetes.io/job-name"),
            ((pod.get("metadata") or {}).get("labels") or {}).get("job-name"),
        }
    ]


# The FineTuneSweep handlers register with kopf on import (the same operator runs both).
import kubetune.operator.sweep_handlers  # noqa: E402, F401
