"""Config section `[package]` (light)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kd2edge.schema import rule

# Docker repository names: lower-case components separated by ".", "_", "__", "-" or "/".
_IMAGE_NAME = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")


@dataclass(frozen=True)
class PackageConfig:
    port: int = field(default=8080, metadata=rule(min=1, max=65535, help="port the server listens on in the image"))
    image_name: str = "kd2edge-model"
    # Tokens per served answer; the same default as evaluate.max_new_tokens, so the image
    # answers as the evaluation that scored it.
    max_new_tokens: int = field(default=24, metadata=rule(min=1, max=4096))
    max_queue: int = field(default=8, metadata=rule(min=0, max=1024, help="requests waiting before 503"))
    smoke_test: bool = True  # serve one question from the context (torch-free) and compare with the runtime
    # Build the image with Docker (`kd2edge package --build`), run it, and record its id, size and times.
    build: bool = False

    def problems(self) -> list[str]:
        if not _IMAGE_NAME.match(self.image_name):
            return [f"image_name: {self.image_name!r} is not a Docker repository name "
                    f"(lower-case letters, digits, '.', '_', '-', '/'), e.g. 'kd2edge-model'"]
        return []
