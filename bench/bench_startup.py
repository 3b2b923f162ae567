"""Time to first step of ``python -m kubetune.trainer finetune``, broken down by phase.

Launches the trainer as a pod does (torchrun, 2 processes, CPU/gloo) with the base model and the
data on a local S3 server (moto, as in the tests) and reads rank 0's start-up clock from
``run.json``: seconds from the worker process's start to each milestone. Phases:

- launcher: torchrun's own start until the worker process exists;
- imports: Python, torch, transformers, DeepSpeed;
- process group: joining the gang (gloo rendezvous);
- download: the base model from object storage (one process per node);
- load: tokenizer, data (read, checked, tokenized), Trainer arguments, model weights;
- DeepSpeed init: the Trainer building the engine (ZeRO partitioning, optimizer);
- first step: the first optimizer step (forward, backward, step).

    .venv/bin/python bench/bench_startup.py [--hidden 256] [--layers 4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))

from kubetune.storage import open_store  # noqa: E402
from tests.integration.test_finetune_support import alphabet_texts, write_jsonl, write_plan  # noqa: E402
from tests.s3server import MotoS3Server, s3_client, s3_env  # noqa: E402

MILESTONES = [
    ("imports", "imports"),
    ("process group", "process_group"),
    ("download", "downloaded"),
    ("load", "loaded"),
    ("DeepSpeed init", "engine_ready"),
    ("first step", "first_step"),
]


def one_run(root: Path, n: int, env: dict[str, str], bucket: str) -> dict[str, float]:
    out = f"s3://{bucket}/runs/startup-{n}"
    plan = write_plan(
        root / f"plan-{n}.json",
        model_uri=f"s3://{bucket}/base",
        train_uri=f"s3://{bucket}/train.jsonl",
        output_uri=out,
        name=f"startup-{n}",
        hyperparameters={"maxSteps": 2, "loggingEverySteps": 1},
        checkpoint={"everySteps": 1000},
    )
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "kubetune.trainer",
        "finetune",
        "--plan",
        str(plan),
        "--scratch-dir",
        str(root / f"scratch-{n}"),
    ]
    log = root / f"run-{n}.log"
    launched = time.time()
    with log.open("wb") as f:
        code = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env, check=False).returncode
    if code != 0:
        raise SystemExit(f"the run failed with {code}:\n{log.read_text()[-6000:]}")
    uri = f"{out}/run.json"
    record = json.loads(open_store(uri).read_bytes(uri))
    marks: dict[str, float] = record["startup_s"]
    started = datetime.fromisoformat(record["process_started_at"]).timestamp()
    phases = {"launcher": started - launched}
    previous = 0.0
    for label, key in MILESTONES:
        phases[label] = marks[key] - previous
        previous = marks[key]
    phases["total (launch to first step)"] = phases["launcher"] + marks["first_step"]
    return phases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the tiny Llama model")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from kubetune.trainer.tinymodel import build_tiny_causal_lm

    server = MotoS3Server()
    endpoint = server.start()
    env = dict(os.environ)
    env.update(s3_env(endpoint))
    env.update(
        DS_ACCELERATOR="cpu",
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // 2)),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
    )
    os.environ.update(s3_env(endpoint))
    bucket = "bench-startup"
    s3_client(endpoint).create_bucket(Bucket=bucket)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
            root = Path(tmp)
            texts = alphabet_texts(256, length=48)
            model = build_tiny_causal_lm(
                root / "base",
                texts,
                vocab_size=512,
                hidden_size=args.hidden,
                num_layers=args.layers,
                num_heads=4,
                max_position=128,
            )
            size = sum(p.stat().st_size for p in model.iterdir()) / 1e6
            store = open_store(f"s3://{bucket}")
            store.upload_dir(model, f"s3://{bucket}/base")
            store.upload_file(
                write_jsonl(root / "train.jsonl", [{"text": t} for t in texts]), f"s3://{bucket}/train.jsonl"
            )
            runs = [one_run(root, n, env, bucket) for n in range(args.repeats)]
    finally:
        server.stop()
    print(
        f"\ntime to first step, 2 processes, ZeRO-2 on CPU, {size:.1f} MB model "
        f"(hidden {args.hidden}, {args.layers} layers) on a local S3 server, {args.repeats} runs"
    )
    for phase in runs[0]:
        values = [r[phase] for r in runs]
        print(
            f"  {phase:30s} median {statistics.median(values):6.2f}s   runs: {', '.join(f'{v:.2f}' for v in values)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
