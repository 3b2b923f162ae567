"""The two custom resources: FineTuneJob and CompressJob (kubetune.io/v1alpha1)."""

from __future__ import annotations

import re
from enum import StrEnum
from operator import attrgetter
from typing import Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Field
from pydantic.alias_generators import to_camel

from kubetune.api.base import (
    DNS_1035_LABEL_PATTERN,
    DNS_LABEL_PATTERN,
    STRICT,
    WHOLE_FLOAT,
    CelRule,
    Float,
    Int,
    KubeModel,
    SourceURI,
)
from kubetune.api.spec import (
    EARLY_STOPPING_METRIC_REPORTED,
    EARLY_STOPPING_NEEDS_EVALUATION,
    NO_PREFERENCE_DATA,
    OBJECTIVE_MATCHES_FORMAT,
    Checkpointing,
    DataFormat,
    Dataset,
    DeepSpeed,
    Hyperparameters,
    JobSpecBase,
    Method,
    ModelSource,
    Objective,
    Task,
    TaskType,
)
from kubetune.api.status import CompressJobStatus, FineTuneJobStatus

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


# Longest job names whose every child name stays a DNS label (<= 63 characters). The binding one
# is the hostname of the last pod of the last attempt of the gang, "<job>-train-r1000-1023" and
# "<job>-compress-r1000-1023" (maxRestarts <= 1000, workers <= 1024); see the operator's render.
MAX_NAME_LENGTH: dict[str, int] = {"FineTuneJob": 46, "CompressJob": 43}
_LONGEST_CHILD = {"FineTuneJob": "<name>-train-r1000-1023", "CompressJob": "<name>-compress-r1000-1023"}


class ObjectMeta(KubeModel):
    """The parts of metav1.ObjectMeta kubetune reads; everything else passes through.

    The name's shape is checked by the resource's CEL rules (see ``KubetuneResource``), exactly
    as the API server checks it, so local mode accepts the same names a cluster does."""

    model_config = ConfigDict(extra="allow")

    name: str | None = Field(None, min_length=1, max_length=253, description="Name of the job.")
    namespace: str | None = Field(None, description="Namespace of the job.")
    uid: str | None = Field(None, description="Unique id assigned by the API server.")
    generation: int | None = Field(None, description="Spec generation assigned by the API server.")
    labels: dict[str, str] | None = Field(None, description="Labels.")
    annotations: dict[str, str] | None = Field(None, description="Annotations.")


_DNS_1035_LABEL = re.compile(DNS_1035_LABEL_PATTERN)


def name_rules(kind: str, limit: int | None = None, longest_child: str | None = None) -> tuple[CelRule, ...]:
    """The rules on a job's own name (root-level CEL rules, where ``self`` is the object); a kind
    other than the two jobs gives its own ``limit`` and the name of its longest descendant."""
    limit = limit if limit is not None else MAX_NAME_LENGTH[kind]
    longest = longest_child or _LONGEST_CHILD[kind]
    return (
        CelRule(
            f"!has(self.metadata.name) || size(self.metadata.name) <= {limit}",
            f"{kind} names must be at most {limit} characters: children are named after the job "
            f"and the longest, the pod hostname {longest}, must fit in 63",
            lambda r: r.metadata.name is None or len(r.metadata.name) <= limit,
            field="metadata.name",
        ),
        CelRule(
            f"!has(self.metadata.name) || self.metadata.name.matches('{DNS_1035_LABEL_PATTERN}')",
            f"{kind} names must be DNS-1035 labels: lowercase letters, digits and '-', starting with "
            "a letter and ending with a letter or digit (the job's Services are named after it)",
            lambda r: r.metadata.name is None or _DNS_1035_LABEL.fullmatch(r.metadata.name) is not None,
            field="metadata.name",
        ),
    )


_FORMAT_MATCHES_TASK = CelRule(
    "self.task.type == 'sequence-classification' ? self.dataset.format == 'classification' : "
    "self.dataset.format != 'classification'",
    "dataset.format must be classification for sequence-classification, and one of text, instruction, "
    "chat, preference for causal-lm",
    lambda s: (
        (s.dataset.format == DataFormat.classification) == (s.task.type == TaskType.sequence_classification)
    ),
    field="dataset.format",
)


# NEFTune is a supervised fine-tuning recipe for generation; the adversarial loss perturbs what a
# classifier scores. Both rules name the field, so the API server says which option is misplaced.
_NEFTUNE_FOR_SFT = CelRule(
    "!has(self.hyperparameters.robustness) || !has(self.hyperparameters.robustness.neftuneAlpha) || "
    "(self.task.type == 'causal-lm' && self.method.objective == 'sft')",
    "hyperparameters.robustness.neftuneAlpha is only for task causal-lm with method.objective sft",
    lambda s: (
        s.hyperparameters.robustness is None
        or s.hyperparameters.robustness.neftune_alpha is None
        or (s.task.type == TaskType.causal_lm and s.method.objective == Objective.sft)
    ),
    field="hyperparameters.robustness.neftuneAlpha",
)
_ADVERSARIAL_FOR_CLASSIFICATION = CelRule(
    "!has(self.hyperparameters.robustness) || !has(self.hyperparameters.robustness.adversarial) || "
    "self.task.type == 'sequence-classification'",
    "hyperparameters.robustness.adversarial is only for task sequence-classification",
    lambda s: (
        s.hyperparameters.robustness is None
        or s.hyperparameters.robustness.adversarial is None
        or s.task.type == TaskType.sequence_classification
    ),
    field="hyperparameters.robustness.adversarial",
)


class FineTuneJobSpec(JobSpecBase):
    """What to fine-tune, on which data, how, and where the results go."""

    model: ModelSource = Field(description="The base model.")
    task: Task = Field(default_factory=Task, description="What the model learns to do.")
    dataset: Dataset = Field(description="Training (and evaluation) data.")
    method: Method = Field(default_factory=Method, description="Full fine-tuning or LoRA.")
    hyperparameters: Hyperparameters = Field(description="Optimisation settings.")
    deepspeed: DeepSpeed = Field(default_factory=DeepSpeed, description="DeepSpeed ZeRO settings.")
    checkpoint: Checkpointing = Field(default_factory=Checkpointing, description="Checkpoint policy.")
    progress_deadline_seconds: Annotated[int, Field(ge=1, le=2**31 - 1), WHOLE_FLOAT, STRICT] | None = Field(
        None,
        description=(
            "End the attempt as retriable with reason Stalled when rank 0 reports no progress for this"
            " long (counted from the attempt's start; allow for loading the model)."
        ),
    )

    cel_rules = (
        _FORMAT_MATCHES_TASK,
        OBJECTIVE_MATCHES_FORMAT,
        _NEFTUNE_FOR_SFT,
        _ADVERSARIAL_FOR_CLASSIFICATION,
        EARLY_STOPPING_NEEDS_EVALUATION,
        EARLY_STOPPING_METRIC_REPORTED,
    )


# Fields of the spec that define the training run. Changing them after the run started would
# silently mix two runs in one output, so the API server refuses it (see the transition rule).
TRAINING_FIELDS = (
    "model",
    "task",
    "dataset",
    "method",
    "hyperparameters",
    "deepspeed",
    "checkpoint",
    "output",
    "storage",
    # The gang's shape: ZeRO shards are per process, and the plan the pods read is fixed.
    "resources.workers",
    "resources.gpus_per_worker",
    "resources.processes_per_worker",
)


def _started(obj: Any) -> bool:
    return obj.status is not None and obj.status.start_time is not None


def _always_present(spec: type[KubeModel], field: str) -> bool:
    """Whether the API server always has a value for ``spec.<field>`` (required or defaulted);
    ``field`` may be a dotted path through nested models that are themselves always present."""
    model: Any = spec
    for part in field.split("."):
        info = model.model_fields[part]
        if not (info.is_required() or info.default_factory is not None or info.default is not None):
            return False
        model = info.annotation
    return True


def _camel_path(field: str) -> str:
    return ".".join(to_camel(part) for part in field.split("."))


JOB_MAY_CHANGE = (
    "serve, suspend, maxRestarts, activeDeadlineSeconds, ttlSecondsAfterFinished and the pods' "
    "requests, limits and placement may change"
)


def immutable_rule(
    spec: type[KubeModel], fields: tuple[str, ...], noun: str = "job", may_change: str = JOB_MAY_CHANGE
) -> CelRule:
    comparisons = []
    for field in fields:
        f = _camel_path(field)
        if _always_present(spec, field):
            comparisons.append(f"self.spec.{f} == oldSelf.spec.{f}")
        else:
            # Selecting an absent field is an error in CEL, so optional fields are compared
            # only when present on both sides.
            comparisons.append(
                f"(has(self.spec.{f}) ? has(oldSelf.spec.{f}) && self.spec.{f} == oldSelf.spec.{f} "
                f": !has(oldSelf.spec.{f}))"
            )
    camel = [_camel_path(f) for f in fields]
    same = " && ".join(comparisons)
    return CelRule(
        f"!has(oldSelf.status) || !has(oldSelf.status.startTime) || ({same})",
        f"spec.{{{', '.join(camel)}}} cannot change once the {noun} has started; create a new {noun} "
        f"instead ({may_change})",
        lambda pair: (
            not _started(pair[1])
            or all(attrgetter(f)(pair[0].spec) == attrgetter(f)(pair[1].spec) for f in fields)
        ),
        reason="FieldValueForbidden",
    )


class KubetuneResource(KubeModel):
    """Common shape of both kinds."""

    kind_name: ClassVar[str]
    plural: ClassVar[str]
    short_name: ClassVar[str]
    update_rules: ClassVar[tuple[CelRule, ...]] = ()

    api_version: Literal["kubetune.io/v1alpha1"] = Field(alias="apiVersion")
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)

    def check_update(self, old: KubetuneResource) -> None:
        """Raise ValueError when changing ``old`` into ``self`` breaks a transition rule."""
        for rule in type(self).update_rules:
            if not rule.check((self, old)):
                raise ValueError(rule.message)


class FineTuneJob(KubetuneResource):
    """Fine-tunes a model with DeepSpeed and optionally serves it."""

    kind_name = "FineTuneJob"
    plural = "finetunejobs"
    short_name = "ftj"

    kind: Literal["FineTuneJob"]
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None

    cel_rules = name_rules("FineTuneJob")

    update_rules = (immutable_rule(FineTuneJobSpec, TRAINING_FIELDS),)


class ModelReference(KubeModel):
    """The model to compress: a URI, or the result of a FineTuneJob or of a FineTuneSweep's best
    trial in the same namespace."""

    uri: SourceURI | None = Field(None, description="Directory holding the model.")
    from_fine_tune_job: Annotated[str, Field(pattern=DNS_LABEL_PATTERN, max_length=63)] | None = Field(
        None, description="Name of a FineTuneJob in this namespace; waits until it has Succeeded."
    )
    from_fine_tune_sweep: Annotated[str, Field(pattern=DNS_LABEL_PATTERN, max_length=63)] | None = Field(
        None,
        description="Name of a FineTuneSweep in this namespace: its best trial's model "
        "(status.bestTrial.modelUri); waits until the sweep has Succeeded.",
    )

    cel_rules = (
        CelRule(
            "(has(self.uri) ? 1 : 0) + (has(self.fromFineTuneJob) ? 1 : 0) + "
            "(has(self.fromFineTuneSweep) ? 1 : 0) == 1",
            "set exactly one of uri, fromFineTuneJob and fromFineTuneSweep",
            lambda m: [m.uri, m.from_fine_tune_job, m.from_fine_tune_sweep].count(None) == 2,
            field="uri",
        ),
    )


class QuantizationMethod(StrEnum):
    gptq = "gptq"
    rtn = "rtn"
    smoothquant = "smoothquant"
    torchao = "torchao"


class QuantizationScheme(StrEnum):
    w4a16 = "W4A16"
    w8a16 = "W8A16"
    w8a8 = "W8A8"
    fp8 = "FP8"
    int8_weight_only = "INT8_WEIGHT_ONLY"
    int8_dynamic = "INT8_DYNAMIC"


_TORCHAO_SCHEMES = ("INT8_WEIGHT_ONLY", "INT8_DYNAMIC")


class Quantization(KubeModel):
    """Post-training quantization (llm-compressor recipes, or torchao for CPU)."""

    method: QuantizationMethod = Field(
        QuantizationMethod.gptq,
        description="gptq: calibrated, error-compensating; rtn: round-to-nearest; smoothquant: "
        "activation smoothing then GPTQ W8A8; torchao: int8 for CPU inference.",
    )
    scheme: QuantizationScheme = Field(
        QuantizationScheme.w4a16,
        description="W4A16/W8A16 weight-only, W8A8 weights and activations, FP8 (GPUs with FP8 support); "
        "INT8_WEIGHT_ONLY/INT8_DYNAMIC with torchao.",
    )
    group_size: Int = Field(128, ge=8, le=8192, description="Weights sharing one scale (W4A16).")
    ignore: list[Annotated[str, Field(min_length=1, max_length=1024)]] = Field(
        default_factory=lambda: ["lm_head"],
        max_length=256,
        description="Modules left unquantized (names or re: patterns).",
    )

    cel_rules = (
        CelRule(
            "(self.method == 'torchao') == (self.scheme in ['INT8_WEIGHT_ONLY', 'INT8_DYNAMIC'])",
            "method torchao takes scheme INT8_WEIGHT_ONLY or INT8_DYNAMIC, and those schemes need method torchao",
            lambda q: (q.method == QuantizationMethod.torchao) == (q.scheme in _TORCHAO_SCHEMES),
            field="scheme",
        ),
        CelRule(
            "self.method != 'smoothquant' || self.scheme == 'W8A8'",
            "method smoothquant takes scheme W8A8",
            lambda q: q.method != QuantizationMethod.smoothquant or q.scheme == QuantizationScheme.w8a8,
            field="scheme",
        ),
        CelRule(
            # The runtime's GPTQ has no FP8 recipe (FP8_DYNAMIC needs no calibration): exit 2.
            "self.method != 'gptq' || self.scheme != 'FP8'",
            "method gptq does not take scheme FP8 (FP8 needs no calibration data): use method rtn",
            lambda q: q.method != QuantizationMethod.gptq or q.scheme != QuantizationScheme.fp8,
            field="scheme",
        ),
    )


class PruningMethod(StrEnum):
    sparsegpt = "sparsegpt"
    wanda = "wanda"
    magnitude = "magnitude"


class SparsityPattern(StrEnum):
    unstructured = "unstructured"
    two_four = "2:4"


class Pruning(KubeModel):
    """Weight pruning (llm-compressor), applied before quantization when both are set."""

    method: PruningMethod = Field(PruningMethod.sparsegpt, description="Pruning algorithm.")
    sparsity: Float = Field(0.5, gt=0, lt=1, description="Fraction of weights set to zero, in (0, 1).")
    pattern: SparsityPattern = Field(
        SparsityPattern.unstructured, description="unstructured, or 2:4 semi-structured (sparsity 0.5)."
    )

    cel_rules = (
        CelRule(
            "self.pattern != '2:4' || self.sparsity == 0.5",
            "pattern 2:4 means exactly 50% sparsity; set sparsity to 0.5",
            lambda p: p.pattern != SparsityPattern.two_four or p.sparsity == 0.5,
            field="sparsity",
        ),
    )


class Student(KubeModel):
    """The smaller model trained against the teacher."""

    uri: SourceURI | None = Field(None, description="An existing student model.")
    layer_stride: Annotated[int, Field(ge=2, le=64), WHOLE_FLOAT, STRICT] | None = Field(
        None, description="Derive the student from the teacher by keeping every k-th layer."
    )

    cel_rules = (
        CelRule(
            "has(self.uri) != has(self.layerStride)",
            "set exactly one of uri and layerStride",
            lambda s: (s.uri is not None) != (s.layer_stride is not None),
            field="uri",
        ),
    )


class Distillation(KubeModel):
    """Knowledge distillation into a smaller student, trained with DeepSpeed."""

    student: Student = Field(description="The student model.")
    temperature: Float = Field(2.0, gt=0, le=100, description="Softmax temperature for the KD loss.")
    kd_weight: Float = Field(
        0.5, ge=0, le=1, description="Weight of the KD loss; 1 - kdWeight weighs the hard-label loss."
    )
    hyperparameters: Hyperparameters = Field(description="Optimisation settings for the student.")
    deepspeed: DeepSpeed = Field(default_factory=DeepSpeed, description="DeepSpeed ZeRO settings.")
    checkpoint: Checkpointing = Field(default_factory=Checkpointing, description="Checkpoint policy.")


class Calibration(KubeModel):
    """Calibration samples taken from dataset.train for GPTQ, SmoothQuant and SparseGPT."""

    samples: Int = Field(128, ge=1, le=100_000, description="Number of calibration sequences.")
    max_seq_length: Int = Field(512, ge=8, le=131_072, description="Tokens per calibration sequence.")


class CompressJobSpec(JobSpecBase):
    """What to compress, how, and on which data to calibrate and evaluate."""

    model: ModelReference = Field(description="The model to compress.")
    task: Task = Field(default_factory=Task, description="The model's task (decides the quality metrics).")
    dataset: Dataset = Field(
        description="train: calibration and distillation data; eval or evalFraction: held-out data "
        "for the before/after evaluation."
    )
    distillation: Distillation | None = Field(None, description="Distil into a smaller student first.")
    pruning: Pruning | None = Field(None, description="Then prune.")
    quantization: Quantization | None = Field(None, description="Then quantize.")
    calibration: Calibration = Field(default_factory=Calibration, description="Calibration data size.")

    cel_rules = (
        CelRule(
            "has(self.distillation) || has(self.pruning) || has(self.quantization)",
            "set at least one compression step: distillation, pruning or quantization",
            lambda s: s.distillation is not None or s.pruning is not None or s.quantization is not None,
            field="quantization",
        ),
        _FORMAT_MATCHES_TASK,
        NO_PREFERENCE_DATA,
        CelRule(
            "!has(self.dataset.packing) || !self.dataset.packing",
            "dataset.packing is only for FineTuneJobs: calibration and evaluation take one record per sequence",
            lambda s: not s.dataset.packing,
            field="dataset.packing",
        ),
        CelRule(
            "!has(self.distillation) || !has(self.distillation.hyperparameters.robustness)",
            "distillation takes no robustness options: they are for FineTuneJobs",
            lambda s: s.distillation is None or s.distillation.hyperparameters.robustness is None,
            field="distillation.hyperparameters.robustness",
        ),
        CelRule(
            "!has(self.distillation) || !has(self.distillation.hyperparameters.earlyStopping)",
            "distillation trains for its set epochs or maxSteps: earlyStopping is for FineTuneJobs",
            lambda s: s.distillation is None or s.distillation.hyperparameters.early_stopping is None,
            field="distillation.hyperparameters.earlyStopping",
        ),
    )


COMPRESS_FIELDS = (
    "model",
    "task",
    "dataset",
    "distillation",
    "pruning",
    "quantization",
    "calibration",
    "output",
    "storage",
    "resources.workers",
    "resources.gpus_per_worker",
    "resources.processes_per_worker",
)


class CompressJob(KubetuneResource):
    """Compresses a model (quantization, pruning, distillation), reports before/after, optionally serves."""

    kind_name = "CompressJob"
    plural = "compressjobs"
    short_name = "cj"

    kind: Literal["CompressJob"]
    spec: CompressJobSpec
    status: CompressJobStatus | None = None

    cel_rules = name_rules("CompressJob")

    update_rules = (immutable_rule(CompressJobSpec, COMPRESS_FIELDS),)


KINDS: dict[str, type[FineTuneJob] | type[CompressJob]] = {
    "FineTuneJob": FineTuneJob,
    "CompressJob": CompressJob,
}
