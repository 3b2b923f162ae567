"""The lifecycle of a job as a pure function: what was observed -> what to do and the new status.

Level-based: every decision is derived from the job's spec, its status as last written and the
children that exist now, so running it twice (or after an operator restart) changes nothing.
No I/O here; the handlers gather an :class:`Observation`, call :func:`decide` and carry out the
:class:`Decision`.

Phases: Pending -> [Waiting ->] Validating -> Running -> Succeeded | Failed, plus Suspended.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Final

from kubetune.api import CompressJob, ConditionType, FineTuneJob, Phase
from kubetune.api.spec import MethodType
from kubetune.errors import EXIT_INVALID_INPUT, EXIT_STORAGE
from kubetune.operator.admission import child_problems, disallowed_images, images_message
from kubetune.operator.render import (
    ANNOTATION_GENERATION,
    ANNOTATION_SPEC_HASH,
    LABEL_ATTEMPT,
    LABEL_COMPONENT,
    LABEL_RUNNER,
    LABEL_STORAGE_CREDENTIALS,
    Job,
    Manifest,
    RenderError,
    child_names,
    initially_suspended,
    output_uri,
    render_base,
    render_gang_support,
    render_main_job,
    render_plan,
    render_serving,
    render_validation_job,
    serving_url,
)
from kubetune.operator.settings import Settings
from kubetune.plan import ADAPTER_DIR, LOGS_DIR, METRICS_FILE, MODEL_DIR, REPORT_FILE, finetune_model_uri

ANNOTATION_PAUSED: Final = "kubetune.io/paused-seconds"
ANNOTATION_CLEANED: Final = "kubetune.io/children-deleted"

# Condition reasons (CamelCase, as the API conventions ask).
REASON_INVALID_INPUT: Final = "InvalidInput"
REASON_STORAGE: Final = "StorageError"
REASON_OUTPUT_CONFLICT: Final = "OutputConflict"
REASON_VALIDATION_FAILED: Final = "ValidationFailed"
REASON_DEADLINE: Final = "DeadlineExceeded"
REASON_RESTARTS_EXHAUSTED: Final = "RestartsExhausted"
REASON_UPSTREAM_FAILED: Final = "UpstreamFailed"
REASON_NAME_CONFLICT: Final = "NameConflict"
REASON_INVALID_SPEC: Final = "InvalidSpec"
REASON_ACCOUNT_NOT_ALLOWED: Final = "ServiceAccountNotAllowed"
REASON_SECRET_NOT_ALLOWED: Final = "SecretNotAllowed"
REASON_IMAGE_NOT_ALLOWED: Final = "ImageNotAllowed"
REASON_INVALID_CHILD: Final = "InvalidChild"

# Status fields the operator owns; the runtimes own progress, checkpoints and results.
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
)

_EXIT_CODE_IN_MESSAGE = re.compile(r"exit code (\d+)")


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


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
        text = one_line(self.message or "")
        return f"{text} ({where})" if text else where


MAX_REASON_CHARS = 512


def one_line(message: str) -> str:
    """The line of a termination message that says why, for conditions and Events.

    The runtimes write one line; a container that died without writing one falls back to the
    tail of its log (FallbackToLogsOnError), a traceback cut anywhere, whose last line is the
    exception that ended it.
    """
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return ""
    line = lines[-1]
    return line if len(line) <= MAX_REASON_CHARS else line[: MAX_REASON_CHARS - 1] + "…"


def pick_termination(pods: Sequence[Mapping[str, Any]]) -> Termination | None:
    """The failure that explains a gang's end: an exit code of the contract (2, 3) if any pod had
    one, else the earliest failure (the others usually died because their peer did)."""
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
    if not found:
        return None
    contract = [t for t in found if t.exit_code in (EXIT_INVALID_INPUT, EXIT_STORAGE)]
    return min(contract or found, key=lambda t: (t.finished_at or "", t.pod))


@dataclass(frozen=True)
class Upstream:
    """The FineTuneJob a CompressJob compresses (``model.fromFineTuneJob``)."""

    name: str
    found: bool
    phase: str | None = None
    message: str | None = None
    model_uri: str | None = None
    adapter_only: bool = False


def upstream_from(name: str, body: Mapping[str, Any] | None) -> Upstream:
    if body is None:
        return Upstream(name=name, found=False)
    status = body.get("status") or {}
    spec = body.get("spec") or {}
    method = spec.get("method") or {}
    adapter_only = (
        method.get("type", MethodType.lora.value) == MethodType.lora.value
        and method.get("mergeAdapter") is False
    )
    output = ((spec.get("output") or {}).get("uri") or "").rstrip("/")
    model_uri = (status.get("artifacts") or {}).get("modelUri") or (
        f"{output}/{MODEL_DIR}" if output else None
    )
    return Upstream(
        name=name,
        found=True,
        phase=status.get("phase"),
        message=status.get("message"),
        model_uri=model_uri,
        adapter_only=adapter_only,
    )


# --- Conditions ---------------------------------------------------------------------------------


def set_condition(
    conditions: Sequence[Mapping[str, Any]] | None,
    type_: str,
    status: bool | str,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None = None,
) -> list[dict[str, Any]]:
    """A copy of ``conditions`` with one condition set; lastTransitionTime moves only when the
    condition's status changes (Kubernetes API conventions)."""
    value = status if isinstance(status, str) else ("True" if status else "False")
    out = [dict(c) for c in conditions or []]
    new: dict[str, Any] = {"type": type_, "status": value, "reason": reason, "message": message}
    if generation is not None:
        new["observedGeneration"] = generation
    for i, cond in enumerate(out):
        if cond.get("type") == type_:
            same = cond.get("status") == value
            new["lastTransitionTime"] = cond.get("lastTransitionTime") if same else rfc3339(now)
            out[i] = new
            return out
    new["lastTransitionTime"] = rfc3339(now)
    out.append(new)
    return out


def get_condition(conditions: Sequence[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)


def is_true(conditions: Sequence[Mapping[str, Any]] | None, type_: str) -> bool:
    cond = get_condition(conditions, type_)
    return cond is not None and cond.get("status") == "True"


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


class RunnerAccount(StrEnum):
    """What the operator found of the ServiceAccount named by spec.storage.serviceAccountName."""

    missing = "missing"
    not_allowed = "not-allowed"  # exists without the kubetune.io/runner: "true" label
    allowed = "allowed"


class StorageSecret(StrEnum):
    """What the operator found of the Secret named by spec.storage.secretRef (metadata only)."""

    missing = "missing"
    not_allowed = "not-allowed"  # exists without the kubetune.io/storage-credentials: "true" label
    allowed = "allowed"


@dataclass
class Observation:
    job: Job
    namespace: str
    settings: Settings
    now: datetime
    generation: int | None = None
    status: Mapping[str, Any] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    jobs: Sequence[JobState] = ()
    deployment: DeploymentState | None = None
    terminations: Mapping[str, Termination] = field(default_factory=dict)
    upstream: Upstream | None = None
    runner_account: RunnerAccount | None = None
    storage_secret: StorageSecret | None = None


@dataclass
class Decision:
    status: dict[str, Any]
    create: list[Manifest] = field(default_factory=list)
    # Of the children in ``create``, those to bring up to date where they exist from another
    # generation of the spec (kubetune.io/generation): the plan ConfigMap until the job starts.
    update: list[ChildRef] = field(default_factory=list)
    patch: list[ChildPatch] = field(default_factory=list)
    delete: list[ChildRef] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    annotations: dict[str, str] = field(default_factory=dict)

    def status_patch(self, old: Mapping[str, Any]) -> dict[str, Any]:
        """Merge patch of the operator-owned status fields that changed (empty: nothing to write)."""
        return status_diff(old, self.status)


def status_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    return {key: new.get(key) for key in OPERATOR_FIELDS if old.get(key) != new.get(key)}


def ref_of(manifest: Manifest) -> ChildRef:
    return ChildRef(manifest["apiVersion"], manifest["kind"], manifest["metadata"]["name"])


def jobs_to_diagnose(job: Job, status: Mapping[str, Any], jobs: Sequence[JobState]) -> list[str]:
    """Failed Jobs whose pods the operator must read (exit code, termination message) to decide."""
    if Phase(status["phase"]).finished if status.get("phase") else False:
        return []
    conditions = status.get("conditions")
    attempt = current_attempt(job, status, jobs)
    names = child_names(job)
    wanted = {names.main(attempt)}
    if not is_true(conditions, ConditionType.validated):
        wanted.add(names.validate)
    return sorted(j.name for j in jobs if j.failed and j.name in wanted)


def current_attempt(job: Job, status: Mapping[str, Any], jobs: Sequence[JobState]) -> int:
    main = child_names(job).main_component
    attempts = [j.attempt for j in jobs if j.component == main]
    return max([int(status.get("restarts") or 0), *attempts])


def decide(obs: Observation) -> Decision:
    """The next step of the job's lifecycle."""
    return _Reconciler(obs).run()


class _Reconciler:
    def __init__(self, obs: Observation) -> None:
        self.obs = obs
        self.job = obs.job
        self.spec = obs.job.spec
        self.names = child_names(obs.job)
        self.old = dict(obs.status)
        self.status: dict[str, Any] = copy.deepcopy(dict(obs.status))
        self.decision = Decision(status=self.status)
        self.jobs = {j.name: j for j in obs.jobs}
        self.noun = "training" if isinstance(obs.job, FineTuneJob) else "compression"

    # -- helpers

    def _cond(self, type_: str, status: bool, reason: str, message: str) -> None:
        self.status["conditions"] = set_condition(
            self.status.get("conditions"), type_, status, reason, message, self.obs.now, self.obs.generation
        )

    def _event(self, type_: str, reason: str, message: str) -> None:
        self.decision.events.append(Event(type_, reason, message))

    def _phase(self, phase: Phase, message: str) -> None:
        self.status["phase"] = phase.value
        self.status["message"] = message

    def _started(self) -> None:
        if not self.status.get("startTime"):
            self.status["startTime"] = rfc3339(self.obs.now)

    def fail(self, reason: str, message: str) -> None:
        # The runtimes prefix their termination message with the same reason the condition
        # carries ("InvalidInput: ..."); say it once.
        message = message.removeprefix(f"{reason}: ")
        self._phase(Phase.failed, message)
        self.status["completionTime"] = rfc3339(self.obs.now)
        self._cond(ConditionType.failed, True, reason, message)
        if get_condition(self.status.get("conditions"), ConditionType.running):
            self._cond(ConditionType.running, False, reason, message)

    def succeed(self) -> None:
        message = f"{self.noun} finished"
        self._phase(Phase.succeeded, message)
        self.status["completionTime"] = rfc3339(self.obs.now)
        self.status["artifacts"] = artifacts(self.job)
        self._cond(ConditionType.complete, True, "Succeeded", message)
        self._cond(ConditionType.running, False, "Succeeded", message)

    # -- the lifecycle

    def run(self) -> Decision:
        self.status["observedGeneration"] = self.obs.generation
        self.status.setdefault("restarts", 0)
        if not self.status.get("phase"):
            self._phase(Phase.pending, "accepted")
        if not Phase(self.status["phase"]).finished:
            self._reconcile_active()
        if Phase(self.status["phase"]).finished:
            self._reconcile_finished()
        self._transition_events()
        return self.decision

    def _reconcile_active(self) -> None:
        model_uri = self._resolve_model()
        if model_uri is None:
            return
        try:
            plan = render_plan(self.job, self.obs.settings, self.obs.namespace, model_uri)
        except (RenderError, ValueError) as exc:
            self.fail(REASON_INVALID_SPEC, str(exc))
            return
        if (
            self._deadline_passed()
            or not self._spec_acceptable()
            or not self._runner_account_usable()
            or not self._storage_secret_usable()
        ):
            return
        follows = self._plan_follows_spec()
        base = render_base(self.job, plan, self.obs.namespace)
        self.decision.create += base
        if follows:
            # Until the job starts its spec may change: the plan follows it (ANNOTATION_GENERATION).
            self.decision.update += [ref_of(m) for m in base if m["kind"] == "ConfigMap"]
        if not is_true(self.status.get("conditions"), ConditionType.validated):
            validation = self.jobs.get(self.names.validate)
            wanted = render_validation_job(self.job, self.obs.settings, plan, self.obs.namespace)
            if validation is not None and follows and validation.spec_hash != spec_hash_of(wanted):
                # Its pod template is immutable: replace it; the next reconcile (its deletion's
                # watch event) creates it from the current spec, which the plan already is.
                # (Resuming alone changes nothing rendered: _step unsuspends it in place.)
                self.decision.delete.append(ChildRef("batch/v1", "Job", validation.name))
                self.status["activeJob"] = validation.name
                self._event(
                    "Normal",
                    "SpecChanged",
                    f"the spec changed before the job started (generation {self.obs.generation}): "
                    "the plan was updated and the validation Job is recreated",
                )
                self._step(
                    Phase.validating, "validating model and data", suspended=initially_suspended(self.job)
                )
                return
            if validation is None:
                self.decision.create.append(wanted)
                self.status["activeJob"] = self.names.validate
                self._step(
                    Phase.validating, "validating model and data", suspended=initially_suspended(self.job)
                )
                return
            if validation.failed:
                self._validation_failed(validation)
                return
            if not validation.complete:
                self.status["activeJob"] = validation.name
                self._step(Phase.validating, "validating model and data", job=validation)
                return
            self._cond(
                ConditionType.validated, True, "Validated", "model and data are readable and well-formed"
            )
            self._event("Normal", "Validated", "model and data are readable and well-formed")
        self._reconcile_main(plan)

    def _plan_follows_spec(self) -> bool:
        """Whether the plan and the validation Job still follow spec edits: until the job starts
        (no startTime, and the validation Job absent or still suspended, e.g. by spec.suspend or
        waiting for Kueue). Afterwards the training fields are immutable (the CRD's rule)."""
        if self.old.get("startTime"):
            return False
        validation = self.jobs.get(self.names.validate)
        return validation is None or validation.suspended

    def _spec_acceptable(self) -> bool:
        """What the API server would refuse in the children's pod templates (checked before the
        job starts; later edits the server itself refuses, see InvalidChild), and images outside
        the operator's allowed prefixes."""
        if not self.old.get("startTime"):
            problems = child_problems(self.job)
            if problems:
                self.fail(REASON_INVALID_SPEC, "; ".join(problems))
                return False
        images = disallowed_images(self.job, self.obs.settings)
        if images:
            self.fail(REASON_IMAGE_NOT_ALLOWED, images_message(images, self.obs.settings))
            return False
        return True

    def _storage_secret_usable(self) -> bool:
        """A Secret may supply storage credentials once it exists and is labelled for it."""
        ref = self.spec.storage.secret_ref
        if ref is None or self.obs.storage_secret == StorageSecret.allowed:
            return True
        if self.obs.storage_secret == StorageSecret.not_allowed:
            self.fail(
                REASON_SECRET_NOT_ALLOWED,
                f"Secret {ref.name} (spec.storage.secretRef) lacks the label "
                f'{LABEL_STORAGE_CREDENTIALS}: "true"; whoever owns the Secret in namespace '
                f"{self.obs.namespace} adds it to let kubetune jobs' pods receive its keys",
            )
        else:
            self._phase(Phase.waiting, f"waiting for Secret {ref.name} (spec.storage.secretRef) to exist")
        return False

    def _runner_account_usable(self) -> bool:
        """A ServiceAccount of the user's may be run as once it exists and is labelled for it."""
        name = self.spec.storage.service_account_name
        if not name or self.obs.runner_account == RunnerAccount.allowed:
            return True
        if self.obs.runner_account == RunnerAccount.not_allowed:
            self.fail(
                REASON_ACCOUNT_NOT_ALLOWED,
                f"ServiceAccount {name} (spec.storage.serviceAccountName) lacks the label "
                f'{LABEL_RUNNER}: "true"; whoever manages identities in namespace {self.obs.namespace} '
                "adds it to let kubetune jobs run as it",
            )
        else:
            self._phase(
                Phase.waiting,
                f"waiting for ServiceAccount {name} (spec.storage.serviceAccountName) to exist",
            )
        return False

    def _resolve_model(self) -> str | None:
        """The model to work on; None while a CompressJob waits for its FineTuneJob (or failed)."""
        if isinstance(self.job, FineTuneJob):
            return str(self.job.spec.model.uri)
        if self.status.get("sourceModelUri"):
            return str(self.status["sourceModelUri"])
        if self.job.spec.model.uri:
            self.status["sourceModelUri"] = str(self.job.spec.model.uri)
            return str(self.job.spec.model.uri)
        upstream = self.obs.upstream
        name = self.job.spec.model.from_fine_tune_job
        if upstream is None or not upstream.found:
            self._phase(Phase.waiting, f"waiting for FineTuneJob {name} to exist")
            return None
        if upstream.phase == Phase.failed.value:
            why = f": {upstream.message}" if upstream.message else ""
            self.fail(REASON_UPSTREAM_FAILED, f"FineTuneJob {name} failed{why}")
            return None
        if upstream.phase != Phase.succeeded.value:
            self._phase(Phase.waiting, f"waiting for FineTuneJob {name} to succeed")
            return None
        if upstream.adapter_only or not upstream.model_uri:
            self.fail(
                REASON_INVALID_INPUT,
                f"FineTuneJob {name} wrote only a LoRA adapter (method.mergeAdapter: false); compression "
                "needs a full model: set mergeAdapter to true there, or set model.uri here",
            )
            return None
        self.status["sourceModelUri"] = upstream.model_uri
        return upstream.model_uri

    def _validation_failed(self, validation: JobState) -> None:
        term = self.obs.terminations.get(validation.name)
        reason = failure_reason(term, validation) or REASON_VALIDATION_FAILED
        message = term.describe() if term else (validation.failed_message or "the validation Job failed")
        message = message.removeprefix(f"{reason}: ")
        self._cond(ConditionType.validated, False, reason, message)
        self.fail(reason, message)

    def _reconcile_main(self, plan: Any) -> None:
        attempt = current_attempt(self.job, self.status, self.obs.jobs)
        name = self.names.main(attempt)
        main_component = self.names.main_component
        for stale in self.obs.jobs:
            if stale.component == main_component and stale.attempt < attempt:
                self.decision.delete.append(ChildRef("batch/v1", "Job", stale.name))
        current = self.jobs.get(name)
        self.status["restarts"] = attempt
        self.status["activeJob"] = name
        if current is not None and current.complete:
            self.succeed()
            return
        self.decision.create += render_gang_support(self.job, self.obs.namespace)
        if current is None:
            self.decision.create.append(
                render_main_job(self.job, self.obs.settings, plan, self.obs.namespace, attempt)
            )
            self._step(Phase.running, f"{self.noun} started", suspended=initially_suspended(self.job))
            return
        if current.failed:
            self._main_failed(current, plan)
            return
        workers = plan.world.workers
        self._step(Phase.running, f"{self.noun}: {current.ready}/{workers} workers ready", job=current)

    def _main_failed(self, current: JobState, plan: Any) -> None:
        term = self.obs.terminations.get(current.name)
        reason = failure_reason(term, current)
        detail = term.describe() if term else (current.failed_message or f"Job {current.name} failed")
        if reason is not None:
            self.fail(reason, detail)
            return
        restarts = int(self.status.get("restarts") or 0)
        if restarts >= self.spec.max_restarts:
            self.fail(
                REASON_RESTARTS_EXHAUSTED,
                f"{self.noun} failed {restarts + 1} times (maxRestarts {self.spec.max_restarts}); last: {detail}",
            )
            return
        attempt = current.attempt + 1
        replacement = render_main_job(self.job, self.obs.settings, plan, self.obs.namespace, attempt)
        # Create the replacement before deleting the failed Job: an operator that dies in between
        # still finds the newer attempt and never goes back to the old one.
        self.decision.create.append(replacement)
        self.decision.delete.append(ChildRef("batch/v1", "Job", current.name))
        self.status["restarts"] = attempt
        self.status["activeJob"] = replacement["metadata"]["name"]
        message = (
            f"attempt {current.attempt} failed ({detail}); restart {attempt} of {self.spec.max_restarts} "
            "resumes from the newest checkpoint"
        )
        self._event("Warning", "Restarting", message)
        self._step(
            Phase.running,
            f"{self.noun} restarted (restart {attempt})",
            suspended=initially_suspended(self.job),
        )

    def _step(
        self, phase: Phase, message: str, *, job: JobState | None = None, suspended: bool | None = None
    ) -> None:
        """Phase bookkeeping for a step whose Job exists (``job``) or is being created."""
        is_suspended = job.suspended if job is not None else bool(suspended)
        queue = self.spec.queue_name
        if job is not None and self.spec.suspend and not job.suspended:
            self.decision.patch.append(
                ChildPatch(ChildRef("batch/v1", "Job", job.name), {"spec": {"suspend": True}})
            )
            is_suspended = True
        elif job is not None and not self.spec.suspend and job.suspended and queue is None:
            self.decision.patch.append(
                ChildPatch(ChildRef("batch/v1", "Job", job.name), {"spec": {"suspend": False}})
            )
            is_suspended = False
        if self.spec.suspend:
            self._suspend("Suspended", "spec.suspend is true; resuming continues from the last checkpoint")
        elif is_suspended and queue is not None:
            note = f"waiting for admission by Kueue LocalQueue {queue}"
            if self.status.get("startTime"):
                self._suspend("Queued", note)
            else:
                self._phase(Phase.pending, note)
                self._set_suspended_condition(True, "Queued", note)
        else:
            self._resume()
            self._started()
            self._phase(phase, message)
            if phase == Phase.running:
                self._cond(ConditionType.running, True, "Running", message)

    def _set_suspended_condition(self, suspended: bool, reason: str, message: str) -> None:
        current = get_condition(self.status.get("conditions"), ConditionType.suspended)
        if current is None and not suspended:
            return
        self._cond(ConditionType.suspended, suspended, reason, message)

    def _suspend(self, reason: str, message: str) -> None:
        self._phase(Phase.suspended, message)
        self._set_suspended_condition(True, reason, message)
        if get_condition(self.status.get("conditions"), ConditionType.running):
            self._cond(ConditionType.running, False, "Suspended", message)

    def _resume(self) -> None:
        """Leaving suspension: add the paused time to the deadline clock's allowance."""
        cond = get_condition(self.status.get("conditions"), ConditionType.suspended)
        if cond is None or cond.get("status") != "True":
            return
        since = parse_time(cond.get("lastTransitionTime"))
        started = parse_time(self.status.get("startTime"))
        if since is not None and started is not None and started <= since:
            paused = paused_seconds(self.obs.annotations) + (self.obs.now - since).total_seconds()
            self.decision.annotations[ANNOTATION_PAUSED] = str(int(paused))
        self._set_suspended_condition(False, "Resumed", "resumed")

    def _deadline_passed(self) -> bool:
        deadline = self.spec.active_deadline_seconds
        if deadline is None:
            return False
        active = active_seconds(self.status, self.obs.annotations, self.obs.now)
        if active is None or active < deadline:
            return False
        for state in self.obs.jobs:
            if not state.complete and not state.failed:
                self.decision.delete.append(ChildRef("batch/v1", "Job", state.name))
        self.fail(REASON_DEADLINE, f"ran {int(active)}s, longer than activeDeadlineSeconds {deadline}")
        return True

    def _reconcile_finished(self) -> None:
        if self.status["phase"] == Phase.succeeded.value:
            self._reconcile_serving()
        ttl = self.spec.ttl_seconds_after_finished
        finished_at = parse_time(self.status.get("completionTime"))
        if ttl is None or finished_at is None or self.obs.annotations.get(ANNOTATION_CLEANED) == "true":
            return
        if self.obs.now < finished_at + timedelta(seconds=ttl):
            return
        self.decision.delete += workload_refs(self.job, self.obs.jobs)
        self.decision.annotations[ANNOTATION_CLEANED] = "true"
        self._event(
            "Normal", "ChildrenDeleted", f"ttlSecondsAfterFinished ({ttl}s) passed; artifacts are kept"
        )

    def _reconcile_serving(self) -> None:
        serve = self.spec.serve
        dep = self.obs.deployment
        if not serve.enabled:
            if dep is not None or self.status.get("serving"):
                self.decision.delete += [
                    ChildRef("apps/v1", "Deployment", self.names.serve),
                    ChildRef("v1", "Service", self.names.serve),
                ]
                self.status["serving"] = None
                self._cond(ConditionType.serving_ready, False, "Disabled", "spec.serve.enabled is false")
            return
        images = disallowed_images(self.job, self.obs.settings, serving_only=True)
        if images:
            message = images_message(images, self.obs.settings)
            old = get_condition(self.old.get("conditions"), ConditionType.serving_ready) or {}
            self._cond(ConditionType.serving_ready, False, REASON_IMAGE_NOT_ALLOWED, message)
            if old.get("reason") != REASON_IMAGE_NOT_ALLOWED:
                self._event("Warning", REASON_IMAGE_NOT_ALLOWED, message)
            return
        deployment, service = render_serving(self.job, self.obs.settings, self.obs.namespace)
        self.decision.create.append(service)
        if dep is None:
            self.decision.create.append(deployment)
        elif dep.spec_hash != deployment["metadata"]["annotations"][ANNOTATION_SPEC_HASH]:
            self.decision.patch.append(
                ChildPatch(ref_of(deployment), deployment_update(deployment), json_patch=True)
            )
            self._event("Normal", "ServingUpdated", "spec.serve changed; the serving Deployment was updated")
        ready_replicas = dep.ready_replicas if dep is not None else 0
        ready = ready_replicas >= 1
        url = serving_url(self.job, self.obs.namespace)
        self.status["serving"] = {
            "deployment": self.names.serve,
            "service": self.names.serve,
            "url": url,
            "ready": ready,
            "readyReplicas": ready_replicas,
        }
        was_ready = is_true(self.old.get("conditions"), ConditionType.serving_ready)
        if ready:
            self._cond(
                ConditionType.serving_ready, True, "Ready", f"{ready_replicas} replica(s) ready at {url}"
            )
            if not was_ready:
                self._event("Normal", "ServingReady", f"serving at {url}")
        else:
            why = (
                "no replicas requested" if serve.replicas == 0 else "waiting for a replica to load the model"
            )
            self._cond(ConditionType.serving_ready, False, "NotReady", why)

    def _transition_events(self) -> None:
        old, new = self.old.get("phase"), self.status.get("phase")
        if old == new:
            return
        message = str(self.status.get("message") or "")
        if new == Phase.failed.value:
            cond = get_condition(self.status.get("conditions"), ConditionType.failed) or {}
            self._event("Warning", str(cond.get("reason") or "Failed"), message)
        else:
            self._event("Normal", str(new), message)


def failure_reason(term: Termination | None, state: JobState) -> str | None:
    """InvalidInput/StorageError for the non-retriable exit codes of the runtimes, else None."""
    code = term.exit_code if term is not None else None
    if code is None and state.failed_reason == "PodFailurePolicy":
        match = _EXIT_CODE_IN_MESSAGE.search(state.failed_message or "")
        code = int(match.group(1)) if match else EXIT_INVALID_INPUT
    if code == EXIT_INVALID_INPUT:
        # The runtimes prefix their message with the error's reason (kubetune.ownership's
        # OutputConflictError: the output prefix belongs to, or overlaps, another job).
        if term is not None and (term.message or "").startswith(f"{REASON_OUTPUT_CONFLICT}:"):
            return REASON_OUTPUT_CONFLICT
        return REASON_INVALID_INPUT
    if code == EXIT_STORAGE:
        return REASON_STORAGE
    return None


def artifacts(job: Job) -> dict[str, str]:
    if isinstance(job, CompressJob):
        return {"modelUri": output_uri(job, MODEL_DIR), "reportUri": output_uri(job, REPORT_FILE)}
    out: dict[str, str] = {}
    method = job.spec.method
    if method.type == MethodType.full or method.merges:
        out["modelUri"] = finetune_model_uri(job)
    if method.type == MethodType.lora:
        out["adapterUri"] = output_uri(job, ADAPTER_DIR)
    out["metricsUri"] = output_uri(job, METRICS_FILE)
    out["logsUri"] = output_uri(job, LOGS_DIR)
    return out


def spec_hash_of(manifest: Manifest) -> str | None:
    return ((manifest.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_SPEC_HASH)


def deployment_update(deployment: Manifest) -> list[dict[str, Any]]:
    """A JSON patch replacing the Deployment's replicas and pod template wholesale: a merge patch
    would keep fields the new template no longer has (e.g. vLLM's init container)."""
    return [
        {
            "op": "add",
            "path": "/metadata/annotations/" + ANNOTATION_SPEC_HASH.replace("~", "~0").replace("/", "~1"),
            "value": deployment["metadata"]["annotations"][ANNOTATION_SPEC_HASH],
        },
        {"op": "replace", "path": "/spec/replicas", "value": deployment["spec"]["replicas"]},
        {"op": "replace", "path": "/spec/template", "value": deployment["spec"]["template"]},
    ]


def workload_refs(job: Job, jobs: Sequence[JobState]) -> list[ChildRef]:
    """Children that only the run needs (serving objects stay while the job exists)."""
    names = child_names(job)
    refs = [ChildRef("batch/v1", "Job", j.name) for j in jobs]
    if names.validate not in {j.name for j in jobs}:
        refs.append(ChildRef("batch/v1", "Job", names.validate))
    return [
        *refs,
        ChildRef("v1", "ConfigMap", names.plan),
        ChildRef("v1", "Service", names.workers),
        ChildRef("rbac.authorization.k8s.io/v1", "RoleBinding", names.runner),
        ChildRef("rbac.authorization.k8s.io/v1", "Role", names.runner),
        # Never the user's own ServiceAccount (spec.storage.serviceAccountName).
        *([] if job.spec.storage.service_account_name else [ChildRef("v1", "ServiceAccount", names.runner)]),
    ]


def paused_seconds(annotations: Mapping[str, str]) -> float:
    try:
        return float(annotations.get(ANNOTATION_PAUSED) or 0)
    except ValueError:
        return 0.0


def active_seconds(status: Mapping[str, Any], annotations: Mapping[str, str], now: datetime) -> float | None:
    """Seconds the job has been running: since startTime, less the time spent suspended."""
    started = parse_time(status.get("startTime"))
    if started is None:
        return None
    active = (now - started).total_seconds() - paused_seconds(annotations)
    cond = get_condition(status.get("conditions"), ConditionType.suspended)
    if cond is not None and cond.get("status") == "True":
        since = parse_time(cond.get("lastTransitionTime"))
        if since is not None and since >= started:
            active -= (now - since).total_seconds()
    return active


def owner_signature(
    meta: Mapping[str, Any], status: Mapping[str, Any], annotations: Mapping[str, str]
) -> tuple[Any, ...]:
    """All a job's reconcile can depend on besides its children: two observations with the same
    signature lead to the same decision (the spec is covered by ``metadata.generation``)."""
    return (
        meta.get("uid"),
        meta.get("generation"),
        meta.get("deletionTimestamp"),
        annotations.get(ANNOTATION_PAUSED),
        annotations.get(ANNOTATION_CLEANED),
        *(status.get(key) for key in OPERATOR_FIELDS),
    )


def needs_clock(spec: Mapping[str, Any], status: Mapping[str, Any], annotations: Mapping[str, str]) -> bool:
    """Whether time alone can change the job: a running deadline, or a pending TTL."""
    phase = status.get("phase")
    finished = phase in (Phase.succeeded.value, Phase.failed.value)
    if not finished:
        return spec.get("activeDeadlineSeconds") is not None and bool(status.get("startTime"))
    return spec.get("ttlSecondsAfterFinished") is not None and annotations.get(ANNOTATION_CLEANED) != "true"


def conflict_failure(obs: Observation, decided: Decision, message: str) -> Decision:
    """A child's name is taken by an object the job does not own."""
    return child_failure(obs, decided, REASON_NAME_CONFLICT, message)


def child_failure(obs: Observation, decided: Decision, reason: str, message: str) -> Decision:
    """A child could not be created or updated, and never will be as the spec stands (its name is
    taken: NameConflict; the API server rejected it: InvalidChild): the job fails, or, once it
    has succeeded (possibly in ``decided`` itself), only its serving does. Nothing more is done."""
    reconciler = _Reconciler(obs)
    reconciler.status = copy.deepcopy(decided.status)
    reconciler.decision = Decision(status=reconciler.status, annotations=dict(decided.annotations))
    if reconciler.status.get("phase") == Phase.succeeded.value:
        reconciler._cond(ConditionType.serving_ready, False, reason, message)
        reconciler._event("Warning", reason, message)
    else:
        reconciler.fail(reason, message)
    reconciler._transition_events()
    return reconciler.decision


def invalid_spec_status(
    status: Mapping[str, Any], message: str, now: datetime, generation: int | None
) -> dict[str, Any]:
    out = copy.deepcopy(dict(status))
    out["phase"] = Phase.failed.value
    out["message"] = message
    out["observedGeneration"] = generation
    out["completionTime"] = out.get("completionTime") or rfc3339(now)
    out["conditions"] = set_condition(
        out.get("conditions"), ConditionType.failed, True, REASON_INVALID_SPEC, message, now, generation
    )
    return out
