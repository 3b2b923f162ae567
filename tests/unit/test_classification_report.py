"""The classification report: per-class figures under the task's label names, and local mode's table."""

from __future__ import annotations

import pytest
from rich.console import Console

from kubetune.local.display import classification_table
from kubetune.trainer.classification_report import classification_report

pytestmark = pytest.mark.unit


def test_every_class_gets_a_row_even_one_never_seen_and_the_matrix_counts_true_by_predicted() -> None:
    # Class "c" occurs neither as a label nor as a prediction.
    report = classification_report(labels=[0, 0, 1, 1], predicted=[0, 1, 1, 1], names=["a", "b", "c"])
    assert report["classes"] == {
        "a": {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2},
        "b": {"precision": pytest.approx(2 / 3), "recall": 1.0, "f1": 0.8, "support": 2},
        "c": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0},
    }
    assert report["macro_avg"]["f1"] == pytest.approx((2 / 3 + 0.8) / 3)
    assert report["weighted_avg"] == {
        "precision": pytest.approx(5 / 6),
        "recall": 0.75,
        "f1": pytest.approx((2 / 3 + 0.8) / 2),
        "support": 4,
    }
    assert report["confusion_matrix"]["counts"] == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
    assert report["confusion_matrix"]["labels"] == ["a", "b", "c"]


def test_local_mode_prints_one_row_per_class_then_the_averages() -> None:
    report = classification_report(labels=[0, 1, 1], predicted=[0, 1, 0], names=["spam", "ham"])
    console = Console(width=100, record=True)
    console.print(classification_table(report))
    cells = [
        [cell.strip() for cell in line.strip("│ ").split("│")]
        for line in console.export_text().splitlines()
        if line.startswith("│")
    ]
    assert cells == [
        ["spam", "0.5", "1", "0.6667", "1"],
        ["ham", "1", "0.5", "0.6667", "2"],
        ["macro avg", "0.75", "0.75", "0.6667", "3"],
        ["weighted avg", "0.8333", "0.6667", "0.6667", "3"],
    ]
