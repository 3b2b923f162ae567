"""Early stopping with the best checkpoint (``hyperparameters.earlyStopping``).

The transformers machinery does the deciding: ``EarlyStoppingCallback`` counts evaluations without
improvement, the Trainer records the best evaluation (``TrainerState.best_metric``,
``best_global_step``, ``best_model_checkpoint``; saved in every checkpoint's ``trainer_state.json``,
so the best-so-far travels with the committed checkpoint and survives a restart) and, with
``load_best_model_at_end``, loads the best checkpoint into the DeepSpeed engine after the last
step, so what the recipe then saves as ``<output>/model`` (and ``adapter/``) is the best
evaluation's weights, under any ZeRO stage.

kubetune adds what the Trainer cannot know: checkpoints live in object storage and the local copy
is deleted after upload (:class:`~kubetune.trainer.checkpoint.CheckpointPublisher`). So the
publisher keeps the best step's local copy and never prunes its stored one, and
:class:`BestCheckpoint` makes sure, just before the Trainer loads it, that every node holds the
complete best checkpoint (downloading it when the copy is gone: after a restart, or on other nodes
than the one that holds the whole of it).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from transformers import EarlyStoppingCallback, TrainerCallback

from kubetune.errors import RetriableError
from kubetune.run.plan import RunPlan
from kubetune.trainer.checkpoint import LOCAL_PREFIX, download_checkpoint, scan_checkpoints
from kubetune.trainer.training import Distributed, barrier, local_main_first

if TYPE_CHECKING:
    from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

    from kubetune.storage import ObjectStore
    from kubetune.trainer.checkpoint import CheckpointPublisher

log = logging.getLogger(__name__)

EARLY_STOPPED: Final = "EarlyStopped"
MAX_STEPS_REACHED: Final = "MaxStepsReached"


def argument_overrides(plan: RunPlan, *, eval_strategy: str, eval_steps: int | None) -> dict[str, Any]:
    """The Trainer arguments early stopping needs; nothing without ``earlyStopping``.

    A checkpoint is saved at every evaluation (``save_strategy``/``save_steps`` follow the
    evaluation's, and ``checkpoint.everySteps`` is not used): the best evaluation's weights can
    only become the model if they were saved, and transformers refuses ``load_best_model_at_end``
    when saves and evaluations are not aligned."""
    hp = plan.hyperparameters
    if hp is None or hp.early_stopping is None:
        return {}
    metric = hp.early_stopping.metric
    return {
        "load_best_model_at_end": True,
        "metric_for_best_model": metric,
        "greater_is_better": not metric.endswith("loss"),
        "save_strategy": eval_strategy,
        "save_steps": eval_steps,
        # The patience counter is part of the checkpoint: a restart goes on counting.
        "restore_callback_states_from_checkpoint": True,
    }


def stopping_callback(plan: RunPlan) -> EarlyStoppingCallback | None:
    hp = plan.hyperparameters
    if hp is None or hp.early_stopping is None:
        return None
    return EarlyStoppingCallback(
        early_stopping_patience=hp.early_stopping.patience,
        early_stopping_threshold=hp.early_stopping.threshold,
    )


def local_checkpoint(output_dir: str | Path, step: int) -> Path:
    """Where the Trainer keeps ``step``'s checkpoint (and loads the best one from)."""
    return Path(output_dir) / f"{LOCAL_PREFIX}{step}"


class BestCheckpoint(TrainerCallback):
    """Puts the best checkpoint where the Trainer loads it from (see the module docstring)."""

    def __init__(
        self, store: ObjectStore, plan: RunPlan, dist: Distributed, publisher: CheckpointPublisher
    ) -> None:
        self.store = store
        self.plan = plan
        self.dist = dist
        self.publisher = publisher

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # A resumed state names the best checkpoint by the previous attempt's path; the Trainer
        # forgets it when that path is gone, but keeps best_global_step and best_metric.
        if (
            state.best_global_step
            and local_checkpoint(args.output_dir or "", state.best_global_step).is_dir()
        ):
            state.best_model_checkpoint = str(local_checkpoint(args.output_dir or "", state.best_global_step))

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        # The run's summary log is the Trainer's last call before it loads the best checkpoint.
        if logs is None or "train_loss" not in logs or not state.best_global_step:
            return
        self.publisher.wait()  # the best step's upload (and, on rank 0, commit) is done
        barrier()  # every node's publisher is done, so rank 0 has committed the best step
        best = state.best_global_step
        local_dir = local_checkpoint(args.output_dir or "", best)
        with local_main_first(self.dist):
            # One node wrote only its own ranks' shards; a restart has no local copy at all.
            if self.dist.is_local_main and (self.dist.nodes > 1 or not local_dir.is_dir()):
                stored = [
                    c for c in scan_checkpoints(self.store, self.plan) if c.step == best and c.committed
                ]
                if not stored:
                    raise RetriableError(
                        f"the best checkpoint (step {best}) is not committed under "
                        f"{self.plan.artifacts.checkpoints_uri}; it cannot become the model"
                    )
                download_checkpoint(self.store, stored[0], local_dir)
        state.best_model_checkpoint = str(local_dir)
        log.info(
            "the best evaluation was at step %d (%s %s)", best, args.metric_for_best_model, state.best_metric
        )


def outcome(plan: RunPlan, trainer: Trainer) -> dict[str, Any] | None:
    """metrics.json's ``early_stopping``: which step won, its metric, and why training stopped."""
    hp = plan.hyperparameters
    if hp is None or hp.early_stopping is None:
        return None
    state = trainer.state
    # A restored callback replaces the one the recipe passed, so look it up.
    counters = [
        c.early_stopping_patience_counter
        for c in trainer.callback_handler.callbacks
        if isinstance(c, EarlyStoppingCallback)
    ]
    stopped = bool(counters) and counters[0] >= hp.early_stopping.patience
    early = stopped and state.global_step < state.max_steps
    return {
        "metric": hp.early_stopping.metric,
        "best_step": state.best_global_step,
        "best_metric": state.best_metric,
        "stop_reason": EARLY_STOPPED if early else MAX_STEPS_REACHED,
        "stopped_at_step": state.global_step,
        "patience": hp.early_stopping.patience,
        "threshold": hp.early_stopping.threshold,
    }
