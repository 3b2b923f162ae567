"""What the operator's metrics record from a job's status changes and from its snapshots."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubetune.api.status import FineTuneJobStatus, Phase
from kubetune.operator.metrics import Metrics, StatusChange, status_change

pytestmark = pytest.mark.unit

CREATED = "2026-12-02T10:00:00+00:00"


def status(**fields: object) -> FineTuneJobStatus:
    return FineTuneJobStatus.model_validate(fields)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (status(), status(phase="Pending"), StatusChange()),
        (
            status(phase="Validating"),
            status(phase="Running", startTime="2026-12-02T10:02:30+00:00"),
            StatusChange(queue_wait_seconds=150.0),
        ),
        (
            status(phase="Running", startTime="2026-12-02T10:02:30+00:00", restarts=1),
            status(phase="Running", startTime="2026-12-02T10:02:30+00:00", restarts=2),
            StatusChange(restarts=1),
        ),
        (
            status(phase="Running", startTime="2026-12-02T10:02:30+00:00"),
            status(
                phase="Succeeded",
                startTime="2026-12-02T10:02:30+00:00",
                completionTime="2026-12-02T11:02:30+00:00",
            ),
            StatusChange(finished_phase="Succeeded", duration_seconds=3600.0),
        ),
        (
            status(phase="Pending"),
            status(phase="Failed", completionTime="2026-12-02T10:00:05+00:00"),
            StatusChange(finished_phase="Failed", duration_seconds=5.0),
        ),
        (
            status(phase="Succeeded", completionTime="2026-12-02T11:00:00+00:00"),
            status(phase="Succeeded", completionTime="2026-12-02T11:00:00+00:00"),
            StatusChange(),
        ),
    ],
    ids=["created", "started", "restarted", "succeeded", "failed-before-start", "seen-finished-again"],
)
def test_a_status_change_yields(
    old: FineTuneJobStatus, new: FineTuneJobStatus, expected: StatusChange
) -> None:
    assert status_change(old, new, CREATED) == expected


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_gauges_count_jobs_by_phase_and_show_the_throughput_of_running_jobs() -> None:
    jobs = [
        {
            "kind": "FineTuneJob",
            "metadata": {"namespace": "ml", "name": "a"},
            "status": {"phase": "Running", "progress": {"samplesPerSecond": 12.5}},
        },
        {
            "kind": "FineTuneJob",
            "metadata": {"namespace": "ml", "name": "b"},
            "status": {"phase": "Succeeded", "progress": {"samplesPerSecond": 9.0}},
        },
        {"kind": "CompressJob", "metadata": {"namespace": "ml", "name": "c"}, "status": {}},
    ]

    got = samples(Metrics(lambda: jobs))

    assert got[("kubetune_jobs", (("kind", "FineTuneJob"), ("phase", "Running")))] == 1
    assert got[("kubetune_jobs", (("kind", "FineTuneJob"), ("phase", "Succeeded")))] == 1
    assert got[("kubetune_jobs", (("kind", "CompressJob"), ("phase", "Pending")))] == 1
    throughput = {k: v for k, v in got.items() if k[0] == "kubetune_training_samples_per_second"}
    assert throughput == {
        (
            "kubetune_training_samples_per_second",
            (("kind", "FineTuneJob"), ("name", "a"), ("namespace", "ml")),
        ): 12.5
    }


def test_recorded_changes_appear_as_counters_and_histograms() -> None:
    metrics = Metrics(list)

    metrics.record("FineTuneJob", StatusChange(restarts=2, queue_wait_seconds=30.0))
    metrics.record("FineTuneJob", StatusChange(finished_phase=Phase.succeeded.value, duration_seconds=700.0))
    got = samples(metrics)

    assert got[("kubetune_job_restarts_total", (("kind", "FineTuneJob"),))] == 2
    assert got[("kubetune_job_queue_wait_seconds_count", (("kind", "FineTuneJob"),))] == 1
    assert got[("kubetune_job_queue_wait_seconds_sum", (("kind", "FineTuneJob"),))] == 30.0
    duration = (
        "kubetune_job_duration_seconds_bucket",
        (("kind", "FineTuneJob"), ("le", "1800.0"), ("phase", "Succeeded")),
    )
    assert got[duration] == 1
