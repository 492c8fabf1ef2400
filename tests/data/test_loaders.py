"""load_qa on small files in the real layouts, written here; every error path; subsets; hub offline."""

from __future__ import annotations

import json

import pytest

from kd2edge.data.loaders import load_qa, locate_answer, parse_split, subset
from kd2edge.errors import DataError

CONTEXT = "Lake Orvel feeds the Tavena river. The river reaches Brimor in 1620."


def squad_doc(qas, context=CONTEXT, version="1.1"):
    return {"version": version, "data": [{"title": "Orvel", "paragraphs": [{"context": context, "qas": qas}]}]}


def write_json(path, doc):
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- helpers

@pytest.mark.parametrize("start, expected", [
    (53, (53, "ok")),          # CONTEXT[53:59] == "Brimor"
    (50, (53, "fixed")),       # wrong, found once
    (None, (53, "found")),
])
def test_locate_answer(start, expected):
    assert CONTEXT[53:59] == "Brimor"
    assert locate_answer(CONTEXT, "Brimor", start) == expected


def test_locate_answer_ambiguous_or_absent_keeps_given_offset():
    assert locate_answer(CONTEXT, "river", 0) == (0, "unfixed")        # "river" occurs twice
    assert locate_answer(CONTEXT, "Paris", 3) == (3, "unfixed")
    assert locate_answer(CONTEXT, "Paris", None) == (-1, "missing")


# ---------------------------------------------------------------------------------------------- embedded

def test_embedded_specs():
    both = load_qa("embedded")
    assert both.split == "validation" and both.task == "extractive"
    assert {it.language for it in both.items} == {"en", "es"}
    es = load_qa("embedded-es@train")
    assert es.split == "train" and {it.language for it in es.items} == {"es"}
    assert len(load_qa("embedded", split="dev")) == len(both)


def test_embedded_unknown_split():
    with pytest.raises(DataError, match="embedded@test: the embedded dataset has splits train, validation"):
        load_qa("embedded@test")


# ---------------------------------------------------------------------------------------------- SQuAD / MLQA

def test_squad_v11_with_offsets_checked_and_fixed(tmp_path):
    path = write_json(tmp_path / "dev.json", squad_doc([
        {"id": "q1", "question": "Where does the river reach?",
         "answers": [{"text": "Brimor", "answer_start": 53}, {"text": "Brimor", "answer_start": 50}]},
        {"id": "q2", "question": "What feeds the river?",
         "answers": [{"text": "river", "answer_start": 3}]},
    ]))
    ds = load_qa(str(path))
    assert (ds.name, ds.split, ds.task, len(ds)) == (str(path), "validation", "extractive", 2)
    q1, q2 = ds.items
    assert q1.answers == ("Brimor", "Brimor") and q1.answer_starts == (53, 53)
    assert q2.answer_starts == (3,)  # repeated text: kept as given
    assert q1.meta["title"] == "Orvel" and q1.language == "en"
    assert ds.warnings == ("2 answer offsets did not match their context: 1 fixed by finding the answer text, "
                           "1 kept as given (text absent or repeated)",)


def test_squad_v2_unanswerable_kept_with_empty_answers(tmp_path):
    path = write_json(tmp_path / "dev-v2.0.json", squad_doc([
        {"id": "a", "question": "When?", "answers": [{"text": "1620", "answer_start": 63}], "is_impossible": False},
        {"id": "b", "question": "Who?", "answers": [], "plausible_answers": [{"text": "Brimor", "answer_start": 53}],
         "is_impossible": True},
    ], version="v2.0"))
    ds = load_qa(str(path))
    assert [it.answers for it in ds.items] == [("1620",), ()]
    assert ds.items[1].meta["is_impossible"] and ds.items[1].task == "extractive"
    assert ds.warnings == ("1 unanswerable questions (SQuAD v2) kept with no answer",)


def test_mlqa_language_from_file_name_and_from_spec(tmp_path):
    ctx = "El río Selen nace en 1620."
    doc = squad_doc([{"id": "m1", "question": "¿Cuándo?", "answers": [{"text": "1620", "answer_start": 21}]}], ctx)
    named = write_json(tmp_path / "dev-context-es-question-es.json", doc)
    assert load_qa(str(named)).items[0].language == "es"
    plain = write_json(tmp_path / "mlqa_dev.json", doc)
    ds = load_qa(f"mlqa:{plain}:es@test")
    assert ds.split == "test" and ds.items[0].language == "es" and ds.items[0].answer_starts == (21,)
    with pytest.raises(DataError, match="no such MLQA file"):
        load_qa(f"mlqa:{tmp_path / 'nope.json'}:es")


# ---------------------------------------------------------------------------------------------- JSONL layouts

CSQA_NESTED = {"answerKey": "B", "id": "c1", "question": {
    "question_concept": "door", "stem": "Where is a revolving door?",
    "choices": [{"label": "A", "text": "bank"}, {"label": "B", "text": "hotel"}, {"label": "C", "text": "cave"}]}}
CSQA_FLAT = {"id": "c2", "question": "Where do fish live?", "question_concept": "fish",
             "choices": {"label": ["A", "B"], "text": ["sea", "desert"]}, "answerKey": "A"}


def test_csqa_official_and_flat_layouts(tmp_path):
    nested = load_qa(str(write_jsonl(tmp_path / "csqa.jsonl", [CSQA_NESTED])))
    flat = load_qa(str(write_jsonl(tmp_path / "csqa_hf.jsonl", [CSQA_FLAT])))
    a, b = nested.items[0], flat.items[0]
    assert nested.task == flat.task == "multiple_choice"
    assert (a.question, a.choices, a.choice_labels, a.answer_key, a.gold) == (
        "Where is a revolving door?", ("bank", "hotel", "cave"), ("A", "B", "C"), "B", ("hotel",))
    assert (b.id, b.choices, b.gold, b.meta["question_concept"]) == ("c2", ("sea", "desert"), ("sea",), "fish")


def test_csqa_unlabelled_rows_are_skipped_with_a_warning(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", [CSQA_NESTED, {**CSQA_FLAT, "answerKey": ""}])
    ds = load_qa(str(path))
    assert [it.id for it in ds.items] == ["c1"]
    assert ds.warnings == ("1 questions without an answerKey skipped (an unlabelled test split?)",)


def test_dolly(tmp_path):
    path = write_jsonl(tmp_path / "dolly.jsonl", [
        {"instruction": "When did Orvel open?", "context": "Orvel opened in 1901.", "response": "In 1901.",
         "category": "closed_qa"},
        {"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": "open_qa"}])
    ds = load_qa(str(path), "all")
    assert ds.task == "free_text" and len(ds) == 2
    first = ds.items[0]
    assert (first.question, first.context, first.answers, first.meta) == (
        "When did Orvel open?", "Orvel opened in 1901.", ("In 1901.",), {"category": "closed_qa"})
    assert first.id == "dolly.jsonl-1" and ds.items[1].id == "dolly.jsonl-2"


def test_generic_jsonl_answer_forms(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [
        {"id": "g1", "question": "Where?", "context": CONTEXT, "answers": "Brimor"},
        {"id": "g2", "question": "When?", "context": CONTEXT, "answers": {"text": ["1620"], "answer_start": [63]}},
        {"id": "g3", "question": "What?", "context": CONTEXT, "answers": [{"text": "Lake Orvel", "answer_start": 0}]},
        {"id": "g4", "question": "Which?", "context": CONTEXT, "answers": ["Paris"], "language": "fr"},
    ])
    ds = load_qa(str(path))
    assert [it.answer_starts for it in ds.items] == [(53,), (63,), (0,), (-1,)]
    assert ds.items[3].language == "fr"
    assert ds.warnings == ("1 answers do not occur in their context (offset -1)",)


def test_json_lines_in_a_json_file_and_json_list(tmp_path):
    lines = write_jsonl(tmp_path / "hf_export.json", [CSQA_FLAT, CSQA_FLAT | {"id": "c3"}])
    assert [it.id for it in load_qa(f"{lines}@all").items] == ["c2", "c3"]
    listed = write_json(tmp_path / "list.json", [CSQA_FLAT])
    assert load_qa(str(listed), "all").items[0].id == "c2"


# ---------------------------------------------------------------------------------------------- errors

def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"no such file: .*nope\.json"):
        load_qa(str(tmp_path / "nope.json"))
    with pytest.raises(DataError, match="is a folder"):
        load_qa(str(tmp_path))


def test_missing_field_names_record_and_field(tmp_path):
    records = [CSQA_NESTED] * 6 + [{"answerKey": "A", "id": "x", "question": {"choices": []}}]
    with pytest.raises(DataError, match=r"^csqa\.jsonl record 7 question: missing 'stem'$"):
        load_qa(str(write_jsonl(tmp_path / "csqa.jsonl", records)))
    dolly = [{"instruction": "a", "context": "", "response": "b"}, {"instruction": "c", "context": ""}]
    with pytest.raises(DataError, match=r"^data\.jsonl record 2: missing 'response'$"):
        load_qa(str(write_jsonl(tmp_path / "data.jsonl", dolly)))
    with pytest.raises(DataError, match=r"qas\[0\]: missing 'question'"):
        load_qa(str(write_json(tmp_path / "s.json", squad_doc([{"id": "q", "answers": []}]))))
    with pytest.raises(DataError, match=r"answers\[0\]: 'answer_start' should be int, got str"):
        load_qa(str(write_json(tmp_path / "s.json", squad_doc(
            [{"id": "q", "question": "?", "answers": [{"text": "Brimor", "answer_start": "53"}]}]))))


def test_unknown_layout_and_bad_answer_key(tmp_path):
    with pytest.raises(DataError, match=r"x\.jsonl record 1: unknown record layout \(keys foo\)"):
        load_qa(str(write_jsonl(tmp_path / "x.jsonl", [{"foo": 1}])))
    with pytest.raises(DataError, match="answerKey 'E' is not one of the choice labels A, B, C"):
        load_qa(str(write_jsonl(tmp_path / "c.jsonl", [CSQA_NESTED | {"answerKey": "E"}])))
    with pytest.raises(DataError, match=r"expected a SQuAD document"):
        load_qa(str(write_json(tmp_path / "d.json", {"version": "1.1"})))


def test_truncated_json_and_jsonl(tmp_path):
    good = json.dumps(squad_doc([{"id": "q", "question": "?", "answers": []}]))
    (tmp_path / "cut.json").write_text(good[:-20], encoding="utf-8")
    with pytest.raises(DataError, match=r"cut\.json is not valid JSON at line 1 column \d+ .*truncated"):
        load_qa(str(tmp_path / "cut.json"))
    (tmp_path / "cut.jsonl").write_text(json.dumps(CSQA_FLAT) + "\n" + json.dumps(CSQA_FLAT)[:30], encoding="utf-8")
    with pytest.raises(DataError, match=r"cut\.jsonl record 2: not valid JSON"):
        load_qa(str(tmp_path / "cut.jsonl"))


def test_empty_split(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.jsonl \(validation\) has no questions"):
        load_qa(str(tmp_path / "empty.jsonl"))
    with pytest.raises(DataError, match="has no questions"):
        load_qa(str(write_json(tmp_path / "e.json", {"version": "1.1", "data": []})))


def test_unknown_spec():
    with pytest.raises(DataError, match="no such file: nonsense: give 'embedded'"):
        load_qa("nonsense")


def test_hub_offline_is_a_data_error(monkeypatch):
    # An id no datasets cache can hold, so the result never depends on this machine's cache.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # datasets then refuses to go online
    with pytest.raises(DataError, match="hub is unreachable and kd2edge-tests/no-such-set is not in the datasets "
                                        "cache: pass a local file"):
        load_qa("kd2edge-tests/no-such-set")


def test_unreachable_hub_fails_fast_without_calling_datasets(monkeypatch):
    import socket

    def refuse(address, timeout):
        assert address == ("huggingface.co", 443) and timeout > 0
        raise OSError("Name or service not known")

    for key in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(DataError, match="hub is unreachable, so databricks/databricks-dolly-15k cannot be "
                                        "downloaded: pass a local file"):
        load_qa("databricks/databricks-dolly-15k@train")


def test_mlqa_hub_language_is_checked():
    with pytest.raises(DataError, match="MLQA has no language 'xx'"):
        load_qa("mlqa:xx")


# ---------------------------------------------------------------------------------------------- subsets

def test_limit_is_reproducible_ordered_and_seed_dependent():
    full = load_qa("embedded")
    a, b = load_qa("embedded", limit=20, seed=3), load_qa("embedded", limit=20, seed=3)
    c = load_qa("embedded", limit=20, seed=4)
    assert len(a) == 20 and a.items == b.items and a.items != c.items
    order = {it.id: i for i, it in enumerate(full.items)}
    assert [order[it.id] for it in a.items] == sorted(order[it.id] for it in a.items)
    assert load_qa("embedded", limit=10_000).items == full.items


def test_limit_below_one():
    with pytest.raises(DataError, match="limit must be at least 1"):
        subset(load_qa("embedded"), 0, seed=0)


# ---------------------------------------------------------------------------------------------- split slices

@pytest.mark.parametrize("split, expected", [
    ("train", ("train", None)), ("train[:80%]", ("train", (None, "80%"))),
    ("validation[10:-5]", ("validation", ("10", "-5"))), ("test[-10%:]", ("test", ("-10%", None)))])
def test_parse_split(split, expected):
    assert parse_split(split) == expected


def test_slices_of_one_file_are_disjoint_and_cover_it(tmp_path):
    records = [{"question": f"Q{i}?", "context": f"Answer {i}.", "answers": [str(i)]} for i in range(10)]
    path = write_jsonl(tmp_path / "qa.jsonl", records)
    train = load_qa(f"{path}@all[:80%]")
    held_out = load_qa(str(path), split="all[80%:]")
    assert [it.question for it in train.items] == [f"Q{i}?" for i in range(8)]
    assert [it.question for it in held_out.items] == ["Q8?", "Q9?"]
    assert (train.split, held_out.split) == ("all[:80%]", "all[80%:]")
    assert [it.question for it in load_qa(str(path), split="all[-3:-1]").items] == ["Q7?", "Q8?"]


def test_one_file_is_split_by_article_and_never_across_one(tmp_path):
    """Training reads the train part, evaluation the validation part: no article on both sides."""
    doc = {"version": "1.1", "data": [
        {"title": f"Article {a}", "paragraphs": [
            {"context": f"Passage {a}.{p} says {a * 10 + p}.",
             "qas": [{"id": f"{a}-{p}-{q}", "question": f"What does {a}.{p} say ({q})?",
                      "answers": [{"text": str(a * 10 + p), "answer_start": len(f"Passage {a}.{p} says ")}]}
                     for q in range(2)]} for p in range(3)]} for a in range(10)]}
    path = write_json(tmp_path / "squad.json", doc)
    train, validation, whole = (load_qa(str(path), part) for part in ("train", "validation", "all"))
    titles = {part: {it.meta["title"] for it in ds.items} for part, ds in
              (("train", train), ("validation", validation))}
    assert not titles["train"] & titles["validation"]
    assert (len(titles["validation"]), len(titles["train"])) == (2, 8)          # 20% of the 10 articles
    assert len(train) + len(validation) == len(whole) == 60
    assert validation.split_info == {"by": "article", "validation_fraction": 0.2,
                                     "groups": {"train": 8, "validation": 2},
                                     "validation_groups": sorted(titles["validation"]), "part": "validation"}
    assert load_qa(f"{path}@dev").items == validation.items and load_qa(f"{path}@test").items == whole.items
    with pytest.raises(DataError, match="ask for @train, @validation or @all"):
        load_qa(f"{path}@holdout")


def test_the_shipped_xquad_sample_is_split_by_article_alike_in_both_languages():
    en, es = load_qa("xquad-en@validation"), load_qa("xquad-es@validation")
    assert len(en) == len(es) == 192 and [it.id for it in en.items] == [it.id for it in es.items]
    assert {it.language for it in es.items} == {"es"} and en.split_info["groups"] == {"train": 30, "validation": 8}
    train_titles = {it.meta["title"] for it in load_qa("xquad@train").items}
    assert not train_titles & {it.meta["title"] for it in en.items}
    assert len(load_qa("xquad@all")) == 2 * 946


def test_embedded_slice_then_limit():
    head = load_qa("embedded@validation[:30]")
    assert head.items == load_qa("embedded").items[:30]
    assert len(load_qa("embedded@validation[:30]", limit=5)) == 5


def test_bad_slice():
    with pytest.raises(DataError, match=r"bad split 'train\[a:b\]': write NAME or NAME\[START:END\]"):
        load_qa("embedded@train[a:b]")
    with pytest.raises(DataError, match=r"embedded \(train\[5:5\]\) has no questions"):
        load_qa("embedded@train[5:5]")


def test_binary_file_is_a_data_error(tmp_path):
    (tmp_path / "model.json").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(DataError, match=r"cannot read .*model\.json: .*UTF-8 text file"):
        load_qa(str(tmp_path / "model.json"))
