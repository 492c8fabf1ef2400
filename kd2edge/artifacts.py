"""Artifacts: one folder per stage output, described by its manifest.json.

A manifest holds the stage name, the resolved config the stage ran with, the input
artifact (path and content hash), library versions, metrics and timings, and the
content hash of the folder itself. Nothing is encoded in file names.

Writes are atomic: a stage writes into `.NAME.partial/` beside the final folder and
the folder is renamed into place only after its manifest is written, so an
interrupted stage never leaves a folder a later run would trust. Stages that
checkpoint long work (distillation) keep it in `.NAME.work/`, which survives an
interruption and is removed once the stage has finished.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from kd2edge import __version__
from kd2edge.errors import ArtifactError, ResourceError

MANIFEST = "manifest.json"
_TRACKED_LIBRARIES = ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime",
                      "onnxruntime-genai", "tokenizers", "accelerate", "trl", "datasets", "numpy")


@dataclass(frozen=True)
class Artifact:
    """A stage's output folder and its manifest."""

    path: Path
    manifest: dict

    @property
    def stage(self) -> str:
        return self.manifest.get("stage", "external")

    @property
    def content_hash(self) -> str:
        return self.manifest["content_hash"]

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})

    @classmethod
    def load(cls, path: str | Path, stage: str | None = None) -> "Artifact":
        """Load an artifact folder written by kd2edge.

        Args:
            path: the folder.
            stage: if given, the stage the artifact must come from.

        Raises:
            ArtifactError: no such folder, no or unreadable manifest, or the wrong stage.
        """
        path = Path(path)
        if not path.is_dir():
            raise ArtifactError(f"{path} is not a folder: give the output folder of a kd2edge stage")
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ArtifactError(f"{path} has no {MANIFEST}: it was not written by kd2edge (or its stage did not finish)") from None
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{path}/{MANIFEST} is unreadable ({e}): rerun the stage that wrote it") from None
        if stage is not None and manifest.get("stage") != stage:
            raise ArtifactError(f"{path} is a '{manifest.get('stage')}' artifact, expected a '{stage}' one")
        return cls(path, manifest)

    @classmethod
    def external(cls, path: str | Path, kind: str, **info: Any) -> "Artifact":
        """Wrap a folder that kd2edge did not write (a model folder, a cached teacher).

        Its content hash is computed from its files so that stages fed with it can
        still tell whether their input changed.
        """
        path = Path(path)
        if path.is_dir() and (path / MANIFEST).is_file():
            return cls.load(path)
        return cls(path, {"stage": "external", "kind": kind, "content_hash": content_hash(path), **info})

    def input_artifact(self) -> "Artifact | None":
        """The artifact this one was made from (its manifest's `input`), if recorded."""
        info = self.manifest.get("input")
        if not info or not info.get("path"):
            return None
        p = Path(info["path"])
        p = p if p.is_absolute() else (self.path / p).resolve()
        if not p.exists():
            raise ArtifactError(f"{self.path}: its input {p} no longer exists")
        return Artifact.external(p, kind=info.get("kind", "model"), **{k: v for k, v in info.items() if k == "id"})

    def lineage(self) -> list["Artifact"]:
        """This artifact and its ancestors, newest first."""
        chain, current = [self], self
        while (parent := current.input_artifact()) is not None and len(chain) < 16:
            chain.append(parent)
            current = parent
        return chain


def content_hash(path: str | Path) -> str:
    """sha256 over the relative names and bytes of every file below `path` (manifest excluded)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        rel = f.name if f == path else f.relative_to(path).as_posix()
        if rel == MANIFEST:
            continue
        h.update(rel.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape an artifact (absent ones omitted)."""
    out = {"kd2edge": __version__}
    for name in _TRACKED_LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def fingerprint(stage: str, config: Any, input_hash: str | None) -> str:
    """What decides a stage's output: its name, its resolved config and its input's hash."""
    blob = json.dumps({"stage": stage, "config": config, "input": input_hash}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def write_artifact(out_dir: Path, stage: str, config: Any, input_artifact: Artifact | None,
                   metrics: dict | None = None, **extra: Any) -> Artifact:
    """Write the manifest of a finished stage into `out_dir` and return the artifact.

    Stages call this last, on the folder they were given (the partial folder).

    Args:
        out_dir: the folder the stage wrote its files into.
        stage: the stage name ("quantize").
        config: the resolved, JSON-able config the stage ran with.
        input_artifact: what the stage read, or None.
        metrics: figures the stage measured (reconstruction error, parity, F1...).
        **extra: any further top-level manifest fields (e.g. `format`, `files`).
    """
    out_dir = Path(out_dir)
    manifest = {
        "stage": stage,
        "kd2edge_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config,
        "input": _input_ref(input_artifact, out_dir),
        "versions": library_versions(),
        "metrics": metrics or {},
        **extra,
        "content_hash": content_hash(out_dir),
    }
    write_json_atomic(out_dir / MANIFEST, manifest)
    return Artifact(out_dir, manifest)


def _input_ref(artifact: Artifact | None, out_dir: Path) -> dict | None:
    if artifact is None:
        return None
    ref = {k: v for k, v in artifact.manifest.items() if k in ("id", "kind")}
    ref.update(stage=artifact.stage, hash=artifact.content_hash, path=str(artifact.path.resolve()))
    # Inside one run folder, keep the link relative so the folder can be moved whole.
    run_dir = out_dir.resolve().parent
    if artifact.path.resolve().parent == run_dir:
        ref["path"] = os.path.join("..", artifact.path.name)
    return ref


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON via a temporary file and rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class Stopwatch:
    """Seconds per named step of a stage, for its manifest's `timings`: `with clock("train_s"): ...`."""

    def __init__(self):
        self.started, self.timings = time.perf_counter(), {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - t, 3)

    def total(self) -> dict:
        """The timings with `total_s`, the seconds since the stopwatch started."""
        return {**self.timings, "total_s": round(time.perf_counter() - self.started, 3)}


def cached_json(path: Path, compute):
    """A JSON-able result kept at `path` (in a stage's work dir), so a resumed run does not compute it again."""
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    value = compute()
    write_json_atomic(path, value)
    return value


def partial_dir(final: Path) -> Path:
    return final.parent / f".{final.name}.partial"


def work_dir(out_dir: Path) -> Path:
    """A stage's checkpoint folder: survives interruption, removed after success.

    `out_dir` is the folder the stage was handed (the partial folder) or the final one.
    """
    name = out_dir.name
    if name.startswith(".") and name.endswith(".partial"):
        name = name[1:-len(".partial")]
    path = out_dir.parent / f".{name}.work"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty partial folder; on success move it to `final`, on error remove it.

    Raises:
        ResourceError: the parent folder cannot be created or written.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = partial_dir(final)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by an interrupted earlier attempt: never trusted
        tmp.mkdir()
    except PermissionError as e:
        raise ResourceError(f"cannot write to {final.parent} ({e.strerror}): choose a writable --out folder") from None
    except OSError as e:
        raise ResourceError(f"cannot create {final} ({e.strerror}): check the --out folder and free disk") from None
    try:
        try:
            yield tmp
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise ResourceError(f"the disk filled up while writing {final.name}: free some space and rerun "
                                    f"(nothing was kept)") from None
            raise
        if not (tmp / MANIFEST).is_file():
            raise ArtifactError(f"stage wrote no {MANIFEST} into {final.name}: this is a kd2edge bug")
        if final.exists():
            old = final.parent / f".{final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(final.parent / f".{final.name}.work", ignore_errors=True)
