"""``kubetune plan FILE``: the memory plan of each fine-tuning job in a manifest, before it runs.

For every FineTuneJob (and the template of every FineTuneSweep: its trials differ only in what
the search space varies) it prints, per training process, the memory of parameters, gradients,
optimizer states and activations under the job's ZeRO stage, offloading, precision, batch size and
sequence length (:mod:`kubetune.run.memory`), then whether that fits each GPU (from the node
selector's ``nvidia.com/gpu.product``) and the container memory limit. The model's sizes come
from its ``config.json``, read from ``spec.model.uri`` (credentials from the environment, as
``kubetune run``) or from ``--model-config``. CompressJobs train nothing and are listed as such.

Exit status 0 when every job fits or cannot be checked, 1 when one does not fit (the validation
step would refuse it with reason ``WillNotFit``), 2 for a bad manifest or an unreadable config.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from kubetune.api import CompressJob, FineTuneJob, FineTuneSweep
from kubetune.api.validation import load_resources
from kubetune.errors import InvalidInputError, StorageAccessError
from kubetune.run import memory
from kubetune.run.artifacts import join_uri
from kubetune.run.plan import RunPlan, plan_finetune
from kubetune.storage import StorageConfig, open_store


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="YAML file with FineTuneJob, FineTuneSweep or CompressJob documents")
    parser.add_argument(
        "--model-config",
        type=Path,
        default=None,
        help="the model's config.json, instead of reading it from spec.model.uri",
    )


def run(args: argparse.Namespace) -> int:
    status = 0
    for resource in load_resources(args.file):
        name = resource.metadata.name or "unnamed"
        title = f"{type(resource).kind_name} {name}"
        if isinstance(resource, CompressJob):
            print(f"{title}: compression trains nothing; no memory plan\n")
            continue
        if isinstance(resource, FineTuneSweep):
            job = FineTuneJob.model_validate(
                {
                    "apiVersion": resource.api_version,
                    "kind": "FineTuneJob",
                    "metadata": resource.metadata.model_dump(exclude_none=True),
                    "spec": resource.spec.template.to_wire(),
                }
            )
            title += " (its template; trials differ only in the search space)"
        else:
            job = resource
        plan = plan_finetune(job)
        config = args.model_config or None
        shape = memory.ModelShape.from_config(read_config(plan, config))
        estimate = memory.estimate(shape, memory.setup_of(plan))
        found = memory.checks(plan, estimate)
        print(f"{title}: model {plan.model_uri}")
        print(memory.render_table(estimate, found))
        reason = memory.will_not_fit(plan, estimate, found)
        if reason is not None:
            skipped = (
                " (kubetune.io/skip-memory-check: validation lets it run)" if plan.skip_memory_check else ""
            )
            print(f"WillNotFit{skipped}: {reason}")
            status = status or (0 if plan.skip_memory_check else 1)
        print()
    return status


def read_config(plan: RunPlan, local: Path | None) -> dict[str, Any]:
    """The model's config.json: ``local`` when given, else from the model's directory."""
    try:
        if local is not None:
            text = local.read_text(encoding="utf-8")
            where = str(local)
        else:
            where = join_uri(plan.model_uri, "config.json")
            config = StorageConfig.from_env(endpoint=plan.storage.endpoint, region=plan.storage.region)
            text = open_store(where, config).read_bytes(where).decode("utf-8")
    except OSError as e:
        raise InvalidInputError(f"cannot read the model config {local}: {e.strerror or e}") from None
    except StorageAccessError as e:
        raise InvalidInputError(f"{e} (or pass --model-config)") from None
    try:
        loaded = json.loads(text)
    except ValueError as e:
        raise InvalidInputError(f"{where} is not JSON: {e}") from None
    if not isinstance(loaded, dict):
        raise InvalidInputError(f"{where} is not a JSON object")
    return loaded
