"""Shape measures of the base model: per-slot perception scores and answers inside the offered options."""
import pandas as pd
import pytest

from finer1_lib.knowledge import _score, answers_in_options
from finer1_lib.world import SCHEMAS, World


def test_score_marks_each_attribute_slot():
    sp = World(0).species_of("bird")[0]
    dims = SCHEMAS["bird"].dims
    wrong_crest = {**sp.attributes, "crest": next(v for v in dims[2].values if v != sp.attributes["crest"])}
    text = "This is a bird with " + ", ".join(d.say(wrong_crest[d.name]) for d in dims) + "."
    s = _score("bird", sp.attributes, text)
    assert [s[f"attribute {k}"] for k in range(1, 6)] == [True, True, False, True, True]
    assert s["genus attrs"] and not s["species attrs"] and not s["all 5 attrs"]
    assert s["per-attribute"] == pytest.approx(0.8)


def test_answers_in_options_per_split():
    rows = [{"options": ["A b", "C d", "E f", "G h"], "split": "seen"},
            {"options": ["A b", "C d", "E f", "G h"], "split": "seen"},
            {"options": ["X y", "Z w", "Q r", "S t"], "split": "unseen"}]
    results = pd.DataFrame([
        {"mode": "closed", "split": "seen", "prediction": " c D "},   # case and spaces do not matter
        {"mode": "closed", "split": "seen", "prediction": "Mm n"},    # outside the options
        {"mode": "closed", "split": "unseen", "prediction": "Q r"},
        {"mode": "open", "split": "seen", "prediction": "whatever"},  # open-world rows are ignored
    ])
    got = answers_in_options(results, rows)
    assert got["seen"] == 50.0 and got["unseen"] == 100.0
    with pytest.raises(ValueError, match="2 closed-world results for 3"):
        answers_in_options(results.iloc[1:], rows)
