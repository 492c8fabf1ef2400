"""The embedded dataset: short SQuAD-style passages about invented entities, in English and Spanish.

Everything is generated here from a fixed seed (no file, no network, no text from a
public dataset): invented names are built from syllables, facts (years, counts,
places, products) are drawn at random, and each fact is written into a sentence
template. A question asks for exactly one fact and its answer is that fact's span,
whose offset is recorded while the passage is rendered, so `answer_start` is exact
by construction (and tested).

The same invented entity is described in both languages (a parallel set, like MLQA).
Every invented name is unique over the whole dataset, so the validation entities never
appear in a training passage.

Run `python -m kd2edge.data.embedded OUT_DIR` to write the splits as SQuAD v1.1 JSON files.
"""

from __future__ import annotations

import json
import random
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from kd2edge.data.items import QAItem

SEED = "kd2edge-embedded-v1"
LANGUAGES = ("en", "es")
SPLITS = ("train", "validation")
# Passages per split (each described in both languages, 4-5 questions each):
# about 420 questions per language in train and 130 in validation.
PASSAGES = {"train": 90, "validation": 28}

# ----------------------------------------------------------------------------------------------
# Vocabulary. Pairs are (English, Spanish); Spanish nouns that take an article carry their gender.

_ONSETS = ("b", "br", "c", "d", "dr", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "tr", "v", "z", "")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o")
_CODAS = ("", "", "", "", "", "n", "l", "r", "s")
_FIRST_ENDINGS = ("a", "o", "in", "el", "ia", "an", "ra", "is")
_PLACE_ENDINGS = ("a", "or", "en", "el", "ia", "ar", "on", "is", "ena", "ora")

_MONTHS = (("January", "enero"), ("February", "febrero"), ("March", "marzo"), ("April", "abril"),
           ("May", "mayo"), ("June", "junio"), ("July", "julio"), ("August", "agosto"),
           ("September", "septiembre"), ("October", "octubre"), ("November", "noviembre"),
           ("December", "diciembre"))
_TOWN_PRODUCTS = (("goat cheese", "queso de cabra"), ("blue glass", "vidrio azul"),
                  ("wool blankets", "mantas de lana"), ("apple cider", "sidra de manzana"),
                  ("clay pots", "vasijas de barro"), ("honey", "miel"), ("silver jewellery", "joyas de plata"),
                  ("wooden toys", "juguetes de madera"), ("olive oil", "aceite de oliva"),
                  ("paper lanterns", "farolillos de papel"), ("smoked fish", "pescado ahumado"),
                  ("rose soap", "jabón de rosas"))
_COMPANY_PRODUCTS = (("bicycles", "bicicletas"), ("umbrellas", "paraguas"), ("typewriters", "máquinas de escribir"),
                     ("sewing machines", "máquinas de coser"), ("radios", "radios"), ("kites", "cometas"),
                     ("pianos", "pianos"), ("telescopes", "telescopios"), ("boots", "botas"),
                     ("lamps", "lámparas"), ("clocks", "relojes"), ("tents", "tiendas de campaña"))
# (English noun, Spanish noun, Spanish gender): "the Darvel pump" / "la bomba Darvel".
_DEVICES = (("pump", "bomba", "f"), ("loom", "telar", "m"), ("compass", "brújula", "f"), ("engine", "motor", "m"),
            ("lamp", "lámpara", "f"), ("press", "prensa", "f"), ("telescope", "telescopio", "m"),
            ("clock", "reloj", "m"), ("plough", "arado", "m"), ("scale", "balanza", "f"))
# All feminine in Spanish, so "la {event}" always agrees.
_EVENTS = (("boat race", "carrera de barcas"), ("bread fair", "feria del pan"),
           ("lantern parade", "procesión de faroles"), ("kite contest", "competición de cometas"),
           ("mask dance", "danza de las máscaras"), ("horse auction", "subasta de caballos"),
           ("night regatta", "regata nocturna"), ("flower battle", "batalla de flores"),
           ("fireworks display", "exhibición de fuegos artificiales"), ("cheese show", "muestra de quesos"))


# ----------------------------------------------------------------------------------------------
# Templates. A passage is a sequence of sentence slots, each with alternatives (one is drawn per
# passage); `{fact}` placeholders are filled with the entity's facts. Each question names the fact
# that is its answer, with alternative phrasings.

@dataclass(frozen=True)
class Kind:
    """One kind of entity: how to describe it and what to ask about it, per language."""

    name: str
    sentences: dict[str, tuple[tuple[str, ...], ...]]          # language -> sentence slots -> alternatives
    questions: dict[str, tuple[tuple[str, tuple[str, ...]], ...]]  # language -> (answer fact, phrasings)


KINDS = (
    Kind("inventor", {
        "en": (("{name} was an inventor born in {town} in {year}.",
                "Born in {year} in the town of {town}, {name} became a well-known inventor."),
               ("In {built}, {name} built the {device}, which made the inventor famous.",
                "The {device} was built by {name} in {built}."),
               ("Over a long career, the inventor registered {patents} patents.",)),
        "es": (("{name} nació en {town} en {year} y con los años se dedicó a inventar.",
                "{name} nació en el pueblo de {town} en {year}. Con los años se dedicó a inventar."),
               ("En {built}, {name} construyó {device_art} {device}, que le dio fama.",),
               ("A lo largo de su carrera registró {patents} patentes.",)),
    }, {
        "en": (("town", ("Where was {name} born?", "In which town was {name} born?")),
               ("year", ("When was {name} born?", "In what year was {name} born?")),
               ("device", ("What did {name} build in {built}?",)),
               ("built", ("In what year did {name} build the {device}?", "When was the {device} built?")),
               ("name", ("Who built the {device}?", "Which inventor built the {device}?")),
               ("patents", ("How many patents did {name} register?",))),
        "es": (("town", ("¿Dónde nació {name}?", "¿En qué pueblo nació {name}?")),
               ("year", ("¿Cuándo nació {name}?", "¿En qué año nació {name}?")),
               ("device", ("¿Qué construyó {name} en {built}?",)),
               ("built", ("¿En qué año construyó {name} {device_art} {device}?",)),
               ("name", ("¿Quién construyó {device_art} {device}?",)),
               ("patents", ("¿Cuántas patentes registró {name}?",))),
    }),
    Kind("town", {
        "en": (("{town} is a small town on the banks of the {river} river.", "{town} lies on the {river} river."),
               ("It was founded in {year} by {founder}.", "{founder} founded the town in {year}."),
               ("Today {population} people live there, and the town is known for its {product}.",)),
        "es": (("{town} es un pequeño pueblo a orillas del río {river}.", "{town} está junto al río {river}."),
               ("Fue fundado en {year} por {founder}.", "{founder} fundó el pueblo en {year}."),
               ("Hoy viven allí {population} personas y el pueblo es conocido por su {product}.",)),
    }, {
        "en": (("river", ("On which river does {town} lie?", "What river is {town} on?")),
               ("year", ("When was {town} founded?", "In what year was {town} founded?")),
               ("founder", ("Who founded {town}?",)),
               ("population", ("How many people live in {town}?",)),
               ("product", ("What is {town} known for?",))),
        "es": (("river", ("¿Junto a qué río está {town}?",)),
               ("year", ("¿Cuándo fue fundado {town}?", "¿En qué año se fundó {town}?")),
               ("founder", ("¿Quién fundó {town}?",)),
               ("population", ("¿Cuántas personas viven en {town}?",)),
               ("product", ("¿Por qué es conocido {town}?",))),
    }),
    Kind("company", {
        "en": (("{company} is a company that makes {product}.",),
               ("{founder} started it in {year} in the town of {town}.",
                "It was started in {year} by {founder} in the town of {town}."),
               ("The company now employs {employees} people.",)),
        "es": (("{company} es una empresa que fabrica {product}.",),
               ("{founder} la fundó en {year} en la ciudad de {town}.",
                "Fue fundada en {year} por {founder} en la ciudad de {town}."),
               ("Hoy la empresa tiene {employees} empleados.",)),
    }, {
        "en": (("product", ("What does {company} make?",)),
               ("founder", ("Who started {company}?", "Who founded the company {company}?")),
               ("year", ("When was {company} started?", "In what year was {company} founded?")),
               ("town", ("In which town was {company} started?",)),
               ("employees", ("How many people does {company} employ?",))),
        "es": (("product", ("¿Qué fabrica {company}?",)),
               ("founder", ("¿Quién fundó {company}?",)),
               ("year", ("¿En qué año se fundó {company}?", "¿Cuándo se fundó {company}?")),
               ("town", ("¿En qué ciudad se fundó {company}?",)),
               ("employees", ("¿Cuántos empleados tiene {company}?",))),
    }),
    Kind("river", {
        "en": (("The {river} is a river that rises in the {mountains}.",),
               ("It is {length} long and flows into {lake}.",),
               ("On its way it passes the town of {town}.", "The town of {town} stands on its banks.")),
        "es": (("El {river} es un río que nace en los {mountains}.",),
               ("Tiene {length} de largo y desemboca en el {lake}.",),
               ("En su recorrido pasa por el pueblo de {town}.", "El pueblo de {town} está en sus orillas.")),
    }, {
        "en": (("mountains", ("Where does the {river} rise?",)),
               ("length", ("How long is the {river}?",)),
               ("lake", ("Into which lake does the {river} flow?", "Where does the {river} flow into?")),
               ("town", ("Which town is on the {river}?",))),
        "es": (("mountains", ("¿Dónde nace el {river}?",)),
               ("length", ("¿Cuánto mide el {river}?", "¿Qué longitud tiene el {river}?")),
               ("lake", ("¿En qué lago desemboca el {river}?",)),
               ("town", ("¿Qué pueblo está junto al {river}?",))),
    }),
    Kind("festival", {
        "en": (("The {festival} Festival is held every {month} in {town}.",),
               ("It has taken place since {year}.", "The first one took place in {year}."),
               ("About {visitors} visitors come each year to watch the {event}.",)),
        "es": (("El Festival {festival} se celebra cada {month} en {town}.",),
               ("Se celebra desde {year}.", "El primero tuvo lugar en {year}."),
               ("Cada año llegan unos {visitors} visitantes para ver la {event}.",)),
    }, {
        "en": (("town", ("Where is the {festival} Festival held?",)),
               ("month", ("In which month is the {festival} Festival held?",)),
               ("year", ("Since what year has the {festival} Festival taken place?",
                         "When did the first {festival} Festival take place?")),
               ("visitors", ("How many visitors come to the {festival} Festival each year?",)),
               ("event", ("What do visitors come to watch at the {festival} Festival?",))),
        "es": (("town", ("¿Dónde se celebra el Festival {festival}?",)),
               ("month", ("¿En qué mes se celebra el Festival {festival}?",)),
               ("year", ("¿Desde qué año se celebra el Festival {festival}?",)),
               ("visitors", ("¿Cuántos visitantes llegan cada año al Festival {festival}?",)),
               ("event", ("¿Qué van a ver los visitantes del Festival {festival}?",))),
    }),
    Kind("mountain", {
        "en": (("Mount {mountain} is a peak {height} high.",),
               ("It was first climbed in {year} by {climber}.", "{climber} was the first to climb it, in {year}."),
               ("The village of {town} lies at its foot.",)),
        "es": (("El monte {mountain} es una cumbre de {height} de altura.",),
               ("Fue escalado por primera vez en {year} por {climber}.",
                "{climber} fue el primero en escalarlo, en {year}."),
               ("El pueblo de {town} se encuentra a sus pies.",)),
    }, {
        "en": (("height", ("How high is Mount {mountain}?",)),
               ("climber", ("Who first climbed Mount {mountain}?",)),
               ("year", ("When was Mount {mountain} first climbed?",
                         "In what year was Mount {mountain} first climbed?")),
               ("town", ("Which village lies at the foot of Mount {mountain}?",))),
        "es": (("height", ("¿Qué altura tiene el monte {mountain}?",)),
               ("climber", ("¿Quién escaló por primera vez el monte {mountain}?",)),
               ("year", ("¿Cuándo fue escalado por primera vez el monte {mountain}?",)),
               ("town", ("¿Qué pueblo se encuentra a los pies del monte {mountain}?",))),
    }),
)
_KIND_BY_NAME = {k.name: k for k in KINDS}


# ----------------------------------------------------------------------------------------------
# Generation.

class _Names:
    """Invented names, unique over the whole dataset (so splits never share an entity)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def _word(self, syllables: int, endings: tuple[str, ...]) -> str:
        while True:
            body = "".join(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS)
                           for _ in range(syllables - 1))
            word = (body + self.rng.choice(_ONSETS) + self.rng.choice(endings)).capitalize()
            # Too short reads like a word, not a name; a repeat would let an entity cross splits.
            if len(word) >= 4 and word not in self.used:
                self.used.add(word)
                return word

    def person(self) -> str:
        return f"{self._word(2, _FIRST_ENDINGS)} {self._word(self.rng.choice((2, 2, 3)), _PLACE_ENDINGS)}"

    def place(self) -> str:
        return self._word(self.rng.choice((2, 2, 3)), _PLACE_ENDINGS)


def _facts(kind: str, names: _Names, rng: random.Random) -> dict[str, tuple[str, str]]:
    """Draw one entity's facts: slot -> (English text, Spanish text).

    Numeric ranges are chosen so that two facts of one passage can never have the same text.
    """
    same = lambda s: (s, s)  # noqa: E731  (names and numbers read the same in both languages)
    if kind == "inventor":
        year = rng.randint(1650, 1900)
        noun_en, noun_es, gender = rng.choice(_DEVICES)
        brand = names.place()
        return {"name": same(names.person()), "town": same(names.place()), "year": same(str(year)),
                "built": same(str(year + rng.randint(20, 50))), "patents": same(str(rng.randint(3, 60))),
                "device": (f"{brand} {noun_en}", f"{noun_es} {brand}"),
                "device_art": ("the", "la" if gender == "f" else "el")}
    if kind == "town":
        return {"town": same(names.place()), "river": same(names.place()), "founder": same(names.person()),
                "year": same(str(rng.randint(1100, 1850))), "population": same(str(rng.randint(2000, 9500))),
                "product": rng.choice(_TOWN_PRODUCTS)}
    if kind == "company":
        return {"company": same(names.place()), "founder": same(names.person()), "town": same(names.place()),
                "year": same(str(rng.randint(1820, 1990))), "employees": same(str(rng.randint(12, 999))),
                "product": rng.choice(_COMPANY_PRODUCTS)}
    if kind == "river":
        length = rng.randint(40, 900)
        mountains, lake = names.place(), names.place()
        return {"river": same(names.place()), "town": same(names.place()),
                "mountains": (f"{mountains} Mountains", f"montes {mountains}"),
                "lake": (f"Lake {lake}", f"lago {lake}"),
                "length": (f"{length} kilometres", f"{length} kilómetros")}
    if kind == "festival":
        return {"festival": same(names.place()), "town": same(names.place()), "month": rng.choice(_MONTHS),
                "year": same(str(rng.randint(1700, 1990))), "visitors": same(str(100 * rng.randint(20, 200))),
                "event": rng.choice(_EVENTS)}
    if kind == "mountain":
        height = rng.randint(2000, 4800)
        return {"mountain": same(names.place()), "climber": same(names.person()), "town": same(names.place()),
                "year": same(str(rng.randint(1760, 1960))),
                "height": (f"{height} metres", f"{height} metros")}
    raise ValueError(f"unknown kind {kind!r}")


_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def render(template: str, values: dict[str, str]) -> tuple[str, dict[str, int]]:
    """Fill `{slot}` placeholders, recording where each slot's text starts.

    Args:
        template: text with `{slot}` placeholders.
        values: slot -> text.

    Returns:
        (text, {slot: character offset of its first occurrence in text}).
    """
    out: list[str] = []
    starts: dict[str, int] = {}
    pos = last = 0
    for m in _PLACEHOLDER.finditer(template):
        literal = template[last:m.start()]
        out.append(literal)
        pos += len(literal)
        starts.setdefault(m.group(1), pos)
        value = values[m.group(1)]
        out.append(value)
        pos += len(value)
        last = m.end()
    out.append(template[last:])
    return "".join(out), starts


def _passage_items(kind: Kind, facts: dict[str, tuple[str, str]], passage_id: str, split: str,
                   rng: random.Random) -> list[QAItem]:
    """Render one entity in every language and ask one question per fact."""
    # Draw the template choices once, so the two languages describe the entity the same way.
    sentence_picks = [rng.random() for _ in kind.sentences["en"]]
    question_picks = [rng.random() for _ in kind.questions["en"]]
    entities = tuple(v[0] for k, v in facts.items() if _is_entity(kind.name, k))
    items = []
    for lang_index, lang in enumerate(LANGUAGES):
        values = {slot: pair[lang_index] for slot, pair in facts.items()}
        sentences = [alts[int(p * len(alts))] for alts, p in zip(kind.sentences[lang], sentence_picks)]
        context, starts = render(" ".join(sentences), values)
        for q_index, ((answer_slot, phrasings), p) in enumerate(zip(kind.questions[lang], question_picks)):
            question, _ = render(phrasings[int(p * len(phrasings))], values)
            items.append(QAItem(
                id=f"{passage_id}-{lang}-q{q_index}", question=question, context=context,
                answers=(values[answer_slot],), answer_starts=(starts[answer_slot],), language=lang,
                task="extractive",
                meta={"kind": kind.name, "passage": passage_id, "fact": answer_slot, "split": split,
                      "entities": entities}))
    return items


def _is_entity(kind: str, slot: str) -> bool:
    """Whether a fact is an invented name (the things that must not cross splits)."""
    return slot in {"name", "town", "river", "founder", "company", "mountains", "lake", "festival",
                    "mountain", "climber"} or (kind == "inventor" and slot == "device")


@lru_cache(maxsize=1)
def _generate() -> dict[str, tuple[QAItem, ...]]:
    rng = random.Random(SEED)
    names = _Names(rng)
    out: dict[str, tuple[QAItem, ...]] = {}
    for split in SPLITS:  # train first, then validation, sharing `names` so entities never repeat
        items: list[QAItem] = []
        for i in range(PASSAGES[split]):
            kind = KINDS[i % len(KINDS)]  # balanced kinds
            facts = _facts(kind.name, names, rng)
            items += _passage_items(kind, facts, f"embedded-{split}-{i:03d}-{kind.name}", split, rng)
        out[split] = tuple(items)
    return out


def embedded_items(split: str = "validation", language: str | None = None) -> tuple[QAItem, ...]:
    """The embedded dataset's questions.

    Args:
        split: "train" or "validation".
        language: "en", "es", or None for both.

    Returns:
        The items, in a fixed order (passage by passage, English then Spanish).

    Raises:
        ValueError: an unknown split or language (the loader turns this into a DataError).
    """
    if split not in SPLITS:
        raise ValueError(f"the embedded dataset has splits {', '.join(SPLITS)}, not {split!r}")
    if language is not None and language not in LANGUAGES:
        raise ValueError(f"the embedded dataset has languages {', '.join(LANGUAGES)}, not {language!r}")
    items = _generate()[split]
    return items if language is None else tuple(it for it in items if it.language == language)


def to_squad(items: tuple[QAItem, ...] | list[QAItem], title: str = "embedded") -> dict:
    """Extractive items as a SQuAD v1.1 JSON document (paragraphs grouped by context, in order)."""
    paragraphs: dict[str, list[dict]] = {}
    for it in items:
        paragraphs.setdefault(it.context, []).append({
            "id": it.id, "question": it.question,
            "answers": [{"text": a, "answer_start": s} for a, s in zip(it.answers, it.answer_starts)]})
    return {"version": "1.1", "data": [{"title": title, "paragraphs": [
        {"context": c, "qas": qas} for c, qas in paragraphs.items()]}]}


def main(argv: list[str] | None = None) -> int:
    """Write the embedded dataset as SQuAD v1.1 JSON files, one per split and language."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m kd2edge.data.embedded OUT_DIR", file=sys.stderr)
        return 2
    out = Path(args[0])
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        for lang in LANGUAGES:
            items = embedded_items(split, lang)
            path = out / f"embedded-{split}-{lang}.json"
            path.write_text(json.dumps(to_squad(items, f"embedded-{lang}"), ensure_ascii=False, indent=1) + "\n",
                            encoding="utf-8")
            print(f"{path}: {len(items)} questions", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
