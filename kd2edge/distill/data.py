"""Training data for distillation: prompts, targets, sequence-level KD answers, cached teacher logits.

Prompts are exactly the evaluation's: `kd2edge.data.prompts.build_prompt` (zero- or
one-shot, the example never the item itself) through the model's chat template as the
evaluator's `TorchBackend` applies it. The target is " " + the gold answer + EOS, or
with sequence-level KD (Kim & Rush 2016) the teacher's own greedy answer.

The teacher runs once: its logits at every answer position are cached on disk (top-k
values and indices per position, or the full vocabulary in fp16 when top-k is 0) and
reused by every epoch and by a resumed run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from kd2edge.distill.losses import IGNORE_INDEX, TopK
from kd2edge.distill.train import TrainExample, collate, student_answer_logits
from kd2edge.errors import DataError

TEACHER_CACHE = "teacher_logits.pt"
SEQKD_CACHE = "teacher_answers.json"


def build_prompts(items: Sequence, pool: Sequence, shots: int, seed: int) -> list[str]:
    """The user prompt text of every item (before the chat template).

    Args:
        items: QAItems to train on.
        pool: QAItems to draw one-shot examples from (the item itself is never used).
        shots: 0 or 1.
        seed: picks the examples.

    Raises:
        DataError: a one-shot example would be the item itself.
    """
    from kd2edge.data.prompts import build_prompt, pick_example

    prompts = []
    for item in items:
        example = pick_example(pool, item, seed) if shots else None
        if example is not None and (example.id == item.id or
                                    (example.question == item.question and example.context == item.context)):
            raise DataError(f"the one-shot example for item {item.id} is the item itself: use --shots 0")
        prompts.append(build_prompt(item, example))
    return prompts


def encode_example(prompt_ids: list[int], answer_ids: list[int], max_length: int, item_id: str = "") -> TrainExample | None:
    """Join prompt and answer tokens into one sequence with shifted answer-only labels.

    Position t predicts token t + 1, so labels[t] = ids[t + 1] where token t + 1 belongs to
    the answer and IGNORE_INDEX elsewhere (the prompt, and the last position).

    Returns:
        The example, or None when it does not fit in `max_length` tokens or has no answer token.
    """
    ids = list(prompt_ids) + list(answer_ids)
    if len(ids) > max_length or not answer_ids or not prompt_ids:
        return None
    n_prompt = len(prompt_ids)
    labels = [ids[t + 1] if t + 1 >= n_prompt else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]
    return TrainExample(tuple(ids), tuple(labels), item_id)


def build_examples(tokenizer, items: Sequence, prompts: Sequence[str], targets: Sequence[str],
                   max_length: int) -> tuple[list[TrainExample], int]:
    """Tokenize prompt (as the evaluator formats and encodes it) + target + EOS for every item.

    Args:
        tokenizer: the teacher's (shared) tokenizer.
        items: the QAItems (for their ids).
        prompts: user prompt texts (`build_prompts`).
        targets: the continuation of each prompt, " " + answer (`kd2edge.data.prompts.target_text`).
        max_length: longer sequences are skipped.

    Returns:
        (examples, number of items skipped for being longer than max_length or having an empty target).

    Raises:
        DataError: no item is usable.
    """
    from kd2edge.evaluate.evaluator import TorchBackend

    backend = TorchBackend(None, tokenizer)
    eos = tokenizer.eos_token_id
    examples, skipped = [], 0
    for item, prompt, target in zip(items, prompts, targets):
        prompt_ids = backend.encode(backend.format_prompt(prompt))
        # The prompt ends in "Answer:" and the template's newline, so tokenizing the two parts
        # apart gives the same ids the model sees when it generates after the prompt.
        answer_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [eos] if target.strip() else []
        example = encode_example(prompt_ids, answer_ids, max_length, item.id)
        if example is None:
            skipped += 1
        else:
            examples.append(example)
    if not examples:
        raise DataError(f"no usable training item: all {skipped} have an empty answer or are longer than "
                        f"max_length={max_length} tokens; raise distill.max_length or choose another dataset")
    return examples, skipped


def teacher_answers(teacher, tokenizer, items: Sequence, prompts: Sequence[str], cache: Path,
                    max_new_tokens: int, batch_size: int = 8, progress: bool = True) -> list[str]:
    """Sequence-level KD targets: " " + the teacher's greedy answer to every prompt, cached as JSON by item id.

    A resumed run reuses the answers already generated.
    """
    from tqdm.auto import tqdm

    from kd2edge.data.prompts import extract_answer
    from kd2edge.evaluate.evaluator import TorchBackend

    done: dict[str, str] = json.loads(cache.read_text(encoding="utf-8")) if cache.is_file() else {}
    backend = TorchBackend(teacher, tokenizer, batch_size)
    todo = [(item, prompt) for item, prompt in zip(items, prompts) if item.id not in done]
    bar = tqdm(total=len(todo), desc="teacher answers", unit="item", disable=not progress, leave=False)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        outputs = backend.generate([backend.format_prompt(p) for _, p in chunk], max_new_tokens)
        for (item, _), text in zip(chunk, outputs):
            done[item.id] = " " + extract_answer(text, item.task)
        cache.write_text(json.dumps(done, ensure_ascii=False), encoding="utf-8")
        bar.update(len(chunk))
    bar.close()
    return [done[item.id] for item in items]


def compute_teacher_logits(teacher, examples: Sequence[TrainExample], *, vocab_size: int, topk: int, pad_id: int,
                           batch_size: int = 8, progress: bool = True) -> list:
    """The teacher's logits at each example's answer positions.

    Args:
        teacher: the teacher causal LM (eval mode).
        examples: tokenized sequences (labels mark the answer positions).
        vocab_size: real vocabulary size (padded rows are sliced off).
        topk: keep the k largest logits per position (values fp32, indices int32); 0 = full
            vocabulary (fp16, about 2 bytes x V per answer token).
        pad_id: padding token id.

    Returns:
        Per example: TopK(values [n_i, k], indices [n_i, k]) or a tensor [n_i, V].
    """
    import torch
    from tqdm.auto import tqdm

    # Sort by length so batches pad little; results go back to the examples' order.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    out: list = [None] * len(examples)
    bar = tqdm(total=len(examples), desc="teacher logits", unit="seq", disable=not progress, leave=False)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = collate([examples[i] for i in idx], pad_id)
            logits, _ = student_answer_logits(teacher, batch, vocab_size)          # [N, V]
            counts = [examples[i].answer_positions for i in idx]
            if topk:
                values, indices = logits.float().topk(min(topk, vocab_size), dim=-1)  # [N, k]
                for i, v, j in zip(idx, values.split(counts), indices.split(counts)):
                    out[i] = TopK(v.clone(), j.to(torch.int32).clone())
            else:
                for i, rows in zip(idx, logits.to(torch.float16).split(counts)):
                    out[i] = rows.clone()
            bar.update(len(idx))
    bar.close()
    return out


def cached_teacher_logits(path: Path, teacher, examples: Sequence[TrainExample], **kwargs) -> list:
    """`compute_teacher_logits`, saved to `path` once and loaded from there afterwards.

    The file records the examples' token ids' hash, so a cache made for other data is recomputed.
    """
    import hashlib

    import torch

    key = hashlib.sha256(json.dumps([e.input_ids for e in examples]).encode()
                         + json.dumps(kwargs.get("topk")).encode()).hexdigest()
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=False)
        if saved.get("key") == key:
            return saved["rows"]
    rows = compute_teacher_logits(teacher, examples, **kwargs)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"key": key, "rows": rows}, tmp)
    tmp.replace(path)
    return rows
