"""The rule for tracking failures: transient ones are retried a bounded number of times, then (as
for any refusal at once) tracking is off for the rest of the run and the reason is reported once."""

from __future__ import annotations

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    PERMISSION_DENIED,
    REQUEST_LIMIT_EXCEEDED,
    TEMPORARILY_UNAVAILABLE,
)

from kubetune.trainer.tracking.guard import Guard, describe, retriable

pytestmark = pytest.mark.unit


class Flaky:
    """An action that fails ``failures`` times with ``error``, then returns "ok"."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "ok"


UNREACHABLE = MlflowException(
    "API request to http://mlflow:5000 failed: Connection refused"
)  # INTERNAL_ERROR
REFUSED = MlflowException("Unauthorized", error_code=PERMISSION_DENIED)
OVERLOADED = MlflowException("slow down", error_code=REQUEST_LIMIT_EXCEEDED)


def guard(reports: list[str], sleeps: list[float]) -> Guard:
    return Guard(reports.append, attempts=3, backoff_s=0.5, sleep=sleeps.append)


def test_a_transient_failure_is_retried_with_backoff_and_then_succeeds() -> None:
    reports: list[str] = []
    sleeps: list[float] = []
    action = Flaky(2, UNREACHABLE)
    assert guard(reports, sleeps).call("logging metrics", action) == "ok"
    assert action.calls == 3
    assert sleeps == [0.5, 1.0]
    assert reports == []


def test_a_failure_that_persists_turns_tracking_off_and_is_reported_once() -> None:
    reports: list[str] = []
    sleeps: list[float] = []
    g = guard(reports, sleeps)
    dead = Flaky(100, UNREACHABLE)
    assert g.call("creating the run", dead) is None
    assert dead.calls == 3
    assert not g.active
    assert reports == [g.failure]
    assert g.failure is not None
    assert g.failure.startswith("creating the run failed: API request to http://mlflow:5000")
    # Off for the rest of the run: later calls do not reach the server, nothing more is reported.
    later = Flaky(0, UNREACHABLE)
    assert g.call("logging metrics", later) is None
    assert later.calls == 0
    assert len(reports) == 1


def test_a_refusal_is_not_retried() -> None:
    reports: list[str] = []
    sleeps: list[float] = []
    action = Flaky(1, REFUSED)
    g = guard(reports, sleeps)
    assert g.call("registering a model version", action) is None
    assert action.calls == 1
    assert sleeps == []
    assert len(reports) == 1


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (UNREACHABLE, True),
        (OVERLOADED, True),
        (MlflowException("x", error_code=TEMPORARILY_UNAVAILABLE), True),
        (REFUSED, False),
        (MlflowException("x", error_code=INVALID_PARAMETER_VALUE), False),
        (ConnectionResetError("reset"), True),
        (ValueError("a bug"), False),
    ],
)
def test_what_counts_as_transient(error: Exception, expected: bool) -> None:
    assert retriable(error) is expected


def test_a_broken_status_sink_does_not_escape() -> None:
    def broken(message: str) -> None:
        raise RuntimeError("API server gone")

    g = Guard(broken, attempts=1, sleep=lambda _: None)
    assert g.call("creating the run", Flaky(1, REFUSED)) is None
    assert not g.active


def test_messages_are_one_bounded_line() -> None:
    text = describe(MlflowException("first line\n" + "x" * 1000))
    assert "\n" not in text
    assert len(text) <= 300
