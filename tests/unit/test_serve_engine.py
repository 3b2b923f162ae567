"""The batching engines in-process, with tiny real models (kubetune.trainer.serve.engine)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from kubetune.trainer.serve.engine import (
    FINISH_ERROR,
    FINISH_LENGTH,
    ClassificationEngine,
    ClassificationJob,
    EngineStoppedError,
    GenerationEngine,
    GenerationSequence,
    QueueFullError,
    SamplingParams,
)
from kubetune.trainer.tinymodel import build_tiny_causal_lm, sample_corpus
from tests.tinymodels import build_tiny_classifier

pytestmark = pytest.mark.unit

CORPUS = sample_corpus(max_lines=300)
GREEDY = SamplingParams(max_tokens=8, temperature=0)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    out = build_tiny_causal_lm(tmp_path_factory.mktemp(request.param) / "m", CORPUS, arch=request.param)
    model: Any = AutoModelForCausalLM.from_pretrained(out)
    # Random weights pick end-of-sequence tokens like any other; the engines below are told no eos
    # either (eos_token_ids=[]), so both sides decode exactly max_tokens by plain argmax.
    model.generation_config.eos_token_id = None
    return model.eval(), AutoTokenizer.from_pretrained(out)


def make_engine(lm: tuple[Any, Any], **kwargs: Any) -> GenerationEngine:
    model, tokenizer = lm
    return GenerationEngine(
        model,
        eos_token_ids=[],  # random weights: keep every sequence to its max_tokens
        pad_token_id=tokenizer.pad_token_id,
        max_context=256,  # build_tiny_causal_lm's default max_position
        loop=asyncio.get_running_loop(),
        **kwargs,
    )


async def tokens_of(seq: GenerationSequence) -> tuple[list[int], str | None]:
    tokens: list[int] = []
    while True:
        out = await seq.outputs.get()
        if out.token_id is not None:
            tokens.append(out.token_id)
        if out.finish_reason is not None:
            return tokens, out.finish_reason


def generate_alone(lm: tuple[Any, Any], prompt: list[int], n: int) -> list[int]:
    model, _ = lm
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    result: list[int] = out[0, len(prompt) :].tolist()
    return result


async def test_sequences_joining_a_running_batch_decode_as_if_alone(lm: tuple[Any, Any]) -> None:
    _, tokenizer = lm
    prompts = [tokenizer(line)["input_ids"][: 2 + 5 * i] for i, line in enumerate(CORPUS[:6])]
    lengths = [9, 3, 12, 6, 10, 4]
    engine = make_engine(lm, max_batch_size=4)
    engine.start()
    try:
        early = [
            GenerationSequence(p, SamplingParams(max_tokens=n, temperature=0))
            for p, n in zip(prompts[:3], lengths[:3], strict=True)
        ]
        engine.submit(early)
        first = [await s.outputs.get() for s in early]  # the batch is running now
        late = [
            GenerationSequence(p, SamplingParams(max_tokens=n, temperature=0))
            for p, n in zip(prompts[3:], lengths[3:], strict=True)
        ]
        engine.submit(late)
        results = [await tokens_of(s) for s in early + late]
    finally:
        engine.stop()

    for i, (tokens, finish) in enumerate(results):
        got = [first[i].token_id, *tokens] if i < 3 else tokens
        assert got == generate_alone(lm, prompts[i], lengths[i]), f"sequence {i}"
        assert finish == FINISH_LENGTH


async def test_cancelled_sequence_frees_its_slot(lm: tuple[Any, Any]) -> None:
    engine = make_engine(lm, max_batch_size=1)
    engine.start()
    try:
        blocker = GenerationSequence([5, 6, 7], SamplingParams(max_tokens=200, temperature=0))
        engine.submit([blocker])
        await blocker.outputs.get()
        follower = GenerationSequence([8, 9], GREEDY)
        engine.submit([follower])
        blocker.cancel()
        tokens, finish = await asyncio.wait_for(tokens_of(follower), timeout=120)
    finally:
        engine.stop()
    assert len(tokens) == GREEDY.max_tokens
    assert finish == FINISH_LENGTH
    assert blocker.generated < 200


async def test_queue_takes_whole_requests_or_nothing(lm: tuple[Any, Any]) -> None:
    engine = make_engine(lm, max_queue=2)  # not started: everything stays queued
    engine.submit([GenerationSequence([1], GREEDY)])
    with pytest.raises(QueueFullError, match="limit 2"):
        engine.submit([GenerationSequence([1], GREEDY), GenerationSequence([2], GREEDY)])
    assert engine.queue_depth == 1
    engine.start()
    engine.stop()
    with pytest.raises(EngineStoppedError):
        engine.submit([GenerationSequence([1], GREEDY)])


async def test_seeded_sampling_does_not_depend_on_batch_companions(lm: tuple[Any, Any]) -> None:
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=42)
    engine = make_engine(lm)
    engine.start()
    try:
        alone = GenerationSequence([10, 11, 12], params)
        engine.submit([alone])
        alone_tokens, _ = await tokens_of(alone)
        crowd = [GenerationSequence([20 + i, 21, 22, 23][: i + 1], params) for i in range(3)]
        again = GenerationSequence([10, 11, 12], params)
        engine.submit([*crowd, again])
        again_tokens, _ = await tokens_of(again)
        for seq in crowd:
            await tokens_of(seq)
    finally:
        engine.stop()
    assert again_tokens == alone_tokens


async def test_a_failing_step_fails_its_sequences_not_the_engine(lm: tuple[Any, Any]) -> None:
    model, _ = lm
    engine = make_engine(lm)
    engine.start()
    try:
        broken = GenerationSequence([model.config.vocab_size + 100], GREEDY)  # outside the embedding
        engine.submit([broken])
        out = await broken.outputs.get()
        healthy = GenerationSequence([3, 4], GREEDY)
        engine.submit([healthy])
        tokens, finish = await tokens_of(healthy)
    finally:
        engine.stop()
    assert out.finish_reason == FINISH_ERROR
    assert out.error is not None
    assert "IndexError" in out.error
    assert (len(tokens), finish) == (GREEDY.max_tokens, FINISH_LENGTH)


async def test_classification_batch_matches_single_texts(tmp_path: Path) -> None:
    out = build_tiny_classifier(tmp_path / "clf", CORPUS, 4)
    model: Any = AutoModelForSequenceClassification.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    texts = ["short", "a much longer text than the first one", "medium length text"]
    engine = ClassificationEngine(
        model.eval(), pad_token_id=tokenizer.pad_token_id, multi_label=False, loop=asyncio.get_running_loop()
    )
    loop = asyncio.get_running_loop()
    jobs = [ClassificationJob(tokenizer(t)["input_ids"], loop.create_future()) for t in texts]
    engine.submit(jobs)  # queued together before the thread starts: one padded batch
    engine.start()
    try:
        batched = await asyncio.gather(*(j.result for j in jobs))
    finally:
        engine.stop()
    for text, probs in zip(texts, batched, strict=True):
        with torch.inference_mode():
            expected = torch.softmax(model(**tokenizer(text, return_tensors="pt")).logits[0], dim=-1)
        assert probs == pytest.approx(expected.tolist(), abs=1e-5)
        assert sum(probs) == pytest.approx(1.0)
