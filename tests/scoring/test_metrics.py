"""The metrics against hand-computed cases (official-script behaviour)."""

from __future__ import annotations

import pytest

from kd2edge.scoring import metrics as m


# ---------------------------------------------------------------- SQuAD

@pytest.mark.parametrize("text, expected", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  an   apple, a pear.  ", "apple pear"),
    ("Theory of the firm", "theory of firm"),   # "the" removed, "Theory" kept (word boundary)
    ("Denver Broncos'", "denver broncos"),
    ("“quoted”", "“quoted”"),                    # SQuAD strips ASCII punctuation only
    ("", ""),
])
def test_squad_normalize(text, expected):
    assert m.normalize_answer(text) == expected


def test_exact_match_ignores_case_articles_punctuation():
    assert m.exact_match("the Normans.", "Normans") == 1.0
    assert m.exact_match("Normans in France", "Normans") == 0.0


def test_f1_hand_computed():
    # pred tokens [normans, came, from, normandy], gold [normandy]: P=1/4, R=1 -> F1 = 0.4
    assert m.f1_score("The Normans came from Normandy", "Normandy") == pytest.approx(0.4)
    # pred [10th, and, 11th, centuries], gold [10th, 11th]: common 2, P=2/4, R=1 -> 2/3
    assert m.f1_score("10th and 11th centuries", "10th, 11th") == pytest.approx(2 / 3)
    # pred [x, x, y], gold [x]: common 1 (min of counts), P=1/3, R=1
    assert m.f1_score("x x y", "x") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert m.f1_score("cats", "dogs") == 0.0


def test_max_over_gold_answers():
    golds = ["Denver Broncos", "The Denver Broncos", "Broncos"]
    em, f1 = m.squad_scores("broncos", golds)
    assert em == 1.0 and f1 == 1.0
    em, f1 = m.squad_scores("the Denver team", golds)
    # best gold "Denver Broncos": pred [denver, team], common 1: P=1/2 R=1/2 -> 0.5
    assert em == 0.0 and f1 == pytest.approx(0.5)


def test_unanswerable_items_squad_v2():
    assert m.squad_scores("", []) == (1.0, 1.0)
    assert m.squad_scores("Paris", []) == (0.0, 0.0)
    # a gold that normalizes to nothing counts as "no answer"
    assert m.squad_scores("", ["the"]) == (1.0, 1.0)
    # an answerable item is never matched by an empty prediction
    assert m.squad_scores("", ["Paris"]) == (0.0, 0.0)


# ---------------------------------------------------------------- MLQA

def test_mlqa_spanish_articles_and_unicode_punctuation():
    assert m.normalize_answer("¡El Río Selen!", "es") == "río selen"
    assert m.normalize_answer("Los reyes y las reinas", "es") == "reyes y reinas"
    assert m.exact_match("el río Selen", "«Río Selen»", lang="es") == 1.0
    # SQuAD's rule keeps the Spanish article and the guillemets
    assert m.exact_match("el río Selen", "«Río Selen»") == 0.0
    # pred [explorador, tomás, ivarra] gold [tomás, ivarra]: P=2/3 R=1 -> 0.8
    assert m.f1_score("El explorador Tomás Ivarra", "Tomás Ivarra", lang="es") == pytest.approx(0.8)


def test_mlqa_german_and_chinese():
    assert m.normalize_answer("Die Stadt des Königs", "de") == "stadt königs"
    # zh: one token per CJK character, ASCII runs split on white space
    assert m.answer_tokens("北京 大学 in 2024。", "zh") == ["北", "京", "大", "学", "in", "2024"]
    # pred [北, 京] gold [北, 京, 大, 学]: P=1, R=1/2 -> 2/3
    assert m.f1_score("北京", "北京大学", lang="zh") == pytest.approx(2 / 3)


def test_mlqa_arabic_as_the_script_does():
    # the script removes every "ال", also inside words
    assert m.normalize_answer("الكتاب", "ar") == "كتاب"


def test_mlqa_unknown_language():
    with pytest.raises(ValueError, match="unknown MLQA language"):
        m.normalize_answer("x", "xx")


# ---------------------------------------------------------------- CommonsenseQA

def test_choice_accuracy():
    assert m.choice_accuracy(["A", "C", None, "E"], ["A", "B", "C", "E"]) == 0.5
    with pytest.raises(ValueError):
        m.choice_accuracy(["A"], ["A", "B"])


# ---------------------------------------------------------------- Rouge-L

def test_lcs_length():
    assert m.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4   # the CLRS example
    assert m.lcs_length([], ["a"]) == 0


def test_rouge_l_hand_cases():
    # ref [the, cat, sat, on, the, mat], pred [the, cat, on, the, mat]: LCS 5, P=1, R=5/6 -> 10/11
    assert m.rouge_l("the cat on the mat", "The cat sat on the mat.") == pytest.approx(10 / 11)
    assert m.rouge_l("", "anything") == 0.0
    assert m.rouge_l("x y", "y x") == pytest.approx(0.5)   # LCS 1, P=R=1/2


def test_rouge_l_keeps_accented_and_non_latin_words():
    assert m.rouge_tokens("¿Está el café en Bogotá?") == ["está", "el", "café", "en", "bogotá"]
    assert m.rouge_tokens("नमस्ते दुनिया") == ["नमस्ते", "दुनिया"]   # vowel signs (marks) stay inside
    # pred [café, y, cacao], ref [exporta, café, cacao, y, madera]: LCS 2 ([café, cacao]), P=2/3 R=2/5 -> 0.5
    assert m.rouge_l("café y cacao", "exporta café, cacao y madera") == pytest.approx(0.5)


def test_rouge_l_stemming():
    # stemmed: [run, dog] vs [run, dog] -> 1.0; unstemmed: no common token
    assert m.rouge_l("running dogs", "runs dog", stem=True) == pytest.approx(1.0)
    assert m.rouge_l("running dogs", "runs dog") == 0.0
    assert m.rouge_l_max("the cat", ["a dog", "the cat"]) == 1.0


@pytest.mark.parametrize("word, stem", [
    # examples from Porter (1980)
    ("caresses", "caress"), ("ponies", "poni"), ("ties", "ti"), ("caress", "caress"), ("cats", "cat"),
    ("feed", "feed"), ("agreed", "agre"), ("plastered", "plaster"), ("bled", "bled"),
    ("motoring", "motor"), ("sing", "sing"), ("conflated", "conflat"), ("troubled", "troubl"),
    ("sized", "size"), ("hopping", "hop"), ("tanned", "tan"), ("falling", "fall"), ("hissing", "hiss"),
    ("fizzed", "fizz"), ("failing", "fail"), ("filing", "file"), ("happy", "happi"), ("sky", "sky"),
    ("relational", "relat"), ("conditional", "condit"), ("rational", "ration"), ("digitizer", "digit"),
    ("operator", "oper"), ("hopefulness", "hope"), ("formality", "formal"), ("sensitivity", "sensit"),
    ("triplicate", "triplic"), ("formative", "form"), ("electrical", "electr"), ("goodness", "good"),
    ("revival", "reviv"), ("allowance", "allow"), ("inference", "infer"), ("airliner", "airlin"),
    ("adjustable", "adjust"), ("defensible", "defens"), ("irritant", "irrit"), ("replacement", "replac"),
    ("adjustment", "adjust"), ("dependent", "depend"), ("adoption", "adopt"), ("communism", "commun"),
    ("activate", "activ"), ("effective", "effect"), ("probate", "probat"), ("rate", "rate"),
    ("cease", "ceas"), ("controlling", "control"), ("roll", "roll"), ("generalizations", "gener"),
    ("oscillators", "oscil"), ("is", "is"),
])
def test_porter_stemmer(word, stem):
    assert m.porter_stem(word) == stem


# ---------------------------------------------------------------- retention

def test_retention_and_regressions():
    r = m.retention({"em": 0.5, "f1": 0.8, "n": 10}, {"em": 0.25, "f1": 0.6, "n": 10})
    assert r["em"] == pytest.approx(0.5) and r["f1"] == pytest.approx(0.75)
    assert m.retention({"em": 0.0}, {"em": 0.1}) == {"em": None}
    teacher = [{"id": "1", "correct": True, "prediction": "a", "answers": ["a"]},
               {"id": "2", "correct": True, "prediction": "b", "answers": ["b"]},
               {"id": "3", "correct": False, "prediction": "x", "answers": ["c"]}]
    other = [{"id": "1", "correct": True, "prediction": "a"},
             {"id": "2", "correct": False, "prediction": "q"},
             {"id": "3", "correct": False, "prediction": "y"}]
    assert m.regressions(teacher, other) == [{"id": "2", "teacher": "b", "other": "q", "answers": ["b"]}]


def test_paired_bootstrap_retention_by_hand():
    # Equal scores: every resample has ratio 1.
    same = m.paired_bootstrap_retention([0.2, 0.4, 0.6], [0.2, 0.4, 0.6], samples=200)
    assert (same["value"], same["low"], same["high"], same["n"]) == (1.0, 1.0, 1.0, 3)
    # The other model keeps half of every item: the ratio is 0.5 whatever the resample.
    half = m.paired_bootstrap_retention([0.2, 0.4, 1.0, 0.8], [0.1, 0.2, 0.5, 0.4], samples=300, seed=1)
    assert half["value"] == pytest.approx(0.5) and half["low"] == pytest.approx(0.5) == half["high"]
    # Unpaired differences give an interval around the point estimate, reproducible by seed.
    t, o = [1.0, 0.0, 1.0, 0.5, 0.0, 1.0] * 5, [1.0, 0.5, 0.0, 0.5, 0.0, 1.0] * 5
    a, b = m.paired_bootstrap_retention(t, o, seed=3), m.paired_bootstrap_retention(t, o, seed=3)
    assert a == b and a["value"] == pytest.approx(3.0 / 3.5) and a["low"] < a["value"] < a["high"]
    # A teacher scoring 0 everywhere has no ratio; resamples without teacher score are counted, not divided by.
    assert m.paired_bootstrap_retention([0.0, 0.0], [1.0, 0.0])["value"] is None
    assert m.paired_bootstrap_retention([0.0, 1.0], [1.0, 1.0], samples=400)["undefined_samples"] > 0
    with pytest.raises(ValueError, match="differ in length"):
        m.paired_bootstrap_retention([1.0], [1.0, 0.0])
