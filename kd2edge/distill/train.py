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

Several processes (DDP through accelerate, `kd2edge.distributed`): `batch_size` is per
process, and process r of W takes micro-batch number (step x grad_accum + a) x W + r, so
W processes at batch B/W read exactly the examples one process reads at batch B. Each
micro-batch's loss is weighted by its share of the step's scored positions over all
micro-batches and processes, so a step's gradient is the mean over the global batch's
positions however the batch is split (DDP averages gradients over processes; the loss
history is summed over processes the same way). Only the main process writes the
checkpoint; it holds every process's RNG state, and a run resumes with as many processes
as it was checkpointed with. The student is replicated in every process (DDP): accelerate's
FSDP is refused, since a checkpoint is the full state written by the main process and FSDP
shards it across processes; on CPU accelerate 1.x runs DDP even with an FSDP config, which the
result's warnings say.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from kd2edge.distill.losses import IGNORE_INDEX, TopK, kd_loss
from kd2edge.distributed import Ranks, ranks
from kd2edge.errors import ConfigError

CHECKPOINT = "checkpoint.pt"
KD_POSITIONS = ("all", "answer")
# Test hooks, never set in normal use: write each micro-batch's example indices to DIR/rank<r>.jsonl;
# pause this many seconds after writing a checkpoint (the interruption tests kill the processes then).
TRACE_ENV = "KD2EDGE_TEST_TRACE_BATCHES"
PAUSE_ENV = "KD2EDGE_TEST_PAUSE_AFTER_CHECKPOINT"


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
    num_processes: int = 1
    per_process: list[dict] = field(default_factory=list)   # sequences and tokens each process trained on
    warnings: list[str] = field(default_factory=list)


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


# Length grouping: how many global batches are sorted by length together (`epoch_order`).
GROUP_BATCHES = 8


def epoch_order(n_examples: int, epoch: int, seed: int, lengths: Sequence[int] | None = None,
                global_batch: int = 1) -> list[int]:
    """The order in which one epoch reads the examples: a seeded permutation, length-grouped.

    With `lengths`, the permutation is cut into chunks of GROUP_BATCHES global batches, each chunk
    sorted by length and cut into global batches, and the full batches shuffled (a short last one
    stays last). A micro-batch, a consecutive slice of a global batch, then holds sequences of
    similar length, so right padding wastes little: on the default run's XQuAD training sequences,
    padded / real tokens 1.36 -> 1.06 at 8 per micro-batch. The grouping depends on the global
    batch only, so W processes at batch B/W still read what one process reads at batch B.

    Args:
        n_examples: examples in the epoch.
        epoch, seed: the permutation's seed is a function of both.
        lengths: per example, its token count; None: the plain permutation.
        global_batch: sequences per optimizer step over all micro-batches and processes.

    Returns:
        A permutation of range(n_examples).
    """
    import torch

    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n_examples, generator=generator).tolist()
    if lengths is None or global_batch <= 1:
        return perm
    chunk = GROUP_BATCHES * global_batch
    batches = []
    for start in range(0, n_examples, chunk):
        part = sorted(perm[start:start + chunk], key=lambda i: lengths[i])
        batches += [part[j:j + global_batch] for j in range(0, len(part), global_batch)]
    last = [batches.pop()] if len(batches[-1]) < global_batch else []
    shuffled = [batches[b] for b in torch.randperm(len(batches), generator=generator).tolist()] + last
    return [i for batch in shuffled for i in batch]


def micro_batch_indices(n_examples: int, batch_size: int, micro_batch: int, seed: int,
                        lengths: Sequence[int] | None = None, global_batch: int = 1) -> list[int]:
    """Example indices of micro-batch number `micro_batch`: consecutive slices of the epochs' orders
    (`epoch_order`; `lengths` and `global_batch` group them by length).

    A pure function of its arguments, so a resumed run sees exactly the batches it would have.
    """
    start = micro_batch * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n_examples)
        order = epoch_order(n_examples, epoch, seed, lengths, global_batch)
        out.extend(order[offset:offset + batch_size - len(out)])
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


def scored_logits(model, batch: dict, vocab_size: int, body_bf16: bool = False, columns=None):
    """Logits of a causal LM at the batch's scored positions only.

    Args:
        model: a transformers causal LM.
        batch: input_ids, attention_mask, labels and scored, each [B, L] (`collate`).
        vocab_size: real vocabulary (len(tokenizer)); padded embedding rows are sliced off.
        body_bf16: run the decoder layers under bf16 autocast and the head in fp32 (the teacher's
            cached logits: most of the compute at bf16 speed, the logits' last step exact).
        columns: [V'] long tensor, the head rows to compute, in this order (a trimmed student's
            teacher ids: the teacher's logits at the kept tokens only); None: rows 0..vocab_size-1.

    Returns:
        (logits [N, V], labels [N]) with N the scored positions in the batch (row-major order),
        labels IGNORE_INDEX where a scored position is not an answer token.
    """
    import torch

    device = batch["input_ids"].device.type
    with torch.autocast(device, dtype=torch.bfloat16) if body_bf16 else contextlib.nullcontext():
        hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  use_cache=False).last_hidden_state                  # [B, L, H]
    keep = batch["scored"]                                                             # [B, L]
    selected = hidden[keep].float() if body_bf16 else hidden[keep]                     # [N, H], row-major
    head = model.get_output_embeddings()
    if columns is not None:
        rows = head.weight.index_select(0, columns)                                    # [V', H]
        bias = head.bias.index_select(0, columns) if head.bias is not None else None
        return torch.nn.functional.linear(selected, rows, bias), batch["labels"][keep]  # [N, V']
    logits = head(selected)[:, :vocab_size]                                            # [N, V]
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


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 arithmetic in hardware (AVX512-BF16 or AMX), where autocast to bf16 pays
    (2-core Zen 4: 40 steps of the 18-layer SmolLM2 student 9.3 -> 6.5 min, a bare forward-backward at
    8 x 340 tokens 10-11.5 -> 5.8 s); elsewhere bf16 is emulated and slower than fp32."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_mixed_precision(requested: str) -> str:
    """The precision training runs at.

    'auto' -> bf16 on a GPU that supports it, fp16 on an older GPU, bf16 on a CPU with bf16 in
    hardware, otherwise 'no' (fp32). An explicit 'bf16' runs on any device; 'fp16' needs a GPU
    (CPU: 'no'). Master weights and optimizer state stay fp32 either way (autocast).
    """
    import torch

    cuda = torch.cuda.is_available()
    if requested == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_native_bf16() else "no"
    if requested == "fp16" and not cuda:
        return "no"
    return requested


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


def save_checkpoint(path: Path, model, optimizer, scheduler, step: int, history: list[dict],
                    rng_states: list[dict] | None = None) -> None:
    """Write the whole training state atomically (temporary file, then rename).

    Args:
        rng_states: every process's RNG state, in rank order (default: this process's only).
    """
    import torch

    rng_states = rng_states or [_rng_state()]
    state = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": rng_states[0], "rng_per_process": rng_states, "num_processes": len(rng_states),
             "step": step, "history": history}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model, optimizer, scheduler, group: Ranks) -> tuple[int, list[dict]]:
    """Restore the training state written by `save_checkpoint` into this process; (step, history).

    Raises:
        ConfigError: the checkpoint was taken with another number of processes (the global batch
            and the data each process reads would change).
    """
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False)
    taken = state.get("num_processes", 1)
    if taken != group.world:
        raise ConfigError(f"the checkpoint in {path.parent} was taken with {taken} process(es), this run has "
                          f"{group.world}: resume with --num-processes {taken}, or delete {path.parent} to start over")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state.get("rng_per_process", [state["rng"]])[group.rank])
    return state["step"], state["history"]


FSDP_REFUSED = ("FSDP would shard the student, whose checkpoints are full states written by the main process: "
                "launch without an FSDP accelerate config (DDP: --num-processes N)")


def fsdp_requested() -> bool:
    """Whether the launch asked accelerate for FSDP (an accelerate config with distributed_type FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def _parallelism_warnings(accelerator) -> list[str]:
    """Refuse accelerate's FSDP for the student; say when an FSDP launch runs DDP instead (CPU).

    Raises:
        ConfigError: accelerate would shard the student (FSDP on GPUs).
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        raise ConfigError(FSDP_REFUSED)
    if fsdp_requested():
        return [f"the launch asked for FSDP but accelerate runs {accelerator.distributed_type.value} on this "
                "machine (no FSDP on CPU): every process held the whole student"]
    return []


def step_positions(examples: list[TrainExample], step: int, *, batch_size: int, grad_accum: int, world: int,
                   seed: int, kd_positions: str) -> tuple[int, int]:
    """The scored (divergence) and answer (cross-entropy) positions of a whole optimizer step, over
    every micro-batch of every process: the denominators of the step's global-batch means.

    Every process computes them alone: the micro-batches are a pure function of their number.
    """
    n_kd = n_ce = 0
    lengths, global_batch = [len(e.input_ids) for e in examples], batch_size * grad_accum * world
    for micro in range(step * grad_accum * world, (step + 1) * grad_accum * world):
        for i in micro_batch_indices(len(examples), batch_size, micro, seed, lengths, global_batch):
            n_kd += examples[i].scored_positions(kd_positions)
            n_ce += examples[i].answer_positions
    return n_kd, n_ce


def _trace(folder: str | None, rank: int, step: int, micro: int, indices: list[int]) -> None:
    """Append a micro-batch's example indices to folder/rank<r>.jsonl (the TRACE_ENV test hook)."""
    if folder:
        with open(Path(folder) / f"rank{rank}.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, "micro": micro, "indices": indices}) + "\n")


def _pause_after_checkpoint(step: int, is_main: bool) -> None:
    """The PAUSE_ENV test hook: say that the checkpoint of `step` is written, then sleep."""
    seconds = float(os.environ.get(PAUSE_ENV) or 0)
    if seconds > 0:
        if is_main:
            print(f"kd2edge: checkpoint at step {step} written, pausing ({PAUSE_ENV})", file=sys.stderr, flush=True)
        time.sleep(seconds)


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
        steps: optimizer steps; batch_size: sequences per micro-batch of each process; grad_accum: micro-batches
            per step (the global batch is batch_size x grad_accum x processes).
        lr, warmup_ratio, max_grad_norm: AdamW learning rate, linear warmup share, gradient clipping.
        seed: decides initialization order of data and RNGs.
        work_dir: where `checkpoint.pt` lives; checkpoint_every: steps between checkpoints.
        mixed_precision: "auto", "no", "bf16" or "fp16" (`resolve_mixed_precision`).
        kd_positions: "all" (the divergence at every position, cross-entropy on the answer) or
            "answer" (both on the answer tokens only); the cache must hold the same positions.
        on_step: called after each optimizer step with (step, history row).
        progress: show a tqdm bar on stderr.

    Returns:
        TrainResult with the full loss history (including steps done before a resume), the same in
        every process.

    Raises:
        ConfigError: a checkpoint taken with another number of processes.
    """
    import torch
    from accelerate import Accelerator
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    group = ranks()
    precision = resolve_mixed_precision(mixed_precision)
    cpu = not torch.cuda.is_available()
    # accelerate holds one precision per process (AcceleratorState) and refuses a second: on CPU the
    # bf16 autocast is applied here, so a later Accelerator in this process (GRPO's trainer) still starts.
    accelerator = Accelerator(mixed_precision="no" if cpu else precision, cpu=cpu)
    autocast = ((lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if cpu and precision == "bf16"
                else accelerator.autocast)
    warnings = _parallelism_warnings(accelerator)
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
    if group.broadcast(checkpoint.is_file()):
        start_step, history = load_checkpoint(checkpoint, model, optimizer, scheduler, group)
    # Without a teacher (loss "none") only the answer's logits are needed.
    positions = kd_positions if teacher_cache is not None else "answer"
    wrapped, optimizer = accelerator.prepare(scored_logits_module(model, vocab_size), optimizer)
    result = TrainResult(history=history, resumed_from=start_step, mixed_precision=precision,
                         num_processes=group.world, warnings=warnings)
    rank, world = group.rank, group.world
    lengths = [len(e.input_ids) for e in examples]   # micro-batches grouped by length (`epoch_order`)
    trace = os.environ.get(TRACE_ENV)
    sequences = 0
    started = time.perf_counter()
    bar = tqdm(total=steps, initial=start_step, desc="distill", unit="step", disable=not progress or rank != 0,
               dynamic_ncols=True)
    for step in range(start_step, steps):
        n_kd, n_ce = step_positions(examples, step, batch_size=batch_size, grad_accum=grad_accum, world=world,
                                    seed=seed, kd_positions=positions)
        sums = [0.0, 0.0, 0.0]   # this process's share of the step's loss, kd x positions, ce x positions
        for a in range(grad_accum):
            micro = (step * grad_accum + a) * world + rank
            idx = micro_batch_indices(len(examples), batch_size, micro, seed, lengths, batch_size * grad_accum * world)
            _trace(trace, rank, step, micro, idx)
            batch = collate([examples[i] for i in idx], pad_id, positions)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            # DDP averages gradients over the processes once per step, at the last micro-batch.
            sync = accelerator.no_sync(wrapped) if a < grad_accum - 1 else contextlib.nullcontext()
            with sync:
                with autocast():
                    logits, labels = wrapped(**batch)                                  # [N, V], [N]
                teacher = teacher_rows(teacher_cache, idx, accelerator.device) if teacher_cache is not None else None
                m_kd, m_ce = len(labels), int((labels != IGNORE_INDEX).sum())
                # This micro-batch's means, weighted by its share of the step's positions (times W:
                # DDP divides by W). The divergence reads every scored row; the cross-entropy the answer's.
                parts = kd_loss(logits.float(), teacher, labels, kd_ratio=kd_ratio, loss=loss,
                                temperature=temperature, beta=beta, kd_mask=torch.ones_like(labels, dtype=torch.bool),
                                kd_scale=world * m_kd / max(n_kd, 1), ce_scale=world * m_ce / max(n_ce, 1))
                accelerator.backward(parts.total)
            sums[0] += parts.total.item() / world
            sums[1] += parts.kd.item() * m_kd
            sums[2] += parts.ce.item() * m_ce
            result.tokens += int(batch["attention_mask"].sum())
            result.answer_tokens += m_ce
            sequences += len(idx)
        grad_norm = accelerator.clip_grad_norm_(wrapped.parameters(), max_grad_norm) if max_grad_norm > 0 else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        total, kd_sum, ce_sum = group.sum(sums)
        row = {"step": step + 1, "loss": round(total, 6), "kd": round(kd_sum / max(n_kd, 1), 6),
               "ce": round(ce_sum / max(n_ce, 1), 6), "lr": scheduler.get_last_lr()[0],
               "grad_norm": round(float(grad_norm), 4) if grad_norm is not None else None}
        history.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", kd=f"{row['kd']:.3f}")
        if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            rng_states = group.gather(_rng_state())
            if group.is_main:
                save_checkpoint(checkpoint, model, optimizer, scheduler, step + 1, history, rng_states)
            _pause_after_checkpoint(step + 1, group.is_main)
        if on_step is not None:
            on_step(step + 1, row)
    bar.close()
    result.seconds = time.perf_counter() - started
    result.per_process = [{"rank": r, "sequences": n, "tokens": t} for r, (n, t) in
                          enumerate(group.gather((sequences, result.tokens)))]
    result.tokens, result.answer_tokens = (int(x) for x in group.sum([result.tokens, result.answer_tokens]))
    model.eval()
    model.config.use_cache = True
    return result
