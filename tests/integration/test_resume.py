"""Killing a training gang and starting it again, as the operator does after a retriable failure.

The processes reach S3 through the fault-injecting proxy of ``tests/s3server.py``, which sees every
request and lets the test SIGKILL the gang at an exact point of the checkpoint protocol: in the
middle of a checkpoint upload, or right after a commit (between checkpoints).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kubetune.storage import open_store
from tests.integration.test_finetune_support import (
    PINNED_LOSS_CURVE,
    Gang,
    launch,
    logged_losses,
    run_finetune,
    tiny_causal_lm,
    wait_for,
    write_plan,
)
from tests.s3server import FaultProxy, ProxiedRequest, S3Bucket, s3_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class KillSwitch:
    """SIGKILLs the gang from inside the proxy when a request matches, before it is forwarded."""

    def __init__(self, proxy: FaultProxy, matches: Callable[[ProxiedRequest], bool]) -> None:
        self.gang: Gang | None = None
        self.request: ProxiedRequest | None = None
        self.fired = threading.Event()
        self.matches = matches
        # The "fault" is never served: the hook only watches (it answers False).
        proxy.inject("internal-error", None, when=self._watch)

    def _watch(self, request: ProxiedRequest) -> bool:
        if self.gang is not None and not self.fired.is_set() and self.matches(request):
            self.gang.signal()
            self.request = request
            self.fired.set()
        return False


def nth_put_under(fragment: str, n: int) -> Callable[[ProxiedRequest], bool]:
    seen = 0

    def matches(request: ProxiedRequest) -> bool:
        nonlocal seen
        if request.method == "PUT" and fragment in request.path:
            seen += 1
        return seen >= n

    return matches


def first_put_after(trigger: str, fragment: str) -> Callable[[ProxiedRequest], bool]:
    triggered = False

    def matches(request: ProxiedRequest) -> bool:
        nonlocal triggered
        if request.method != "PUT":
            return False
        if trigger in request.path:
            triggered = True
            return False
        return triggered and fragment in request.path

    return matches


def attempt_until_killed(plan: Path, tmp: Path, proxy: FaultProxy, switch: KillSwitch, tag: str) -> Gang:
    gang = launch(plan, tmp, env=s3_env(proxy.endpoint), tag=tag)
    switch.gang = gang
    wait_for(switch.fired.is_set, timeout=300, what=f"the kill point of {tag}", gang=gang)
    gang.kill()
    proxy.clear_faults()
    return gang


def test_killed_gangs_resume_from_the_newest_committed_checkpoint_and_never_a_torn_one(
    tmp_path: Path, s3_bucket: S3Bucket, s3_fault_proxy: FaultProxy
) -> None:
    base, data = tiny_causal_lm(tmp_path)
    store = open_store(s3_bucket.uri)
    store.upload_dir(base, f"{s3_bucket.uri}/base")
    store.upload_file(data, f"{s3_bucket.uri}/data/train.jsonl")
    output = f"{s3_bucket.uri}/run"
    checkpoints = f"{output}/checkpoints"
    plan = write_plan(
        tmp_path / "plan.json",
        model_uri=f"{s3_bucket.uri}/base",
        train_uri=f"{s3_bucket.uri}/data/train.jsonl",
        output_uri=output,
        checkpoint={"everySteps": 4, "keepLast": 2},
    )

    def read(uri: str) -> Any:
        return json.loads(store.read_bytes(uri))

    def steps_with(name: str) -> set[int]:
        return {
            int(i.key.split("/")[0].removeprefix("step-"))
            for i in store.list(checkpoints)
            if i.key.endswith(name)
        }

    # 1. Killed in the middle of uploading step 8, after step 4 was committed.
    switch = KillSwitch(s3_fault_proxy, nth_put_under("/checkpoints/step-8/", 3))
    attempt_until_killed(plan, tmp_path, s3_fault_proxy, switch, "attempt1")
    wait_for(lambda: len(store.list(f"{checkpoints}/step-8")) >= 2, 30, "the uploads let through to land")
    assert steps_with("_COMMITTED.json") == {4}
    assert store.list(f"{checkpoints}/step-8"), "step 8 is torn: some files, no marker"

    # 2. Resumes from step 4 (never the torn step 8); killed right after committing step 8 again.
    switch = KillSwitch(s3_fault_proxy, first_put_after("/checkpoints/step-8/_COMMITTED.json", "/logs/"))
    second = attempt_until_killed(plan, tmp_path, s3_fault_proxy, switch, "attempt2")
    log = second.output(tail=10**7)
    assert "ignoring checkpoint s3://" in log
    assert "step-8: no commit marker (torn upload)" in log
    assert f"resuming from committed checkpoint {checkpoints}/step-4 (step 4)" in log
    assert read(f"{output}/run.json")["resumed_from"] == {"step": 4, "uri": f"{checkpoints}/step-4"}
    assert steps_with("_COMMITTED.json") == {4, 8}
    marker = read(f"{checkpoints}/step-8/_COMMITTED.json")
    stored = {i.key: i.size for i in store.list(f"{checkpoints}/step-8") if not i.key.startswith("_")}
    assert stored == {f["path"]: f["size"] for f in marker["files"]}, "no leftovers of the torn upload"

    # 3. Resumes from step 8 and finishes with the right number of steps and the same loss curve
    #    as a run that was never interrupted: optimizer, scheduler, RNG and data position resumed.
    final = run_finetune(plan, tmp_path, env=s3_env(s3_fault_proxy.endpoint), tag="attempt3")
    assert f"resuming from committed checkpoint {checkpoints}/step-8 (step 8)" in final.output(tail=10**7)
    record = read(f"{output}/run.json")
    assert record["status"] == "succeeded"
    assert record["resumed_from"] == {"step": 8, "uri": f"{checkpoints}/step-8"}
    assert record["global_step"] == record["total_steps"] == 16
    assert record["checkpoints_committed"] == [12, 16]
    state = read(f"{checkpoints}/step-16/trainer_state.json")
    assert state["global_step"] == 16
    assert logged_losses(state) == pytest.approx(PINNED_LOSS_CURVE, rel=2e-3)
    assert steps_with("_COMMITTED.json") == {12, 16}
    assert {i.key.split("/")[0] for i in store.list(checkpoints)} == {"step-12", "step-16"}
