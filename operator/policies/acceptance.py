"""What a job may run and reference, checked before its children exist.

Pod templates the API server would refuse (checked before the job starts; later edits the server
itself refuses, see InvalidChild), images outside the operator's allowed prefixes, and the
ServiceAccount and Secret the spec names, which their owners must label for kubetune. A
ServiceAccount or Secret that does not exist yet is waited for: no watch reports it, so the job
is looked at again after :data:`REFERENCE_RECHECK_SECONDS`.
"""

from __future__ import annotations

from typing import Final

from kubetune.api import Phase
from kubetune.api.status import JobStatusBase
from kubetune.operator.admission import child_problems, disallowed_images, images_message
from kubetune.operator.lifecycle import (
    LABEL_TRACKING_CREDENTIALS,
    REASON_ACCOUNT_NOT_ALLOWED,
    REASON_IMAGE_NOT_ALLOWED,
    REASON_INVALID_SPEC,
    REASON_SECRET_NOT_ALLOWED,
    Decision,
    Observation,
    RunnerAccount,
    SecretAccess,
    failed,
    secret_not_allowed,
    with_phase,
)
from kubetune.operator.render import LABEL_RUNNER, LABEL_STORAGE_CREDENTIALS

REFERENCE_RECHECK_SECONDS: Final = 10.0


def admit(obs: Observation, status: JobStatusBase) -> Decision:
    """Nothing (the job may go on), or its failure, or a wait for what it references."""
    for check in (_pod_templates, _images, _runner_account, _storage_secret, _tracking_secret):
        decision = check(obs, status)
        if decision is not None:
            return decision
    return Decision(status=status)


def _refuse(obs: Observation, status: JobStatusBase, reason: str, message: str) -> Decision:
    return Decision(status=failed(obs, status, reason, message), settled=True)


def _wait(status: JobStatusBase, message: str) -> Decision:
    return Decision(
        status=with_phase(status, Phase.waiting, message),
        recheck_after=REFERENCE_RECHECK_SECONDS,
        settled=True,
    )


def _pod_templates(obs: Observation, status: JobStatusBase) -> Decision | None:
    if obs.status.start_time:
        return None
    problems = child_problems(obs.job)
    return _refuse(obs, status, REASON_INVALID_SPEC, "; ".join(problems)) if problems else None


def _images(obs: Observation, status: JobStatusBase) -> Decision | None:
    images = disallowed_images(obs.job, obs.settings)
    if not images:
        return None
    return _refuse(obs, status, REASON_IMAGE_NOT_ALLOWED, images_message(images, obs.settings))


def _runner_account(obs: Observation, status: JobStatusBase) -> Decision | None:
    """A ServiceAccount of the user's may be run as once it exists and is labelled for it."""
    name = obs.job.spec.storage.service_account_name
    if not name or obs.runner_account == RunnerAccount.allowed:
        return None
    if obs.runner_account == RunnerAccount.not_allowed:
        return _refuse(
            obs,
            status,
            REASON_ACCOUNT_NOT_ALLOWED,
            f"ServiceAccount {name} (spec.storage.serviceAccountName) lacks the label "
            f'{LABEL_RUNNER}: "true"; whoever manages identities in namespace {obs.namespace} '
            "adds it to let kubetune jobs run as it",
        )
    return _wait(status, f"waiting for ServiceAccount {name} (spec.storage.serviceAccountName) to exist")


def _storage_secret(obs: Observation, status: JobStatusBase) -> Decision | None:
    """A Secret may supply storage credentials once it exists and is labelled for it."""
    ref = obs.job.spec.storage.secret_ref
    if ref is None:
        return None
    return _labelled_secret(
        obs, status, obs.storage_secret, ref.name, "spec.storage.secretRef", LABEL_STORAGE_CREDENTIALS
    )


def _tracking_secret(obs: Observation, status: JobStatusBase) -> Decision | None:
    """A Secret may supply tracking-server credentials once it exists and is labelled for that:
    otherwise whoever may create a job could send any Secret's keys to a server of their choice."""
    tracking = obs.job.spec.tracking.mlflow if obs.job.spec.tracking else None
    if tracking is None or tracking.secret_ref is None:
        return None
    return _labelled_secret(
        obs,
        status,
        obs.tracking_secret,
        tracking.secret_ref.name,
        "spec.tracking.mlflow.secretRef",
        LABEL_TRACKING_CREDENTIALS,
    )


def _labelled_secret(
    obs: Observation, status: JobStatusBase, access: SecretAccess | None, name: str, field: str, label: str
) -> Decision | None:
    if access == SecretAccess.allowed:
        return None
    if access == SecretAccess.not_allowed:
        return _refuse(
            obs, status, REASON_SECRET_NOT_ALLOWED, secret_not_allowed(name, field, label, obs.namespace)
        )
    return _wait(status, f"waiting for Secret {name} ({field}) to exist")
