"""Rank 0 patches ``status.progress`` of its FineTuneJob through the Kubernetes API.

Against KMock's Kubernetes emulator, reached through a KUBECONFIG as from a laptop: updates are
rate limited (the latest wins, the last one is flushed on close), go to the status subresource as
a merge patch, and a failing or unreachable API server never raises into training.
"""

from __future__ import annotations

import asyncio
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from kmock import KubernetesEmulator, Request, ResourceInfo, method

from kubetune.run.plan import JobRef
from kubetune.trainer.progress import KubernetesStatusReporter, ProgressUpdate

pytestmark = pytest.mark.integration

RESOURCE = "kubetune.io/v1alpha1/finetunejobs"
JOB = JobRef(api_version="kubetune.io/v1alpha1", kind="FineTuneJob", namespace="ml", name="tune-me")
STATUS_PATH = "/apis/kubetune.io/v1alpha1/namespaces/ml/finetunejobs/tune-me/status"


def write_kubeconfig(path: Path, server: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulator", "cluster": {"server": server}}],
        "users": [{"name": "trainer", "user": {}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "trainer"}}],
        "current-context": "emulator",
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def emulator(
    kmock: KubernetesEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> KubernetesEmulator:
    kmock.resources[RESOURCE] = ResourceInfo(
        kind="FineTuneJob", namespaced=True, subresources={"status"}, verbs={"get", "patch"}
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not in a pod: use KUBECONFIG
    monkeypatch.setenv(
        "KUBECONFIG", str(write_kubeconfig(tmp_path / "kubeconfig", str(kmock.url).rstrip("/")))
    )
    return kmock


def create_job(emulator: KubernetesEmulator) -> None:
    emulator.objects[RESOURCE, "ml", "tune-me"] = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "tune-me", "namespace": "ml"},
        "spec": {"model": {"uri": "s3://models/base"}},
        "status": {"phase": "Running"},
    }


def update(step: int, **changes: Any) -> ProgressUpdate:
    return ProgressUpdate(
        step=step,
        total_steps=100,
        epoch=step / 100,
        loss=3.0 - step / 100,
        updated_at=datetime(2025, 1, 1, 0, 0, step % 60, tzinfo=UTC),
        **changes,
    )


def patches(emulator: KubernetesEmulator) -> list[Request]:
    return [r for r in emulator if r.method == method.PATCH]


async def until(condition: Any, timeout_s: float = 20.0) -> None:
    """Wait (without blocking the emulator's event loop) until ``condition()`` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_updates_are_rate_limited_and_the_last_one_is_flushed(emulator: KubernetesEmulator) -> None:
    create_job(emulator)
    reporter = KubernetesStatusReporter(JOB, min_interval_s=3600)

    reporter.report(update(10))
    await until(lambda: len(patches(emulator)) == 1)  # the first update goes out at once
    reporter.report(update(20))  # within the interval: held back...
    reporter.report(update(30, eval_loss=2.5, metrics={"accuracy": 0.5}))  # ...and replaced
    # close() joins the sender thread; run it off the loop so the emulator keeps serving.
    await asyncio.to_thread(reporter.close)

    sent = patches(emulator)
    assert [r.data["status"]["progress"]["step"] for r in sent] == [10, 30]
    assert reporter.sent == 2
    assert reporter.failures == 0
    last = sent[-1]
    assert last.url.path == STATUS_PATH
    assert last.headers["Content-Type"] == "application/merge-patch+json"
    job = emulator.objects[RESOURCE, "ml", "tune-me"]
    assert job["status"]["progress"] == {
        "step": 30,
        "totalSteps": 100,
        "epoch": 0.3,
        "loss": 2.7,
        "evalLoss": 2.5,
        "metrics": {"accuracy": 0.5},
        "percent": 30,
        "updatedAt": "2025-01-01T00:00:30Z",
    }
    assert job["status"]["phase"] == "Running"  # a merge patch leaves the operator's fields alone
    assert job["spec"] == {"model": {"uri": "s3://models/base"}}


async def test_reports_after_close_are_ignored(emulator: KubernetesEmulator) -> None:
    create_job(emulator)
    reporter = KubernetesStatusReporter(JOB, min_interval_s=0)
    reporter.report(update(1))
    await asyncio.to_thread(reporter.close)
    reporter.report(update(2))
    assert [r.data["status"]["progress"]["step"] for r in patches(emulator)] == [1]


async def test_a_failing_api_server_never_raises(emulator: KubernetesEmulator) -> None:
    create_job(emulator)
    emulator[f"patch {STATUS_PATH}"] << 500 << {"kind": "Status", "code": 500, "message": "etcd is unhappy"}
    reporter = KubernetesStatusReporter(JOB, min_interval_s=0)
    reporter.report(update(1))
    await until(lambda: reporter.failures == 1)
    reporter.report(update(2))
    await asyncio.to_thread(reporter.close)
    assert (reporter.sent, reporter.failures) == (0, 2)


async def test_a_missing_job_never_raises(
    emulator: KubernetesEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    reporter = KubernetesStatusReporter(JOB, min_interval_s=0)  # no object was created
    reporter.report(update(1))
    await asyncio.to_thread(reporter.close)
    assert (reporter.sent, reporter.failures) == (0, 1)
    assert "cannot report progress to FineTuneJob ml/tune-me (1 failures so far): HTTP 404" in caplog.text


def test_an_unreachable_api_server_never_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv(
        "KUBECONFIG", str(write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{port}"))
    )
    reporter = KubernetesStatusReporter(JOB, min_interval_s=0, request_timeout_s=2)
    reporter.report(update(1))
    reporter.close()
    assert (reporter.sent, reporter.failures) == (0, 1)


def test_missing_credentials_never_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    reporter = KubernetesStatusReporter(JOB, min_interval_s=0)
    reporter.report(update(1))
    reporter.close()
    assert (reporter.sent, reporter.failures) == (0, 1)


async def test_checkpoints_and_results_are_patched_into_status_at_once(emulator: KubernetesEmulator) -> None:
    create_job(emulator)
    reporter = KubernetesStatusReporter(JOB, min_interval_s=3600)
    await asyncio.to_thread(reporter.report_checkpoint, 40, "s3://out/run/checkpoints/step-40")
    await asyncio.to_thread(reporter.report_results, {"sizeRatio": 3.5, "metricsAfter": {"perplexity": 9.0}})
    await asyncio.to_thread(reporter.close)

    status = emulator.objects[RESOURCE, "ml", "tune-me"]["status"]
    assert status["checkpoints"] == {"latestStep": 40, "latestUri": "s3://out/run/checkpoints/step-40"}
    assert status["results"] == {"sizeRatio": 3.5, "metricsAfter": {"perplexity": 9.0}}
    assert status["phase"] == "Running"
    assert all(r.url.path == STATUS_PATH for r in patches(emulator))
