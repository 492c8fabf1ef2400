"""Shared fixtures: tiny models built in-process (no hub, no files from outside the repo)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """{arch: folder} for tiny llama, qwen2 and gpt_neox models (2 layers, hidden 64)."""
    from kd2edge.testing import ARCHS, tiny_model_dir

    root = tmp_path_factory.mktemp("tiny")
    return {arch: tiny_model_dir(root / arch, arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_dirs):
    return tiny_dirs["llama"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch, request):
    """Tests never write into the user's cache, except slow ones that reuse the converted teacher."""
    if "slow" not in request.keywords:
        monkeypatch.setenv("KD2EDGE_CACHE", str(tmp_path / "kd2edge-cache"))
