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
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from kd2edge.distill.losses import IGNORE_INDEX, TopK
from kd2edge.distill.train import TrainExample, collate, scored_logits
from kd2edge.distributed import Ranks
from kd2edge.errors import DataError

TEACHER_CACHE = "teacher_logits.pt"
SEQKD_CACHE = "teacher_answers.json"
TEACHER_RECORDS = "teacher_records.jsonl"
TEACHER_MAX_NEW_TOKENS = 160   # rationale (or draft/critique/revision) length limit, as `kd2edge generate-data`
MIN_ANSWER_SCORE = 0.5   # a teacher answer counts as right at F1 / Rouge-L >= this (choice: exact)


def train_item_limit(steps: int, grad_accum: int, batch_size: int, train_limit: int | None) -> int | None:
    """Training items read: what `steps` x `grad_accum` x `batch_size` consume (one epoch), at most
    `train_limit`; with 0 steps, `train_limit` (None: the whole split)."""
    micro_batches = steps * grad_accum
    if not micro_batches:
        return train_limit
    return min(x for x in (train_limit, micro_batches * batch_size) if x is not None)


def training_items(data: str, limit: int | None, shots: int, seed: int) -> tuple[list, list[str], dict]:
    """The labelled items of the train split of `data`, their user prompts (`build_prompts`) and
    how the split was made (`QADataset.split_info`, {} for a dataset with its own splits).

    Raises:
        DataError: the split cannot be read, or none of its items has a gold answer.
    """
    from kd2edge.data.loaders import load_qa

    train_set = load_qa(data, "train", limit, seed)
    items = [it for it in train_set.items if it.gold]
    if not items:
        raise DataError(f"{data} has no training item with a gold answer: choose a labelled dataset")
    return items, build_prompts(items, train_set.items, shots, seed), train_set.split_info


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
    from kd2edge.scoring.backends import TorchBackend

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


@dataclass(frozen=True)
class StudentVocabulary:
    """The student's tokenizer: the teacher's, or trimmed to `old_ids` (`kd2edge.distill.vocab`)."""

    tokenizer: object
    old_ids: list[int] | None      # old_ids[student id] = teacher id; None: not trimmed
    old_size: int
    info: dict                     # for the manifest: sizes, tokens per word on the training text

    def teacher_ids(self, examples: Sequence[TrainExample]) -> list[list[int]]:
        """The examples' token sequences in the teacher's ids."""
        if self.old_ids is None:
            return [list(e.input_ids) for e in examples]
        return [[self.old_ids[i] for i in e.input_ids] for e in examples]


def student_vocabulary(tokenizer, items: Sequence, prompts: Sequence[str], size: int | None,
                       held_out: Sequence[str] = ()) -> StudentVocabulary:
    """The student's vocabulary: with `size` smaller than the teacher's, the tokens the training text
    needs most (prompts and gold answers), filled up in merge order (`vocab.choose_vocabulary`).

    Args:
        held_out: text the choice never sees (the evaluation prompts), on which the cost of trimming
            is reported: tokens per word with the teacher's and the student's tokenizer.

    Raises:
        ConfigError: `size` below what every trimmed vocabulary must keep, or a tokenizer that is
            not a byte-level BPE.
    """
    from kd2edge.data.prompts import target_text
    from kd2edge.distill import vocab

    if size is None or size >= len(tokenizer):
        return StudentVocabulary(tokenizer, None, len(tokenizer), {"size": len(tokenizer), "trimmed": False})
    texts = [p + target_text(it) for it, p in zip(items, prompts)]
    keep = vocab.choose_vocabulary(tokenizer, vocab.token_counts(tokenizer, texts), size)
    trimmed, old_ids = vocab.trim_tokenizer(tokenizer, keep)
    info = {"size": len(old_ids), "trimmed": True, "teacher_size": len(tokenizer), "file": "vocab_trim.json"}
    if held_out:
        info["held_out_tokens_per_word"] = {"teacher": round(vocab.tokens_per_word(tokenizer, held_out), 4),
                                            "student": round(vocab.tokens_per_word(trimmed, held_out), 4)}
    return StudentVocabulary(trimmed, old_ids, len(tokenizer), info)


def answer_examples(tokenizer, items: Sequence, prompts: Sequence[str], max_length: int) -> tuple[list[TrainExample], int]:
    """`build_examples` with the gold answers as targets (the "answer" path)."""
    from kd2edge.data.prompts import target_text

    return build_examples(tokenizer, items, prompts, [target_text(it) for it in items], max_length)


def rationale_examples(teacher, tokenizer, student_tokenizer, items: Sequence, prompts: Sequence[str], *,
                       data_method: str, train_method: str, keep: str, max_length: int, cache: Path, batch_size: int,
                       out: Path):
    """Training examples from the teacher's rationales (issue #9, `kd2edge.reasoning`).

    The teacher writes "Rationale: ... Answer: ..." (or draft -> critique -> revision) for every
    item, generated once into `cache` and copied to `out` for the user to read; the filter keeps
    what `keep` asks for; `train_method` turns the kept records into (prompt, target) pairs
    (answer, rationale-then-answer, or both as two tasks), tokenized like the answer path with the
    student's tokenizer (the teacher writes with its own, `tokenizer`).

    Returns:
        (examples, skipped, a summary for the manifest).

    Raises:
        DataError: the teacher wrote no usable target.
    """
    from kd2edge.reasoning.generate import cached_teacher_records, write_jsonl_atomic
    from kd2edge.reasoning.generate import summarize as summarize_records
    from kd2edge.reasoning.methods import build_pairs

    records = cached_teacher_records(teacher, tokenizer, items, data_method, keep, cache, MIN_ANSWER_SCORE,
                                     TEACHER_MAX_NEW_TOKENS, batch_size)
    write_jsonl_atomic(out, (r.to_json() for r in records))
    prompt_of = {it.id: p for it, p in zip(items, prompts)}
    pairs = build_pairs(records, train_method, prompt_fn=lambda item: prompt_of[item.id])
    examples, skipped = build_examples(student_tokenizer, [p.item for p in pairs], [p.prompt for p in pairs],
                                       [p.target for p in pairs], max_length)
    summary = {"data_method": data_method, "train_method": train_method, "keep": keep, "min_score": MIN_ANSWER_SCORE,
               "teacher_data": out.name, **summarize_records(records), "pairs": len(pairs),
               "pairs_by_task": {task: sum(p.task == task for p in pairs) for task in ("answer", "rationale")
                                 if any(p.task == task for p in pairs)}}
    return examples, skipped, summary


def teacher_answers(teacher, tokenizer, items: Sequence, prompts: Sequence[str], cache: Path,
                    max_new_tokens: int, batch_size: int = 8, progress: bool = True) -> list[str]:
    """Sequence-level KD targets: " " + the teacher's greedy answer to every prompt, cached as JSON by item id.

    A resumed run reuses the answers already generated.
    """
    from tqdm.auto import tqdm

    from kd2edge.data.prompts import extract_answer
    from kd2edge.scoring.backends import TorchBackend

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


def teacher_targets(teacher, teacher_tokenizer, student_tokenizer, items: Sequence, prompts: Sequence[str],
                    examples: list, skipped: int, work: Path, *, sequence_kd: bool, logits: bool, vocab_size: int,
                    topk: int, kd_positions: str, old_ids: Sequence[int] | None, max_length: int,
                    max_new_tokens: int, teacher_hash: str = "", cache_dir: Path | None = None,
                    group: Ranks | None = None, bf16: bool = False):
    """What the student learns from the teacher: its own answers as targets (sequence-level KD, when
    asked) and its top-k logits at the scored positions, both cached in the work dir `work`.

    Args:
        teacher_tokenizer, student_tokenizer: the same one unless the student's vocabulary is trimmed.
        examples, skipped: the training examples so far, in student ids (replaced with sequence-level KD).
        logits: whether the loss reads the teacher's logits (not for loss "none" or 0 steps).
        vocab_size, topk, kd_positions, old_ids, bf16: see `compute_teacher_logits`.
        max_length, max_new_tokens: sequence limit; the teacher's answer length (sequence-level KD).
        teacher_hash: the teacher's content hash (part of the logits cache's key).
        cache_dir: where the logits are cached (a folder shared across runs); default `work`.
        group: the processes of a launched run: the main one generates the sequence-level KD answers
            (the others read its cache), all of them share the logits pass (`cached_teacher_logits`).

    Returns:
        (examples, skipped, the cached teacher rows or None, the logits cache's info or None).
    """
    group = group or Ranks()
    if sequence_kd:
        targets = group.main_first(lambda: teacher_answers(teacher, teacher_tokenizer, items, prompts,
                                                           work / SEQKD_CACHE, max_new_tokens=max_new_tokens,
                                                           progress=group.is_main))
        examples, skipped = build_examples(student_tokenizer, items, prompts, targets, max_length)
    cache = info = None
    if logits:
        cache, info = cached_teacher_logits(cache_dir or work, teacher, examples, teacher_hash=teacher_hash,
                                            group=group, vocab_size=vocab_size, topk=topk,
                                            pad_id=student_tokenizer.pad_token_id, kd_positions=kd_positions,
                                            old_ids=old_ids, bf16=bf16)
        info = dict(info, precision="bf16 layers, fp32 head" if bf16 else "fp32")
    return examples, skipped, cache, info


def compute_teacher_logits(teacher, examples: Sequence[TrainExample], *, vocab_size: int, topk: int, pad_id: int,
                           kd_positions: str = "answer", old_ids: Sequence[int] | None = None, batch_size: int = 8,
                           bf16: bool = False, progress: bool = True) -> list:
    """The teacher's logits at each example's scored positions (the answer's, or all of them).

    Args:
        teacher: the teacher causal LM (eval mode).
        examples: tokenized sequences (labels mark the answer positions).
        vocab_size: the student's real vocabulary size (padded rows are sliced off).
        topk: keep the k largest logits per position (values fp32, indices int32); 0 = full
            vocabulary (fp16, about 2 bytes x V per scored position).
        pad_id: padding token id (of the examples' tokenizer).
        kd_positions: "answer" or "all" (`TrainExample.scored_positions`).
        old_ids: with a trimmed student vocabulary, old_ids[student id] = teacher id
            (`kd2edge.distill.vocab`): the teacher reads the student's token sequence in its own
            ids and its logits are taken at the kept columns, in the student's order, so every
            index in the cache is a student id.
        bf16: the teacher's decoder layers under bf16 autocast, its head in fp32 (`scored_logits`):
            about half the time on hardware with bf16 arithmetic; part of the cache's key.

    Returns:
        Per example: TopK(values [n_i, k], indices [n_i, k]) or a tensor [n_i, V], n_i its scored positions.
    """
    import torch
    from tqdm.auto import tqdm

    to_teacher = torch.as_tensor(old_ids, dtype=torch.long) if old_ids is not None else None   # [V_student]
    # Sort by length so batches pad little; results go back to the examples' order.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    out: list = [None] * len(examples)
    bar = tqdm(total=len(examples), desc="teacher logits", unit="seq", disable=not progress, leave=False)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = collate([examples[i] for i in idx], pad_id, kd_positions)
            if to_teacher is None:
                logits, _ = scored_logits(teacher, batch, vocab_size, bf16)           # [N, V]
            else:
                batch["input_ids"] = to_teacher[batch["input_ids"]]                  # student ids -> teacher ids
                # the head's kept rows only: half the teacher's head for a half-size vocabulary
                logits, _ = scored_logits(teacher, batch, vocab_size, bf16, columns=to_teacher)  # [N, V_student]
            counts = [examples[i].scored_positions(kd_positions) for i in idx]
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


def teacher_cache_key(teacher_hash: str, examples: Sequence[TrainExample], **kwargs) -> str:
    """What decides the cached rows: the teacher (its content hash), the token ids, top-k, the scored
    positions, the student's vocabulary (old_ids) and the teacher's precision (bf16)."""
    import hashlib

    blob = json.dumps([teacher_hash, [e.input_ids for e in examples], kwargs.get("topk"),
                       kwargs.get("kd_positions", "answer"), list(kwargs.get("old_ids") or [])]
                      + (["bf16"] if kwargs.get("bf16") else []))   # fp32 keys as before bf16 existed
    return hashlib.sha256(blob.encode()).hexdigest()


def cached_teacher_logits(folder: Path, teacher, examples: Sequence[TrainExample], teacher_hash: str = "",
                          group: Ranks | None = None, **kwargs) -> tuple[list, dict]:
    """`compute_teacher_logits`, saved in `folder` once and loaded from there afterwards.

    The file is named by `teacher_cache_key`, so one folder can hold the targets of several
    teachers, datasets and vocabularies: a run whose students share a teacher and data (a
    `--teacher-cache DIR` given to each) computes the teacher's logits once. The file is written
    through a temporary name and a rename, so a reader never sees half of it.

    In several processes (`group`), the main process decides whether the file is there; if not,
    process r computes the rows of examples r, r + W, r + 2W, ... and writes them to its own part
    file, the main process merges the parts into the cache file and removes them, and then every
    process reads that file. No file is written by two processes, and the teacher runs once over
    the data, split W ways.

    Returns:
        (rows, info): info = {file, reused, processes} for the manifest.
    """
    group = group or Ranks()
    key = teacher_cache_key(teacher_hash, examples, **kwargs)
    folder = Path(folder)
    path = folder / f"{TEACHER_CACHE.removesuffix('.pt')}-{key[:24]}.pt"
    rows = _read_teacher_cache(path, key) if group.is_main else None
    if group.broadcast(rows is not None):
        return (rows if group.is_main else _read_teacher_cache(path, key)), {"file": path.name, "reused": True}
    if group.is_main:
        folder.mkdir(parents=True, exist_ok=True)
    group.check_shared(folder)   # every process writes its part here and reads the merged file
    mine = compute_teacher_logits(teacher, examples[group.rank::group.world], progress=group.is_main, **kwargs)
    if group.world == 1:
        _write_teacher_cache(path, key, mine)
        return mine, {"file": path.name, "reused": False, "processes": 1}
    # A name no other run writing into a shared --teacher-cache folder can take.
    parts = folder / f".{path.name}.{group.broadcast(uuid.uuid4().hex[:12])}"
    _write_teacher_cache(parts.with_name(f"{parts.name}.part{group.rank}"), key, mine)
    group.barrier()
    if group.is_main:
        rows = [None] * len(examples)
        for r in range(group.world):
            part = parts.with_name(f"{parts.name}.part{r}")
            rows[r::group.world] = mine if r == 0 else _read_teacher_cache(part, key)
        _write_teacher_cache(path, key, rows)
        for r in range(group.world):
            parts.with_name(f"{parts.name}.part{r}").unlink()
    group.barrier()
    if not group.is_main:
        rows = _read_teacher_cache(path, key)
    return rows, {"file": path.name, "reused": False, "processes": group.world}


def _read_teacher_cache(path: Path, key: str) -> list | None:
    """The rows cached at `path` under `key`, or None (no file, or another key)."""
    import torch

    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=False)
    return saved["rows"] if saved.get("key") == key else None


def _write_teacher_cache(path: Path, key: str, rows: list) -> None:
    """Save `rows` under `key` at `path` through a temporary name and a rename."""
    import torch

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"key": key, "rows": rows}, tmp)
    tmp.replace(path)
