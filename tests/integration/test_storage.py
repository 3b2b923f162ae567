"""Object storage against a real S3 protocol server (moto on 127.0.0.1) and the local filesystem.

Faults are injected on the wire by a proxy in front of the server (503 SlowDown, 500, 403,
connection resets), so the retry paths run through boto3 and s3transfer exactly as in production.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kubetune.errors import (
    EXIT_INVALID_INPUT,
    EXIT_STORAGE,
    InvalidInputError,
    RetriableError,
    StorageAccessError,
)
from kubetune.storage import (
    FileStore,
    HubStore,
    ObjectInfo,
    ObjectStore,
    S3Store,
    StorageConfig,
    open_store,
)
from kubetune.storage.config import MiB
from tests.s3server import Fault, FaultProxy, ProxiedRequest, S3Bucket

pytestmark = pytest.mark.integration

# Fast retries: the tests exercise the retry logic, not the waiting.
FAST_RETRIES: dict[str, Any] = {
    "backoff_base_s": 0.01,
    "backoff_max_s": 0.05,
    "connect_timeout_s": 5.0,
    "read_timeout_s": 10.0,
}

MODEL_FILES = {
    "config.json": b'{"model_type": "tiny"}',
    "tokenizer/tokenizer.json": b'{"version": "1.0"}',
    "tokenizer/special_tokens_map.json": b"{}",
    "shards/deep/nested/model-00001-of-00002.safetensors": os.urandom(300_000),
    "shards/deep/nested/model-00002-of-00002.safetensors": os.urandom(200_001),
    "empty.txt": b"",
}


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def store_via(proxy: FaultProxy, **overrides: Any) -> S3Store:
    """An S3 store whose requests all pass through the fault proxy."""
    config = dataclasses.replace(StorageConfig.from_env(endpoint=proxy.endpoint), **FAST_RETRIES)
    return S3Store(dataclasses.replace(config, **overrides))


@pytest.fixture(params=["s3", "file"])
def store_and_root(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[ObjectStore, str]:
    """Each backend that can be written to, with a root URI to work under."""
    if request.param == "s3":
        bucket: S3Bucket = request.getfixturevalue("s3_bucket")
        return open_store(bucket.uri), bucket.uri
    root = f"file://{tmp_path / 'store'}"
    return open_store(root), root


class TestRoundTrips:
    def test_nested_prefix_uploads_and_downloads_byte_for_byte(
        self, store_and_root: tuple[ObjectStore, str], tmp_path: Path
    ) -> None:
        store, root = store_and_root
        source = write_tree(tmp_path / "src", MODEL_FILES)
        uploaded_bytes: list[int] = []

        uris = store.upload_dir(source, f"{root}/run/model/", progress=uploaded_bytes.append)

        assert uris == [f"{root}/run/model/{rel}" for rel in sorted(MODEL_FILES)]
        assert sum(uploaded_bytes) == sum(len(data) for data in MODEL_FILES.values())
        assert store.list(f"{root}/run/model") == [
            ObjectInfo(rel, len(MODEL_FILES[rel])) for rel in sorted(MODEL_FILES)
        ]

        downloaded_bytes: list[int] = []
        paths = store.download_prefix(f"{root}/run/model", tmp_path / "dst", progress=downloaded_bytes.append)

        assert paths == [tmp_path / "dst" / rel for rel in sorted(MODEL_FILES)]
        assert read_tree(tmp_path / "dst") == MODEL_FILES
        assert sum(downloaded_bytes) == sum(len(data) for data in MODEL_FILES.values())

    def test_a_prefix_is_a_directory_not_a_string_prefix(
        self, store_and_root: tuple[ObjectStore, str], tmp_path: Path
    ) -> None:
        store, root = store_and_root
        store.write_bytes(f"{root}/run/model/a.bin", b"new")
        store.write_bytes(f"{root}/run/model-old/a.bin", b"old")

        assert store.list(f"{root}/run/model") == [ObjectInfo("a.bin", 3)]
        assert [p.name for p in store.download_prefix(f"{root}/run/model", tmp_path / "dst")] == ["a.bin"]
        assert (tmp_path / "dst" / "a.bin").read_bytes() == b"new"

    def test_small_objects_files_and_existence(
        self, store_and_root: tuple[ObjectStore, str], tmp_path: Path
    ) -> None:
        store, root = store_and_root
        uri = f"{root}/run/checkpoints/step-10/_COMMITTED.json"

        assert not store.exists(uri)
        store.write_bytes(uri, b'{"step": 10}')
        assert store.exists(uri)
        assert store.read_bytes(uri) == b'{"step": 10}'

        store.upload_file(
            write_tree(tmp_path, {"metrics.json": b"{}"}) / "metrics.json", f"{root}/run/metrics.json"
        )
        assert (
            store.download_file(f"{root}/run/metrics.json", tmp_path / "out" / "m.json").read_bytes() == b"{}"
        )

    def test_upload_dir_skips_excluded_names_and_paths(
        self, store_and_root: tuple[ObjectStore, str], tmp_path: Path
    ) -> None:
        store, root = store_and_root
        source = write_tree(
            tmp_path / "ckpt",
            {
                "model.safetensors": b"w",
                "_COMMITTED.json": b"{}",
                "__pycache__/x.pyc": b"c",
                "logs/events.out": b"e",
                "sub/logs/kept.txt": b"k",
            },
        )

        uris = store.upload_dir(source, f"{root}/ckpt", exclude=["_COMMITTED.json", "__pycache__", "logs/*"])

        assert uris == [f"{root}/ckpt/model.safetensors", f"{root}/ckpt/sub/logs/kept.txt"]

    def test_delete_prefix_removes_only_that_prefix(self, store_and_root: tuple[ObjectStore, str]) -> None:
        store, root = store_and_root
        for step in (10, 20):
            store.write_bytes(f"{root}/run/checkpoints/step-{step}/weights.bin", b"w")
            store.write_bytes(f"{root}/run/checkpoints/step-{step}/nested/optim.bin", b"o")

        store.delete_prefix(f"{root}/run/checkpoints/step-10")
        store.delete_prefix(f"{root}/run/checkpoints/step-10")  # idempotent

        assert [info.key for info in store.list(f"{root}/run/checkpoints")] == [
            "step-20/nested/optim.bin",
            "step-20/weights.bin",
        ]

    def test_delete_prefix_refuses_a_whole_bucket_or_root(
        self, store_and_root: tuple[ObjectStore, str]
    ) -> None:
        store, root = store_and_root
        whole = root if root.startswith("s3://") else "file:///"
        with pytest.raises(InvalidInputError, match="refusing to delete"):
            store.delete_prefix(whole)


class TestMultipart:
    def test_large_files_move_in_parts_concurrently(
        self, s3_bucket: S3Bucket, s3_fault_proxy: FaultProxy, tmp_path: Path
    ) -> None:
        store = store_via(s3_fault_proxy, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
        big = os.urandom(16 * MiB + 123)
        source = write_tree(tmp_path / "src", {"model.safetensors": big, "config.json": b"{}"})

        store.upload_dir(source, f"{s3_bucket.uri}/big/")

        etag = s3_bucket.client().head_object(Bucket=s3_bucket.name, Key="big/model.safetensors")["ETag"]
        assert etag.strip('"').endswith("-4"), etag  # 16 MiB + 123 bytes in 5 MiB parts
        assert sum(r.is_upload_part for r in s3_fault_proxy.requests) == 4

        s3_fault_proxy.requests.clear()
        store.download_prefix(f"{s3_bucket.uri}/big", tmp_path / "dst")

        assert hashlib.sha256((tmp_path / "dst" / "model.safetensors").read_bytes()).digest() == (
            hashlib.sha256(big).digest()
        )
        ranged = [r for r in s3_fault_proxy.requests if r.is_ranged_get and "model.safetensors" in r.path]
        assert len(ranged) == 4


def puts(request: ProxiedRequest) -> bool:
    return request.method == "PUT"


def gets(request: ProxiedRequest) -> bool:
    return request.method == "GET" and "list-type" not in request.query


class TestRetries:
    @pytest.mark.parametrize("fault", ["slowdown", "internal-error", "reset"])
    def test_our_backoff_outlasts_transient_faults_botocore_does_not_retry(
        self, fault: Fault, s3_bucket: S3Bucket, s3_fault_proxy: FaultProxy, tmp_path: Path
    ) -> None:
        # max_attempts=1 switches botocore's retries off, so only kubetune's backoff can recover.
        store = store_via(s3_fault_proxy, max_attempts=1, backoff_attempts=4)
        source = write_tree(tmp_path / "src", {"a.bin": b"a" * 1000, "b/c.bin": b"c" * 10})
        s3_fault_proxy.inject(fault, times=2, when=puts)
        s3_fault_proxy.inject(fault, times=2, when=gets)

        store.upload_dir(source, f"{s3_bucket.uri}/model")
        store.download_prefix(f"{s3_bucket.uri}/model", tmp_path / "dst")

        assert read_tree(tmp_path / "dst") == read_tree(source)
        assert len(s3_fault_proxy.faults_served()) == 4

    def test_botocore_retries_throttling_within_a_single_call(
        self, s3_bucket: S3Bucket, s3_fault_proxy: FaultProxy
    ) -> None:
        store = store_via(s3_fault_proxy, max_attempts=4, backoff_attempts=1)
        s3_fault_proxy.inject("slowdown", times=2, when=puts)

        store.write_bytes(f"{s3_bucket.uri}/x.json", b"{}")

        assert store.read_bytes(f"{s3_bucket.uri}/x.json") == b"{}"
        assert len(s3_fault_proxy.faults_served()) == 2

    def test_multipart_upload_survives_resets_of_individual_parts(
        self, s3_bucket: S3Bucket, s3_fault_proxy: FaultProxy, tmp_path: Path
    ) -> None:
        store = store_via(s3_fault_proxy, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
        data = os.urandom(11 * MiB)
        s3_fault_proxy.inject("reset", times=2, when=lambda r: r.is_upload_part)

        store.upload_file(write_tree(tmp_path, {"w.bin": data}) / "w.bin", f"{s3_bucket.uri}/w.bin")

        assert store.read_bytes(f"{s3_bucket.uri}/w.bin") == data
        assert len(s3_fault_proxy.faults_served()) == 2

    def test_exhausted_retries_raise_retriable_error_naming_the_uri(
        self, s3_bucket: S3Bucket, s3_fault_proxy: FaultProxy, tmp_path: Path
    ) -> None:
        store = store_via(s3_fault_proxy, max_attempts=2, backoff_attempts=2)
        s3_bucket.client().put_object(Bucket=s3_bucket.name, Key="model/w.bin", Body=b"w")
        s3_fault_proxy.inject("slowdown", times=None, when=gets)

        with pytest.raises(
            RetriableError, match=rf"downloading {s3_bucket.uri}/model/w\.bin failed after 2"
        ) as err:
            store.download_prefix(f"{s3_bucket.uri}/model", tmp_path / "dst")

        assert err.value.exit_code not in (EXIT_INVALID_INPUT, EXIT_STORAGE)
        assert "SlowDown" in str(err.value)
        assert len(s3_fault_proxy.faults_served()) >= 2 * 2  # botocore's attempts within each of ours
        assert not list((tmp_path / "dst").rglob("*.bin*")), "no partial files are left behind"

    def test_exhausted_retries_on_small_calls_raise_retriable_error(
        self, s3_bucket: S3Bucket, s3_fault_proxy: FaultProxy
    ) -> None:
        store = store_via(s3_fault_proxy, max_attempts=1, backoff_attempts=2)
        s3_fault_proxy.inject("internal-error", times=None)

        with pytest.raises(RetriableError, match=rf"listing {s3_bucket.uri}/run/ failed after 2 attempts"):
            store.list(f"{s3_bucket.uri}/run")


class TestPermanentErrors:
    @pytest.mark.parametrize(
        "action",
        [
            pytest.param(lambda s, u, d: s.download_prefix(f"{u}/model", d), id="download_prefix"),
            pytest.param(
                lambda s, u, d: s.download_file(f"{u}/model/config.json", d / "c"), id="download_file"
            ),
            pytest.param(lambda s, u, d: s.read_bytes(f"{u}/model/config.json"), id="read_bytes"),
            pytest.param(lambda s, u, d: s.write_bytes(f"{u}/model/config.json", b""), id="write_bytes"),
            pytest.param(lambda s, u, d: s.list(f"{u}/model"), id="list"),
            pytest.param(lambda s, u, d: s.exists(f"{u}/model/config.json"), id="exists"),
        ],
    )
    def test_a_missing_bucket_is_a_storage_error_naming_the_uri(
        self, action: Callable[[ObjectStore, str, Path], object], s3_bucket: S3Bucket, tmp_path: Path
    ) -> None:
        store = open_store(s3_bucket.uri)
        missing = "s3://kubetune-no-such-bucket"

        with pytest.raises(
            StorageAccessError, match="bucket 'kubetune-no-such-bucket' does not exist"
        ) as err:
            action(store, missing, tmp_path)

        assert err.value.exit_code == EXIT_STORAGE == 3
        assert f"{missing}/model" in str(err.value)

    def test_a_missing_object_is_a_storage_error_naming_the_uri(
        self, s3_bucket: S3Bucket, tmp_path: Path
    ) -> None:
        store = open_store(s3_bucket.uri)
        uri = f"{s3_bucket.uri}/model/config.json"

        with pytest.raises(StorageAccessError, match=f"{uri}: no such object"):
            store.read_bytes(uri)
        with pytest.raises(StorageAccessError, match=f"{uri}: no such object"):
            store.download_file(uri, tmp_path / "c.json")

    def test_an_empty_prefix_is_missing_when_downloading(self, s3_bucket: S3Bucket, tmp_path: Path) -> None:
        with pytest.raises(
            StorageAccessError, match=f"{s3_bucket.uri}/base-model/: no objects under this prefix"
        ):
            open_store(s3_bucket.uri).download_prefix(f"{s3_bucket.uri}/base-model", tmp_path)

    def test_access_denied_is_a_storage_error_and_is_not_retried(
        self, s3_bucket: S3Bucket, s3_fault_proxy: FaultProxy, tmp_path: Path
    ) -> None:
        store = store_via(s3_fault_proxy)
        s3_fault_proxy.inject("access-denied", times=None, when=puts)
        source = write_tree(tmp_path, {"w.bin": b"w"})

        with pytest.raises(
            StorageAccessError, match=rf"{s3_bucket.uri}/out/w\.bin: access denied \(AccessDenied"
        ):
            store.upload_dir(source, f"{s3_bucket.uri}/out")

        assert len(s3_fault_proxy.faults_served()) == 1

    def test_missing_files_and_directories_on_file_stores(self, tmp_path: Path) -> None:
        store = FileStore()
        with pytest.raises(StorageAccessError, match="no such file or directory") as err:
            store.read_bytes(f"file://{tmp_path}/nope.json")
        assert err.value.exit_code == 3
        with pytest.raises(StorageAccessError, match="no files under this directory"):
            store.download_prefix(f"file://{tmp_path}/nope", tmp_path / "dst")

    def test_a_store_rejects_uris_of_other_schemes(self, tmp_path: Path) -> None:
        with pytest.raises(InvalidInputError, match="expected an s3:// URI"):
            S3Store(StorageConfig()).read_bytes(f"file://{tmp_path}/x")


class TestFileStoreAtomicity:
    def test_readers_never_see_a_torn_file(self, tmp_path: Path) -> None:
        store = FileStore()
        uri = f"file://{tmp_path}/run/metrics.json"
        versions = [bytes([i]) * (2 * MiB) for i in range(8)]
        store.write_bytes(uri, versions[0])
        torn: list[int] = []
        done = threading.Event()

        def read_repeatedly() -> None:
            while not done.is_set():
                data = store.read_bytes(uri)
                if data not in versions:
                    torn.append(len(data))

        reader = threading.Thread(target=read_repeatedly)
        reader.start()
        for version in versions[1:] * 3:
            store.write_bytes(uri, version)
        done.set()
        reader.join()

        assert torn == []
        assert [p.name for p in (tmp_path / "run").iterdir()] == ["metrics.json"], "no temporary files remain"


class TestHub:
    def test_hf_uris_are_read_only(self, tmp_path: Path) -> None:
        store = open_store("hf://kubetune/tiny-model")
        assert isinstance(store, HubStore)

        with pytest.raises(
            InvalidInputError, match=r"hf://kubetune/tiny-model/out: hf:// URIs are read-only"
        ) as err:
            store.upload_dir(tmp_path, "hf://kubetune/tiny-model/out")
        assert err.value.exit_code == 2
        with pytest.raises(InvalidInputError, match="read-only"):
            store.write_bytes("hf://kubetune/tiny-model/x.json", b"{}")
        with pytest.raises(InvalidInputError, match="read-only"):
            store.upload_file(tmp_path, "hf://kubetune/tiny-model/x.json")
        with pytest.raises(InvalidInputError, match="read-only"):
            store.delete_prefix("hf://kubetune/tiny-model/sub")

    def test_reads_a_repository_from_a_prepopulated_cache_offline(self, tmp_path: Path) -> None:
        cache = tmp_path / "hub-cache"
        files = {"config.json": b'{"a": 1}', "onnx/model.onnx": b"onnx", "onnx/extra/x.bin": b"x"}
        populate_hub_cache(cache, "kubetune/tiny-model", files)
        store = HubStore(cache_dir=cache, local_files_only=True)

        paths = store.download_prefix("hf://kubetune/tiny-model/onnx", tmp_path / "onnx")

        assert read_tree(tmp_path / "onnx") == {"model.onnx": b"onnx", "extra/x.bin": b"x"}
        assert paths == [tmp_path / "onnx" / "extra/x.bin", tmp_path / "onnx" / "model.onnx"]
        assert store.read_bytes("hf://kubetune/tiny-model/config.json") == b'{"a": 1}'
        assert store.exists("hf://kubetune/tiny-model/config.json")
        assert not store.exists("hf://kubetune/tiny-model/missing.json")
        assert [i.key for i in store.list("hf://kubetune/tiny-model")] == sorted(files)
        with pytest.raises(StorageAccessError, match=r"hf://kubetune/other-model: .*offline"):
            store.download_prefix("hf://kubetune/other-model", tmp_path / "other")


def populate_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """Lay files out as huggingface_hub's cache does: blobs by hash, a snapshot of symlinks, a ref."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for rel, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


class TestExclusiveCreateAndKeyDeletes:
    """What output claims (kubetune.ownership) rely on, on every writable backend."""

    def test_an_exclusive_create_wins_once_even_when_racing(
        self, store_and_root: tuple[ObjectStore, str]
    ) -> None:
        store, root = store_and_root
        uri = f"{root}/run/_OWNER.json"
        start = threading.Barrier(6)
        won: list[int] = []

        def create(i: int) -> None:
            start.wait()
            if store.create_exclusive(uri, f"claim {i}".encode()):
                won.append(i)

        threads = [threading.Thread(target=create, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert len(won) == 1
        assert store.read_bytes(uri) == f"claim {won[0]}".encode()
        assert not store.create_exclusive(uri, b"later")
        assert [info.key for info in store.list(f"{root}/run")] == ["_OWNER.json"], "no temporaries left"

    def test_deleting_keys_removes_exactly_those(self, store_and_root: tuple[ObjectStore, str]) -> None:
        store, root = store_and_root
        for key in ("a.bin", "b.bin", "sub/c.bin", "sub/d.bin"):
            store.write_bytes(f"{root}/model/{key}", b"x")
        store.delete_keys(f"{root}/model", ["a.bin", "sub/c.bin", "never-there.bin"])
        assert [info.key for info in store.list(f"{root}/model")] == ["b.bin", "sub/d.bin"]
