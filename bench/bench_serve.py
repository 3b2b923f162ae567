"""Serving throughput and latency at concurrency 1, 8 and 32 with a tiny model on CPU.

Baseline, measured in the same run: the same requests answered one after another by
``model.generate`` in this process (what a server without batching could at best do). Then the
built-in server (a real ``python -m kubetune.trainer serve`` subprocess) is driven by 1, 8 and 32
concurrent clients. Printed: requests/s, p50/p99 latency, generated tokens/s, and the tokens/s
ratio against the baseline (goal: >= 3x at concurrency 8).

    .venv/bin/python bench/bench_serve.py [--max-tokens 32] [--requests-per-client 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kubetune.trainer.tinymodel import build_tiny_causal_lm, sample_corpus

MODEL_NAME = "bench"


@dataclass
class Result:
    label: str
    requests: int
    seconds: float
    latencies: list[float]
    tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def row(self, baseline: Result | None) -> str:
        ratio = f"{self.tokens_per_s / baseline.tokens_per_s:6.2f}x" if baseline else "   1.00x"
        return (
            f"{self.label:<24} {self.requests:>5} {self.requests / self.seconds:>8.2f} "
            f"{percentile(self.latencies, 50) * 1000:>9.0f} {percentile(self.latencies, 99) * 1000:>9.0f} "
            f"{self.tokens_per_s:>9.1f} {ratio}"
        )


def percentile(values: list[float], p: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1]


def prompts(count: int, prompt_chars: int) -> list[str]:
    lines = [line for line in sample_corpus() if len(line) >= prompt_chars]
    return [lines[i % len(lines)][:prompt_chars] for i in range(count)]


def baseline(model_dir: Path, texts: list[str], max_tokens: int) -> Result:
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    latencies, tokens = [], 0
    with torch.inference_mode():
        model.generate(
            **tokenizer(texts[0], return_tensors="pt"), max_new_tokens=2, do_sample=False
        )  # warm-up
        start = time.perf_counter()
        for text in texts:
            t0 = time.perf_counter()
            inputs = tokenizer(text, return_tensors="pt")
            out = model.generate(
                **inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False
            )
            tokens += out.shape[1] - inputs["input_ids"].shape[1]
            latencies.append(time.perf_counter() - t0)
        seconds = time.perf_counter() - start
    return Result("sequential generate", len(texts), seconds, latencies, tokens)


async def drive(base_url: str, texts: list[str], concurrency: int, max_tokens: int) -> Result:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for text in texts:
        queue.put_nowait(text)
    latencies: list[float] = []
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            text = queue.get_nowait()
            body = {
                "model": MODEL_NAME,
                "prompt": text,
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
            }
            t0 = time.perf_counter()
            response = await http.post("/v1/completions", json=body)
            response.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            tokens += response.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return Result(f"server, concurrency {concurrency}", len(texts), seconds, latencies, tokens)


def start_server(
    model_dir: Path, workdir: Path, max_batch_size: int, threads: int
) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "kubetune.trainer", "serve", "--model", str(model_dir)]
    argv += ["--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--max-batch-size", str(max_batch_size), "--threads", str(threads), "--log-level", "warning"]
    log = (workdir / "server.log").open("wb")
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}; see {workdir / 'server.log'}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return process, base_url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("server did not become ready in 300s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--prompt-chars", type=int, default=48, help="characters per prompt")
    parser.add_argument("--requests-per-client", type=int, default=4, help="requests each client sends")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads, for the baseline and the server alike (a tiny model gains nothing from more, "
        "and spinning OpenMP threads on a shared machine cost a lot)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        workdir = Path(tmp)
        model_dir = build_tiny_causal_lm(
            workdir / "model",
            sample_corpus(),
            hidden_size=args.hidden_size,
            num_layers=args.layers,
            max_position=512,
        )
        # The baseline answers as many requests as the concurrency-8 run, one at a time.
        texts = prompts(8 * args.requests_per_client, args.prompt_chars)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
        print(
            f"model: llama, hidden {args.hidden_size}, {args.layers} layers; {args.max_tokens} tokens per request"
        )
        base = baseline(model_dir, texts, args.max_tokens)
        results = []
        process, base_url = start_server(model_dir, workdir, max(args.concurrency), args.threads)
        try:
            asyncio.run(drive(base_url, texts[:2], 1, 4))  # warm-up
            for concurrency in args.concurrency:
                load = prompts(concurrency * args.requests_per_client, args.prompt_chars)
                results.append(asyncio.run(drive(base_url, load, concurrency, args.max_tokens)))
        finally:
            process.terminate()
            process.wait(60)

    print(f"\n{'run':<24} {'reqs':>5} {'req/s':>8} {'p50 ms':>9} {'p99 ms':>9} {'tok/s':>9} vs baseline")
    print(base.row(None))
    for result in results:
        print(result.row(base))
    at_8 = next((r for r in results if r.label.endswith("concurrency 8")), None)
    if at_8 is not None:
        ratio = at_8.tokens_per_s / base.tokens_per_s
        print(
            f"\nconcurrency 8: {ratio:.2f}x the sequential baseline's tokens/s (goal >= 3x): {'met' if ratio >= 3 else 'NOT met'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
