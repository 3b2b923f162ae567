"""Storage throughput: kubetune's store vs plain boto3, uploading and downloading a model directory.

Both sides talk to the same moto S3 server on 127.0.0.1, started by this script in a child process
(in-process, the server would share the client's GIL and measure contention, not transfers). The
directory looks like a Hugging Face checkpoint: a few large safetensors-like shards of random bytes
plus small JSON files.

- baseline: one boto3 client with its defaults; ``upload_file`` / ``download_file`` per file, one
  file after the other (boto3's default TransferConfig: 8 MiB parts, 10 threads within a file).
- kubetune: ``S3Store.upload_dir`` / ``download_prefix`` with the default ``StorageConfig``.

Runs alternate between the two, and the best of ``--repeat`` runs is reported for each, which
damps noise from other work on the machine. Goal: ratio >= 1.5.

The CPU seconds the S3 server spent are printed for each run: on a small machine the server, not
the client, is the bottleneck, and its cost per byte depends on how the client sends (moto
reassembles a multipart upload by copying every part again on completion). ``--max-concurrency``,
``--multipart-threshold-mib`` and ``--chunk-mib`` change kubetune's side only, to show that.

    .venv/bin/python bench/bench_storage.py [--size-mib 1024] [--shards 4] [--repeat 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from kubetune.storage import S3Store, StorageConfig
from kubetune.storage.config import MiB

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "kubetune-bench",
    "AWS_SECRET_ACCESS_KEY": "kubetune-bench-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent/kubetune-bench-aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/kubetune-bench-aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=1024, help="total size of the model directory")
    parser.add_argument("--shards", type=int, default=4, help="number of large weight files")
    parser.add_argument("--repeat", type=int, default=2, help="runs per side; the best one counts")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--max-concurrency", type=int, help="kubetune's StorageConfig.max_concurrency")
    parser.add_argument("--multipart-threshold-mib", type=int, help="kubetune's multipart threshold")
    parser.add_argument("--chunk-mib", type=int, help="kubetune's multipart part size")
    args = parser.parse_args(argv)
    tuning: dict[str, Any] = {}
    if args.max_concurrency is not None:
        tuning["max_concurrency"] = args.max_concurrency
    if args.multipart_threshold_mib is not None:
        tuning["multipart_threshold"] = args.multipart_threshold_mib * MiB
    if args.chunk_mib is not None:
        tuning["multipart_chunksize"] = args.chunk_mib * MiB

    available = _mem_available_mib()
    print(f"memory available: {available} MiB, cpus: {os.cpu_count()}")
    if available is not None and available < 3 * args.size_mib:
        print(
            f"warning: the S3 server holds up to 2 copies of {args.size_mib} MiB; consider a smaller --size-mib"
        )
    os.environ.update(CREDENTIALS)

    with tempfile.TemporaryDirectory(prefix="kubetune-bench-", dir=args.workdir) as scratch:
        work = Path(scratch)
        source = make_model_dir(work / "model", args.size_mib, args.shards)
        total = sum(p.stat().st_size for p in source.rglob("*") if p.is_file())
        files = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
        print(f"model directory: {len(files)} files, {total / MiB:.0f} MiB")

        with moto_server() as server:
            endpoint = server.endpoint
            baseline_client = boto3.client(
                "s3", endpoint_url=endpoint, config=Config(s3={"addressing_style": "path"})
            )
            baseline_client.create_bucket(Bucket="bench")
            config = dataclasses.replace(StorageConfig.from_env(endpoint=endpoint), **tuning)
            store = S3Store(config)
            print(
                f"kubetune: max_concurrency {config.max_concurrency}, multipart threshold "
                f"{config.multipart_threshold // MiB} MiB, parts {config.multipart_chunksize // MiB} MiB"
            )
            results: dict[str, dict[str, list[float]]] = {
                "baseline": {"upload": [], "download": []},
                "kubetune": {"upload": [], "download": []},
            }

            for run in range(args.repeat):
                for side in ("baseline", "kubetune"):
                    prefix = f"{side}-{run}"
                    dest = work / f"download-{prefix}"
                    if side == "baseline":

                        def upload(prefix: str = prefix) -> None:
                            for rel in files:
                                baseline_client.upload_file(str(source / rel), "bench", f"{prefix}/{rel}")

                        def download(prefix: str = prefix, dest: Path = dest) -> None:
                            for rel in files:
                                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                                baseline_client.download_file("bench", f"{prefix}/{rel}", str(dest / rel))

                    else:

                        def upload(prefix: str = prefix) -> None:
                            store.upload_dir(source, f"s3://bench/{prefix}/")

                        def download(prefix: str = prefix, dest: Path = dest) -> None:
                            store.download_prefix(f"s3://bench/{prefix}/", dest)

                    cpu = server.cpu_seconds()
                    up = timed(upload)
                    cpu_up, cpu = server.cpu_seconds() - cpu, server.cpu_seconds()
                    down = timed(download)
                    cpu_down = server.cpu_seconds() - cpu
                    check_copy(source, dest, files)
                    results[side]["upload"].append(total / MiB / up)
                    results[side]["download"].append(total / MiB / down)
                    print(
                        f"run {run + 1} {side:>8}: upload {total / MiB / up:7.1f} MiB/s ({up:5.1f} s, "
                        f"server CPU {cpu_up:4.1f} s), download {total / MiB / down:7.1f} MiB/s "
                        f"({down:5.1f} s, server CPU {cpu_down:4.1f} s)",
                        flush=True,
                    )
                    shutil.rmtree(dest)
                    store.delete_prefix(f"s3://bench/{prefix}/")

    summary = {}
    for direction in ("upload", "download"):
        base = max(results["baseline"][direction])
        ours = max(results["kubetune"][direction])
        summary[direction] = {
            "baseline_mib_s": round(base, 1),
            "kubetune_mib_s": round(ours, 1),
            "ratio": round(ours / base, 2),
        }
        print(
            f"{direction:>8}: baseline {base:7.1f} MiB/s, kubetune {ours:7.1f} MiB/s, ratio {ours / base:.2f} (goal >= 1.5)"
        )
    print(
        json.dumps(
            {"size_mib": args.size_mib, "shards": args.shards, "repeat": args.repeat, **tuning, **summary}
        )
    )
    return 0


def make_model_dir(root: Path, size_mib: int, shards: int) -> Path:
    """Shards of random bytes (incompressible, like trained weights) plus small JSON files."""
    root.mkdir(parents=True)
    small = {
        "config.json": {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32},
        "generation_config.json": {"do_sample": True, "temperature": 0.7},
        "tokenizer_config.json": {"model_max_length": 4096, "padding_side": "left"},
        "special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>"},
        "tokenizer.json": {"model": {"vocab": {f"tok{i}": i for i in range(50_000)}}},
    }
    for name, content in small.items():
        (root / name).write_text(json.dumps(content))
    index: dict[str, dict[str, str]] = {"weight_map": {}}
    shard_size = size_mib * MiB // shards
    for i in range(1, shards + 1):
        name = f"model-{i:05d}-of-{shards:05d}.safetensors"
        with (root / name).open("wb") as out:
            for _ in range(shard_size // (16 * MiB)):
                out.write(os.urandom(16 * MiB))
            out.write(os.urandom(shard_size % (16 * MiB)))
        index["weight_map"][f"layers.{i}.weight"] = name
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    return root


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def check_copy(source: Path, dest: Path, files: list[str]) -> None:
    for rel in files:
        if (dest / rel).stat().st_size != (source / rel).stat().st_size:
            raise SystemExit(f"download of {rel} has the wrong size")


class moto_server:
    """moto's S3 server in a child process on a free loopback port."""

    endpoint: str

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far."""
        fields = Path(f"/proc/{self._process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> moto_server:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                self.endpoint = f"http://127.0.0.1:{port}"
                return self
            except OSError:
                if time.monotonic() > deadline or self._process.poll() is not None:
                    self._process.kill()
                    raise SystemExit("the moto server did not start") from None
                time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        self._process.terminate()
        self._process.wait(timeout=30)


def _mem_available_mib() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


if __name__ == "__main__":
    sys.exit(main())
