"""A whole pipeline on a tiny teacher, small enough to run many times (about 20 s a run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kd2edge.config import dump_config, load_config


@pytest.fixture(scope="session")
def fast_run_config(tmp_path_factory) -> Path:
    """A run config file: tiny 4-layer llama teacher, few steps, few items, short prompts."""
    from kd2edge.testing import tiny_model_dir

    root = tmp_path_factory.mktemp("fastrun")
    teacher = tiny_model_dir(root / "teacher", "llama", num_layers=4)
    config = load_config(overrides={
        "teacher": str(teacher), "data": "embedded",
        "distill.steps": 4, "distill.batch_size": 4, "distill.eval_limit": 4, "distill.checkpoint_every": 2,
        "distill.train_limit": 16,
        "quantize.calib_samples": 8, "quantize.calib_max_tokens": 64,
        "evaluate.limit": 4, "evaluate.max_new_tokens": 8,
        "profiling.baseline_teacher": False,
    })
    data = json.loads(dump_config(config))
    # The tiny model's context is 512 tokens: profile short prompts, once.
    data["profile"]["profiling"].update(prompt_lengths=[16], new_tokens=8, warmup=0, repeats=1)
    path = root / "run.json"
    path.write_text(json.dumps(data, indent=1))
    return path
