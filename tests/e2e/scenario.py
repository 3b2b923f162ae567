"""What the end-to-end scenarios share: a tiny base model and dataset in S3, the Secret name,
FineTuneJob/CompressJob manifests as a user writes them, and reading the results back.

The real-cluster scenarios (tests/cluster/test_e2e.py) run these against a real control plane;
nothing here plays a part of kubetune.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Final

from kubetune.storage import open_store
from kubetune.trainer.tinymodel import build_tiny_causal_lm
from tests.s3server import REGION, S3Bucket

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


# --- Reading results -----------------------------------------------------------------------------


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
