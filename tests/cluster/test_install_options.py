"""The other ways to install kubetune, judged by a real API server: the Helm chart's objects and
the Prometheus Operator monitors of manifests/monitoring pass server-side validation (schemas,
admission) once the CRDs they need are installed."""

from __future__ import annotations

import subprocess

import pytest

from tests.cluster.controlplane import REPO, ControlPlane

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

PROMETHEUS_OPERATOR_CRDS = REPO / "tests" / "fixtures" / "prometheus-operator"


@pytest.fixture(scope="module")
def with_monitoring_crds(kubetune_installed: ControlPlane) -> ControlPlane:
    for crd in sorted(PROMETHEUS_OPERATOR_CRDS.glob("monitoring.coreos.com_*.yaml")):
        kubetune_installed.kubectl("apply", "--server-side", "-f", str(crd))
    kubetune_installed.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/servicemonitors.monitoring.coreos.com",
        "crd/podmonitors.monitoring.coreos.com",
    )
    return kubetune_installed


def server_dry_run(plane: ControlPlane, manifests: str) -> list[str]:
    result = plane.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-", input=manifests)
    return [line for line in result.stdout.splitlines() if line.strip()]


def test_the_chart_with_monitoring_on_passes_server_side_validation(
    with_monitoring_crds: ControlPlane,
) -> None:
    rendered = subprocess.run(
        [
            with_monitoring_crds.binary("helm"),
            "template",
            "kubetune",
            str(REPO / "charts" / "kubetune"),
            "--namespace",
            "kubetune-system",
            "--set",
            "monitoring.enabled=true,watchNamespaces={ml,research}",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout

    applied = server_dry_run(with_monitoring_crds, rendered)

    kinds = {line.split("/", 1)[0] for line in applied}
    assert {
        "serviceaccount",
        "clusterrole.rbac.authorization.k8s.io",
        "deployment.apps",
        "service",
        "servicemonitor.monitoring.coreos.com",
        "podmonitor.monitoring.coreos.com",
        "configmap",
    } <= kinds, applied
    assert all("(server dry run)" in line for line in applied), applied


def test_the_monitoring_kustomization_passes_server_side_validation(
    with_monitoring_crds: ControlPlane,
) -> None:
    result = with_monitoring_crds.kubectl(
        "apply", "--server-side", "--dry-run=server", "-k", str(REPO / "manifests" / "monitoring")
    )

    assert "servicemonitor.monitoring.coreos.com/" in result.stdout, result.stdout
    assert "podmonitor.monitoring.coreos.com/" in result.stdout, result.stdout
    assert "configmap/kubetune-grafana-dashboard" in result.stdout, result.stdout
