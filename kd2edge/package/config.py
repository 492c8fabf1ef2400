"""Config section `[package]` (light)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kd2edge.schema import rule


@dataclass(frozen=True)
class PackageConfig:
    port: int = field(default=8080, metadata=rule(min=1, max=65535))
    image_name: str = "kd2edge-model"
