"""Children are created in an order the real API server accepts."""

from __future__ import annotations

import pytest

from kubetune.operator.handlers import creation_stages

pytestmark = pytest.mark.unit


def test_role_bindings_come_after_their_roles_and_workloads_last() -> None:
    kinds = ["Job", "RoleBinding", "ConfigMap", "Role", "ServiceAccount", "Service", "Deployment"]
    supporting, bindings, workloads = creation_stages([{"kind": k} for k in kinds])
    assert [m["kind"] for m in supporting] == ["ConfigMap", "Role", "ServiceAccount", "Service"]
    assert [m["kind"] for m in bindings] == ["RoleBinding"]
    assert [m["kind"] for m in workloads] == ["Job", "Deployment"]
