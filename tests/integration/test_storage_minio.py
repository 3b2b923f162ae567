"""The S3 storage tests of test_storage.py again, against MinIO (built from source) instead of moto,
plus the S3 semantics other parts of kubetune rely on, checked on both servers.

The moto tests are reused, not copied: each ``Test*OnMinio`` class inherits one of test_storage.py's
S3 test classes and only swaps the fixtures it gets (bucket, fault proxy, store), so a test added
there runs here too. MinIO verifies every request's signature against credentials of its own, so
these runs also show that kubetune signs what it sends (through the fault proxy too) correctly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from botocore.exceptions import ClientError

from kubetune.storage import ObjectStore, open_store
from kubetune.storage.config import MiB
from tests.integration import test_storage as moto_tests
from tests.minio import MinioBucket, MinioServer
from tests.s3server import FaultProxy, S3Bucket

pytestmark = pytest.mark.integration


class OnMinio:
    """Fixture overrides: the S3 tests of a base class get a MinIO bucket, store and proxy."""

    @pytest.fixture
    def s3_bucket(self, minio_bucket: MinioBucket) -> S3Bucket:
        return minio_bucket

    @pytest.fixture
    def s3_fault_proxy(self, minio_server: MinioServer) -> Iterator[FaultProxy]:
        proxy = FaultProxy(upstream=minio_server.endpoint).start()
        try:
            yield proxy
        finally:
            proxy.stop()

    @pytest.fixture
    def store_and_root(self, minio_bucket: MinioBucket) -> tuple[ObjectStore, str]:
        return open_store(minio_bucket.uri), minio_bucket.uri


class TestRoundTripsOnMinio(OnMinio, moto_tests.TestRoundTrips):
    pass


class TestMultipartOnMinio(OnMinio, moto_tests.TestMultipart):
    pass


class TestRetriesOnMinio(OnMinio, moto_tests.TestRetries):
    pass


class TestPermanentErrorsOnMinio(OnMinio, moto_tests.TestPermanentErrors):
    pass


@pytest.fixture(params=["moto", "minio"])
def bucket(request: pytest.FixtureRequest) -> S3Bucket:
    """A fresh bucket on each S3 server of the test suite."""
    fixture = {"moto": "s3_bucket", "minio": "minio_bucket"}[request.param]
    found: S3Bucket = request.getfixturevalue(fixture)
    return found


def error_status(exc: pytest.ExceptionInfo[ClientError]) -> int:
    return int(exc.value.response["ResponseMetadata"]["HTTPStatusCode"])


class TestSemanticsOnBothServers:
    def test_a_conditional_put_if_none_match_creates_once_then_412(self, bucket: S3Bucket) -> None:
        """Output claims rely on this: of two writers of the same key, exactly one wins."""
        client = bucket.client()

        client.put_object(Bucket=bucket.name, Key="run/_CLAIM.json", Body=b'{"uid": "a"}', IfNoneMatch="*")
        with pytest.raises(ClientError) as second:
            client.put_object(
                Bucket=bucket.name, Key="run/_CLAIM.json", Body=b'{"uid": "b"}', IfNoneMatch="*"
            )

        assert error_status(second) == 412
        assert second.value.response["Error"]["Code"] == "PreconditionFailed"
        assert client.get_object(Bucket=bucket.name, Key="run/_CLAIM.json")["Body"].read() == b'{"uid": "a"}'

    def test_a_conditional_put_after_a_delete_creates_again(self, bucket: S3Bucket) -> None:
        client = bucket.client()
        client.put_object(Bucket=bucket.name, Key="claim", Body=b"a", IfNoneMatch="*")
        client.delete_object(Bucket=bucket.name, Key="claim")

        client.put_object(Bucket=bucket.name, Key="claim", Body=b"b", IfNoneMatch="*")

        assert client.get_object(Bucket=bucket.name, Key="claim")["Body"].read() == b"b"

    def test_ranged_reads_return_exactly_the_bytes_asked_for(self, bucket: S3Bucket) -> None:
        client = bucket.client()
        data = os.urandom(3 * MiB + 17)
        client.put_object(Bucket=bucket.name, Key="w.bin", Body=data)

        for first, last in [(0, 0), (5, 1000), (MiB, 2 * MiB - 1), (len(data) - 17, len(data) - 1)]:
            part = client.get_object(Bucket=bucket.name, Key="w.bin", Range=f"bytes={first}-{last}")
            assert part["ContentRange"] == f"bytes {first}-{last}/{len(data)}"
            assert part["Body"].read() == data[first : last + 1]
        tail = client.get_object(Bucket=bucket.name, Key="w.bin", Range="bytes=-17")
        assert tail["Body"].read() == data[-17:]
        with pytest.raises(ClientError) as beyond:
            client.get_object(Bucket=bucket.name, Key="w.bin", Range=f"bytes={len(data)}-")
        assert error_status(beyond) == 416

    def test_a_multipart_upload_completes_from_its_parts(self, bucket: S3Bucket) -> None:
        client = bucket.client()
        parts = [os.urandom(5 * MiB), os.urandom(5 * MiB), os.urandom(123)]
        upload = client.create_multipart_upload(Bucket=bucket.name, Key="big.bin")["UploadId"]
        etags = [
            client.upload_part(
                Bucket=bucket.name, Key="big.bin", UploadId=upload, PartNumber=number, Body=body
            )["ETag"]
            for number, body in enumerate(parts, start=1)
        ]

        client.complete_multipart_upload(
            Bucket=bucket.name,
            Key="big.bin",
            UploadId=upload,
            MultipartUpload={"Parts": [{"ETag": e, "PartNumber": n} for n, e in enumerate(etags, start=1)]},
        )

        head = client.head_object(Bucket=bucket.name, Key="big.bin")
        assert head["ContentLength"] == sum(map(len, parts))
        assert head["ETag"].strip('"').endswith("-3")
        assert client.get_object(Bucket=bucket.name, Key="big.bin")["Body"].read() == b"".join(parts)
