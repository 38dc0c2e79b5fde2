"""Evaluation and knowledge probes: scoring of scripted outputs (the generation is replaced by a script)."""
import numpy as np
import pandas as pd
import pytest

import finer1_lib.evaluate as ev
import finer1_lib.knowledge as kn
from finer1_lib.metrics import SemanticSimilarity, hash_encoder
from finer1_lib.world import World

WORLD = World(0)


class FakeBench:
    def __init__(self, rows):
        self.eval_rows = rows

    def image(self, path):
        return None


def _rows():
    birds = WORLD.species_of("bird")
    return [
        {"image_path": "a.png", "question": "What bird is this?", "options": [b.name for b in birds[:4]],
         "ground_truth": birds[0].name, "super_category": "bird", "split": "seen", "image_id": "a"},
        {"image_path": "b.png", "question": "What bird is this?", "options": [b.name for b in birds[:4]],
         "ground_truth": birds[1].name, "super_category": "bird", "split": "unseen", "image_id": "b"},
    ]


def test_eval_prompt_modes_and_bad_mode():
    row = _rows()[0]
    assert "based on the options provided in" in ev.eval_prompt(row, "closed")
    assert repr(row["options"]) in ev.eval_prompt(row, "closed")
    assert "This is a fine-grained question." in ev.eval_prompt(row, "open")
    assert ev.eval_prompt(row, "open", think_step_by_step=True).endswith("Let's think step by step.")
    with pytest.raises(ValueError, match="unknown evaluation mode 'middle'"):
        ev.eval_prompt(row, "middle")


def test_run_eval_scores_answers_not_reasoning(monkeypatch):
    rows = _rows()
    gt0, gt1 = rows[0]["ground_truth"], rows[1]["ground_truth"]
    script = {
        # closed: row 0 right inside <answer>; row 1 names the truth only while reasoning -> wrong
        "closed": [f"<think>a</think><answer>{gt0}</answer>", f"<think>{gt1}?</think><answer>{gt0}</answer>"],
        # open: row 0 untagged but contains the name (TI counts the whole output); row 1 empty
        "open": [f"It is the {gt0}.", ""],
    }

    def fake_generate(model, processor, images, prompts, **kw):
        mode = "closed" if "options provided" in prompts[0] else "open"
        return script[mode]

    monkeypatch.setattr(ev, "generate", fake_generate)
    df = ev.run_eval(None, None, FakeBench(rows))
    assert df["correct"].tolist() == [True, False, True, False]
    assert df["well_formed"].tolist() == [True, True, False, False]
    df = ev.add_semantic_similarity(df, SemanticSimilarity(hash_encoder()))
    assert df.loc[df["mode"] == "closed", "SS"].isna().all()
    assert 0.0 < df.loc[2, "SS"] < 1.0  # untagged: the whole output is the prediction, extra words cost
    assert df.loc[3, "SS"] == 0.0  # empty prediction
    table = ev.summarize(df)
    assert table.loc[("closed-world acc", "seen"), "all"] == 100.0
    assert table.loc[("closed-world acc", "unseen"), "all"] == 0.0
    assert table.loc[("open-world TI", "seen"), "all"] == 100.0


def test_run_eval_needs_rows():
    with pytest.raises(ValueError, match="no evaluation records"):
        ev.run_eval(None, None, FakeBench([]))


def test_summarize_per_super_category():
    df = pd.DataFrame({"mode": ["closed"] * 4, "split": ["seen"] * 4, "super_category": ["bird", "bird", "car", "car"],
                       "correct": [True, False, True, True]})
    t = ev.summarize(df, per_super=True)
    assert t.loc[("closed-world acc", "seen")].to_dict() == {"all": 75.0, "bird": 50.0, "car": 100.0}


def test_parse_attributes_reads_field_guide_phrases():
    sp = WORLD.species_of("bird")[0]
    text = f"This is a bird with {', '.join(sp.phrases())}."
    assert kn.parse_attributes("bird", text) == sp.attributes
    got = kn.parse_attributes("bird", "This is a bird with a red crest and a blue crest.")
    assert got["crest"] is None and got["body"] is None  # ambiguous or absent -> None


def test_score_counts_genus_and_species_attributes():
    sp = WORLD.species_of("dog")[0]
    other = [s for s in WORLD.species_of("dog") if s.genus == sp.genus and s != sp][0]
    s = kn._score("dog", sp.attributes, f"a dog with {', '.join(other.phrases())}")
    assert s["genus attrs"] is True and s["species attrs"] is False and s["all 5 attrs"] is False
    assert s["per-attribute"] == pytest.approx(1 - len([k for k in sp.attributes
                                                        if sp.attributes[k] != other.attributes[k]]) / 5)
