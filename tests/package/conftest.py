"""Fixtures for the tests that build and run real Docker images (marked slow)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def docker_ready() -> dict:
    """A Docker daemon that answers (started if this machine can) and the base image python:3.11-slim-bookworm
    (the Debian stand-in made if no registry has it); skips, saying why, when either cannot be had.

    Returns:
        {"daemon": ensure_daemon's result, "base": ensure_base_image's result}.
    """
    from kd2edge.errors import ResourceError, StageError
    from kd2edge.package import docker as dk

    try:
        daemon = dk.ensure_daemon(timeout_s=90)
    except (ResourceError, StageError) as e:
        pytest.skip(f"Docker cannot run here: {e}")
    try:
        base = dk.ensure_base_image(dk.DEFAULT_BASE_IMAGE)
    except (ResourceError, StageError) as e:
        pytest.skip(f"no base image {dk.DEFAULT_BASE_IMAGE} and none can be made here: {e}")
    return {"daemon": daemon, "base": base}
