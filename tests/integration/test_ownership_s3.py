"""Output claims on a real S3 API (moto's server): the conditional PutObject (``If-None-Match: *``)
lets exactly one of several jobs racing for one prefix win, and deletes touch only listed keys."""

from __future__ import annotations

import threading

import pytest

from kubetune.ownership import OWNER_FILE, OutputConflictError, Owner, claim_output, holds_claim
from kubetune.storage import S3Store
from tests.s3server import S3Bucket

pytestmark = pytest.mark.integration


def test_an_exclusive_create_succeeds_once_and_keeps_the_first_content(s3_bucket: S3Bucket) -> None:
    store = S3Store()
    uri = f"{s3_bucket.uri}/run/{OWNER_FILE}"
    assert store.create_exclusive(uri, b"first")
    assert not store.create_exclusive(uri, b"second")
    assert store.read_bytes(uri) == b"first"


def test_of_jobs_claiming_one_s3_prefix_together_exactly_one_wins(s3_bucket: S3Bucket) -> None:
    output = f"{s3_bucket.uri}/shared/run"
    owners = [
        Owner(kind="FineTuneJob", namespace="default", name=f"job{i}", uid=f"uid-{i}") for i in range(6)
    ]
    start = threading.Barrier(len(owners))
    won: list[Owner] = []
    refused: list[Owner] = []

    def claim(owner: Owner) -> None:
        store = S3Store()
        start.wait()
        try:
            claim_output(store, output, owner)
            won.append(owner)
        except OutputConflictError:
            refused.append(owner)

    threads = [threading.Thread(target=claim, args=(owner,)) for owner in owners]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(won) == 1
    assert len(refused) == len(owners) - 1
    assert holds_claim(S3Store(), output, won[0])
    assert not claim_output(S3Store(), output, won[0]), "the winner's restart finds its own claim"


def test_a_claim_inside_or_around_a_claimed_s3_prefix_is_refused(s3_bucket: S3Bucket) -> None:
    store = S3Store()
    a = Owner(kind="FineTuneJob", namespace="default", name="a", uid="uid-a")
    b = Owner(kind="CompressJob", namespace="default", name="b", uid="uid-b")
    claim_output(store, f"{s3_bucket.uri}/team/run", a)
    with pytest.raises(OutputConflictError, match="lies inside"):
        claim_output(store, f"{s3_bucket.uri}/team/run/compressed", b)
    with pytest.raises(OutputConflictError, match="contains"):
        claim_output(store, f"{s3_bucket.uri}/team", b)
    claim_output(store, f"{s3_bucket.uri}/team/run-2", b)  # a sibling, not an overlap
    keys = sorted(o.key for o in store.list(s3_bucket.uri + "/team"))
    assert keys == [f"run-2/{OWNER_FILE}", f"run/{OWNER_FILE}"]


def test_deleting_keys_touches_only_those_keys(s3_bucket: S3Bucket) -> None:
    store = S3Store()
    for key in ("model/a", "model/b", "model/sub/c"):
        store.write_bytes(f"{s3_bucket.uri}/{key}", b"x")
    store.delete_keys(f"{s3_bucket.uri}/model", ["a", "sub/c", "missing"])
    assert [o.key for o in store.list(f"{s3_bucket.uri}/model")] == ["b"]
