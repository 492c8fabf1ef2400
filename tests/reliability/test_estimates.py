"""The stages' resource estimates (`estimate(config, input_artifact) -> Needs`), against hand-computed figures."""

from __future__ import annotations

import torch

from kd2edge.distill.needs import activation_bytes, distill_needs
from kd2edge.evaluate.stage import evaluate_needs
from kd2edge.export.stage import export_needs
from kd2edge.package.stage import package_needs
from kd2edge.profiling.stage import profile_needs
from kd2edge.quantize.stage import quantize_needs
from kd2edge.resources import Needs

MIB = 2**20


def test_quantize_needs_by_hand():
    # model 10 x 1000 + results 8 x 800 + Hessians 4 x (6 x 8^2 + 16^2) + hidden states 2 x 4 x 10 x 8
    # disk: 800 x 4 / 8 packed + 800 / 32 groups x (2 + 0.5) + 200 x 2 fp16 = 862.5
    assert quantize_needs(1000, 800, hidden=8, intermediate=16, bits=4, group_size=32, calib_tokens=10) == \
        Needs(disk_bytes=862, memory_bytes=10000 + 6400 + 2560 + 640)


def test_distill_needs_by_hand():
    # Korthikanti et al. without the attention scores: 2 (fp32) x 34 x 3 layers x s 4 x b 2 x h 8
    assert activation_bytes(seq=4, batch=2, hidden=8, layers=3) == 13056
    # training: 16 x 50 student + activations + 3 x 4 x (b 2 x 4 answer positions x vocab 10) logits,
    # above building the student (8 x 100); disk: 16 x 50 student + checkpoint,
    # 6 cached positions x 3 x (4 + 4) top-k bytes (or x 10 x 2 fp16 for the full vocabulary)
    args = dict(seq=4, batch=2, hidden=8, layers=3, vocab=10, cached_positions=6)
    assert distill_needs(100, 50, **args, topk=3) == Needs(disk_bytes=944, memory_bytes=800 + 13056 + 960 + 144)
    # every position scored (kd_positions "all"): logits at all 100 positions of each row, not at 64 answer positions
    long = dict(args, seq=100)
    extra = 3 * 4 * 2 * (100 - 64) * 10
    assert (distill_needs(100, 50, **long, topk=3, logit_positions=100).memory_bytes
            - distill_needs(100, 50, **long, topk=3).memory_bytes) == extra
    assert distill_needs(100, 50, **args, topk=0).disk_bytes == 800 + 120
    # a big teacher and a tiny student: building the student is the peak
    assert distill_needs(10**6, 1, **args, topk=3).memory_bytes == 8 * 10**6


def test_other_stages_by_hand():
    assert export_needs(100, 10) == Needs(disk_bytes=420, memory_bytes=860)
    assert profile_needs(1000, 24) == Needs(disk_bytes=4 * MIB, memory_bytes=2024)
    assert evaluate_needs(10, 20, 30, items=2) == Needs(disk_bytes=3 * 4096 * 2 + MIB, memory_bytes=80)
    assert package_needs(100) == Needs(disk_bytes=100 + 4 * MIB, memory_bytes=200)
