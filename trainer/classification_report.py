"""The full evaluation report of a sequence classifier: metrics.json's ``classification_report``.

Per class precision, recall, F1 and support, their macro and weighted averages, and the confusion
matrix (rows: true class, columns: predicted), under ``task.labels`` names when the spec gives
them, else the class ids. scikit-learn computes it from the final evaluation's predictions, which
the run also keeps as ``<output>/eval_predictions.jsonl`` (one ``{"label", "predicted"}`` per
evaluation record) so anyone can recompute any figure.

The headline accuracy and macro-F1 stay where they were (metrics.json's ``accuracy`` and
``f1_macro``, ``status.results``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from kubetune.run.artifacts import join_uri
from kubetune.run.plan import RunPlan

if TYPE_CHECKING:
    from transformers import EvalPrediction

    from kubetune.storage import ObjectStore

PREDICTIONS_FILE: Final = "eval_predictions.jsonl"


def predictions_uri(plan: RunPlan) -> str:
    return join_uri(plan.output_uri, PREDICTIONS_FILE)


class PredictionRecorder:
    """``compute_metrics`` for the Trainer that also keeps the latest evaluation's predicted and
    true classes (gathered from every rank by the Trainer before it calls this)."""

    def __init__(self, metrics: Callable[[EvalPrediction], dict[str, float]]) -> None:
        self.metrics = metrics
        self.labels: list[int] = []
        self.predicted: list[int] = []

    def __call__(self, prediction: EvalPrediction) -> dict[str, float]:
        import numpy as np

        self.predicted = [int(p) for p in np.asarray(prediction.predictions).reshape(-1)]
        self.labels = [int(label) for label in np.asarray(prediction.label_ids).reshape(-1)]
        return self.metrics(prediction)


def class_names(plan: RunPlan) -> list[str]:
    """``task.labels`` in id order, else the ids as text."""
    count = plan.task.num_labels or len(plan.task.labels or ())
    return list(plan.task.labels) if plan.task.labels else [str(i) for i in range(count)]


def classification_report(
    labels: Sequence[int], predicted: Sequence[int], names: Sequence[str]
) -> dict[str, Any]:
    """The report of ``predicted`` against ``labels`` for classes ``0..len(names)-1`` (a class that
    never occurs still gets its row, with support 0 and zero scores)."""
    from sklearn.metrics import classification_report as sklearn_report
    from sklearn.metrics import confusion_matrix

    classes = list(range(len(names)))
    table = sklearn_report(
        list(labels),
        list(predicted),
        labels=classes,
        target_names=list(names),
        output_dict=True,
        zero_division=0,
    )

    def row(entry: dict[str, float]) -> dict[str, float | int]:
        return {
            "precision": float(entry["precision"]),
            "recall": float(entry["recall"]),
            "f1": float(entry["f1-score"]),
            "support": int(entry["support"]),
        }

    matrix = confusion_matrix(list(labels), list(predicted), labels=classes)
    return {
        "classes": {name: row(table[name]) for name in names},
        "macro_avg": row(table["macro avg"]),
        "weighted_avg": row(table["weighted avg"]),
        "confusion_matrix": {
            "labels": list(names),
            "rows": "true class",
            "columns": "predicted class",
            "counts": [[int(n) for n in counts] for counts in matrix],
        },
        "samples": len(labels),
    }


def write_predictions(store: ObjectStore, plan: RunPlan, recorder: PredictionRecorder) -> str:
    """``<output>/eval_predictions.jsonl``: the final evaluation's classes, record by record."""
    uri = predictions_uri(plan)
    lines = (
        json.dumps({"label": label, "predicted": predicted}) + "\n"
        for label, predicted in zip(recorder.labels, recorder.predicted, strict=True)
    )
    store.write_bytes(uri, "".join(lines).encode())
    return uri
