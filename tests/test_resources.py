import shutil
from collections import namedtuple

import pytest

from kd2edge import resources
from kd2edge.errors import ResourceError
from kd2edge.resources import Needs, check, folder_size

Usage = namedtuple("Usage", "total used free")


def test_folder_size(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b").write_bytes(b"x" * 5)
    assert folder_size(tmp_path) == 15


def test_refuses_when_the_disk_is_too_small(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ResourceError, match=r"needs about 2.0 KiB of disk but .* has 1000 B free"):
        check(Needs(disk_bytes=2000, memory_bytes=0), tmp_path / "not" / "yet", "the export stage")


def test_refuses_when_memory_is_too_small(tmp_path, monkeypatch):
    monkeypatch.setattr(resources, "available_memory", lambda: 2**30)
    with pytest.raises(ResourceError, match=r"needs about 2.0 GiB of memory but 1.0 GiB is available"):
        check(Needs(disk_bytes=0, memory_bytes=2 * 2**30), tmp_path, "the distill stage")
    check(Needs(disk_bytes=0, memory_bytes=2**29), tmp_path, "the distill stage")
