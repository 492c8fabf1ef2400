"""What distilling a student needs: disk and peak memory, an upper bound checked before the stage starts."""

from __future__ import annotations

def activation_bytes(seq: int, batch: int, hidden: int, layers: int) -> int:
    """Activations a transformer keeps for the backward pass, in fp32.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"):
    s b h (34 + 5 a s / h) bytes per layer in 16-bit precision; twice that in fp32. The 5 a s / h
    term is the (s, s) attention scores, which PyTorch's scaled-dot-product attention (the
    transformers default) never stores, so it is left out.
    """
    return 2 * 34 * layers * seq * batch * hidden


ANSWER_POSITIONS = 64   # logits are computed at answer positions only (gold answers are short)


def distill_needs(teacher_params: int, student_params: int, seq: int, batch: int, hidden: int, layers: int,
                  vocab: int, cached_positions: int, topk: int):
    """Disk and peak memory of distilling one student (bytes), an upper bound.

    Memory, the larger of two phases: building the student holds the teacher in fp32 and the
    copy of it that is pruned into the student (8 B per teacher param); training (the teacher is
    released by then) holds the student's fp32 weights, gradients and AdamW's two moments (16 B
    per student param), its activations for a full batch at max_length (`activation_bytes`) and
    the logits at up to ANSWER_POSITIONS answer positions per row, with their log-softmax and
    gradient, fp32. Disk: the saved student (4 B/param), the resumable checkpoint (weights +
    AdamW moments, 12 B/param), and the teacher's cached logits, top-k values fp32 + indices
    int32 per position (or the full vocabulary in fp16 with topk 0).

    Returns:
        kd2edge.resources.Needs.
    """
    from kd2edge.resources import Needs

    logits = 3 * 4 * batch * min(seq, ANSWER_POSITIONS) * vocab
    training = 16 * student_params + activation_bytes(seq, batch, hidden, layers) + logits
    cache = cached_positions * (8 * topk if topk else 2 * vocab)
    return Needs(disk_bytes=16 * student_params + cache, memory_bytes=max(8 * teacher_params, training))
