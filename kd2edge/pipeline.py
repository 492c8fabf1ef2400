"""The pipeline: the stages in order, each resumable, then the report.

A stage is a module `kd2edge.<package>.stage` with a function

    run(config: RunConfig, input_artifact: Artifact, out_dir: Path) -> Artifact

that writes its files into `out_dir` (a partial folder) and ends with
`write_artifact(...)`, and optionally `estimate(config, input_artifact) -> Needs`.
`run_stage` wraps it: it skips the stage when the finished folder's fingerprint
(stage config + input hash) matches, and otherwise checks its estimate against free
disk and memory and runs it in a partial folder that is renamed into place only on success.

The distill stage also runs in several processes (`kd2edge distill --num-processes N`, or any
launcher that sets WORLD_SIZE: `kd2edge.distributed`). Then every process runs the stage, and
only the main one resets the work dir, writes the partial folder and its manifest and commits
it; the others write nothing under the run folder and wait for it at a barrier. `run_launched_stage`
starts a stage's processes from a single-process pipeline (`kd2edge run --num-processes N`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kd2edge import resources
from kd2edge.artifacts import MANIFEST, Artifact, atomic_dir, fingerprint, partial_dir, write_json_atomic
from kd2edge.config import RunConfig, dump_config
from kd2edge.distill import stage as distill
from kd2edge.distributed import Launch, launch, ranks
from kd2edge.errors import ArtifactError, BudgetError, ConfigError, LaunchFailed, ResourceError
from kd2edge.evaluate import stage as evaluate
from kd2edge.export import stage as export
from kd2edge.package import stage as package
from kd2edge.profiling import stage as profile
from kd2edge.quantize import stage as quantize

# (stage, its module, the artifact it reads: "teacher" is the resolved teacher), in run order.
STAGES = (("distill", distill, "teacher"), ("quantize", quantize, "distill"), ("export", export, "quantize"),
          ("profile", profile, "export"), ("evaluate", evaluate, "export"), ("package", package, "export"))
MODULES = {name: module for name, module, _ in STAGES}
# The stages that run in several processes when launched so (the others refuse: one line).
MULTI_PROCESS_STAGES = ("distill",)


@dataclass(frozen=True)
class StageResult:
    name: str
    status: str                 # "done", or "skipped" (its output was up to date)
    artifact: Artifact
    seconds: float = 0.0


def run_stage(name: str, config: RunConfig, input_artifact: Artifact | None, out_dir: Path,
              force: bool = False) -> StageResult:
    """Run one stage into `out_dir`, or reuse it if its fingerprint matches.

    In several launched processes (distill only) every process calls this: the main one decides
    whether the stage is up to date, resets the work dir and commits the folder; the others run
    the stage's computation with it and return once the folder is in place.

    Raises:
        ConfigError: a stage other than distill started in several processes.
        Kd2EdgeError: whatever the stage raises; `out_dir` is then left as it was.
    """
    group = ranks()
    if group.world > 1 and name not in MULTI_PROCESS_STAGES:
        raise ConfigError(f"the {name} stage runs as one process but {group.world} were launched: run it without "
                          f"`accelerate launch` or --num-processes (only {', '.join(MULTI_PROCESS_STAGES)} runs in several)")
    out_dir = Path(out_dir)
    fp = fingerprint(name, config.stage_config(name), input_artifact.content_hash if input_artifact else None)
    existing = _finished(out_dir, fp) if group.is_main and not force else None
    if group.broadcast(existing is not None):
        return StageResult(name, "skipped", existing or Artifact.load(out_dir))
    stage = MODULES[name]
    started = time.perf_counter()
    work = out_dir.parent / f".{out_dir.name}.work"
    if not group.is_main:
        group.barrier()                   # the main process has reset the work dir
        group.check_shared(work)
        stage.run(config, input_artifact, partial_dir(out_dir))   # writes nothing under out_dir
        group.barrier()                   # the main process has committed the folder
        return StageResult(name, "done", Artifact.load(out_dir), time.perf_counter() - started)
    needs = _needs(stage, config, input_artifact)
    if group.world > 1:   # every process on this machine holds its own models
        needs = dataclasses.replace(needs, memory_bytes=needs.memory_bytes * _local_processes())
    resources.check(needs, out_dir, f"the {name} stage")
    with atomic_dir(out_dir) as tmp, _drop_if_unused(work):
        _reset_work_dir(work, fp)
        group.barrier()
        group.check_shared(work)
        artifact = stage.run(config, input_artifact, tmp)
        _fault_injection_pause(name)
        manifest = dict(artifact.manifest, fingerprint=fp,
                        timings={**artifact.manifest.get("timings", {}), "total_s": round(time.perf_counter() - started, 3)})
        write_json_atomic(tmp / MANIFEST, manifest)
    group.barrier()
    return StageResult(name, "done", Artifact.load(out_dir), time.perf_counter() - started)


def run_launched_stage(name: str, config: RunConfig, input_artifact: Artifact, out_dir: Path, spec: Launch,
                       force: bool = False) -> StageResult:
    """`run_stage` in the processes `spec` asks for: `kd2edge NAME --config FILE --out DIR` under
    accelerate's launcher, with the run's resolved config in a temporary file.

    Raises:
        ConfigError: a stage that does not run in several processes.
        LaunchFailed: a launched process failed (it printed its own one-line error).
    """
    if name not in MULTI_PROCESS_STAGES:
        raise ConfigError(f"the {name} stage runs as one process: --num-processes applies to "
                          f"{', '.join(MULTI_PROCESS_STAGES)} only")
    out_dir = Path(out_dir)
    fp = fingerprint(name, config.stage_config(name), input_artifact.content_hash)
    existing = _finished(out_dir, fp) if not force else None
    if existing is not None:
        return StageResult(name, "skipped", existing)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kd2edge-launch-") as tmp:
        config_file = Path(tmp) / "config.json"
        config_file.write_text(dump_config(config), encoding="utf-8")
        with _stdout_to_stderr():
            code = launch([name, "--config", str(config_file), "--out", str(out_dir), *(["--force"] if force else [])],
                          spec)
    if code:
        raise LaunchFailed(code)
    # On every machine: the run folder is on a filesystem they share (`Ranks.check_shared`).
    return StageResult(name, "done", Artifact.load(out_dir), time.perf_counter() - started)


@contextlib.contextmanager
def _stdout_to_stderr():
    """Point file descriptor 1 at stderr while the stage's processes run (they inherit it): their
    summary is progress here, and stdout stays the pipeline's own (`kd2edge run --json`)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _finished(out_dir: Path, fp: str) -> Artifact | None:
    """The finished stage folder at `out_dir` if its fingerprint is `fp`, else None."""
    if not (out_dir / MANIFEST).is_file():
        return None
    try:
        existing = Artifact.load(out_dir)
    except ArtifactError:
        return None
    return existing if existing.manifest.get("fingerprint") == fp else None


def _local_processes() -> int:
    """Processes on this machine (LOCAL_WORLD_SIZE, set by torchrun)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


# Fault injection for the interruption tests: pause a stage after it has written its output
# into the partial folder but before that folder is committed, the moment at which an
# interruption is most tempting to trust. Never set in normal use.
PAUSE_ENV = "KD2EDGE_TEST_PAUSE_IN_STAGE"


def _fault_injection_pause(stage: str) -> None:
    if os.environ.get(PAUSE_ENV) == stage:
        print(f"kd2edge: paused in the {stage} stage ({PAUSE_ENV})", file=sys.stderr, flush=True)
        time.sleep(float(os.environ.get("KD2EDGE_TEST_PAUSE_S", "60")))


def make_run_dir(out_dir: Path) -> None:
    """Create the run folder, or say why it can't be."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ResourceError(f"cannot create or write the run folder {out_dir} ({e.strerror}): "
                            f"choose a writable --out folder") from None


def _needs(stage, config: RunConfig, input_artifact: Artifact | None) -> resources.Needs:
    """The stage's own estimate if it has one, else twice its input on disk and in memory."""
    if hasattr(stage, "estimate"):
        return stage.estimate(config, input_artifact)
    size = resources.folder_size(input_artifact.path) if input_artifact is not None else 0
    return resources.Needs(disk_bytes=2 * size, memory_bytes=2 * size)


@contextlib.contextmanager
def _drop_if_unused(work: Path):
    """On failure, remove the stage's checkpoint folder if the stage never saved anything in it."""
    try:
        yield
    except BaseException:
        if work.is_dir() and {p.name for p in work.iterdir()} <= {"FINGERPRINT"}:
            shutil.rmtree(work, ignore_errors=True)
        raise


def _reset_work_dir(work: Path, fp: str) -> None:
    """Keep a stage's checkpoints only if they were made for the same fingerprint."""
    stamp = work / "FINGERPRINT"
    if work.exists() and (not stamp.is_file() or stamp.read_text().strip() != fp):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fp)


def run_pipeline(config: RunConfig, out_dir: Path, force: bool = False,
                 on_stage: Callable[[str, str], None] | None = None, spec: Launch | None = None) -> dict:
    """Run every stage in order into `out_dir/<stage>/`, then write report.json and report.html.

    Args:
        config: the resolved run config.
        out_dir: the run folder.
        force: rerun stages even when their output is up to date.
        on_stage: called with (stage, event) for progress ("start", "done", "skipped", ...).
        spec: run the stages that can in several processes, so (`run_launched_stage`); None: this process.

    Returns:
        The report (also written to `out_dir/report.json`).

    Raises:
        BudgetError: after the report is written, if a budget failed and the profile gates.
        Kd2EdgeError: a stage failed; earlier stages stay finished and a rerun resumes.
    """
    from kd2edge.models import resolve_model
    from kd2edge.report import build_report, write_report

    out_dir = Path(out_dir)
    notify = on_stage or (lambda stage, event: None)
    results: dict[str, StageResult] = {}
    artifacts: dict[str, Artifact] = {"teacher": resolve_model(config.teacher)}
    make_run_dir(out_dir)
    for name, _, source in STAGES:
        notify(name, "start")
        if spec is not None and name in MULTI_PROCESS_STAGES:
            results[name] = run_launched_stage(name, config, artifacts[source], out_dir / name, spec, force=force)
        else:
            results[name] = run_stage(name, config, artifacts[source], out_dir / name, force=force)
        artifacts[name] = results[name].artifact
        notify(name, results[name].status)
    report = build_report(config, artifacts, results)
    write_report(report, out_dir)
    if config.profiling.gate and report["pass"] is False:
        failed = [f"{k} ({v['value']} vs limit {v['limit']})" for k, v in report["budgets"].items()
                  if isinstance(v, dict) and v.get("pass") is False]
        raise BudgetError(f"budget missed: {', '.join(failed)}; see {out_dir / 'report.html'} "
                          f"(--no-gate to report only)")
    return report
