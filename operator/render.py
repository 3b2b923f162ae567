"""Pure rendering of the children of a FineTuneJob or CompressJob.

``spec + settings -> manifests``: plain dicts, no I/O, importing neither kopf nor a Kubernetes
client nor boto3. The operator applies what these functions return; ``kubetune render`` prints
it; the unit tests compare it whole.

Children of a job named N (CompressJob children carry ``-compress`` so that a FineTuneJob and a
CompressJob of the same name never collide)::

    ConfigMap       N-plan                run plan JSON, mounted at /etc/kubetune/plan.json
    Service         N-workers             headless; pod i of attempt k is N-train-rk-i.N-workers
    ServiceAccount  N-runner              + Role/RoleBinding N-runner: get/patch N's status only
    Job             N-validate            one CPU pod: `python -m kubetune.trainer validate`
    Job             N-train-r<k>          the gang, attempt k (a replacement gets a new name)
    Deployment      N-serve               + Service N-serve, once the job has succeeded

and of a FineTuneSweep S with MLflow tracking, once it has ended (its trials are rendered by
kubetune.operator.sweep)::

    Job             S-summary             `python -m kubetune.trainer sweep-summary`
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Final

from kubetune.api import API_VERSION, CompressJob, FineTuneJob
from kubetune.api.spec import MlflowTracking, SecretKeyNames, ServeRuntime
from kubetune.api.sweep import FineTuneSweep
from kubetune.operator.settings import Settings
from kubetune.run import workloads
from kubetune.run.artifacts import ADAPTER_DIR, MODEL_DIR, ServedModel
from kubetune.run.plan import RunPlan, dumps_plan, plan_compress, plan_finetune, storage_plan
from kubetune.run.sweep_summary import ENV_SWEEP_SUMMARY, RUNTIME_SWEEP_SUMMARY, SweepSummaryPlan
from kubetune.run.workloads import (
    ENV_ATTEMPT,
    ENV_DS_ACCELERATOR,
    ENV_SCRATCH_DIR,
    ENV_SERVE_API_KEY,
    MASTER_PORT,
    NON_RETRIABLE_EXIT_CODES,
    PROGRESS_TO_STATUS_AND_LOG,
    SERVE_PORT,
    TERMINATION_LOG,
    Env,
    Rendezvous,
    Workload,
)

Job = FineTuneJob | CompressJob
Manifest = dict[str, Any]

LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
MANAGER: Final = "kubetune"
LABEL_JOB: Final = "kubetune.io/job-name"
LABEL_KIND: Final = "kubetune.io/kind"
LABEL_COMPONENT: Final = "kubetune.io/component"
LABEL_ATTEMPT: Final = "kubetune.io/attempt"
LABEL_QUEUE: Final = "kueue.x-k8s.io/queue-name"
# On a FineTuneSweep's children (its trials, its serving, its summary Job): the sweep's name.
LABEL_SWEEP: Final = "kubetune.io/sweep"
# On a ServiceAccount: jobs may run as it (spec.storage.serviceAccountName). An opt-in by whoever
# manages the namespace's identities, since a job's pods run code the job's author chooses.
LABEL_RUNNER: Final = "kubetune.io/runner"
# On a Secret: jobs may use it for storage credentials (spec.storage.secretRef), an opt-in by
# whoever owns the Secret, since a job's pods receive its values. The operator reads only the
# Secret's metadata to check it.
LABEL_STORAGE_CREDENTIALS: Final = "kubetune.io/storage-credentials"
ANNOTATION_SPEC_HASH: Final = "kubetune.io/spec-hash"
# On the plan ConfigMap and the validation Job: the job's metadata.generation they were rendered
# from. Until the job starts, the operator brings them up to date when the spec changes (the
# validation Job when its kubetune.io/spec-hash changes).
ANNOTATION_GENERATION: Final = "kubetune.io/generation"
GPU_RESOURCE: Final = "nvidia.com/gpu"

COMPONENT_PLAN: Final = "plan"
COMPONENT_WORKERS: Final = "workers"
COMPONENT_RUNNER: Final = "runner"
COMPONENT_VALIDATE: Final = workloads.VALIDATE
COMPONENT_TRAIN: Final = workloads.TRAIN
COMPONENT_COMPRESS: Final = workloads.COMPRESS
COMPONENT_SERVE: Final = workloads.SERVE
COMPONENT_SWEEP_SUMMARY: Final = "sweep-summary"

PLAN_DIR: Final = "/etc/kubetune"
PLAN_KEY: Final = "plan.json"
PLAN_PATH: Final = f"{PLAN_DIR}/{PLAN_KEY}"
SCRATCH_DIR: Final = "/scratch"
MODELS_DIR: Final = "/models"
# An Indexed Job's pod learns its index (the gang's node rank) from this variable.
NODE_RANK_OF_INDEXED_POD: Final = "$(JOB_COMPLETION_INDEX)"

CONTAINER_SECURITY_CONTEXT: Final[Manifest] = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}


class RenderError(ValueError):
    """The job cannot be rendered as given (e.g. a CompressJob whose model is not resolved)."""


@dataclass(frozen=True)
class ChildNames:
    """Deterministic names of a job's children."""

    kind: str
    job: str

    @property
    def _base(self) -> str:
        return self.job if self.kind == "FineTuneJob" else f"{self.job}-compress"

    @property
    def plan(self) -> str:
        return f"{self._base}-plan"

    @property
    def workers(self) -> str:
        return f"{self._base}-workers"

    @property
    def runner(self) -> str:
        return f"{self._base}-runner"

    @property
    def validate(self) -> str:
        return f"{self._base}-validate"

    @property
    def serve(self) -> str:
        return f"{self._base}-serve"

    @property
    def main_component(self) -> str:
        return COMPONENT_TRAIN if self.kind == "FineTuneJob" else COMPONENT_COMPRESS

    def main(self, attempt: int) -> str:
        """The gang Job of one attempt; a replacement after a retriable failure gets attempt + 1."""
        if self.kind == "FineTuneJob":
            return f"{self.job}-train-r{attempt}"
        return f"{self.job}-compress-r{attempt}"


def child_names(job: Job) -> ChildNames:
    return ChildNames(type(job).kind_name, job_name(job))


def job_name(job: Job) -> str:
    if not job.metadata.name:
        raise RenderError(f"{type(job).kind_name} has no metadata.name")
    return job.metadata.name


def job_namespace(job: Job, namespace: str | None = None) -> str:
    return job.metadata.namespace or namespace or "default"


def labels(job: Job, component: str, **extra: str) -> dict[str, str]:
    return {
        LABEL_MANAGED_BY: MANAGER,
        LABEL_JOB: job_name(job),
        LABEL_KIND: type(job).kind_name,
        LABEL_COMPONENT: component,
        **extra,
    }


def selector(job: Job, component: str) -> dict[str, str]:
    return {LABEL_JOB: job_name(job), LABEL_KIND: type(job).kind_name, LABEL_COMPONENT: component}


def owner_reference(job: Job) -> Manifest:
    """The controller reference that makes deleting the job garbage-collect the child."""
    return {
        "apiVersion": API_VERSION,
        "kind": type(job).kind_name,
        "name": job_name(job),
        "uid": job.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(job: Job, name: str, namespace: str, component: str, **extra_labels: str) -> Manifest:
    meta: Manifest = {"name": name, "namespace": namespace, "labels": labels(job, component, **extra_labels)}
    # Without a uid (``kubetune render`` of a file) there is nothing to own the child yet.
    if job.metadata.uid:
        meta["ownerReferences"] = [owner_reference(job)]
    return meta


# --- The run plan -------------------------------------------------------------------------------


def render_plan(job: Job, settings: Settings, namespace: str, model_uri: str | None = None) -> RunPlan:
    """The run plan; a CompressJob needs ``model_uri`` (its URI, or its upstream job's model)."""
    ns = job_namespace(job, namespace)
    if isinstance(job, FineTuneJob):
        return plan_finetune(job, namespace=ns, default_endpoint=settings.storage_endpoint)
    resolved = model_uri or job.spec.model.uri
    if resolved is None:
        model = job.spec.model
        upstream = (
            f"model.fromFineTuneSweep {model.from_fine_tune_sweep!r}"
            if model.from_fine_tune_sweep
            else f"model.fromFineTuneJob {model.from_fine_tune_job!r}"
        )
        raise RenderError(f"CompressJob {job_name(job)}: {upstream} is not resolved to a model URI yet")
    return plan_compress(job, model_uri=resolved, namespace=ns, default_endpoint=settings.storage_endpoint)


def _generation_annotations(job: Job) -> dict[str, str]:
    generation = job.metadata.generation
    return {ANNOTATION_GENERATION: str(generation)} if generation is not None else {}


def rendered_generation(manifest: Manifest) -> str | None:
    """The job generation a child was rendered from (None: unknown, e.g. an older operator's)."""
    annotations = (manifest.get("metadata") or {}).get("annotations") or {}
    value = annotations.get(ANNOTATION_GENERATION)
    return str(value) if value is not None else None


def render_plan_configmap(job: Job, plan: RunPlan, namespace: str) -> Manifest:
    names = child_names(job)
    meta = _metadata(job, names.plan, namespace, COMPONENT_PLAN)
    if annotations := _generation_annotations(job):
        meta["annotations"] = annotations
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta,
        "data": {PLAN_KEY: dumps_plan(plan)},
    }


# --- Rendezvous and identity --------------------------------------------------------------------


def render_workers_service(job: Job, namespace: str) -> Manifest:
    """Headless Service that gives gang pods stable DNS names (the Job's subdomain). Not-ready
    addresses are published because torchrun resolves the master before any pod is ready."""
    names = child_names(job)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, names.workers, namespace, COMPONENT_WORKERS),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector(job, names.main_component),
            "ports": [{"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT}],
        },
    }


def runner_account_name(job: Job) -> str:
    """The ServiceAccount the job's pods run as: the user's (workload identity) or NAME-runner."""
    return job.spec.storage.service_account_name or child_names(job).runner


def render_runner_account(job: Job, namespace: str) -> Manifest:
    """The pods' ServiceAccount (no token mounted unless a pod needs one; see the gang's pods)."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(job, child_names(job).runner, namespace, COMPONENT_RUNNER),
        "automountServiceAccountToken": False,
    }


def render_status_access(job: Job, namespace: str) -> list[Manifest]:
    """Role + RoleBinding: the runner may get and patch this one job's status, nothing else."""
    names = child_names(job)
    plural = type(job).plural
    return [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _metadata(job, names.runner, namespace, COMPONENT_RUNNER),
            "rules": [
                {
                    "apiGroups": [API_VERSION.split("/")[0]],
                    "resources": [f"{plural}/status"],
                    "resourceNames": [job_name(job)],
                    "verbs": ["get", "patch"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _metadata(job, names.runner, namespace, COMPONENT_RUNNER),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": names.runner},
            "subjects": [
                {"kind": "ServiceAccount", "name": runner_account_name(job), "namespace": namespace}
            ],
        },
    ]


def render_base(job: Job, plan: RunPlan, namespace: str) -> list[Manifest]:
    """Children every step needs, validation included: the plan and the pods' ServiceAccount
    (unless the job runs as one of the user's, spec.storage.serviceAccountName)."""
    if job.spec.storage.service_account_name:
        return [render_plan_configmap(job, plan, namespace)]
    return [render_plan_configmap(job, plan, namespace), render_runner_account(job, namespace)]


def render_gang_support(job: Job, namespace: str) -> list[Manifest]:
    """What only the training (or compression) gang uses: its rendezvous Service and the right to
    report status. Created with the gang's Job, so a job that fails validation never had them."""
    return [render_workers_service(job, namespace), *render_status_access(job, namespace)]


# --- Pods ---------------------------------------------------------------------------------------


def _pod_security_context(settings: Settings) -> Manifest:
    uid = settings.run_as_user
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _scratch_env() -> list[Manifest]:
    # The root filesystem is read-only: every cache and temporary file goes to the scratch volume.
    return [
        {"name": ENV_SCRATCH_DIR, "value": SCRATCH_DIR},
        {"name": "HOME", "value": SCRATCH_DIR},
        {"name": "TMPDIR", "value": "/tmp"},
        {"name": "XDG_CACHE_HOME", "value": f"{SCRATCH_DIR}/.cache"},
        {"name": "HF_HOME", "value": f"{SCRATCH_DIR}/huggingface"},
        {"name": "TRITON_CACHE_DIR", "value": f"{SCRATCH_DIR}/triton"},
        {"name": "TORCH_EXTENSIONS_DIR", "value": f"{SCRATCH_DIR}/torch_extensions"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]


def _env(pairs: Env) -> list[Manifest]:
    return [{"name": name, "value": value} for name, value in pairs]


def _storage_env(workload: Workload, ref: SecretKeyNames | None) -> list[Manifest]:
    """The workload's S3 settings; the keys come from the user's Secret by reference (never read
    here)."""
    env = _env(workload.storage_env)
    if ref is not None:
        keys = [
            ("AWS_ACCESS_KEY_ID", ref.access_key_id_key),
            ("AWS_SECRET_ACCESS_KEY", ref.secret_access_key_key),
        ]
        if ref.session_token_key:
            keys.append(("AWS_SESSION_TOKEN", ref.session_token_key))
        env += [
            {"name": var, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": key}}} for var, key in keys
        ]
    return env


def _tracking_env(job: Job) -> list[Manifest]:
    """MLflow credentials, by reference to the user's Secret (never read here); only the gang,
    whose rank 0 logs the run, receives them (and a sweep's summary Job, render_sweep_summary_job).
    MLflow's client reads these variables itself."""
    return tracking_env(job.spec.tracking.mlflow if job.spec.tracking else None)


def tracking_env(mlflow: MlflowTracking | None) -> list[Manifest]:
    """The MLflow credential variables of ``mlflow.secretRef``, each a secretKeyRef."""
    ref = mlflow.secret_ref if mlflow else None
    if ref is None:
        return []
    keys = [
        ("MLFLOW_TRACKING_USERNAME", ref.username_key),
        ("MLFLOW_TRACKING_PASSWORD", ref.password_key),
        ("MLFLOW_TRACKING_TOKEN", ref.token_key),
    ]
    return [
        {"name": var, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": key}}}
        for var, key in keys
        if key is not None
    ]


def _job_env(job: Job, plan: RunPlan, workload: Workload) -> list[Manifest]:
    # Rank 0 patches status.progress (and results, checkpoints) through the runner
    # ServiceAccount, and logs the same lines for `kubectl logs`.
    env = _env(workload.environment(plan_path=PLAN_PATH, progress=PROGRESS_TO_STATUS_AND_LOG))
    if plan.world.gpus_per_worker == 0:
        # The pod has no GPU: DeepSpeed must not look for one.
        env.append({"name": ENV_DS_ACCELERATOR, "value": "cpu"})
    return env + _scratch_env() + _storage_env(workload, job.spec.storage.secret_ref)


def _scratch_volumes(job: Job) -> list[Manifest]:
    return [{"name": "scratch", "emptyDir": {"sizeLimit": job.spec.resources.scratch_size}}]


def _scratch_mounts() -> list[Manifest]:
    return [
        {"name": "scratch", "mountPath": SCRATCH_DIR},
        {"name": "scratch", "mountPath": "/tmp", "subPath": "tmp"},
    ]


def _plan_volume(job: Job) -> Manifest:
    return {
        "name": "plan",
        "configMap": {"name": child_names(job).plan, "items": [{"key": PLAN_KEY, "path": PLAN_KEY}]},
    }


_PLAN_MOUNT: Final[Manifest] = {"name": "plan", "mountPath": PLAN_DIR, "readOnly": True}
_SHM_VOLUME: Final[Manifest] = {"name": "dshm", "emptyDir": {"medium": "Memory"}}
_SHM_MOUNT: Final[Manifest] = {"name": "dshm", "mountPath": "/dev/shm"}


def _resources(requests: dict[str, str] | None, limits: dict[str, str] | None, gpus: int) -> Manifest:
    out: Manifest = {}
    if requests:
        out["requests"] = dict(requests)
    merged_limits = dict(limits or {})
    if gpus:
        merged_limits[GPU_RESOURCE] = str(gpus)
    if merged_limits:
        out["limits"] = merged_limits
    return out


def _pod_failure_policy(container: str) -> Manifest:
    """Exit-code contract of the runtimes: 2 (invalid input) and 3 (storage) fail the Job at once;
    disruptions (preemption, eviction, node drain) do not count as failures."""
    return {
        "rules": [
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": container,
                    "operator": "In",
                    "values": list(NON_RETRIABLE_EXIT_CODES),
                },
            },
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]
    }


def initially_suspended(job: Job) -> bool:
    """Jobs are created suspended when the user asks, and when Kueue admits them (Kueue unsuspends)."""
    return job.spec.suspend or job.spec.queue_name is not None


def _job_labels(job: Job, component: str, **extra: str) -> dict[str, str]:
    out = labels(job, component, **extra)
    if job.spec.queue_name:
        out[LABEL_QUEUE] = job.spec.queue_name
    return out


def _placement(job: Job) -> Manifest:
    resources = job.spec.resources
    out: Manifest = {}
    if resources.node_selector:
        out["nodeSelector"] = dict(resources.node_selector)
    if resources.tolerations:
        out["tolerations"] = [t.to_wire() for t in resources.tolerations]
    if resources.priority_class_name:
        out["priorityClassName"] = resources.priority_class_name
    return out


def render_validation_job(job: Job, settings: Settings, plan: RunPlan, namespace: str) -> Manifest:
    """A single CPU pod that checks model and data before the gang holds any accelerator."""
    names = child_names(job)
    workload = workloads.validate_workload(plan)
    container: Manifest = {
        "name": workload.name,
        "image": job.spec.resources.image or settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["python", *workload.argv(plan_path=PLAN_PATH)],
        "env": _job_env(job, plan, workload),
        "resources": {
            "requests": {"cpu": settings.validation_cpu, "memory": settings.validation_memory},
            "limits": {"memory": settings.validation_memory},
        },
        "volumeMounts": [_PLAN_MOUNT, *_scratch_mounts()],
        "securityContext": CONTAINER_SECURITY_CONTEXT,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: Manifest = {
        "restartPolicy": "Never",
        "serviceAccountName": runner_account_name(job),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": _pod_security_context(settings),
        "containers": [container],
        "volumes": [_plan_volume(job), *_scratch_volumes(job)],
    }
    if job.spec.resources.priority_class_name:
        pod_spec["priorityClassName"] = job.spec.resources.priority_class_name
    meta = _metadata(job, names.validate, namespace, COMPONENT_VALIDATE) | {
        "labels": _job_labels(job, COMPONENT_VALIDATE)
    }
    spec: Manifest = {
        "suspend": initially_suspended(job),
        "completions": 1,
        "parallelism": 1,
        # Transient errors (exit 1: network, throttling) get two more tries; 2 and 3 never.
        "backoffLimit": 2,
        "podFailurePolicy": _pod_failure_policy(workload.name),
        "template": {
            "metadata": {"labels": labels(job, COMPONENT_VALIDATE)},
            "spec": pod_spec,
        },
    }
    # What was rendered, suspension aside (the operator flips that in place): until the job
    # starts, a spec edit that changes it replaces the Job, whose pod template is immutable.
    meta["annotations"] = {
        **_generation_annotations(job),
        ANNOTATION_SPEC_HASH: spec_hash({k: v for k, v in spec.items() if k != "suspend"}),
    }
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec}


def render_main_job(job: Job, settings: Settings, plan: RunPlan, namespace: str, attempt: int) -> Manifest:
    """The gang: one Indexed Job, pod i is ``<job>-<i>.<workers-service>`` and torchrun node i."""
    names = child_names(job)
    name = names.main(attempt)
    component = names.main_component
    container_name = "trainer" if isinstance(job, FineTuneJob) else "compress"
    resources = job.spec.resources
    workers = plan.world.workers
    workload = workloads.main_workload(plan)
    # Pod i of the Indexed Job is torchrun node i; node 0 is reached through the headless Service.
    rendezvous = Rendezvous(node_rank=NODE_RANK_OF_INDEXED_POD, master_addr=f"{name}-0.{names.workers}")
    container: Manifest = {
        "name": container_name,
        "image": resources.image or settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["python"],
        "args": workload.argv(plan_path=PLAN_PATH, rendezvous=rendezvous if workload.distributed else None),
        # The attempt names the folder its processes' logs are kept in (kubetune.run.logs).
        "env": [
            *_job_env(job, plan, workload),
            {"name": ENV_ATTEMPT, "value": str(attempt)},
            *_tracking_env(job),
        ],
        "ports": _container_ports(workload),
        "volumeMounts": [_PLAN_MOUNT, *_scratch_mounts(), _SHM_MOUNT],
        "securityContext": CONTAINER_SECURITY_CONTEXT,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    container_resources = _resources(resources.requests, resources.limits, plan.world.gpus_per_worker)
    if container_resources:
        container["resources"] = container_resources
    pod_spec: Manifest = {
        "restartPolicy": "Never",
        "subdomain": names.workers,
        "serviceAccountName": runner_account_name(job),
        # Rank 0 patches status.progress with this token (its Role allows nothing else).
        "automountServiceAccountToken": True,
        "enableServiceLinks": False,
        "securityContext": _pod_security_context(settings),
        "containers": [container],
        "volumes": [_plan_volume(job), *_scratch_volumes(job), _SHM_VOLUME],
        **_placement(job),
    }
    attempt_label = {LABEL_ATTEMPT: str(attempt)}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(job, name, namespace, component)
        | {"labels": _job_labels(job, component, **attempt_label)},
        "spec": {
            "suspend": initially_suspended(job),
            "completionMode": "Indexed",
            "completions": workers,
            "parallelism": workers,
            # One failed pod fails the gang; the operator decides whether to replace it.
            "backoffLimit": 0,
            "podFailurePolicy": _pod_failure_policy(container_name),
            # A pod replaced after a disruption must not coexist with its predecessor: they share
            # a hostname and a torchrun rank.
            "podReplacementPolicy": "Failed",
            "template": {"metadata": {"labels": labels(job, component, **attempt_label)}, "spec": pod_spec},
        },
    }


# The summary pod only runs MLflow's client: a fraction of a core and a few hundred MiB.
SWEEP_SUMMARY_RESOURCES: Final[Manifest] = {
    "requests": {"cpu": "100m", "memory": "512Mi"},
    "limits": {"memory": "1Gi"},
}
# It retries a tracking server that is down itself (trainer/tracking/guard.py); a few pods more,
# within a bounded time, and then the sweep's TrackingSummarized condition says it failed.
SWEEP_SUMMARY_BACKOFF_LIMIT: Final = 2
SWEEP_SUMMARY_DEADLINE_SECONDS: Final = 900


def sweep_summary_name(sweep: FineTuneSweep) -> str:
    return f"{sweep.metadata.name}-summary"


def sweep_owner_reference(sweep: FineTuneSweep) -> Manifest:
    return {
        "apiVersion": API_VERSION,
        "kind": "FineTuneSweep",
        "name": sweep.metadata.name,
        "uid": sweep.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def sweep_summary_image(sweep: FineTuneSweep, settings: Settings) -> str:
    """The summary runs in the image the trials train in."""
    return sweep.spec.template.resources.image or settings.trainer_image


def render_sweep_summary_job(
    sweep: FineTuneSweep, settings: Settings, namespace: str, plan: SweepSummaryPlan, mlflow: MlflowTracking
) -> Manifest:
    """The Job that logs an ended sweep to its MLflow parent run: one small pod of the trainer
    image, the summary in an environment variable (no secrets in it), the credentials of
    ``mlflow.secretRef`` by reference, Pod Security restricted like every workload pod. It needs
    no Kubernetes API, so it runs without a token; owned by the sweep, labelled with it (no
    kubetune.io/job-name, so the jobs' handlers never take it for a job's)."""
    name = sweep_summary_name(sweep)
    pod_labels = {
        LABEL_MANAGED_BY: MANAGER,
        LABEL_SWEEP: str(sweep.metadata.name),
        LABEL_COMPONENT: COMPONENT_SWEEP_SUMMARY,
    }
    container: Manifest = {
        "name": COMPONENT_SWEEP_SUMMARY,
        "image": sweep_summary_image(sweep, settings),
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["python", "-m", "kubetune.trainer", RUNTIME_SWEEP_SUMMARY],
        "env": [
            {"name": ENV_SWEEP_SUMMARY, "value": plan.model_dump_json()},
            # No GPU, and saying so spares the runtime's start an import of torch to find out.
            {"name": ENV_DS_ACCELERATOR, "value": "cpu"},
            *_scratch_env(),
            *tracking_env(mlflow),
        ],
        "resources": SWEEP_SUMMARY_RESOURCES,
        "volumeMounts": _scratch_mounts(),
        "securityContext": CONTAINER_SECURITY_CONTEXT,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: Manifest = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": _pod_security_context(settings),
        "containers": [container],
        "volumes": [{"name": "scratch", "emptyDir": {"sizeLimit": "1Gi"}}],
    }
    meta: Manifest = {"name": name, "namespace": namespace, "labels": dict(pod_labels)}
    if sweep.metadata.uid:
        meta["ownerReferences"] = [sweep_owner_reference(sweep)]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "completions": 1,
            "parallelism": 1,
            "backoffLimit": SWEEP_SUMMARY_BACKOFF_LIMIT,
            "activeDeadlineSeconds": SWEEP_SUMMARY_DEADLINE_SECONDS,
            "podFailurePolicy": _pod_failure_policy(COMPONENT_SWEEP_SUMMARY),
            "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
        },
    }


def _container_ports(workload: Workload) -> list[Manifest]:
    return [{"name": name, "containerPort": port} for name, port in workload.ports]


# --- Serving ------------------------------------------------------------------------------------


def serving_workload(job: Job, settings: Settings) -> Workload:
    """What the serving Deployment runs (the built-in server; vLLM serves the same model)."""
    return workloads.serve_workload(job, storage_plan(job, settings.storage_endpoint))


def serving_url(job: Job, namespace: str) -> str:
    return f"http://{child_names(job).serve}.{job_namespace(job, namespace)}.svc:{SERVE_PORT}/v1"


_VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def _http_probe(path: str, period: int, failures: int, timeout: int = 5) -> Manifest:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def _api_key_env(job: Job, var: str) -> list[Manifest]:
    """The serving API key, by reference to the user's Secret (never read here)."""
    ref = job.spec.serve.api_key_secret_ref
    if ref is None:
        return []
    return [{"name": var, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}]


def _builtin_server(job: Job, settings: Settings, workload: Workload) -> Manifest:
    serve = job.spec.serve
    secret = job.spec.storage.secret_ref
    container: Manifest = {
        "name": "server",
        "image": serve.image or settings.effective_serve_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["python"],
        "args": workload.argv(),
        "env": _scratch_env() + _storage_env(workload, secret) + _api_key_env(job, ENV_SERVE_API_KEY),
        "ports": _container_ports(workload),
        # Downloading a large model may take long: allow up to an hour before liveness applies.
        "startupProbe": _http_probe("/healthz", period=10, failures=360),
        "livenessProbe": _http_probe("/healthz", period=10, failures=6),
        "readinessProbe": _http_probe("/readyz", period=5, failures=3),
        "volumeMounts": _scratch_mounts(),
        "securityContext": CONTAINER_SECURITY_CONTEXT,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    resources = _resources(serve.requests, serve.limits, serve.gpus)
    if resources:
        container["resources"] = resources
    return container


def _vllm_containers(job: Job, settings: Settings, workload: Workload) -> tuple[Manifest, Manifest]:
    """An init container (our image) copies the workload's model out of object storage into a
    shared emptyDir; vLLM then serves it from local disk."""
    serve = job.spec.serve
    name = job_name(job)
    model = _served(workload)
    endpoint = storage_plan(job, settings.storage_endpoint).endpoint
    fetch_args = ["-m", "kubetune.trainer", "serve", "--download-only", "--model", model.model_uri]
    if model.adapter_uri:
        fetch_args += ["--adapter", model.adapter_uri]
    # serve --download-only writes <scratch-dir>/model and <scratch-dir>/adapter, then exits.
    fetch_args += ["--scratch-dir", MODELS_DIR]
    if endpoint:
        fetch_args += ["--storage-endpoint", endpoint]
    models_mount = {"name": "models", "mountPath": MODELS_DIR}
    fetch: Manifest = {
        "name": "fetch-model",
        "image": settings.effective_serve_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["python"],
        "args": fetch_args,
        "env": _scratch_env() + _storage_env(workload, job.spec.storage.secret_ref),
        "volumeMounts": [models_mount, *_scratch_mounts()],
        "securityContext": CONTAINER_SECURITY_CONTEXT,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    args = [f"{MODELS_DIR}/{MODEL_DIR}"]
    if model.adapter_uri:
        # The fine-tuned model is the adapter; the base stays reachable under "<name>-base".
        args += ["--served-model-name", f"{name}-base", "--enable-lora"]
        args += ["--lora-modules", f"{name}={MODELS_DIR}/{ADAPTER_DIR}"]
        rank = job.spec.method.lora.r if isinstance(job, FineTuneJob) and job.spec.method.lora else 8
        args += ["--max-lora-rank", str(next((r for r in _VLLM_LORA_RANKS if r >= rank), rank))]
    else:
        args += ["--served-model-name", name]
    args += ["--host", "0.0.0.0", "--port", str(SERVE_PORT)]
    args += ["--max-num-seqs", str(serve.max_batch_size), "--tensor-parallel-size", str(max(serve.gpus, 1))]
    vllm: Manifest = {
        "name": "vllm",
        "image": serve.image or settings.vllm_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["vllm", "serve"],
        "args": args,
        "env": [
            *_scratch_env(),
            {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
            {"name": "DO_NOT_TRACK", "value": "1"},
            *_api_key_env(job, "VLLM_API_KEY"),
        ],
        "ports": _container_ports(workload),
        # vLLM answers /health only once the engine has loaded the weights.
        "startupProbe": _http_probe("/health", period=10, failures=360),
        "livenessProbe": _http_probe("/health", period=10, failures=6),
        "readinessProbe": _http_probe("/health", period=5, failures=3),
        "volumeMounts": [models_mount, *_scratch_mounts(), _SHM_MOUNT],
        "securityContext": CONTAINER_SECURITY_CONTEXT,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    resources = _resources(serve.requests, serve.limits, serve.gpus)
    if resources:
        vllm["resources"] = resources
    return fetch, vllm


def _served(workload: Workload) -> ServedModel:
    if workload.served is None:
        raise RenderError(f"the {workload.name} workload serves no model")
    return workload.served


def render_serving(job: Job, settings: Settings, namespace: str) -> list[Manifest]:
    """Deployment + Service serving the job's result over the OpenAI-compatible API."""
    names = child_names(job)
    workload = serving_workload(job, settings)
    serve = job.spec.serve
    pod_spec: Manifest = {
        # Serving pods need no API access, and outlive the NAME-runner identity (TTL); a user's
        # ServiceAccount (workload identity) stays and gives them the same storage access.
        **(
            {"serviceAccountName": job.spec.storage.service_account_name}
            if job.spec.storage.service_account_name
            else {}
        ),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": _pod_security_context(settings),
    }
    volumes = _scratch_volumes(job)
    if serve.runtime == ServeRuntime.vllm:
        fetch, vllm = _vllm_containers(job, settings, workload)
        pod_spec["initContainers"] = [fetch]
        pod_spec["containers"] = [vllm]
        volumes = [
            {"name": "models", "emptyDir": {"sizeLimit": job.spec.resources.scratch_size}},
            *volumes,
            _SHM_VOLUME,
        ]
    else:
        pod_spec["containers"] = [_builtin_server(job, settings, workload)]
    pod_spec["volumes"] = volumes
    spec: Manifest = {
        "replicas": serve.replicas,
        "selector": {"matchLabels": selector(job, COMPONENT_SERVE)},
        "template": {"metadata": {"labels": labels(job, COMPONENT_SERVE)}, "spec": pod_spec},
    }
    deployment_meta = _metadata(job, names.serve, namespace, COMPONENT_SERVE)
    deployment_meta["annotations"] = {ANNOTATION_SPEC_HASH: spec_hash(spec)}
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": deployment_meta, "spec": spec},
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _metadata(job, names.serve, namespace, COMPONENT_SERVE),
            "spec": {
                "selector": selector(job, COMPONENT_SERVE),
                "ports": [{"name": "http", "port": SERVE_PORT, "targetPort": "http"}],
            },
        },
    ]


def spec_hash(spec: Manifest) -> str:
    """Fingerprint of a rendered spec: the operator patches a child only when it changes."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


# --- Everything at once (``kubetune render``) -----------------------------------------------------


def render_all(
    job: Job,
    settings: Settings,
    namespace: str = "default",
    *,
    model_uri: str | None = None,
    attempt: int = 0,
    serving: bool | None = None,
) -> list[Manifest]:
    """Every child the operator creates over the job's life, in creation order. Serving objects
    are included when ``spec.serve.enabled`` (or when ``serving`` says so)."""
    ns = job_namespace(job, namespace)
    plan = render_plan(job, settings, ns, model_uri)
    children = [
        *render_base(job, plan, ns),
        render_validation_job(job, settings, plan, ns),
        *render_gang_support(job, ns),
        render_main_job(job, settings, plan, ns, attempt),
    ]
    if job.spec.serve.enabled if serving is None else serving:
        children += render_serving(job, settings, ns)
    return children
