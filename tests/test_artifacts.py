import json

import pytest

from kd2edge.artifacts import (MANIFEST, Artifact, atomic_dir, content_hash, fingerprint, work_dir,
                               write_artifact)
from kd2edge.errors import ArtifactError, ResourceError


def test_content_hash_covers_names_and_bytes_but_not_the_manifest(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x")
    h1 = content_hash(tmp_path)
    (tmp_path / MANIFEST).write_text("{}")
    assert content_hash(tmp_path) == h1
    (tmp_path / "a.bin").write_bytes(b"y")
    assert content_hash(tmp_path) != h1


def test_atomic_dir_moves_into_place_only_on_success(tmp_path):
    final = tmp_path / "quantize"
    with atomic_dir(final) as tmp:
        (tmp / "w.bin").write_bytes(b"1")
        write_artifact(tmp, "quantize", {"bits": 4}, None, metrics={"err": 0.1})
        assert not final.exists()
    art = Artifact.load(final, stage="quantize")
    assert art.metrics == {"err": 0.1} and art.manifest["config"] == {"bits": 4}
    assert "torch" in art.manifest["versions"] and art.content_hash == content_hash(final)


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "export"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "half.onnx").write_bytes(b"half")
            raise RuntimeError("boom")
    assert not final.exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_atomic_dir_keeps_the_old_folder_if_the_new_one_fails(tmp_path):
    final = tmp_path / "distill"
    with atomic_dir(final) as tmp:
        write_artifact(tmp, "distill", {"v": 1}, None)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(final) as tmp:
            raise KeyboardInterrupt
    assert Artifact.load(final).manifest["config"] == {"v": 1}


def test_stage_without_manifest_is_a_bug(tmp_path):
    with pytest.raises(ArtifactError, match="wrote no manifest"):
        with atomic_dir(tmp_path / "x"):
            pass


def test_unwritable_parent(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ResourceError, match="cannot create"):
        with atomic_dir(blocker / "sub" / "stage"):
            pass


def test_load_errors(tmp_path):
    with pytest.raises(ArtifactError, match="is not a folder"):
        Artifact.load(tmp_path / "missing")
    with pytest.raises(ArtifactError, match="has no manifest.json"):
        Artifact.load(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable"):
        Artifact.load(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"stage": "export", "content_hash": "x"}))
    with pytest.raises(ArtifactError, match="is a 'export' artifact, expected a 'quantize' one"):
        Artifact.load(tmp_path, stage="quantize")


def test_lineage_follows_relative_inputs(tmp_path):
    model = tmp_path / "teacher"
    model.mkdir()
    (model / "config.json").write_text("{}")
    teacher = Artifact.external(model, kind="model", id="t")
    with atomic_dir(tmp_path / "run" / "distill") as tmp:
        write_artifact(tmp, "distill", {}, teacher)
    distill = Artifact.load(tmp_path / "run" / "distill")
    with atomic_dir(tmp_path / "run" / "quantize") as tmp:
        write_artifact(tmp, "quantize", {}, distill)
    quant = Artifact.load(tmp_path / "run" / "quantize")
    assert quant.manifest["input"]["path"] == "../distill"
    chain = quant.lineage()
    assert [a.stage for a in chain] == ["quantize", "distill", "external"]
    assert chain[2].path == model.resolve() and chain[2].manifest["id"] == "t"


def test_fingerprint_and_work_dir(tmp_path):
    assert fingerprint("q", {"a": 1}, "h") == fingerprint("q", {"a": 1}, "h")
    assert fingerprint("q", {"a": 1}, "h") != fingerprint("q", {"a": 2}, "h")
    assert work_dir(tmp_path / ".distill.partial") == tmp_path / ".distill.work"


def test_a_full_disk_mid_write_is_a_resource_error_and_leaves_nothing(tmp_path):
    import errno

    with pytest.raises(ResourceError, match="disk filled up while writing quantize"):
        with atomic_dir(tmp_path / "quantize") as tmp:
            (tmp / "part.bin").write_bytes(b"x")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []
