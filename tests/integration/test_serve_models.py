"""The kinds of model the runtimes write, served from the S3 server: a base model plus a LoRA
adapter, a sequence classifier (full and LoRA) and a compressed-tensors checkpoint."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import openai
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from kubetune.trainer.tinymodel import build_tiny_causal_lm
from tests.integration.test_serve_support import (
    CORPUS,
    Bucket,
    build_lm,
    build_lora_adapter,
    greedy_reference,
    running_server,
)
from tests.tinymodels import build_tiny_classifier

pytestmark = pytest.mark.integration

LABELS = ["negative", "neutral", "positive"]
TEXTS = ["Permission is hereby granted", "free of charge", "THE SOFTWARE IS PROVIDED AS IS, WITHOUT WARRANTY"]


@pytest.fixture(scope="module")
def bucket(s3_server: str) -> Bucket:
    return Bucket(s3_server, f"serve-models-{uuid.uuid4().hex[:10]}")


def openai_client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def classify(client: openai.OpenAI, path: str, model: str, texts: list[str]) -> dict[str, Any]:
    # The openai client has no classification call; its generic post() sends our route the same way.
    result: dict[str, Any] = client.post(path, body={"model": model, "input": texts}, cast_to=dict)
    return result


def local_probs(model: Any, tokenizer: Any, text: str) -> list[float]:
    with torch.inference_mode():
        logits = model(**tokenizer(text, return_tensors="pt")).logits[0]
    probs: list[float] = torch.softmax(logits, dim=-1).tolist()
    return probs


def test_base_model_plus_lora_adapter_serves_the_merged_model(
    bucket: Bucket, tmp_path_factory: pytest.TempPathFactory
) -> None:
    root = tmp_path_factory.mktemp("lora")
    base_dir = build_lm(root / "base")
    adapter_dir = build_lora_adapter(base_dir, root / "adapter")
    base_uri = bucket.upload(base_dir, "models/base")
    adapter_uri = bucket.upload(adapter_dir, "runs/lora-1/adapter")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    ids = tokenizer(CORPUS[20])["input_ids"]
    base_model: Any = AutoModelForCausalLM.from_pretrained(base_dir)
    base_text, _ = greedy_reference(base_model, tokenizer, ids, 10)
    merged: Any = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter_dir))
    expected, _ = greedy_reference(merged.merge_and_unload().eval(), tokenizer, ids, 10)
    assert expected != base_text, "the test adapter must change the model's answer"

    args = ["--model", base_uri, "--adapter", adapter_uri, "--served-model-name", "lora"]
    with running_server(root / "server", args, env=bucket.env) as server:
        client = openai_client(server.base_url)
        response = client.completions.create(model="lora", prompt=CORPUS[20], max_tokens=10, temperature=0)
        chat = client.chat.completions.create(
            model="lora", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
        )

    assert response.choices[0].text == expected
    assert chat.choices[0].message.content is not None


def test_classifier_answers_labels_and_probabilities(
    bucket: Bucket, tmp_path_factory: pytest.TempPathFactory
) -> None:
    root = tmp_path_factory.mktemp("classifier")
    model_dir = build_tiny_classifier(root / "model", CORPUS, 3, labels=LABELS)
    uri = bucket.upload(model_dir, "runs/sentiment/model")
    model: Any = AutoModelForSequenceClassification.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    expected = [local_probs(model.eval(), tokenizer, t) for t in TEXTS]

    with running_server(
        root / "server", ["--model", uri, "--served-model-name", "sentiment"], env=bucket.env
    ) as server:
        client = openai_client(server.base_url)
        # Texts of different lengths in one request are padded into one batch.
        batch = classify(client, "/classifications", "sentiment", TEXTS)
        single = classify(client, "/classifications", "sentiment", [TEXTS[0]])
        with pytest.raises(openai.BadRequestError, match="sequence-classification model") as wrong:
            client.completions.create(model="sentiment", prompt="hi")
        with pytest.raises(openai.NotFoundError):
            classify(client, "/classifications", "other", TEXTS)
        # vLLM's path for the same request.
        same = httpx.post(
            f"{server.base_url}/classify", json={"model": "sentiment", "input": TEXTS[1]}
        ).json()

    assert batch["object"] == "list"
    assert batch["model"] == "sentiment"
    assert [d["index"] for d in batch["data"]] == [0, 1, 2]
    for item, probs in zip(batch["data"], expected, strict=True):
        assert item["probs"] == pytest.approx(probs, abs=1e-5)
        assert item["label"] == LABELS[max(range(3), key=probs.__getitem__)]
        assert item["num_classes"] == 3
        assert set(item["scores"]) == set(LABELS)
    assert single["data"][0]["probs"] == pytest.approx(expected[0], abs=1e-5)
    assert batch["usage"]["prompt_tokens"] == sum(len(tokenizer(t)["input_ids"]) for t in TEXTS)
    assert wrong.value.code == "wrong_model_type"
    assert same["data"][0]["probs"] == pytest.approx(expected[1], abs=1e-5)


def test_lora_classifier_adapter_brings_its_head_and_label_names(
    bucket: Bucket, tmp_path_factory: pytest.TempPathFactory
) -> None:
    root = tmp_path_factory.mktemp("lora-classifier")
    base_dir = build_tiny_causal_lm(root / "base", CORPUS, max_position=128)
    torch.manual_seed(5)
    classifier: Any = AutoModelForSequenceClassification.from_pretrained(
        base_dir,
        num_labels=3,
        id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
    )
    peft_model: Any = get_peft_model(
        classifier,
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS", init_lora_weights=False),
    )
    adapter_dir = root / "adapter"
    peft_model.save_pretrained(str(adapter_dir))
    # What a fine-tuning run keeps next to its adapter: the label names.
    classifier.config.save_pretrained(adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    merged = peft_model.merge_and_unload().eval()
    merged.config.pad_token_id = tokenizer.pad_token_id
    expected = [local_probs(merged, tokenizer, t) for t in TEXTS]
    args = ["--model", bucket.upload(base_dir, "models/lm-base"), "--adapter"]
    args += [bucket.upload(adapter_dir, "runs/clf-lora/adapter"), "--served-model-name", "clf"]

    with running_server(root / "server", args, env=bucket.env) as server:
        result = classify(openai_client(server.base_url), "/classifications", "clf", TEXTS)

    for item, probs in zip(result["data"], expected, strict=True):
        assert item["probs"] == pytest.approx(probs, abs=1e-5)
        assert set(item["scores"]) == set(LABELS)


def test_compressed_tensors_checkpoint_loads_and_serves_on_cpu(
    bucket: Bucket, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from llmcompressor.entrypoints.oneshot import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    root = tmp_path_factory.mktemp("compressed")
    # W8A16 quantizes in groups of 128 input features, so the hidden size must be a multiple of it.
    source = build_tiny_causal_lm(root / "source", CORPUS, hidden_size=128, num_layers=1)
    model: Any = AutoModelForCausalLM.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="W8A16", ignore=["lm_head"]))
    compressed = root / "w8a16"
    model.save_pretrained(compressed, save_compressed=True)
    tokenizer.save_pretrained(compressed)
    reloaded: Any = AutoModelForCausalLM.from_pretrained(compressed, dtype=torch.float32)
    expected, _ = greedy_reference(reloaded.eval(), tokenizer, tokenizer(CORPUS[30])["input_ids"], 8)
    uri = bucket.upload(compressed, "runs/compress-1/model")

    with running_server(
        root / "server", ["--model", uri, "--served-model-name", "w8a16"], env=bucket.env
    ) as server:
        response = openai_client(server.base_url).completions.create(
            model="w8a16", prompt=CORPUS[30], max_tokens=8, temperature=0
        )

    assert '"quantization_config"' in (compressed / "config.json").read_text()
    assert response.choices[0].text == expected
