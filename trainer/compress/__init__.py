"""``python -m kubetune.trainer compress --plan PLAN.json [--scratch-dir DIR]``: the compression recipe.

Reads top to bottom: check the plan and the hardware (before any download) -> download the model
and read the data -> distill (a torchrun gang with DeepSpeed, like fine-tuning) -> prune and
quantize (rank 0, one llm-compressor ``oneshot`` recipe; or torchao) -> evaluate the original
and the result on the same held-out data -> write ``<output>/model/``, ``<output>/recipe.yaml``,
``<output>/compression_report.json`` and ``<output>/run.json``.

Output formats:

- llm-compressor results are saved with ``save_compressed=True``: compressed-tensors checkpoints
  (``pack-quantized`` int4/int8 weights, ``float-quantized`` FP8, ``int-quantized`` W8A8,
  ``sparse-bitmask`` / ``sparse-24-bitmask`` for pruned weights) with the recipe as
  ``model/recipe.yaml``. vLLM serves them; transformers loads them on CPU by decompressing to dense
  weights at load time (so CPU inference is not faster, only the download is smaller).
- torchao results are safetensors with torchao's tensor-subclass metadata and a
  ``quantization_config`` of ``quant_method: torchao`` in ``config.json``: transformers loads them
  with ``from_pretrained`` when ``torchao`` is installed, and runs the int8 kernels on CPU.
- A distilled student without further steps is a plain Hugging Face checkpoint.

The report's headline keys map onto the CompressJob's ``status.results``: ``original.size_bytes``
-> originalSizeBytes, ``compressed.size_bytes`` -> compressedSizeBytes, ``size_ratio`` -> sizeRatio,
``original.parameters`` -> originalParameters, ``compressed.parameters`` -> compressedParameters,
``original.metrics`` -> metricsBefore, ``compressed.metrics`` -> metricsAfter.

Exit codes follow :mod:`kubetune.errors`: 0 done, 2 invalid input (bad plan, unsupported recipe
or hardware, unusable model or data), 3 storage access, anything else retriable (distillation then
resumes from its newest committed checkpoint).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.api.resources import PruningMethod, QuantizationMethod
from kubetune.api.spec import TaskType
from kubetune.errors import InvalidInputError
from kubetune.ownership import republish
from kubetune.run.artifacts import MODEL_DIR, REPORT_FILE, RUN_RECORD_FILE
from kubetune.run.plan import RunPlan
from kubetune.run.workloads import runs_distributed
from kubetune.storage import ObjectStore, open_store
from kubetune.trainer.compress import recipes
from kubetune.trainer.runtime import parse_runtime_args, run_main, scratch_root, storage_config

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from kubetune.run.deepspeed import Accelerator
    from kubetune.trainer.compress.examples import CompressionData
    from kubetune.trainer.training import Distributed

log = logging.getLogger("kubetune.trainer.compress")

RECIPE_FILE = "recipe.yaml"
REPORT_VERSION = 1


def parse_args(argv: list[str]) -> argparse.Namespace:
    return parse_runtime_args(argv, command="compress", doc=__doc__)


def load_plan(path: Path) -> RunPlan:
    """The plan a compression run can run (exit code 2 for anything else, before any download)."""
    plan = RunPlan.from_file(path)
    recipes.check_plan(plan)
    return plan


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    return run_main(lambda: run(args.plan, args.scratch_dir))


def run(plan_path: Path, scratch_dir: Path | None) -> int:
    plan = load_plan(plan_path)
    compression = recipes.check_plan(plan)
    scratch = scratch_root(scratch_dir)
    # Before DeepSpeed is imported: it picks its accelerator once.
    from kubetune.trainer.training import select_accelerator

    accelerator = select_accelerator()
    recipes.check_hardware(compression, recipes.Hardware.detect(accelerator))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(scratch / "torch-extensions"))
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(scratch / "logs")

    from kubetune.trainer import training

    dist = training.init_distributed(accelerator) if runs_distributed(plan) else None
    try:
        compress(plan, scratch, dist, accelerator)
    finally:
        training.shutdown_distributed()
    return 0


def compress(plan: RunPlan, scratch: Path, dist: Distributed | None, accelerator: Accelerator) -> None:
    """The recipe: setup -> distill -> prune/quantize -> evaluate -> save."""
    from kubetune.trainer import outputs, training, usage
    from kubetune.trainer.compress import examples

    compression = plan.compression
    assert compression is not None
    clock = outputs.Timings()
    store = open_store(plan.output_uri, storage_config(plan))
    is_main = dist is None or dist.is_main

    # --- setup ---------------------------------------------------------------------------------
    outputs.guard_output(store, plan)
    started_at = outputs.now()
    if is_main:
        write_run_record(store, plan, {"status": "running", "started_at": started_at})
    base_dir = scratch / "original"
    with clock.phase("download"):
        if dist is None:
            _download(plan, base_dir)
        else:
            with training.local_main_first(dist):
                if dist.is_local_main:
                    _download(plan, base_dir)
    with clock.phase("load_data"):
        tokenizer = training.load_tokenizer(base_dir, plan.model_uri)
        local_rank = dist.local_rank if dist is not None else 0
        data = examples.prepare(plan, tokenizer, scratch / f"data-{local_rank}")
    entries: list[dict[str, Any]] = []
    current = base_dir

    # --- distill -------------------------------------------------------------------------------
    distilled = None
    if compression.distillation is not None:
        assert dist is not None
        from kubetune.trainer.compress.distill import distill

        distilled = distill(
            plan,
            teacher_dir=base_dir,
            tokenizer=tokenizer,
            scratch=scratch,
            dist=dist,
            accelerator=accelerator,
            store=store,
            clock=clock,
        )
        # Pruning, quantization and evaluation run in rank 0 alone, outside any process group
        # (llm-compressor would otherwise split calibration across ranks that have gone).
        training.barrier()
        training.shutdown_distributed()
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # type: ignore[no-untyped-call]
        if not is_main:
            return
        current = distilled.student_dir
        entries.append(_distill_entry(plan, distilled.to_json()))

    # --- prune and quantize --------------------------------------------------------------------
    work = scratch / "compressed"
    if recipes.uses_llmcompressor(compression):
        with clock.phase("compress"):
            entry, current = _run_llmcompressor(plan, current, tokenizer, data, work / "llmcompressor")
        entries.append(entry)
    quantization = compression.quantization
    if quantization is not None and quantization.method == QuantizationMethod.torchao:
        with clock.phase("quantize_torchao"):
            entry, current = _run_torchao(plan, current, tokenizer, work / "torchao")
        entries.append(entry)

    # --- evaluate ------------------------------------------------------------------------------
    from kubetune.trainer.compress.evaluate import measure
    from kubetune.trainer.data.collation import pad_token_id

    device = "cuda" if accelerator == "cuda" else "cpu"
    # CPUs compute bf16/fp16 slowly and less exactly; both sides are measured in fp32 there.
    dtype: Any = "auto" if device == "cuda" else _float32()
    common = {
        "task": plan.task.type,
        "examples": data.evaluation,
        "pad_id": pad_token_id(tokenizer),
        "ignore": recipes.quantization_ignore(compression),
        "dtype": dtype,
        "device": device,
    }
    with clock.phase("evaluate_original"):
        original, scored = measure(base_dir, what=f"the original model {plan.model_uri}", **common)
    with clock.phase("evaluate_compressed"):
        compressed, _ = measure(current, what="the compressed model", **common)

    # --- save ----------------------------------------------------------------------------------
    with clock.phase("upload"):
        if current == base_dir:
            raise InvalidInputError("no compression step produced a model")  # check_plan rules this out
        model_uri = plan.output(MODEL_DIR)
        # Upload, then drop an earlier attempt's stale files: never delete-then-upload.
        republish(store, outputs.output_owner(plan), plan.output_uri, current, model_uri)
        recipe_text = recipes.recipe_document(entries)
        store.write_bytes(plan.output(RECIPE_FILE), recipe_text.encode("utf-8"))
    report = build_report(
        plan,
        original=original.to_json(),
        compressed=compressed.to_json(),
        entries=entries,
        evaluation={
            "data": data.eval_source,
            "examples": len(data.evaluation),
            "scored": scored,
            "scored_unit": "examples" if plan.task.type == TaskType.sequence_classification else "tokens",
            "max_seq_length": data.max_length,
            # On GPUs each model runs in the dtype it is stored in.
            "dtype": str(dtype).removeprefix("torch.") if dtype != "auto" else f"auto ({original.dtype})",
            "device": device,
        },
        timings=clock.seconds,
    )
    report["usage"] = usage.measure_compression(
        plan,
        phases_s=clock.seconds,
        parameters=int(report["original"]["parameters"]),
        accelerator=accelerator,
    )
    outputs.write_json(store, plan.output(REPORT_FILE), report)
    from kubetune.trainer.progress import make_reporter
    from kubetune.trainer.tracking import start_tracking

    # The operator also reads the report, but a reporter with Kubernetes access sets status.results
    # at once, without waiting for the operator to notice the Job completed.
    reporter = make_reporter(plan, 0)
    try:
        reporter.report_results(results_summary(report))
        reporter.report_usage(usage.status_usage(report["usage"]))
        # Only rank 0 is left here; the MLflow run holds the report, its figures and the version.
        tracking = start_tracking(plan, plan.tracking, rank=0, sink=reporter, resolved={"device": device})
        tracking.succeeded(report=report, results=results_summary(report))
    finally:
        reporter.close()
    write_run_record(
        store,
        plan,
        {
            "status": "succeeded",
            "started_at": started_at,
            "finished_at": outputs.now(),
            "steps": report["steps"],
            "results": results_summary(report),
            "distillation": distilled.to_json() if distilled is not None else None,
            "timings_s": clock.seconds,
        },
    )
    log.info(
        "compressed %s: %d -> %d bytes (%.2fx), %s -> %s",
        plan.model_uri,
        original.size_bytes,
        compressed.size_bytes,
        report["size_ratio"] or 0.0,
        original.metrics,
        compressed.metrics,
    )
    shutil.rmtree(work, ignore_errors=True)


def _float32() -> Any:
    import torch

    return torch.float32


def _download(plan: RunPlan, base_dir: Path) -> None:
    if base_dir.exists():
        shutil.rmtree(base_dir)
    open_store(plan.model_uri, storage_config(plan)).download_prefix(plan.model_uri, base_dir)
    if not (base_dir / "config.json").is_file():
        raise InvalidInputError(
            f"model {plan.model_uri} holds no config.json: not a Hugging Face model directory"
        )


def _auto_class(task: TaskType) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return (
        AutoModelForSequenceClassification
        if task == TaskType.sequence_classification
        else AutoModelForCausalLM
    )


def _run_llmcompressor(
    plan: RunPlan, model_dir: Path, tokenizer: PreTrainedTokenizerBase, data: CompressionData, out_dir: Path
) -> tuple[dict[str, Any], Path]:
    """Prune and/or quantize in one ``oneshot`` pass; returns the recipe entry and the saved model."""
    from importlib import metadata

    from llmcompressor.entrypoints.oneshot import oneshot

    from kubetune.trainer.compress.examples import calibration_dataset, sample

    compression = plan.compression
    assert compression is not None
    try:
        model = _auto_class(plan.task.type).from_pretrained(model_dir, dtype="auto")
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise InvalidInputError(
            f"model {plan.model_uri}: cannot load it for {plan.task.type.value}: {e}"
        ) from e
    recipes.check_group_size(model, compression)
    tools = []
    pruning = compression.pruning
    if pruning is not None and pruning.method == PruningMethod.magnitude:
        zeroed = recipes.magnitude_prune(model, pruning)
        log.info("magnitude pruning zeroed %d weights", zeroed)
        tools.append(f"torch {metadata.version('torch')} (torch.nn.utils.prune, magnitude)")
    modifiers = recipes.llmcompressor_modifiers(compression)
    recipe_yaml = recipes.llmcompressor_recipe_yaml(modifiers) if modifiers else None
    calibration: dict[str, Any] = {"samples_requested": compression.calibration.samples, "samples_used": 0}
    kwargs: dict[str, Any] = {}
    if modifiers and recipes.needs_calibration(compression):
        seed = plan.hyperparameters.seed if plan.hyperparameters else 42
        chosen = sample(data.calibration, compression.calibration.samples, seed)
        if len(chosen) < compression.calibration.samples:
            log.warning(
                "calibration.samples is %d but dataset.train has %d usable records: calibrating on all of them",
                compression.calibration.samples,
                len(chosen),
            )
        kwargs = {
            "dataset": calibration_dataset(chosen),
            "num_calibration_samples": len(chosen),
            "max_seq_length": data.max_length,
            "shuffle_calibration_samples": False,
            "batch_size": 1,
        }
        calibration.update(
            samples_used=len(chosen),
            max_seq_length=data.max_length,
            tokens=sum(len(e["input_ids"]) for e in chosen),
        )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    if modifiers:
        oneshot(model=model, recipe=modifiers, tokenizer=tokenizer, **kwargs)
        tools.append(f"llmcompressor {metadata.version('llmcompressor')}")
        model.save_pretrained(out_dir, save_compressed=True)
    else:
        model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    del model
    quantization = compression.quantization
    if quantization is not None and quantization.method == QuantizationMethod.torchao:
        quantization = None  # torchao runs as a step of its own, after this one
    method = recipes.quantization_after_pruning(compression) if quantization is not None else None
    entry: dict[str, Any] = {
        "step": "+".join(
            name
            for name, present in (
                (recipes.STEP_PRUNE, pruning is not None),
                (recipes.STEP_QUANTIZE, quantization is not None),
            )
            if present
        ),
        "tool": " + ".join(tools),
        "pruning": pruning.model_dump(mode="json", by_alias=True) if pruning else None,
        "quantization": quantization.model_dump(mode="json", by_alias=True) if quantization else None,
        "quantization_method_run": method.value if method is not None else None,
        "calibration": calibration,
        "format": "compressed-tensors" if modifiers else "dense",
    }
    if recipe_yaml is not None:
        entry["recipe"] = recipe_yaml
    return entry, out_dir


def _run_torchao(
    plan: RunPlan, model_dir: Path, tokenizer: PreTrainedTokenizerBase, out_dir: Path
) -> tuple[dict[str, Any], Path]:
    """Int8 with torchao through transformers' ``TorchAoConfig`` (quantized while loading)."""
    from importlib import metadata

    from compressed_tensors.utils import match_named_modules
    from transformers import TorchAoConfig

    compression = plan.compression
    assert compression is not None
    assert compression.quantization is not None
    quantization = compression.quantization
    auto = _auto_class(plan.task.type)
    try:
        dense = auto.from_pretrained(model_dir, dtype="auto")
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise InvalidInputError(
            f"model {plan.model_uri}: cannot load it for {plan.task.type.value}: {e}"
        ) from e
    # TorchAoConfig takes module names; quantization.ignore may hold re: patterns.
    skipped = sorted(
        name
        for name, _ in match_named_modules(dense, ["Linear"])
        if _ignored(name, recipes.quantization_ignore(compression))
    )
    del dense
    config = TorchAoConfig(quant_type=recipes.torchao_config(quantization), modules_to_not_convert=skipped)
    model = auto.from_pretrained(model_dir, dtype="auto", quantization_config=config)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    del model
    entry = {
        "step": recipes.STEP_QUANTIZE,
        "tool": f"torchao {metadata.version('torchao')} via transformers TorchAoConfig",
        "quantization": quantization.model_dump(mode="json", by_alias=True),
        "torchao_config": type(recipes.torchao_config(quantization)).__name__,
        "modules_not_converted": skipped,
        "format": "torchao",
    }
    return entry, out_dir


def _ignored(name: str, patterns: list[str]) -> bool:
    import re

    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif name == pattern or name.endswith(f".{pattern}"):
            return True
    return False


def _distill_entry(plan: RunPlan, result: dict[str, Any]) -> dict[str, Any]:
    from importlib import metadata

    compression = plan.compression
    assert compression is not None
    assert compression.distillation is not None
    return {
        "step": recipes.STEP_DISTILL,
        "tool": f"transformers {metadata.version('transformers')} Trainer + deepspeed {metadata.version('deepspeed')}",
        "distillation": compression.distillation.model_dump(mode="json", by_alias=True, exclude_none=True),
        "result": result,
    }


# --- the report ----------------------------------------------------------------------------------


def _delta(before: dict[str, float], after: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    absolute: dict[str, float] = {}
    relative: dict[str, float] = {}
    for key in sorted(set(before) & set(after)):
        absolute[key] = after[key] - before[key]
        if before[key] != 0:
            relative[key] = (after[key] - before[key]) / abs(before[key])
    return absolute, relative


def build_report(
    plan: RunPlan,
    *,
    original: dict[str, Any],
    compressed: dict[str, Any],
    entries: list[dict[str, Any]],
    evaluation: dict[str, Any],
    timings: dict[str, float],
) -> dict[str, Any]:
    """``compression_report.json`` (see the module docstring for the status mapping)."""
    from kubetune.trainer.outputs import package_versions

    compression = plan.compression
    assert compression is not None
    absolute, relative = _delta(original["metrics"], compressed["metrics"])
    size_ratio = original["size_bytes"] / compressed["size_bytes"] if compressed["size_bytes"] else None
    linear_before, linear_after = original.get("linear_weight_bytes"), compressed.get("linear_weight_bytes")
    versions = package_versions()
    for name in ("llmcompressor", "compressed-tensors", "torchao"):
        try:
            from importlib import metadata

            versions[name] = metadata.version(name)
        except Exception:
            continue
    return {
        "report_version": REPORT_VERSION,
        "model_uri": plan.model_uri,
        "output_uri": plan.output(MODEL_DIR),
        "task": plan.task.type.value,
        "steps": recipes.steps(compression),
        "recipe": plan.output(RECIPE_FILE),
        "original": original,
        "compressed": compressed,
        "size_ratio": size_ratio,
        "linear_weight_ratio": (linear_before / linear_after) if linear_before and linear_after else None,
        "parameter_ratio": original["parameters"] / compressed["parameters"]
        if compressed["parameters"]
        else None,
        "quality_delta": absolute,
        "quality_delta_relative": relative,
        "evaluation": evaluation,
        "steps_applied": [{k: v for k, v in e.items() if k != "recipe"} for e in entries],
        "timings": timings,
        "peak_rss_bytes": peak_rss_bytes(),
        "versions": versions,
    }


def peak_rss_bytes() -> int:
    """This process's peak resident set. ``VmHWM`` where Linux has it: ``getrusage``'s maxrss also
    counts the parent's memory at fork time, which inflates it for processes started by a large one."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def results_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The report's headline figures under the names of the CompressJob's ``status.results``."""
    return {
        "originalSizeBytes": report["original"]["size_bytes"],
        "compressedSizeBytes": report["compressed"]["size_bytes"],
        "sizeRatio": report["size_ratio"],
        "originalParameters": report["original"]["parameters"],
        "compressedParameters": report["compressed"]["parameters"],
        "metricsBefore": report["original"]["metrics"],
        "metricsAfter": report["compressed"]["metrics"],
    }


def write_run_record(store: ObjectStore, plan: RunPlan, record: dict[str, Any]) -> None:
    """``<output>/run.json``, the same record fine-tuning writes (``guard_output`` reads it to
    recognise a prefix that belongs to this job)."""
    from kubetune.trainer.checkpoint import job_identity
    from kubetune.trainer.outputs import package_versions, write_json

    full = {
        "job": job_identity(plan.job),
        "kind": plan.job.kind,
        "plan": json.loads(plan.to_json()),
        "versions": package_versions(),
        "artifacts": {
            "model": plan.output(MODEL_DIR),
            "recipe": plan.output(RECIPE_FILE),
            "report": plan.output(REPORT_FILE),
        },
        **record,
    }
    write_json(store, plan.output(RUN_RECORD_FILE), full)
