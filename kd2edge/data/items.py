"""The one record type every dataset loader produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Task = Literal["extractive", "multiple_choice", "free_text"]


@dataclass(frozen=True)
class QAItem:
    """One question with its gold answer(s).

    extractive (SQuAD/MLQA): `context`, `answers` (all gold spans), `answer_starts`.
    multiple_choice (CommonsenseQA): `choices`, `choice_labels` ("A".."E"), `answer_key`.
    free_text (Dolly): `answers` holds the reference response; `context` may be empty.
    """

    id: str
    question: str
    context: str = ""
    answers: tuple[str, ...] = ()
    answer_starts: tuple[int, ...] = ()
    choices: tuple[str, ...] = ()
    choice_labels: tuple[str, ...] = ()
    answer_key: str | None = None
    language: str = "en"
    task: Task = "extractive"
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def gold(self) -> tuple[str, ...]:
        """The gold answer texts (for multiple choice: the correct choice's text)."""
        if self.task == "multiple_choice" and self.answer_key is not None:
            return (self.choices[self.choice_labels.index(self.answer_key)],)
        return self.answers


@dataclass(frozen=True)
class QADataset:
    """Items of one split, with where they came from and what the loader noticed."""

    name: str
    split: str
    items: tuple[QAItem, ...]
    task: Task
    warnings: tuple[str, ...] = ()
    # How the part was cut from its source, for manifests (kd2edge.data.splits.split_items); {} for a
    # dataset with splits of its own (the embedded set, hub datasets).
    split_info: dict = field(default_factory=dict, compare=False, hash=False)

    def __len__(self) -> int:
        return len(self.items)
