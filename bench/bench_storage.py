"""Storage throughput: kubetune's store vs plain boto3, uploading and downloading a model directory.

Measured against each S3 server of the test suite, in the same run: moto's server mode (started
in a child process: in-process, it would share the client's GIL and measure contention, not
transfers) and MinIO built from source (tests/testbin/build.sh; what clusters run), each on
127.0.0.1. The directory looks like a Hugging Face checkpoint: a few large safetensors-like shards
of random bytes plus small JSON files.

- baseline: one boto3 client with its defaults; ``upload_file`` / ``download_file`` per file, one
  file after the other (boto3's default TransferConfig: 8 MiB parts, 10 threads within a file).
- kubetune: ``S3Store.upload_dir`` / ``download_prefix`` with the default ``StorageConfig``.

Per server, runs alternate between the two, and the best of ``--repeat`` runs is reported for
each, which damps noise from other work on the machine. Goal: ratio >= 1.5 against MinIO.

The CPU seconds the S3 server spent are printed for each run: on a small machine the server, not
the client, is often the bottleneck, and its cost per byte depends on how the client sends (moto
reassembles a multipart upload by copying every part again on completion). ``--max-concurrency``,
``--multipart-threshold-mib`` and ``--chunk-mib`` change kubetune's side only, to show that.

    .venv/bin/python bench/bench_storage.py [--servers moto,minio] [--size-mib 1024] [--shards 4] [--repeat 2]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from kubetune.storage import S3Store, StorageConfig
from kubetune.storage.config import MiB

ROOT = Path(__file__).resolve().parents[1]
# Appended, not prepended: the installed kubetune wins; only ``tests`` is taken from the checkout.
sys.path.append(str(ROOT))

from tests.cluster.controlplane import die_with_parent  # noqa: E402
from tests.minio import MinioServer  # noqa: E402

GOAL = 1.5
SERVERS = ("moto", "minio")
ENVIRONMENT = {
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent/kubetune-bench-aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/kubetune-bench-aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}
# moto accepts any keys; MinIO gets keys generated for the run.
MOTO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "kubetune-bench", "AWS_SECRET_ACCESS_KEY": "kubetune-bench-secret"}

Results = dict[str, dict[str, list[float]]]


@dataclass(frozen=True)
class Server:
    """An S3 server process this script started: where it listens, its keys, its CPU clock."""

    name: str
    endpoint: str
    credentials: dict[str, str]
    pid: int

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--servers", default=",".join(SERVERS), help="comma-separated S3 servers to measure against"
    )
    parser.add_argument("--size-mib", type=int, default=1024, help="total size of the model directory")
    parser.add_argument("--shards", type=int, default=4, help="number of large weight files")
    parser.add_argument("--repeat", type=int, default=2, help="runs per side; the best one counts")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--max-concurrency", type=int, help="kubetune's StorageConfig.max_concurrency")
    parser.add_argument("--multipart-threshold-mib", type=int, help="kubetune's multipart threshold")
    parser.add_argument("--chunk-mib", type=int, help="kubetune's multipart part size")
    args = parser.parse_args(argv)
    servers = [name.strip() for name in args.servers.split(",") if name.strip()]
    unknown = sorted(set(servers) - set(SERVERS))
    if unknown:
        parser.error(f"unknown servers {unknown}; choose from {', '.join(SERVERS)}")
    tuning: dict[str, Any] = {}
    if args.max_concurrency is not None:
        tuning["max_concurrency"] = args.max_concurrency
    if args.multipart_threshold_mib is not None:
        tuning["multipart_threshold"] = args.multipart_threshold_mib * MiB
    if args.chunk_mib is not None:
        tuning["multipart_chunksize"] = args.chunk_mib * MiB

    available = _mem_available_mib()
    print(f"memory available: {available} MiB, cpus: {os.cpu_count()}, load average: {_load_average()}")
    if available is not None and available < 3 * args.size_mib:
        print(
            f"warning: the moto server holds up to 2 copies of {args.size_mib} MiB; consider a smaller --size-mib"
        )
    os.environ.update(ENVIRONMENT)
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        os.environ.pop(name, None)

    summary: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-", dir=args.workdir) as scratch:
        work = Path(scratch)
        source = make_model_dir(work / "model", args.size_mib, args.shards)
        total = sum(p.stat().st_size for p in source.rglob("*") if p.is_file())
        files = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
        print(f"model directory: {len(files)} files, {total / MiB:.0f} MiB")
        for name in servers:
            with start_server(name, work / name) as server:
                results = measure(server, source, files, total, work, args.repeat, tuning)
            summary[name] = summarize(results)

    print()
    for name, directions in summary.items():
        for direction, figures in directions.items():
            print(
                f"{name:>5} {direction:>8}: baseline {figures['baseline_mib_s']:7.1f} MiB/s, kubetune "
                f"{figures['kubetune_mib_s']:7.1f} MiB/s, ratio {figures['ratio']:.2f}"
                + (f" (goal >= {GOAL})" if name == "minio" else "")
            )
    print(f"load average after: {_load_average()}")
    print(
        json.dumps(
            {"size_mib": args.size_mib, "shards": args.shards, "repeat": args.repeat, **tuning, **summary}
        )
    )
    return 0


def measure(
    server: Server,
    source: Path,
    files: list[str],
    total: int,
    work: Path,
    repeat: int,
    tuning: dict[str, Any],
) -> Results:
    """Alternating baseline and kubetune runs against one server: MiB/s per run and direction."""
    os.environ.update(server.credentials)
    # A fresh session: boto3's default one would keep the previous server's keys.
    baseline_client = boto3.session.Session().client(
        "s3", endpoint_url=server.endpoint, config=Config(s3={"addressing_style": "path"})
    )
    baseline_client.create_bucket(Bucket="bench")
    config = dataclasses.replace(StorageConfig.from_env(endpoint=server.endpoint), **tuning)
    store = S3Store(config)
    print(
        f"{server.name}: kubetune max_concurrency {config.max_concurrency}, multipart threshold "
        f"{config.multipart_threshold // MiB} MiB, parts {config.multipart_chunksize // MiB} MiB"
    )
    results: Results = {
        "baseline": {"upload": [], "download": []},
        "kubetune": {"upload": [], "download": []},
    }
    for run in range(repeat):
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

            up = timed(upload, server)
            down = timed(download, server)
            check_copy(source, dest, files)
            results[side]["upload"].append(total / MiB / up.seconds)
            results[side]["download"].append(total / MiB / down.seconds)
            print(
                f"{server.name:>5} run {run + 1} {side:>8}: upload {total / MiB / up.seconds:7.1f} MiB/s "
                f"({up}), download {total / MiB / down.seconds:7.1f} MiB/s ({down})",
                flush=True,
            )
            shutil.rmtree(dest)
            store.delete_prefix(f"s3://bench/{prefix}/")
    return results


def summarize(results: Results) -> dict[str, dict[str, float]]:
    summary = {}
    for direction in ("upload", "download"):
        base = max(results["baseline"][direction])
        ours = max(results["kubetune"][direction])
        summary[direction] = {
            "baseline_mib_s": round(base, 1),
            "kubetune_mib_s": round(ours, 1),
            "ratio": round(ours / base, 2),
        }
    return summary


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


@dataclass(frozen=True)
class Timing:
    seconds: float
    server_cpu: float
    client_cpu: float

    def __str__(self) -> str:
        return f"{self.seconds:5.1f} s, CPU s: server {self.server_cpu:4.1f}, client {self.client_cpu:4.1f}"


def timed(fn: Callable[[], None], server: Server) -> Timing:
    """Wall time of ``fn`` and the CPU time the server and this process spent meanwhile."""
    server_before, client_before = server.cpu_seconds(), _own_cpu_seconds()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    return Timing(seconds, server.cpu_seconds() - server_before, _own_cpu_seconds() - client_before)


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def check_copy(source: Path, dest: Path, files: list[str]) -> None:
    for rel in files:
        if (dest / rel).stat().st_size != (source / rel).stat().st_size:
            raise SystemExit(f"download of {rel} has the wrong size")


@contextlib.contextmanager
def start_server(name: str, directory: Path) -> Iterator[Server]:
    """Start the named S3 server in a child process; stop it on leaving."""
    if name == "minio":
        minio = MinioServer(directory).start()
        try:
            yield Server("minio", minio.endpoint, minio.credentials.as_env(), minio.pid)
        finally:
            minio.stop()
        return
    with moto_server() as process:
        yield process


@contextlib.contextmanager
def moto_server() -> Iterator[Server]:
    """moto's S3 server in a child process on a free loopback port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise SystemExit("the moto server did not start") from None
                time.sleep(0.1)
        yield Server("moto", f"http://127.0.0.1:{port}", MOTO_CREDENTIALS, process.pid)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _load_average() -> str:
    return " ".join(f"{load:.2f}" for load in os.getloadavg())


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
