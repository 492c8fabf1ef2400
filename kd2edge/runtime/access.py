"""Can this process read the artifact? Checked before loading, so a file the image's user cannot
read is named in one line instead of surfacing as onnxruntime's `SystemError : 13`.

Standard library only: it runs in the image.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from kd2edge.errors import ArtifactError


def unreadable_files(folder: str | Path) -> list[str]:
    """Files (and folders) under `folder` this process cannot read (or, for folders, list).

    Root reads everything, so this finds nothing for root: it matters for the non-root user
    the image runs as.

    Args:
        folder: the folder to check.

    Returns:
        Their paths relative to `folder`, with their modes, e.g. "model.onnx.data (mode 0600)".
    """
    folder = Path(folder)
    found: list[str] = []
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            path = Path(root, name)
            if not os.access(path, os.R_OK | os.X_OK):
                found.append(f"{path.relative_to(folder)}/ (mode {stat.S_IMODE(path.stat().st_mode):04o})")
        for name in files:
            path = Path(root, name)
            if not os.access(path, os.R_OK):
                found.append(f"{path.relative_to(folder)} (mode {stat.S_IMODE(path.stat().st_mode):04o})")
    return sorted(found)


def check_readable(folder: str | Path) -> None:
    """Refuse an artifact this process cannot read whole.

    Args:
        folder: the artifact folder.

    Raises:
        ArtifactError: a file or folder is unreadable; names it, its mode and this user's uid.
    """
    folder = Path(folder)
    if folder.is_dir() and not os.access(folder, os.R_OK | os.X_OK):
        raise ArtifactError(f"{folder} is not readable by uid {os.getuid()}: make it readable (chmod a+rX)")
    bad = unreadable_files(folder) if folder.is_dir() else []
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ArtifactError(f"{folder}: {', '.join(bad[:3])}{more} not readable by uid {os.getuid()}: "
                            f"make them readable (chmod -R a+rX), or rebuild the image from a context "
                            f"written by this kd2edge")
