"""Checks before long work: is there disk and memory enough? Refuse early, with the numbers."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from kd2edge.errors import ResourceError
from kd2edge.units import format_bytes


@dataclass(frozen=True)
class Needs:
    """What a stage expects to use: bytes written to disk and peak bytes of memory."""

    disk_bytes: int
    memory_bytes: int


def folder_size(path: str | Path) -> int:
    """Total bytes of the files below `path` (or of `path` itself)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def available_memory() -> int:
    """Bytes of memory available to a new allocation (MemAvailable), or -1 if unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return -1


def check(needs: Needs, out_dir: Path, what: str) -> None:
    """Raise ResourceError when `needs` doesn't fit the free disk at `out_dir` or free memory.

    Args:
        needs: the estimate.
        out_dir: where the stage will write (its nearest existing parent is measured).
        what: the stage, for the message.
    """
    probe = Path(out_dir).resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needs.disk_bytes > free:
        raise ResourceError(f"{what} needs about {format_bytes(needs.disk_bytes)} of disk but {probe} has "
                            f"{format_bytes(free)} free: free some space or choose another --out")
    mem = available_memory()
    if mem >= 0 and needs.memory_bytes > mem:
        raise ResourceError(f"{what} needs about {format_bytes(needs.memory_bytes)} of memory but "
                            f"{format_bytes(mem)} is available: close other programs or use a smaller model")
