"""The distillation training loop: accelerate, AdamW, warmup + cosine, accumulation, checkpoints.

Logits are built only where a loss reads them: the student's last hidden states [B, L, H]
are gathered at the scored positions to [N, H] before the lm_head. With `kd_positions`
"all" those are every position that predicts a token (the divergence to the teacher over
the whole sequence, passage and question included, heals what pruning took from the
student's language modelling; the cross-entropy still reads the answer tokens only); with
"answer" only the answer's positions (1-3 % of B x L for extractive QA). The teacher's
logits come from the on-disk cache (top-k per scored position), so the teacher does not run
during training at all.

Resumption: the data order is a pure function of (seed, micro-batch number), and a
checkpoint holds the student's weights, the optimizer and scheduler states, every RNG
state and the step, so a run stopped after a checkpoint and restarted ends with the
same weights as one that never stopped.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kd2edge.distill.losses import IGNORE_INDEX, TopK, kd_loss

CHECKPOINT = "checkpoint.pt"
KD_POSITIONS = ("all", "answer")


@dataclass(frozen=True)
class TrainExample:
    """One tokenized training sequence.

    `labels[t]` is the token that position t must predict (input_ids[t + 1]) on answer
    positions and IGNORE_INDEX elsewhere: labels are already shifted, so the teacher
    cache and the student agree on which positions count.
    """

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    item_id: str = ""

    @property
    def answer_positions(self) -> int:
        return sum(1 for y in self.labels if y != IGNORE_INDEX)

    def scored_positions(self, kd_positions: str) -> int:
        """Positions the loss reads: the answer's, or ("all") every one that predicts a next token."""
        return len(self.input_ids) - 1 if kd_positions == "all" else self.answer_positions


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)   # one row per optimizer step
    seconds: float = 0.0          # wall time of this call (not counting earlier, interrupted calls)
    tokens: int = 0               # sequence tokens the student processed in this call
    answer_tokens: int = 0        # of which scored answer tokens
    resumed_from: int = 0         # step the run resumed from (0 = fresh)
    mixed_precision: str = "no"


def collate(examples: list[TrainExample], pad_id: int, kd_positions: str = "answer"):
    """Right-pad a micro-batch.

    Returns:
        dict with input_ids [B, L], attention_mask [B, L], labels [B, L] (IGNORE_INDEX on padding) and
        scored [B, L] bool: the positions the loss reads (`TrainExample.scored_positions`).
    """
    import torch

    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        ids[b, :n] = torch.tensor(e.input_ids)
        labels[b, :n] = torch.tensor(e.labels)
        mask[b, :n] = 1
    scored = labels != IGNORE_INDEX
    if kd_positions == "all":
        # every real position but the last, which predicts nothing: [B, L]
        scored = mask.bool() & (torch.arange(length)[None, :] < mask.sum(1, keepdim=True) - 1)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "scored": scored}


def micro_batch_indices(n_examples: int, batch_size: int, micro_batch: int, seed: int) -> list[int]:
    """Example indices of micro-batch number `micro_batch`: consecutive slices of per-epoch permutations.

    A pure function of its arguments, so a resumed run sees exactly the batches it would have.
    """
    import torch

    start = micro_batch * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n_examples)
        perm = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.extend(perm[offset:offset + batch_size - len(out)].tolist())
    return out


def teacher_rows(cache: list, indices: list[int], device):
    """Concatenate the cached teacher rows of a micro-batch in the gather order of `hidden[mask]`.

    Args:
        cache: per example, a TopK(values [n_i, k], indices [n_i, k]) or full logits [n_i, V].
        indices: the micro-batch's example indices.

    Returns:
        TopK [N, k] or a tensor [N, V], N = answer tokens of the micro-batch.
    """
    import torch

    rows = [cache[i] for i in indices]
    if isinstance(rows[0], TopK):
        return TopK(torch.cat([r.values for r in rows]).to(device).float(),
                    torch.cat([r.indices for r in rows]).to(device).long())
    return torch.cat(rows).to(device).float()


def scored_logits(model, batch: dict, vocab_size: int):
    """Logits of a causal LM at the batch's scored positions only.

    Args:
        model: a transformers causal LM.
        batch: input_ids, attention_mask, labels and scored, each [B, L] (`collate`).
        vocab_size: real vocabulary (len(tokenizer)); padded embedding rows are sliced off.

    Returns:
        (logits [N, V], labels [N]) with N the scored positions in the batch (row-major order),
        labels IGNORE_INDEX where a scored position is not an answer token.
    """
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              use_cache=False).last_hidden_state                      # [B, L, H]
    keep = batch["scored"]                                                             # [B, L]
    selected = hidden[keep]                                                            # [N, H], row-major
    logits = model.get_output_embeddings()(selected)[:, :vocab_size]                   # [N, V]
    return logits, batch["labels"][keep]


def scored_logits_module(model, vocab_size: int):
    """`model` wrapped so that its forward is `scored_logits`.

    accelerate (DDP under `accelerate launch`) wraps this module, so gradient
    synchronisation sees a normal forward call while unscored positions never get logits.
    """
    import torch

    class ScoredLogits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = model

        def forward(self, input_ids, attention_mask, labels, scored):
            return scored_logits(self.lm, {"input_ids": input_ids, "attention_mask": attention_mask,
                                           "labels": labels, "scored": scored}, vocab_size)

    return ScoredLogits()


def resolve_mixed_precision(requested: str) -> str:
    """'auto' -> bf16 on a GPU that supports it, fp16 on an older GPU, 'no' (fp32) on CPU."""
    import torch

    if requested != "auto":
        return requested if torch.cuda.is_available() else "no"
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _rng_state() -> dict:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, model, optimizer, scheduler, step: int, history: list[dict]) -> None:
    """Write the whole training state atomically (temporary file, then rename)."""
    import torch

    state = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": _rng_state(), "step": step, "history": history}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train_student(model, examples: list[TrainExample], teacher_cache: list | None, *, vocab_size: int, pad_id: int,
                  loss: str, temperature: float, kd_ratio: float, beta: float, steps: int, batch_size: int,
                  grad_accum: int, lr: float, warmup_ratio: float, max_grad_norm: float, seed: int,
                  work_dir: Path, checkpoint_every: int, mixed_precision: str = "auto", kd_positions: str = "answer",
                  on_step: Callable[[int, dict], None] | None = None, progress: bool = True) -> TrainResult:
    """Train `model` in place on the cached teacher outputs, resuming from `work_dir` if a checkpoint is there.

    Args:
        model: the student (a transformers causal LM), modified in place.
        examples: tokenized sequences with shifted labels.
        teacher_cache: per example the teacher's rows at its scored positions (TopK or full logits);
            None with loss "none" (cross-entropy on the targets only).
        vocab_size: the real vocabulary shared by teacher and student.
        pad_id: padding token id.
        loss, temperature, kd_ratio, beta: as in `kd2edge.distill.losses.kd_loss`.
        steps: optimizer steps; batch_size: sequences per micro-batch; grad_accum: micro-batches per step.
        lr, warmup_ratio, max_grad_norm: AdamW learning rate, linear warmup share, gradient clipping.
        seed: decides initialization order of data and RNGs.
        work_dir: where `checkpoint.pt` lives; checkpoint_every: steps between checkpoints.
        mixed_precision: "auto", "no", "bf16" or "fp16" (CPU always runs fp32).
        kd_positions: "all" (the divergence at every position, cross-entropy on the answer) or
            "answer" (both on the answer tokens only); the cache must hold the same positions.
        on_step: called after each optimizer step with (step, history row).
        progress: show a tqdm bar on stderr.

    Returns:
        TrainResult with the full loss history (including steps done before a resume).
    """
    import torch
    from accelerate import Accelerator
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    precision = resolve_mixed_precision(mixed_precision)
    accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
    random.seed(seed)
    torch.manual_seed(seed)
    model.train()
    model.config.use_cache = False
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  betas=(0.9, 0.95), weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(round(warmup_ratio * steps)), steps)
    checkpoint = Path(work_dir) / CHECKPOINT
    history: list[dict] = []
    start_step = 0
    if checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start_step, history = state["step"], state["history"]
    # Without a teacher (loss "none") only the answer's logits are needed.
    positions = kd_positions if teacher_cache is not None else "answer"
    wrapped, optimizer = accelerator.prepare(scored_logits_module(model, vocab_size), optimizer)
    result = TrainResult(history=history, resumed_from=start_step, mixed_precision=precision)
    rank, world = accelerator.process_index, accelerator.num_processes
    started = time.perf_counter()
    bar = tqdm(total=steps, initial=start_step, desc="distill", unit="step", disable=not progress or rank != 0,
               dynamic_ncols=True)
    for step in range(start_step, steps):
        totals = {"loss": 0.0, "kd": 0.0, "ce": 0.0}
        for a in range(grad_accum):
            micro = (step * grad_accum + a) * world + rank
            idx = micro_batch_indices(len(examples), batch_size, micro, seed)
            batch = collate([examples[i] for i in idx], pad_id, positions)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.autocast():
                logits, labels = wrapped(**batch)                                      # [N, V], [N]
            teacher = teacher_rows(teacher_cache, idx, accelerator.device) if teacher_cache is not None else None
            # The divergence reads every scored row; the cross-entropy the answer's (labels != IGNORE).
            parts = kd_loss(logits.float(), teacher, labels, kd_ratio=kd_ratio, loss=loss, temperature=temperature,
                            beta=beta, kd_mask=torch.ones_like(labels, dtype=torch.bool))
            accelerator.backward(parts.total / grad_accum)
            for k, v in zip(("loss", "kd", "ce"), parts):
                totals[k] += v.item() / grad_accum
            result.tokens += int(batch["attention_mask"].sum())
            result.answer_tokens += int((labels != IGNORE_INDEX).sum())
        grad_norm = accelerator.clip_grad_norm_(wrapped.parameters(), max_grad_norm) if max_grad_norm > 0 else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        row = {"step": step + 1, **{k: round(v, 6) for k, v in totals.items()}, "lr": scheduler.get_last_lr()[0],
               "grad_norm": round(float(grad_norm), 4) if grad_norm is not None else None}
        history.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", kd=f"{row['kd']:.3f}")
        if (step + 1) % checkpoint_every == 0 and step + 1 < steps and accelerator.is_main_process:
            save_checkpoint(checkpoint, model, optimizer, scheduler, step + 1, history)
        if on_step is not None:
            on_step(step + 1, row)
    bar.close()
    result.seconds = time.perf_counter() - started
    model.eval()
    model.config.use_cache = True
    return result
