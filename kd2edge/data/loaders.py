"""`load_qa`: one entry point from a dataset spec to a `QADataset`.

Specs (any of them may end in "@split", e.g. "squad@train"; a split may take a slice as in
`datasets`, "train[:80%]", "validation[:200]"):
- "xquad", "xquad-en", "xquad-es": the real XQuAD sample kd2edge ships (Wikipedia, English and
  Spanish, CC BY-SA 4.0; kd2edge/data/files/xquad), split by article.
- "embedded", "embedded-en", "embedded-es": the generated dataset (kd2edge.data.embedded), invented
  entities, for tests and smoke runs.
- a local file: SQuAD v1.1/v2.0 JSON; MLQA or XQuAD JSON (SQuAD layout, language taken from a name
  like dev-context-es-question-es.json or xquad.es.json, or given as "mlqa:PATH:es"); JSONL (or a
  JSON list) of CommonsenseQA records (official nested or flat Hugging Face layout), Dolly records
  (instruction/context/response/category) or generic question/context/answers records. A file is
  one body of questions: its "train" and "validation" parts are split by article, passage or item
  (`kd2edge.data.splits`: no passage on both sides, the split recorded in `split_info`), and "all"
  is the whole file, for a file that is a split of its own.
- a hub id through `datasets.load_dataset`: squad, rajpurkar/squad, mlqa (English; "mlqa:es" for
  Spanish), facebook/mlqa, commonsense_qa, tau/commonsense_qa, databricks/databricks-dolly-15k,
  or another owner/name whose rows have one of the record layouts above.

Loaders never crash on the small faults real files have (SQuAD offsets that don't match the
context, unanswerable v2 questions, unlabelled CommonsenseQA rows): they repair or keep what
they can and say so in `QADataset.warnings`. Anything they cannot read is a one-line DataError
that names the file, the record and the missing field.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import urlparse

from kd2edge.data import embedded, splits
from kd2edge.data.items import QADataset, QAItem, Task
from kd2edge.errors import DataError

# hub spec -> (repository, config name with {lang} for the language, default language)
HUB_DATASETS: dict[str, tuple[str, str | None]] = {
    "squad": ("rajpurkar/squad", None),
    "rajpurkar/squad": ("rajpurkar/squad", None),
    "mlqa": ("facebook/mlqa", "mlqa.{lang}.{lang}"),
    "facebook/mlqa": ("facebook/mlqa", "mlqa.{lang}.{lang}"),
    "commonsense_qa": ("tau/commonsense_qa", None),
    "tau/commonsense_qa": ("tau/commonsense_qa", None),
    "dolly": ("databricks/databricks-dolly-15k", None),
    "databricks/databricks-dolly-15k": ("databricks/databricks-dolly-15k", None),
}
MLQA_LANGUAGES = ("ar", "de", "en", "es", "hi", "vi", "zh")
# Languages a file name may carry (MLQA's and XQuAD's): xquad.es.json, dev-context-es-question-es.json.
FILE_LANGUAGES = MLQA_LANGUAGES + ("el", "ro", "ru", "th", "tr")
SPLIT_ALIASES = {"dev": "validation", "val": "validation", "valid": "validation"}
# A single file's parts (kd2edge.data.splits); "test" names a file that is a test set: all of it.
FILE_SPLIT_ALIASES = {"test": "all"}
XQUAD_FILES = Path(__file__).parent / "files" / "xquad"
_MLQA_NAME = re.compile(r"context-([a-z]{2})-question-([a-z]{2})")
_LANGUAGE_SUFFIX = re.compile(r"[._-]([a-z]{2})\.jsonl?$")
_SPLIT_SUFFIX = re.compile(r"[\w.\-\[\]:%+]+")
_SPLIT_SLICE = re.compile(r"([\w.\-]+)(\[(-?\d+%?)?:(-?\d+%?)?\])?")
_HUB_ID = re.compile(r"[\w.\-]+/[\w.\-]+")
_LANG = re.compile(r"[a-z]{2}")


def load_qa(spec: str, split: str = "validation", limit: int | None = None, seed: int = 0) -> QADataset:
    """Load a QA dataset split.

    Args:
        spec: "embedded[-en|-es]", a local file, "mlqa:PATH[:lang]" or a hub id; "SPEC@split" overrides `split`.
        split: the split to load, optionally sliced ("train[:80%]", "validation[-100:]"). For a local
            file the name is only a label (a file is one split) but the slice applies.
        limit: keep at most this many items, a reproducible random subset (in file order).
        seed: the seed that picks the subset.

    Returns:
        The dataset, with `warnings` for what the loader repaired or skipped.

    Raises:
        DataError: missing file, unreadable or truncated JSON, a record missing a field, an empty
            split, a malformed slice, a bad limit, or a hub id while the hub cannot be reached.
    """
    spec, split = _split_from_spec(spec.strip(), split)
    name, window = parse_split(split)
    dataset = _load(spec, SPLIT_ALIASES.get(name, name))
    if window is not None:
        start, end = window
        n = len(dataset.items)
        dataset = QADataset(dataset.name, split, dataset.items[_bound(start, n):_bound(end, n)], dataset.task,
                            dataset.warnings, dataset.split_info)
    if not dataset.items:
        raise DataError(f"{spec} ({split}) has no questions: give a non-empty file or another split")
    if limit is not None:
        dataset = subset(dataset, limit, seed)
    return dataset


def subset(dataset: QADataset, limit: int, seed: int) -> QADataset:
    """A reproducible random subset of `limit` items, kept in their original order.

    Raises:
        DataError: `limit` is below 1.
    """
    if limit < 1:
        raise DataError(f"limit must be at least 1, got {limit}: raise it or leave it unset for all items")
    if limit >= len(dataset.items):
        return dataset
    keep = sorted(random.Random(seed).sample(range(len(dataset.items)), limit))
    return QADataset(dataset.name, dataset.split, tuple(dataset.items[i] for i in keep), dataset.task,
                     dataset.warnings, dataset.split_info)


def parse_split(split: str) -> tuple[str, tuple[str | None, str | None] | None]:
    """'train[10:80%]' -> ('train', ('10', '80%')); 'train' -> ('train', None).

    Raises:
        DataError: a split that is not NAME or NAME[START:END] with integer or percent bounds.
    """
    m = _SPLIT_SLICE.fullmatch(split)
    if m is None:
        raise DataError(f"bad split {split!r}: write NAME or NAME[START:END], "
                        f"e.g. train, train[:80%], validation[:200]")
    name, bracket, start, end = m.groups()
    return name, ((start or None, end or None) if bracket else None)


def _bound(bound: str | None, n: int) -> int | None:
    """A slice bound as an index: '80%' -> round(0.8 n), '-10%' -> -round(0.1 n), '12' -> 12."""
    if bound is None:
        return None
    if bound.endswith("%"):
        pct = int(bound[:-1])
        return (1 if pct >= 0 else -1) * round(n * abs(pct) / 100)
    return int(bound)


def locate_answer(context: str, text: str, start: int | None) -> tuple[int, str]:
    """Check an answer's character offset against its context, repairing it when that is unambiguous.

    Args:
        context: the passage.
        text: the answer span's text.
        start: the offset the file gives, or None when it gives none.

    Returns:
        (offset, status). status is "ok" (the given offset matches), "found" (no offset given, the
        first occurrence is used), "fixed" (wrong offset, the text occurs exactly once), "unfixed"
        (wrong offset and the text occurs 0 or 2+ times: the given offset is kept) or "missing"
        (no offset given and the text is not in the context: -1).
    """
    if start is not None and 0 <= start and context[start:start + len(text)] == text:
        return start, "ok"
    first = context.find(text) if text else -1
    if start is None:
        return first, ("found" if first >= 0 else "missing")
    if first >= 0 and context.find(text, first + 1) < 0:
        return first, "fixed"
    return start, "unfixed"


# ----------------------------------------------------------------------------------------------
# Dispatch.

def _split_from_spec(spec: str, split: str) -> tuple[str, str]:
    """'SPEC@split' -> (SPEC, split), unless the whole spec is an existing path."""
    if "@" in spec and not Path(spec).exists():
        head, _, tail = spec.rpartition("@")
        if head and _SPLIT_SUFFIX.fullmatch(tail):
            return head, tail
    return spec, split


def _load(spec: str, split: str) -> QADataset:
    low = spec.lower()
    if low in ("embedded", "embedded-en", "embedded-es"):
        return _load_embedded(spec, split, None if low == "embedded" else low.rsplit("-", 1)[1])
    if low in ("xquad", "xquad-en", "xquad-es"):
        languages = ("en", "es") if low == "xquad" else (low.rsplit("-", 1)[1],)
        return _split_part(_combine([_load_file(XQUAD_FILES / f"xquad.{lang}.json", spec, split, lang)
                                     for lang in languages], spec), split)
    if low.startswith("mlqa:"):
        return _load_mlqa_spec(spec, split)
    path = Path(spec).expanduser()
    if path.is_file():
        return _split_part(_load_file(path, spec, split, language=None), split)
    if path.exists():
        raise DataError(f"{spec} is a folder: give a SQuAD JSON or a JSONL file inside it")
    if low in HUB_DATASETS or (_HUB_ID.fullmatch(spec) and path.suffix.lower() not in (".json", ".jsonl")):
        return _load_hub(spec, split, language="en")
    raise DataError(f"no such file: {spec}: give 'embedded', a local SQuAD JSON / JSONL file, "
                    f"or a hub id ({', '.join(sorted(k for k in HUB_DATASETS if '/' in k))})")


def _load_embedded(spec: str, split: str, language: str | None) -> QADataset:
    try:
        items = embedded.embedded_items(split, language)
    except ValueError as e:
        raise DataError(f"{spec}@{split}: {e}") from None
    return QADataset(spec, split, items, "extractive")


def _split_part(dataset: QADataset, split: str) -> QADataset:
    """The `split` part ("train", "validation" or "all") of a dataset read from one body of questions.

    Raises:
        DataError: a split name a file does not have.
    """
    part = FILE_SPLIT_ALIASES.get(split, split)
    if part not in splits.SPLIT_NAMES:
        raise DataError(f"{dataset.name} is one file, split by article into train and validation: ask for "
                        f"@train, @validation or @all (the whole file), not @{split}")
    items, info = splits.split_items(dataset.items, part)
    return QADataset(dataset.name, split, items, dataset.task, dataset.warnings, info)


def _combine(parts: list[QADataset], spec: str) -> QADataset:
    """Several files (one per language) as one dataset, items in file order."""
    return QADataset(spec, parts[0].split, tuple(it for p in parts for it in p.items), parts[0].task,
                     tuple(w for p in parts for w in p.warnings))


def _load_mlqa_spec(spec: str, split: str) -> QADataset:
    """'mlqa:PATH:lang', 'mlqa:PATH' (language from the file name) or 'mlqa:lang' (the hub)."""
    rest = spec.split(":", 1)[1]
    path_part, _, lang = rest.rpartition(":")
    if not path_part or not _LANG.fullmatch(lang):
        path_part, lang = rest, ""
    if not lang and _LANG.fullmatch(path_part) and not Path(path_part).exists():
        return _load_hub("mlqa", split, language=path_part)
    path = Path(path_part).expanduser()
    if not path.is_file():
        raise DataError(f"no such MLQA file: {path_part}: give an existing SQuAD-format MLQA JSON file")
    return _split_part(_load_file(path, spec, split, language=lang or None), split)


# ----------------------------------------------------------------------------------------------
# Local files.

def _load_file(path: Path, spec: str, split: str, language: str | None) -> QADataset:
    name = path.name
    if language is None and (m := _MLQA_NAME.search(name) or _LANGUAGE_SUFFIX.search(name)):
        language = m.group(1) if m.group(1) in FILE_LANGUAGES else None
    text = _read_text(path)
    if path.suffix.lower() == ".jsonl":
        return _from_records(_parse_jsonl(text, name), name, spec, split)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one JSON value per line (what datasets' to_json writes)
            return _from_records(_parse_jsonl(text, name), name, spec, split)
        raise DataError(f"{name} is not valid JSON at line {e.lineno} column {e.colno} ({e.msg}): "
                        f"the file is truncated or corrupt, fetch it again") from None
    if isinstance(doc, dict) and "data" in doc:
        return _from_squad(doc, name, spec, split, language or "en")
    if isinstance(doc, list):
        return _from_records(enumerate(doc, 1), name, spec, split)
    raise DataError(f"{name}: expected a SQuAD document {{\"data\": [...]}} or a list of records, "
                    f"got a {type(doc).__name__} with keys {sorted(doc)[:6] if isinstance(doc, dict) else '-'}")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}: check the path and that it is a UTF-8 text file") from None


def _parse_jsonl(text: str, name: str) -> list[tuple[int, Any]]:
    """[(record number, value)] for each non-blank line; the record number is the line number."""
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{name} record {lineno}: not valid JSON ({e.msg} at column {e.colno}): "
                            f"the line is truncated or corrupt, fix or drop it") from None
    return out


class _Notes:
    """What a loader repaired or skipped, turned into `QADataset.warnings`."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def offset(self, status: str) -> None:
        self.counts[f"offset_{status}"] += 1

    def warnings(self) -> tuple[str, ...]:
        c = self.counts
        out = []
        bad = c["offset_fixed"] + c["offset_unfixed"]
        if bad:
            out.append(f"{bad} answer offsets did not match their context: {c['offset_fixed']} fixed by finding "
                       f"the answer text, {c['offset_unfixed']} kept as given (text absent or repeated)")
        if c["offset_missing"]:
            out.append(f"{c['offset_missing']} answers do not occur in their context (offset -1)")
        if c["unanswerable"]:
            out.append(f"{c['unanswerable']} unanswerable questions (SQuAD v2) kept with no answer")
        if c["unlabelled"]:
            out.append(f"{c['unlabelled']} questions without an answerKey skipped (an unlabelled test split?)")
        return tuple(out)


def _from_squad(doc: dict, name: str, spec: str, split: str, language: str) -> QADataset:
    """SQuAD v1.1 / v2.0 (and MLQA, the same layout) -> extractive items."""
    notes = _Notes()
    items = []
    for a_i, article in enumerate(_get(doc, "data", name, list)):
        where_a = f"{name} data[{a_i}]"
        title = _get(article, "title", where_a, str, default="")
        for p_i, para in enumerate(_get(article, "paragraphs", where_a, list)):
            where_p = f"{where_a}.paragraphs[{p_i}]"
            context = _get(para, "context", where_p, str)
            for q_i, qa in enumerate(_get(para, "qas", where_p, list)):
                where = f"{where_p}.qas[{q_i}]"
                raw = _get(qa, "answers", where, list)
                impossible = bool(qa.get("is_impossible", False)) or not raw
                texts, starts = [], []
                for ans_i, ans in enumerate([] if impossible else raw):
                    text = _get(ans, "text", f"{where}.answers[{ans_i}]", str)
                    start, status = locate_answer(context, text, _get(ans, "answer_start", f"{where}.answers[{ans_i}]",
                                                                      int))
                    notes.offset(status)
                    texts.append(text)
                    starts.append(start)
                if impossible:
                    notes.counts["unanswerable"] += 1
                meta = {"title": title}
                if impossible:
                    meta["is_impossible"] = True
                items.append(QAItem(id=str(qa.get("id", where)), question=_get(qa, "question", where, str),
                                    context=context, answers=tuple(texts), answer_starts=tuple(starts),
                                    language=language, task="extractive", meta=meta))
    return QADataset(spec, split, tuple(items), "extractive", notes.warnings())


# ----------------------------------------------------------------------------------------------
# Records (JSONL lines, JSON lists, hub rows).

def record_format(record: Any, where: str) -> str:
    """Which layout a record has: "csqa", "dolly" or "extractive".

    Raises:
        DataError: the record is not an object, or has none of the known layouts.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "answerKey" in record or isinstance(record.get("question"), dict) or "choices" in record:
        return "csqa"
    if "instruction" in record:
        return "dolly"
    if "question" in record:
        return "extractive"
    raise DataError(f"{where}: unknown record layout (keys {', '.join(sorted(record)[:8])}): expected "
                    f"CommonsenseQA (question, choices, answerKey), Dolly (instruction, context, response) "
                    f"or extractive QA (question, context, answers)")


def _from_records(records: Iterable[tuple[int, Any]], name: str, spec: str, split: str,
                  language: str = "en") -> QADataset:
    """Convert numbered records; the first record decides the layout for all of them."""
    notes = _Notes()
    items: list[QAItem] = []
    convert: Callable[..., QAItem | None] | None = None
    task: Task = "extractive"
    for number, record in records:
        where = f"{name} record {number}"
        if convert is None:
            fmt = record_format(record, where)
            convert, task = _CONVERTERS[fmt]
        elif not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        item = convert(record, where, f"{name}-{number}", language, notes)
        if item is not None:
            items.append(item)
    return QADataset(spec, split, tuple(items), task, notes.warnings())


def _csqa_item(rec: dict, where: str, default_id: str, language: str, notes: _Notes) -> QAItem | None:
    """CommonsenseQA, official nested ({question: {stem, choices: [{label, text}]}}) or flat HF layout."""
    question = _get(rec, "question", where, (dict, str))
    if isinstance(question, dict):
        stem = _get(question, "stem", f"{where} question", str)
        choices = _get(question, "choices", f"{where} question", (list, dict))
        concept = question.get("question_concept")
    else:
        stem, choices, concept = question, _get(rec, "choices", where, (list, dict)), rec.get("question_concept")
    if isinstance(choices, dict):  # flat HF layout: {"label": [...], "text": [...]}
        labels = _get(choices, "label", f"{where} choices", list)
        texts = _get(choices, "text", f"{where} choices", list)
        if len(labels) != len(texts):
            raise DataError(f"{where}: choices have {len(labels)} labels but {len(texts)} texts")
    else:
        labels = [_get(c, "label", f"{where} choices[{i}]", str) for i, c in enumerate(choices)]
        texts = [_get(c, "text", f"{where} choices[{i}]", str) for i, c in enumerate(choices)]
    if not labels:
        raise DataError(f"{where}: no choices: a multiple-choice record needs at least two")
    key = rec.get("answerKey") or None
    if key is None:
        notes.counts["unlabelled"] += 1
        return None
    if key not in labels:
        raise DataError(f"{where}: answerKey {key!r} is not one of the choice labels {', '.join(map(str, labels))}")
    return QAItem(id=str(rec.get("id", default_id)), question=stem, choices=tuple(map(str, texts)),
                  choice_labels=tuple(map(str, labels)), answer_key=str(key), language=language,
                  task="multiple_choice", meta={"question_concept": concept} if concept else {})


def _dolly_item(rec: dict, where: str, default_id: str, language: str, notes: _Notes) -> QAItem:
    """Dolly: instruction/context/response/category -> free_text (the response is the reference)."""
    meta = {"category": rec["category"]} if "category" in rec else {}
    return QAItem(id=str(rec.get("id", default_id)), question=_get(rec, "instruction", where, str),
                  context=_get(rec, "context", where, str, default=""),
                  answers=(_get(rec, "response", where, str),), language=language, task="free_text", meta=meta)


def _extractive_item(rec: dict, where: str, default_id: str, language: str, notes: _Notes) -> QAItem:
    """question/context/answers, where answers is a string, a list of strings, a list of
    {text, answer_start} or the HF {text: [...], answer_start: [...]} columns."""
    context = _get(rec, "context", where, str)
    raw = _get(rec, "answers", where, (str, list, dict))
    pairs: list[tuple[Any, Any]]
    if isinstance(raw, str):
        pairs = [(raw, None)]
    elif isinstance(raw, dict):
        texts = _get(raw, "text", f"{where} answers", list)
        starts = raw.get("answer_start") or [None] * len(texts)
        pairs = list(zip(texts, starts))
    else:
        pairs = []
        for i, a in enumerate(raw):
            if isinstance(a, dict):
                pairs.append((_get(a, "text", f"{where} answers[{i}]", str), a.get("answer_start")))
            else:
                pairs.append((a, None))
    texts_out, starts_out = [], []
    for text, start in pairs:
        if not isinstance(text, str) or not (start is None or isinstance(start, int)):
            raise DataError(f"{where}: answers must be strings (with integer answer_start), got {text!r}")
        offset, status = locate_answer(context, text, start)
        notes.offset(status)
        texts_out.append(text)
        starts_out.append(offset)
    if not texts_out:
        notes.counts["unanswerable"] += 1
    return QAItem(id=str(rec.get("id", default_id)), question=_get(rec, "question", where, str), context=context,
                  answers=tuple(texts_out), answer_starts=tuple(starts_out),
                  language=str(rec.get("language", language)), task="extractive",
                  meta={"title": rec["title"]} if "title" in rec else {})


_CONVERTERS: dict[str, tuple[Callable[..., QAItem | None], Task]] = {
    "csqa": (_csqa_item, "multiple_choice"),
    "dolly": (_dolly_item, "free_text"),
    "extractive": (_extractive_item, "extractive"),
}
_MISSING = object()


def _get(record: Any, key: str, where: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
    """record[key], checked to be of `kind`.

    Raises:
        DataError: "<where>: missing '<key>'" or a wrong type, naming the record.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if key not in record or (record[key] is None and default is not _MISSING):
        if default is _MISSING:
            raise DataError(f"{where}: missing '{key}'")
        return default
    value = record[key]
    # bool is an int in Python, but never a valid offset or text
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise DataError(f"{where}: '{key}' should be {names}, got {type(value).__name__}")
    return value


# ----------------------------------------------------------------------------------------------
# Hub.

def _load_hub(spec: str, split: str, language: str) -> QADataset:
    """A hub dataset through `datasets.load_dataset`, its rows converted like JSONL records."""
    repo, config = HUB_DATASETS.get(spec.lower(), (spec, None))
    if config is not None:
        if language not in MLQA_LANGUAGES:
            raise DataError(f"MLQA has no language {language!r}: use one of {', '.join(MLQA_LANGUAGES)}")
        config = config.format(lang=language)
    if not _hub_reachable():
        raise DataError(f"the Hugging Face hub is unreachable, so {spec} cannot be downloaded: pass a local file "
                        f"(SQuAD JSON / JSONL) instead, or set HF_HUB_OFFLINE=1 to use a datasets cache")
    import datasets

    try:
        rows = datasets.load_dataset(repo, config, split=split)
    except ConnectionError:
        raise DataError(f"the Hugging Face hub is unreachable and {repo} is not in the datasets cache: "
                        f"pass a local file (SQuAD JSON / JSONL) instead") from None
    except datasets.exceptions.DatasetNotFoundError:
        raise DataError(f"{repo} is not a dataset on the Hugging Face hub: check the id or pass a local file") from None
    except ValueError as e:  # unknown split or config
        raise DataError(f"{repo}: cannot load split {split!r} ({str(e).splitlines()[0]}): "
                        f"name a split with {spec}@SPLIT") from None
    return _from_records(enumerate(rows, 1), repo, spec, split, language)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers, so an offline machine fails in seconds, not after retries.

    With HF_HUB_OFFLINE set or behind a proxy, let `datasets` decide (it reads its cache / the proxy).
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or \
            any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False
