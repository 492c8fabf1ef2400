"""Reading "Rationale: ... Answer: ..." outputs, and choice letters, from model text.

Pure string functions (standard library only). Teachers and students rarely follow a
format exactly: they bold the labels ("**Answer:**"), add headings ("### Answer"),
say "Final answer:", write "Reasoning:" instead of "Rationale:", repeat "the answer is"
inside the rationale, or wrap a choice letter as "(B)", "B.", "B) bank". The rules:

- the answer follows the *last* answer label (a label starts a line or follows
  sentence punctuation); it is the first non-empty line after it, with markdown,
  quotes and a trailing full stop removed;
- without an answer label, "the answer is X" or 'the answer to the question "..." is X'
  (last one) is accepted, flagged as such; X is a quoted string or runs to the sentence end;
- the rationale is the text between the rationale label (if any) and that answer
  label; without a rationale label, everything before the answer label;
- a line starting "Question:" or "Context:" ends the output: the model has begun
  another example of its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

# A label: at a line start (after optional markdown "#", "*", "-", ">"), or after ". " / ": ".
_LABEL_PREFIX = r"(?:^|(?<=[.!?;:])[ \t]+)[ \t>#*_\-]*"
_LABEL_SUFFIX = r"[ \t*_]*[:：][ \t*_]*"
_ANSWER_LABEL = re.compile(_LABEL_PREFIX + r"(?:final[ \t]+answer|answer|respuesta)" + _LABEL_SUFFIX,
                           re.IGNORECASE | re.MULTILINE)
_RATIONALE_LABEL = re.compile(_LABEL_PREFIX + r"(?:rationale|reasoning|explanation|reason|thoughts?|razonamiento)"
                              + _LABEL_SUFFIX, re.IGNORECASE | re.MULTILINE)
# "the answer is X", "the correct answer is: X", 'the answer to the question "..." is "X"':
# the phrase only (X is read after it), so every occurrence on a line is found.
_ANSWER_IS = re.compile(r"\b(?:the\s+)?(?:correct\s+|final\s+)?answer"
                        r"(?:\s+to\s+the\s+question\s*(?:\"[^\"\n]*\"|[^\n]*?))?\s+is\s*:?[ \t]*", re.IGNORECASE)
# A line opening a new "Context:" / "Question:" block: the model has started another example.
_NEW_EXAMPLE = re.compile(r"^[ \t>#*_]*(?:question|context|pregunta|contexto)[ \t*_]*[:：]", re.IGNORECASE | re.MULTILINE)
_QUOTED = re.compile(r"^[\"“']([^\"”'\n]+)[\"”']")
_SENTENCE_END = re.compile(r"(?<=\w)[.;](?:\s|$)")
_STRIP = " \t\r\n*_`\"'“”‘’"
MIN_RATIONALE_WORDS = 3


@dataclass(frozen=True)
class ParsedOutput:
    """What a "Rationale: ... Answer: ..." output holds.

    `answer` is None when no answer could be found. `labelled` says the answer came
    after an explicit answer label (the format was followed), not "the answer is".
    """

    rationale: str
    answer: str | None
    labelled: bool
    rationale_labelled: bool

    @property
    def has_rationale(self) -> bool:
        """A usable rationale: at least MIN_RATIONALE_WORDS words of reasoning."""
        return len(self.rationale.split()) >= MIN_RATIONALE_WORDS


def clean_answer(text: str) -> str:
    """The first non-empty line of `text`, without markdown, quotes or a trailing full stop."""
    for line in text.splitlines():
        line = line.strip(_STRIP)
        if line:
            return line[:-1].rstrip(_STRIP) if line.endswith(".") and not line.endswith("..") else line
    return ""


def sentence_answer(text: str) -> str | None:
    """The answer in the rest of an "answer is ..." sentence: a quoted string, else up to the sentence end."""
    text = text.strip()
    quoted = _QUOTED.match(text)
    if quoted:
        return quoted.group(1).strip() or None
    line = clean_answer(text)
    end = _SENTENCE_END.search(line)
    return (line[:end.start()] if end else line).strip(_STRIP) or None


def parse_rationale_answer(text: str) -> ParsedOutput:
    """Split a model output into its rationale and its final answer.

    Args:
        text: the raw generated text (special tokens already removed).

    Returns:
        A ParsedOutput; `answer` is None if neither an answer label nor "the answer is"
        occurs (or nothing follows it).
    """
    # Small models run on into an invented next example ("Answer: 1902\n\nQuestion: ...\nAnswer: 7");
    # only the text before it answers this question.
    text = _NEW_EXAMPLE.split(text, maxsplit=1)[0]
    answers = list(_ANSWER_LABEL.finditer(text))
    rationale_labels = list(_RATIONALE_LABEL.finditer(text))
    if answers:
        last = answers[-1]
        answer = clean_answer(text[last.end():]) or None
        # "Answer: The answer is August." holds the answer "August".
        restated = _ANSWER_IS.match(answer) if answer else None
        if restated and restated.start() == 0:
            answer = sentence_answer(answer[restated.end():]) or answer
        end, labelled = last.start(), True
    else:
        found = [m for m in _ANSWER_IS.finditer(text) if text[m.end():].split("\n", 1)[0].strip()]
        answer = sentence_answer(text[found[-1].end():]) if found else None
        end, labelled = (found[-1].start() if found else len(text)), False
    before = [m for m in rationale_labels if m.end() <= end]
    start = before[0].end() if before else 0
    rationale = text[start:end].strip(_STRIP)
    return ParsedOutput(rationale=" ".join(rationale.split()), answer=answer, labelled=labelled,
                        rationale_labelled=bool(before))


def format_score(parsed: ParsedOutput) -> float:
    """1.0 rationale + labelled answer, 0.5 labelled answer only, 0.0 otherwise."""
    if parsed.answer is None or not parsed.labelled:
        return 0.0
    return 1.0 if parsed.has_rationale else 0.5


def choice_label(answer: str | None, labels: Sequence[str], choices: Sequence[str]) -> str | None:
    """The choice label an answer names: "B", "(b)", "B) bank", "B. bank", "Option B" or "bank".

    Args:
        answer: the parsed answer text.
        labels: the item's choice labels ("A".."E").
        choices: the choice texts, in the same order.

    Returns:
        The matching label, or None if the answer names none (or is ambiguous).
    """
    if not answer:
        return None
    text = answer.strip(_STRIP)
    upper = {label.upper(): label for label in labels}
    norm = _norm(text)
    # A bare letter ("B", "(b)", "B."), then a choice's exact text, then a marked letter
    # ("B) bank", "(B) bank", "B. bank", "option B"): "a river" must mean the text, not "A".
    bare = re.fullmatch(r"[(\[]?([A-Za-z])[)\].:]?", text)
    if bare and bare.group(1).upper() in upper:
        return upper[bare.group(1).upper()]
    named = [label for label, choice in zip(labels, choices) if _norm(choice) == norm]
    if len(named) == 1:
        return named[0]
    marked = re.match(r"^(?:(?:option|choice)\s+[(\[]?([A-Za-z])\b|[(\[]([A-Za-z])[)\]]|([A-Za-z])[).:])", text,
                      re.IGNORECASE)
    if marked:
        letter = next(g for g in marked.groups() if g).upper()
        if letter in upper:
            return upper[letter]
    # "... is bank" or "bank, because ...": exactly one choice text contained as whole words.
    contained = [label for label, choice in zip(labels, choices)
                 if _norm(choice) and re.search(rf"\b{re.escape(_norm(choice))}\b", norm)]
    return contained[0] if len(contained) == 1 else None


def _norm(s: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", s.lower()).split())
