"""The robustness options' pure parts: the fast-gradient perturbation and which Trainer a plan gets
(the runs under DeepSpeed are in tests/integration/test_robustness_runs.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kubetune.api.resources import FineTuneJob
from kubetune.run.plan import RunPlan, plan_finetune
from kubetune.trainer.robustness import AdversarialTrainer, fast_gradient, neftune_alpha, trainer_class
from kubetune.trainer.throughput import MeasuredTrainer

pytestmark = pytest.mark.unit


def plan_with(robustness: dict[str, Any] | None, task: dict[str, Any] | None = None) -> RunPlan:
    hyperparameters: dict[str, Any] = {"maxSteps": 1, **({"robustness": robustness} if robustness else {})}
    classification = task is not None
    return plan_finetune(
        FineTuneJob.model_validate(
            {
                "apiVersion": "kubetune.io/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": "robust", "namespace": "ml"},
                "spec": {
                    "model": {"uri": "file:///unused"},
                    "task": task or {"type": "causal-lm"},
                    "dataset": {
                        "train": {"uri": "file:///unused/train.jsonl"},
                        "format": "classification" if classification else "text",
                    },
                    "output": {"uri": "file:///unused/out"},
                    "hyperparameters": hyperparameters,
                },
            }
        )
    )


def test_the_perturbation_has_norm_epsilon_per_example_along_the_gradient() -> None:
    gradient = torch.randn(3, 5, 8)
    gradient[2] = 0  # an example whose loss does not depend on its embeddings
    perturbation = fast_gradient(gradient, 0.5)
    norms = perturbation.flatten(1).norm(dim=1)
    assert norms[:2] == pytest.approx(torch.tensor([0.5, 0.5]), abs=1e-6)
    assert norms[2] == 0
    cosine = torch.nn.functional.cosine_similarity(perturbation[0].flatten(), gradient[0].flatten(), dim=0)
    assert float(cosine) == pytest.approx(1.0, abs=1e-6)


def test_each_plan_gets_the_trainer_and_noise_it_asks_for() -> None:
    classifier = {"type": "sequence-classification", "numLabels": 2}
    adversarial = trainer_class(plan_with({"adversarial": {"epsilon": 0.25}}, classifier))
    assert getattr(adversarial, "func", None) is AdversarialTrainer
    assert getattr(adversarial, "keywords", None) == {"epsilon": 0.25}
    assert trainer_class(plan_with(None, classifier)) is MeasuredTrainer
    assert trainer_class(plan_with({"neftuneAlpha": 5.0})) is MeasuredTrainer
    assert neftune_alpha(plan_with({"neftuneAlpha": 5.0})) == 5.0
    assert neftune_alpha(plan_with(None)) is None
