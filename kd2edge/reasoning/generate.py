"""Teacher data generation: answers, rationales, or critique-revised rationales.

For each training question the teacher writes, depending on the method:

- "answer": an answer to the question (the student's own prompt);
- "rationale": "Rationale: ... Answer: ..." (a short explanation, then the answer);
- "critique-revision": a draft rationale, then a critique of the draft written with
  the gold answer in view, then a revised rationale and answer (draft -> critique ->
  revise). Needs gold answers.

Each record keeps the prompts, the raw teacher outputs, the parsed rationale and
answer, the answer's score against the gold, and the filter decision (kept, or why it
was dropped), so the file can be inspected and reused. The JSONL file is written
atomically (temp file + rename).

Generation is batched greedy decoding with the transformers teacher: chat template
applied, left padding (a decoder continues from the last position of every row). The
teacher's reply for a rationale is started for it with a primer ("Rationale: The context
says" for extractive questions, "Rationale:" otherwise) that it continues: asked only,
the embedded 135M teacher answers "The answer is X." and skips the reasoning (1 of 16
items kept, measured); primed, it quotes its evidence first (6 of 16). The primer is
part of the recorded output.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal, Sequence

from kd2edge.data.items import QAItem
from kd2edge.data.prompts import answer_kind, task_block
from kd2edge.errors import DataError, ResourceError
from kd2edge.scoring.parsing import ParsedOutput, parse_rationale_answer
from kd2edge.reasoning.rewards import answer_score

DataMethod = Literal["answer", "rationale", "critique-revision"]
DATA_METHODS = ("answer", "rationale", "critique-revision")
KEEP_MODES = ("correct", "all")
# Drop reasons, in the order they are checked.
NO_ANSWER, WRONG_ANSWER, NO_RATIONALE, META_TALK = "no_answer", "wrong_answer", "no_rationale", "meta_talk"
COPIED_EXAMPLE = "copied_example"
_META_WORDS = ("critique", "draft", "the student")
# Entities of the worked examples below that a copying teacher carries into its rationale.
DEMONSTRATION_NAMES = ("Orlan Bridge", "Mira Castel")

FORMAT_INSTRUCTION = ("First explain your reasoning in one or two sentences, then give the answer. "
                      "Use exactly this format:\nRationale: <your reasoning>\nAnswer: <{what}>")
# One invented worked example per task, shown after the instruction: a 135M teacher follows
# a demonstrated format far more often than a described one. It also copies it: a rationale
# naming the example's entities (DEMONSTRATION_NAMES) when the item does not is dropped.
DEMONSTRATIONS = {
    "extractive": ("Context: The Orlan Bridge was opened in 1902 by the engineer Mira Castel.\n"
                   "Question: Who opened the Orlan Bridge?\n"
                   "Rationale: The context says the bridge was opened by the engineer Mira Castel.\n"
                   "Answer: Mira Castel"),
    "multiple_choice": ("Question: Where would you keep milk cold?\nChoices:\nA. oven\nB. refrigerator\nC. cupboard\n"
                        "Rationale: Milk must stay cold, and a refrigerator is the appliance that keeps food cold.\n"
                        "Answer: B"),
    "free_text": ("Question: Name a use of salt.\n"
                  "Rationale: Salt adds flavour to food and keeps it from spoiling.\n"
                  "Answer: Salt is used to season food and to preserve it."),
}


# ----------------------------------------------------------------------------- prompts

def gold_text(item: QAItem) -> str:
    """The gold answer as shown to the critic ("B. bank" for multiple choice)."""
    if item.task == "multiple_choice" and item.answer_key:
        return f"{item.answer_key}. {item.gold[0]}"
    return item.gold[0]


def format_request(item: QAItem) -> str:
    """The format instruction with the task's worked example."""
    return (FORMAT_INSTRUCTION.format(what=answer_kind(item)) + "\n\nExample:\n" + DEMONSTRATIONS[item.task]
            + "\n\nNow your question:")


def reply_primer(item: QAItem) -> str:
    """How the teacher's rationale reply begins; the teacher continues it.

    Questions with a context get "Rationale: The context says" (the rationale of an
    extractive answer is its evidence), the others "Rationale:".
    """
    return "Rationale: The context says" if item.context else "Rationale:"


def rationale_prompt(item: QAItem) -> str:
    """The user message asking for "Rationale: ... Answer: ...": instruction, example, question."""
    return f"{format_request(item)}\n{task_block(item)}"


def critique_prompt(item: QAItem, draft: str) -> str:
    """The user message asking to critique a draft, with the gold answer in view."""
    return (f"{task_block(item)}\n\nA student wrote:\n{draft.strip()}\n\nThe correct answer is: {gold_text(item)}\n"
            "In one or two sentences, critique the student's reasoning: does it reach the correct answer, "
            "and what is wrong or missing?")


def revision_prompt(item: QAItem, draft: str, critique: str) -> str:
    """The user message asking for a revised rationale that fixes what the critique found."""
    return ("Rewrite the draft below so that its reasoning is correct and reaches the correct answer, explaining "
            "it from the question itself (do not mention the draft or the critique). " + format_request(item)
            + f"\n{task_block(item)}\n\nDraft:\n{draft.strip()}\n\nCritique:\n{critique.strip()}")


def student_prompt(item: QAItem) -> str:
    """The student's plain prompt for an item (kd2edge.data.prompts, zero-shot)."""
    from kd2edge.data.prompts import build_prompt

    return build_prompt(item)


# ----------------------------------------------------------------------------- the filter

def filter_decision(item: QAItem, parsed: ParsedOutput, needs_rationale: bool, min_score: float,
                    keep: str = "correct", completion: str = "") -> tuple[bool, str | None, float]:
    """Whether a teacher output is kept for training, and why not.

    Args:
        item: the question with its gold answer(s).
        parsed: the teacher's parsed output (for "answer" data: the answer only).
        needs_rationale: the method trains on the rationale (rationale, critique-revision).
        min_score: an answer counts as right when `answer_score >= min_score`
            (F1 for extractive, Rouge-L for free text; multiple choice scores 0 or 1).
        keep: "correct" drops wrong answers; "all" keeps them (the reason is still recorded).
        completion: the whole output (code items run the code found anywhere in it).

    Returns:
        (kept, drop_reason or None, answer score). Reasons: "no_answer", "no_rationale",
        "meta_talk" (the rationale talks about the draft/critique), "copied_example" (it
        names the worked example's entities, which the item does not), "wrong_answer".
        With keep="all" only unusable outputs (all but a wrong answer) are dropped.
    """
    score = answer_score(item, parsed.answer, completion)
    if parsed.answer is None:
        return False, NO_ANSWER, score
    if needs_rationale and not parsed.has_rationale:
        return False, NO_RATIONALE, score
    if needs_rationale and any(w in parsed.rationale.lower() for w in _META_WORDS):
        return False, META_TALK, score
    item_text = f"{item.context} {item.question}"
    if needs_rationale and any(n in parsed.rationale and n not in item_text for n in DEMONSTRATION_NAMES):
        return False, COPIED_EXAMPLE, score
    if score < min_score:
        return keep == "all", WRONG_ANSWER, score
    return True, None, score


def parse_answer_output(text: str, item: QAItem) -> ParsedOutput:
    """Parse an "answer"-method output as the evaluator reads answers (`extract_answer`)."""
    from kd2edge.data.prompts import extract_answer

    return ParsedOutput(rationale="", answer=extract_answer(text, item.task) or None, labelled=False,
                        rationale_labelled=False)


@dataclass
class TeacherRecord:
    """One line of the teacher-data JSONL file."""

    id: str
    method: str
    item: dict
    student_prompt: str
    prompts: dict
    outputs: dict
    rationale: str
    answer: str | None
    score: float
    kept: bool
    drop_reason: str | None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


def item_to_dict(item: QAItem) -> dict:
    """A QAItem as plain JSON (tuples become lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(item).items()}


def item_from_dict(data: dict) -> QAItem:
    """Inverse of `item_to_dict`.

    Raises:
        DataError: the dict is not a QAItem.
    """
    try:
        return QAItem(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()})
    except TypeError as e:
        raise DataError(f"a teacher-data record holds no valid item ({e}): regenerate the file with generate-data") from None


def make_record(item: QAItem, method: str, prompts: dict, outputs: dict, keep: str, min_score: float,
                student: str) -> TeacherRecord:
    """Parse the final teacher output of one item and decide whether to keep it.

    Args:
        item: the question.
        method: "answer", "rationale" or "critique-revision".
        prompts, outputs: {step: text} for the steps run ("answer"; "rationale";
            "draft", "critique", "revision"); the last step's output is the final one.
        keep, min_score: see `filter_decision`.
        student: the student's plain prompt for the item.
    """
    final = outputs[list(outputs)[-1]]
    parsed = parse_answer_output(final, item) if method == "answer" else parse_rationale_answer(final)
    kept, reason, score = filter_decision(item, parsed, method != "answer", min_score, keep, final)
    return TeacherRecord(id=item.id, method=method, item=item_to_dict(item), student_prompt=student,
                         prompts=prompts, outputs=outputs, rationale=parsed.rationale, answer=parsed.answer,
                         score=round(score, 6), kept=kept, drop_reason=reason)


# ----------------------------------------------------------------------------- generation

def greedy_generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 128, batch_size: int = 8,
                    desc: str = "generate", progress: bool = True,
                    primers: Sequence[str] | None = None) -> list[str]:
    """Greedy replies to user messages, in batches, with the chat template applied.

    Uses the evaluator's `TorchBackend` (chat template, left padding, greedy decoding),
    adding a progress bar and length-sorted batches.

    Args:
        model, tokenizer: a transformers causal LM (eval mode) and its tokenizer.
        prompts: user messages (plain text, no template).
        max_new_tokens: reply length limit.
        batch_size: prompts per batch; prompts are sorted by length so a batch pads
            little, and replies come back in the input order.
        desc: progress bar label (tqdm, stderr).
        progress: show the progress bar.
        primers: per prompt, the text the reply starts with (placed after the
            template's assistant turn; the model continues it); None: no primers.

    Returns:
        The decoded replies, primer included (special tokens removed, stripped), one per prompt.
    """
    from tqdm import tqdm

    from kd2edge.scoring.backends import TorchBackend

    primers = list(primers) if primers is not None else [""] * len(prompts)
    backend = TorchBackend(model, tokenizer, batch_size)
    # A chat template ends with the assistant turn's header; a plain prompt gets a new line first.
    sep = "" if backend.templated else "\n"
    texts = [backend.format_prompt(p) + (sep + primer if primer else "") for p, primer in zip(prompts, primers)]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[str] = [""] * len(texts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress):
        idx = order[start:start + batch_size]
        for i, reply in zip(idx, backend.generate([texts[i] for i in idx], max_new_tokens)):
            # The continuation keeps its leading space ("says" + " the ..."), so plain concatenation.
            out[i] = (primers[i] + reply).strip()
    return out


# generate(user prompts, step name, reply primers) -> whole replies, each beginning with its primer.
Generator = Callable[[Sequence[str], str, Sequence[str]], list[str]]


def teacher_records(items: Sequence[QAItem], method: str, generate: Generator, keep: str = "correct",
                    min_score: float = 0.5) -> list[TeacherRecord]:
    """Run the method's steps over all items (each step one batched pass) and filter.

    Args:
        items: training questions.
        method: "answer", "rationale" or "critique-revision".
        generate: `generate(prompts, step_name, primers) -> replies` (the teacher, batched;
            each reply begins with its primer: `reply_primer` for rationale steps, "" otherwise).
        keep, min_score: see `filter_decision`.

    Returns:
        One record per item, in order.

    Raises:
        DataError: an unknown method or keep mode; critique-revision on items without gold answers.
    """
    check_method(method, keep)
    items = list(items)
    if method == "critique-revision":
        missing = [it.id for it in items if not any(a.strip() for a in it.gold)]
        if missing:
            raise DataError(f"critique-revision needs gold answers, but {len(missing)} of {len(items)} items have none "
                            f"(first: {missing[0]}): use --method rationale, or a dataset with answers")
    students = [student_prompt(it) for it in items]
    primed, unprimed = [reply_primer(it) for it in items], [""] * len(items)
    if method == "answer":
        steps = {"answer": students}
        outs = {"answer": generate(students, "answer", unprimed)}
    elif method == "rationale":
        steps = {"rationale": [rationale_prompt(it) for it in items]}
        outs = {"rationale": generate(steps["rationale"], "rationale", primed)}
    else:
        steps = {"draft": [rationale_prompt(it) for it in items]}
        outs = {"draft": generate(steps["draft"], "draft", primed)}
        steps["critique"] = [critique_prompt(it, d) for it, d in zip(items, outs["draft"])]
        outs["critique"] = generate(steps["critique"], "critique", unprimed)
        steps["revision"] = [revision_prompt(it, d, c) for it, d, c in zip(items, outs["draft"], outs["critique"])]
        outs["revision"] = generate(steps["revision"], "revision", primed)
    return [make_record(it, method, {k: v[i] for k, v in steps.items()}, {k: v[i] for k, v in outs.items()},
                        keep, min_score, students[i]) for i, it in enumerate(items)]


def records_from_teacher(model, tokenizer, items: Sequence[QAItem], method: str, keep: str = "correct",
                         min_score: float = 0.5, max_new_tokens: int = 160, batch_size: int = 8,
                         progress: bool = True) -> list[TeacherRecord]:
    """`teacher_records` with a loaded transformers teacher (batched greedy generation).

    Args:
        model, tokenizer: the teacher, already loaded (eval mode, on its device).
        items, method, keep, min_score: see `teacher_records`.
        max_new_tokens, batch_size, progress: see `greedy_generate`.

    Raises:
        DataError: as `teacher_records`.
    """
    def generate(prompts, step, primers):
        return greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size, desc=step, progress=progress,
                               primers=primers)

    return teacher_records(items, method, generate, keep, min_score)


def cached_teacher_records(teacher, tokenizer, items: Sequence[QAItem], method: str, keep: str, cache: Path,
                           min_score: float, max_new_tokens: int, batch_size: int,
                           progress: bool = True) -> list[TeacherRecord]:
    """`records_from_teacher`, generated once and kept in `cache` (a JSONL file in a stage's work dir).

    A resumed run (same config: the pipeline clears the work dir when the config changes)
    reads the records back instead of generating them again.

    Returns:
        One record per item, in order.

    Raises:
        DataError: as `teacher_records`.
    """
    if cache.is_file():
        records = read_records(cache)
        if [r.id for r in records] == [it.id for it in items] and all(r.method == method for r in records):
            return records
    records = records_from_teacher(teacher, tokenizer, items, method, keep, min_score, max_new_tokens, batch_size,
                                   progress)
    write_jsonl_atomic(cache, (r.to_json() for r in records))
    return records


def check_method(method: str, keep: str = "correct") -> None:
    """Raises DataError for an unknown data method or keep mode."""
    if method not in DATA_METHODS:
        raise DataError(f"unknown data method {method!r}: use one of {', '.join(DATA_METHODS)}")
    if keep not in KEEP_MODES:
        raise DataError(f"unknown keep mode {keep!r}: use one of {', '.join(KEEP_MODES)}")


def has_usable_rationale(record: TeacherRecord) -> bool:
    """The record holds a rationale and an answer fit for training (right or wrong)."""
    return bool(record.rationale) and record.drop_reason not in (NO_ANSWER, NO_RATIONALE, META_TALK, COPIED_EXAMPLE)


def summarize(records: Sequence[TeacherRecord]) -> dict:
    """Counts for the report: items, kept, dropped per reason, mean answer score."""
    reasons: dict[str, int] = {}
    for r in records:
        if not r.kept and r.drop_reason:
            reasons[r.drop_reason] = reasons.get(r.drop_reason, 0) + 1
    n = len(records)
    return {"items": n, "kept": sum(r.kept for r in records), "dropped": reasons,
            "usable_rationales": (sum(has_usable_rationale(r) for r in records)
                                  if records and records[0].method != "answer" else None),
            "mean_score": round(sum(r.score for r in records) / n, 4) if n else None}


def write_jsonl_atomic(path: str | Path, lines: Iterable[str]) -> Path:
    """Write lines to `path` through a temp file in the same folder and a rename.

    Raises:
        ResourceError: the folder cannot be written.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as fh:
            for line in lines:
                fh.write(line + "\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ResourceError(f"cannot write {path} ({e.strerror}): choose a writable --out path") from None
    return path


def read_records(path: str | Path) -> list[TeacherRecord]:
    """Load a teacher-data JSONL file written by `generate_data`.

    Raises:
        DataError: missing file, or a line that is not a teacher record.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"teacher data {path} not found: write it with `kd2edge generate-data --out {path}`")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(TeacherRecord(**json.loads(line)))
        except (ValueError, TypeError) as e:
            raise DataError(f"{path}:{n} is not a teacher-data record ({e}): regenerate it with generate-data") from None
    return records


def generate_data(teacher: str, data: str, method: str, out: str | Path, limit: int | None = None,
                  keep: str = "correct", split: str = "train", seed: int = 0, batch_size: int = 8,
                  max_new_tokens: int = 160, min_score: float = 0.5, device: str | None = None,
                  progress: bool = True) -> dict:
    """Have the teacher write training data and save it as JSONL (the `generate-data` command).

    Args:
        teacher: model spec ("embedded", folder, .gguf, hub id).
        data: dataset spec for `kd2edge.data.loaders.load_qa`.
        method: "answer", "rationale" or "critique-revision".
        out: the JSONL file to write (atomically).
        limit: use the first `limit` items of the split.
        keep: "correct" keeps only right answers; "all" keeps wrong ones too.
        split, seed: dataset split and sampling seed.
        batch_size, max_new_tokens: generation settings.
        min_score: answer score counted as right (see `filter_decision`).
        device: "cpu"/"cuda" (default: cuda if available).

    Returns:
        The summary: counts, drop reasons, file path, teacher and data.

    Raises:
        DataError: bad method/keep, an empty dataset, critique-revision without gold
            answers, or a rationale method whose outputs hold no usable rationale for
            any item (the file is still written, to be inspected).
    """
    import torch

    from kd2edge.data.loaders import load_qa
    from kd2edge.models import load_causal_lm, resolve_model

    check_method(method, keep)
    dataset = load_qa(data, split=split, limit=limit, seed=seed)
    if not dataset.items:
        raise DataError(f"dataset {data!r} has no items in split {split!r}: check --data and --limit")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_causal_lm(resolve_model(teacher).path, device=device)
    records = records_from_teacher(model, tokenizer, dataset.items, method, keep, min_score, max_new_tokens,
                                   batch_size, progress)
    write_jsonl_atomic(out, (r.to_json() for r in records))
    summary = {"out": str(out), "teacher": teacher, "data": data, "split": split, "method": method, "keep": keep,
               "min_score": min_score, **summarize(records)}
    if method != "answer" and not summary["usable_rationales"]:
        raise DataError(f"the teacher wrote no usable 'Rationale: ... Answer: ...' for any of {len(records)} items "
                        f"(outputs kept in {out} for inspection): use a stronger teacher or --method answer")
    return summary
