"""From a plan's ``compression`` block to what the libraries run: llm-compressor modifiers for
pruning and quantization (one recipe, one ``oneshot`` pass), a torchao config for CPU-friendly
int8, and the checks that refuse what cannot run *before* any model is downloaded.

Method x scheme, as run here:

============  =====================================================================================
rtn           ``QuantizationModifier`` (round-to-nearest, no calibration data): W4A16, W8A16
              (group-wise, ``groupSize``), W8A8 (per-channel int8 weights, dynamic per-token int8
              activations), FP8 (``FP8_DYNAMIC``: per-channel FP8 weights, dynamic per-token FP8
              activations).
gptq          ``GPTQModifier`` (calibrated, error-compensating): W4A16, W8A16, W8A8. FP8 is
              refused: FP8_DYNAMIC needs no calibration, use ``rtn``.
smoothquant   ``SmoothQuantModifier`` (activation smoothing, strength 0.8) then ``GPTQModifier``
              W8A8.
torchao       ``TorchAoConfig``: INT8_WEIGHT_ONLY (``Int8WeightOnlyConfig``, per-row int8
              weights) or INT8_DYNAMIC (``Int8DynamicActivationInt8WeightConfig``).
============  =====================================================================================

Pruning (``SparseGPTModifier``, ``WandaPruningModifier``) runs first in the same recipe;
magnitude pruning runs on the same in-memory model just before it (:func:`magnitude_prune`). After pruning, GPTQ would refill the pruned weights with its error
updates, so a pruned model is quantized round-to-nearest (the recipe says so; see
:func:`quantization_after_pruning`).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import yaml

from kubetune.api.resources import (
    Pruning,
    PruningMethod,
    Quantization,
    QuantizationMethod,
    QuantizationScheme,
    SparsityPattern,
)
from kubetune.errors import InvalidInputError
from kubetune.run.plan import CompressionPlan, RunPlan

if TYPE_CHECKING:
    import torch
    from llmcompressor.modifiers import Modifier
    from torchao.core.config import AOBaseConfig

STEP_DISTILL: Final = "distill"
STEP_PRUNE: Final = "prune"
STEP_QUANTIZE: Final = "quantize"

# SmoothQuant's migration strength: 0.8 is what the SmoothQuant paper and llm-compressor's
# examples use for decoder LLMs.
SMOOTHING_STRENGTH: Final = 0.8

# FP8 tensor cores arrived with compute capability 8.9 (Ada: L4, L40S) and 9.0 (Hopper).
FP8_MIN_CAPABILITY: Final = (8, 9)

SUPPORTED_SCHEMES: Final[dict[QuantizationMethod, tuple[QuantizationScheme, ...]]] = {
    QuantizationMethod.rtn: (
        QuantizationScheme.w4a16,
        QuantizationScheme.w8a16,
        QuantizationScheme.w8a8,
        QuantizationScheme.fp8,
    ),
    QuantizationMethod.gptq: (QuantizationScheme.w4a16, QuantizationScheme.w8a16, QuantizationScheme.w8a8),
    QuantizationMethod.smoothquant: (QuantizationScheme.w8a8,),
    QuantizationMethod.torchao: (QuantizationScheme.int8_weight_only, QuantizationScheme.int8_dynamic),
}

# Output heads are never pruned: they are small next to the body, and every logit passes through them.
HEAD_PATTERNS: Final = ("re:.*lm_head$", "re:.*score$", "re:.*classifier$")


def steps(compression: CompressionPlan) -> list[str]:
    """The steps a plan runs, always in this order: distill -> prune -> quantize."""
    chosen = []
    if compression.distillation is not None:
        chosen.append(STEP_DISTILL)
    if compression.pruning is not None:
        chosen.append(STEP_PRUNE)
    if compression.quantization is not None:
        chosen.append(STEP_QUANTIZE)
    return chosen


def check_plan(plan: RunPlan) -> CompressionPlan:
    """Refuse a plan this runtime cannot run (exit code 2), before anything is downloaded.

    The schema already rejects unknown methods and schemes and out-of-range numbers; this checks
    the combinations the runtime does not implement, so a hand-written or stale plan fails
    clearly instead of deep inside a library.
    """
    if plan.kind != "compress":
        raise InvalidInputError(f"the plan is a {plan.kind} plan, not a compress plan")
    compression = plan.compression
    if compression is None:
        raise InvalidInputError("the compress plan has no compression block")
    if not steps(compression):
        raise InvalidInputError(
            "the compress plan sets no compression step: set distillation, pruning or quantization"
        )
    quantization = compression.quantization
    if quantization is not None:
        allowed = SUPPORTED_SCHEMES[quantization.method]
        if quantization.scheme not in allowed:
            hint = (
                " (FP8_DYNAMIC needs no calibration data: use method rtn)"
                if quantization.scheme == QuantizationScheme.fp8
                else ""
            )
            raise InvalidInputError(
                f"quantization.method {quantization.method.value} does not take scheme "
                f"{quantization.scheme.value}; allowed: {', '.join(s.value for s in allowed)}{hint}"
            )
    if compression.distillation is not None and plan.hyperparameters is None:
        raise InvalidInputError("the plan has distillation but no hyperparameters for training the student")
    return compression


@dataclass(frozen=True)
class Hardware:
    """What the compressing process runs on."""

    accelerator: str
    """``cuda`` or ``cpu``."""
    device_name: str | None = None
    capability: tuple[int, int] | None = None

    @classmethod
    def detect(cls, accelerator: str) -> Hardware:
        import torch

        if accelerator == "cuda" and torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return cls("cuda", torch.cuda.get_device_name(), (major, minor))
        return cls("cpu")

    def describe(self) -> str:
        if self.accelerator == "cpu":
            return "CPU only"
        capability = ".".join(map(str, self.capability)) if self.capability else "unknown"
        return f"{self.device_name} (compute capability {capability})"


def check_hardware(compression: CompressionPlan, hardware: Hardware) -> None:
    """Fail fast (exit 2) when a recipe cannot run on this hardware: FP8 needs FP8 tensor cores."""
    quantization = compression.quantization
    if quantization is None or quantization.scheme != QuantizationScheme.fp8:
        return
    fp8_gpus = "NVIDIA Ada (L4, L40S), Hopper (H100, H200) or newer, compute capability 8.9+"
    alternatives = "on CPUs use W8A16 (rtn or gptq) or torchao INT8_WEIGHT_ONLY instead"
    if hardware.accelerator != "cuda":
        raise InvalidInputError(
            f"quantization.scheme FP8 needs a GPU with FP8 support ({fp8_gpus}), but this process runs "
            f"on {hardware.describe()}: request resources.gpusPerWorker on such nodes, or {alternatives}"
        )
    if hardware.capability is None or hardware.capability < FP8_MIN_CAPABILITY:
        raise InvalidInputError(
            f"quantization.scheme FP8 needs a GPU with FP8 support ({fp8_gpus}), but this process has "
            f"{hardware.describe()}: schedule it on FP8-capable nodes (resources.nodeSelector), or use "
            "W8A8 or W4A16"
        )


# --- llm-compressor --------------------------------------------------------------------------------


def quantization_after_pruning(compression: CompressionPlan) -> QuantizationMethod | None:
    """The quantization method actually run: GPTQ after pruning becomes round-to-nearest, because
    GPTQ's column updates would write non-zero values into the pruned weights (losing the
    sparsity the pruning step paid for); SmoothQuant's smoothing is kept, its GPTQ likewise
    becomes round-to-nearest."""
    quantization = compression.quantization
    if quantization is None:
        return None
    if compression.pruning is not None and quantization.method == QuantizationMethod.gptq:
        return QuantizationMethod.rtn
    return quantization.method


def uses_llmcompressor(compression: CompressionPlan) -> bool:
    quantization = compression.quantization
    quantizes = quantization is not None and quantization.method != QuantizationMethod.torchao
    return compression.pruning is not None or quantizes


def needs_calibration(compression: CompressionPlan) -> bool:
    """Whether the llm-compressor recipe needs calibration data (GPTQ, SmoothQuant, SparseGPT and
    Wanda measure activations; round-to-nearest and magnitude pruning look at the weights only)."""
    pruning = compression.pruning
    if pruning is not None and pruning.method in (PruningMethod.sparsegpt, PruningMethod.wanda):
        return True
    method = quantization_after_pruning(compression)
    return method in (QuantizationMethod.gptq, QuantizationMethod.smoothquant)


def quantization_ignore(compression: CompressionPlan) -> list[str]:
    """Modules left unquantized: ``quantization.ignore`` plus the output heads of classifiers."""
    quantization = compression.quantization
    ignore = list(quantization.ignore) if quantization is not None else ["lm_head"]
    return ignore + [p for p in HEAD_PATTERNS[1:] if p not in ignore]


def _weight_args(bits: int, group_size: int) -> dict[str, Any]:
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": True,
        "strategy": "group",
        "group_size": group_size,
        "dynamic": False,
    }


def quantization_scheme(quantization: Quantization) -> dict[str, Any]:
    """A compressed-tensors quantization scheme (weights / input activations), targets excluded.

    Weight-only schemes are group-wise with ``groupSize``; W8A8 and FP8 use the presets
    (per-channel weights, dynamic per-token activations)."""
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    scheme = quantization.scheme
    if scheme == QuantizationScheme.w4a16:
        return {"weights": _weight_args(4, quantization.group_size)}
    if scheme == QuantizationScheme.w8a16:
        return {"weights": _weight_args(8, quantization.group_size)}
    preset = {QuantizationScheme.w8a8: "W8A8", QuantizationScheme.fp8: "FP8_DYNAMIC"}.get(scheme)
    if preset is None:
        raise InvalidInputError(f"quantization.scheme {scheme.value} is not an llm-compressor scheme")
    return {name: args.model_dump() for name, args in PRESET_SCHEMES[preset].items()}


def pruning_modifier(pruning: Pruning) -> Modifier | None:
    """The llm-compressor modifier of a pruning method, ``None`` for magnitude pruning (see
    :func:`magnitude_prune`)."""
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    structure = "2:4" if pruning.pattern == SparsityPattern.two_four else "0:0"
    if pruning.method == PruningMethod.sparsegpt:
        return SparseGPTModifier(
            sparsity=pruning.sparsity,
            mask_structure=structure,
            targets=["Linear"],
            ignore=list(HEAD_PATTERNS),
        )
    if pruning.method == PruningMethod.wanda:
        return WandaPruningModifier(
            sparsity=pruning.sparsity,
            mask_structure=structure,
            targets=["Linear"],
            ignore=list(HEAD_PATTERNS),
        )
    return None


def magnitude_prune(model: torch.nn.Module, pruning: Pruning) -> int:
    """Zero the smallest-magnitude weights of every linear layer but the heads, layer by layer
    (unstructured: the ``sparsity`` fraction of each layer; 2:4: the 2 smallest of every 4
    consecutive input weights). Returns how many weights were zeroed.

    llm-compressor's ``MagnitudePruningModifier`` is a training-time schedule whose masks are only
    applied at optimizer steps, so a oneshot pass would leave the weights untouched; PyTorch's own
    pruning utility does the unstructured case, and the 2:4 mask keeps the top 2 of every 4.
    """
    import torch
    from compressed_tensors.utils import match_named_modules
    from torch.nn.utils import prune

    zeroed = 0
    with torch.no_grad():
        for name, module in match_named_modules(model, ["Linear"], list(HEAD_PATTERNS)):
            weight = module.weight
            before = int((weight == 0).sum())
            if pruning.pattern == SparsityPattern.two_four:
                rows, cols = weight.shape
                if cols % 4:
                    raise InvalidInputError(
                        f"pruning.pattern 2:4 needs input widths divisible by 4; {name} has {cols}"
                    )
                groups = weight.abs().reshape(rows, cols // 4, 4)
                keep = torch.zeros_like(groups, dtype=torch.bool)
                keep.scatter_(-1, groups.topk(2, dim=-1).indices, True)
                weight.mul_(keep.reshape(rows, cols).to(weight.dtype))
            else:
                prune.l1_unstructured(module, name="weight", amount=pruning.sparsity)  # type: ignore[no-untyped-call]
                prune.remove(module, "weight")  # type: ignore[no-untyped-call]
            zeroed += int((module.weight == 0).sum()) - before
    return zeroed


def quantization_modifiers(compression: CompressionPlan) -> list[Modifier]:
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    quantization = compression.quantization
    method = quantization_after_pruning(compression)
    if quantization is None or method is None or method == QuantizationMethod.torchao:
        return []
    groups = {"group_0": {"targets": ["Linear"], **quantization_scheme(quantization)}}
    ignore = quantization_ignore(compression)
    if method == QuantizationMethod.rtn:
        return [QuantizationModifier(config_groups=groups, ignore=ignore)]
    if method == QuantizationMethod.gptq:
        return [GPTQModifier(config_groups=groups, ignore=ignore)]
    smoothing = SmoothQuantModifier(smoothing_strength=SMOOTHING_STRENGTH)
    if compression.pruning is not None:
        return [smoothing, QuantizationModifier(config_groups=groups, ignore=ignore)]
    return [smoothing, GPTQModifier(config_groups=groups, ignore=ignore)]


def llmcompressor_modifiers(compression: CompressionPlan) -> list[Modifier]:
    """Pruning then quantization, as one llm-compressor recipe (magnitude pruning runs just before
    it, on the same in-memory model)."""
    pruner = pruning_modifier(compression.pruning) if compression.pruning is not None else None
    return ([pruner] if pruner is not None else []) + quantization_modifiers(compression)


def llmcompressor_recipe_yaml(modifiers: list[Modifier]) -> str:
    """The recipe as llm-compressor writes it (``oneshot(recipe=...)`` reads it back)."""
    from llmcompressor.recipe import Recipe

    items: list[Modifier | list[Modifier]] = [*modifiers]
    return str(Recipe.from_modifiers(items).yaml())


def check_group_size(model: torch.nn.Module, compression: CompressionPlan) -> None:
    """Group-wise schemes need every quantized layer's input width to be a multiple of
    ``groupSize``; say which layers are not, before calibrating for minutes."""
    quantization = compression.quantization
    if (
        quantization is None
        or quantization.method == QuantizationMethod.torchao
        or quantization.scheme not in (QuantizationScheme.w4a16, QuantizationScheme.w8a16)
    ):
        return
    from compressed_tensors.utils import match_named_modules

    group = quantization.group_size
    bad = [
        f"{name} ({module.in_features} inputs)"
        for name, module in match_named_modules(model, ["Linear"], quantization_ignore(compression))
        if getattr(module, "in_features", 0) % group
    ]
    if bad:
        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise InvalidInputError(
            f"quantization.groupSize {group} does not divide the input width of {shown}: choose a groupSize "
            "that divides the hidden and intermediate sizes (e.g. 32, 64 or 128), or add those layers to "
            "quantization.ignore"
        )


# --- torchao ---------------------------------------------------------------------------------------


def torchao_config(quantization: Quantization) -> AOBaseConfig:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    if quantization.scheme == QuantizationScheme.int8_weight_only:
        return Int8WeightOnlyConfig()
    if quantization.scheme == QuantizationScheme.int8_dynamic:
        return Int8DynamicActivationInt8WeightConfig()
    raise InvalidInputError(f"quantization.scheme {quantization.scheme.value} is not a torchao scheme")


# --- the recipe file -------------------------------------------------------------------------------


def recipe_document(entries: list[dict[str, Any]]) -> str:
    """``<output>/recipe.yaml``: every step this run applied, in order, with its settings and the
    library that ran it; an llm-compressor recipe appears verbatim under ``recipe`` (a string, so
    the file stays plain YAML that ``yaml.safe_load`` reads)."""
    header = textwrap.dedent(
        """\
        # What kubetune's compress runtime applied to the model, in order (distill -> prune -> quantize).
        # An llm-compressor recipe under "recipe" can be passed to llmcompressor.oneshot(recipe=...).
        """
    )
    body = yaml.dump(
        {"kubetune_recipe_version": 1, "steps": entries},
        Dumper=_LiteralDumper,
        sort_keys=False,
        allow_unicode=True,
        width=100,
    )
    return header + body


class _LiteralDumper(yaml.SafeDumper):
    """Writes multi-line strings as ``|`` blocks, so the embedded recipe reads like a file."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_LiteralDumper.add_representer(str, _represent_str)
