"""A run stopped by SIGINT, SIGTERM or SIGKILL during each stage, then restarted, ends with
the same result as an uninterrupted run, and never trusts a half-written stage folder.

Each interrupted run is paused inside the stage (after the stage wrote its files into its
partial folder, before the folder is committed) by the fault-injection variable
KD2EDGE_TEST_PAUSE_IN_STAGE; distillation is also killed in the middle of training.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kd2edge.config import STAGES
from kd2edge.pipeline import PAUSE_ENV

from .cli_helpers import run_kd2edge

DETERMINISTIC = ("distill", "quantize", "export", "evaluate")  # profile measures time; package copies manifests
# Every stage is interrupted; the three signals rotate over the stages in the fast suite and
# the remaining combinations run as slow tests.
FAST = {("distill", "SIGKILL"), ("quantize", "SIGINT"), ("export", "SIGTERM"),
        ("profile", "SIGKILL"), ("evaluate", "SIGINT"), ("package", "SIGTERM")}
CASES = [pytest.param(stage, sig, marks=() if (stage, sig) in FAST else pytest.mark.slow)
         for stage in STAGES for sig in ("SIGINT", "SIGTERM", "SIGKILL")]


def outcome(run_dir: Path) -> dict:
    """What a run produced that must not depend on interruptions."""
    out = {s: json.loads((run_dir / s / "manifest.json").read_text())["content_hash"] for s in DETERMINISTIC}
    report = json.loads((run_dir / "report.json").read_text())
    out["quality"] = {k: report["quality"][k] for k in ("teacher", "student", "deployed")}
    out["student"] = report["student"]
    return out


@pytest.fixture(scope="module")
def reference(fast_run_config, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    proc = run_kd2edge(["run", "--config", str(fast_run_config), "--out", str(run_dir)])
    assert proc.returncode == 0, proc.stderr
    return outcome(run_dir)


def interrupt(args: list[str], stage: str, sig: str, run_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", PAUSE_ENV: stage, "KD2EDGE_TEST_PAUSE_S": "120"}
    proc = subprocess.Popen([sys.executable, "-m", "kd2edge.cli", *args], stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    deadline = time.monotonic() + 300
    for line in proc.stderr:  # wait until the stage is paused inside its partial folder
        if f"paused in the {stage} stage" in line:
            break
        assert time.monotonic() < deadline, "the run never reached the pause"
    assert (run_dir / f".{stage}.partial").is_dir() and not (run_dir / stage).exists()
    os.kill(proc.pid, getattr(signal, sig))
    out, err = proc.communicate(timeout=120)
    os.killpg(proc.pid, signal.SIGKILL) if _group_alive(proc.pid) else None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.parametrize("stage,sig", CASES)
def test_interrupted_run_resumes_to_the_same_result(stage, sig, fast_run_config, reference, tmp_path):
    run_dir = tmp_path / "run"
    args = ["run", "--config", str(fast_run_config), "--out", str(run_dir)]
    stopped = interrupt(args, stage, sig, run_dir)
    if sig == "SIGKILL":
        assert stopped.returncode == -signal.SIGKILL
    else:
        assert stopped.returncode == 130
        assert f"during the {stage} stage" in stopped.stderr
        assert "run the same command again to resume" in stopped.stderr
        assert not (run_dir / f".{stage}.partial").exists()  # cleaned up on the way out
    assert not (run_dir / stage).exists(), "an interrupted stage left a folder a rerun would trust"
    before = {s for s in STAGES if (run_dir / s / "manifest.json").is_file()}
    assert before == set(STAGES[:STAGES.index(stage)])

    resumed = run_kd2edge(args)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads((run_dir / "report.json").read_text())
    for s in STAGES:  # finished stages are reused, the rest run
        assert report["stages"][s]["status"] == ("skipped" if s in before else "done"), s
    assert outcome(run_dir) == reference


def test_distillation_killed_mid_training_resumes_from_its_checkpoint(fast_run_config, reference, tmp_path):
    """SIGKILL between two optimizer steps: the rerun continues from the last checkpoint."""
    config = json.loads(fast_run_config.read_text())
    config["distill"].update(steps=12, checkpoint_every=2)
    path = tmp_path / "long.json"
    path.write_text(json.dumps(config))
    run_dir = tmp_path / "run"
    args = ["run", "--config", str(path), "--out", str(run_dir)]
    proc = subprocess.Popen([sys.executable, "-m", "kd2edge.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    work = run_dir / ".distill.work"
    deadline = time.monotonic() + 300
    while not _has_checkpoint(work):
        assert proc.poll() is None, "distillation finished before a checkpoint could be caught"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "distill").exists()
    resumed = run_kd2edge(args)
    assert resumed.returncode == 0, resumed.stderr
    manifest = json.loads((run_dir / "distill" / "manifest.json").read_text())
    assert manifest["metrics"]["train"]["resumed_from"] > 0
    uninterrupted = tmp_path / "clean"
    assert run_kd2edge(["run", "--config", str(path), "--out", str(uninterrupted)]).returncode == 0
    assert manifest["content_hash"] == json.loads((uninterrupted / "distill" / "manifest.json").read_text())["content_hash"]


def _has_checkpoint(work: Path) -> bool:
    return (work / "checkpoint.pt").is_file()
