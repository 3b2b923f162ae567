"""``python -m kubetune.trainer finetune --plan PLAN.json [--scratch-dir DIR]``: the fine-tuning recipe.

torchrun starts one such process per GPU (or per CPU slot) in every pod. The recipe reads top to
bottom: setup (process group, output guard, base model, data, Trainer, newest committed
checkpoint) -> train -> save (model, adapter, metrics, logs, run record) -> cleanup. The moving
parts live in :mod:`~kubetune.trainer.training`, :mod:`~kubetune.trainer.checkpoint` and
:mod:`~kubetune.trainer.outputs`.

Exit codes follow :mod:`kubetune.errors`: 0 done, 2 invalid input, 3 storage access, else retriable
(the operator restarts the gang and this recipe resumes from the newest committed checkpoint).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.api.spec import TaskType
from kubetune.errors import InvalidInputError
from kubetune.run.artifacts import LOGS_DIR
from kubetune.run.plan import RunPlan
from kubetune.storage import open_store
from kubetune.trainer.runtime import parse_runtime_args, run_main, scratch_root, storage_config

if TYPE_CHECKING:
    from transformers import TrainingArguments

    from kubetune.run.deepspeed import Accelerator
    from kubetune.trainer.outputs import StartupClock
    from kubetune.trainer.training import Distributed

log = logging.getLogger("kubetune.trainer.finetune")


def parse_args(argv: list[str]) -> argparse.Namespace:
    return parse_runtime_args(argv, command="finetune", doc=__doc__)


def load_plan(path: Path) -> RunPlan:
    """The plan a fine-tuning run can run (exit code 2 for anything else)."""
    plan = RunPlan.from_file(path)
    if plan.kind != "finetune" or plan.hyperparameters is None:
        raise InvalidInputError(
            f"{path} is a {plan.kind} plan without training settings, not a finetune plan"
        )
    return plan


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    return run_main(lambda: run(args.plan, args.scratch_dir))


def run(plan_path: Path, scratch_dir: Path | None) -> int:
    plan = load_plan(plan_path)
    scratch = scratch_root(scratch_dir)
    # Before DeepSpeed is imported: it picks its accelerator once. Pods have a read-only root
    # filesystem, so anything compiled at start-up (CPU Adam for offloading) goes to scratch.
    from kubetune.trainer.training import select_accelerator

    accelerator = select_accelerator()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(scratch / "torch-extensions"))
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(scratch / LOGS_DIR)

    import deepspeed  # noqa: F401  (imported here so the start-up clock can tell imports apart)
    import transformers.trainer  # noqa: F401

    from kubetune.trainer import training
    from kubetune.trainer.outputs import StartupClock

    startup = StartupClock()  # counts from the process's start, whenever it is created
    startup.mark("imports")
    dist = training.init_distributed(accelerator)
    startup.mark("process_group")
    try:
        finetune(plan, scratch, dist, accelerator, startup)
    finally:
        training.shutdown_distributed()
    return 0


def finetune(
    plan: RunPlan, scratch: Path, dist: Distributed, accelerator: Accelerator, startup: StartupClock
) -> None:
    """The recipe: setup -> train -> save -> cleanup."""
    from transformers import PrinterCallback, Trainer

    from kubetune.trainer import (
        checkpoint,
        classification_report,
        early_stopping,
        outputs,
        preference,
        robustness,
        training,
        usage,
    )
    from kubetune.trainer.data.collation import make_collator, pad_token_id, prepare_datasets
    from kubetune.trainer.data.formats import effective_max_length
    from kubetune.trainer.progress import ProgressCallback, make_reporter
    from kubetune.trainer.tracking import start_tracking

    hp = plan.hyperparameters
    assert hp is not None
    clock = outputs.Timings()
    config = storage_config(plan)
    out = open_store(plan.output_uri, config)

    # --- setup ---------------------------------------------------------------------------------
    # Every rank checks, so all of them stop on someone else's prefix.
    previous_run = outputs.guard_output(out, plan)
    precision = training.resolve_precision(hp.precision, accelerator)
    ds_config = training.deepspeed_config(plan, precision, accelerator)
    if "optimizer" in ds_config and accelerator == "cuda":
        with training.local_main_first(dist):
            training.check_cpu_adam(accelerator)
    base_dir = scratch / "base-model"
    with clock.phase("download"), training.local_main_first(dist):
        if dist.is_local_main:
            shutil.rmtree(base_dir, ignore_errors=True)
            open_store(plan.model_uri, config).download_prefix(plan.model_uri, base_dir)
    startup.mark("downloaded")
    dpo = preference.dpo_settings(plan) is not None
    reference_uri = preference.reference_source(plan)
    reference_dir = base_dir if reference_uri == plan.model_uri else scratch / "reference-model"
    if reference_uri is not None and reference_dir != base_dir:
        with clock.phase("download"), training.local_main_first(dist):
            if dist.is_local_main:
                shutil.rmtree(reference_dir, ignore_errors=True)
                open_store(reference_uri, config).download_prefix(reference_uri, reference_dir)
    with clock.phase("load"):
        tokenizer = training.load_tokenizer(base_dir, plan.model_uri)
        data = prepare_datasets(plan, tokenizer, scratch / f"data-{dist.local_rank}")
        trainer_dir = scratch / "trainer"
        args: TrainingArguments
        if dpo:
            args = preference.dpo_arguments(
                plan,
                output_dir=trainer_dir,
                precision=precision,
                ds_config=ds_config,
                has_eval=data.eval is not None,
                max_length=effective_max_length(plan, tokenizer),
            )
        else:
            args = training.training_arguments(
                plan,
                output_dir=trainer_dir,
                precision=precision,
                ds_config=ds_config,
                has_eval=data.eval is not None,
            )
            # Tokens per second and MFU in metrics.json (one scalar gathered per step).
            args.include_num_input_tokens_seen = "non_padding"
        # With DPO, trl adds the LoRA adapters itself: it switches them off for the reference.
        model = training.load_model(
            plan, base_dir, precision=precision, pad_token_id=pad_token_id(tokenizer), adapters=not dpo
        )
        reference = (
            preference.load_reference(reference_dir, reference_uri, precision) if reference_uri else None
        )
    startup.mark("loaded")
    with clock.phase("resume_download"):
        resume = checkpoint.prepare_resume(out, plan, dist, trainer_dir, owned=previous_run is not None)
    record: dict[str, Any] = {
        "status": "running",
        "started_at": outputs.now(),
        "world": {
            "processes": dist.world_size,
            "nodes": dist.nodes,
            "accelerator": accelerator,
            "precision": precision.value,
        },
        "resumed_from": {"step": resume.step, "uri": resume.uri} if resume else None,
        "data": asdict(data.stats),
    }
    if dist.is_main:
        outputs.write_run_record(out, plan, record)
    logs_dir = scratch / LOGS_DIR
    reporter = make_reporter(plan, dist.rank)
    resolved = {"precision": precision.value, "accelerator": accelerator, "processes": dist.world_size}
    tracking = start_tracking(
        plan, plan.tracking, rank=dist.rank, sink=reporter, resolved={**resolved, "deepspeed": ds_config}
    )

    def after_commit(step: int, uri: str) -> None:
        # The operator has no storage credentials: the newest checkpoint reaches status from here.
        reporter.report_checkpoint(step, uri)
        outputs.upload_logs(out, plan, logs_dir)

    publisher = checkpoint.CheckpointPublisher(
        out,
        plan,
        dist,
        keep_last=plan.checkpoint.keep_last if plan.checkpoint else 2,
        after_commit=after_commit,
    )
    callbacks = [ProgressCallback(reporter), publisher, startup, *tracking.callbacks()]
    stopping = early_stopping.stopping_callback(plan)
    if stopping is not None:
        callbacks += [stopping, early_stopping.BestCheckpoint(out, plan, dist, publisher)]
    trainer: Trainer
    recorder: classification_report.PredictionRecorder | None = None
    if dpo:
        trainer = preference.dpo_trainer(
            plan,
            model=model,
            reference=reference,
            args=args,
            train=data.train,
            evaluation=data.eval,
            tokenizer=tokenizer,
            callbacks=callbacks,
        )
    else:
        compute_metrics, preprocess_logits = training.metric_functions(plan)
        if plan.task.type == TaskType.sequence_classification and compute_metrics is not None:
            # Keeps the final evaluation's classes for the full report and eval_predictions.jsonl.
            compute_metrics = recorder = classification_report.PredictionRecorder(compute_metrics)
        # The Trainer measuring tokens/s and padding, with the adversarial loss where asked for.
        trainer = robustness.trainer_class(plan)(
            model=model,
            args=args,
            train_dataset=data.train,
            eval_dataset=data.eval,
            data_collator=make_collator(tokenizer, plan),
            processing_class=tokenizer,
            compute_metrics=compute_metrics,
            preprocess_logits_for_metrics=preprocess_logits,
            callbacks=callbacks,
        )
    trainer.remove_callback(PrinterCallback)  # the progress reporter already logs every update
    if plan.task.type == TaskType.sequence_classification:
        # Classifiers average their loss over the batch themselves (BERT's ignores the item count
        # the Trainer passes), so the Trainer must not scale it by the number of processes again.
        trainer.model_accepts_loss_kwargs = False

    try:
        # --- train -----------------------------------------------------------------------------
        with clock.phase("train"):
            result = trainer.train(resume_from_checkpoint=str(resume.local_dir) if resume else None)
        with clock.phase("evaluate"):
            eval_metrics = trainer.evaluate() if data.eval is not None else {}

        # --- save ------------------------------------------------------------------------------
        trained_dir = scratch / "final" / "trained"
        with clock.phase("save"):
            outputs.save_trained(trainer, trained_dir)  # every rank: ZeRO-3 gathers collectively
        training.barrier()
        if dist.is_main:
            with clock.phase("upload"):
                outputs.publish_model(
                    out,
                    plan,
                    trained_dir=trained_dir,
                    base_dir=base_dir,
                    work_dir=scratch / "final",
                    tokenizer=tokenizer,
                )
                state = trainer.state
                metrics = outputs.final_metrics(plan, state.log_history, eval_metrics, state.global_step)
                if recorder is not None and recorder.labels:
                    metrics["classification_report"] = classification_report.classification_report(
                        recorder.labels, recorder.predicted, classification_report.class_names(plan)
                    )
                    classification_report.write_predictions(out, plan, recorder)
                stopped = early_stopping.outcome(plan, trainer)
                if stopped is not None:
                    metrics["early_stopping"] = stopped
                metrics["usage"] = usage.measure(
                    plan,
                    trainer,
                    phases_s={**clock.seconds, "checkpoint_upload": round(publisher.stats.seconds, 3)},
                    train_seconds=float(result.metrics.get("train_runtime", 0.0)),
                    process_started=startup.process_started,
                    accelerator=accelerator,
                )
                reporter.report_usage(usage.status_usage(metrics["usage"]))
                reporter.report_results(outputs.status_results(metrics))
                outputs.write_json(out, plan.artifacts.metrics_uri, metrics)
                outputs.upload_logs(out, plan, logs_dir)
            record.update(
                status="succeeded",
                finished_at=outputs.now(),
                global_step=state.global_step,
                total_steps=state.max_steps,
                checkpoints_committed=publisher.stats.committed,
                metrics=metrics,
                trainer_metrics=result.metrics,
                timings_s={**clock.seconds, "checkpoint_upload": round(publisher.stats.seconds, 3)},
                startup_s=startup.marks,
                process_started_at=startup.started_at,
            )
            outputs.write_run_record(out, plan, record)  # last: the run is complete
            log.info("finished at step %d: %s", state.global_step, metrics)
            tracking.succeeded(metrics=metrics, step=state.global_step)
    except BaseException:
        tracking.failed()
        raise
    # --- cleanup -----------------------------------------------------------------------------------
    finally:
        reporter.close()
