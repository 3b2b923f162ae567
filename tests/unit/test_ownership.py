"""Output ownership (issue 12): one job per output prefix, claimed before anything is written,
and deletes only of what the claiming job wrote. Against ``file://`` stores; the S3 conditional
put is covered in tests/integration/test_ownership_s3.py."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from kubetune.errors import EXIT_INVALID_INPUT
from kubetune.operator.lifecycle import JobState, Termination
from kubetune.operator.policies.failure import failure_reason
from kubetune.ownership import (
    OWNER_FILE,
    OutputConflictError,
    Owner,
    ancestors,
    claim_output,
    overlap,
    republish,
)
from kubetune.run.plan import RunPlan, plan_finetune
from kubetune.storage import FileStore
from kubetune.trainer.checkpoint import (
    CheckpointPublisher,
    CommitRecord,
    FileRecord,
    job_identity,
    prepare_resume,
    prune,
    scan_checkpoints,
)
from kubetune.trainer.outputs import guard_output, output_owner
from kubetune.trainer.training import Distributed

pytestmark = pytest.mark.unit

STORE = FileStore()
ONE_PROCESS = Distributed(
    rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0, accelerator="cpu"
)


def make_plan(
    output: str,
    *,
    uid: str = "uid-a",
    name: str = "a",
    model: str = "file:///models/base",
    train: str = "file:///data/train.jsonl",
    lora: bool = False,
    spec_extra: dict[str, Any] | None = None,
) -> RunPlan:
    from kubetune.api.resources import FineTuneJob

    spec: dict[str, Any] = {
        "model": {"uri": model},
        "dataset": {"train": {"uri": train}},
        "hyperparameters": {"maxSteps": 10, "perDeviceBatchSize": 4},
        "output": {"uri": output},
    }
    if lora:
        spec["method"] = {"type": "lora"}
    spec.update(spec_extra or {})
    job = FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": "default", "uid": uid},
            "spec": spec,
        }
    )
    return plan_finetune(job)


def checkpoint_dir(root: Path, step: int) -> Path:
    local = root / f"checkpoint-{step}"
    local.mkdir(parents=True)
    (local / "model.safetensors").write_bytes(b"weights")
    return local


def write_committed(output: Path, step: int, job: dict[str, str | None]) -> Path:
    """A committed checkpoint as another job's publisher would have left it."""
    stored = output / "checkpoints" / f"step-{step}"
    stored.mkdir(parents=True)
    (stored / "model.safetensors").write_bytes(b"theirs")
    record = CommitRecord(step, 1, (FileRecord("model.safetensors", 6, "x"),), job, "2026-01-01T00:00:00")
    (stored / "_COMMITTED.json").write_bytes(record.to_json())
    return stored


# --- prefixes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "other", "relation"),
    [
        ("s3://b/run", "s3://b/run/", "equal"),
        ("s3://b/run/a", "s3://b/run", "inside"),
        ("s3://b/run", "s3://b/run/a/b", "contains"),
        ("s3://b/run", "s3://b/run-2", None),
        ("s3://b/run-2", "s3://b/run", None),
        ("s3://b/run", "s3://c/run", None),
        ("file:///data/out", "file:///data", "inside"),
    ],
)
def test_prefixes_overlap_when_equal_inside_or_containing(
    output: str, other: str, relation: str | None
) -> None:
    assert overlap(output, other) == relation


def test_the_ancestors_of_a_prefix_stop_at_the_bucket_and_never_name_the_root() -> None:
    assert ancestors("s3://b/x/y/") == ["s3://b/x", "s3://b"]
    assert ancestors("file:///a/b") == ["file:///a"]


# --- the defects of issue 12 -----------------------------------------------------------------------


def test_a_second_job_started_before_the_first_wrote_anything_is_refused(tmp_path: Path) -> None:
    output = (tmp_path / "out").as_uri()
    first, second = make_plan(output), make_plan(output, uid="uid-b", name="b")

    assert guard_output(STORE, first) is None  # no run record yet: the old guard let the next one in
    with pytest.raises(OutputConflictError, match=r"claimed by FineTuneJob default/a \(uid uid-a\)") as err:
        guard_output(STORE, second)
    assert err.value.exit_code == EXIT_INVALID_INPUT
    assert err.value.reason == "OutputConflict"
    assert guard_output(STORE, first) is None, "the same job's restart keeps its claim"


def test_two_jobs_claiming_one_prefix_at_the_same_moment_one_wins(tmp_path: Path) -> None:
    output = (tmp_path / "out").as_uri()
    plans = [make_plan(output, uid=f"uid-{i}", name=f"job{i}") for i in range(8)]
    start = threading.Barrier(len(plans))
    outcomes: dict[str, str] = {}

    def claim(plan: RunPlan) -> None:
        start.wait()
        try:
            guard_output(STORE, plan)
            outcomes[plan.job.name] = "claimed"
        except OutputConflictError:
            outcomes[plan.job.name] = "refused"

    threads = [threading.Thread(target=claim, args=(plan,)) for plan in plans]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    winners = [name for name, outcome in outcomes.items() if outcome == "claimed"]
    assert len(winners) == 1
    holder = Owner.from_json((tmp_path / "out" / OWNER_FILE).read_bytes())
    assert holder.name == winners[0]


@pytest.mark.parametrize("other", ["out/inner", "."], ids=["inside", "containing"])
def test_overlapping_prefixes_of_two_jobs_are_refused(tmp_path: Path, other: str) -> None:
    first = make_plan((tmp_path / "out").as_uri())
    guard_output(STORE, first)
    second = make_plan((tmp_path / other).resolve().as_uri(), uid="uid-b", name="b")
    with pytest.raises(OutputConflictError, match="two jobs never share an output prefix"):
        guard_output(STORE, second)
    assert [p.name for p in tmp_path.rglob(OWNER_FILE)] == [OWNER_FILE], "the refused claim is taken back"


def test_pruning_never_deletes_another_jobs_committed_checkpoints(tmp_path: Path) -> None:
    output = tmp_path / "out"
    plan = make_plan(output.as_uri())
    guard_output(STORE, plan)
    foreign = write_committed(output, 1, {"namespace": "default", "name": "b", "uid": "uid-b"})
    publisher = CheckpointPublisher(STORE, plan, ONE_PROCESS, keep_last=1)
    for step in (2, 3, 4):
        publisher.publish(step, checkpoint_dir(tmp_path / "local", step))

    assert foreign.is_dir(), "committed by job b: not ours to prune"
    assert sorted(c.step for c in scan_checkpoints(STORE, plan)) == [1, 4]
    assert prune(STORE, scan_checkpoints(STORE, plan), 0, plan=make_plan(output.as_uri(), uid="uid-b")) == []


def test_a_lora_job_never_removes_a_foreign_adapter(tmp_path: Path) -> None:
    output = tmp_path / "out"
    (output / "adapter").mkdir(parents=True)
    (output / "adapter" / "adapter_model.safetensors").write_bytes(b"someone else's adapter")
    plan = make_plan(output.as_uri(), lora=True)

    with pytest.raises(
        OutputConflictError, match=r"adapter/adapter_model.safetensors\) that no kubetune run"
    ):
        guard_output(STORE, plan)
    assert (output / "adapter" / "adapter_model.safetensors").read_bytes() == b"someone else's adapter"


def test_a_foreign_step_is_not_deleted_as_torn(tmp_path: Path) -> None:
    output = tmp_path / "out"
    ours = make_plan(output.as_uri())
    guard_output(STORE, ours)
    uploading = output / "checkpoints" / "step-8"
    uploading.mkdir(parents=True)
    (uploading / "model.safetensors").write_bytes(b"job a is uploading this")
    # What two jobs started together used to leave: job b's run record over job a's prefix.
    theirs = make_plan(output.as_uri(), uid="uid-b", name="b")
    (output / "run.json").write_text(json.dumps({"job": job_identity(theirs.job), "status": "running"}))

    with pytest.raises(OutputConflictError):
        guard_output(STORE, theirs)
    assert prepare_resume(STORE, theirs, ONE_PROCESS, tmp_path / "b", owned=True) is None
    assert (uploading / "model.safetensors").is_file(), "job b does not hold the claim: it deletes nothing"


@pytest.mark.parametrize(
    ("output", "field"),
    [
        ("file:///data/run", "dataset.train.uri"),
        ("file:///data", "dataset.train.uri"),
        ("file:///models/base/tuned", "model.uri"),
    ],
)
def test_an_output_inside_the_jobs_own_inputs_is_refused(tmp_path: Path, output: str, field: str) -> None:
    plan = make_plan(output, train="file:///data", model="file:///models/base")
    with pytest.raises(OutputConflictError, match=rf"{field} .*would read its own outputs"):
        guard_output(STORE, plan)


def test_an_output_inside_the_dpo_reference_model_is_refused() -> None:
    reference = {"type": "full", "objective": "dpo", "dpo": {"referenceModel": {"uri": "file:///models/sft"}}}
    plan = make_plan(
        "file:///models/sft/aligned",
        spec_extra={
            "method": reference,
            "dataset": {"train": {"uri": "file:///data/pairs.jsonl"}, "format": "preference"},
        },
    )
    with pytest.raises(
        OutputConflictError, match=r"lies inside method\.dpo\.referenceModel\.uri file:///models/sft"
    ):
        guard_output(STORE, plan)


def test_republishing_uploads_first_and_then_removes_only_stale_files(tmp_path: Path) -> None:
    output = tmp_path / "out"
    plan = make_plan(output.as_uri())
    guard_output(STORE, plan)
    model = output / "model"
    model.mkdir()
    (model / "model-00001-of-00002.safetensors").write_bytes(b"old 1")
    (model / "model-00002-of-00002.safetensors").write_bytes(b"old 2")
    (model / "config.json").write_text("old")
    new = tmp_path / "new"
    new.mkdir()
    (new / "model.safetensors").write_bytes(b"new")
    (new / "config.json").write_text("new")

    stale = republish(STORE, output_owner(plan), plan.output_uri, new, plan.output("model"))

    assert stale == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]
    assert (model / "config.json").read_text() == "new"
    other = Owner(kind="FineTuneJob", namespace="default", name="b", uid="uid-b")
    (new / "extra.bin").unlink(missing_ok=True)
    (model / "stray.bin").write_bytes(b"x")
    with pytest.raises(OutputConflictError, match="refusing to delete"):
        republish(STORE, other, plan.output_uri, new, plan.output("model"))


def test_a_claim_needs_a_real_owner_file(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / OWNER_FILE).write_text("garbage")
    owner = Owner(kind="FineTuneJob", namespace="default", name="a", uid="uid-a")
    with pytest.raises(OutputConflictError, match="is not a kubetune ownership claim"):
        claim_output(STORE, (tmp_path / "out").as_uri(), owner)


def test_the_operator_names_an_output_conflict_in_the_condition_reason() -> None:
    state = JobState(name="j", component="train", attempt=0, suspended=False, failed=True)
    conflict = Termination(
        "p", "c", EXIT_INVALID_INPUT, "Error", "OutputConflict: s3://b/x is claimed by ..."
    )
    other = Termination("p", "c", EXIT_INVALID_INPUT, "Error", "InvalidInput: bad data")
    assert failure_reason(conflict, state) == "OutputConflict"
    assert failure_reason(other, state) == "InvalidInput"


def test_validation_refuses_an_output_inside_the_dataset_before_reading_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubetune.trainer.validate import main

    plan = make_plan((tmp_path / "data" / "run").as_uri(), train=(tmp_path / "data").as_uri())
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(plan.to_json())
    termination = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(termination))

    assert main(["--plan", str(plan_path), "--scratch-dir", str(tmp_path / "scratch")]) == EXIT_INVALID_INPUT
    assert termination.read_text().startswith("OutputConflict: output.uri ")
    assert "lies inside dataset.train.uri" in termination.read_text()
