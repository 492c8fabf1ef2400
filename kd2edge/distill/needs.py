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


ANSWER_POSITIONS = 64   # with kd_positions "answer", logits at the answer's positions only (gold answers are short)


def distill_needs(teacher_params: int, student_params: int, seq: int, batch: int, hidden: int, layers: int,
                  vocab: int, cached_positions: int, topk: int, logit_positions: int = ANSWER_POSITIONS):
    """Disk and peak memory of distilling one student (bytes), an upper bound.

    Memory, the larger of two phases: building the student holds the teacher in fp32 and the
    copy of it that is pruned into the student (8 B per teacher param); training (the teacher is
    released by then) holds the student's fp32 weights, gradients and AdamW's two moments (16 B
    per student param), its activations for a full batch at max_length (`activation_bytes`), the
    logits at up to `logit_positions` scored positions per row with their log-softmax and gradient,
    fp32, and the teacher's cached rows (read into memory for training). Disk: the saved student
    (4 B/param), the resumable checkpoint (weights + AdamW moments, 12 B/param), and the teacher's
    cached logits, top-k values fp32 + indices int32 per position (or the full vocabulary in fp16
    with topk 0).

    Args:
        vocab: the student's vocabulary (trimmed or not).
        logit_positions: scored positions per row (max_length with kd_positions "all").

    Returns:
        kd2edge.resources.Needs.
    """
    from kd2edge.resources import Needs

    logits = 3 * 4 * batch * min(seq, logit_positions) * vocab
    cache = cached_positions * (8 * topk if topk else 2 * vocab)
    training = 16 * student_params + activation_bytes(seq, batch, hidden, layers) + logits + cache
    return Needs(disk_bytes=16 * student_params + cache, memory_bytes=max(8 * teacher_params, training))


def estimate(d, teacher_path) -> "Needs":
    """What distilling from the teacher in `teacher_path` with the [distill] settings `d` needs (`distill_needs`).

    The student is counted at the planned share of the teacher (`max_param_fraction`), or as large
    as the teacher with --student (it must be smaller); it has at most the teacher's layers and the
    trimmed vocabulary when `vocab_size` is smaller; every training item is counted at max_length.
    """
    from kd2edge.distill.data import train_item_limit
    from kd2edge.distributed import world_size_from_env
    from kd2edge.models import read_model_config
    from kd2edge.sizing import hidden_size, stored_weights

    teacher, _ = stored_weights(teacher_path)
    model_config = read_model_config(teacher_path)
    student = teacher if d.student else int(teacher * d.max_param_fraction)
    vocab = model_config.get("vocab_size") or 0
    if d.vocab_size and not d.student:
        vocab = min(vocab, d.vocab_size)
    # batch_size is per process: a launched run reads world-size times the items of one process.
    items = train_item_limit(d.steps, d.grad_accum, d.batch_size * world_size_from_env(), d.train_limit) or 0
    return distill_needs(teacher, student, d.max_length, d.batch_size, hidden_size(model_config),
                         model_config.get("num_hidden_layers") or 0, vocab, items * d.max_length, d.topk_logits,
                         logit_positions=d.max_length if d.kd_positions == "all" else ANSWER_POSITIONS)
