"""Spec building blocks shared by FineTuneJob and CompressJob."""

from __future__ import annotations

import json
import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field
from pydantic_core import PydanticCustomError

from kubetune.api.base import (
    DNS_LABEL_PATTERN,
    DNS_SUBDOMAIN_PATTERN,
    ENDPOINT_CREDENTIALS,
    ENDPOINT_PATTERN,
    STRICT,
    WHOLE_FLOAT,
    Bool,
    CelRule,
    Float,
    Int,
    KubeModel,
    OutputURI,
    Quantity,
    SourceURI,
)


class TaskType(StrEnum):
    causal_lm = "causal-lm"
    sequence_classification = "sequence-classification"


class Task(KubeModel):
    """What the model learns to do."""

    type: TaskType = Field(
        TaskType.causal_lm,
        description="causal-lm trains next-token prediction; sequence-classification trains a "
        "classification head on top of the encoder or decoder.",
    )
    num_labels: Annotated[int, Field(ge=2, le=100_000), WHOLE_FLOAT, STRICT] | None = Field(
        None, description="Number of classes; required for sequence-classification."
    )
    labels: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        None,
        max_length=100_000,
        description="Optional class names in id order; dataset labels may then be given by name.",
    )

    cel_rules = (
        CelRule(
            "self.type == 'sequence-classification' ? has(self.numLabels) : "
            "!has(self.numLabels) && !has(self.labels)",
            "numLabels is required for sequence-classification, and numLabels/labels are only "
            "allowed with sequence-classification",
            lambda t: (
                (t.num_labels is not None)
                if t.type == TaskType.sequence_classification
                else (t.num_labels is None and t.labels is None)
            ),
            field="numLabels",
        ),
        CelRule(
            "!has(self.labels) || !has(self.numLabels) || size(self.labels) == self.numLabels",
            "labels must list exactly numLabels names",
            lambda t: t.labels is None or t.num_labels is None or len(t.labels) == t.num_labels,
            field="labels",
        ),
    )


class ModelSource(KubeModel):
    """The base model: a Hugging Face format directory (config, weights, tokenizer)."""

    uri: SourceURI = Field(
        description="Directory holding the model: s3://bucket/prefix, file:///path or hf://org/name."
    )


class DataFormat(StrEnum):
    text = "text"
    instruction = "instruction"
    chat = "chat"
    classification = "classification"
    preference = "preference"


class FileFormat(StrEnum):
    auto = "auto"
    jsonl = "jsonl"
    csv = "csv"
    parquet = "parquet"


# Formats whose records are token sequences with a loss mask, which packing can lay end to end.
PACKABLE_FORMATS = (DataFormat.text, DataFormat.instruction, DataFormat.chat)


class DataLocation(KubeModel):
    """A data file, or a prefix whose files are all read."""

    uri: SourceURI = Field(description="A file or a prefix of files (all read, in lexical order).")


class DataFields(KubeModel):
    """Names of the record fields the formats read."""

    text: str = Field(
        "text", min_length=1, max_length=256, description="Text field (text and classification formats)."
    )
    prompt: str = Field(
        "prompt",
        min_length=1,
        max_length=256,
        description="Prompt field (instruction and preference formats; for preference it may hold a list "
        "of {role, content} messages, rendered with the tokenizer's chat template).",
    )
    response: str = Field(
        "response", min_length=1, max_length=256, description="Response field (instruction format)."
    )
    messages: str = Field(
        "messages",
        min_length=1,
        max_length=256,
        description="List of {role, content} messages (chat format); loss is computed on assistant turns only.",
    )
    label: str = Field(
        "label", min_length=1, max_length=256, description="Label field: class name or id (classification)."
    )
    chosen: str = Field(
        "chosen",
        min_length=1,
        max_length=256,
        description="Preferred answer to the prompt (preference format): text, or a list of assistant "
        "messages when the prompt is a conversation.",
    )
    rejected: str = Field(
        "rejected",
        min_length=1,
        max_length=256,
        description="Dispreferred answer to the same prompt (preference format), in the form of chosen.",
    )


class Dataset(KubeModel):
    """Training data and how to read it."""

    train: DataLocation = Field(description="Training data.")
    eval: DataLocation | None = Field(None, description="Held-out evaluation data.")
    eval_fraction: Annotated[Float, Field(gt=0, le=0.5)] | None = Field(
        None, description="Fraction of the training records held out for evaluation when eval is not given."
    )
    format: DataFormat = Field(
        DataFormat.text,
        description="text: plain text; instruction: prompt/response pairs; chat: messages rendered with "
        "the tokenizer's chat template; classification: text with a label; preference: a prompt with a "
        "chosen and a rejected answer (method.objective dpo).",
    )
    file_format: FileFormat = Field(
        FileFormat.auto, description="File format; auto picks by extension (.jsonl, .json, .csv, .parquet)."
    )
    fields: DataFields = Field(default_factory=DataFields, description="Record field names.")
    packing: Bool | None = Field(
        None,
        description="Pack training records into maxSeqLength windows (EOS between records, positions "
        "restarting per record, each record's loss mask kept) instead of padding each to its batch's "
        "longest; text, instruction and chat formats only. Records never attend to each other (see "
        "docs/data.md). Default false.",
    )

    cel_rules = (
        CelRule(
            "!has(self.packing) || !self.packing || self.format in ['text', 'instruction', 'chat']",
            "packing is only for the text, instruction and chat formats (classification records are "
            "scored one per sequence; trl tokenizes preference pairs itself)",
            lambda d: not d.packing or d.format in PACKABLE_FORMATS,
            field="packing",
        ),
        CelRule(
            "!(has(self.eval) && has(self.evalFraction))",
            "set either eval or evalFraction, not both",
            lambda d: not (d.eval is not None and d.eval_fraction is not None),
            field="evalFraction",
        ),
    )


class MethodType(StrEnum):
    full = "full"
    lora = "lora"


class LoraSettings(KubeModel):
    """Low-rank adaptation settings (peft)."""

    r: Int = Field(8, ge=1, le=1024, description="Rank of the update matrices.")
    alpha: Int = Field(16, ge=1, le=4096, description="Scaling numerator: the update is scaled by alpha/r.")
    dropout: Float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        max_length=256,
        description="Module names (or 'all-linear') that receive adapters.",
    )


class Objective(StrEnum):
    sft = "sft"
    dpo = "dpo"


class DpoLossType(StrEnum):
    """The pairwise losses of trl's DPOTrainer that need no setting kubetune does not expose
    (exo_pair needs label smoothing, so it is left out)."""

    sigmoid = "sigmoid"
    hinge = "hinge"
    ipo = "ipo"
    nca_pair = "nca_pair"
    robust = "robust"
    bco_pair = "bco_pair"
    sppo_hard = "sppo_hard"
    aot = "aot"
    aot_unpaired = "aot_unpaired"
    apo_zero = "apo_zero"
    apo_down = "apo_down"
    discopop = "discopop"
    sigmoid_norm = "sigmoid_norm"


class ReferenceModel(KubeModel):
    """A reference model other than the base: a Hugging Face format directory with the base's tokenizer."""

    uri: SourceURI = Field(
        description="Directory holding the reference model: s3://bucket/prefix, file:///path or hf://org/name."
    )


class DpoSettings(KubeModel):
    """Direct Preference Optimization (trl's DPOTrainer) on preference pairs."""

    beta: Float = Field(
        0.1,
        gt=0,
        le=100,
        description="Strength of the pull towards the reference model: higher keeps the policy closer.",
    )
    loss_type: DpoLossType = Field(
        DpoLossType.sigmoid,
        description="Pairwise loss: sigmoid is the DPO paper's, ipo the IPO paper's; the others as in trl.",
    )
    reference_model: ReferenceModel | None = Field(
        None,
        description="The model the policy is compared with. Omitted (implicit): the frozen base model; with "
        "LoRA that is the base with the adapters switched off, with full fine-tuning a frozen copy of the base.",
    )


class Method(KubeModel):
    """Which weights are trained, and on which objective."""

    type: MethodType = Field(MethodType.lora, description="full trains every weight; lora trains adapters.")
    objective: Objective = Field(
        Objective.sft,
        description="sft: supervised fine-tuning on the data; dpo: preference tuning on chosen/rejected "
        "pairs (dataset.format preference, task causal-lm).",
    )
    lora: LoraSettings | None = Field(None, description="LoRA settings; only with type lora.")
    merge_adapter: Bool | None = Field(
        None,
        description="Also write the adapter merged into the base weights as <output>/model "
        "(only with type lora; defaults to true).",
    )
    dpo: DpoSettings | None = Field(
        None, description="DPO settings; only with objective dpo (defaults apply when omitted)."
    )

    cel_rules = (
        CelRule(
            "self.type == 'lora' || (!has(self.lora) && !has(self.mergeAdapter))",
            "lora and mergeAdapter are only allowed with method type lora",
            lambda m: m.type == MethodType.lora or (m.lora is None and m.merge_adapter is None),
            field="lora",
        ),
        CelRule(
            "self.objective == 'dpo' || !has(self.dpo)",
            "dpo settings are only allowed with objective dpo",
            lambda m: m.objective == Objective.dpo or m.dpo is None,
            field="dpo",
        ),
    )

    @property
    def dpo_settings(self) -> DpoSettings | None:
        """The DPO settings of a dpo run (defaults when omitted); None for sft."""
        if self.objective != Objective.dpo:
            return None
        return self.dpo or DpoSettings()

    @property
    def merges(self) -> bool:
        return self.type == MethodType.lora and self.merge_adapter is not False


class AdversarialTraining(KubeModel):
    """Fast-gradient adversarial training of a classifier: each step also trains on the batch with
    its input embeddings moved epsilon (L2, per example) along the clean loss's gradient."""

    epsilon: Float = Field(
        1.0,
        gt=0,
        le=1000,
        description="L2 norm of each example's perturbation of its input embeddings (all its tokens "
        "together); the adversarial loss is added to the clean loss.",
    )


class Robustness(KubeModel):
    """Perturbations of the input embeddings during training (never at evaluation)."""

    neftune_alpha: Annotated[Float, Field(gt=0, le=1000)] | None = Field(
        None,
        description="NEFTune: uniform noise of scale alpha/sqrt(tokens x hidden size) on the input "
        "embeddings of every training step (transformers' neftune_noise_alpha; the paper uses 5). "
        "task causal-lm with objective sft only.",
    )
    adversarial: AdversarialTraining | None = Field(
        None, description="Adversarial training on the embeddings; task sequence-classification only."
    )


# Rules across a FineTuneJob's method, task and dataset (``self`` is the spec). DPO needs
# task causal-lm too, which follows: preference is not the classification format, which
# sequence-classification requires (the format-matches-task rule of kubetune.api.resources).
OBJECTIVE_MATCHES_FORMAT = CelRule(
    "(self.method.objective == 'dpo') == (self.dataset.format == 'preference')",
    "method.objective dpo needs dataset.format preference (and task causal-lm), and the preference "
    "format is only for objective dpo",
    lambda s: (s.method.objective == Objective.dpo) == (s.dataset.format == DataFormat.preference),
    field="dataset.format",
)
# The evaluation metrics each kind of run reports (the Trainer prefixes them with eval_).
CAUSAL_LM_EVAL_METRICS = ("eval_loss",)
CLASSIFICATION_EVAL_METRICS = ("eval_loss", "eval_accuracy", "eval_f1_macro")
# Early stopping compares evaluations, so a FineTuneJob without evaluation data cannot stop early.
EARLY_STOPPING_NEEDS_EVALUATION = CelRule(
    "!has(self.hyperparameters.earlyStopping) || has(self.dataset.eval) || has(self.dataset.evalFraction)",
    "hyperparameters.earlyStopping needs evaluation: set dataset.eval or dataset.evalFraction",
    lambda s: (
        s.hyperparameters.early_stopping is None
        or s.dataset.eval is not None
        or s.dataset.eval_fraction is not None
    ),
    field="hyperparameters.earlyStopping",
)
# The metric must be one the run reports (DPO runs report trl's many eval_rewards/* figures).
EARLY_STOPPING_METRIC_REPORTED = CelRule(
    "!has(self.hyperparameters.earlyStopping) || self.method.objective == 'dpo' || "
    "self.hyperparameters.earlyStopping.metric in (self.task.type == 'sequence-classification' ? "
    f"{list(CLASSIFICATION_EVAL_METRICS)} : {list(CAUSAL_LM_EVAL_METRICS)})",
    f"hyperparameters.earlyStopping.metric must be an evaluation metric the run reports: "
    f"{', '.join(CAUSAL_LM_EVAL_METRICS)} for causal-lm, {', '.join(CLASSIFICATION_EVAL_METRICS)} for "
    "sequence-classification, eval_loss or eval_rewards/* for objective dpo",
    lambda s: (
        s.hyperparameters.early_stopping is None
        or s.method.objective == Objective.dpo
        or s.hyperparameters.early_stopping.metric
        in (
            CLASSIFICATION_EVAL_METRICS
            if s.task.type == TaskType.sequence_classification
            else CAUSAL_LM_EVAL_METRICS
        )
    ),
    field="hyperparameters.earlyStopping.metric",
)
# A CompressJob's data calibrates and evaluates a model; preference pairs do neither.
NO_PREFERENCE_DATA = CelRule(
    "self.dataset.format != 'preference'",
    "dataset.format preference is only for FineTuneJobs with method.objective dpo; compression calibrates "
    "and evaluates on text, instruction or chat data",
    lambda s: s.dataset.format != DataFormat.preference,
    field="dataset.format",
)


class Precision(StrEnum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class LRScheduler(StrEnum):
    linear = "linear"
    cosine = "cosine"
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"


class EarlyStopping(KubeModel):
    """Stop when the evaluation metric stops improving, and keep the best evaluation's weights."""

    metric: str = Field(
        "eval_loss",
        min_length=1,
        max_length=128,
        pattern=r"^eval_[A-Za-z0-9_./-]+$",
        description="Evaluation metric to watch: eval_loss (every run); eval_accuracy or eval_f1_macro "
        "(sequence-classification); eval_rewards/* (DPO). Names ending in loss improve downwards, "
        "all others upwards.",
    )
    patience: Int = Field(
        3, ge=1, le=10_000, description="Evaluations in a row without improvement before training stops."
    )
    threshold: Float = Field(
        0.0,
        ge=0,
        le=1_000_000,
        description="Smallest change of the metric that counts as an improvement (absolute).",
    )


class Hyperparameters(KubeModel):
    """Optimisation settings. Exactly one of epochs and maxSteps."""

    epochs: Annotated[Float, Field(gt=0, le=1000)] | None = Field(None, description="Passes over the data.")
    max_steps: Annotated[int, Field(ge=1, le=100_000_000), WHOLE_FLOAT, STRICT] | None = Field(
        None, description="Optimizer steps to run."
    )
    learning_rate: Float = Field(2e-4, gt=0, le=1, description="Peak learning rate.")
    lr_scheduler: LRScheduler = Field(LRScheduler.linear, description="Learning rate schedule after warmup.")
    warmup_steps: Int = Field(0, ge=0, le=10_000_000, description="Linear warmup steps.")
    weight_decay: Float = Field(0.0, ge=0, le=1, description="AdamW weight decay.")
    per_device_batch_size: Int = Field(8, ge=1, le=4096, description="Sequences per process per micro-step.")
    gradient_accumulation_steps: Int = Field(1, ge=1, le=1024, description="Micro-steps per optimizer step.")
    max_seq_length: Int = Field(
        512, ge=8, le=1_048_576, description="Tokens per sequence; longer are truncated."
    )
    seed: Int = Field(42, ge=0, le=2**31 - 1, description="Seed for initialisation, shuffling and dropout.")
    precision: Precision = Field(
        Precision.auto, description="auto: bf16 on GPUs that support it, else fp16 on GPUs, fp32 on CPU."
    )
    gradient_checkpointing: Bool = Field(False, description="Recompute activations to save memory.")
    robustness: Robustness | None = Field(
        None, description="Noise or adversarial perturbation of the input embeddings during training."
    )
    max_grad_norm: Float = Field(1.0, ge=0, le=1000, description="Gradient clipping norm (0 disables).")
    eval_every_steps: Annotated[int, Field(ge=1, le=10_000_000), WHOLE_FLOAT, STRICT] | None = Field(
        None, description="Evaluate every N steps (default: at the end of each epoch and of training)."
    )
    logging_every_steps: Int = Field(
        10, ge=1, le=100_000, description="Log and report progress every N steps."
    )
    early_stopping: EarlyStopping | None = Field(
        None,
        description="Stop when evaluation stops improving; <output>/model (and adapter) then hold the "
        "best evaluation's weights. Needs evaluation data (dataset.eval or dataset.evalFraction), and "
        "checkpoints are then saved at every evaluation (checkpoint.everySteps is not used).",
    )

    cel_rules = (
        CelRule(
            "has(self.epochs) != has(self.maxSteps)",
            "set exactly one of epochs and maxSteps",
            lambda h: (h.epochs is not None) != (h.max_steps is not None),
            field="maxSteps",
        ),
    )


# The extra DeepSpeed config travels in the run plan's ConfigMap (1 MiB at most, with everything
# else the plan holds); a real DeepSpeed config is a few KiB.
MAX_DEEPSPEED_CONFIG_BYTES = 64 * 1024
# Top-level DeepSpeed keys kubetune renders from the hyperparameters; the transformers integration
# refuses (exit 2) a config whose batch geometry or clipping disagrees with the training arguments.
DERIVED_DEEPSPEED_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
)


def _bounded_config(config: dict[str, Any]) -> dict[str, Any]:
    """The size bound and the derived keys. Neither can be a CEL rule: CEL sees a free-form object
    as one without fields (no keys to list), so only kubetune validate and the operator check them."""
    derived = [key for key in DERIVED_DEEPSPEED_KEYS if key in config]
    if derived:
        raise PydanticCustomError(
            "config_derived",
            "may not set {keys}: kubetune derives them from hyperparameters (perDeviceBatchSize, "
            "gradientAccumulationSteps, maxGradNorm), and the runtime refuses a config that disagrees "
            "with those; set the hyperparameters instead",
            {"keys": ", ".join(derived)},
        )
    size = len(json.dumps(config, separators=(",", ":"), ensure_ascii=False).encode())
    if size > MAX_DEEPSPEED_CONFIG_BYTES:
        raise PydanticCustomError(
            "config_size",
            "is {size} bytes as JSON, more than the {limit} allowed (the config is copied into the "
            "run plan's ConfigMap, which Kubernetes caps at 1 MiB)",
            {"size": size, "limit": MAX_DEEPSPEED_CONFIG_BYTES},
        )
    return config


class DeepSpeed(KubeModel):
    """DeepSpeed ZeRO settings."""

    zero_stage: Int = Field(
        2, ge=0, le=3, description="ZeRO stage: 0 off, 1 optimizer states, 2 +gradients, 3 +parameters."
    )
    offload_optimizer: Bool = Field(False, description="Keep optimizer states in CPU memory (ZeRO 1-3).")
    offload_params: Bool = Field(False, description="Keep parameters in CPU memory (ZeRO 3 only).")
    config: Annotated[dict[str, Any], Field(max_length=64), AfterValidator(_bounded_config)] | None = Field(
        None,
        description="Extra DeepSpeed configuration merged over the generated one "
        "(see the DeepSpeed config reference), at most "
        f"{MAX_DEEPSPEED_CONFIG_BYTES // 1024} KiB as JSON (it is copied into the run plan's "
        f"ConfigMap). {', '.join(DERIVED_DEEPSPEED_KEYS)} are derived from hyperparameters "
        "and may not be set here.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True, "type": "object"},
    )

    cel_rules = (
        CelRule(
            "!self.offloadParams || self.zeroStage == 3",
            "offloadParams requires zeroStage 3",
            lambda d: not d.offload_params or d.zero_stage == 3,
            field="offloadParams",
        ),
        CelRule(
            "!self.offloadOptimizer || self.zeroStage >= 1",
            "offloadOptimizer requires zeroStage 1, 2 or 3",
            lambda d: not d.offload_optimizer or d.zero_stage >= 1,
            field="offloadOptimizer",
        ),
    )


class Toleration(KubeModel):
    """A Kubernetes toleration (core/v1 Toleration)."""

    key: str | None = Field(
        None, max_length=316, description="Taint key; empty with operator Exists matches all taints."
    )
    operator: Literal["Equal", "Exists"] = Field("Equal", description="Equal or Exists.")
    value: str | None = Field(None, max_length=63, description="Taint value for operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to match; empty matches all effects."
    )
    toleration_seconds: Annotated[int, Field(ge=0, le=2**31 - 1), WHOLE_FLOAT, STRICT] | None = Field(
        None, description="For NoExecute: how long to stay bound."
    )


class ContainerResources(KubeModel):
    """Container resource requests and limits."""

    requests: dict[str, Quantity] | None = Field(
        None, max_length=32, description="Minimum resources, e.g. cpu: 4, memory: 32Gi."
    )
    limits: dict[str, Quantity] | None = Field(None, max_length=32, description="Maximum resources.")


class Resources(KubeModel):
    """Where and on what the workload runs."""

    workers: Int = Field(1, ge=1, le=1024, description="Pods (torchrun nodes) in the training gang.")
    gpus_per_worker: Int = Field(0, ge=0, le=64, description="GPUs per pod (nvidia.com/gpu).")
    processes_per_worker: Annotated[int, Field(ge=1, le=64), WHOLE_FLOAT, STRICT] | None = Field(
        None, description="Training processes per pod; defaults to gpusPerWorker, or 1 without GPUs."
    )
    requests: dict[str, Quantity] | None = Field(
        None, max_length=32, description="Container requests, e.g. cpu: 4, memory: 32Gi."
    )
    limits: dict[str, Quantity] | None = Field(
        None, max_length=32, description="Container limits, e.g. memory: 64Gi."
    )
    node_selector: dict[str, Annotated[str, Field(max_length=63)]] | None = Field(
        None, max_length=64, description="Node labels the pods must match."
    )
    tolerations: list[Toleration] | None = Field(None, max_length=64, description="Taints the pods tolerate.")
    image: str | None = Field(
        None, min_length=1, max_length=1024, description="Override of the trainer image."
    )
    scratch_size: Quantity = Field(
        "50Gi", description="Size limit of the emptyDir scratch volume (checkpoints are staged there)."
    )
    priority_class_name: str | None = Field(None, max_length=253, description="PriorityClass of the pods.")

    cel_rules = (
        CelRule(
            "!has(self.processesPerWorker) || self.gpusPerWorker == 0 || "
            "self.processesPerWorker == self.gpusPerWorker",
            "processesPerWorker must equal gpusPerWorker when GPUs are requested (one process per GPU)",
            lambda r: (
                r.processes_per_worker is None
                or r.gpus_per_worker == 0
                or r.processes_per_worker == r.gpus_per_worker
            ),
            field="processesPerWorker",
        ),
    )

    @property
    def processes(self) -> int:
        return self.processes_per_worker or self.gpus_per_worker or 1


class Checkpointing(KubeModel):
    """When checkpoints are written to <output>/checkpoints and how many are kept."""

    every_steps: Int = Field(100, ge=1, le=10_000_000, description="Save a checkpoint every N steps.")
    keep_last: Int = Field(
        2, ge=1, le=1000, description="Committed checkpoints to keep (older ones deleted)."
    )


class Output(KubeModel):
    """Where artifacts go: <uri>/model, /adapter, /checkpoints, /metrics.json, /logs."""

    uri: OutputURI = Field(description="Prefix for all artifacts: s3://bucket/prefix or file:///path.")


class SecretKeyNames(KubeModel):
    """A reference to a Secret holding S3 credentials; the operator never reads its values."""

    name: str = Field(
        pattern=DNS_SUBDOMAIN_PATTERN, max_length=253, description="Secret name (same namespace)."
    )
    access_key_id_key: str = Field(
        "AWS_ACCESS_KEY_ID",
        min_length=1,
        max_length=253,
        description="Key of the access key id in the Secret.",
    )
    secret_access_key_key: str = Field(
        "AWS_SECRET_ACCESS_KEY",
        min_length=1,
        max_length=253,
        description="Key of the secret access key in the Secret.",
    )
    session_token_key: str | None = Field(
        None, min_length=1, max_length=253, description="Optional key of a session token in the Secret."
    )


_ENDPOINT_CREDENTIALS = re.compile(ENDPOINT_CREDENTIALS)


class AddressingStyle(StrEnum):
    auto = "auto"
    path = "path"
    virtual = "virtual"


class Storage(KubeModel):
    """How to reach S3-compatible storage (AWS S3, MinIO, Ceph, R2...)."""

    endpoint: str | None = Field(
        None,
        pattern=ENDPOINT_PATTERN,
        max_length=2048,
        description="Endpoint URL for non-AWS servers, e.g. http://minio.storage:9000. Never with "
        "credentials in it (http://KEY:SECRET@host): they belong in the Secret of secretRef.",
    )
    region: str | None = Field(None, min_length=1, max_length=64, description="Region name, e.g. us-east-1.")
    addressing_style: AddressingStyle = Field(
        AddressingStyle.auto, description="Bucket addressing: path-style suits most MinIO setups."
    )
    secret_ref: SecretKeyNames | None = Field(
        None,
        description="Secret with the keys; omit to use the pods' own identity (see serviceAccountName).",
    )
    service_account_name: str | None = Field(
        None,
        pattern=DNS_SUBDOMAIN_PATTERN,
        max_length=253,
        description=(
            "An existing ServiceAccount of the job's namespace that the job's pods (validation, "
            "training, serving) run as, for storage access by workload identity (EKS IRSA, GKE "
            'Workload Identity). It must carry the label kubetune.io/runner: "true", set by whoever '
            "may hand out that identity. Omit to run as the NAME-runner ServiceAccount the operator "
            "creates."
        ),
    )

    cel_rules = (
        CelRule(
            f"!has(self.endpoint) || !self.endpoint.matches('{ENDPOINT_CREDENTIALS}')",
            "endpoint must not contain credentials (user:password@host): they would be copied into "
            "the run plan and logs; put the keys in the Secret named by secretRef",
            lambda s: s.endpoint is None or _ENDPOINT_CREDENTIALS.match(s.endpoint) is None,
            field="endpoint",
        ),
    )


class ServeRuntime(StrEnum):
    builtin = "builtin"
    vllm = "vllm"


class SecretKeySelector(KubeModel):
    """One key of a Secret in the job's namespace; the operator never reads its value."""

    name: str = Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253, description="Secret name.")
    key: str = Field(pattern=r"^[-._a-zA-Z0-9]+$", max_length=253, description="Key within the Secret.")


class Serve(KubeModel):
    """Serving of the result once the job succeeds."""

    enabled: Bool = Field(False, description="Create a serving Deployment and Service on success.")
    runtime: ServeRuntime = Field(
        ServeRuntime.builtin,
        description="builtin: kubetune's OpenAI-compatible server (CPU or GPU); vllm: vLLM (GPU).",
    )
    replicas: Int = Field(1, ge=0, le=1000, description="Serving pods.")
    gpus: Int = Field(0, ge=0, le=64, description="GPUs per serving pod.")
    requests: dict[str, Quantity] | None = Field(
        None, max_length=32, description="Container requests of each serving pod."
    )
    limits: dict[str, Quantity] | None = Field(
        None, max_length=32, description="Container limits of each serving pod."
    )
    image: str | None = Field(
        None, min_length=1, max_length=1024, description="Override of the serving image."
    )
    max_batch_size: Int = Field(16, ge=1, le=1024, description="Requests batched into one forward pass.")
    api_key_secret_ref: SecretKeySelector | None = Field(
        None,
        description=(
            "Secret key (same namespace) holding the API key clients must send as 'Authorization: "
            "Bearer KEY' (several keys separated by commas or newlines, for rotation); passed to the "
            "server by reference, never read by the operator. /healthz, /readyz and /metrics stay "
            "open. Omit to serve without authentication."
        ),
    )

    cel_rules = (
        CelRule(
            "self.runtime != 'vllm' || self.gpus >= 1",
            "the vllm runtime needs gpus >= 1",
            lambda s: s.runtime != ServeRuntime.vllm or s.gpus >= 1,
            field="gpus",
        ),
    )


# MLflow refuses '/' and ':' in registered-model names (model URIs are models:/NAME/VERSION); this
# is the portable subset, which also takes Unity Catalog's catalog.schema.model form.
REGISTERED_MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
MAX_REGISTERED_MODEL_LENGTH = 256
# MLflow's limit on experiment names; control characters (a stray newline) are refused.
EXPERIMENT_PATTERN = r"^[^\x00-\x1f\x7f]+$"
MAX_EXPERIMENT_LENGTH = 500
_SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"


class MlflowCredentials(KubeModel):
    """A Secret (same namespace) with MLflow credentials: a username and password (basic auth) or
    a token (bearer). Pods receive them as MLFLOW_TRACKING_USERNAME/PASSWORD or
    MLFLOW_TRACKING_TOKEN by reference; the operator never reads their values."""

    name: str = Field(
        pattern=DNS_SUBDOMAIN_PATTERN, max_length=253, description="Secret name (same namespace)."
    )
    username_key: str | None = Field(
        None, pattern=_SECRET_KEY_PATTERN, max_length=253, description="Key of the username in the Secret."
    )
    password_key: str | None = Field(
        None, pattern=_SECRET_KEY_PATTERN, max_length=253, description="Key of the password in the Secret."
    )
    token_key: str | None = Field(
        None, pattern=_SECRET_KEY_PATTERN, max_length=253, description="Key of a bearer token in the Secret."
    )

    cel_rules = (
        CelRule(
            "has(self.usernameKey) == has(self.passwordKey) && has(self.tokenKey) != has(self.usernameKey)",
            "set tokenKey, or usernameKey and passwordKey, not both",
            lambda c: (
                (c.username_key is None) == (c.password_key is None)
                and (c.token_key is None) != (c.username_key is None)
            ),
            field="tokenKey",
        ),
    )


class MlflowTarget(KubeModel):
    """Where a run is tracked, as the run plan carries it: never any credentials."""

    uri: str = Field(
        pattern=ENDPOINT_PATTERN,
        max_length=2048,
        description="Tracking server URL, e.g. http://mlflow.mlflow:5000. Never with credentials in it "
        "(http://USER:PASSWORD@host): they belong in the Secret of secretRef.",
    )
    experiment: str | None = Field(
        None,
        pattern=EXPERIMENT_PATTERN,
        max_length=MAX_EXPERIMENT_LENGTH,
        description="Experiment name, created when missing; defaults to <namespace>/<name> of the job, so "
        "every run of a job recreated under the same name lands in one experiment.",
    )
    registered_model: str | None = Field(
        None,
        pattern=REGISTERED_MODEL_PATTERN,
        max_length=MAX_REGISTERED_MODEL_LENGTH,
        description="Registered model that receives a new version (pointing at the model in object storage, "
        "which is never copied into MLflow) when the job succeeds; created when missing. Letters, digits, "
        "'.', '_' and '-', starting with a letter or digit.",
    )

    cel_rules = (
        CelRule(
            f"!self.uri.matches('{ENDPOINT_CREDENTIALS}')",
            "uri must not contain credentials (user:password@host): they would be copied into the run "
            "plan and logs; put them in the Secret named by secretRef",
            lambda m: _ENDPOINT_CREDENTIALS.match(m.uri) is None,
            field="uri",
        ),
    )

    def resolved(self, namespace: str, name: str) -> MlflowTarget:
        """This target with the default experiment filled in: ``<namespace>/<name>`` of the job."""
        return self.model_copy(update={"experiment": self.experiment or f"{namespace}/{name}"})


class MlflowTracking(MlflowTarget):
    """An MLflow tracking server (and model registry) that rank 0 logs the run to."""

    secret_ref: MlflowCredentials | None = Field(
        None, description="Secret with the credentials; omit for a server without authentication."
    )

    def target(self, namespace: str, name: str) -> MlflowTarget:
        """What the run plan carries: the target without the Secret, its experiment resolved."""
        return MlflowTarget.model_validate(self.model_dump(exclude={"secret_ref"})).resolved(namespace, name)


class Tracking(KubeModel):
    """Experiment tracking. A tracking server that cannot be reached never fails the job: calls
    are retried briefly, then tracking is switched off for the run and status.tracking says so."""

    mlflow: MlflowTracking | None = Field(None, description="Log the run to MLflow.")


class JobSpecBase(KubeModel):
    """Fields shared by FineTuneJob and CompressJob specs: lifecycle, placement, storage, serving."""

    max_restarts: Int = Field(
        3,
        ge=0,
        le=1000,
        description="Gang restarts after retriable failures (resume from the newest checkpoint).",
    )
    active_deadline_seconds: Annotated[int, Field(ge=1, le=2**31 - 1), WHOLE_FLOAT, STRICT] | None = Field(
        None,
        description="Fail with reason DeadlineExceeded after this long running (paused while suspended).",
    )
    suspend: Bool = Field(
        False, description="Suspend: no pods run; resuming continues from the last checkpoint."
    )
    queue_name: str | None = Field(
        None, pattern=DNS_LABEL_PATTERN, max_length=63, description="Kueue LocalQueue to admit the workload."
    )
    ttl_seconds_after_finished: Annotated[int, Field(ge=0, le=2**31 - 1), WHOLE_FLOAT, STRICT] | None = Field(
        None, description="Delete the job's children this long after it finishes (artifacts are kept)."
    )
    storage: Storage = Field(default_factory=Storage, description="Object storage access.")
    resources: Resources = Field(default_factory=Resources, description="Pods, processes and placement.")
    serve: Serve = Field(default_factory=Serve, description="Serving of the result.")
    output: Output = Field(description="Where artifacts are written.")
    tracking: Tracking | None = Field(
        None, description="Experiment tracking (params, metrics, artifact locations, model registry)."
    )
