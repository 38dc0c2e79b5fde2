"""finer1_lib.diagnose: which step of a structured answer failed (perception, recall, choice)."""
import pandas as pd
import pytest

from finer1_lib.diagnose import STEPS, analysis_span, candidates_span, diagnose, diagnosis_table, stated_attributes
from finer1_lib.world import SCHEMAS, World


@pytest.fixture(scope="module")
def world():
    return World(0)


def _answer(analysis, candidates, answer):
    return (f"<think><analysis>{analysis}</analysis><options>{', '.join(candidates)}</options>"
            f"<comparison>...</comparison><prediction>{answer}</prediction></think><answer>{answer}</answer>")


def test_stated_attributes_reads_every_true_phrase(world):
    for sp in world.species[::7]:
        text = f"This {sp.super_category} has " + ", ".join(sp.phrases()) + "."
        stated = stated_attributes(text, sp.super_category)
        assert stated == {d: [v] for d, v in sp.attributes.items()}, (sp.name, text)
    assert all(v == [] for v in stated_attributes("nothing here", "bird").values())
    with pytest.raises(ValueError, match="unknown super-category 'fish'"):
        stated_attributes("x", "fish")


def test_spans_tolerate_a_missing_analysis_tag():
    text = "<think>The aircraft has straight wings.</analysis><options>A b, C d</options><comparison>"
    assert analysis_span(text) == "The aircraft has straight wings."
    assert candidates_span(text) == ["A b", "C d"]
    assert analysis_span("<think>plain</think><answer>x</answer>") is None
    assert candidates_span("<think>plain</think>") is None


def test_diagnose_labels_the_first_failed_step(world):
    sp = world.species[0]
    sibling = next(s for s in world.species if s.genus == sp.genus and s != sp)
    other = next(s for s in world.species if s.genus != sp.genus and s.super_category == sp.super_category)
    dims = SCHEMAS[sp.super_category].dims
    good = ", ".join(sp.phrases())
    slip = next(i for i, d in enumerate(dims) if sibling.attributes[d.name] != sp.attributes[d.name])
    bad = ", ".join(p if i != slip else dims[i].say(sibling.attributes[dims[i].name])  # the answer's value
                    for i, p in enumerate(sp.phrases()))
    outputs = {
        "right": _answer(good, [sp.name, sibling.name], sp.name),
        "perception": _answer(bad, [sp.name, sibling.name], sibling.name),
        "recall": _answer(good, [sibling.name, other.name], sibling.name),
        "choice": _answer(good, [sp.name, other.name], other.name),
        "no answer": "<think><analysis>" + good + "</analysis><options>",
        "unstructured": f"<think>It is a bird.</think><answer>{other.name}</answer>",
    }
    df = pd.DataFrame([{"output": o, "ground_truth": sp.name, "super_category": sp.super_category,
                        "split": "seen", "mode": "open", "correct": k == "right"} for k, o in outputs.items()])
    diag = diagnose(df, world, seen=[sp.name, sibling.name])
    assert list(diag["step"]) == list(outputs)
    assert diag.loc[0, "analysis_all_right"] and not diag.loc[1, "analysis_all_right"]
    assert diag.loc[1, "attributes_stated"] == 5 and diag.loc[1, "attributes_right"] == 4
    assert diag.loc[1, "attributes_wrong"] == 1
    assert diag.loc[1, "wrong_of_answer"] == 1  # the slip is the value of the species it then names
    assert list(diag["truth_in_candidates"][:4]) == [True, True, False, True]
    assert diag.loc[2, "seen_candidates"] == pytest.approx(0.5)
    assert diag.loc[2, "answer_genus_right"] and not diag.loc[3, "answer_genus_right"]

    table = diagnosis_table(diag).loc[("open", "seen")]
    assert table["n"] == 6
    for step in STEPS:
        assert table[f"step: {step}"] == pytest.approx(100 / 6)
    assert table["attribute precision"] == pytest.approx(100 * 24 / 25)  # 5 answers with an analysis, one slip
    assert table["truth among candidates"] == pytest.approx(60.0)  # 3 of 5 (the cut-off one lists none)
    assert table["wrong attributes = the answer's"] == pytest.approx(100.0)
    assert table["wrong, right genus"] == pytest.approx(100 * 2 / 4)  # perception, recall right genus; choice, unstructured not


def test_diagnosis_by_method_reads_the_seen_classes_from_the_answers_and_skips_clip(world):
    """The reproduce report's diagnosis: one block per method with generated text; the seen classes are the
    ground truths of the "seen" rows, so a candidate list of seen classes scores 100 % seen-class candidates."""
    from finer1_lib.diagnose import diagnosis_by_method

    a, b, c = world.species[:3]
    rows = [{"output": _answer(", ".join(x.phrases()), [a.name, b.name], x.name), "ground_truth": x.name,
             "super_category": x.super_category, "split": split, "mode": "closed", "correct": True}
            for x, split in ((a, "seen"), (b, "seen"), (c, "unseen"))]
    frames = {"CoT SFT": pd.DataFrame(rows), "CLIP": pd.DataFrame(rows).drop(columns="output")}
    table = diagnosis_by_method(frames, world)
    assert list(table.index.get_level_values("method").unique()) == ["CoT SFT"]
    assert table.loc[("CoT SFT", "closed", "unseen"), "seen-class candidates"] == pytest.approx(100.0)
    assert table.loc[("CoT SFT", "closed", "seen"), "n"] == 2
    assert diagnosis_by_method({"CLIP": frames["CLIP"]}, world).empty


def test_diagnose_needs_evaluation_columns(world):
    with pytest.raises(ValueError, match="lack the columns"):
        diagnose(pd.DataFrame({"output": ["x"]}), world)


def test_diagnosis_needs_the_micro_world():
    from finer1_lib.diagnose import diagnose_methods

    with pytest.raises(ValueError, match="needs the micro world"):
        diagnose_methods("qwen2.5-vl-3b")


def test_hedging_counts_names_and_requires_one_name():
    """An answer listing two species is right under the official (substring) scoring but not with one name
    required; a name inside a longer one is not counted twice; no tags -> no names, not right."""
    from finer1_lib.diagnose import hedging, hedging_table, names_in

    names = ["Zisol Taibel", "Skoufur Taibel", "Taibel"]
    assert names_in("the Zisol Taibel or the skoufur taibel", names) == {"zisol taibel", "skoufur taibel"}
    assert names_in("a Taibel, the Zisol Taibel", names) == {"taibel", "zisol taibel"}
    assert names_in(None, names) == set()
    df = pd.DataFrame({"output": ["<think>x</think><answer>Zisol Taibel</answer>",
                                  "<think>x</think><answer>Zisol Taibel</answer>so<answer>Skoufur Taibel</answer>",
                                  "<think>x</think><answer>Skoufur Taibel, Zisol Taibel</answer>", "no tags"],
                       "ground_truth": ["Zisol Taibel", "Skoufur Taibel", "Skoufur Taibel", "Zisol Taibel"],
                       "correct": [True, True, True, False], "mode": "closed",
                       "split": ["seen", "seen", "unseen", "unseen"]})
    h = hedging(df, names)
    assert h["names"].tolist() == [1, 2, 2, 0]
    assert h["right with one name"].tolist() == [True, False, False, False]
    t = hedging_table({"m": df}, names)
    assert t.loc[("m", "closed", "seen"), "official"] == 100.0
    assert t.loc[("m", "closed", "seen"), "one name required"] == 50.0
    assert t.loc[("m", "closed", "unseen"), "answers naming several species"] == 50.0
    assert t.loc[("m", "closed", "seen"), "names per answer"] == 1.5


def test_stopping_tells_not_stopping_from_listing():
    """Writing on after </answer> (several <answer> tags) and listing names inside one answer are counted
    apart; only one tag with nothing after it is a clean single answer."""
    from finer1_lib.diagnose import stopping, stopping_table

    names = ["Zisol Taibel", "Skoufur Taibel"]
    df = pd.DataFrame({"output": ["<think>x</think><answer>Zisol Taibel</answer>\n",
                                  "<think>x</think><answer>Zisol Taibel</answer>so<answer>Skoufur Taibel</answer>",
                                  "<think>x</think><answer>Skoufur Taibel, Zisol Taibel</answer>",
                                  "<think>x</think><answer>Zisol Taibel</answer> and then", None],
                       "mode": "closed", "split": ["seen", "seen", "unseen", "unseen", "unseen"]})
    st = stopping(df, names)
    assert st["answer tags"].tolist() == [1, 2, 1, 1, 0]
    assert st["clean single answer"].tolist() == [True, False, True, False, False]
    assert st["several names in first answer"].tolist() == [False, False, True, False, False]
    t = stopping_table({"m": df}, names)
    assert t.loc[("m", "closed", "seen"), "several <answer> tags"] == 50.0
    assert t.loc[("m", "closed", "unseen"), "several names in the first answer"] == round(100 / 3, 2)
    assert t.loc[("m", "closed", "unseen"), "clean single answer"] == round(100 / 3, 2)
