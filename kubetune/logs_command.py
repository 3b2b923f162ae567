"""``kubetune logs JOB [--attempt N] [--rank R] [-n NS]``: the processes' logs of a job's attempt.

While the attempt's pods exist they are read from the cluster (``pods/log``, what ``kubectl logs``
shows); afterwards from where each process kept its own (``<output>/logs/attempt-<N>/``, see
:mod:`kubetune.run.logs`), found through the job's ``status.logs`` or else its ``spec.output.uri``.
JOB may also be a local output directory or an output URI (``file://``, ``s3://``): local mode
keeps the same layout, and storage needs no cluster at all.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from kubetune.errors import InvalidInputError, StorageAccessError
from kubetune.run import logs
from kubetune.run.artifacts import LOGS_DIR, join_uri
from kubetune.storage import StorageConfig, open_store

_KINDS = {"finetunejob": "finetunejobs", "compressjob": "compressjobs"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="job name, or an output directory or URI (file://, s3://)")
    parser.add_argument("--attempt", type=int, default=None, help="attempt number (default: the newest)")
    parser.add_argument("--rank", type=int, default=None, help="one process of the gang (default: all)")
    parser.add_argument("-n", "--namespace", default="default", help="the job's namespace")
    parser.add_argument("--kind", choices=sorted(_KINDS), default="finetunejob", help="the job's kind")
    parser.add_argument("--endpoint", default=None, help="S3 endpoint for an s3:// output given as JOB")


def run(args: argparse.Namespace) -> int:
    if args.attempt is not None and args.attempt < 0:
        raise InvalidInputError(f"--attempt must be 0 or more, not {args.attempt}")
    if args.rank is not None and args.rank < 0:
        raise InvalidInputError(f"--rank must be 0 or more, not {args.rank}")
    target: str = args.job
    if "://" in target or Path(target).is_dir():
        output = target if "://" in target else Path(target).resolve().as_uri()
        return print_kept(output, StorageConfig.from_env(endpoint=args.endpoint), args.attempt, args.rank)
    return from_cluster(args)


def print_kept(output_uri: str, config: StorageConfig, attempt: int | None, rank: int | None) -> int:
    """Print the kept logs of one attempt under ``output_uri``; 1 when there are none."""
    root = join_uri(output_uri, LOGS_DIR)
    store = open_store(root, config)
    keys = [info.key for info in store.list(root)]
    attempts = logs.attempts_in(keys)
    if not attempts:
        print(
            f"no process logs are kept under {root}/ (each process uploads its log when it ends)",
            file=sys.stderr,
        )
        return 1
    chosen = attempts[-1] if attempt is None else attempt
    if chosen not in attempts:
        raise InvalidInputError(f"--attempt {chosen}: {root} keeps attempts {', '.join(map(str, attempts))}")
    folder = f"{logs.ATTEMPT_DIR_PREFIX}{chosen}/"
    names = sorted((k.removeprefix(folder) for k in keys if k.startswith(folder)), key=_process_order)
    if rank is not None:
        wanted = logs.rank_log(rank)
        if wanted not in names:
            raise InvalidInputError(f"--rank {rank}: attempt {chosen} keeps {', '.join(names)}")
        names = [wanted]
    for name in names:
        uri = f"{logs.attempt_logs_uri(output_uri, chosen)}/{name}"
        if len(names) > 1:
            print(f"==> {uri} <==", flush=True)
        sys.stdout.buffer.write(store.read_bytes(uri))
        sys.stdout.flush()
    return 0


def _process_order(name: str) -> tuple[int, int, str]:
    """validate.log first, then the ranks in numeric order, then anything else."""
    if name == logs.VALIDATE_LOG:
        return (0, 0, name)
    if name.startswith("rank-") and name.removeprefix("rank-").removesuffix(".log").isdigit():
        return (1, int(name.removeprefix("rank-").removesuffix(".log")), name)
    return (2, 0, name)


def from_cluster(args: argparse.Namespace) -> int:
    """The attempt's pods' logs while they exist, else what the processes kept in storage."""
    from kubernetes import client, config

    from kubetune.api.resources import GROUP
    from kubetune.operator.render import LABEL_ATTEMPT, LABEL_JOB

    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    plural = _KINDS[args.kind]
    try:
        found = client.CustomObjectsApi().get_namespaced_custom_object(
            GROUP, "v1alpha1", args.namespace, plural, args.job
        )
    except client.ApiException as e:
        if e.status == 404:
            raise InvalidInputError(f"{args.kind} {args.namespace}/{args.job} does not exist") from e
        raise
    job: dict[str, Any] = found if isinstance(found, dict) else {}
    status = job.get("status") or {}
    kept = status.get("logs") or {}
    attempt = args.attempt if args.attempt is not None else kept.get("attempt")
    core = client.CoreV1Api()
    if attempt is not None:
        selector = f"{LABEL_JOB}={args.job},{LABEL_ATTEMPT}={attempt}"
        pods = core.list_namespaced_pod(args.namespace, label_selector=selector).items
        if pods:
            return _print_pods(core, args.namespace, pods, args.rank, job)
    spec = job.get("spec") or {}
    output = (spec.get("output") or {}).get("uri")
    if not output:
        raise InvalidInputError(f"{args.kind} {args.namespace}/{args.job} has no spec.output.uri")
    storage = spec.get("storage") or {}
    store_config = StorageConfig.from_env(endpoint=storage.get("endpoint"), region=storage.get("region"))
    try:
        return print_kept(output, store_config, attempt, args.rank)
    except StorageAccessError as e:
        raise StorageAccessError(f"the pods are gone and the kept logs cannot be read: {e}") from e


def _print_pods(core: Any, namespace: str, pods: list[Any], rank: int | None, job: dict[str, Any]) -> int:
    """Pod i of the gang runs node i's processes: ``--rank R`` picks the pod of that rank."""
    per_node = int(((job.get("spec") or {}).get("resources") or {}).get("processes") or 1)
    by_index = sorted(pods, key=lambda p: int((p.metadata.annotations or {}).get(_INDEX_ANNOTATION, "0")))
    if rank is not None:
        node = rank // per_node
        by_index = [
            p for p in by_index if int((p.metadata.annotations or {}).get(_INDEX_ANNOTATION, "0")) == node
        ]
        if not by_index:
            raise InvalidInputError(f"--rank {rank}: no pod of node {node} exists")
    for pod in by_index:
        if len(by_index) > 1:
            print(f"==> pod {pod.metadata.name} <==", flush=True)
        print(core.read_namespaced_pod_log(pod.metadata.name, namespace), end="", flush=True)
    return 0


_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
