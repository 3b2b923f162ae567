"""``python -m kubetune.trainer validate --plan PLAN [--json]``: the pre-flight check.

The operator runs this in a one-CPU Job before it starts the (expensive) training gang. It checks,
without a GPU and without loading weights, that the model and the data are reachable and
well-formed:

- model: objects under ``model.uri``, weight files (``*.safetensors``, ``*.bin``, or an index whose
  shards all exist), a loadable config and tokenizer, and that the model type has the head the task
  needs (and the same number of labels, when it already has a classification head);
- the DPO reference model, when ``method.dpo.referenceModel.uri`` names one: it exists, with a
  config, weights and the base model's vocabulary;
- data: every record parses, required fields are present, labels are known, the evaluation split
  is not empty; token lengths against ``maxSeqLength`` are summarised;
- memory (fine-tuning): the memory plan of one training process from the model's config
  (:mod:`kubetune.run.memory`) against each GPU and the container memory limit. A plan that cannot
  fit fails with reason ``WillNotFit`` and the numbers, unless the job carries the annotation
  ``kubetune.io/skip-memory-check: "true"``.

It reports every problem (the first 50 of each kind, with counts) and exits 0 when everything is
usable, 2 when the input is invalid and 3 when the model or data is missing or access is denied,
writing a one-line summary to ``/dev/termination-log`` for the operator's condition message.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from kubetune.api.spec import DataFormat, TaskType
from kubetune.errors import EXIT_INVALID_INPUT, EXIT_OK, EXIT_STORAGE, InvalidInputError, StorageAccessError
from kubetune.ownership import check_inputs, plan_inputs
from kubetune.run import memory
from kubetune.run.plan import RunPlan
from kubetune.storage import open_store
from kubetune.trainer import data
from kubetune.trainer.runtime import run_main, scratch_root, storage_config, write_termination_message

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

PROBLEMS_PER_KIND: Final = 50
# Weights and other large binaries are never downloaded by validation: their presence is enough.
_BINARY_SUFFIXES: Final = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".onnx",
    ".gguf",
)
_NOT_WEIGHTS: Final = ("training_args.bin", "optimizer.bin", "scheduler.bin")
_WEIGHT_INDEXES: Final = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_MAX_SMALL_FILE: Final = 256 * 1024 * 1024  # tokenizer files are at most tens of MiB
_POSITION_ATTRIBUTES: Final = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
# The problem kind of a plan that cannot fit; when it is the only one, the summary (and so the
# termination message the operator reads) starts with the reason WillNotFit.
WILL_NOT_FIT: Final = "WillNotFit"


@dataclass
class ModelReport:
    uri: str
    files: int = 0
    weight_files: list[str] = field(default_factory=list)
    weight_bytes: int = 0
    model_type: str | None = None
    architectures: list[str] | None = None
    num_labels: int | None = None
    max_positions: int | None = None
    tokenizer: str | None = None
    vocab_size: int | None = None
    chat_template: bool | None = None
    generation_blocks: bool | None = None


@dataclass
class SplitReport:
    uri: str | None
    files: list[str]
    records_read: int
    records_usable: int
    lengths: data.LengthStats | None = None
    dropped: int = 0


@dataclass
class Report:
    ok: bool
    exit_code: int
    summary: str
    plan: str
    model: ModelReport | None
    train: SplitReport | None = None
    eval: SplitReport | None = None
    eval_note: str | None = None
    label_counts: dict[str, int] | None = None
    steps_per_epoch: int | None = None
    problems: list[dict[str, Any]] = field(default_factory=list)
    problem_counts: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    memory: MemoryReport | None = None


@dataclass
class MemoryReport:
    """The memory plan of one training process and its checks (:mod:`kubetune.run.memory`)."""

    parameters: int
    trainable: int
    rows: list[dict[str, Any]]
    checks: list[dict[str, Any]]
    table: str
    will_not_fit: str | None = None
    skipped: bool = False


# --- model ---------------------------------------------------------------------------------------


def _is_weight_file(name: str) -> bool:
    return name.endswith((".safetensors", ".bin")) and name not in _NOT_WEIGHTS and "/" not in name


def inspect_model(
    plan: RunPlan, scratch_dir: Path, problems: data.ProblemLog, warnings: list[str]
) -> tuple[ModelReport, PreTrainedTokenizerBase | None]:
    """Check the model directory; return what was found and its tokenizer (if it loads)."""
    uri = plan.model_uri
    report = ModelReport(uri=uri)
    try:
        store = open_store(uri, storage_config(plan))
        objects = store.list(uri)
    except (StorageAccessError, InvalidInputError) as e:
        problems.add_error(e, "model")
        return report, None
    if not objects:
        problems.add(
            "model",
            f"model.uri {uri}: no objects found there; it must be a directory with config.json, "
            "weights and tokenizer files",
            storage=True,
        )
        return report, None
    report.files = len(objects)
    names = {obj.key: obj.size for obj in objects}
    report.weight_files = sorted(name for name in names if _is_weight_file(name))
    report.weight_bytes = sum(names[name] for name in report.weight_files)

    local = scratch_dir / "model"
    local.mkdir(parents=True, exist_ok=True)
    base = uri.rstrip("/")
    try:
        for name, size in sorted(names.items()):
            if "/" in name or name.endswith(_BINARY_SUFFIXES) or size > _MAX_SMALL_FILE:
                continue
            store.download_file(f"{base}/{name}", local / name)
    except (StorageAccessError, InvalidInputError) as e:
        problems.add_error(e, "model")
        return report, None

    _check_weights(uri, names, local, report, problems)
    config = _load_config(uri, local, names, problems)
    tokenizer = _load_tokenizer(uri, local, problems)
    if config is not None:
        report.model_type = config.model_type
        report.architectures = list(getattr(config, "architectures", None) or []) or None
        report.num_labels = getattr(config, "num_labels", None)
        report.max_positions = _max_positions(config)
        _check_task(plan, config, report, problems, warnings)
    if tokenizer is not None:
        report.tokenizer = type(tokenizer).__name__
        report.vocab_size = len(tokenizer)
        template = data.chat_template_of(tokenizer)
        report.chat_template = template is not None
        report.generation_blocks = data.has_generation_blocks(template)
        if plan.dataset.format == DataFormat.chat and template is None:
            problems.add(
                "model",
                f"model.uri {uri}: dataset.format chat needs a tokenizer with a chat template, "
                "and this tokenizer has none (add chat_template to tokenizer_config.json or "
                "chat_template.jinja, or use the instruction format)",
            )
    return report, tokenizer


def _check_weights(
    uri: str, names: dict[str, int], local: Path, report: ModelReport, problems: data.ProblemLog
) -> None:
    indexes = [name for name in _WEIGHT_INDEXES if name in names]
    for index in indexes:
        try:
            weight_map = json.loads((local / index).read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            problems.add("model", f"model.uri {uri}: {index} is not a valid weight index: {e}")
            continue
        missing = [shard for shard in shards if shard not in names]
        if missing:
            problems.add(
                "model",
                f"model.uri {uri}: {index} names {len(missing)} shard(s) that are not there: "
                f"{', '.join(missing[:10])}",
            )
    if not report.weight_files:
        present = ", ".join(sorted(names)[:20])
        problems.add(
            "model",
            f"model.uri {uri}: no weight files (*.safetensors or *.bin) found; the directory has: {present}",
        )


def _load_config(
    uri: str, local: Path, names: dict[str, int], problems: data.ProblemLog
) -> PretrainedConfig | None:
    if "config.json" not in names:
        problems.add(
            "model",
            f"model.uri {uri}: config.json is missing; the directory has: {', '.join(sorted(names)[:20])}",
        )
        return None
    from transformers import AutoConfig

    try:
        config: PretrainedConfig = AutoConfig.from_pretrained(local, local_files_only=True)
    except Exception as e:  # transformers raises ValueError, OSError, KeyError... for bad configs
        problems.add("model", f"model.uri {uri}: config.json cannot be loaded: {_first_line(e)}")
        return None
    return config


def _load_tokenizer(uri: str, local: Path, problems: data.ProblemLog) -> PreTrainedTokenizerBase | None:
    from transformers import AutoTokenizer

    try:
        tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(local, local_files_only=True)
    except Exception as e:  # missing or broken tokenizer files raise all sorts of errors
        problems.add("model", f"model.uri {uri}: the tokenizer cannot be loaded: {_first_line(e)}")
        return None
    return tokenizer


def inspect_reference(plan: RunPlan, scratch_dir: Path, problems: data.ProblemLog) -> None:
    """A DPO reference given by ``method.dpo.referenceModel.uri``: it exists, has a config and
    weights, and its vocabulary is the base model's (trl scores the same token ids with both, so it
    must share the base's tokenizer). Run after :func:`inspect_model`, whose config it compares."""
    settings = plan.method.dpo_settings if plan.method is not None else None
    if settings is None or settings.reference_model is None:
        return
    uri = str(settings.reference_model.uri)
    where = f"method.dpo.referenceModel.uri {uri}"
    try:
        store = open_store(uri, storage_config(plan))
        names = {obj.key: obj.size for obj in store.list(uri)}
        if "config.json" in names:
            local = scratch_dir / "reference-model"
            local.mkdir(parents=True, exist_ok=True)
            store.download_file(f"{uri.rstrip('/')}/config.json", local / "config.json")
    except (StorageAccessError, InvalidInputError) as e:
        problems.add("reference-model", f"{where}: {e}", storage=isinstance(e, StorageAccessError))
        return
    if not names:
        problems.add(
            "reference-model",
            f"{where}: no objects found there; it must be a model directory with config.json, "
            "weights and the base model's tokenizer",
            storage=True,
        )
        return
    listing = ", ".join(sorted(names)[:20])
    if not any(_is_weight_file(name) for name in names):
        problems.add("reference-model", f"{where}: no weight files (*.safetensors, *.bin); it has: {listing}")
    if "config.json" not in names:
        problems.add("reference-model", f"{where}: config.json is missing; it has: {listing}")
        return
    theirs = _vocab_size(scratch_dir / "reference-model" / "config.json")
    base = _vocab_size(scratch_dir / "model" / "config.json")
    if theirs is not None and base is not None and theirs != base:
        problems.add(
            "reference-model",
            f"{where}: its vocabulary has {theirs} tokens but the base model's has {base}; the "
            "reference must share the base model's tokenizer",
        )


def _vocab_size(config_json: Path) -> int | None:
    try:
        value = json.loads(config_json.read_text()).get("vocab_size")
    except (OSError, ValueError, AttributeError):  # absent, not JSON, not an object
        return None
    return value if isinstance(value, int) else None


def _max_positions(config: PretrainedConfig) -> int | None:
    for name in _POSITION_ATTRIBUTES:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_task(
    plan: RunPlan,
    config: PretrainedConfig,
    report: ModelReport,
    problems: data.ProblemLog,
    warnings: list[str],
) -> None:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    task = plan.task
    model_type = config.model_type
    if task.type == TaskType.causal_lm:
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            problems.add(
                "model",
                f"model.uri {plan.model_uri}: model type {model_type!r} has no causal-LM head in "
                "transformers, so it cannot be trained with task causal-lm",
            )
        return
    if model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        problems.add(
            "model",
            f"model.uri {plan.model_uri}: model type {model_type!r} has no sequence-classification head "
            "in transformers, so it cannot be trained with task sequence-classification",
        )
        return
    has_head = any(a.endswith("ForSequenceClassification") for a in report.architectures or [])
    if has_head and task.num_labels is not None and config.num_labels != task.num_labels:
        problems.add(
            "model",
            f"model.uri {plan.model_uri}: the model already has a classification head with "
            f"{config.num_labels} labels but task.numLabels is {task.num_labels}; use the base model "
            "without a head, or set numLabels to match",
        )
    id2label: dict[Any, str] = dict(config.id2label or {}) if has_head else {}
    names = [id2label[i] for i in sorted(id2label, key=int)] or None
    if names and task.labels and names != list(task.labels) and len(names) == len(task.labels):
        warnings.append(
            f"the model's label names {names} differ from task.labels {list(task.labels)}; "
            "training uses task.labels in that order"
        )


# --- data ----------------------------------------------------------------------------------------


def inspect_data(
    plan: RunPlan,
    tokenizer: PreTrainedTokenizerBase | None,
    model: ModelReport,
    scratch_dir: Path,
    problems: data.ProblemLog,
    warnings: list[str],
    report: Report,
) -> None:
    try:
        data.check_task_format(plan)
    except InvalidInputError as e:
        problems.add_error(e, "task")
        return
    loaded = data.LoadReport()
    records = data.collect_records(plan, scratch_dir / "data", problems, loaded)
    dataset = plan.dataset
    report.train = SplitReport(dataset.train.uri, loaded.train_files, loaded.train_read, len(records.train))
    if dataset.eval is not None:
        report.eval = SplitReport(
            dataset.eval.uri, loaded.eval_files, loaded.eval_read, len(records.eval or [])
        )
    elif dataset.eval_fraction is not None and records.eval is not None:
        seed = plan.hyperparameters.seed if plan.hyperparameters else 42
        report.eval_note = f"{dataset.eval_fraction * 100:g}% of the training records held out (seed {seed})"
        report.eval = SplitReport(uri=None, files=[], records_read=0, records_usable=len(records.eval))
    if dataset.eval is not None and records.eval is not None and not records.eval and loaded.eval_read:
        problems.add("empty-dataset", f"dataset.eval {dataset.eval.uri} has no usable records")

    if tokenizer is None:
        if not problems.counts["model"]:
            warnings.append("token lengths not checked: the tokenizer is not available")
        return
    for split, split_records in (("train", records.train), ("eval", records.eval)):
        target = report.train if split == "train" else report.eval
        if split_records is None or target is None:
            continue
        tokenized = data.tokenize_split(split_records, plan, tokenizer, problems)
        target.lengths = data.LengthStats.of(tokenized.lengths, tokenized.max_length)
        target.dropped = len(tokenized.dropped)
        if tokenized.dropped:
            what = "prompt" if dataset.format == DataFormat.instruction else "context"
            message = (
                f"{len(tokenized.dropped)} {split} records have no tokens to learn from within "
                f"maxSeqLength {tokenized.max_length} (the {what} fills it) and are left out; "
                f"first: {', '.join(tokenized.dropped[:3])}"
            )
            if tokenized.examples:
                warnings.append(message)
            else:
                problems.add("too-long", message)
        if (
            model.max_positions is not None
            and tokenized.lengths
            and min(max(tokenized.lengths), tokenized.max_length) > model.max_positions
        ):
            problems.add(
                "too-long",
                f"{split} sequences reach {min(max(tokenized.lengths), tokenized.max_length)} tokens but the "
                f"model has only {model.max_positions} positions; set maxSeqLength to at most "
                f"{model.max_positions}",
            )
        if split == "train" and plan.task.type == TaskType.sequence_classification:
            names = list(plan.task.labels) if plan.task.labels else None
            report.label_counts = data.label_counts(tokenized.examples, names)
        if split == "train" and plan.hyperparameters is not None and tokenized.examples:
            hp = plan.hyperparameters
            per_step = hp.per_device_batch_size * plan.world.size * hp.gradient_accumulation_steps
            report.steps_per_epoch = max(1, math.ceil(len(tokenized.examples) / per_step))
    wanted = plan.hyperparameters.max_seq_length if plan.hyperparameters else None
    if (
        wanted is not None
        and report.train
        and report.train.lengths
        and report.train.lengths.max_length < wanted
    ):
        warnings.append(
            f"maxSeqLength {wanted} is capped at {report.train.lengths.max_length}, "
            "the tokenizer's model_max_length"
        )


# --- memory --------------------------------------------------------------------------------------


def inspect_memory(
    plan: RunPlan, local_model: Path, model: ModelReport, problems: data.ProblemLog, warnings: list[str]
) -> MemoryReport | None:
    """The memory plan of a fine-tuning run from the model's config (already downloaded by
    :func:`inspect_model`); a plan that cannot fit is a problem of kind ``WillNotFit``."""
    if plan.kind != "finetune" or model.model_type is None:
        return None  # compression trains nothing; without a config there is nothing to plan from
    from transformers import AutoConfig

    # The complete config (every default filled in), not the file: config.json may leave
    # defaults such as tie_word_embeddings out.
    config = AutoConfig.from_pretrained(local_model, local_files_only=True).to_dict()
    try:
        shape = memory.ModelShape.from_config(config)
    except InvalidInputError as e:
        warnings.append(f"memory not planned: {e}")
        return None
    estimate = memory.estimate(shape, memory.setup_of(plan))
    found = memory.checks(plan, estimate)
    reason = memory.will_not_fit(plan, estimate, found)
    report = MemoryReport(
        parameters=estimate.parameters,
        trainable=estimate.trainable,
        rows=[asdict(row) for row in estimate.rows],
        checks=[asdict(check) for check in found],
        table=memory.render_table(estimate, found),
        will_not_fit=reason,
        skipped=bool(plan.skip_memory_check),
    )
    if reason is not None:
        if plan.skip_memory_check:
            warnings.append(
                f"the memory plan says it will not fit, check skipped by the annotation: {reason}"
            )
        else:
            problems.add(WILL_NOT_FIT, reason)
    return report


# --- the report ----------------------------------------------------------------------------------


def validate(plan: RunPlan, plan_path: str, scratch_dir: Path) -> Report:
    """Run every check and return the report (never raises for bad input)."""
    problems = data.ProblemLog(cap=PROBLEMS_PER_KIND)
    warnings: list[str] = []
    model, tokenizer = inspect_model(plan, scratch_dir, problems, warnings)
    inspect_reference(plan, scratch_dir, problems)
    report = Report(ok=True, exit_code=EXIT_OK, summary="", plan=plan_path, model=model)
    inspect_data(plan, tokenizer, model, scratch_dir, problems, warnings, report)
    report.memory = inspect_memory(plan, scratch_dir / "model", model, problems, warnings)
    report.warnings = warnings
    report.problems = [asdict(p) for p in problems.problems()]
    report.problem_counts = dict(problems.counts)
    if problems:
        report.ok = False
        report.exit_code = EXIT_STORAGE if problems.has_storage_problems else EXIT_INVALID_INPUT
        noun = "problem" if problems.total == 1 else "problems"
        report.summary = f"validation failed with {problems.total} {noun}: {problems.summary(limit=3)}"
        if set(problems.counts) == {WILL_NOT_FIT} and report.memory and report.memory.will_not_fit:
            report.summary = f"{WILL_NOT_FIT}: {report.memory.will_not_fit}"
    else:
        records = report.train.records_usable if report.train else 0
        report.summary = f"validation passed: model and data are usable ({records} training records)"
    return report


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _lengths_line(lengths: data.LengthStats) -> str:
    return (
        f"tokens per record: max {lengths.max}, mean {lengths.mean:.1f}, p95 {lengths.p95}; "
        f"{lengths.truncated} of {lengths.count} longer than maxSeqLength {lengths.max_length} (truncated)"
    )


def render_text(report: Report) -> str:
    status = "OK" if report.ok else f"FAILED (exit code {report.exit_code})"
    lines = [f"kubetune validate {report.plan}: {status}", ""]
    model = report.model
    if model is not None:
        lines.append(f"model  {model.uri}")
        if model.files:
            arch = f" ({', '.join(model.architectures)})" if model.architectures else ""
            lines.append(
                f"       {model.model_type or 'unknown type'}{arch}; {len(model.weight_files)} weight file(s), "
                f"{_size(model.weight_bytes)}"
                + (f"; {model.max_positions} positions" if model.max_positions else "")
            )
        if model.tokenizer:
            lines.append(
                f"       tokenizer {model.tokenizer}, vocabulary {model.vocab_size}, chat template: "
                + (
                    "yes" + (" (with generation blocks)" if model.generation_blocks else "")
                    if model.chat_template
                    else "no"
                )
            )
    for name, split in (("train", report.train), ("eval", report.eval)):
        if split is None:
            continue
        where = split.uri or report.eval_note or ""
        files = f"{len(split.files)} file(s), {split.records_read} records read, " if split.uri else ""
        lines.append(f"{name:<6} {where}")
        lines.append(f"       {files}{split.records_usable} usable")
        if split.lengths is not None and split.lengths.count:
            lines.append(f"       {_lengths_line(split.lengths)}")
    if report.label_counts:
        counts = ", ".join(f"{k}: {v}" for k, v in report.label_counts.items())
        lines.append(f"labels {counts}")
    if report.steps_per_epoch:
        lines.append(f"steps  {report.steps_per_epoch} optimizer steps per epoch")
    if report.memory is not None:
        lines += ["", "memory plan:"]
        lines += [f"  {line}" if line else "" for line in report.memory.table.splitlines()]
    if report.warnings:
        lines += ["", f"warnings ({len(report.warnings)}):"]
        lines += [f"  {w}" for w in report.warnings]
    if report.problems:
        total = sum(report.problem_counts.values())
        lines += ["", f"problems ({total}):"]
        for kind, count in report.problem_counts.items():
            shown = [p for p in report.problems if p["kind"] == kind]
            lines.append(f"  {kind} ({count}):")
            lines += [f"    {p['message']}" for p in shown]
            if count > len(shown):
                lines.append(f"    ... and {count - len(shown)} more")
    lines += ["", report.summary]
    return "\n".join(lines)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m kubetune.trainer validate",
        description="Check that a run plan's model and data are reachable and well-formed.",
    )
    parser.add_argument("--plan", required=True, help="run plan JSON file")
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    parser.add_argument("--scratch-dir", help="where to download tokenizer files and data")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)

    def run() -> int:
        try:
            plan = RunPlan.from_file(args.plan)
            # An output inside the job's model or dataset is refused before anything is read
            # (kubetune.ownership, reason OutputConflict): training would read its own outputs.
            check_inputs(plan.output_uri, plan_inputs(plan))
        except InvalidInputError as e:
            if args.json:
                print(
                    json.dumps({"ok": False, "exit_code": e.exit_code, "summary": str(e), "plan": args.plan})
                )
            raise
        root = scratch_root(args.scratch_dir)
        with tempfile.TemporaryDirectory(prefix="validate-", dir=root) as scratch:
            report = validate(plan, args.plan, Path(scratch))
        if args.json:
            print(json.dumps(asdict(report), indent=2, default=str))
        else:
            print(render_text(report))
        sys.stdout.flush()
        write_termination_message(report.summary)
        return report.exit_code

    return run_main(run)
