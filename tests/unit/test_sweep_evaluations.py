"""A trial's evaluation history from its progress updates, which repeat the latest evaluation."""

from __future__ import annotations

import pytest

from kubetune.sweep.evaluations import MAX_EVALUATIONS, objective_of, observe


@pytest.mark.parametrize(
    ("history", "step", "objective", "expected"),
    [
        ({}, 10, 2.0, {10: 2.0}),  # the first evaluation
        ({10: 2.0}, 20, 1.5, {10: 2.0, 20: 1.5}),  # a new one
        ({10: 2.0}, 12, 2.0, {10: 2.0}),  # a logging update repeating evaluation 10
        ({10: 2.0}, 10, 1.0, {10: 2.0}),  # the same step seen again
        ({10: 2.0}, 5, 1.0, {10: 2.0}),  # an older update arriving late
        ({10: 2.0}, None, 1.0, {10: 2.0}),  # no step
        ({10: 2.0}, 20, None, {10: 2.0}),  # no evaluation yet
    ],
)
def test_only_a_new_evaluation_at_a_later_step_is_recorded(
    history: dict[int, float], step: int | None, objective: float | None, expected: dict[int, float]
) -> None:
    assert observe(history, step, objective) == expected


def test_the_history_keeps_the_latest_evaluations_within_its_bound() -> None:
    history: dict[int, float] = {}
    for step in range(1, MAX_EVALUATIONS + 11):
        history = observe(history, step, float(step))
    assert len(history) == MAX_EVALUATIONS
    assert min(history) == 11
    assert max(history) == MAX_EVALUATIONS + 10


def test_observe_does_not_change_the_history_it_is_given() -> None:
    history = {1: 1.0}
    observe(history, 2, 0.5)
    assert history == {1: 1.0}


@pytest.mark.parametrize(
    ("metric", "progress", "expected"),
    [
        ("eval_loss", {"evalLoss": 1.25, "loss": 2.0}, 1.25),
        ("eval_loss", {"loss": 2.0}, None),
        ("accuracy", {"metrics": {"accuracy": 0.75}}, 0.75),
        ("eval_accuracy", {"metrics": {"accuracy": 0.75}}, 0.75),
        ("accuracy", {"metrics": {"accuracy": True}}, None),
    ],
)
def test_the_objective_is_read_from_the_progress_update(
    metric: str, progress: dict[str, object], expected: float | None
) -> None:
    assert objective_of(metric, progress) == expected
