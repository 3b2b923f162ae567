"""Robustness options (``hyperparameters.robustness``): perturbed input embeddings in training.

- ``neftuneAlpha`` (causal-lm SFT): NEFTune, transformers' own ``neftune_noise_alpha``. The
  Trainer hooks the input embeddings with uniform noise of scale ``alpha / sqrt(L x d)`` (L the
  batch's sequence length, d the hidden size) while the model is in training mode only, so
  evaluation and the saved model see none.
- ``adversarial.epsilon`` (sequence classification): :class:`AdversarialTrainer`, one
  fast-gradient (FGM) perturbation per step. The clean loss's gradient with respect to the input
  embeddings, scaled to L2 norm epsilon per example, is added to the embeddings of another
  forward pass; that adversarial loss is added to the clean loss and both back-propagate in the
  Trainer's one backward pass. The gradient comes from ``torch.autograd.grad`` on the embeddings
  alone, through a forward of the module itself rather than of DeepSpeed's engine, so it touches
  no parameter gradient and none of DeepSpeed's backward hooks (ZeRO-2 reduces and partitions
  gradients when a backward through the engine ends). A step costs three forward passes. Training logs carry ``adversarial_loss`` (mean over the
  logging window and all processes); the logged ``loss`` is the sum. Evaluation computes the
  clean loss only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from kubetune.run.plan import RunPlan
from kubetune.trainer.throughput import MeasuredTrainer

if TYPE_CHECKING:
    import torch
    from transformers import Trainer


def neftune_alpha(plan: RunPlan) -> float | None:
    """transformers' ``neftune_noise_alpha`` for the plan (``None``: no noise)."""
    hp = plan.hyperparameters
    return hp.robustness.neftune_alpha if hp is not None and hp.robustness is not None else None


def trainer_class(plan: RunPlan) -> Callable[..., Trainer]:
    """The Trainer to build for a (non-DPO) fine-tuning run."""
    hp = plan.hyperparameters
    adversarial = hp.robustness.adversarial if hp is not None and hp.robustness is not None else None
    if adversarial is None:
        return cast("Callable[..., Trainer]", MeasuredTrainer)
    return cast("Callable[..., Trainer]", functools.partial(AdversarialTrainer, epsilon=adversarial.epsilon))


def fast_gradient(gradient: torch.Tensor, epsilon: float) -> torch.Tensor:
    """The FGM perturbation: ``epsilon`` times the gradient normalised per example (over all of
    its tokens and hidden units); an example whose gradient vanishes is left unperturbed."""
    import torch

    norms = gradient.flatten(1).norm(dim=1).clamp_min(torch.finfo(gradient.dtype).tiny)
    perturbation: torch.Tensor = epsilon * gradient / norms.view(-1, *([1] * (gradient.dim() - 1)))
    return perturbation


class AdversarialTrainer(MeasuredTrainer):
    """Adds the FGM adversarial loss to each training step's clean loss (see the module docstring)."""

    def __init__(self, *args: Any, epsilon: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.epsilon = epsilon
        self._adversarial_sum: torch.Tensor | None = None
        self._adversarial_count = 0

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        import torch

        if not (model.training and torch.is_grad_enabled()):  # evaluation: the clean loss only
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # The direction comes from a forward of the module itself, not of DeepSpeed's engine: a
        # backward through the engine's outputs, even autograd.grad, runs its gradient
        # reduction (DeepSpeed supports a plain loss.backward()), which must run once per step.
        module = self.accelerator.unwrap_model(model)
        embeddings = module.get_input_embeddings()
        captured: list[torch.Tensor] = []

        def capture(_module: torch.nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
            # Frozen embeddings (LoRA) give an output without a graph: give it one to differentiate.
            if not output.requires_grad:
                output = output.detach().requires_grad_(True)
            captured.append(output)
            return output

        handle = embeddings.register_forward_hook(capture)
        try:
            probe = cast("torch.Tensor", super().compute_loss(module, inputs, False, num_items_in_batch))
        finally:
            handle.remove()
        (gradient,) = torch.autograd.grad(probe, captured[0])
        perturbation = fast_gradient(gradient.detach(), self.epsilon)
        del probe

        clean = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        clean_loss: torch.Tensor = clean[0] if return_outputs else cast("torch.Tensor", clean)

        def perturb(_module: torch.nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
            return output + perturbation.to(output.dtype)

        handle = embeddings.register_forward_hook(perturb)
        try:
            adversarial = cast("torch.Tensor", super().compute_loss(model, inputs, False, num_items_in_batch))
        finally:
            handle.remove()
        detached = adversarial.detach()
        self._adversarial_sum = (
            detached if self._adversarial_sum is None else self._adversarial_sum + detached
        )
        self._adversarial_count += 1
        total = clean_loss + adversarial
        return (total, clean[1]) if return_outputs else total

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # every process logs the training loss at the same step: reduce here
            logs = {**logs, **self._adversarial_mean()}
        super().log(logs, start_time)

    def _adversarial_mean(self) -> dict[str, float]:
        import torch

        device = self.args.device
        window = torch.stack(
            [
                (self._adversarial_sum if self._adversarial_sum is not None else torch.zeros(())).to(device),
                torch.tensor(float(self._adversarial_count), device=device),
            ]
        ).float()
        total = self.accelerator.reduce(window, reduction="sum")
        self._adversarial_sum, self._adversarial_count = None, 0
        return {"adversarial_loss": round(float(total[0] / total[1]), 4)} if float(total[1]) else {}
