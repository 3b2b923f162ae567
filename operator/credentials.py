"""Whether a kubetune resource's pods may take keys of a Secret, as the operator finds out: the
Secret read as metadata only (never its values), judged by :func:`lifecycle.secret_access`, and
remembered once allowed, so that a label once seen is not read again at every event."""

from __future__ import annotations

from typing import Any

from kubetune.operator import lifecycle
from kubetune.operator.kube import ApiError

# (owner uid, Secret name, opt-in label) of Secrets found opted in.
AllowedSecrets = set[tuple[str, str, str]]


async def opted_in(
    client: Any, allowed: AllowedSecrets, uid: str, namespace: str, name: str, label: str
) -> lifecycle.SecretAccess:
    """Whether the resource ``uid`` may hand its pods keys of Secret ``name``: its owner opts it
    in with ``label: "true"``."""
    if (uid, name, label) in allowed:
        return lifecycle.SecretAccess.allowed
    try:
        found = await client.get_metadata("v1", "Secret", namespace, name)
    except ApiError as exc:
        if exc.status != 404:
            raise
        found = None
    access = lifecycle.secret_access(found["metadata"] if found else None, label)
    if access == lifecycle.SecretAccess.allowed:
        allowed.add((uid, name, label))
    return access
