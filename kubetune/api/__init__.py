"""The kubetune API (kubetune.io/v1alpha1): pydantic models that are the single source of truth
for the CRDs, the operator, the runtimes and local mode."""

from kubetune.api.kinds import RESOURCES
from kubetune.api.resources import (
    API_VERSION,
    GROUP,
    KINDS,
    VERSION,
    CompressJob,
    CompressJobSpec,
    FineTuneJob,
    FineTuneJobSpec,
    KubetuneResource,
)
from kubetune.api.status import Condition, ConditionType, Phase
from kubetune.api.sweep import FineTuneSweep, FineTuneSweepSpec

__all__ = [
    "API_VERSION",
    "GROUP",
    "KINDS",
    "RESOURCES",
    "VERSION",
    "CompressJob",
    "CompressJobSpec",
    "Condition",
    "ConditionType",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneSweep",
    "FineTuneSweepSpec",
    "KubetuneResource",
    "Phase",
]
