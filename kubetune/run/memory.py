"""The memory plan: what one training process holds, and whether that fits the job's limits.

Pure arithmetic over the run plan and the model's ``config.json`` (no torch, no DeepSpeed), used by
``kubetune plan`` and by the validation step, which refuses a job that cannot fit
(reason ``WillNotFit``) before any gang starts.

**Model states** follow DeepSpeed's own estimators,
``deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs`` and
``deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs`` (DeepSpeed 0.19): with
mixed precision a parameter costs 2 bytes of 16-bit weights, 2 of 16-bit gradients and 16 of
optimizer state (a 32-bit master copy, its 32-bit gradient, Adam's two moments), so ZeRO-2 without
offload needs ``2P + 18P/N`` on each of N devices and ZeRO-3 ``4 x largest layer + 18P/N`` (its
gradients are reduce-scattered into the optimizer's partition: no separate 16-bit term). ZeRO-1
shards only the 16 bytes of optimizer state, ZeRO-2 the gradients too, ZeRO-3 the weights as well.
Offloading the optimizer moves its 16 bytes and the gradients to host memory (the estimators' GPU
figure is then ``2P`` for ZeRO-2); offloading parameters moves the weights too. In fp32 the working
copy and gradients take 4 bytes; ZeRO still keeps its own 32-bit master partition and gradient
(stage_1_and_2's ``single_partition_of_fp32_groups``), while without ZeRO torch's AdamW holds
only its two moments. With LoRA only the adapters (``r x (in + out)`` per adapted linear layer)
have gradients and optimizer state; the frozen base has weights only.

**Activations** per layer are Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", section 4.1): ``s x b x h x (34 + 5 x a x s / h)`` bytes with 16-bit
activations, twice that in fp32; with gradient checkpointing each layer keeps only its input
(``s x b x h`` values) and one layer at a time is recomputed in full. The logits add
``b x s x V`` values in the working dtype plus a 32-bit copy and its gradient for the loss. DPO
runs the chosen and rejected sequences of a pair together (twice the sequences).

**The runtime itself** (the CUDA context on a GPU; Python, torch, transformers and DeepSpeed in
host memory) is a fixed allowance per process, :data:`RUNTIME_DEVICE_BYTES` and
:data:`RUNTIME_HOST_BYTES`, set below what they measure so that the check never refuses a job
that fits. Model states in host memory get DeepSpeed's ``additional_buffer_factor`` of 1.5, as
its estimators' CPU figures do (flattening and pinned buffers, copies made while loading and
saving); measured CPU runs agree (tests/integration/test_memory_plan_measured.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final

from kubetune.api.spec import MethodType, Objective, Precision, TaskType
from kubetune.errors import InvalidInputError
from kubetune.run.plan import GPU_PRODUCT_LABEL, SKIP_MEMORY_CHECK_ANNOTATION, RunPlan

GIB: Final = 1024**3
MIB: Final = 1024**2
# The CUDA context and the library workspaces of a process on a GPU (about 0.5-1 GiB measured).
RUNTIME_DEVICE_BYTES: Final = 512 * MIB
# Python with torch, transformers and DeepSpeed imported, before the model loads: about 0.7 GiB
# resident measured on CPU (trainer image, DeepSpeed 0.19, torch 2.x).
RUNTIME_HOST_BYTES: Final = 512 * MIB
# DeepSpeed's additional_buffer_factor, applied by its estimators to host memory.
HOST_BUFFER_FACTOR: Final = 1.5
# Per-GPU memory by a substring of the node label nvidia.com/gpu.product (the GPU feature
# discovery's product name); the more specific names first.
GPU_MEMORY: Final[tuple[tuple[str, int], ...]] = (
    ("H200", 141 * GIB),
    ("H100-NVL", 94 * GIB),
    ("H100", 80 * GIB),
    ("GH200", 96 * GIB),
    ("A100-SXM4-40GB", 40 * GIB),
    ("A100-PCIE-40GB", 40 * GIB),
    ("A100", 80 * GIB),
    ("L40S", 48 * GIB),
    ("L40", 48 * GIB),
    ("A10G", 24 * GIB),
    ("A10", 24 * GIB),
    ("L4", 24 * GIB),
    ("V100-SXM2-16GB", 16 * GIB),
    ("V100", 32 * GIB),
    ("T4", 16 * GIB),
)
# Families whose MLP is gated (gate, up and down projections) rather than two matrices.
_GATED_MLP: Final = frozenset(
    {
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "gemma3_text",
        "phi3",
        "olmo",
        "olmo2",
        "granite",
        "cohere",
        "smollm3",
    }
)
# Families with learned absolute position embeddings (max positions x hidden size weights).
_ABSOLUTE_POSITIONS: Final = frozenset({"gpt2", "gpt_neo", "opt", "bert", "roberta", "distilbert"})
# Families whose config class defaults tie_word_embeddings to False (a saved config.json may
# leave the default out).
_UNTIED_BY_DEFAULT: Final = frozenset({"llama", "mistral", "mixtral", "phi3", "olmo", "olmo2"})
# Korthikanti et al.'s per-layer activation coefficients (bytes per s x b x h at 16 bits).
_ACTIVATION_BYTES_PER_SBH: Final = 34
_ATTENTION_SCORE_BYTES: Final = 5
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[kMGTPE]|m)?$")
_BINARY: Final[dict[str, Decimal]] = {f"{p}i": Decimal(1024) ** (i + 1) for i, p in enumerate("KMGTPE")}
_DECIMAL: Final[dict[str, Decimal]] = {
    "m": Decimal("0.001"),
    **{p: Decimal(10) ** (3 * (i + 1)) for i, p in enumerate("kMGTPE")},
}


def memory_bytes(quantity: str | int | None) -> int | None:
    """Bytes of a Kubernetes memory quantity (``64Gi``, ``500M``, ``1073741824``); ``None`` for none
    or a form the API would not take for memory."""
    if quantity is None:
        return None
    match = _QUANTITY.match(str(quantity))
    if match is None:
        return None
    number, suffix = Decimal(match.group(1)), match.group(2)
    scale = _BINARY.get(suffix or "") or _DECIMAL.get(suffix or "", Decimal(1))
    return int(number * scale)


def gpu_memory(product: str | None) -> int | None:
    """Memory of one GPU of ``product`` (the ``nvidia.com/gpu.product`` label), or ``None``."""
    if not product:
        return None
    return next((size for key, size in GPU_MEMORY if key in product), None)


@dataclass(frozen=True)
class ModelShape:
    """What the arithmetic needs to know about a model, from its ``config.json``."""

    model_type: str
    hidden_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    gated_mlp: bool
    tied_embeddings: bool
    position_embeddings: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        """The shape of a transformers ``config.json`` (GPT-2, BERT and Llama spellings).
        A config without the sizes raises :class:`InvalidInputError` naming the missing key."""

        def first(*names: str, default: int | None = None) -> int:
            for name in names:
                value = config.get(name)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
            if default is None:
                raise InvalidInputError(
                    f"config.json has no {' or '.join(names)}: the memory plan needs the model's sizes"
                )
            return default

        model_type = str(config.get("model_type") or "unknown")
        hidden = first("hidden_size", "n_embd", "d_model")
        heads = first("num_attention_heads", "n_head")
        head_dim = first("head_dim", default=max(1, hidden // heads))
        tied = config.get("tie_word_embeddings")
        positions = 0
        if model_type in _ABSOLUTE_POSITIONS:
            positions = first("max_position_embeddings", "n_positions", default=0)
        return cls(
            model_type=model_type,
            hidden_size=hidden,
            layers=first("num_hidden_layers", "n_layer"),
            heads=heads,
            kv_heads=first("num_key_value_heads", default=heads),
            head_dim=head_dim,
            intermediate_size=first("intermediate_size", "n_inner", default=4 * hidden),
            vocab_size=first("vocab_size"),
            gated_mlp=model_type in _GATED_MLP,
            tied_embeddings=bool(tied) if isinstance(tied, bool) else model_type not in _UNTIED_BY_DEFAULT,
            position_embeddings=positions,
        )

    def linear_layers(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one transformer block, by its module name."""
        h, q, kv, inter = (
            self.hidden_size,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.intermediate_size,
        )
        layers = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
        if self.gated_mlp:
            layers |= {"gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
        else:
            layers |= {"up_proj": (h, inter), "down_proj": (inter, h)}
        return layers

    def layer_parameters(self) -> int:
        """Weights of one transformer block (linear layers and two norms; biases left out)."""
        return sum(i * o for i, o in self.linear_layers().values()) + 2 * self.hidden_size

    def parameters(self, *, task: TaskType = TaskType.causal_lm, num_labels: int = 2) -> int:
        """All weights: embeddings, blocks, final norm and the head of ``task``."""
        h, v = self.hidden_size, self.vocab_size
        head = (
            num_labels * h
            if task == TaskType.sequence_classification
            else (0 if self.tied_embeddings else v * h)
        )
        return v * h + self.position_embeddings * h + self.layers * self.layer_parameters() + h + head

    def largest_layer(self) -> int:
        """The largest single module's weights (what ZeRO-3 gathers at once): the embedding or a block's biggest linear."""
        return max([self.vocab_size * self.hidden_size, *(i * o for i, o in self.linear_layers().values())])

    def lora_parameters(self, rank: int, target_modules: list[str]) -> int:
        """Adapter weights: ``r x (in + out)`` for each adapted linear layer of every block.
        ``all-linear`` adapts every block's linear layers (peft leaves the output head out);
        names other than the Llama-style ones above count nothing (said in the plan's notes)."""
        linear = self.linear_layers()
        names = list(linear) if "all-linear" in target_modules else [m for m in target_modules if m in linear]
        return self.layers * sum(rank * (linear[n][0] + linear[n][1]) for n in names)


@dataclass(frozen=True)
class Setup:
    """What the plan decides about one training process."""

    world_size: int
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    dtype_bytes: int  # 2 for bf16/fp16, 4 for fp32
    batch_size: int  # sequences per process per micro-step
    seq_length: int
    gradient_checkpointing: bool
    lora: bool
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = ("all-linear",)
    task: TaskType = TaskType.causal_lm
    num_labels: int = 2
    on_gpu: bool = False
    pairs: bool = False  # DPO: a chosen and a rejected sequence per example


@dataclass(frozen=True)
class Row:
    """One line of the plan: what it is, its bytes and where they live (``device`` or ``host``)."""

    what: str
    bytes: int
    where: str
    how: str


@dataclass
class MemoryPlan:
    parameters: int
    trainable: int
    rows: list[Row]
    notes: list[str] = field(default_factory=list)

    def total(self, where: str) -> int:
        return sum(r.bytes for r in self.rows if r.where == where)

    def modelled(self, where: str) -> int:
        """The total without the runtime's allowance: what the arithmetic models."""
        return sum(r.bytes for r in self.rows if r.where == where and r.what != "runtime")


def estimate(shape: ModelShape, setup: Setup) -> MemoryPlan:
    """The memory of one training process, row by row (see the module docstring for the sources)."""
    n, w, stage = setup.world_size, setup.dtype_bytes, setup.zero_stage
    total = shape.parameters(task=setup.task, num_labels=setup.num_labels)
    trainable = total
    notes: list[str] = []
    if setup.lora:
        trainable = shape.lora_parameters(setup.lora_rank, list(setup.lora_targets))
        if setup.task == TaskType.sequence_classification:
            trainable += setup.num_labels * shape.hidden_size  # peft trains the new score head too
        unknown = [m for m in setup.lora_targets if m != "all-linear" and m not in shape.linear_layers()]
        if unknown:
            notes.append(f"LoRA target modules {', '.join(unknown)} are not counted (unknown names)")
    frozen = total - trainable
    device = "device" if setup.on_gpu else "host"
    optimizer_where = "host" if setup.offload_optimizer else device
    params_where = "host" if setup.offload_params else device
    mixed = w == 2

    params_shard = n if stage == 3 else 1
    rows = [
        Row(
            "parameters",
            w * total // params_shard,
            params_where,
            f"{w} B x {total:,}" + (f" / {n} (ZeRO-3)" if stage == 3 else ""),
        )
    ]
    if stage == 3:
        largest = shape.largest_layer()
        rows.append(
            Row("gathered layer", 4 * largest, device, f"4 B x {largest:,} (ZeRO-3 gathers one module)")
        )
    # Offloaded optimizer: the gradients go to host buckets and into the 32-bit gradient counted
    # with the optimizer states (the estimators' GPU figure holds no gradients then). ZeRO-3
    # reduce-scatters them straight into that partition: its estimator has no 16-bit gradient term.
    if not setup.offload_optimizer and stage < 3:
        grad_shard = n if stage >= 2 else 1
        rows.append(
            Row(
                "gradients",
                w * trainable // grad_shard,
                device,
                f"{w} B x {trainable:,}" + (f" / {n} (ZeRO-{stage})" if stage >= 2 else ""),
            )
        )
    optimizer_bytes = 16 if (stage >= 1 or mixed) else 8
    optimizer_shard = n if stage >= 1 else 1
    what = (
        "32-bit master, gradient, Adam m and v" if optimizer_bytes == 16 else "Adam m and v (fp32, no ZeRO)"
    )
    rows.append(
        Row(
            "optimizer states",
            optimizer_bytes * trainable // optimizer_shard,
            optimizer_where,
            f"{optimizer_bytes} B x {trainable:,}"
            + (f" / {n} (ZeRO-{stage})" if stage >= 1 else "")
            + f": {what}",
        )
    )
    # DeepSpeed's estimators multiply host memory by additional_buffer_factor (1.5): pinned and
    # flattening buffers, the copies made while loading and saving. Measured CPU runs agree.
    on_host = sum(r.bytes for r in rows if r.where == "host")
    if on_host:
        rows.append(
            Row(
                "host buffers",
                int(on_host * (HOST_BUFFER_FACTOR - 1)),
                "host",
                f"x{HOST_BUFFER_FACTOR - 1:g} of the model states in host memory (DeepSpeed's buffer factor)",
            )
        )
    rows.append(activation_row(shape, setup, device))
    rows.append(logits_row(shape, setup, device))
    rows.append(
        Row(
            "runtime",
            RUNTIME_DEVICE_BYTES if setup.on_gpu else RUNTIME_HOST_BYTES,
            device,
            "CUDA context and workspaces" if setup.on_gpu else "Python, torch, transformers, DeepSpeed",
        )
    )
    if setup.on_gpu:
        rows.append(Row("runtime", RUNTIME_HOST_BYTES, "host", "Python, torch, transformers, DeepSpeed"))
    if frozen and setup.lora:
        notes.append(f"{frozen:,} frozen base parameters have no gradients or optimizer states")
    return MemoryPlan(parameters=total, trainable=trainable, rows=rows, notes=notes)


def _sequences(setup: Setup) -> int:
    return setup.batch_size * (2 if setup.pairs else 1)


def activation_row(shape: ModelShape, setup: Setup, where: str) -> Row:
    s, b, h, a, layers = setup.seq_length, _sequences(setup), shape.hidden_size, shape.heads, shape.layers
    scale = setup.dtype_bytes / 2  # the coefficients count 16-bit values
    full_layer = int(s * b * h * (_ACTIVATION_BYTES_PER_SBH + _ATTENTION_SCORE_BYTES * a * s / h) * scale)
    if setup.gradient_checkpointing:
        kept = layers * s * b * h * setup.dtype_bytes + full_layer
        how = f"{layers} layer inputs + 1 layer recomputed (checkpointing), s={s} b={b} h={h}"
        return Row("activations", kept, where, how)
    return Row(
        "activations",
        layers * full_layer,
        where,
        f"{layers} layers x s*b*h*(34+5*a*s/h), s={s} b={b} h={h} a={a}",
    )


def logits_row(shape: ModelShape, setup: Setup, where: str) -> Row:
    s, b = setup.seq_length, _sequences(setup)
    outputs = setup.num_labels if setup.task == TaskType.sequence_classification else shape.vocab_size
    per_value = setup.dtype_bytes + 8  # the logits, their 32-bit copy for the loss and its gradient
    return Row(
        "logits",
        b * s * outputs * per_value if setup.task == TaskType.causal_lm else b * outputs * per_value,
        where,
        f"{per_value} B x b*s*V = {b}x{s}x{outputs}"
        if setup.task == TaskType.causal_lm
        else f"{per_value} B x b*labels",
    )


def dtype_bytes(precision: Precision, *, on_gpu: bool) -> int:
    """Bytes of the working dtype: ``auto`` is bf16 on GPUs (the common case; fp16 has the same
    size) and fp32 on CPU, as the runtime resolves it."""
    if precision == Precision.fp32 or (precision == Precision.auto and not on_gpu):
        return 4
    return 2


def setup_of(plan: RunPlan) -> Setup:
    """The :class:`Setup` a fine-tuning plan decides. A compression plan trains nothing and has none."""
    hp = plan.hyperparameters
    if plan.kind != "finetune" or hp is None:
        raise InvalidInputError("a memory plan is made for fine-tuning runs; compression does not train")
    zero = (plan.deepspeed_config or {}).get("zero_optimization") or {}
    on_gpu = plan.world.gpus_per_worker > 0
    method = plan.method
    lora = method is not None and method.type == MethodType.lora
    settings = method.lora if method is not None and method.lora is not None else None
    defaults = Setup(0, 0, False, False, 4, 1, 1, False, False)
    return Setup(
        world_size=plan.world.size,
        zero_stage=int(zero.get("stage", 0)),
        offload_optimizer=_offloaded(zero.get("offload_optimizer")),
        offload_params=_offloaded(zero.get("offload_param")),
        dtype_bytes=dtype_bytes(hp.precision, on_gpu=on_gpu),
        batch_size=hp.per_device_batch_size,
        seq_length=hp.max_seq_length,
        gradient_checkpointing=hp.gradient_checkpointing,
        lora=lora,
        lora_rank=settings.r if settings else defaults.lora_rank,
        lora_targets=tuple(settings.target_modules) if settings else defaults.lora_targets,
        task=plan.task.type,
        num_labels=plan.task.num_labels or (len(plan.task.labels) if plan.task.labels else 2),
        on_gpu=on_gpu,
        pairs=method is not None and method.objective == Objective.dpo,
    )


def _offloaded(section: Any) -> bool:
    return isinstance(section, dict) and section.get("device", "none") in ("cpu", "nvme")


@dataclass(frozen=True)
class Check:
    """One comparison of the plan with a limit; ``fits`` is None when there is no limit to compare with."""

    what: str
    needed: int
    limit: int | None
    fits: bool | None
    line: str


def checks(plan: RunPlan, memory: MemoryPlan) -> list[Check]:
    """The plan against each GPU's memory (from the node selector's GPU product) and against the
    container memory limit (every process of a pod shares it)."""
    world = plan.world
    found: list[Check] = []
    if world.gpus_per_worker > 0:
        needed = memory.total("device")
        size = gpu_memory(world.gpu_product)
        if size is None:
            line = (
                f"each GPU needs {gib(needed)}; GPU memory unknown (no known "
                f"nodeSelector {GPU_PRODUCT_LABEL}{f' for {world.gpu_product!r}' if world.gpu_product else ''}), not checked"
            )
            found.append(Check("gpu", needed, None, None, line))
        else:
            fits = needed <= size
            line = f"each GPU needs {gib(needed)} of {gib(size)} ({world.gpu_product}): {'fits' if fits else 'DOES NOT FIT'}"
            found.append(Check("gpu", needed, size, fits, line))
    per_process = memory.total("host")
    needed = per_process * world.processes_per_worker
    limit = memory_bytes(world.memory_limit)
    shared = (
        f"{world.processes_per_worker} processes x {gib(per_process)} = "
        if world.processes_per_worker > 1
        else ""
    )
    if limit is None:
        found.append(
            Check(
                "memory",
                needed,
                None,
                None,
                f"each pod needs {shared}{gib(needed)} of host memory; no resources.limits.memory, not checked",
            )
        )
    else:
        fits = needed <= limit
        found.append(
            Check(
                "memory",
                needed,
                limit,
                fits,
                f"each pod needs {shared}{gib(needed)} of host memory, limit {world.memory_limit}: "
                f"{'fits' if fits else 'DOES NOT FIT'}",
            )
        )
    return found


def will_not_fit(plan: RunPlan, memory: MemoryPlan, found: list[Check]) -> str | None:
    """The one-line reason a plan cannot fit (the numbers and what to change), or None when it fits
    or cannot be checked."""
    failed = [c for c in found if c.fits is False]
    if not failed:
        return None
    where = "device" if any(c.what == "gpu" for c in failed) else "host"
    parts = ", ".join(f"{r.what} {gib(r.bytes)}" for r in memory.rows if r.where == where and r.bytes)
    setup = setup_of(plan)
    advice = []
    if setup.zero_stage < 3 and setup.world_size > 1:
        advice.append("deepspeed.zeroStage 3")
    if setup.on_gpu and not setup.offload_optimizer and where == "device":
        advice.append("deepspeed.offloadOptimizer")
    if not setup.gradient_checkpointing:
        advice.append("hyperparameters.gradientCheckpointing")
    if not setup.lora:
        advice.append("method.type lora")
    advice.append("a smaller perDeviceBatchSize or maxSeqLength")
    advice.append("more GPU memory" if where == "device" else "a higher resources.limits.memory")
    return (
        f"{'; '.join(c.line for c in failed)} (per process: {parts}); "
        f'try {", ".join(advice)}, or set the annotation {SKIP_MEMORY_CHECK_ANNOTATION}: "true" to run anyway'
    )


def gib(n: int) -> str:
    if n < GIB:
        return f"{n / MIB:.1f} MiB"
    return f"{n / GIB:.2f} GiB"


def render_table(memory: MemoryPlan, found: list[Check]) -> str:
    """The plan as a table per process, then the checks."""
    lines = [
        f"parameters {memory.parameters:,}, trainable {memory.trainable:,}",
        "",
        f"{'per process':<18} {'where':<7} {'memory':>11}  how",
    ]
    for row in memory.rows:
        lines.append(f"{row.what:<18} {row.where:<7} {gib(row.bytes):>11}  {row.how}")
    for where in ("device", "host"):
        if any(r.where == where for r in memory.rows):
            lines.append(f"{'total':<18} {where:<7} {gib(memory.total(where)):>11}")
    lines += [f"note: {n}" for n in memory.notes]
    lines.append("")
    lines += [c.line for c in found]
    return "\n".join(lines)
