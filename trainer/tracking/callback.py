"""The Trainer callback that forwards the Trainer's logs to the job's MLflow run.

``on_log`` sees every entry the Trainer logs: training loss, learning rate and gradient norm every
``loggingEverySteps`` steps, each evaluation's ``eval_*`` metrics, and the run's summary at the
end, all at the step they belong to. ``on_evaluate`` is not used: the same evaluation also
arrives through ``on_log``, and logging it twice would duplicate the points. The callback is
only registered on rank 0 (:meth:`TrackedRun.callbacks`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from transformers import TrainerCallback

from kubetune.trainer.tracking.content import numeric_metrics

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments


class MetricsSink(Protocol):
    """The job's run (:class:`~kubetune.trainer.tracking.session.TrackedRun`)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None) -> None: ...


class MetricsCallback(TrainerCallback):
    def __init__(self, run: MetricsSink) -> None:
        self.run = run

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.run.log_metrics(numeric_metrics(logs or {}), state.global_step)
