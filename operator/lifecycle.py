"""The vocabulary of a job's lifecycle: what a reconcile observes and what it may decide.

Level-based: every decision is derived from the job's spec, its status as last written and the
children that exist now, so deciding twice (or after an operator restart) changes nothing.
No I/O here; the handlers gather an :class:`Observation`, :func:`kubetune.operator.reconcile.decide`
composes the policies of :mod:`kubetune.operator.policies` into a :class:`Decision`, and the
handlers carry it out.

Phases: Pending -> [Waiting ->] Validating -> Running -> Succeeded | Failed, plus Suspended.
Status is typed (:mod:`kubetune.api.status`); it reaches the API server as the merge patch
:func:`status_patch`, in camelCase.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final

from pydantic import ValidationError

from kubetune.api import GROUP, Condition, ConditionType, FineTuneJob, Phase
from kubetune.api.status import CompressJobStatus, FineTuneJobStatus, JobStatusBase
from kubetune.operator.render import (
    ANNOTATION_GENERATION,
    ANNOTATION_SPEC_HASH,
    LABEL_ATTEMPT,
    LABEL_COMPONENT,
    Job,
    Manifest,
)
from kubetune.operator.settings import Settings

ANNOTATION_PAUSED: Final = f"{GROUP}/paused-seconds"
ANNOTATION_CLEANED: Final = f"{GROUP}/children-deleted"
# Set by a FineTuneSweep on a trial it stops early (policies.pruning).
ANNOTATION_PRUNE: Final = f"{GROUP}/prune"
# Set by a FineTuneSweep on a trial it stops because the sweep itself ended, "<Reason>: <message>"
# (its deadline passed: DeadlineExceeded); policies.pruning ends the trial with that reason.
ANNOTATION_STOP: Final = f"{GROUP}/stop"

# Reasons of a failure (CamelCase, as the API conventions ask); docs/troubleshooting.md explains each.
REASON_INVALID_INPUT: Final = "InvalidInput"
REASON_STORAGE: Final = "StorageError"
REASON_OUTPUT_CONFLICT: Final = "OutputConflict"
# The validation step's memory plan: the job cannot fit its GPUs or memory limit (kubetune.run.memory).
REASON_WILL_NOT_FIT: Final = "WillNotFit"
REASON_VALIDATION_FAILED: Final = "ValidationFailed"
REASON_DEADLINE: Final = "DeadlineExceeded"
REASON_RESTARTS_EXHAUSTED: Final = "RestartsExhausted"
REASON_UPSTREAM_FAILED: Final = "UpstreamFailed"
# A CompressJob's fromFineTuneSweep names a sweep that ended without a completed trial's model.
REASON_NO_BEST_TRIAL: Final = "NoBestTrial"
REASON_NAME_CONFLICT: Final = "NameConflict"
REASON_INVALID_SPEC: Final = "InvalidSpec"
REASON_ACCOUNT_NOT_ALLOWED: Final = "ServiceAccountNotAllowed"
REASON_SECRET_NOT_ALLOWED: Final = "SecretNotAllowed"
REASON_IMAGE_NOT_ALLOWED: Final = "ImageNotAllowed"
REASON_INVALID_CHILD: Final = "InvalidChild"
# Why pods could not run, or an attempt ended (policies.diagnosis; docs/operations.md).
REASON_OOM_KILLED: Final = "OOMKilled"
REASON_UNSCHEDULABLE: Final = "Unschedulable"
REASON_SCHEDULED: Final = "Scheduled"
REASON_IMAGE_PULL: Final = "ImagePullFailed"
REASON_CONTAINER_CONFIG: Final = "ContainerConfigError"
REASON_DISRUPTED: Final = "Disrupted"
REASON_STALLED: Final = "Stalled"
REASON_ATTEMPT_FAILED: Final = "AttemptFailed"


class StateReason(StrEnum):
    """Reasons of conditions that say where a job is rather than why it failed."""

    validated = "Validated"
    running = "Running"
    succeeded = "Succeeded"
    suspended = "Suspended"
    queued = "Queued"  # waiting for admission by Kueue
    resumed = "Resumed"
    ready = "Ready"
    not_ready = "NotReady"
    disabled = "Disabled"


# Status fields the operator owns (as on the wire); the runtimes own progress, checkpoints and
# results, which the operator neither reads nor writes.
OPERATOR_FIELDS: Final = (
    "phase",
    "message",
    "conditions",
    "observedGeneration",
    "startTime",
    "completionTime",
    "restarts",
    "activeJob",
    "artifacts",
    "serving",
    "sourceModelUri",
    "logs",
    "disruptions",
)

STATUS_TYPES: Final[dict[str, type[JobStatusBase]]] = {
    "FineTuneJob": FineTuneJobStatus,
    "CompressJob": CompressJobStatus,
}


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# --- Status: typed in code, camelCase on the wire -----------------------------------------------


def observed_status(kind: str, wire: Mapping[str, Any]) -> JobStatusBase:
    """The operator's fields of a job's status as the API server holds it."""
    cls = STATUS_TYPES[kind]
    fields = {key: value for key, value in wire.items() if key in OPERATOR_FIELDS and value is not None}
    return cls.model_validate(fields)


def operator_wire(status: JobStatusBase) -> dict[str, Any]:
    """The operator's fields of ``status`` as they appear on the wire (unset fields omitted)."""
    return {key: value for key, value in status.to_wire().items() if key in OPERATOR_FIELDS}


def status_patch(old: JobStatusBase, new: JobStatusBase) -> dict[str, Any]:
    """Merge patch of the operator-owned status fields that changed (empty: nothing to write); a
    field that was set and is no longer is sent as null, which removes it."""
    before, after = operator_wire(old), operator_wire(new)
    return {key: after.get(key) for key in OPERATOR_FIELDS if before.get(key) != after.get(key)}


def set_condition(
    conditions: Sequence[Condition] | None,
    type_: str,
    status: bool,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None = None,
) -> list[Condition]:
    """A copy of ``conditions`` with one condition set; lastTransitionTime moves only when the
    condition's status changes (Kubernetes API conventions)."""
    value = "True" if status else "False"
    out = list(conditions or [])
    old = get_condition(out, type_)
    new = Condition(
        type=type_,
        status=value,
        reason=reason,
        message=message,
        last_transition_time=old.last_transition_time
        if old is not None and old.status == value
        else rfc3339(now),
        observed_generation=generation,
    )
    if old is None:
        return [*out, new]
    return [new if c.type == type_ else c for c in out]


def get_condition(conditions: Sequence[Condition] | None, type_: str) -> Condition | None:
    return next((c for c in conditions or [] if c.type == type_), None)


def is_true(conditions: Sequence[Condition] | None, type_: str) -> bool:
    cond = get_condition(conditions, type_)
    return cond is not None and cond.status == "True"


def finished(status: JobStatusBase) -> bool:
    return status.phase is not None and status.phase.finished


# --- Observed children --------------------------------------------------------------------------


@dataclass(frozen=True)
class JobState:
    """What matters of a batch/v1 Job."""

    name: str
    component: str
    attempt: int
    suspended: bool
    active: int = 0
    ready: int = 0
    succeeded: int = 0
    complete: bool = False
    failed: bool = False
    failed_reason: str | None = None
    failed_message: str | None = None
    generation: int | None = None  # the job generation it was rendered from, if recorded
    spec_hash: str | None = None  # fingerprint of what was rendered, if recorded (validation)
    started_at: str | None = None  # status.startTime: when the Job (last) started running
    parallelism: int = 1  # pods it runs at once (the gang's workers)


def job_state(body: Mapping[str, Any]) -> JobState:
    meta = body.get("metadata") or {}
    labels = meta.get("labels") or {}
    status = body.get("status") or {}
    complete = failed = False
    reason = message = None
    for cond in status.get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Complete":
            complete = True
        elif cond.get("type") == "Failed":
            failed, reason, message = True, cond.get("reason"), cond.get("message")
    attempt = labels.get(LABEL_ATTEMPT, "0")
    generation = str((meta.get("annotations") or {}).get(ANNOTATION_GENERATION, ""))
    return JobState(
        name=meta.get("name", ""),
        component=labels.get(LABEL_COMPONENT, ""),
        attempt=int(attempt) if str(attempt).isdigit() else 0,
        suspended=bool((body.get("spec") or {}).get("suspend")),
        active=int(status.get("active") or 0),
        ready=int(status.get("ready") or 0),
        succeeded=int(status.get("succeeded") or 0),
        complete=complete,
        failed=failed,
        failed_reason=reason,
        failed_message=message,
        generation=int(generation) if generation.isdigit() else None,
        spec_hash=(meta.get("annotations") or {}).get(ANNOTATION_SPEC_HASH),
        started_at=status.get("startTime"),
        parallelism=int((body.get("spec") or {}).get("parallelism") or 1),
    )


@dataclass(frozen=True)
class Waiting:
    """A container that has not started: the kubelet's reason (ErrImagePull, ImagePullBackOff,
    CreateContainerConfigError...) and message, with the image it runs."""

    container: str
    reason: str
    message: str
    image: str


@dataclass(frozen=True)
class PodState:
    """What the failure diagnosis needs of one pod of a workload Job (policies.diagnosis)."""

    name: str
    index: int | None  # the completion index of an Indexed Job's pod: the worker's node rank
    phase: str
    # The scheduler's message while PodScheduled is False with reason Unschedulable.
    unschedulable: str | None = None
    waiting: tuple[Waiting, ...] = ()
    # "Reason: message" of a DisruptionTarget condition (preemption, eviction, node drain) or of
    # a pod the kubelet evicted (status.reason Evicted).
    disruption: str | None = None
    started: bool = False  # a container of it has run (is running, or ran and ended)
    memory_limits: Mapping[str, str] = field(default_factory=dict)  # container -> limits.memory


def pod_state(pod: Mapping[str, Any]) -> PodState:
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    scheduled = conditions.get("PodScheduled") or {}
    unschedulable = None
    if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        unschedulable = scheduled.get("message") or "no node fits the pod"
    disruption = None
    target = conditions.get("DisruptionTarget") or {}
    if target.get("status") == "True":
        disruption = f"{target.get('reason') or 'DisruptionTarget'}: {target.get('message') or ''}".strip(
            ": "
        )
    elif status.get("reason") == "Evicted":
        disruption = f"Evicted: {status.get('message') or ''}".strip(": ")
    images = {c.get("name"): c.get("image", "") for c in spec.get("containers") or []}
    waiting: list[Waiting] = []
    started = False
    for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        state = cs.get("state") or {}
        if "running" in state or "terminated" in state or (cs.get("lastState") or {}).get("terminated"):
            started = True
        if "waiting" in state:
            wait = state["waiting"] or {}
            name = cs.get("name", "")
            waiting.append(
                Waiting(
                    container=name,
                    reason=wait.get("reason") or "",
                    message=wait.get("message") or "",
                    image=cs.get("image") or images.get(name, ""),
                )
            )
    limits = {
        c.get("name", ""): str(((c.get("resources") or {}).get("limits") or {}).get("memory"))
        for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
        if ((c.get("resources") or {}).get("limits") or {}).get("memory") is not None
    }
    index = str((meta.get("labels") or {}).get("batch.kubernetes.io/job-completion-index", ""))
    return PodState(
        name=meta.get("name", ""),
        index=int(index) if index.isdigit() else None,
        phase=status.get("phase") or "Pending",
        unschedulable=unschedulable,
        waiting=tuple(waiting),
        disruption=disruption,
        started=started,
        memory_limits=limits,
    )


@dataclass(frozen=True)
class DeploymentState:
    name: str
    replicas: int
    ready_replicas: int
    spec_hash: str | None


def deployment_state(body: Mapping[str, Any]) -> DeploymentState:
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    return DeploymentState(
        name=meta.get("name", ""),
        replicas=int((body.get("spec") or {}).get("replicas") or 0),
        ready_replicas=int(status.get("readyReplicas") or 0),
        spec_hash=(meta.get("annotations") or {}).get(ANNOTATION_SPEC_HASH),
    )


MAX_REASON_CHARS: Final = 512


def last_line(message: str) -> str:
    """The last non-empty line of a termination message, shortened to MAX_REASON_CHARS.

    The runtimes write one line; a container that died without writing one falls back to the
    tail of its log (FallbackToLogsOnError), a traceback cut anywhere, whose last line is the
    exception that ended it.
    """
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return ""
    line = lines[-1]
    return line if len(line) <= MAX_REASON_CHARS else line[: MAX_REASON_CHARS - 1] + "…"


@dataclass(frozen=True)
class Termination:
    """A failed container, from its pod's status (its termination message is the runtime's reason)."""

    pod: str
    container: str
    exit_code: int
    reason: str | None
    message: str | None
    finished_at: str | None = None

    def describe(self) -> str:
        where = f"container {self.container} of pod {self.pod} exited with code {self.exit_code}"
        text = last_line(self.message or "")
        return f"{text} ({where})" if text else where


def terminations_of(pods: Sequence[Mapping[str, Any]]) -> list[Termination]:
    """Every container of ``pods`` that ended with a non-zero exit code."""
    found: list[Termination] = []
    for pod in pods:
        status = pod.get("status") or {}
        for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
            state = cs.get("state") or {}
            last = cs.get("lastState") or {}
            term = state.get("terminated") or last.get("terminated")
            if term and int(term.get("exitCode") or 0) != 0:
                found.append(
                    Termination(
                        pod=(pod.get("metadata") or {}).get("name", ""),
                        container=cs.get("name", ""),
                        exit_code=int(term["exitCode"]),
                        reason=term.get("reason"),
                        message=term.get("message"),
                        finished_at=term.get("finishedAt"),
                    )
                )
    return found


@dataclass(frozen=True)
class Upstream:
    """The FineTuneJob a CompressJob compresses (``model.fromFineTuneJob``): ``job`` is None when
    it does not exist, or exists with a spec that does not parse."""

    name: str
    found: bool
    phase: str | None = None
    message: str | None = None
    job: FineTuneJob | None = None


def upstream_from(name: str, body: Mapping[str, Any] | None) -> Upstream:
    if body is None:
        return Upstream(name=name, found=False)
    status = body.get("status") or {}
    try:
        job: FineTuneJob | None = FineTuneJob.model_validate(
            {key: body[key] for key in ("apiVersion", "kind", "metadata", "spec") if key in body}
        )
    except ValidationError:
        job = None
    return Upstream(name=name, found=True, phase=status.get("phase"), message=status.get("message"), job=job)


@dataclass(frozen=True)
class SweepUpstream:
    """The FineTuneSweep a CompressJob compresses the winner of (``model.fromFineTuneSweep``)."""

    name: str
    found: bool
    phase: str | None = None
    message: str | None = None
    best_trial: int | None = None
    model_uri: str | None = None
    """The best trial's model (status.bestTrial.modelUri), once the sweep knows it."""


def sweep_upstream_from(name: str, body: Mapping[str, Any] | None) -> SweepUpstream:
    if body is None:
        return SweepUpstream(name=name, found=False)
    status = body.get("status") or {}
    best = status.get("bestTrial") or {}
    number = best.get("number")
    return SweepUpstream(
        name=name,
        found=True,
        phase=status.get("phase"),
        message=status.get("message"),
        best_trial=number if isinstance(number, int) else None,
        model_uri=best.get("modelUri") or None,
    )


class RunnerAccount(StrEnum):
    """What the operator found of the ServiceAccount named by spec.storage.serviceAccountName."""

    missing = "missing"
    not_allowed = "not-allowed"  # exists without the kubetune.io/runner: "true" label
    allowed = "allowed"


class SecretAccess(StrEnum):
    """What the operator found of a Secret a job takes credentials from (metadata only)."""

    missing = "missing"
    not_allowed = "not-allowed"  # exists without the opt-in label of its use
    allowed = "allowed"


# A Secret's owner opts it in for each use on its own: a Secret of storage keys does not thereby
# send its keys to a tracking server a job names.
LABEL_TRACKING_CREDENTIALS: Final = "kubetune.io/tracking-credentials"


def secret_not_allowed(name: str, field: str, label: str, namespace: str) -> str:
    """What to say of a Secret whose owner has not opted it in for ``label``'s use."""
    return (
        f'Secret {name} ({field}) lacks the label {label}: "true"; whoever owns the Secret in '
        f"namespace {namespace} adds it to let kubetune jobs' pods receive its keys"
    )


def secret_access(metadata: Mapping[str, Any] | None, label: str) -> SecretAccess:
    """Whether a Secret (its metadata; None: it does not exist) is opted in for the use
    ``label`` names: its owner labels it ``label: "true"``."""
    if metadata is None:
        return SecretAccess.missing
    labels = metadata.get("labels") or {}
    return SecretAccess.allowed if labels.get(label) == "true" else SecretAccess.not_allowed


@dataclass
class Observation:
    job: Job
    namespace: str
    settings: Settings
    now: datetime
    status: JobStatusBase
    generation: int | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)
    jobs: Sequence[JobState] = ()
    deployment: DeploymentState | None = None
    terminations: Mapping[str, Termination] = field(default_factory=dict)
    # The pods of the workload Jobs the diagnosis looks at (policies.diagnosis), by Job name.
    pods: Mapping[str, Sequence[PodState]] = field(default_factory=dict)
    # When rank 0 last reported progress (status.progress.updatedAt, a runtime-owned field).
    progress_at: datetime | None = None
    upstream: Upstream | SweepUpstream | None = None
    runner_account: RunnerAccount | None = None
    storage_secret: SecretAccess | None = None
    tracking_secret: SecretAccess | None = None

    @property
    def noun(self) -> str:
        """What the job's workload does, for messages."""
        return "training" if isinstance(self.job, FineTuneJob) else "compression"


def with_condition(
    obs: Observation, status: JobStatusBase, type_: str, ok: bool, reason: str, message: str
) -> JobStatusBase:
    """``status`` with one condition set now, for the generation observed."""
    conditions = set_condition(status.conditions, type_, ok, reason, message, obs.now, obs.generation)
    return status.model_copy(update={"conditions": conditions})


def with_phase(status: JobStatusBase, phase: Phase, message: str) -> JobStatusBase:
    return status.model_copy(update={"phase": phase, "message": message})


def failed(obs: Observation, status: JobStatusBase, reason: str, message: str) -> JobStatusBase:
    """``status`` of a job that failed now for ``reason``."""
    # The runtimes prefix their termination message with the same reason the condition
    # carries ("InvalidInput: ..."); say it once.
    message = message.removeprefix(f"{reason}: ")
    status = with_phase(status, Phase.failed, message)
    status = status.model_copy(update={"completion_time": rfc3339(obs.now)})
    status = with_condition(obs, status, ConditionType.failed, True, reason, message)
    if get_condition(status.conditions, ConditionType.running):
        status = with_condition(obs, status, ConditionType.running, False, reason, message)
    return status


# --- Decisions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChildRef:
    api_version: str
    kind: str
    name: str


@dataclass(frozen=True)
class ChildPatch:
    ref: ChildRef
    body: Any
    json_patch: bool = False


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


def earliest(first: float | None, second: float | None) -> float | None:
    if first is None:
        return second
    return first if second is None else min(first, second)


@dataclass
class Decision:
    """What to do, from one policy or from all of them composed (:meth:`then`)."""

    status: JobStatusBase
    create: list[Manifest] = field(default_factory=list)
    # Of the children in ``create``, those to bring up to date where they exist from another
    # generation of the spec (kubetune.io/generation): the plan ConfigMap until the job starts.
    update: list[ChildRef] = field(default_factory=list)
    patch: list[ChildPatch] = field(default_factory=list)
    delete: list[ChildRef] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    annotations: dict[str, str] = field(default_factory=dict)
    # Seconds after which time alone changes the decision (a deadline or TTL falls due, a
    # ServiceAccount no watch reports may exist): the handlers look again then.
    recheck_after: float | None = None
    # Whether this settles the reconcile: later policies wait for the next event or recheck.
    settled: bool = False

    def then(self, later: Decision) -> Decision:
        """This decision followed by ``later`` (which was decided on this one's status)."""
        return Decision(
            status=later.status,
            create=self.create + later.create,
            update=self.update + later.update,
            patch=self.patch + later.patch,
            delete=self.delete + later.delete,
            events=self.events + later.events,
            annotations={**self.annotations, **later.annotations},
            recheck_after=earliest(self.recheck_after, later.recheck_after),
            settled=later.settled,
        )


def ref_of(manifest: Manifest) -> ChildRef:
    return ChildRef(manifest["apiVersion"], manifest["kind"], manifest["metadata"]["name"])


def spec_hash_of(manifest: Manifest) -> str | None:
    return ((manifest.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_SPEC_HASH)


def owner_signature(
    meta: Mapping[str, Any], status: Mapping[str, Any], annotations: Mapping[str, str]
) -> tuple[Any, ...]:
    """All a job's reconcile can depend on besides its children: two observations with the same
    signature lead to the same decision (the spec is covered by ``metadata.generation``).
    ``status`` is the wire form, as in a watch event."""
    return (
        meta.get("uid"),
        meta.get("generation"),
        meta.get("deletionTimestamp"),
        annotations.get(ANNOTATION_PAUSED),
        annotations.get(ANNOTATION_CLEANED),
        # A sweep's request to stop the job (policies.pruning).
        annotations.get(ANNOTATION_PRUNE),
        annotations.get(ANNOTATION_STOP),
        *(status.get(key) for key in OPERATOR_FIELDS),
    )
