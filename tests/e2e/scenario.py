"""What the end-to-end scenarios share: a tiny base model and dataset in S3, the user's Secret,
FineTuneJob/CompressJob manifests as a user writes them, and ways to watch them.

Nothing here plays a part of kubetune: the operator (tests.kube), the executor (tests.e2e.kubelet)
and the runtimes it starts are the real ones.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import kmock

from kubetune.storage import open_store
from kubetune.trainer.tinymodel import build_tiny_causal_lm
from tests.kube import KubeEmulator, create
from tests.s3server import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY, S3Bucket

NS: Final = "default"
FTJ: Final = "kubetune.io/v1alpha1/finetunejobs"
CJ: Final = "kubetune.io/v1alpha1/compressjobs"
JOBS: Final = "batch/v1/jobs"
PODS: Final = "v1/pods"
SECRET: Final = "s3-credentials"
LETTERS: Final = "abcdefghijklmnopqrstuvwxyz"
OPERATOR_AGENTS: Final = ("kopf/", "kubetune-operator/")

# What the trainer image and a CPU node give every container (not kubetune settings): one thread
# per process since two "nodes" share two cores, and no hub access.
IMAGE_ENV: Final = {
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "LANG": "C.UTF-8",
}
# kubetune's runtimes write their termination message to /dev/termination-log, a path they do not
# take from argv or env; this variable is how they are told where the kubelet's file is instead.
TERMINATION_MESSAGE_ENV: Final = "KUBETUNE_TERMINATION_LOG"


def kubelet_options() -> dict[str, Any]:
    return {"base_env": IMAGE_ENV, "termination_message_env": TERMINATION_MESSAGE_ENV}


def alphabet_texts(count: int, length: int = 24, seed: int = 0) -> list[str]:
    """A learnable pattern: the alphabet from a random letter on."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        start = rng.randrange(len(LETTERS))
        texts.append(" ".join(LETTERS[(start + i) % len(LETTERS)] for i in range(length)))
    return texts


def upload_inputs(bucket: S3Bucket, root: Path) -> tuple[str, str]:
    """A tiny Llama-style base model and a text dataset in the bucket; returns their URIs."""
    texts = alphabet_texts(96)
    model = build_tiny_causal_lm(
        root / "base", texts, vocab_size=300, hidden_size=32, num_layers=2, num_heads=2, max_position=64
    )
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    store = open_store(bucket.uri)
    model_uri, data_uri = f"{bucket.uri}/models/base", f"{bucket.uri}/data/train.jsonl"
    store.upload_dir(model, model_uri)
    store.upload_file(data, data_uri)
    return model_uri, data_uri


async def create_credentials(kube: KubeEmulator) -> None:
    """The Secret a user creates for the bucket; the operator only ever names it."""
    await create(
        kube,
        "v1/secrets",
        {
            "apiVersion": "v1",
            "kind": "Secret",
            # The opt-in that lets a job name it (the operator reads only the label, never values).
            "metadata": {
                "name": SECRET,
                "namespace": NS,
                "labels": {"kubetune.io/storage-credentials": "true"},
            },
            "stringData": {"AWS_ACCESS_KEY_ID": ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY},
        },
    )


def storage(bucket: S3Bucket) -> dict[str, Any]:
    return {
        "endpoint": bucket.endpoint,
        "region": REGION,
        "addressingStyle": "path",
        "secretRef": {"name": SECRET},
    }


def finetunejob(name: str, bucket: S3Bucket, model_uri: str, data_uri: str, **spec: Any) -> dict[str, Any]:
    """A tiny LoRA + ZeRO-2 run on two single-process workers; keyword arguments replace fields."""
    body: dict[str, Any] = {
        "model": {"uri": model_uri},
        "dataset": {"train": {"uri": data_uri}, "format": "text", "evalFraction": 0.1},
        "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "hyperparameters": {
            "maxSteps": 8,
            "learningRate": 0.01,
            "perDeviceBatchSize": 4,
            "maxSeqLength": 64,
            "loggingEverySteps": 1,
        },
        "deepspeed": {"zeroStage": 2},
        "resources": {"workers": 2, "processesPerWorker": 1},
        "checkpoint": {"everySteps": 4, "keepLast": 2},
        "output": {"uri": f"{bucket.uri}/runs/{name}"},
        "storage": storage(bucket),
        "maxRestarts": 2,
    }
    body.update(spec)
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": NS},
        "spec": body,
    }


def compressjob(name: str, bucket: S3Bucket, data_uri: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "dataset": {"train": {"uri": data_uri}, "format": "text", "evalFraction": 0.1},
        "quantization": {"method": "rtn", "scheme": "W8A16", "groupSize": 32},  # the tiny model is 32 wide
        "calibration": {"samples": 8, "maxSeqLength": 64},
        "output": {"uri": f"{bucket.uri}/runs/{name}"},
        "storage": storage(bucket),
    }
    body.update(spec)
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "CompressJob",
        "metadata": {"name": name, "namespace": NS},
        "spec": body,
    }


# --- Watching ------------------------------------------------------------------------------------


def status(kube: KubeEmulator, resource: str, name: str) -> dict[str, Any]:
    return dict((kube.get(resource, NS, name) or {}).get("status") or {})


def describe(kube: KubeEmulator, resource: str, name: str) -> str:
    return json.dumps(status(kube, resource, name), indent=1, sort_keys=True)


async def reach(kube: KubeEmulator, resource: str, name: str, phase: str, timeout: float) -> dict[str, Any]:
    """Wait for ``phase``; a different finished phase (Succeeded/Failed) fails at once."""
    deadline = time.monotonic() + timeout
    while True:
        current = status(kube, resource, name)
        if current.get("phase") == phase:
            return current
        if current.get("phase") in ("Succeeded", "Failed"):
            raise AssertionError(
                f"{name} ended {current['phase']} while waiting for {phase}:\n{describe(kube, resource, name)}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{name} did not reach {phase} within {timeout}s:\n{describe(kube, resource, name)}"
            )
        await asyncio.sleep(0.1)


def history(kube: KubeEmulator, resource: str, name: str) -> list[dict[str, Any]]:
    """Every version of the object the API server stored, oldest first."""
    key = (kmock.resource(resource), NS, name)
    if key not in kube.objects:
        return []
    return [dict(version.raw) for version in kube.objects[key].history if version is not None]


def phases(kube: KubeEmulator, resource: str, name: str) -> list[str]:
    """The phases the object went through, without repeats."""
    seen: list[str] = []
    for version in history(kube, resource, name):
        phase = (version.get("status") or {}).get("phase")
        if phase and (not seen or seen[-1] != phase):
            seen.append(phase)
    return seen


def progress_patches(kube: KubeEmulator, resource: str, name: str) -> list[tuple[str, dict[str, Any]]]:
    """(User-Agent, status.progress) of every status patch that carried progress, by anyone but
    the operator: the workload's own reports."""
    out = []
    for request in kube.log:
        if (
            request.resource != kmock.resource(resource)
            or request.name != name
            or request.subresource != "status"
        ):
            continue
        agent = str(request.headers.get("User-Agent", ""))
        body = request.data if isinstance(request.data, Mapping) else {}
        progress = (body.get("status") or {}).get("progress")
        if progress and not agent.startswith(OPERATOR_AGENTS):
            out.append((agent, dict(progress)))
    return out


def created(kube: KubeEmulator, plural: str) -> list[str]:
    """Names of the objects of one resource (plural) created so far, in order."""
    return [name for _, action, res, _, name in kube.journal if action == "create" and res == plural]


def keys(bucket: S3Bucket, prefix: str) -> set[str]:
    """Object keys under ``prefix`` (relative to it)."""
    client = bucket.client()
    out: set[str] = set()
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket.name, Prefix=prefix.rstrip("/") + "/"
    ):
        out |= {item["Key"][len(prefix.rstrip("/")) + 1 :] for item in page.get("Contents", [])}
    return out


def read_json(bucket: S3Bucket, key: str) -> Any:
    return json.loads(bucket.client().get_object(Bucket=bucket.name, Key=key)["Body"].read())


async def object_exists(bucket: S3Bucket, key: str, timeout: float) -> None:
    """Wait until ``key`` exists in the bucket."""
    client = bucket.client()
    deadline = time.monotonic() + timeout

    def present() -> bool:
        return bool(client.list_objects_v2(Bucket=bucket.name, Prefix=key).get("KeyCount"))

    while not await asyncio.to_thread(present):
        if time.monotonic() > deadline:
            raise AssertionError(f"s3://{bucket.name}/{key} did not appear within {timeout}s")
        await asyncio.sleep(0.1)
