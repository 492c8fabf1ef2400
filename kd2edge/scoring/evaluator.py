"""Score a model on a QA split: the same prompts for every kind of model.

A model is any backend of `kd2edge.scoring.backends` (PyTorch, GPTQ checkpoint, exported
ONNX artifact). Each backend formats the user prompt with the model's own chat template (the prompt
text itself comes from `kd2edge.data.prompts`, identical for all models), then:
  - extractive / free-text items: greedy generation, `extract_answer`, SQuAD EM/F1
    (MLQA's normalization for non-English items) and Rouge-L;
  - multiple-choice items: "loglik" mode scores each choice's text (" " + text, the
    distillation target's form) as a continuation of the prompt (sum of its tokens'
    log-probabilities, as lm-evaluation-harness does) and picks the best; "generate" mode
    generates an answer and reads the letter or choice text it names (`match_choice`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from kd2edge.data.items import QAItem, QADataset
from kd2edge.errors import DataError
from kd2edge.scoring import metrics
from kd2edge.scoring.backends import Backend, load_backend

MODES = ("loglik", "generate")
FREE_TEXT_CORRECT = 0.5   # a free-text answer counts as right (for regressions) at Rouge-L >= this


# ----------------------------------------------------------------------------- prompts

@dataclass(frozen=True)
class Prompted:
    """One evaluation item with its user prompt (before the chat template)."""

    item: QAItem
    text: str
    example_id: str | None = None


@dataclass(frozen=True)
class EvalSet:
    """The items of one evaluation, with their prompts and where the one-shot examples came from."""

    dataset: QADataset
    prompts: tuple[Prompted, ...]
    shots: int
    example_split: str | None
    warnings: tuple[str, ...] = ()

    @property
    def task(self) -> str:
        return self.dataset.task


def prepare(data_spec: str, split: str, shots: int, limit: int | None, seed: int) -> EvalSet:
    """Load a split and build every item's prompt (one-shot examples from the train split).

    Args:
        data_spec: "embedded", a hub id or a local file (see `kd2edge.data.loaders.load_qa`).
        split: the evaluation split.
        shots: 0 or 1.
        limit: at most this many items (None: all), chosen by the loader with `seed`.
        seed: picks the items and each one-shot example.

    Returns:
        The evaluation set.

    Raises:
        DataError: the split is empty or unreadable, or there is nothing to draw an example from.
    """
    from kd2edge.data.loaders import load_qa
    from kd2edge.data.prompts import build_prompt, pick_example

    if shots not in (0, 1):
        raise DataError(f"shots must be 0 or 1, got {shots}")
    dataset = load_qa(data_spec, split, limit, seed)
    if not dataset.items:
        raise DataError(f"{data_spec} split {split!r} has no items: choose another --split or dataset")
    warnings = list(dataset.warnings)
    pool, example_split = (), None
    if shots:
        pool, example_split, note = _example_pool(data_spec, split, seed, dataset)
        warnings += [note] if note else []
    prompts = []
    for item in dataset.items:
        example = None
        if shots:
            example = pick_example(pool, item, seed)
            if example is not None and _same_item(example, item):
                # The example must never give the answer away (the loader's pool overlaps the split).
                raise DataError(f"the one-shot example for item {item.id} is the item itself: "
                                f"its train and {split} splits overlap; use --shots 0 or another split")
        prompts.append(Prompted(item, build_prompt(item, example), example.id if example is not None else None))
    return EvalSet(dataset, tuple(prompts), shots, example_split, tuple(warnings))


def _example_pool(data_spec: str, split: str, seed: int, dataset: QADataset):
    """Items to draw one-shot examples from: the train split without any evaluated item.

    A local file is one split whatever the split name, so "train" may hold the evaluated
    items themselves: those are removed, and the pool is then "the items not evaluated",
    or, when every item is evaluated, the whole split (the example is another item).

    Returns:
        (pool, where the examples come from, a note for the user or None).
    """
    from kd2edge.data.loaders import load_qa

    try:
        train = load_qa(data_spec, "train", None, seed).items
    except DataError:
        train = ()
    evaluated = _item_keys(dataset.items)
    pool = tuple(it for it in train if not _item_keys([it]) & evaluated)
    if train and len(pool) == len(train):
        return pool, "train", None
    if not train:  # no train split at all: the other items of the evaluated split
        train = load_qa(data_spec, split, None, seed).items
        pool = tuple(it for it in train if not _item_keys([it]) & evaluated)
    if pool:
        return pool, f"{split} (items not evaluated)", (
            f"{data_spec} has no separate train split: one-shot examples come from its items that are not evaluated")
    # Every item is evaluated: examples are other evaluated items (`pick_example` never picks the item itself).
    return tuple(train), f"{split} (other items)", (
        f"{data_spec} has no separate train split and every item is evaluated: each one-shot example is "
        f"another evaluated item (never the item itself)")


def _item_keys(items: Iterable[QAItem]) -> set:
    """What makes two items the same question: the id, or the question with its context."""
    return {k for it in items for k in (("id", it.id), ("text", it.question, it.context))}


def _same_item(a: QAItem, b: QAItem) -> bool:
    return bool(_item_keys([a]) & _item_keys([b]))


# ----------------------------------------------------------------------------- scoring (pure)

def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a context and of its continuation, as lm-evaluation-harness splits them.

    The pair is encoded whole and the context's own length cut off, so the continuation's
    tokens are those the model really sees after the context. Trailing spaces of the
    context move to the continuation ("Answer: " + "Paris" -> "Answer:" + " Paris"), as
    BPE vocabularies attach a space to the following word.

    Returns:
        (context ids, continuation ids); the continuation has at least one token.
    """
    stripped = context.rstrip(" ")
    continuation = context[len(stripped):] + continuation
    whole = encode(stripped + continuation)
    n_ctx = len(encode(stripped))
    if n_ctx >= len(whole):
        raise DataError(f"choice {continuation!r} adds no token to the prompt: check the dataset's choices")
    return whole[:n_ctx], whole[n_ctx:]


def continuation_logprob(token_lp: np.ndarray, n_context: int) -> float:
    """Sum of the continuation's token log-probs.

    Args:
        token_lp: log p(ids[t] | ids[:t]) for t = 1..len-1, shape [len-1].
        n_context: tokens of the context (>= 1); the continuation is ids[n_context:].
    """
    return float(np.sum(token_lp[n_context - 1:]))


def pick_choice(scores: Sequence[float]) -> int:
    """Index of the best score (first on ties)."""
    return int(np.argmax(np.asarray(scores)))


def metric_lang(item: QAItem) -> str | None:
    """The normalization rule of an item: SQuAD's for English, MLQA's for other languages it knows."""
    if item.language == "en" or item.language not in metrics.MLQA_LANGUAGES:
        return None
    return item.language


def score_answer(item: QAItem, prediction: str) -> dict:
    """Per-item scores of a generated answer: em, f1 (and rouge_l for free text), correct.

    An unanswerable item (SQuAD v2.0: no gold answer) is matched by an empty answer or an
    abstention ("unanswerable", "no answer", ... see `metrics.NO_ANSWER_PHRASES`).
    """
    answerable = any(metrics.normalize_answer(a) for a in item.gold)
    if not answerable and metrics.is_no_answer(prediction):
        prediction = ""
    em, f1 = metrics.squad_scores(prediction, item.gold, lang=metric_lang(item))
    out = {"em": em, "f1": f1}
    if not answerable:
        out["answerable"] = False
    if item.task == "free_text":
        out["rouge_l"] = metrics.rouge_l_max(prediction, item.gold, stem=True)
        out["correct"] = out["rouge_l"] >= FREE_TEXT_CORRECT
    else:
        out["correct"] = em == 1.0
    return out


def summarize(records: Sequence[dict], task: str) -> dict:
    """Aggregate per-item records: n, em, f1 (+ accuracy, rouge_l), and a per-language breakdown."""
    def means(rs: Sequence[dict]) -> dict:
        keys = ["em", "f1"] + [k for k in ("accuracy", "accuracy_norm", "rouge_l") if k in rs[0]]
        return {"n": len(rs), **{k: sum(float(r[k]) for r in rs) / len(rs) for k in keys}}

    if not records:
        raise DataError("nothing was evaluated: the split has no items")
    out = means(records)
    if any(r.get("answerable") is False for r in records):
        # SQuAD v2.0's breakdown: questions with an answer and those without.
        has = [r for r in records if r.get("answerable", True)]
        out["has_answer"] = means(has) if has else {"n": 0}
        out["no_answer"] = means([r for r in records if r.get("answerable") is False])
    languages = sorted({r["language"] for r in records})
    if len(languages) > 1 or languages != ["en"]:
        out["by_language"] = {lang: means([r for r in records if r["language"] == lang]) for lang in languages}
    out["task"] = task
    return out


# ----------------------------------------------------------------------------- running

def run_items(backend: Backend, evalset: EvalSet, max_new_tokens: int, mode: str = "loglik",
              progress: bool = True, desc: str = "evaluate") -> list[dict]:
    """Answer and score every item of an evaluation set with one backend.

    Returns:
        One record per item: id, language, prompt (exactly what the model read), prediction,
        answers, em, f1, correct, and rouge_l / choice, choice_scores where they apply.
    """
    from tqdm import tqdm

    if mode not in MODES:
        raise DataError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    bar = tqdm(total=len(evalset.prompts), desc=desc, unit="item", disable=not progress, leave=False)
    records: list[dict] = []
    if evalset.task == "multiple_choice" and mode == "loglik":
        for p in evalset.prompts:
            records.append(_loglik_record(backend, p))
            bar.update(1)
    else:
        batch = max(1, backend.batch_size)
        # Batches of similar length pad little (English and Spanish prompts differ by half); the
        # records go back to the items' order.
        order = sorted(range(len(evalset.prompts)), key=lambda i: len(evalset.prompts[i].text)) if batch > 1 \
            else list(range(len(evalset.prompts)))
        by_index: dict[int, dict] = {}
        for start in range(0, len(order), batch):
            chunk = [evalset.prompts[i] for i in order[start:start + batch]]
            formatted = [backend.format_prompt(p.text) for p in chunk]
            outputs = backend.generate(formatted, max_new_tokens)
            for i, p, f, o in zip(order[start:start + batch], chunk, formatted, outputs):
                by_index[i] = _generated_record(p, f, o)
            bar.update(len(chunk))
        records = [by_index[i] for i in range(len(order))]
    bar.close()
    return records


def _base_record(p: Prompted, prompt: str) -> dict:
    return {"id": p.item.id, "language": p.item.language, "task": p.item.task, "prompt": prompt,
            "example_id": p.example_id, "answers": list(p.item.gold)}


def _generated_record(p: Prompted, prompt: str, output: str) -> dict:
    from kd2edge.data.prompts import extract_answer, match_choice

    item = p.item
    answer = extract_answer(output, item.task)
    record = {**_base_record(p, prompt), "generation": output}
    if item.task == "multiple_choice":
        label = match_choice(answer, item)
        chosen = item.choices[item.choice_labels.index(label)] if label else answer
        em, f1 = metrics.squad_scores(chosen, item.gold)
        correct = label is not None and label == item.answer_key
        record.update(prediction=chosen, choice=label, em=em, f1=f1, accuracy=float(correct),
                      correct=correct)
    else:
        record.update(prediction=answer, **score_answer(item, answer))
    return record


def _loglik_record(backend: Backend, p: Prompted) -> dict:
    item = p.item
    prompt = backend.format_prompt(p.text)
    # Each choice is scored as the training target would read it (`target_text`: " " + text).
    pairs = [encode_pair(backend.encode, prompt, " " + choice) for choice in item.choices]
    sequences = [ctx + cont for ctx, cont in pairs]
    lps = []
    for start in range(0, len(sequences), max(1, backend.batch_size)):
        lps += backend.token_logprobs(sequences[start:start + max(1, backend.batch_size)])
    scores = [continuation_logprob(lp, len(ctx)) for lp, (ctx, _) in zip(lps, pairs)]
    # acc_norm divides by the choice's length in bytes, as lm-evaluation-harness does.
    normed = [s / max(1, len(c.encode("utf-8"))) for s, c in zip(scores, item.choices)]
    best, best_norm = pick_choice(scores), pick_choice(normed)
    label = item.choice_labels[best]
    em, f1 = metrics.squad_scores(item.choices[best], item.gold)
    correct = label == item.answer_key
    return {**_base_record(p, prompt), "prediction": item.choices[best], "choice": label,
            "choice_scores": [round(s, 4) for s in scores], "em": em, "f1": f1,
            "accuracy": float(correct), "accuracy_norm": float(item.choice_labels[best_norm] == item.answer_key),
            "correct": correct}


def write_predictions(records: Iterable[dict], path: str | Path) -> Path:
    """Write per-item records as JSONL (one object per line, UTF-8)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def describe(evalset: EvalSet, data_spec: str, mode: str, max_new_tokens: int, seed: int,
             limit: int | None) -> dict:
    """The settings of an evaluation that decide its figures (also the teacher-cache key)."""
    return {"dataset": data_spec, "dataset_name": evalset.dataset.name, "split": evalset.dataset.split,
            "split_info": evalset.dataset.split_info,
            "task": evalset.task, "shots": evalset.shots, "example_split": evalset.example_split,
            "limit": limit, "seed": seed, "max_new_tokens": max_new_tokens,
            "mode": mode if evalset.task == "multiple_choice" else "generate",
            "prompt_template": prompt_template(evalset.task, evalset.shots),
            "item_ids": [p.item.id for p in evalset.prompts]}


def prompt_template(task: str, shots: int) -> str:
    """The user prompt with {placeholders}: `build_prompt` rendered on placeholder items,
    so it is exactly the text the models read, whatever the prompts module does."""
    from kd2edge.data.prompts import build_prompt

    def placeholder(tag: str) -> QAItem:
        labels = ("A", "B", "C", "D", "E") if task == "multiple_choice" else ()
        return QAItem(id=f"{{{tag}id}}", question=f"{{{tag}question}}", context=f"{{{tag}context}}",
                      answers=(f"{{{tag}answer}}",), answer_starts=(0,),
                      choices=tuple(f"{{{tag}choice_{x}}}" for x in labels), choice_labels=labels,
                      answer_key=labels[0] if labels else None, task=task)

    return build_prompt(placeholder(""), placeholder("example_") if shots else None)


def evaluate(model_path: str, data_spec: str, split: str = "validation", shots: int = 1,
             limit: int | None = 100, seed: int = 0, max_new_tokens: int = 24,
             predictions_path: str | Path | None = None, progress: bool = True, mode: str = "loglik",
             batch_size: int = 8) -> dict:
    """Evaluate one model on one QA split.

    Args:
        model_path: an exported artifact, a GPTQ checkpoint, "embedded", a hub id, a folder or a .gguf.
        data_spec: "embedded", a hub id or a local dataset file.
        split: the evaluation split.
        shots: 0 (zero-shot) or 1 (one example from the train split, never the item).
        limit: at most this many items (None: all).
        seed: picks the items and the examples.
        max_new_tokens: generation budget per answer.
        predictions_path: where to write per-item records as JSONL (None: not written).
        progress: show a progress bar on stderr.
        mode: multiple choice only: "loglik" (score each choice) or "generate" (ask for the letter).
        batch_size: prompts per generation batch (PyTorch backends).

    Returns:
        {n, em, f1, [accuracy, accuracy_norm, rouge_l], [by_language], task, model, backend,
         dataset, split, shots, mode, prompt_template, example_prompt, seconds, warnings, predictions}.

    Raises:
        DataError: empty split, unreadable or wrongly formatted dataset.
        ModelError: the model path is none of the accepted kinds.
    """
    if mode not in MODES:
        raise DataError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    evalset = prepare(data_spec, split, shots, limit, seed)
    backend = load_backend(model_path, batch_size=batch_size)
    started = time.perf_counter()
    records = run_items(backend, evalset, max_new_tokens, mode, progress, desc=f"evaluate {Path(str(model_path)).name}")
    result = summarize(records, evalset.task)
    settings = describe(evalset, data_spec, mode, max_new_tokens, seed, limit)
    settings.pop("item_ids")
    result.update(model=str(model_path), backend=backend.kind, **settings,
                  example_prompt=records[0]["prompt"], seconds=round(time.perf_counter() - started, 2),
                  warnings=list(evalset.warnings))
    if predictions_path is not None:
        result["predictions"] = str(write_predictions(records, predictions_path))
    return result
