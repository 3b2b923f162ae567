"""Where the run plan used to live; it is :mod:`kubetune.run.plan` now.

Only the operator's lifecycle modules still import from here, until they move to
:mod:`kubetune.run`; new code imports from :mod:`kubetune.run` directly.
"""

from kubetune.run.artifacts import (
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    COMMIT_MARKER,
    LOGS_DIR,
    METRICS_FILE,
    MODEL_DIR,
    REPORT_FILE,
    RUN_RECORD_FILE,
)
from kubetune.run.deepspeed import config_from_spec as render_deepspeed_config
from kubetune.run.deepspeed import deep_merge
from kubetune.run.plan import (
    CompressionPlan,
    JobRef,
    PlanModel,
    RunPlan,
    StoragePlan,
    WorldPlan,
    dumps_plan,
    plan_compress,
    plan_finetune,
)

__all__ = [
    "ADAPTER_DIR",
    "CHECKPOINTS_DIR",
    "COMMIT_MARKER",
    "LOGS_DIR",
    "METRICS_FILE",
    "MODEL_DIR",
    "REPORT_FILE",
    "RUN_RECORD_FILE",
    "CompressionPlan",
    "JobRef",
    "PlanModel",
    "RunPlan",
    "StoragePlan",
    "WorldPlan",
    "deep_merge",
    "dumps_plan",
    "plan_compress",
    "plan_finetune",
    "render_deepspeed_config",
]
