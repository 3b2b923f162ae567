"""Each runtime process's output is kept under ``<output>/logs/attempt-<N>/`` when it ends, also
when it fails: real ``python -m kubetune.trainer`` processes against a ``file://`` store, their
stdout still printed, the kept copy bounded to its newest part and free of credential values,
and never written into another job's output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kubetune.api import FineTuneJob
from kubetune.errors import EXIT_STORAGE
from kubetune.run import logs
from kubetune.run.plan import plan_finetune
from kubetune.run.workloads import ENV_ATTEMPT, ENV_PLAN, ENV_SCRATCH_DIR
from kubetune.trainer.process_logs import BoundedFile, tee_output

pytestmark = pytest.mark.integration


def job(output: Path, model: Path, uid: str = "uid-1") -> FineTuneJob:
    return FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "tune", "namespace": "team", "uid": uid},
            "spec": {
                "model": {"uri": model.as_uri()},
                "dataset": {"train": {"uri": (model.parent / "train.jsonl").as_uri()}},
                "hyperparameters": {"maxSteps": 2},
                "output": {"uri": output.as_uri()},
            },
        }
    )


def run_validate(
    tmp_path: Path, plan_job: FineTuneJob, attempt: int, **env: str
) -> subprocess.CompletedProcess[str]:
    plan = plan_finetune(plan_job, namespace="team")
    plan_path = tmp_path / f"plan-{attempt}.json"
    plan_path.write_text(plan.to_json())
    environ = {
        **os.environ,
        ENV_PLAN: str(plan_path),
        ENV_ATTEMPT: str(attempt),
        ENV_SCRATCH_DIR: str(tmp_path / "scratch"),
        "KUBETUNE_TERMINATION_LOG": str(tmp_path / "termination-log"),
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "kubetune.trainer", "validate", "--plan", str(plan_path)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_failing_validation_keeps_its_log_in_its_attempts_folder_and_still_prints_it(
    tmp_path: Path,
) -> None:
    output = tmp_path / "out"
    missing_model = tmp_path / "inputs" / "no-such-model"
    secret = "s3cr3t-value-never-kept"
    result = run_validate(tmp_path, job(output, missing_model), attempt=2, AWS_SECRET_ACCESS_KEY=secret)

    assert result.returncode == EXIT_STORAGE, result.stderr
    kept = output / "logs" / "attempt-2" / logs.VALIDATE_LOG
    assert kept.is_file(), sorted(str(p) for p in output.rglob("*"))
    text = kept.read_text()
    assert "no-such-model" in text  # the reason it failed
    assert "no-such-model" in result.stdout + result.stderr  # and the process still printed it
    assert secret not in text
    assert not (tmp_path / "scratch" / "process-logs").exists() or not any(
        (tmp_path / "scratch" / "process-logs").iterdir()
    )


def test_a_process_of_another_job_keeps_nothing_in_an_output_it_does_not_own(tmp_path: Path) -> None:
    output = tmp_path / "out"
    model = tmp_path / "inputs" / "no-such-model"
    assert run_validate(tmp_path, job(output, model, uid="owner"), attempt=0).returncode == EXIT_STORAGE
    owner_claim = json.loads((output / "_OWNER.json").read_text())
    before = sorted(p.relative_to(output) for p in output.rglob("*"))

    intruder = run_validate(tmp_path, job(output, model, uid="someone-else"), attempt=5)

    assert intruder.returncode == EXIT_STORAGE
    assert "could not keep this process's log" in intruder.stdout + intruder.stderr
    assert sorted(p.relative_to(output) for p in output.rglob("*")) == before
    assert json.loads((output / "_OWNER.json").read_text()) == owner_claim


def test_the_kept_copy_is_bounded_to_its_newest_part_and_says_it_was_truncated(tmp_path: Path) -> None:
    sink = BoundedFile(tmp_path / "p.log", limit=1000)
    for i in range(200):
        sink.write(f"line {i:04d}\n".encode())
    kept = sink.contents()

    assert len(kept) <= 1000 + 200  # the bound, plus the one line saying what was dropped
    assert kept.startswith(logs.TRUNCATED_MARKER.encode())
    assert kept.endswith(b"line 0199\n")
    assert b"line 0000\n" not in kept
    on_disk = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert on_disk <= 1000


def test_output_written_at_the_file_descriptor_level_is_copied_and_still_passed_on(tmp_path: Path) -> None:
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from kubetune.trainer.process_logs import tee_output\n"
        "with tee_output(Path(sys.argv[1])) as sink:\n"
        "    print('from python', flush=True)\n"
        "    os.write(2, b'from the fd\\n')\n"
        "    os.system('echo from a subprocess')\n"
        "sys.stdout.write(sink.contents().decode())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "copy.log")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "from the fd" in result.stderr
    copied = result.stdout.split("from a subprocess\n", 1)[1]
    for line in ("from python", "from the fd", "from a subprocess"):
        assert line in copied


def test_tee_output_restores_the_original_descriptors(tmp_path: Path) -> None:
    before = os.fstat(1).st_ino, os.fstat(2).st_ino
    with tee_output(tmp_path / "x.log"):
        pass
    assert (os.fstat(1).st_ino, os.fstat(2).st_ino) == before


def kubetune_logs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "logs", *args], capture_output=True, text=True, timeout=120
    )


def test_kubetune_logs_reads_each_attempts_kept_logs_from_an_output_directory_or_uri(tmp_path: Path) -> None:
    output = tmp_path / "out"
    run_validate(tmp_path, job(output, tmp_path / "inputs" / "first-missing"), attempt=0)
    run_validate(tmp_path, job(output, tmp_path / "inputs" / "second-missing"), attempt=1)

    newest = kubetune_logs(str(output))
    first = kubetune_logs(output.as_uri(), "--attempt", "0")
    no_such_rank = kubetune_logs(str(output), "--rank", "3")
    no_such_attempt = kubetune_logs(str(output), "--attempt", "7")

    assert newest.returncode == 0, newest.stderr
    assert "second-missing" in newest.stdout
    assert "first-missing" not in newest.stdout
    assert first.returncode == 0, first.stderr
    assert "first-missing" in first.stdout
    assert no_such_rank.returncode == 2
    assert "--rank 3: attempt 1 keeps validate.log" in no_such_rank.stderr
    assert no_such_attempt.returncode == 2
    assert "keeps attempts 0, 1" in no_such_attempt.stderr


def test_a_worker_killed_outright_still_has_its_log_kept_by_its_launcher(tmp_path: Path) -> None:
    from tests.integration.test_finetune_support import free_port, tiny_causal_lm, trainer_env, write_plan

    base, data = tiny_causal_lm(tmp_path)
    output = tmp_path / "out"
    plan = write_plan(
        tmp_path / "plan.json",
        model_uri=base.as_uri(),
        train_uri=data.as_uri(),
        output_uri=output.as_uri(),
        hyperparameters={"maxSteps": 100000},
        processes=1,
    )
    scratch = tmp_path / "scratch"
    env = trainer_env(tmp_path, {ENV_SCRATCH_DIR: str(scratch), ENV_ATTEMPT: "3"})
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kubetune.trainer",
            "launch",
            "--nnodes=1",
            "--nproc_per_node=1",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            "-m",
            "kubetune.trainer",
            "finetune",
            "--plan",
            str(plan),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # The worker's copy appears as <pid>-rank-0.log; kill it as the OOM killer would, once
        # it has trained a step.
        copy = None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and launcher.poll() is None:
            copies = list((scratch / "process-logs").glob("*-rank-0.log"))
            if copies and b"step " in copies[0].read_bytes():
                copy = copies[0]
                break
            time.sleep(0.2)
        assert copy is not None, launcher.communicate(timeout=30)[0]
        os.kill(int(copy.name.split("-", 1)[0]), signal.SIGKILL)
        out, _ = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()

    assert launcher.returncode not in (0, 2, 3), out
    kept = (output / "logs" / "attempt-3" / "rank-0.log").read_text()
    assert "step " in kept
    assert "killed" in kept.splitlines()[-1]
    assert "kept a killed worker's log" in out
    assert not any((scratch / "process-logs").iterdir())
