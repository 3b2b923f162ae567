"""Fixtures of the end-to-end tier: the emulated API server and the real operator (tests.kube), the
S3 server (tests.s3server, via tests/conftest.py) and :class:`~tests.e2e.kubelet.Kubelet`, which
runs the Jobs and Deployments in the emulator as local processes.

A module changes how the kubelet runs by overriding the ``kubelet_options`` fixture. When a test
fails, the tail of every container log is printed with its report.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import kmock
import pytest

from tests.e2e.kubelet import Kubelet
from tests.kube import KubeEmulator, kube, kubeconfig, operator

__all__ = ["kube", "kubeconfig", "kubelet", "kubelet_options", "operator"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep each phase's report on the item, so fixtures can tell whether the test failed."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)


def register_secrets(emulator: KubeEmulator) -> None:
    """The operator never touches Secrets (it passes references), so tests.kube does not serve
    them; the kubelet reads them, and tests create them."""
    emulator.resources["v1/secrets"] = kmock.ResourceInfo(
        kind="Secret",
        singular="secret",
        namespaced=True,
        verbs={"create", "delete", "get", "list", "patch", "update", "watch"},
        shortnames=set(),
        categories=set(),
        subresources=set(),
    )


@pytest.fixture
def kubelet_options() -> dict[str, Any]:
    """Extra keyword arguments for :class:`Kubelet` (override in a module)."""
    return {}


@pytest.fixture
async def kubelet(
    kube: KubeEmulator,
    kubeconfig: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    kubelet_options: dict[str, Any],
) -> AsyncIterator[Kubelet]:
    """The Job controller, Deployment controller and kubelet, running against ``kube``."""
    register_secrets(kube)
    executor = Kubelet(kube, tmp_path / "pods", kubeconfig=kubeconfig, **kubelet_options)
    await executor.start()
    try:
        yield executor
    finally:
        await executor.stop()
        call = getattr(request.node, "rep_call", None)
        if call is None or call.failed:
            print(executor.dump_logs())
