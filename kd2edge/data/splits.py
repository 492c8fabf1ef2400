"""One dataset, two parts: training and validation split by group, so no passage is on both sides.

A file of SQuAD, MLQA or XQuAD questions has no train/validation split of its own, and many
questions share a passage: split by question, the validation questions would be answered from
passages the student was trained on. So the unit of the split is the group a question belongs
to: its article (the SQuAD `title`), else its passage (`context`), else the question itself.
Parallel files (XQuAD English and Spanish) name their articles alike, so an article lands on
the same side in every language.

The split is deterministic and independent of file order: groups are ranked by a hash of their
key and the first round(fraction x groups) of them are the validation part (at least one, and
at least one group is left to train on).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

from kd2edge.data.items import QAItem

VALIDATION_FRACTION = 0.2
SALT = "kd2edge-split-v1"
SPLIT_NAMES = ("train", "validation", "all")   # "all": the whole file, no split


def group_kind(items: Sequence[QAItem]) -> str:
    """What the split groups by: "article" (every item has a title), "passage" (a context) or "item"."""
    if items and all(it.meta.get("title") for it in items):
        return "article"
    if items and all(it.context for it in items):
        return "passage"
    return "item"


def group_key(item: QAItem, kind: str) -> str:
    """The key of the group `item` belongs to, for a split by `kind`."""
    if kind == "article":
        return item.meta["title"]
    if kind == "passage":
        return item.context
    return item.id


def validation_groups(keys: Sequence[str], fraction: float = VALIDATION_FRACTION) -> set[str]:
    """The groups of the validation part: the round(fraction x n) distinct keys ranked first by hash.

    Args:
        keys: group keys (repeats allowed).
        fraction: share of the groups held out, 0 < fraction < 1.

    Returns:
        The held-out keys: at least one, and never all of them when there are two or more.

    Raises:
        ValueError: fraction outside (0, 1).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must lie strictly between 0 and 1, got {fraction}")
    distinct = sorted(set(keys), key=lambda k: hashlib.sha256(f"{SALT}:{k}".encode("utf-8")).hexdigest())
    n = min(max(1, round(fraction * len(distinct))), max(1, len(distinct) - 1))
    return set(distinct[:n])


def split_items(items: Sequence[QAItem], part: str,
                fraction: float = VALIDATION_FRACTION) -> tuple[tuple[QAItem, ...], dict]:
    """The items of one part ("train", "validation" or "all") of a split by group, in their order.

    Returns:
        (items, a description for manifests: by, validation_fraction, group counts per part and the
        validation groups' keys (titles; passages as their first 60 characters)).

    Raises:
        ValueError: an unknown part.
    """
    if part not in SPLIT_NAMES:
        raise ValueError(f"unknown split part {part!r}: use one of {', '.join(SPLIT_NAMES)}")
    kind = group_kind(items)
    held = validation_groups([group_key(it, kind) for it in items], fraction)
    train_keys = {group_key(it, kind) for it in items} - held
    info = {"by": kind, "validation_fraction": fraction,
            "groups": {"train": len(train_keys), "validation": len(held)},
            "validation_groups": sorted(k if kind != "passage" else k[:60] for k in held)}
    if part == "all":
        return tuple(items), {**info, "part": "all"}
    keep = [it for it in items if (group_key(it, kind) in held) == (part == "validation")]
    return tuple(keep), {**info, "part": part}
