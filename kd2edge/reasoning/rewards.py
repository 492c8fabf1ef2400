"""Rewards for GRPO and the teacher-data filter, as small pure functions.

Each reward maps one completion (and its item) to a float in [0, 1]:

- `answer_score`: correctness of the final answer, by task: token F1 (SQuAD rule,
  best over gold answers) for extractive QA, 1/0 for the right choice letter in
  multiple choice, Rouge-L F1 for free text, and the pass/fail of the dataset's unit
  tests for code (an item whose `meta["tests"]` holds test code).
- `format_reward`: 1 for "a rationale followed by an answer" (both labelled, rationale
  of at least MIN_RATIONALE_WORDS words), 0.5 for a labelled answer without a usable
  rationale, 0 otherwise.

Candidate code is run with its tests in a separate Python process (isolated mode,
fresh temp folder, time limit), never in this process.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import subprocess
import sys
import tempfile
import warnings
from typing import Mapping, Sequence

from kd2edge.data.items import QAItem
from kd2edge.scoring.metrics import rouge_l_max, squad_scores
from kd2edge.scoring.parsing import ParsedOutput, choice_label, format_score, parse_rationale_answer

REWARD_NAMES = ("correctness", "format")
_CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def has_tests(item: QAItem) -> bool:
    """Whether the item carries unit tests for code answers (`meta["tests"]`)."""
    return bool(item.meta.get("tests"))


def extract_code(text: str) -> str:
    """The code of a completion: its fenced ``` blocks joined, else the whole text."""
    blocks = _CODE_BLOCK.findall(text)
    return "\n".join(b.strip("\n") for b in blocks) if blocks else text.strip()


def code_reward(code: str, tests: str, timeout_s: float = 10.0) -> float:
    """1.0 if `code` followed by `tests` runs to the end in a fresh Python process, else 0.0.

    The program must reach a random marker printed after the tests, so a candidate that
    exits early with status 0 (`sys.exit(0)`, `os._exit(0)`) does not pass.

    Args:
        code: the candidate program.
        tests: test code (asserts) run after it in the same module.
        timeout_s: wall-clock limit; a program still running is killed and scores 0.

    Returns:
        1.0 or 0.0.
    """
    marker = f"kd2edge-tests-passed-{secrets.token_hex(8)}"
    with tempfile.TemporaryDirectory(prefix="kd2edge-code-") as tmp:
        path = os.path.join(tmp, "candidate.py")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(f"{code}\n\n{tests}\n\nprint({marker!r})\n")
        # -I: isolated (no user site, no PYTHON* env vars, cwd not on sys.path); minimal env.
        try:
            done = subprocess.run([sys.executable, "-I", path], cwd=tmp, capture_output=True,
                                  timeout=timeout_s, env={"PATH": os.environ.get("PATH", "")})
        except subprocess.TimeoutExpired:
            return 0.0
    return 1.0 if done.returncode == 0 and marker.encode() in done.stdout else 0.0


def answer_score(item: QAItem, answer: str | None, completion: str = "") -> float:
    """Correctness of a final answer against the item's gold, in [0, 1].

    Args:
        item: the question with its gold answer(s).
        answer: the parsed final answer (None: no answer found, scores 0).
        completion: the whole completion; used for code items, whose code may lie
            in the rationale part.

    Returns:
        Token F1 (extractive), 1/0 (multiple choice), Rouge-L F1 (free text), or the
        unit tests' pass (code items).
    """
    if has_tests(item):
        return code_reward(extract_code(completion or answer or ""), item.meta["tests"])
    if answer is None:
        return 0.0
    if item.task == "multiple_choice":
        return float(choice_label(answer, item.choice_labels, item.choices) == item.answer_key)
    if item.task == "free_text":
        return rouge_l_max(answer, item.answers)
    lang = item.language if item.language in ("es", "de", "vi", "zh", "ar", "hi") else None
    return squad_scores(answer, item.answers, lang=lang)[1]


def correctness_reward(completion: str, item: QAItem) -> float:
    """`answer_score` of the answer parsed from a completion."""
    parsed = parse_rationale_answer(completion)
    if parsed.answer is None and item.task != "multiple_choice" and not has_tests(item):
        # An unlabelled short reply ("Adaline Qorr") is still an answer for extractive/free text.
        return answer_score(item, completion.strip() or None, completion)
    return answer_score(item, parsed.answer, completion)


def format_reward(completion: str, item: QAItem | None = None) -> float:
    """`format_score` of a completion (the item is not needed; kept for a uniform signature)."""
    return format_score(parse_rationale_answer(completion))


def combine_rewards(scores: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """The weighted sum GRPO optimises: sum_k w_k * r_k over the weighted rewards."""
    return sum(w * scores[name] for name, w in weights.items())


def check_reward_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """Validate reward weights: known names, finite, not negative.

    Raises:
        ValueError: an unknown reward name, or a negative / non-finite weight.
    """
    out = {}
    for name, w in weights.items():
        if name not in REWARD_NAMES:
            raise ValueError(f"unknown reward {name!r}: use {', '.join(REWARD_NAMES)}")
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"reward weight {name}={w} must be a finite number >= 0")
        out[name] = float(w)
    return out


def probe_completions(item: QAItem) -> tuple[str, str]:
    """A right and a wrong completion for an item: the gold answer in the rationale
    format, and an empty reply. A reward that cannot tell them apart teaches nothing."""
    gold = item.answer_key if item.task == "multiple_choice" and item.answer_key else (item.gold or ("",))[0]
    if has_tests(item):
        return f"```python\n{gold}\n```", ""
    return f"Rationale: the question asks for this, and the text gives it.\nAnswer: {gold}", ""


REWARDS = {"correctness": correctness_reward, "format": format_reward}


def constant_reward_problem(weights: Mapping[str, float], items: Sequence[QAItem],
                            probe_items: int = 8) -> str | None:
    """Why these reward settings give every completion the same reward, or None.

    GRPO's advantage is a completion's reward minus its group's mean reward: if the
    weighted reward is constant, every advantage is 0 and the policy never moves. The
    check scores a right and a wrong completion (`probe_completions`) of the first
    `probe_items` items with the weighted reward.

    Returns:
        A one-line explanation, or None when the weighted reward can vary.
    """
    active = {name: w for name, w in weights.items() if w > 0}
    if not active:
        return "every reward weight is 0, so every completion gets reward 0"
    values = set()
    for item in list(items)[:probe_items]:
        for completion in probe_completions(item):
            scores = {name: REWARDS[name](completion, item) for name in active}
            values.add(round(combine_rewards(scores, active), 9))
    if len(values) <= 1:
        value = next(iter(values), 0.0)
        return (f"the weighted reward ({', '.join(active)}) is {value} for a right and a wrong completion alike")
    return None


def warn_if_constant(weights: Mapping[str, float], items: Sequence[QAItem]) -> str | None:
    """Emit a warning (warnings.warn) when GRPO cannot learn from these rewards.

    Returns:
        The warning text, or None.
    """
    problem = constant_reward_problem(weights, items)
    if problem is not None:
        message = f"GRPO learns nothing: {problem}; give correctness or format a weight > 0"
        warnings.warn(message, stacklevel=2)
        return message
    return None


def zero_variance_warning(frac_zero_std_per_step: Sequence[float]) -> str | None:
    """A warning when every logged step had equal rewards inside every group.

    Args:
        frac_zero_std_per_step: TRL's `frac_reward_zero_std` per step (share of groups
            whose rewards were all equal).

    Returns:
        The warning text (also emitted with warnings.warn), or None.
    """
    if frac_zero_std_per_step and all(f >= 1.0 for f in frac_zero_std_per_step):
        message = ("GRPO learned nothing: every group of completions got equal rewards at every step "
                   "(advantage 0); raise num_generations or temperature, or use a reward that separates them")
        warnings.warn(message, stacklevel=2)
        return message
    return None


def parse_weights(text: str) -> dict[str, float]:
    """Parse "correctness=1,format=0.2" into {"correctness": 1.0, "format": 0.2}.

    Raises:
        ValueError: a part that is not NAME=NUMBER, an unknown name, or a bad weight.
    """
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"{part!r} is not NAME=NUMBER") from None
    return check_reward_weights(out)
