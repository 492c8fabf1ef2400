"""QA metrics as small pure functions, following the official scripts.

- SQuAD v1.1/v2.0 (`evaluate-v2.0.py`): `normalize_answer`, `exact_match`, `f1_score`; an
  unanswerable item (no gold answer) is matched only by an empty prediction (v2.0 rule).
- MLQA (`mlqa_evaluation_v1.py`): `normalize_answer(s, lang)` strips the language's
  articles and every Unicode punctuation character; Chinese is segmented per CJK character.
- CommonsenseQA: `choice_accuracy`.
- Rouge-L (Lin, 2004): F1 of the longest common subsequence of word tokens, with a
  Unicode-aware tokenizer and an optional Porter (1980) stemmer for MiniLLM's protocol
  (nltk is not installed here, so the stemmer is written below: the original algorithm).
- Retention: the deployed model's score over the teacher's, and the items it lost.

Only the standard library is used: these functions run anywhere the runtime runs.
"""

from __future__ import annotations

import re
import string
import sys
import unicodedata
from collections import Counter
from functools import lru_cache
from typing import Callable, Iterable, Sequence

# ----------------------------------------------------------------------------- SQuAD

_SQUAD_PUNCT = frozenset(string.punctuation)
_SQUAD_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(s: str, lang: str | None = None) -> str:
    """Normalize an answer the way the official evaluation scripts do.

    Args:
        s: an answer text.
        lang: None for SQuAD's rule (ASCII punctuation, English articles); an MLQA
            language code (en, es, de, vi, zh, ar, hi) for MLQA's per-language rule.

    Returns:
        Lower-cased text without punctuation and articles, white space collapsed
        (for zh, CJK characters separated by spaces).

    Raises:
        ValueError: an MLQA language the script does not know.
    """
    if lang is None:
        text = "".join(ch for ch in s.lower() if ch not in _SQUAD_PUNCT)
        return " ".join(_SQUAD_ARTICLES.sub(" ", text).split())
    if lang not in _MLQA_ARTICLES:
        raise ValueError(f"unknown MLQA language {lang!r} (known: {', '.join(sorted(_MLQA_ARTICLES))})")
    text = "".join(ch for ch in s.lower() if ch not in _unicode_punct())
    articles = _MLQA_ARTICLES[lang]
    if articles is not None:
        text = articles.sub(" ", text)
    tokens = mixed_segmentation(text) if lang == "zh" else text.split()
    return " ".join(t for t in tokens if t.strip())


def answer_tokens(s: str, lang: str | None = None) -> list[str]:
    """The tokens token-F1 compares: the normalized answer split on white space."""
    return normalize_answer(s, lang).split()


def exact_match(prediction: str, ground_truth: str, lang: str | None = None) -> float:
    """1.0 if the normalized texts are equal, else 0.0."""
    return float(normalize_answer(prediction, lang) == normalize_answer(ground_truth, lang))


def f1_score(prediction: str, ground_truth: str, lang: str | None = None) -> float:
    """Token F1 between a prediction and one gold answer (bag of normalized tokens).

    When either side has no token left after normalization, the score is 1.0 if both
    are empty and 0.0 otherwise (SQuAD v2.0's rule, needed for unanswerable items).
    """
    pred, gold = answer_tokens(prediction, lang), answer_tokens(ground_truth, lang)
    if not pred or not gold:
        return float(pred == gold)
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def metric_max_over_ground_truths(metric: Callable[..., float], prediction: str,
                                  ground_truths: Iterable[str], **kwargs) -> float:
    """The best score of `prediction` against any of the gold answers."""
    return max(metric(prediction, gt, **kwargs) for gt in ground_truths)


def squad_scores(prediction: str, answers: Sequence[str], lang: str | None = None) -> tuple[float, float]:
    """(EM, F1) of one prediction against all gold answers of one item.

    Args:
        prediction: the model's answer ("" means "no answer").
        answers: every gold answer; empty (or only answers that normalize to "") marks
            an unanswerable SQuAD v2.0 item, which only an empty prediction matches.
        lang: see `normalize_answer`.

    Returns:
        (exact match, token F1), each in [0, 1], maximised over the gold answers.
    """
    golds = [a for a in answers if normalize_answer(a, lang)] or [""]
    return (metric_max_over_ground_truths(exact_match, prediction, golds, lang=lang),
            metric_max_over_ground_truths(f1_score, prediction, golds, lang=lang))


# Answers that say "there is no answer". SQuAD v2.0 counts only the empty string as an
# abstention; a prompted LLM words it instead, so for unanswerable items these count as "".
NO_ANSWER_PHRASES = ("unanswerable", "no answer", "none", "n/a", "unknown", "not answerable",
                     "cannot be answered", "not mentioned", "not in the context", "not stated")


def is_no_answer(prediction: str) -> bool:
    """Whether a prediction is empty or an abstention phrase (after SQuAD normalization)."""
    text = normalize_answer(prediction)
    return text == "" or text in {normalize_answer(p) for p in NO_ANSWER_PHRASES}


# ----------------------------------------------------------------------------- MLQA

# Articles removed per language, as in MLQA's script. vi removes the classifier and
# function words the script lists; hi and zh have no articles. For ar the script's
# pattern `\sال^|ال` reduces to "remove every ال" (the first branch can never match,
# `^` after text), which also cuts ال inside words: we keep that, to match its figures.
_MLQA_ARTICLES: dict[str, re.Pattern | None] = {
    "en": re.compile(r"\b(a|an|the)\b"),
    "es": re.compile(r"\b(un|una|unos|unas|el|la|los|las)\b"),
    "de": re.compile(r"\b(ein|eine|einen|einem|eines|einer|der|die|das|den|dem|des)\b"),
    "vi": re.compile(r"\b(của|là|cái|chiếc|những)\b"),
    "ar": re.compile(r"\sال^|ال"),
    "hi": None,
    "zh": None,
}
_CJK = re.compile(r"[\u4e00-\u9fa5]")
MLQA_LANGUAGES = tuple(sorted(_MLQA_ARTICLES))


@lru_cache(maxsize=1)
def _unicode_punct() -> frozenset:
    """Every Unicode punctuation character (category P*) plus ASCII punctuation."""
    chars = {chr(i) for i in range(sys.maxunicode + 1) if unicodedata.category(chr(i)).startswith("P")}
    return frozenset(chars | _SQUAD_PUNCT)


def mixed_segmentation(text: str) -> list[str]:
    """MLQA's Chinese tokenization: each CJK character (and punctuation) is a token,
    runs of other characters are split on white space."""
    tokens: list[str] = []
    run = ""
    for ch in text:
        if _CJK.match(ch) or ch in _unicode_punct():
            tokens.extend(run.split())
            run = ""
            tokens.append(ch)
        else:
            run += ch
    tokens.extend(run.split())
    return tokens


# ----------------------------------------------------------------------------- CommonsenseQA

def choice_accuracy(predicted: Sequence[str | None], answer_keys: Sequence[str]) -> float:
    """Share of items whose predicted choice label equals the answer key.

    Raises:
        ValueError: the two sequences differ in length or are empty.
    """
    if len(predicted) != len(answer_keys) or not answer_keys:
        raise ValueError(f"choice_accuracy needs as many predictions as keys (>0), got {len(predicted)} and {len(answer_keys)}")
    return sum(p == k for p, k in zip(predicted, answer_keys)) / len(answer_keys)


# ----------------------------------------------------------------------------- Rouge-L

def rouge_tokens(text: str, stem: bool = False) -> list[str]:
    """Lower-cased word tokens: maximal runs of letters, digits and combining marks.

    Unlike rouge_score's ASCII-only tokenizer this keeps accented and non-Latin words
    ("está", "中文", Devanagari with its vowel signs). With `stem`, English tokens longer
    than 3 characters are reduced with the Porter stemmer (rouge_score's rule).
    """
    tokens, word = [], []
    for ch in unicodedata.normalize("NFC", text.lower()):
        if unicodedata.category(ch)[0] in "LNM":
            word.append(ch)
        elif word:
            tokens.append("".join(word))
            word = []
    if word:
        tokens.append("".join(word))
    if stem:
        tokens = [porter_stem(t) if len(t) > 3 and t.isascii() and t.isalpha() else t for t in tokens]
    return tokens


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(len(a)·len(b)) time)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)  # one DP row over b: row[j] = LCS(a[:i], b[:j])
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    return prev[-1]


def rouge_l(prediction: str, reference: str, stem: bool = False) -> float:
    """Rouge-L F1 (beta = 1): 2PR/(P+R) with P = LCS/|prediction|, R = LCS/|reference|."""
    pred, ref = rouge_tokens(prediction, stem), rouge_tokens(reference, stem)
    lcs = lcs_length(pred, ref) if pred and ref else 0
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l_max(prediction: str, references: Iterable[str], stem: bool = False) -> float:
    """Rouge-L F1 against the best-matching reference (0.0 with none)."""
    return max((rouge_l(prediction, r, stem) for r in references), default=0.0)


# ----------------------------------------------------------------------------- Porter stemmer

def _is_consonant(w: str, i: int) -> bool:
    if w[i] in "aeiou":
        return False
    if w[i] == "y":
        return i == 0 or not _is_consonant(w, i - 1)
    return True


def _measure(stem: str) -> int:
    """Porter's m: the number of vowel-consonant sequences in [C](VC)^m[V]."""
    pattern = "".join("c" if _is_consonant(stem, i) else "v" for i in range(len(stem)))
    return len(re.findall(r"v+c+", pattern))


def _has_vowel(stem: str) -> bool:
    return any(not _is_consonant(stem, i) for i in range(len(stem)))


def _ends_double_consonant(w: str) -> bool:
    return len(w) >= 2 and w[-1] == w[-2] and _is_consonant(w, len(w) - 1)


def _ends_cvc(w: str) -> bool:
    """*o: the stem ends consonant-vowel-consonant, the last not w, x or y."""
    return (len(w) >= 3 and _is_consonant(w, len(w) - 3) and not _is_consonant(w, len(w) - 2)
            and _is_consonant(w, len(w) - 1) and w[-1] not in "wxy")


def _replace_longest(w: str, rules: Sequence[tuple[str, str]], min_m: int) -> str:
    """Apply the rule with the longest matching suffix, if the stem's m > min_m."""
    for suffix, repl in sorted(rules, key=lambda r: -len(r[0])):
        if w.endswith(suffix):
            stem = w[: len(w) - len(suffix)]
            return stem + repl if _measure(stem) > min_m else w
    return w


_STEP2 = [("ational", "ate"), ("tional", "tion"), ("enci", "ence"), ("anci", "ance"), ("izer", "ize"),
          ("abli", "able"), ("alli", "al"), ("entli", "ent"), ("eli", "e"), ("ousli", "ous"),
          ("ization", "ize"), ("ation", "ate"), ("ator", "ate"), ("alism", "al"), ("iveness", "ive"),
          ("fulness", "ful"), ("ousness", "ous"), ("aliti", "al"), ("iviti", "ive"), ("biliti", "ble")]
_STEP3 = [("icate", "ic"), ("ative", ""), ("alize", "al"), ("iciti", "ic"), ("ical", "ic"),
          ("ful", ""), ("ness", "")]
_STEP4 = ["al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent", "ion",
          "ou", "ism", "ate", "iti", "ous", "ive", "ize"]


def porter_stem(word: str) -> str:
    """The Porter (1980) stemmer, original algorithm, for a lower-case English word.

    Words of one or two letters are returned unchanged.
    """
    w = word
    if len(w) <= 2:
        return w
    # Step 1a: plurals.
    if w.endswith("sses") or w.endswith("ies"):
        w = w[:-2]
    elif w.endswith("s") and not w.endswith("ss"):
        w = w[:-1]
    # Step 1b: -eed, -ed, -ing.
    if w.endswith("eed"):
        if _measure(w[:-3]) > 0:
            w = w[:-1]
    else:
        for suffix in ("ed", "ing"):
            if w.endswith(suffix) and _has_vowel(w[: -len(suffix)]):
                w = w[: -len(suffix)]
                if w.endswith(("at", "bl", "iz")):
                    w += "e"
                elif _ends_double_consonant(w) and w[-1] not in "lsz":
                    w = w[:-1]
                elif _measure(w) == 1 and _ends_cvc(w):
                    w += "e"
                break
    # Step 1c: y -> i after a vowel somewhere in the stem.
    if w.endswith("y") and _has_vowel(w[:-1]):
        w = w[:-1] + "i"
    w = _replace_longest(w, _STEP2, 0)
    w = _replace_longest(w, _STEP3, 0)
    # Step 4: drop a suffix when m > 1 (-ion only after s or t).
    for suffix in sorted(_STEP4, key=len, reverse=True):
        if w.endswith(suffix):
            stem = w[: -len(suffix)]
            if _measure(stem) > 1 and (suffix != "ion" or stem.endswith(("s", "t"))):
                w = stem
            break
    # Step 5a/5b: a final -e, and -ll when m > 1.
    if w.endswith("e"):
        stem = w[:-1]
        m = _measure(stem)
        if m > 1 or (m == 1 and not _ends_cvc(stem)):
            w = stem
    if w.endswith("ll") and _measure(w) > 1:
        w = w[:-1]
    return w


# ----------------------------------------------------------------------------- retention

def retention(teacher_scores: dict[str, float], other_scores: dict[str, float]) -> dict[str, float | None]:
    """Per metric, the share of the teacher's score another model keeps (other / teacher).

    Args:
        teacher_scores: {metric: value} of the teacher (e.g. {"em": 0.5, "f1": 0.62}).
        other_scores: the same metrics for the student or the deployed model.

    Returns:
        {metric: other/teacher} for every numeric metric both have; None where the
        teacher scored 0 (retention is undefined there).
    """
    out: dict[str, float | None] = {}
    for key, t in teacher_scores.items():
        o = other_scores.get(key)
        if isinstance(t, (int, float)) and isinstance(o, (int, float)) and not isinstance(t, bool):
            out[key] = (o / t) if t > 0 else None
    return out


def paired_bootstrap_retention(teacher: Sequence[float], other: Sequence[float], samples: int = 2000,
                               level: float = 0.95, seed: int = 0) -> dict:
    """Retention mean(other) / mean(teacher) on paired per-item scores, with a percentile bootstrap interval.

    Both models answered the same items, so items are resampled in pairs (Efron & Tibshirani 1993,
    ch. 13; Koehn 2004 for paired resampling of test items): an item that is hard for the teacher is
    hard for the student too, and resampling the pair keeps that correlation, which narrows the
    interval compared with resampling each model's scores apart. Resamples in which the teacher
    scores 0 have no ratio and are left out (their count is reported).

    Args:
        teacher, other: per-item scores (e.g. F1), the same items in the same order.
        samples: bootstrap resamples.
        level: coverage of the interval (0.95: the 2.5th and 97.5th percentiles).
        seed: the resampling seed (the interval is reproducible).

    Returns:
        {"value": point estimate or None, "low", "high" (None when undefined), "level", "n",
         "samples", "undefined_samples"}.

    Raises:
        ValueError: the two score lists differ in length.
    """
    import numpy as np

    t, o = np.asarray(teacher, dtype=np.float64), np.asarray(other, dtype=np.float64)   # [n]
    if t.shape != o.shape:
        raise ValueError(f"paired scores differ in length: {t.shape[0]} teacher vs {o.shape[0]} other")
    n = int(t.shape[0])
    value = float(o.mean() / t.mean()) if n and t.mean() > 0 else None
    out = {"value": value, "low": None, "high": None, "level": level, "n": n, "samples": samples,
           "undefined_samples": 0}
    if n == 0:
        return out
    idx = np.random.default_rng(seed).integers(0, n, size=(samples, n))                  # [samples, n]
    t_mean, o_mean = t[idx].mean(axis=1), o[idx].mean(axis=1)                            # [samples]
    defined = t_mean > 0
    out["undefined_samples"] = int((~defined).sum())
    if defined.any():
        ratios = o_mean[defined] / t_mean[defined]
        tail = 100 * (1 - level) / 2
        out["low"], out["high"] = (float(np.percentile(ratios, tail)), float(np.percentile(ratios, 100 - tail)))
    return out


def regressions(teacher_items: Sequence[dict], other_items: Sequence[dict], limit: int | None = 20) -> list[dict]:
    """Items the other model gets wrong that the teacher gets right, in data order.

    Args:
        teacher_items, other_items: per-item records with `id`, `correct` (bool) and
            `prediction`, as written to the predictions JSONL.
        limit: keep at most this many (None: all).

    Returns:
        [{id, teacher, other, answers}] with both predictions and the gold answers.
    """
    other_by_id = {r["id"]: r for r in other_items}
    out = []
    for t in teacher_items:
        o = other_by_id.get(t["id"])
        if o is not None and t["correct"] and not o["correct"]:
            out.append({"id": t["id"], "teacher": t["prediction"], "other": o["prediction"],
                        "answers": t.get("answers", [])})
    return out if limit is None else out[:limit]
