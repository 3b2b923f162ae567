"""Storage URIs and storage settings: parsing, rendering, joining, and where settings come from."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kubetune.errors import EXIT_INVALID_INPUT, InvalidInputError
from kubetune.storage import StorageConfig, StorageURI, StorageURIError, open_store, parse_uri
from kubetune.storage.config import MiB

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/run/model/", StorageURI("s3", "bucket", "run/model/")),
        ("s3://bucket/run/model", StorageURI("s3", "bucket", "run/model")),
        ("s3://bucket", StorageURI("s3", "bucket", "")),
        ("s3://my.bucket-1/a?b#c;d", StorageURI("s3", "my.bucket-1", "a?b#c;d")),
        ("file:///data/models/tiny", StorageURI("file", "", "data/models/tiny")),
        ("file:///", StorageURI("file", "", "")),
        ("hf://org/model", StorageURI("hf", "org/model", "")),
        ("hf://org/model/onnx/model.onnx", StorageURI("hf", "org/model", "onnx/model.onnx")),
        ("hf://org/model@v1.0/config.json", StorageURI("hf", "org/model@v1.0", "config.json")),
        ("hf://datasets/org/data/train.jsonl", StorageURI("hf", "datasets/org/data", "train.jsonl")),
    ],
)
def test_canonical_uris_parse_and_render_back_unchanged(uri: str, expected: StorageURI) -> None:
    assert parse_uri(uri) == expected
    assert str(parse_uri(uri)) == uri


@pytest.mark.parametrize(
    ("uri", "canonical"),
    [
        ("s3://bucket/", "s3://bucket"),
        ("  s3://bucket/key\n", "s3://bucket/key"),
        ("S3://bucket/key", "s3://bucket/key"),
        ("file://localhost/data/x", "file:///data/x"),
        ("file:////data//x", "file:///data//x"),
    ],
)
def test_equivalent_spellings_normalise(uri: str, canonical: str) -> None:
    assert str(parse_uri(uri)) == canonical
    assert parse_uri(str(parse_uri(uri))) == parse_uri(uri)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("", "storage URI is empty; expected s3://bucket/key, file:///absolute/path or hf://"),
        (
            "/data/model",
            r"'/data/model' is not a storage URI: it has no scheme \(for a local path write "
            r"file:///data/model\); allowed schemes: s3, file, hf",
        ),
        (
            "gs://bucket/key",
            r"unsupported scheme 'gs://' in 'gs://bucket/key'; allowed schemes: s3, file, hf",
        ),
        ("s3:///key", r"'s3:///key' has no bucket; expected s3://bucket/key"),
        ("s3://b/key", r"'s3://b/key': 'b' is not a valid S3 bucket name \(3-63"),
        ("s3://bad bucket/key", "is not a valid S3 bucket name"),
        (
            "file://data/model",
            r"'file://data/model' is not an absolute file URI; write file:///absolute/path",
        ),
        (
            "hf://gpt2",
            r"'hf://gpt2' does not name a Hub repository; expected hf://org/name\[@revision\]\[/path\]",
        ),
        ("hf://org/model@/x", "has an empty @revision"),
        ("hf://org/mo del", "is not a valid Hub repository id"),
        ("s3://bucket/run/../other", r"'s3://bucket/run/../other' contains a '\.\.' segment"),
    ],
)
def test_malformed_uris_are_rejected_with_the_uri_and_the_fix(uri: str, message: str) -> None:
    with pytest.raises(StorageURIError, match=message) as err:
        parse_uri(uri)
    assert isinstance(err.value, ValueError), "pydantic validators rely on ValueError"
    assert isinstance(err.value, InvalidInputError)
    assert err.value.exit_code == EXIT_INVALID_INPUT


def test_join_appends_segments_and_keeps_a_final_trailing_slash() -> None:
    run = parse_uri("s3://bucket/run/")

    assert str(run.join("checkpoints", "step-10/")) == "s3://bucket/run/checkpoints/step-10/"
    assert (
        str(run.join("checkpoints/step-10", "_COMMITTED.json"))
        == "s3://bucket/run/checkpoints/step-10/_COMMITTED.json"
    )
    assert str(parse_uri("s3://bucket").join("/a/", "/b")) == "s3://bucket/a/b"
    assert str(parse_uri("file:///out").join("model", "config.json")) == "file:///out/model/config.json"
    assert run.join() == run
    with pytest.raises(StorageURIError, match=r"cannot join '\.\./x' to s3://bucket/run/"):
        run.join("../x")


def test_name_parent_and_prefix_views() -> None:
    uri = parse_uri("s3://bucket/run/model/config.json")

    assert uri.name == "config.json"
    assert str(uri.parent) == "s3://bucket/run/model/"
    assert str(uri.parent.parent.parent) == "s3://bucket"
    assert str(parse_uri("s3://bucket/run/model").as_prefix()) == "s3://bucket/run/model/"
    assert str(parse_uri("file:///data/x").local_path) == "/data/x"
    with pytest.raises(StorageURIError, match="not a file:// URI"):
        _ = uri.local_path


def test_hub_uris_expose_repository_type_and_revision() -> None:
    model = parse_uri("hf://org/model@refs%2Fpr%2F1/onnx")
    dataset = parse_uri("hf://datasets/org/data")

    assert (model.repo_id, model.repo_type, model.revision, model.key) == (
        "org/model",
        "model",
        "refs/pr/1",
        "onnx",
    )
    assert (dataset.repo_id, dataset.repo_type, dataset.revision) == ("org/data", "dataset", None)


class TestStorageConfig:
    def test_environment_supplies_endpoint_region_and_retry_settings(self) -> None:
        config = StorageConfig.from_env(
            environ={
                "AWS_ENDPOINT_URL": "http://minio:9000",
                "AWS_DEFAULT_REGION": "eu-west-1",
                "AWS_RETRY_MODE": "adaptive",
                "AWS_MAX_ATTEMPTS": "8",
                "KUBETUNE_S3_ADDRESSING_STYLE": "virtual",
                "KUBETUNE_S3_MAX_CONCURRENCY": "32",
            }
        )

        assert (config.endpoint, config.region, config.retry_mode, config.max_attempts) == (
            "http://minio:9000",
            "eu-west-1",
            "adaptive",
            8,
        )
        assert (config.addressing_style, config.max_concurrency) == ("virtual", 32)

    def test_service_specific_and_newer_variables_take_precedence(self) -> None:
        config = StorageConfig.from_env(
            environ={
                "AWS_ENDPOINT_URL": "http://generic:9000",
                "AWS_ENDPOINT_URL_S3": "http://s3-only:9000",
                "AWS_DEFAULT_REGION": "eu-west-1",
                "AWS_REGION": "us-west-2",
            }
        )

        assert (config.endpoint, config.region) == ("http://s3-only:9000", "us-west-2")

    def test_explicit_plan_values_win_over_the_environment(self) -> None:
        config = StorageConfig.from_env(
            endpoint="https://ceph.example:443",
            region="ap-south-1",
            environ={"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_REGION": "eu-west-1"},
        )

        assert (config.endpoint, config.region) == ("https://ceph.example:443", "ap-south-1")

    def test_nothing_set_means_aws_defaults(self) -> None:
        config = StorageConfig.from_env(environ={"AWS_ENDPOINT_URL": "  "})

        assert config == StorageConfig()
        assert (config.endpoint, config.max_concurrency, config.multipart_chunksize) == (None, 16, 16 * MiB)

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"endpoint": "minio:9000"}, r"storage endpoint 'minio:9000' must be an http:// or https:// URL"),
            ({"multipart_chunksize": MiB}, r"storage multipart_chunksize must be between 5 MiB and 5 GiB"),
            ({"max_concurrency": 0}, "storage max_concurrency must be at least 1, got 0"),
            ({"addressing_style": "dns"}, "storage addressing_style 'dns' is not one of auto, path, virtual"),
        ],
    )
    def test_invalid_settings_name_the_field(self, kwargs: dict[str, object], message: str) -> None:
        with pytest.raises(InvalidInputError, match=message):
            StorageConfig(**kwargs)  # type: ignore[arg-type]

    def test_invalid_environment_values_name_the_variable(self) -> None:
        with pytest.raises(
            InvalidInputError, match="environment variable AWS_MAX_ATTEMPTS='many' is not an integer"
        ):
            StorageConfig.from_env(environ={"AWS_MAX_ATTEMPTS": "many"})
        with pytest.raises(
            InvalidInputError, match="AWS_RETRY_MODE 'legacy' is not one of standard, adaptive"
        ):
            StorageConfig.from_env(environ={"AWS_RETRY_MODE": "legacy"})


def test_open_store_picks_the_backend_by_scheme() -> None:
    config = StorageConfig(endpoint="http://127.0.0.1:9")

    assert type(open_store("s3://bucket/x", config)).__name__ == "S3Store"
    assert type(open_store("file:///tmp/x", config)).__name__ == "FileStore"
    assert type(open_store("hf://org/model", config)).__name__ == "HubStore"
    with pytest.raises(StorageURIError, match="unsupported scheme 'gs://'"):
        open_store("gs://bucket/x", config)


def test_the_storage_package_imports_neither_torch_nor_the_hub_client() -> None:
    # A fresh interpreter: this test process may already have imported both for other tests.
    code = "import sys, kubetune.storage; print(sorted({'torch', 'huggingface_hub'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert result.stdout.strip() == "[]"
