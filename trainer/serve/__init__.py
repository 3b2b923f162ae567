"""``python -m kubetune.trainer serve``: an OpenAI-compatible HTTP server for one model.

At start the server downloads the model (a full model directory, or a base model plus a peft LoRA
adapter, which is merged) from object storage into a scratch directory and loads it with
transformers — compressed-tensors checkpoints included — while already answering probes.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (causal
LMs; ``stream: true`` sends server-sent events), ``POST /v1/classifications`` (also ``/classify``;
sequence classifiers: ``{"model", "input": str | [str]}`` answers a label, per-class ``probs`` and
``scores`` per text), ``GET /healthz``, ``GET /readyz``, ``GET /metrics``.

Limits: request bodies above ``--max-request-bytes`` get 413, requests with more prompt tokens than
``--max-request-tokens`` (or a prompt above ``--max-prompt-tokens``) 400. When the environment
variable ``KUBETUNE_SERVE_API_KEY`` is set (from a Secret), every endpoint but the probes and
``/metrics`` needs ``Authorization: Bearer KEY`` (401 otherwise); see :mod:`.auth`.

Exit codes follow :mod:`kubetune.errors`: 2 when the model or the arguments are unusable, 3 when
storage is missing or denied, 0 after a graceful shutdown on SIGTERM (in-flight requests finish
within ``--grace-period``).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from kubetune.errors import KubetuneError
from kubetune.trainer.runtime import write_termination_message

from .protocol import DEFAULT_MAX_REQUEST_BYTES

if TYPE_CHECKING:
    from .state import ServerState

# The app (torch, transformers, fastapi) is imported by main() only, so --help and argument errors
# answer at once; embedders import kubetune.trainer.serve.app themselves.
__all__ = ["build_parser", "cpu_budget", "main"]

log = logging.getLogger("kubetune.serve")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kubetune.trainer serve",
        description="Serve a model from object storage over an OpenAI-compatible HTTP API.",
    )
    p.add_argument(
        "--model", required=True, help="model directory: s3://bucket/prefix, file:///path or a local path"
    )
    p.add_argument("--adapter", help="peft LoRA adapter directory to merge into --model (same URI forms)")
    p.add_argument(
        "--served-model-name",
        help="the name clients put in 'model' (default: the --model directory's name, or its parent's "
        "for .../NAME/model)",
    )
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument(
        "--scratch-dir",
        type=Path,
        default=Path(os.environ.get("TMPDIR", "/tmp")) / "kubetune-serve",
        help="where the model is downloaded to (an emptyDir in pods)",
    )
    p.add_argument(
        "--max-batch-size", type=_positive, default=16, help="sequences decoded together (default 16)"
    )
    p.add_argument(
        "--max-queue", type=_positive, default=256, help="sequences waiting before 429 (default 256)"
    )
    p.add_argument(
        "--max-prompt-tokens",
        type=_positive,
        help="longest accepted prompt (default: the model's context - 1)",
    )
    p.add_argument(
        "--max-tokens-limit", type=_positive, default=1024, help="largest max_tokens accepted (default 1024)"
    )
    p.add_argument(
        "--max-request-bytes",
        type=_positive,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help=f"largest request body accepted, larger ones get 413 (default {DEFAULT_MAX_REQUEST_BYTES}, 8 MiB)",
    )
    p.add_argument(
        "--max-request-tokens",
        type=_positive,
        help="prompt tokens one request may bring in all, over its prompts or inputs "
        "(default: --max-prompt-tokens x --max-batch-size)",
    )
    p.add_argument("--storage-endpoint", help="S3 endpoint URL (default: AWS_ENDPOINT_URL or AWS)")
    p.add_argument("--storage-region", help="S3 region (default: AWS_REGION)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights' dtype (auto: float32 on CPU, the checkpoint's or bfloat16 on GPU)",
    )
    p.add_argument(
        "--grace-period",
        type=float,
        default=25.0,
        help="seconds in-flight requests get to finish after SIGTERM (keep below the pod's "
        "terminationGracePeriodSeconds; default 25)",
    )
    p.add_argument(
        "--threads",
        type=_positive,
        help="CPU threads for torch (default: the container's CPU limit or affinity)",
    )
    p.add_argument(
        "--download-only",
        action="store_true",
        help="fetch the model (and adapter) into --scratch-dir/model (and /adapter), check their layout "
        "and exit: the init container of the vLLM runtime",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.download_only:
        return _download_only(args)
    import torch

    from .app import create_app
    from .auth import api_keys_from_env
    from .state import ServeSettings

    try:
        api_keys = api_keys_from_env(os.environ)
    except KubetuneError as error:
        return _fail(error)
    if api_keys:
        log.info("API keys required (%d accepted)", len(api_keys))
    torch.set_num_threads(args.threads or cpu_budget())
    log.info("torch uses %d threads", torch.get_num_threads())
    settings = ServeSettings(
        model_uri=args.model,
        adapter_uri=args.adapter,
        served_model_name=args.served_model_name,
        scratch_dir=args.scratch_dir,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens_limit=args.max_tokens_limit,
        max_request_bytes=args.max_request_bytes,
        max_request_tokens=args.max_request_tokens,
        api_keys=api_keys,
        storage_endpoint=args.storage_endpoint,
        storage_region=args.storage_region,
        device=args.device,
        dtype=args.dtype,
    )
    fatal: list[KubetuneError] = []

    def on_fatal(error: KubetuneError) -> None:
        fatal.append(error)
        server.should_exit = True

    app = create_app(settings, on_fatal)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=int(args.grace_period),
        lifespan="on",
    )
    server = _Server(config, app.state.serve)
    # uvicorn re-raises the signal it shut down on; with these no-op handlers that ends in exit 0
    # instead of a death by SIGTERM (or a KeyboardInterrupt traceback).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        server.run()
    except KubetuneError as error:
        fatal.append(error)
    if fatal:
        return _fail(fatal[0])
    return 0


class _Server(uvicorn.Server):
    """Turns /readyz to 503 the moment SIGTERM arrives, so the Service stops sending traffic."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self._serve_state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._serve_state.status in ("ready", "loading"):
            self._serve_state.status = "draining"
        super().handle_exit(sig, frame)


def _download_only(args: argparse.Namespace) -> int:
    from kubetune.storage import StorageConfig

    from .fetch import download

    try:
        storage = StorageConfig.from_env(endpoint=args.storage_endpoint, region=args.storage_region)
        model_dir, adapter_dir = download(args.model, args.adapter, args.scratch_dir, storage)
    except KubetuneError as error:
        return _fail(error)
    log.info("model in %s%s", model_dir, f", adapter in {adapter_dir}" if adapter_dir else "")
    return 0


def cpu_budget() -> int:
    """CPUs this process may actually use: its affinity, capped by the cgroup CPU quota.

    torch defaults to every core of the node, which in a pod limited to a few CPUs means many more
    threads than CPU time, and spinning OpenMP threads then slow inference down several times.
    """
    cpus = len(os.sched_getaffinity(0))
    quota = _cgroup_quota()
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


def _cgroup_quota() -> float | None:
    try:  # cgroup v2: "max 100000" or "<quota> <period>"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1: a quota of -1 means unlimited
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 else None
    except (OSError, ValueError):
        return None


def _fail(error: KubetuneError) -> int:
    line = f"{error.reason}: {error}"
    log.error("%s", line.replace("\n", " "))
    write_termination_message(line)
    return error.exit_code


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number
